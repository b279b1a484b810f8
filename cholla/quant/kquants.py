"""The k-quants: 256-weight super-blocks split into sub-blocks of 16 or 32.

Each sub-block has its own small integer scale (and for Q2_K/Q4_K/Q5_K a
min), which the fp16 super-block scales ``d`` / ``dmin`` turn into floats
first: ``dl = d * scale``, ``ml = dmin * min``; then ``dl * q - ml``. The
quants are packed ``bits`` at a time across runs of 32 (or 64) bytes, see
``unpack_bits``. Q8_K is the intermediate type llama.cpp uses for
activations: a float32 scale and plain int8 quants.
"""

from __future__ import annotations

import torch

from cholla.quant.bits import read_f16, read_field, unpack_bits

QK_K = 256


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> eight 6-bit scales and mins, float32 ``[N, 8]``.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; bytes
    8-11 hold the low 4 bits of scale 4-7 (low nibble) and min 4-7 (high
    nibble), whose top 2 bits sit in the top 2 bits of bytes 0-3 / 4-7.
    """
    low_sc, low_min, high = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([low_sc & 0x3F, (high & 0x0F) | ((low_sc >> 2) & 0x30)], dim=1)
    mn = torch.cat([low_min & 0x3F, (high >> 4) | ((low_min >> 2) & 0x30)], dim=1)
    return sc.to(torch.float32), mn.to(torch.float32)


def dequantize_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """84 bytes: scales[16] (scale low nibble, min high nibble), qs[64] 2-bit, d, dmin."""
    n = blocks.shape[0]
    scales = blocks[:, 0:16]
    d = read_f16(blocks, 80)
    dmin = read_f16(blocks, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = unpack_bits(blocks[:, 16:80].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    return q.to(torch.float32).mul_(dl).sub_(ml).reshape(n, QK_K)


def dequantize_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """110 bytes: hmask[32], qs[64] 2-bit, scales[12] (sixteen 6-bit), d.

    A weight is ``q_low - 4`` when its hmask bit is clear, ``q_low`` when set,
    i.e. ``(q_low | hbit << 2) - 4``. Scale ``k`` is the nibble ``k % 8`` of
    bytes 0-7 (low nibbles first) plus 2 high bits from bytes 8-11.
    """
    n = blocks.shape[0]
    d = read_f16(blocks, 108)
    packed = blocks[:, 96:108]
    sc_low = unpack_bits(packed[:, 0:8].reshape(n, 1, 8), 4).reshape(n, 16)
    sc_high = unpack_bits(packed[:, 8:12].reshape(n, 1, 4), 2).reshape(n, 16)
    sc = sc_high.bitwise_left_shift_(4).bitwise_or_(sc_low).view(torch.int8).sub_(32)
    dl = (d * sc.to(torch.float32)).reshape(n, 16, 1)

    q_low = unpack_bits(blocks[:, 32:96].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    q_high = unpack_bits(blocks[:, 0:32].reshape(n, 1, 32), 1).reshape(n, 16, 16)
    q = q_high.bitwise_left_shift_(2).bitwise_or_(q_low).view(torch.int8).sub_(4)
    return q.to(torch.float32).mul_(dl).reshape(n, QK_K)


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """144 bytes: d, dmin, scales[12] (eight 6-bit scales + mins), qs[128] 4-bit."""
    n = blocks.shape[0]
    d = read_f16(blocks, 0)
    dmin = read_f16(blocks, 2)
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    dl = (d * sc).reshape(n, 8, 1)
    ml = (dmin * mn).reshape(n, 8, 1)
    q = unpack_bits(blocks[:, 16:144].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    return q.to(torch.float32).mul_(dl).sub_(ml).reshape(n, QK_K)


def dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """176 bytes: d, dmin, scales[12], qh[32] (fifth bits), qs[128] 4-bit."""
    n = blocks.shape[0]
    d = read_f16(blocks, 0)
    dmin = read_f16(blocks, 2)
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    dl = (d * sc).reshape(n, 8, 1)
    ml = (dmin * mn).reshape(n, 8, 1)
    q_low = unpack_bits(blocks[:, 48:176].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    q_high = unpack_bits(blocks[:, 16:48].reshape(n, 1, 32), 1).reshape(n, 8, 32)
    q = q_high.bitwise_left_shift_(4).bitwise_or_(q_low)
    return q.to(torch.float32).mul_(dl).sub_(ml).reshape(n, QK_K)


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """210 bytes: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d.

    Per 128-weight half: ql's 64 bytes give 4 runs of 32 low nibbles (low
    nibbles of bytes 0-31, 32-63, then high nibbles), qh's 32 bytes the
    matching 4 runs of 2-bit highs.
    """
    n = blocks.shape[0]
    d = read_f16(blocks, 208)
    dl = (d * blocks[:, 192:208].view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    q_low = unpack_bits(blocks[:, 0:128].reshape(n, 2, 64), 4).reshape(n, 16, 16)
    q_high = unpack_bits(blocks[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    q = q_high.bitwise_left_shift_(4).bitwise_or_(q_low).view(torch.int8).sub_(32)
    return q.to(torch.float32).mul_(dl).reshape(n, QK_K)


def dequantize_q8_k(blocks: torch.Tensor) -> torch.Tensor:
    """292 bytes: d as float32, qs[256] int8, bsums[16] int16 (unused here)."""
    d = read_field(blocks, 0, torch.float32)
    return blocks[:, 4:260].view(torch.int8).to(torch.float32).mul_(d)
