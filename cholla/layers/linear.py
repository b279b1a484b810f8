"""Linear layers and embeddings over weights that stay quantized in memory.

A weight is either a plain tensor (SafeTensors, F32 GGUF tensors) or a
``GGUFTensor`` whose blocks are a view over the memory-mapped file. Quantized
weights are dequantized just before use, a slab of rows at a time, so the
model never holds an fp32 copy of itself and the temporary stays small.

``Linear.pack()`` switches a layer to the ``bfloat16`` path: the weight is also
packed for PyTorch's weight-only kernels (``cholla.quant.pack``), which serve
steps of at most ``PACKED_MAX_ROWS`` rows (decode); larger steps (prefill)
dequantize slabs to bfloat16 and use the dense matmul (oneDNN, AMX), which is
10x faster per row there. Inputs and outputs stay fp32 either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cholla.formats.gguf import GGUFTensor
from cholla.quant import dequantize
from cholla.quant.pack import PackedWeight, pack_weight

Weight = torch.Tensor | GGUFTensor

# Dequantize at most this many weights at once (8M fp32 = 32 MiB of scratch).
DEQUANT_CHUNK_ELEMENTS = 8 * 1024 * 1024

# Rows at which the packed kernels stop paying off. Their cost grows linearly with
# rows (about 11 us per row for 1536x576, 2 threads), while dequantizing a slab to
# bfloat16 (~500 us) plus a dense bfloat16 matmul barely grows: they cross near 48.
PACKED_MAX_ROWS = 32


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
        self.packed: PackedWeight | None = None

    def load(self, weight: Weight, bias: torch.Tensor | None = None) -> None:
        if weight_shape(weight) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {weight_shape(weight)} != {(self.out_features, self.in_features)}")
        self.weight = weight
        if bias is not None:
            self.bias = bias.float()

    def pack(self) -> None:
        """Compute in bfloat16 from now on, with the weight packed for the weight-only kernels."""
        self.packed = pack_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, in] -> [tokens, out], in x's dtype."""
        if self.packed is not None:
            return self._forward_bf16(x)
        return self._forward(x)

    def _forward_bf16(self, x: torch.Tensor) -> torch.Tensor:
        x16 = x.to(torch.bfloat16)
        rows = x16.reshape(-1, self.in_features)
        if rows.shape[0] <= PACKED_MAX_ROWS:
            out = self.packed.matmul(rows).reshape(*x.shape[:-1], self.out_features)
        else:
            out = self._forward(x16, with_bias=False)
        out = out.to(x.dtype)
        return out if self.bias is None else out + self.bias

    def _forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """The dense path: the weight dequantized to x's dtype a slab at a time."""
        w = self.weight
        own_bias = self.bias if with_bias else None
        if isinstance(w, torch.Tensor):
            return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), own_bias)
        rows_per_chunk = max(1, DEQUANT_CHUNK_ELEMENTS // self.in_features)
        if rows_per_chunk >= self.out_features:
            return F.linear(x, dequantize_rows(w, slice(None), x.dtype), own_bias)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, rows_per_chunk):
            stop = min(start + rows_per_chunk, self.out_features)
            bias = None if own_bias is None else own_bias[start:stop]
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
