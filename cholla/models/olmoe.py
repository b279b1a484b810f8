"""OLMoE: Llama-shaped layers whose QK-norm spans all heads of q (and of k) at once,
over softmax-routed experts whose top-k weights are not renormalised."""

from __future__ import annotations

from cholla.layers.attention import Attention
from cholla.layers.rotary import RotaryEmbedding
from cholla.models.config import ModelConfig
from cholla.models.decoder import DecoderModel, PreNormLayer, feed_forward


class OlmoeForCausalLM(DecoderModel):
    def __init__(self, config: ModelConfig):
        rotary = RotaryEmbedding(config.rope, config.head_dim, config.rope_interleaved)

        def layer(cfg: ModelConfig, index: int) -> PreNormLayer:
            attention = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rotary,
                                  scale=cfg.attn_scale, bias=cfg.attention_bias, qk_norm_eps=cfg.rms_norm_eps,
                                  qk_norm="full")
            return PreNormLayer(cfg, attention, feed_forward(cfg, index))

        super().__init__(config, layer)
