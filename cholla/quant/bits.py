"""Reading fields out of GGUF blocks: fp16 scales and packed small integers.

Every block layout is a run of fixed-size fields, so a batch of blocks
``[N, bytes_per_block]`` is sliced column-wise into one tensor per field.
Slices of a memory-mapped file are never written to; everything returned here
is a fresh tensor.
"""

from __future__ import annotations

import functools

import torch


def read_field(blocks: torch.Tensor, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """The ``dtype`` field at byte ``offset`` of each block, a fresh ``[N, 1]`` tensor."""
    size = dtype.itemsize
    aligned = (
        blocks.stride(1) == 1
        and blocks.stride(0) % size == 0
        and blocks.storage_offset() % size == 0
        and offset % size == 0
    )
    if aligned:
        # One strided column of the blocks seen as ``dtype``: a single fast gather.
        column = offset // size
        return blocks.view(dtype)[:, column : column + 1].clone(memory_format=torch.contiguous_format)
    # Misaligned for ``dtype``: copy the bytes out first.
    field = blocks[:, offset : offset + size].clone(memory_format=torch.contiguous_format)
    return field.view(dtype)


def read_f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte ``offset`` of each block as float32 ``[N, 1]``."""
    return read_field(blocks, offset, torch.float16).to(torch.float32)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Split each byte into ``8 // bits`` fields, lowest bits first.

    packed: uint8 ``[N, groups, length]`` -> uint8 ``[N, groups, 8 // bits, length]``
    where ``out[n, g, i, l] = (packed[n, g, l] >> (i * bits)) & mask``. This is
    how every GGUF type stores its quants: a run of ``length`` bytes holds
    ``8 // bits`` consecutive runs of ``length`` values.
    """
    n, groups, length = packed.shape
    fields = 8 // bits
    mask = (1 << bits) - 1
    if length % 8 == 0:
        # Shift 8 bytes at a time: the bits a shift drags in from the next
        # byte land above ``bits`` and are masked off with the rest.
        packed = packed.clone(memory_format=torch.contiguous_format).view(torch.int64)
        length //= 8
        mask *= 0x0101010101010101
    out = torch.empty((n, groups, fields, length), dtype=packed.dtype, device=packed.device)
    for i in range(fields):
        torch.bitwise_right_shift(packed, i * bits, out=out[:, :, i])
    out.bitwise_and_(mask)
    return out.view(torch.uint8)


@functools.lru_cache(maxsize=None)
def _pair_table(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """int64 ``[256]``: entry ``c`` holds the float32 pair ``(values[c & 15], values[c >> 4])``."""
    levels = torch.tensor(values, dtype=torch.float32)
    pairs = torch.stack([levels.repeat(16), levels.repeat_interleave(16)], dim=1)
    return pairs.view(torch.int64).reshape(256).to(device)


def lookup(values: tuple[float, ...], index: torch.Tensor) -> torch.Tensor:
    """Float32 ``values[index]`` for 4-bit indices: a 16-entry table of non-linear levels.

    index: contiguous uint8 ``[..., L]`` with ``L`` even. Two neighbouring
    indices are fused into one byte that fetches both floats at once, which
    halves the gathers and the size of the int32 index.
    """
    pair = index.view(torch.int16)  # little-endian: low byte is the first index
    pair = (pair & 0x0F) | ((pair >> 4) & 0xF0)
    words = _pair_table(values, index.device).index_select(0, pair.reshape(-1).to(torch.int32))
    return words.view(torch.float32).reshape(index.shape)


def spread_bits(packed: torch.Tensor, shift: int) -> torch.Tensor:
    """One bit per output byte: uint8 ``[N, B]`` -> uint8 ``[N, 8 * B]``, ``shift < 7``.

    ``out[n, 8 * b + k] = ((packed[n, b] >> k) & 1) << shift``: a little-endian
    bit mask, as the 5-bit legacy types store their fifth bits.
    """
    n, num_bytes = packed.shape
    value = packed.clone(memory_format=torch.contiguous_format).to(torch.int64)
    # Byte k of a 64-bit word gets bit k of the value: multiplying copies the
    # value into bytes 0-6 (no overflow), the mask keeps bit k of byte k; bit 7
    # goes to byte 7 by a shift.
    word = (value * 0x01010101010101).bitwise_and_(0x40201008040201)
    word.bitwise_or_((value & 0x80) << 49)
    # Adding 0x7F sets bit 7 of exactly the nonzero bytes (no carry between
    # bytes); shift it down to bit ``shift`` and clear the rest.
    word.add_(0x7F7F7F7F7F7F7F7F).bitwise_right_shift_(7 - shift).bitwise_and_(0x0101010101010101 << shift)
    return word.view(torch.uint8).reshape(n, 8 * num_bytes)
