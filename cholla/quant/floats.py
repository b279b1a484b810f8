"""The plain float types F32, F16 and BF16: one value per "block", no scale.

Stored as raw little-endian bytes; dequantizing is a reinterpretation, plus a
widening to float32 for the 16-bit types (exact).
"""

from __future__ import annotations

import torch


def _reinterpret(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``[N, itemsize]`` -> ``dtype`` ``[N, 1]``, copying only if misaligned."""
    if blocks.storage_offset() % dtype.itemsize or blocks.stride(-1) != 1:
        blocks = blocks.clone(memory_format=torch.contiguous_format)
    return blocks.view(dtype)


def dequantize_f32(blocks: torch.Tensor) -> torch.Tensor:
    """May return a view of ``blocks``: F32 needs no conversion."""
    return _reinterpret(blocks, torch.float32)


def dequantize_f16(blocks: torch.Tensor) -> torch.Tensor:
    return _reinterpret(blocks, torch.float16).to(torch.float32)


def dequantize_bf16(blocks: torch.Tensor) -> torch.Tensor:
    # bfloat16 is the top half of a float32, so widening is a 16-bit shift: exact.
    return _reinterpret(blocks, torch.bfloat16).to(torch.float32)
