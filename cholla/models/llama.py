"""The Llama family: Llama 2/3, SmolLM, Mistral, Qwen 2 (QKV bias), Qwen 3 (QK-norm).

They differ only in flags the config carries, so one file serves them all.
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


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, rotary: RotaryEmbedding):
        super().__init__()
        sliding = config.layer_types[layer_index] == SLIDING_ATTENTION
        self.self_attn = Attention(
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            rotary,
            scale=config.attn_scale,
            bias=config.attention_bias,
            qk_norm_eps=config.rms_norm_eps if config.qk_norm else None,
            window=config.sliding_window if sliding else None,
        )
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, positions, kv_cache, meta: AttentionMetadata):
        x = x + self.self_attn(self.input_layernorm(x), positions, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        rotary = RotaryEmbedding(config.rope, config.head_dim, config.rope_interleaved)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, rotary) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [tokens] -> final hidden states [tokens, hidden]."""
        x = self.embed_tokens(input_ids)
        return self.norm(run_layers(self, x, positions, kv_caches, meta))

    def compute_logits(self, hidden: torch.Tensor, reuse_output: bool = False) -> torch.Tensor:
        """reuse_output: see Linear.forward (the result lives until the next such call)."""
        return self.lm_head(hidden, reuse_output)

    def load_weights(self, weights: dict[str, Weight]) -> set[str]:
        """HF-named weights in; returns the names no module took."""
        weights = {name.removeprefix("model."): w for name, w in weights.items()}
        if self.config.tie_word_embeddings or "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["embed_tokens.weight"]
        return load_named_weights(self, weights)
