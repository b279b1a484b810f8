"""Falcon-H1: every layer runs attention and a Mamba-2 mixer side by side on the same
normed input and adds both to the residual stream, then a gated MLP.

Its muP multipliers (embeddings, attention in/out, keys, SSM in/out and per
projection segment, MLP gate/down, LM head) are plain scale factors on a
matmul's input or output, so a ``config.json`` checkpoint has them folded into
the weights at load, as llama.cpp's converter folds them into a GGUF file's:
both then run the same plain layers. Names are HF's (``feed_forward``,
``pre_ff_layernorm``, ``final_layernorm``), which also keeps the fused C++
decode step (Llama-shaped layers only) from taking these layers.
"""

from __future__ import annotations

import torch
from torch import nn

from cholla.errors import ModelFormatError
from cholla.kv.state_cache import LayerCache
from cholla.layers.attention import Attention, AttentionMetadata
from cholla.layers.linear import Weight
from cholla.layers.mamba2 import Mamba2Mixer, sanitize_mixer_weights
from cholla.layers.mlp import GatedMLP
from cholla.layers.norm import RMSNorm
from cholla.layers.rotary import RotaryEmbedding
from cholla.models.config import Mamba2Shape, ModelConfig
from cholla.models.decoder import DecoderModel


class FalconH1Layer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, rotary,
                                   scale=config.attn_scale, bias=config.attention_bias)
        self.mamba = Mamba2Mixer(config.mamba)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x, positions, cache: LayerCache, meta: AttentionMetadata):
        h = self.input_layernorm(x)
        x = x + (self.mamba(h, cache.state, meta) + self.self_attn(h, positions, cache.kv, meta))
        return x + self.feed_forward(self.pre_ff_layernorm(x))


class FalconH1ForCausalLM(DecoderModel):
    def __init__(self, config: ModelConfig):
        rotary = RotaryEmbedding(config.rope, config.head_dim, config.rope_interleaved)
        super().__init__(config, lambda cfg, index: FalconH1Layer(cfg, rotary))

    def sanitize(self, weights: dict[str, Weight]) -> dict[str, Weight]:
        weights = {name.replace("final_layernorm.", "norm."): w for name, w in weights.items()}
        if self.config.multipliers:
            weights = fold_multipliers(weights, self.config.multipliers, self.config.mamba)
        return super().sanitize(sanitize_mixer_weights(weights, "mamba"))


def _mup_rows(multipliers: dict, mamba: Mamba2Shape) -> torch.Tensor:
    """in_proj's output rows z, x, B, C, dt, each segment scaled by its ``ssm_multipliers`` entry."""
    zxbcdt = multipliers.get("ssm_multipliers") or [1.0] * 5
    groups_state = mamba.n_groups * mamba.state_size
    sizes = [mamba.inner_size, mamba.inner_size, groups_state, groups_state, mamba.num_heads]
    return torch.cat([torch.full((size,), float(m)) for size, m in zip(sizes, zxbcdt)])


def fold_multipliers(weights: dict[str, Weight], multipliers: dict, mamba: Mamba2Shape) -> dict[str, Weight]:
    """Falcon-H1's muP multipliers folded into the weights they scale (HF's ``FalconH1*``
    modules apply them to activations): per module, (weight factor, bias factor); a factor
    on a matmul's input scales its weight only, one on its output the bias too. (``check_mamba``
    has made sure in_proj has the rows the multipliers are laid out for.)"""
    m = {key: multipliers.get(key, 1.0) for key in ("attention_in_multiplier", "attention_out_multiplier",
                                                     "key_multiplier", "ssm_in_multiplier", "ssm_out_multiplier",
                                                     "embedding_multiplier", "lm_head_multiplier")}
    gate, down = multipliers.get("mlp_multipliers") or (1.0, 1.0)
    rows = _mup_rows(multipliers, mamba)
    attn_in = m["attention_in_multiplier"]
    factors = {
        "self_attn.q_proj": (attn_in, 1.0), "self_attn.v_proj": (attn_in, 1.0),
        "self_attn.k_proj": (attn_in * m["key_multiplier"], m["key_multiplier"]),
        "self_attn.o_proj": (m["attention_out_multiplier"],) * 2,
        "mamba.in_proj": (rows[:, None] * m["ssm_in_multiplier"], rows),
        "mamba.out_proj": (m["ssm_out_multiplier"],) * 2,
        "feed_forward.gate_proj": (gate, gate), "feed_forward.down_proj": (down, down),
        "embed_tokens": (m["embedding_multiplier"], 1.0), "lm_head": (m["lm_head_multiplier"], 1.0),
    }
    out = {}
    for name, w in weights.items():
        module, _, kind = name.rpartition(".")
        key = module.split(".", 2)[2] if module.startswith("layers.") else module
        if key in factors:
            if not isinstance(w, torch.Tensor):
                raise ModelFormatError(f"tensor {name}: Falcon-H1's multipliers fold only into float weights")
            factor = factors[key][0 if kind == "weight" else 1]
            if not isinstance(factor, torch.Tensor) and factor == 1.0:  # left as loaded (memory-mapped)
                out[name] = w
                continue
            w = (w.float() * factor).to(w.dtype)  # a new tensor: a tied head keeps its own copy
        out[name] = w
    return out
