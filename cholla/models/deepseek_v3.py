"""DeepSeek-V3 and GLM-4 MoE Lite: multi-head latent attention (``layers/mla.py``)
over a sigmoid-routed mixture of experts with grouped top-k, a correction bias and
shared experts; the first layers keep a dense MLP. GGUF calls both ``deepseek2``.
"""

from __future__ import annotations

import torch

from cholla.errors import ModelFormatError
from cholla.layers.linear import Weight, dense
from cholla.layers.mla import LatentAttention
from cholla.layers.rotary import RotaryEmbedding
from cholla.models.config import ModelConfig
from cholla.models.decoder import DecoderModel, PreNormLayer, feed_forward


class DeepseekV3ForCausalLM(DecoderModel):
    def __init__(self, config: ModelConfig):
        mla = config.mla
        rotary = RotaryEmbedding(config.rope, mla.qk_rope_head_dim, config.rope_interleaved)

        def layer(cfg: ModelConfig, index: int) -> PreNormLayer:
            attention = LatentAttention(cfg.hidden_size, cfg.num_heads, mla.kv_lora_rank, mla.qk_nope_head_dim,
                                        mla.qk_rope_head_dim, mla.v_head_dim, mla.q_lora_rank, rotary,
                                        cfg.attn_scale)
            return PreNormLayer(cfg, attention, feed_forward(cfg, index))

        super().__init__(config, layer)

    def sanitize(self, weights: dict[str, Weight]) -> dict[str, Weight]:
        """HF names -> ours: ``shared_experts`` -> ``shared_expert``, the router's
        correction bias up to the MoE, and ``kv_b_proj`` split per head into ``k_b``
        (transposed, as GGUF's ``attn_k_b`` is stored) and ``v_b``."""
        mla, out = self.config.mla, {}
        for name, w in weights.items():
            name = name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
            name = name.replace(".mlp.gate.e_score_correction_bias", ".mlp.e_score_correction_bias")
            if name.endswith("kv_b_proj.weight"):
                per_head = mla.qk_nope_head_dim + mla.v_head_dim
                if tuple(w.shape) != (self.config.num_heads * per_head, mla.kv_lora_rank):
                    raise ModelFormatError(f"tensor {name} has shape {list(w.shape)}, which does not fit the config")
                kv_b = dense(w, torch.float32).view(self.config.num_heads, per_head, mla.kv_lora_rank)
                prefix = name.removesuffix("kv_b_proj.weight")
                out[f"{prefix}k_b"] = kv_b[:, : mla.qk_nope_head_dim].transpose(1, 2).contiguous()
                out[f"{prefix}v_b"] = kv_b[:, mla.qk_nope_head_dim :].contiguous()
                continue
            out[name] = w
        return super().sanitize(out)
