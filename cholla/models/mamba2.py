"""Mamba-2: a stack of ``x + mixer(norm(x))`` layers, each a Mamba-2 mixer (``layers/mamba2.py``).
No attention and no MLP: a sequence's whole past lives in its state slot, no KV cache at all.

``MixerLayer`` is the pre-norm residual layer the Mamba-2 family shares (Nemotron-H
puts attention, MLP and MoE mixers in the same frame); checkpoints name the
model ``backbone`` with ``embeddings`` and ``norm_f``, mapped here to the shell's names.
"""

from __future__ import annotations

import torch
from torch import nn

from cholla.layers.attention import AttentionMetadata
from cholla.layers.linear import Weight
from cholla.layers.mamba2 import Mamba2Mixer, sanitize_mixer_weights
from cholla.layers.norm import RMSNorm
from cholla.models.config import ATTENTION_TYPES, MAMBA, ModelConfig
from cholla.models.decoder import DecoderModel


class MixerLayer(nn.Module):
    """``x + mixer(norm(x))``; ``kind`` (a ``config.layer_types`` entry) says what the mixer reads:
    a Mamba-2 mixer its states, attention its KV cache and positions, an MLP only x."""

    def __init__(self, config: ModelConfig, kind: str, mixer: nn.Module):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = mixer

    def forward(self, x, positions, cache, meta: AttentionMetadata) -> torch.Tensor:
        """cache: this layer's ``kv/state_cache.LayerCache``."""
        if self.kind == MAMBA:
            fused = self.mixer.decode_layer(x, self.norm, cache.state, meta)
            return fused if fused is not None else x + self.mixer(self.norm(x), cache.state, meta)
        h = self.norm(x)
        if self.kind in ATTENTION_TYPES:
            return x + self.mixer(h, positions, cache.kv, meta)
        return x + self.mixer(h)


def backbone_names(weights: dict[str, Weight]) -> dict[str, Weight]:
    """Mamba-family checkpoint names -> the shell's: ``backbone.`` -> ``model.``, ``embeddings`` ->
    ``embed_tokens``, ``norm_f`` -> ``norm``."""
    out = {}
    for name, w in weights.items():
        name = name.replace("backbone.", "model.", 1) if name.startswith("backbone.") else name
        name = {"model.embeddings.weight": "model.embed_tokens.weight", "model.norm_f.weight": "model.norm.weight"}.get(name, name)
        out[name] = w
    return out


class Mamba2ForCausalLM(DecoderModel):
    def __init__(self, config: ModelConfig):
        super().__init__(config, lambda cfg, index: MixerLayer(cfg, MAMBA, Mamba2Mixer(cfg.mamba)))

    def load_weights(self, weights: dict[str, Weight]) -> set[str]:
        return super().load_weights(backbone_names(weights))

    def sanitize(self, weights: dict[str, Weight]) -> dict[str, Weight]:
        return super().sanitize(sanitize_mixer_weights(weights))
