"""Nemotron-H (and its MoE variant, Nemotron Nano): ``x + mixer(norm(x))`` layers whose mixer
is, per ``hybrid_override_pattern``, a Mamba-2 mixer (M), attention without any positional
encoding (*), a squared-ReLU MLP (-) or a sigmoid-routed mixture of ungated squared-ReLU
experts with a shared expert (E). Only the attention layers keep KV; the Mamba-2 layers
keep a state slot per sequence.
"""

from __future__ import annotations

import torch

from cholla.layers.attention import Attention
from cholla.layers.linear import Weight
from cholla.layers.mamba2 import Mamba2Mixer, sanitize_mixer_weights
from cholla.layers.mlp import MLP
from cholla.models.config import ATTENTION_TYPES, MAMBA, ModelConfig
from cholla.models.decoder import DecoderModel, feed_forward
from cholla.models.mamba2 import MixerLayer, backbone_names


def no_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nemotron-H's attention sees positions only through the Mamba-2 layers before it."""
    return q, k


def _mixer(config: ModelConfig, index: int):
    kind = config.layer_types[index]
    if kind == MAMBA:
        return Mamba2Mixer(config.mamba)
    if kind in ATTENTION_TYPES:
        return Attention(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, no_rope,
                         scale=config.head_dim**-0.5, bias=config.attention_bias)
    if config.moe is not None and index not in config.moe.dense_layers:
        return feed_forward(config, index)
    return MLP(config.hidden_size, config.intermediate_size, config.hidden_act)


class NemotronHForCausalLM(DecoderModel):
    def __init__(self, config: ModelConfig):
        super().__init__(config, lambda cfg, index: MixerLayer(cfg, cfg.layer_types[index], _mixer(cfg, index)))

    def load_weights(self, weights: dict[str, Weight]) -> set[str]:
        return super().load_weights(backbone_names(weights))

    def sanitize(self, weights: dict[str, Weight]) -> dict[str, Weight]:
        """HF's MoE names -> ``SparseMoE``'s: ``shared_experts`` -> ``shared_expert``, the router's
        correction bias up to the MoE."""
        out = {}
        for name, w in sanitize_mixer_weights(weights).items():
            name = name.replace(".mixer.shared_experts.", ".mixer.shared_expert.")
            out[name.replace(".mixer.gate.e_score_correction_bias", ".mixer.e_score_correction_bias")] = w
        return super().sanitize(out)
