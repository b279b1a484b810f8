"""Granite 4 hybrid (``granitemoehybrid``; GGUF ``granitehybrid``): each layer mixes tokens
with either a Mamba-2 mixer or attention (which the released models run without rotary
embeddings), then a dense "shared" gated MLP, plus a top-k-then-softmax mixture of
experts where the model has experts.

Granite's multipliers are plain scale factors: embeddings times ``embedding_multiplier``,
each residual branch times ``residual_multiplier``, attention scores times
``attention_multiplier`` (instead of 1/sqrt(head_dim)), logits divided by
``logits_scaling``. GGUF files keep them as metadata, not folded into weights.

Checkpoints fuse gate and up (``input_linear``, ``[2 * width, hidden]``, and per expert
``[experts, 2 * width, hidden]``); ``sanitize`` splits them into our gate/up projections.
Names are HF's (``shared_mlp``, ``block_sparse_moe``), which also keeps the fused C++
decode step (Llama-shaped layers only) from taking these layers.
"""

from __future__ import annotations

import torch
from torch import nn

from cholla.kv.state_cache import LayerCache
from cholla.layers.attention import Attention, AttentionMetadata
from cholla.layers.linear import Weight
from cholla.layers.mamba2 import Mamba2Mixer, sanitize_mixer_weights
from cholla.layers.mlp import GatedMLP
from cholla.layers.moe import SparseMoE, topk_softmax
from cholla.layers.norm import RMSNorm
from cholla.layers.rotary import RotaryEmbedding
from cholla.models.config import MAMBA, ModelConfig
from cholla.models.decoder import DecoderModel


def no_rotation(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention without position embeddings ("nope"): the recurrent layers carry the order."""
    return q, k


class GraniteHybridLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, rotary):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mamba = self.self_attn = None
        if config.layer_types[index] == MAMBA:
            self.mamba = Mamba2Mixer(config.mamba)
        else:
            self.self_attn = Attention(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                                       rotary, scale=config.attn_scale, bias=config.attention_bias)
        self.shared_mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        moe = config.moe
        self.block_sparse_moe = None if moe is None else SparseMoE(
            config.hidden_size, moe.intermediate_size, moe.num_experts, topk_softmax(moe.top_k), config.hidden_act)
        self.residual_multiplier = config.residual_multiplier

    def forward(self, x, positions, cache: LayerCache | tuple, meta: AttentionMetadata):
        """cache: a ``LayerCache``, or the KV sides alone where no layer is Mamba-2 (Granite 4.0 Micro)."""
        h = self.input_layernorm(x)
        if self.mamba is not None:
            h = self.mamba(h, cache.state, meta)
        else:
            h = self.self_attn(h, positions, cache.kv if isinstance(cache, LayerCache) else cache, meta)
        x = x + h * self.residual_multiplier
        h = self.post_attention_layernorm(x)
        out = self.shared_mlp(h)
        if self.block_sparse_moe is not None:
            out = self.block_sparse_moe(h) + out
        return x + out * self.residual_multiplier


class GraniteMoeHybridForCausalLM(DecoderModel):
    def __init__(self, config: ModelConfig):
        rotary = (no_rotation if config.no_rope
                  else RotaryEmbedding(config.rope, config.head_dim, config.rope_interleaved))
        super().__init__(config, lambda cfg, index: GraniteHybridLayer(cfg, index, rotary))

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.config.embed_scale not in (None, 1.0):
            x = x * self.config.embed_scale
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, positions, cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor, reuse_output: bool = False) -> torch.Tensor:
        logits = self.lm_head(hidden, reuse_output)
        return logits.mul_(self.config.logit_scale) if self.config.logit_scale != 1.0 else logits

    def sanitize(self, weights: dict[str, Weight]) -> dict[str, Weight]:
        out: dict[str, Weight] = {}
        for name, w in weights.items():
            prefix, _, part = name.partition(".shared_mlp.")
            if part == "input_linear.weight":  # [2 * width, hidden]: gate rows, then up rows
                out[f"{prefix}.shared_mlp.gate_proj.weight"], out[f"{prefix}.shared_mlp.up_proj.weight"] = w.chunk(2, 0)
                continue
            if part == "output_linear.weight":
                out[f"{prefix}.shared_mlp.down_proj.weight"] = w
                continue
            prefix, _, part = name.partition(".block_sparse_moe.")
            experts = f"{prefix}.block_sparse_moe.experts"
            if part == "input_linear.weight":  # [experts, 2 * width, hidden]
                out[f"{experts}.gate_proj.weight"], out[f"{experts}.up_proj.weight"] = w.chunk(2, 1)
            elif part == "output_linear.weight":
                out[f"{experts}.down_proj.weight"] = w
            elif part == "router.layer.weight":
                out[f"{prefix}.block_sparse_moe.gate.weight"] = w
            else:
                out[name] = w
        return super().sanitize(sanitize_mixer_weights(out, "mamba"))
