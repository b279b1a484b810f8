"""Rotary position embeddings (RoPE) with the scalings real checkpoints use."""

from __future__ import annotations

import math

import torch

from cholla.kernels import cpu_kernels
from cholla.models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, rotary_dim: int) -> torch.Tensor:
    """Per-pair angular speeds ``[rotary_dim / 2]``, after any context-extension scaling."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    scaling = rope.scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend between.
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_context = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    elif kind == "yarn":
        inv_freq = _yarn_inverse_frequencies(inv_freq, rope.theta, rotary_dim, scaling)
    elif kind == "proportional":
        # Gemma 4's full-attention layers: only the first ``partial_rotary_factor`` of the pairs
        # turn, at the whole head's frequencies; the rest get frequency 0 and pass through as they are.
        turning = int(float(scaling.get("partial_rotary_factor", 1.0)) * rotary_dim // 2)
        inv_freq = torch.cat((inv_freq[:turning], torch.zeros(rotary_dim // 2 - turning))) / float(scaling.get("factor", 1.0))
    if rope.freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float32)
    return inv_freq


def _yarn_inverse_frequencies(inv_freq: torch.Tensor, theta: float, dim: int, scaling: dict) -> torch.Tensor:
    """YaRN: keep the fast-turning pairs, divide the slow ones by ``factor``, with a
    linear ramp between the pair indices that turn ``beta_fast`` and ``beta_slow``
    times over the original context (rounded outwards unless ``truncate`` is False)."""
    factor = float(scaling["factor"])
    old_context = float(scaling["original_max_position_embeddings"])

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = correction_dim(float(scaling.get("beta_fast") or 32))
    high = correction_dim(float(scaling.get("beta_slow") or 1))
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation


def rope_attention_factor(rope: RopeConfig) -> float:
    """YaRN's multiplier on cos and sin (HF's ``attention_factor``); 1 for other ropes."""
    scaling = rope.scaling or {}
    if scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(float(scaling["mscale"])) / mscale(float(scaling["mscale_all_dim"]))
    return mscale(1.0)


class RotaryEmbedding:
    """Rotates q and k by position. Tables of cos/sin grow on demand.

    ``interleaved`` pairs dimensions (2i, 2i+1) as llama.cpp does for its
    permuted Llama weights; otherwise dimension i pairs with i + dim/2 (HF).
    """

    def __init__(self, rope: RopeConfig, head_dim: int, interleaved: bool):
        self.head_dim = head_dim
        self.interleaved = interleaved
        self.inv_freq = inverse_frequencies(rope, head_dim)
        self.attention_factor = rope_attention_factor(rope)
        self.cos = self.sin = torch.empty(0, head_dim)

    def _grow(self, length: int) -> None:
        length = max(length, 2 * self.cos.shape[0], 256)
        freqs = torch.arange(length, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        if self.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            self.cos, self.sin = self.cos * self.attention_factor, self.sin * self.attention_factor

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            pairs = x.unflatten(-1, (-1, 2))
            return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin tables ``[length, head_dim]``, grown to cover ``positions``."""
        return self.covering(int(positions.max()) + 1 if positions.numel() else 0)

    def covering(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin tables, grown to at least ``length`` positions (no tensor op where they are)."""
        if length > self.cos.shape[0]:
            self._grow(length)
        return self.cos, self.sin

    def __call__(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [tokens]; q: [tokens, heads, head_dim]; k: [tokens, kv_heads, head_dim].

        Where our kernels run, q and k are rotated in place and returned. Heads wider than
        this rope's ``head_dim`` (partial rotary: Qwen3-Next, Qwen 3.5) turn only their leading dims.
        """
        if q.shape[-1] > self.head_dim:
            rot = self.head_dim
            q_rot, k_rot = self(positions, q[..., :rot].contiguous(), k[..., :rot].contiguous())
            return torch.cat((q_rot, q[..., rot:]), dim=-1), torch.cat((k_rot, k[..., rot:]), dim=-1)
        self.tables(positions)
        kernels = cpu_kernels()
        if kernels is not None and q.dtype == k.dtype == torch.float32:  # in place, one call for q and k
            kernels.rope_(q, k, positions, self.cos, self.sin, self.interleaved)
            return q, k
        return self.rotate_ops(positions, q, k)

    def rotate_ops(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation in PyTorch ops (tables already grown): the fallback, and the kernel's reference."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + self._rotate(q) * sin, k * cos + self._rotate(k) * sin

    def rotate_queries(self, positions: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """q alone ([tokens, heads, head_dim]), for a layer that attends to another layer's (rotated) keys."""
        self.tables(positions)
        return self.rotate_ops(positions, q, q[:, :0])[0]
