"""MXFP4 (OCP microscaling): 32 fp4 (e2m1) weights sharing one power-of-two scale.

A block is one e8m0 exponent byte then 16 bytes of nibbles (byte j: weight j
low, weight j + 16 high). As in ggml, the e2m1 values are stored doubled as
integers and the scale halved, so weight = ``half_scale * 2 * e2m1``.
"""

from __future__ import annotations

import torch

from cholla.quant.bits import lookup, unpack_bits

# Sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6 times two.
E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def e8m0_to_half_scale(exponent: torch.Tensor) -> torch.Tensor:
    """2^(e - 128) as float32, built bit by bit (subnormal for e < 2), as ggml does."""
    e = exponent.to(torch.int32)
    bits = torch.where(e < 2, torch.bitwise_left_shift(0x00200000, e), (e - 1) << 23)
    return bits.view(torch.float32)


def dequantize_mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    """17 bytes: e (e8m0), qs[16]."""
    n = blocks.shape[0]
    half_scale = e8m0_to_half_scale(blocks[:, 0:1])
    index = unpack_bits(blocks[:, 1:17].reshape(n, 1, 16), 4).reshape(n, 32)
    return lookup(E2M1_DOUBLED, index).mul_(half_scale)


def ggml_blocks_from_hf(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """HF's ``mxfp4`` SafeTensors layout -> GGUF MXFP4 rows, so the same code reads both.

    blocks: uint8 ``[..., groups, 16]``, byte j holding weights 2j (low nibble) and
    2j + 1 (high); scales: uint8 e8m0 ``[..., groups]`` (the same exponent byte ggml
    stores). Returns uint8 ``[..., groups * 17]``: per group the exponent, then byte j
    holding weights j (low) and j + 16 (high).
    """
    nibbles = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)  # [..., groups, 32] in weight order
    packed = nibbles[..., :16] | (nibbles[..., 16:] << 4)
    return torch.cat((scales.unsqueeze(-1), packed), dim=-1).flatten(-2).contiguous()
