"""The original 32-weight block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Each block is an fp16 scale ``d`` (and for the ``_1`` types an fp16 offset
``m``), then the quants. 4-bit quants pack two weights per byte: byte ``j``
holds weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble.
The 5-bit types keep the fifth bits in a little-endian 32-bit mask, bit ``j``
for weight ``j``.

Dequantized: ``d * (q - offset)`` or ``d * q + m``, in float32, in that order.
"""

from __future__ import annotations

import torch

from cholla.quant.bits import read_f16, spread_bits, unpack_bits


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """qs: uint8 ``[N, 16]`` -> the 32 4-bit quants ``[N, 32]``."""
    return unpack_bits(qs.reshape(-1, 1, 16), 4).reshape(-1, 32)


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """qh: ``[N, 4]`` high-bit mask, qs: ``[N, 16]`` nibbles -> 5-bit quants ``[N, 32]``."""
    return spread_bits(qh, 4).bitwise_or_(_nibbles(qs))


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """18 bytes: d, qs[16]."""
    d = read_f16(blocks, 0)
    q = _nibbles(blocks[:, 2:]).view(torch.int8).sub_(8)
    return q.to(torch.float32).mul_(d)


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """20 bytes: d, m, qs[16]."""
    d = read_f16(blocks, 0)
    m = read_f16(blocks, 2)
    q = _nibbles(blocks[:, 4:])
    return q.to(torch.float32).mul_(d).add_(m)


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """22 bytes: d, qh[4], qs[16]."""
    d = read_f16(blocks, 0)
    q = _five_bit(blocks[:, 2:6], blocks[:, 6:]).view(torch.int8).sub_(16)
    return q.to(torch.float32).mul_(d)


def dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """24 bytes: d, m, qh[4], qs[16]."""
    d = read_f16(blocks, 0)
    m = read_f16(blocks, 2)
    q = _five_bit(blocks[:, 4:8], blocks[:, 8:])
    return q.to(torch.float32).mul_(d).add_(m)


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """34 bytes: d, qs[32] as int8."""
    d = read_f16(blocks, 0)
    return blocks[:, 2:].view(torch.int8).to(torch.float32).mul_(d)
