"""Packing weights for PyTorch's CPU weight-only kernels (the ``bfloat16`` path).

Two formats, chosen per GGUF type:

- **int4, groups of 32** (``_weight_int4pack_mm_for_cpu``) for Q4_0, Q4_1 and
  Q4_K. Each of these types is already affine per run of 32 weights along the
  input dimension, ``w = scale * q + offset`` with ``q`` in 0..15, and the
  kernel computes ``w = (q - 8) * scale + zero``, so the quants carry over
  unchanged and ``zero = offset + 8 * scale``. Only the scale and zero are
  rounded, to bfloat16 (the kernel's dtype), about 3 significant digits.
- **int8, one scale per output row** (``_weight_int8pack_mm``) for every other
  type (and for 4-bit weights whose row count is not a multiple of 16): the weight is dequantized and re-quantized, ``q = round(w / s)`` with
  ``s = max|w_row| / 127``, an error of at most ``s / 2`` per weight. That is
  exact for no GGUF type (their scales change every 16-32 weights) but small
  next to their own rounding: measured in ``tests/test_fast_weights.py``.

Both kernels take bfloat16 activations ``x: [rows, in]`` and return
``[rows, out]`` in bfloat16, accumulating in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType

from cholla.formats.gguf import GGUFTensor
from cholla.quant import bytes_per_block, dequantize
from cholla.quant.bits import read_f16, unpack_bits
from cholla.quant.kquants import _scale_min_k4
from cholla.quant.legacy import _nibbles

T = GGMLQuantizationType

INT4_GROUP_SIZE = 32
INT4_TYPES: frozenset[GGMLQuantizationType] = frozenset({T.Q4_0, T.Q4_1, T.Q4_K})
# The int4 kernel packs output rows in tiles of 16; other row counts go int8.
INT4_ROW_MULTIPLE = 16
# Dequantize at most this many weights at once while re-quantizing to int8.
PACK_CHUNK_ELEMENTS = 8 * 1024 * 1024


@dataclass
class Int4Weight:
    """``packed``: the kernel's opaque layout of the ``[out, in]`` quants;
    ``scales_and_zeros``: bfloat16 ``[in / 32, out, 2]``."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x: bfloat16 [rows, in] -> bfloat16 [rows, out]."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP_SIZE, self.scales_and_zeros)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_and_zeros.nbytes


@dataclass
class Int8Weight:
    """``weight``: int8 ``[out, in]``; ``scales``: bfloat16 ``[out]``."""

    weight: torch.Tensor
    scales: torch.Tensor

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x: bfloat16 [rows, in] -> bfloat16 [rows, out]."""
        return torch._weight_int8pack_mm(x, self.weight, self.scales)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scales.nbytes


PackedWeight = Int4Weight | Int8Weight


def int4_groups(tensor: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0/Q4_1/Q4_K weight ``[out, in]`` as ``w = (q - 8) * scale + zero`` per 32 inputs.

    Returns ``q``: uint8 ``[out, in]`` in 0..15, ``scale`` and ``zero``:
    float32 ``[out, in / 32]``, computed from the block fields the way the
    dequantizers in ``cholla.quant`` combine them.
    """
    out_features, in_features = tensor.shape
    blocks = tensor.data.reshape(-1, bytes_per_block(tensor.qtype))
    if tensor.qtype == T.Q4_0:  # d * (q - 8)
        scale = read_f16(blocks, 0)
        q, zero = _nibbles(blocks[:, 2:]), torch.zeros_like(scale)
    elif tensor.qtype == T.Q4_1:  # d * q + m
        scale, offset = read_f16(blocks, 0), read_f16(blocks, 2)
        q, zero = _nibbles(blocks[:, 4:]), offset + 8 * scale
    elif tensor.qtype == T.Q4_K:  # (d * sc) * q - dmin * mn, eight sub-blocks of 32
        d, dmin = read_f16(blocks, 0), read_f16(blocks, 2)
        sc, mn = _scale_min_k4(blocks[:, 4:16])
        scale, offset = d * sc, -(dmin * mn)
        q, zero = unpack_bits(blocks[:, 16:144].reshape(-1, 4, 32), 4), offset + 8 * scale
    else:
        raise ValueError(f"{tensor.qtype.name} is not a 4-bit type with 32-weight groups")
    groups = in_features // INT4_GROUP_SIZE
    return (
        q.reshape(out_features, in_features),
        scale.reshape(out_features, groups),
        zero.reshape(out_features, groups),
    )


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Int4Weight:
    """q: uint8 [out, in] in 0..15; scale, zero: float32 [out, in / 32]."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return Int4Weight(packed, scales_and_zeros)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [rows, in] -> int8 quants [rows, in] and float32 scales [rows], symmetric per row."""
    scales = weight.abs().amax(dim=1).div_(127.0)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def pack_weight(weight: torch.Tensor | GGUFTensor) -> PackedWeight:
    """Pack a 2-D weight ``[out, in]`` for the fastest lossless-enough kernel its type allows."""
    out_features, in_features = weight.shape
    if (
        isinstance(weight, GGUFTensor)
        and weight.qtype in INT4_TYPES
        and in_features % INT4_GROUP_SIZE == 0
        and out_features % INT4_ROW_MULTIPLE == 0
    ):
        return pack_int4(*int4_groups(weight))
    q = torch.empty(out_features, in_features, dtype=torch.int8)
    scales = torch.empty(out_features, dtype=torch.float32)
    rows = max(1, PACK_CHUNK_ELEMENTS // in_features)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        if isinstance(weight, GGUFTensor):
            dense = dequantize(weight.data[start:stop], weight.qtype).reshape(stop - start, in_features)
        else:
            dense = weight[start:stop].float()
        q[start:stop], scales[start:stop] = quantize_int8(dense)
    return Int8Weight(q, scales.to(torch.bfloat16))
