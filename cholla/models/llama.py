"""The Llama family: Llama 2/3, SmolLM, Mistral, Qwen 2 (QKV bias), Qwen 3 (QK-norm).

They differ only in flags the config carries, so one file serves them all: the
shared pre-norm shell (``models/decoder.py``) with Llama's attention in each layer.
"""

from __future__ import annotations

from cholla.layers.attention import Attention
from cholla.layers.rotary import RotaryEmbedding
from cholla.models.config import SLIDING_ATTENTION, ModelConfig
from cholla.models.decoder import DecoderModel, PreNormLayer, feed_forward


class LlamaForCausalLM(DecoderModel):
    def __init__(self, config: ModelConfig):
        rotary = RotaryEmbedding(config.rope, config.head_dim, config.rope_interleaved)

        def layer(cfg: ModelConfig, index: int) -> PreNormLayer:
            sliding = cfg.layer_types[index] == SLIDING_ATTENTION
            attention = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rotary,
                                  scale=cfg.attn_scale, bias=cfg.attention_bias,
                                  qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None,
                                  window=cfg.sliding_window if sliding else None)
            return PreNormLayer(cfg, attention, feed_forward(cfg, index))

        super().__init__(config, layer)
