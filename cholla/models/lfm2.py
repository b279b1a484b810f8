"""LFM2 and LFM2-MoE (Liquid AI): hybrids of gated short convolutions and grouped-query attention.

Most layers mix tokens with a *gated short convolution*: ``in_proj`` gives three
streams B, C, x; ``B * x`` runs through a per-channel causal convolution of
``conv_L_cache`` taps (``layers/causal_conv.py``, whose last ``taps - 1`` inputs
are the layer's state in the state cache) and ``C`` gates the result. A few
layers are attention with per-head QK-norm. Every layer is pre-norm with a
SwiGLU MLP (LFM2-MoE: after its first dense layers, experts routed by sigmoid
scores plus a selection bias, ``layers/moe.py``); the final norm is the
checkpoint's ``embedding_norm``.
"""

from __future__ import annotations

import torch
from torch import nn

from cholla.kv.state_cache import LayerCache
from cholla.layers.attention import Attention, AttentionMetadata
from cholla.layers.causal_conv import causal_conv1d
from cholla.layers.linear import DenseTensor, Linear, Weight, dense
from cholla.layers.norm import RMSNorm
from cholla.layers.rotary import RotaryEmbedding
from cholla.models.config import ATTENTION_TYPES, ModelConfig
from cholla.models.decoder import DecoderModel, feed_forward

# HF's LFM2 names -> ours (the shell's and the shared layers'), replaced in this order in a layer's
# tensor names: dense MLPs are ``feed_forward.w1``, experts ``feed_forward.experts.N.w1``.
_RENAMES = {
    ".operator_norm.": ".input_layernorm.",
    ".ffn_norm.": ".post_attention_layernorm.",
    ".feed_forward.expert_bias": ".mlp.e_score_correction_bias",
    ".feed_forward.": ".mlp.",
    ".w1.": ".gate_proj.",
    ".w3.": ".up_proj.",
    ".w2.": ".down_proj.",
    ".self_attn.out_proj.": ".self_attn.o_proj.",
    ".self_attn.q_layernorm.": ".self_attn.q_norm.",
    ".self_attn.k_layernorm.": ".self_attn.k_norm.",
}


class ShortConv(nn.Module):
    """``out_proj(C * conv(B * x))`` with ``B, C, x = in_proj(h)``; the convolution's state is
    ``[slots, hidden, taps - 1]`` float32."""

    def __init__(self, hidden_size: int, taps: int):
        super().__init__()
        self.in_proj = Linear(hidden_size, 3 * hidden_size)
        self.conv = DenseTensor(hidden_size, taps)
        self.out_proj = Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, conv_state: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x: [tokens, hidden] -> [tokens, hidden]."""
        b, c, h = self.in_proj(x).float().chunk(3, dim=-1)
        return self.out_proj(c * causal_conv1d(b * h, self.conv.value, None, conv_state, meta))


class Lfm2Layer(nn.Module):
    """``x + mixer(norm(x))``, then ``x + mlp(norm(x))``; the mixer is attention or a short convolution."""

    def __init__(self, config: ModelConfig, index: int, rotary: RotaryEmbedding):
        super().__init__()
        hidden = config.hidden_size
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.mlp = feed_forward(config, index)  # LFM2-MoE: sigmoid-routed experts after the first dense layers
        self.is_attention = config.layer_types[index] in ATTENTION_TYPES
        if self.is_attention:
            self.self_attn = Attention(hidden, config.num_heads, config.num_kv_heads, config.head_dim, rotary,
                                       scale=config.attn_scale, qk_norm_eps=config.rms_norm_eps)
        else:
            self.conv = ShortConv(hidden, config.short_conv_kernel)

    def forward(self, x, positions, cache: LayerCache | tuple, meta: AttentionMetadata):
        h = self.input_layernorm(x)
        if self.is_attention:  # an all-attention LFM2 has no state: its layers get bare KV sides
            h = self.self_attn(h, positions, cache.kv if isinstance(cache, LayerCache) else cache, meta)
        else:
            h = self.conv(h, cache.state[0], meta)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Lfm2ForCausalLM(DecoderModel):
    def __init__(self, config: ModelConfig):
        rotary = RotaryEmbedding(config.rope, config.head_dim, config.rope_interleaved)
        super().__init__(config, lambda cfg, index: Lfm2Layer(cfg, index, rotary))

    def sanitize(self, weights: dict[str, Weight]) -> dict[str, Weight]:
        """HF's names to ours; the convolution's ``[hidden, 1, taps]`` weight (GGUF: ``[hidden, taps]``)
        becomes the layer's ``[hidden, taps]`` tensor."""
        out = {}
        for name, weight in weights.items():
            if name == "embedding_norm.weight":
                name = "norm.weight"
            elif name.endswith(".conv.conv.weight"):
                name, weight = name.removesuffix(".weight"), dense(weight, torch.float32).reshape(self.config.hidden_size, -1)
            for old, new in _RENAMES.items():
                name = name.replace(old, new)
            out[name] = weight
        return super().sanitize(out)
