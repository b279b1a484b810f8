"""Linear layers and embeddings over weights that stay quantized in memory.

A weight is either a plain tensor (SafeTensors, F32 GGUF tensors) or a
``GGUFTensor`` whose blocks are a view over the memory-mapped file. Quantized
weights are dequantized just before use, a slab of rows at a time, so the
model never holds an fp32 copy of itself and the temporary stays small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cholla.formats.gguf import GGUFTensor
from cholla.quant import dequantize

Weight = torch.Tensor | GGUFTensor

# Dequantize at most this many weights at once (8M fp32 = 32 MiB of scratch).
DEQUANT_CHUNK_ELEMENTS = 8 * 1024 * 1024


def weight_shape(weight: Weight) -> tuple[int, ...]:
    return tuple(weight.shape)


def dequantize_rows(weight: Weight, rows: torch.Tensor | slice, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``rows`` of a 2-D weight as a dense ``[n, cols]`` tensor in ``dtype``."""
    if isinstance(weight, torch.Tensor):
        return weight[rows].to(dtype)
    blocks = weight.data[rows]
    return dequantize(blocks, weight.qtype, dtype).reshape(blocks.shape[0], weight.shape[-1])


def dense(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight dequantized; for small tensors (norms, biases) only."""
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype)
    return dequantize(weight.data, weight.qtype, dtype).reshape(weight.shape)


class Linear(nn.Module):
    """``y = x W^T + b`` with ``W: [out, in]`` kept as loaded (quantized or not)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: Weight | None = None
        self.bias: torch.Tensor | None = None
        self.has_bias = bias

    def load(self, weight: Weight, bias: torch.Tensor | None = None) -> None:
        if weight_shape(weight) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {weight_shape(weight)} != {(self.out_features, self.in_features)}")
        self.weight = weight
        if bias is not None:
            self.bias = bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, in] -> [tokens, out]."""
        w = self.weight
        if isinstance(w, torch.Tensor):
            return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), self.bias)
        rows_per_chunk = max(1, DEQUANT_CHUNK_ELEMENTS // self.in_features)
        if rows_per_chunk >= self.out_features:
            return F.linear(x, dequantize_rows(w, slice(None), x.dtype), self.bias)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, rows_per_chunk):
            stop = min(start + rows_per_chunk, self.out_features)
            bias = None if self.bias is None else self.bias[start:stop]
            out[..., start:stop] = F.linear(x, dequantize_rows(w, slice(start, stop), x.dtype), bias)
        return out


class Embedding(nn.Module):
    """Token embedding that dequantizes only the rows it looks up."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.weight: Weight | None = None

    def load(self, weight: Weight) -> None:
        if weight_shape(weight) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"embedding shape {weight_shape(weight)} != {(self.vocab_size, self.hidden_size)}")
        self.weight = weight

    def forward(self, token_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rows(self.weight, token_ids, dtype)

    def as_linear(self) -> Linear:
        """The same weight used as an output head (tied embeddings)."""
        head = Linear(self.hidden_size, self.vocab_size)
        head.load(self.weight)
        return head
