"""Mixtral: Mistral's attention (optionally sliding) over softmax-routed experts.

Its checkpoints name the MoE ``block_sparse_moe`` with experts ``w1`` (gate), ``w3``
(up), ``w2`` (down); GGUF files call it ``llama`` with ``ffn_*_exps`` tensors.
"""

from __future__ import annotations

import re

from cholla.layers.attention import Attention
from cholla.layers.linear import Weight
from cholla.layers.rotary import RotaryEmbedding
from cholla.models.config import SLIDING_ATTENTION, ModelConfig
from cholla.models.decoder import DecoderModel, PreNormLayer, feed_forward

_HF_EXPERT = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


class MixtralForCausalLM(DecoderModel):
    def __init__(self, config: ModelConfig):
        rotary = RotaryEmbedding(config.rope, config.head_dim, config.rope_interleaved)

        def layer(cfg: ModelConfig, index: int) -> PreNormLayer:
            window = cfg.sliding_window if cfg.layer_types[index] == SLIDING_ATTENTION else None
            attention = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rotary,
                                  scale=cfg.attn_scale, window=window)
            return PreNormLayer(cfg, attention, feed_forward(cfg, index))

        super().__init__(config, layer)

    def sanitize(self, weights: dict[str, Weight]) -> dict[str, Weight]:
        def rename(name: str) -> str:
            name = name.replace(".block_sparse_moe.", ".mlp.")
            return re.sub(r"(\.experts\.\d+)\.(w[123])\.", lambda m: f"{m[1]}.{_HF_EXPERT[m[2]]}.", name)

        return super().sanitize({rename(name): w for name, w in weights.items()})
