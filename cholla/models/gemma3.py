"""Gemma 3 (text): sliding-window and global layers, each with its own rope base,
pre- and post-norms around both sublayers, QK-norm, scaled embeddings, GELU-tanh.

Gemma 4 (``models/gemma4.py``) builds on the rope tables, the layer's norms and the
model shell here.
"""

from __future__ import annotations

import torch
from torch import nn

from cholla.layers.attention import Attention, AttentionMetadata
from cholla.layers.linear import Weight
from cholla.layers.mlp import GatedMLP
from cholla.layers.norm import RMSNorm, residual_rms_norm
from cholla.layers.rotary import RotaryEmbedding
from cholla.models.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from cholla.models.decoder import DecoderModel
from cholla.models.fused_decode import fused_logits, run_layers


def gemma_ropes(config: ModelConfig) -> dict[str, RotaryEmbedding]:
    """One rotary table per layer kind: global layers turn at ``config.rope`` (with their own head
    size in Gemma 4), sliding ones at ``config.local_rope``."""
    full_dim = config.global_head_dim or config.head_dim
    return {FULL_ATTENTION: RotaryEmbedding(config.rope, full_dim, config.rope_interleaved),
            SLIDING_ATTENTION: RotaryEmbedding(config.local_rope or config.rope, config.head_dim, config.rope_interleaved)}


class Gemma3DecoderLayer(nn.Module):
    """Norms before and after both sublayers (HF's names); the attention and the MLP are given."""

    def __init__(self, config: ModelConfig, attention: nn.Module, mlp: nn.Module):
        super().__init__()
        self.self_attn, self.mlp = attention, mlp
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps)
        self.post_feedforward_layernorm = RMSNorm(dim, eps)

    def forward(self, x, positions, kv_cache, meta: AttentionMetadata):
        attended = self.self_attn(self.input_layernorm(x), positions, kv_cache, meta)
        x, h = residual_rms_norm(x, attended, self.post_attention_layernorm, self.pre_feedforward_layernorm)
        return residual_rms_norm(x, self.mlp(h), self.post_feedforward_layernorm)[0]


class Gemma3ForCausalLM(DecoderModel):
    def __init__(self, config: ModelConfig):
        ropes = gemma_ropes(config)
        super().__init__(config, lambda cfg, index: self.decoder_layer(cfg, index, ropes[cfg.layer_types[index]]))
        # HF rounds the scale to the activation dtype before multiplying.
        self.embed_scale = torch.tensor(config.embed_scale or 1.0, dtype=torch.float32)

    def decoder_layer(self, config: ModelConfig, index: int, rotary: RotaryEmbedding) -> nn.Module:
        """Layer ``index``, turning q and k with its kind's ``rotary``."""
        sliding = config.layer_types[index] == SLIDING_ATTENTION
        attention = Attention(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, rotary,
                              scale=config.attn_scale, bias=config.attention_bias, qk_norm_eps=config.rms_norm_eps,
                              window=config.sliding_window if sliding else None, softcap=config.attn_logit_softcapping)
        return Gemma3DecoderLayer(config, attention, GatedMLP(config.hidden_size, config.intermediate_size,
                                                              config.hidden_act))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embedding times ``embed_scale`` (rounded to the embedding's dtype first, as HF)."""
        x = self.embed_tokens(input_ids)
        return x * self.embed_scale.to(x.dtype)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        return self.norm(run_layers(self, self.embed(input_ids), positions, kv_caches, meta))

    def compute_logits(self, hidden: torch.Tensor, reuse_output: bool = False) -> torch.Tensor:
        """reuse_output: see Linear.forward (the result lives until the next such call)."""
        logits = self.lm_head(hidden, reuse_output)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def decode_logits(self, input_ids, positions, kv_caches, meta: AttentionMetadata,
                      greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """As DecoderModel's, the embedding scaled as ``forward`` scales it; None where a final soft
        cap applies (Gemma 3's own checkpoints have none) or a subclass changes the forward."""
        cls = type(self)
        if (self.config.final_logit_softcapping or cls.forward is not Gemma3ForCausalLM.forward
                or cls.compute_logits is not Gemma3ForCausalLM.compute_logits):
            return None
        return fused_logits(self, input_ids, positions, kv_caches, meta, greedy, self.embed)

    def greedy_tokens(self, hidden: torch.Tensor, decode: bool = False) -> torch.Tensor | None:
        """As DecoderModel's, where no soft cap applies (Gemma 3's own checkpoints have none; a
        cap is monotone but its rounding could tie logits the head kept apart)."""
        if self.config.final_logit_softcapping:
            return None
        return self.lm_head.greedy_tokens(hidden, decode)

    @staticmethod
    def sanitize_hf(weights: dict[str, Weight]) -> dict[str, Weight]:
        """HF stores Gemma 3 norms as ``w`` and multiplies by ``1 + w``; GGUF already stores ``1 + w``."""
        return {
            name: (w.float() + 1.0 if name.endswith("norm.weight") else w) for name, w in weights.items()
        }
