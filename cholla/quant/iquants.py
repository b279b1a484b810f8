"""IQ4_NL and IQ4_XS: 4-bit indices into a fixed non-linear table of int8 levels.

IQ4_NL is laid out like Q4_0 (fp16 ``d``, then 16 bytes of nibbles); IQ4_XS is
a 256-weight super-block with eight 6-bit signed sub-block scales, like the
k-quants. Weight = ``d * scale * table[index]`` with ``d * scale`` rounded to
float32 first.
"""

from __future__ import annotations

import torch

from cholla.quant.bits import lookup, read_f16, unpack_bits

IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def dequantize_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    """18 bytes: d, qs[16] (byte j: weight j low nibble, weight j + 16 high)."""
    n = blocks.shape[0]
    d = read_f16(blocks, 0)
    index = unpack_bits(blocks[:, 2:18].reshape(n, 1, 16), 4).reshape(n, 32)
    return lookup(IQ4_LEVELS, index).mul_(d)


def dequantize_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    """136 bytes: d, scales_h (uint16, 2 bits per sub-block), scales_l[4] (nibbles), qs[128].

    Sub-block ``k`` (32 weights) has scale ``(low | high << 4) - 32`` where
    ``low`` is nibble ``k % 2`` of ``scales_l[k // 2]`` and ``high`` bits
    ``2k, 2k+1`` of ``scales_h``; its weights are the nibbles of 16 bytes.
    """
    n = blocks.shape[0]
    d = read_f16(blocks, 0)
    sc_high = unpack_bits(blocks[:, 2:4].reshape(n, 2, 1), 2).reshape(n, 8)
    sc_low = unpack_bits(blocks[:, 4:8].reshape(n, 4, 1), 4).reshape(n, 8)
    sc = sc_high.bitwise_left_shift_(4).bitwise_or_(sc_low).view(torch.int8).sub_(32)
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    index = unpack_bits(blocks[:, 8:136].reshape(n, 8, 16), 4).reshape(n, 8, 32)
    return lookup(IQ4_LEVELS, index).mul_(dl).reshape(n, 256)
