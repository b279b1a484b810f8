"""Gemma 3 (text): sliding-window and global layers, each with its own rope base,
pre- and post-norms around both sublayers, QK-norm, scaled embeddings, GELU-tanh.
"""

from __future__ import annotations

import torch
from torch import nn

from cholla.layers.attention import Attention, AttentionMetadata
from cholla.layers.linear import Embedding, Linear, Weight
from cholla.layers.mlp import GatedMLP
from cholla.layers.norm import RMSNorm
from cholla.layers.rotary import RotaryEmbedding
from cholla.models.config import SLIDING_ATTENTION, ModelConfig
from cholla.models.fused_decode import run_layers
from cholla.models.loading import load_named_weights


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, global_rope, local_rope):
        super().__init__()
        sliding = config.layer_types[layer_index] == SLIDING_ATTENTION
        self.self_attn = Attention(
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            local_rope if sliding else global_rope,
            scale=config.attn_scale,
            bias=config.attention_bias,
            qk_norm_eps=config.rms_norm_eps,
            window=config.sliding_window if sliding else None,
            softcap=config.attn_logit_softcapping,
        )
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps)
        self.post_feedforward_layernorm = RMSNorm(dim, eps)

    def forward(self, x, positions, kv_cache, meta: AttentionMetadata):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, kv_cache, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        global_rope = RotaryEmbedding(config.rope, config.head_dim, config.rope_interleaved)
        local_rope = RotaryEmbedding(config.local_rope or config.rope, config.head_dim, config.rope_interleaved)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i, global_rope, local_rope) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        # HF rounds the scale to the activation dtype before multiplying.
        self.embed_scale = torch.tensor(config.embed_scale or 1.0, dtype=torch.float32)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x = x * self.embed_scale.to(x.dtype)
        return self.norm(run_layers(self, x, positions, kv_caches, meta))

    def compute_logits(self, hidden: torch.Tensor, reuse_output: bool = False) -> torch.Tensor:
        """reuse_output: see Linear.forward (the result lives until the next such call)."""
        logits = self.lm_head(hidden, reuse_output)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: dict[str, Weight]) -> set[str]:
        """HF-named weights in; returns the names no module took."""
        weights = {name.removeprefix("model."): w for name, w in weights.items()}
        if "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["embed_tokens.weight"]
        return load_named_weights(self, weights)

    @staticmethod
    def sanitize_hf(weights: dict[str, Weight]) -> dict[str, Weight]:
        """HF stores Gemma norms as ``w`` and multiplies by ``1 + w``; GGUF already stores ``1 + w``."""
        return {
            name: (w.float() + 1.0 if name.endswith("norm.weight") else w) for name, w in weights.items()
        }
