"""Qwen3-Next and Qwen 3.5 (dense and MoE): Gated DeltaNet layers (``layers/gated_deltanet.py``)
with a gated full-attention layer every few, each followed by a dense MLP or a mixture of
experts whose shared expert has a sigmoid gate.

The attention layers have per-head QK-norm, rope on the leading quarter of each head,
and a second half of ``q_proj`` that gates their output. Norms compute
``x * (1 + w)``: the 1 is folded in when reading HF weights (GGUF stores ``1 + w``), except
for the DeltaNet's own output norm, a plain ``x * w``. The three families differ only in
how checkpoints lay their weights out, which ``sanitize_hf`` and ``sanitize`` undo.
Multi-token-prediction layers (``mtp.*``) are not loaded: cholla decodes one token a step.
"""

from __future__ import annotations

import torch
from torch import nn

from cholla.kv.state_cache import LayerCache
from cholla.layers.attention import Attention, AttentionMetadata
from cholla.layers.gated_deltanet import GatedDeltaNet
from cholla.layers.linear import Weight, dense
from cholla.layers.norm import RMSNorm
from cholla.layers.rotary import RotaryEmbedding
from cholla.models.config import LINEAR_ATTENTION, ModelConfig
from cholla.models.decoder import DecoderModel, feed_forward


class HybridLayer(nn.Module):
    """``x + mixer(norm(x))`` with a Gated DeltaNet or gated attention mixer, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig, index: int, rotary: RotaryEmbedding):
        super().__init__()
        self.recurrent = config.layer_types[index] == LINEAR_ATTENTION
        if self.recurrent:
            self.linear_attn = GatedDeltaNet(config.hidden_size, config.deltanet, config.rms_norm_eps)
        else:
            self.self_attn = Attention(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, rotary,
                                       scale=config.attn_scale, bias=config.attention_bias, qk_norm_eps=config.rms_norm_eps,
                                       output_gate=True)
        self.mlp = feed_forward(config, index)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, positions, cache: LayerCache, meta: AttentionMetadata):
        if self.recurrent:
            fused = self.linear_attn.decode_layer(x, self.input_layernorm, cache.state, meta)
            x = fused if fused is not None else x + self.linear_attn(self.input_layernorm(x), cache.state, meta)
        else:
            x = x + self.self_attn(self.input_layernorm(x), positions, cache.kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3NextForCausalLM(DecoderModel):
    def __init__(self, config: ModelConfig):
        rotary = RotaryEmbedding(config.rope, config.rotary_dim or config.head_dim, config.rope_interleaved)
        super().__init__(config, lambda cfg, index: HybridLayer(cfg, index, rotary))

    @staticmethod
    def sanitize_hf(weights: dict[str, Weight]) -> dict[str, Weight]:
        """HF -> the GGUF form our layers take: Qwen 3.5's multimodal checkpoints' text tower
        renamed, ``1 + w`` norms, ``A = -exp(A_log)``, the conv weight's middle axis dropped,
        and Qwen3-Next's per-key-head ``[q, k, v, z]`` projection split into ``qkv`` and ``z``."""
        out = {}
        for name, w in weights.items():
            name = name.replace("model.language_model.", "model.")
            if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
                out[name] = w.float() + 1.0
            elif name.endswith("linear_attn.A_log"):
                out[name.removesuffix("_log")] = -w.float().exp()
            elif name.endswith("linear_attn.conv1d.weight"):
                out[name] = w.squeeze(1)
            else:
                out[name] = w
        return out

    def sanitize(self, weights: dict[str, Weight]) -> dict[str, Weight]:
        """Qwen3-Next's fused projections (HF ``in_proj_qkvz``, both formats' ``in_proj_ba``) into
        Qwen 3.5's separate ones, then the experts split."""
        c = self.config.deltanet
        ratio = c.num_v_heads // c.num_k_heads
        weights = dict(weights)
        for name in [n for n in weights if n.endswith(("in_proj_qkvz.weight", "in_proj_ba.weight"))]:
            prefix = name.rsplit(".", 2)[0]
            w = weights.pop(name)  # SafeTensors stay in their dtype; a GGUF ba (a few rows) is dequantized
            w = w if isinstance(w, torch.Tensor) else dense(w, torch.float32)
            if name.endswith("in_proj_qkvz.weight"):  # per key head: q, k, then its value heads' v and z
                groups = w.unflatten(0, (c.num_k_heads, -1))
                sizes = (c.k_head_dim, c.k_head_dim, ratio * c.v_head_dim, ratio * c.v_head_dim)
                q, k, v, z = (part.flatten(0, 1) for part in groups.split(sizes, dim=1))
                weights[f"{prefix}.in_proj_qkv.weight"] = torch.cat((q, k, v))
                weights[f"{prefix}.in_proj_z.weight"] = z
            else:  # per key head: its value heads' b, then their a
                b, a = w.unflatten(0, (c.num_k_heads, 2, ratio)).unbind(1)
                weights[f"{prefix}.in_proj_b.weight"] = b.flatten(0, 1)
                weights[f"{prefix}.in_proj_a.weight"] = a.flatten(0, 1)
        return super().sanitize(weights)
