"""The element types a KV cache can hold, and how keys/values go in and come back out.

Each side of a layer's cache (K or V) is stored as ``[blocks, block_size, kv_heads, head_dim]``
(a latent-attention layer has one side, ``[blocks, block_size, 1, kv_lora_rank + rope_dim]``,
in a float type: ``paged_cache.check_kv_types``):

- float types (``f32``, ``bf16``, ``f16``) and plain fp8 (``fp8_e4m3_plain``, ``fp8_e5m2``,
  torch's float8 dtypes, no scale, the layout of vLLM's default ``--kv-cache-dtype fp8``) are a
  plain tensor of that dtype; fp8 values are clamped to the type's finite range first (a cast
  would give NaN). ``fp8_e4m3`` and ``fp8`` name ``fp8_e4m3_centered`` (below): plain e4m3 costs
  about +1% perplexity on both real models, centered keys bring it within +0.05% for 0.5-1 bit
  more per value (docs/benchmarks.md); a latent cache, which has no per-head keys to center,
  stores them plain (``paged_cache.fit_kv_types``);
- ``fp8_e4m3_scaled`` is a ``ScaledKV`` of fp8 e4m3 values and one fp16 scale per (token, head)
  that maps the head's largest magnitude to e4m3's 448: an unscaled fp8 cache stores the many
  small values of a head (below e4m3's smallest normal, 2^-6) with fewer than 3 mantissa bits;
  scaled, every value but zeros gets all 3 (the bytes of ``int8``);
- ``int8``, ``q8_0`` and ``q4_0`` are a ``ScaledKV``: integer values plus an fp16 scale per
  group of values along ``head_dim``: one group per (token, head) for ``int8`` (of the
  Hadamard-rotated head where ``head_dim`` is a power of two, below), 32 values for
  ``q8_0`` (llama.cpp's Q8_0 block: ``d = max|x| / 127``, ``q = round(x / d)`` half away from
  zero, ``d`` stored as fp16) and ``q4_0`` (llama.cpp's Q4_0: ``d = m / -8`` for the value
  ``m`` of largest magnitude, ``q = trunc(x / d + 8.5)`` clipped to 0..15, value ``(q - 8) d``,
  two per byte: values 0-15 of a block in the low nibbles, 16-31 in the high ones), kept as
  two planes (values, scales) instead of interleaved blocks;
- ``int8`` and ``q4_0_rot`` store each head rotated by a normalized Hadamard matrix ``H``
  (``H = H^T = H^-1``), rotated back on reading (``int8_rot`` is another name for ``int8``).
  The rotation spreads a few outlier channels over all of them, so each scale is set by
  typical values, not the outliers: QuaRot's treatment of the KV cache (Ashkboos et al.,
  "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024). Same sizes as
  unrotated; ``int8`` keeps a head whose ``head_dim`` is not a power of two unrotated (no
  Hadamard matrix of that size), ``q4_0_rot`` refuses it.
- ``q4_0_cal`` is ``q4_0_rot`` of each channel first shifted by its mean and divided by its
  spread, both measured once per layer, head and channel on a fixed calibration text when the
  cache is made (``kv/calibration.py``), and undone on reading. Keys carry a large per-channel
  offset shared by every token (outlier channels, QK-norm weights): rotation alone spreads it
  over all channels, where it still sets every scale; subtracting it first leaves the part that
  differs between tokens, which is what attention scores depend on. Per-channel statistics of
  keys are KVQuant's and KIVI's observation (Hooper et al., "KVQuant", NeurIPS 2024; Liu et al.,
  "KIVI", ICML 2024), here calibrated offline so a token's row is still written once.
  The same bytes as ``q4_0`` per token; the statistics are a few KiB per layer.
- ``q4_kivi`` is KIVI's asymmetric 4-bit scheme (Liu et al., "KIVI: A Tuning-Free Asymmetric
  2bit Quantization for KV Cache", ICML 2024): keys per channel, over the tokens of one cache
  block, values per token. The key side (a ``ScaledKV`` with ``open_blocks``) keeps, per block,
  4-bit codes ``q`` per token and channel (two channels to a byte: the head's first half in the
  low nibbles) and, per (block, head), a uint8 plane ``[head_dim + 16]``: one byte per channel
  (low nibble ``l``, high nibble ``s``), then fp16 ``base``, ``step`` and ``unit``, then the
  block's open flag; the value is ``q (s + 1) unit + base + l step`` (each channel's minimum
  over the block rounded down to ``base + l step``, its range / 15 rounded up to a multiple of
  ``unit``). A channel's minimum and range follow the per-channel offsets of keys (outlier
  channels, rotary phases) that per-token groups cannot. A block is quantized once, when its
  last slot is written, from its rows as kept in bf16 until then (``OpenBlocks``: KIVI's
  full-precision residual; reading an open block reads those rows), so a block's bytes do not
  depend on how it was filled (one prefill, chunks or decode steps). The value side is 4-bit,
  Hadamard-rotated, one fp16 scale per (token, head) (Q4_0's arithmetic over the whole head).
  Per token and head: ``head_dim / 2 + (head_dim + 16) / block_size`` bytes of keys and
  ``head_dim / 2 + 2`` of values, at most ``q4_0``'s ``2 * 0.5625 * head_dim`` for
  ``head_dim >= 64`` at blocks of 16; the open blocks' bf16 rows (two per sequence at most
  ``max_num_seqs``) are a fixed few MiB (``open_block_bytes``).
- ``fp8_e4m3_centered`` keeps keys as fp8 e4m3 after taking out each channel's mean over the
  tokens of their cache block, SageAttention's smoothing of K (Zhang et al., "SageAttention:
  Accurate 8-Bit Attention for Plug-and-play Inference Acceleration", ICLR 2025) per block, as
  a paged cache fills one block at a time: keys share a large per-channel offset (outlier
  channels, QK-norm weights), and e4m3's 3 mantissa bits are relative to the whole value, so
  the offset's rounding error swamps the part that differs between tokens. Per (block, head) a
  uint8 plane ``[2 head_dim + 2 block_size + 16]``: fp16 means per channel, fp16 scales per
  token (each row of the rest scaled so its largest magnitude is 448, as
  ``fp8_e4m3_scaled``), then q4_kivi's tail (the open flag at its byte 6); a block is
  quantized when it fills, from bf16 rows kept until then (``OpenBlocks``, as q4_kivi). Values
  are ``fp8_e4m3_scaled``'s. Per token and head: ``head_dim + 2 + (2 head_dim + 16) / block_size``
  bytes of keys, ``head_dim + 2`` of values.

The PyTorch path reads every type back as fp32 (``gather``). cholla's C++ kernels
(``kernels/paged_attention.cpp``) write and read every type in place, a row at a time
(``kernel_parts`` hands them a side): rotated and calibrated types are read without undoing
the rotation per key, by rotating the query once and each head's output once instead; keys
with statistics per block (q4_kivi, fp8_e4m3_centered) a block at a time, an open block from
its bf16 rows (``open_for_write`` gives a write's blocks their slots, the kernels fill them
and quantize the blocks a write fills).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch

from cholla.errors import ChollaError, InvalidRequestError


@dataclass(frozen=True)
class KVCacheType:
    name: str
    storage: torch.dtype  # element dtype of the values
    group: int | None = None  # values per fp16 scale along head_dim; 0 = the whole head; None = no scale
    bits: int = 8  # per value; 4: two to a byte (q4_0)
    rotated: bool = False  # each head Hadamard-rotated before quantizing (int8, q4_0_rot)
    rotation_optional: bool = False  # heads whose head_dim is not a power of two stored unrotated (int8)
    calibrated: bool = False  # channels shifted and scaled by calibrated statistics first (q4_0_cal)
    channel_keys: bool = False  # keys with statistics over each block's tokens (q4_kivi, fp8_e4m3_centered)

    def groups(self, head_dim: int) -> int:
        """Scales per (token, head)."""
        if self.group is None:
            return 0
        return 1 if self.group == 0 else head_dim // self.group

    def bytes_per_head(self, head_dim: int, key: bool = False, block_size: int = 16) -> int | float:
        """Bytes one token's one head takes: values plus scales (``key``: on the key side, whose
        per-block statistics of ``q4_kivi`` are spread over ``block_size`` tokens)."""
        if key and self.channel_keys:
            per_block = block_size * head_dim * self.bits // 8 + channel_params(head_dim, self.storage, block_size)
            return per_block // block_size if per_block % block_size == 0 else per_block / block_size
        return head_dim * self.bits // 8 * self.storage.itemsize + self.groups(head_dim) * 2

    def rotates(self, head_dim: int) -> bool:
        """Whether heads of ``head_dim`` values are stored Hadamard-rotated."""
        return self.rotated and not head_dim & (head_dim - 1)

    def check(self, head_dim: int) -> None:
        if self.rotated and not self.rotation_optional and not self.rotates(head_dim):
            raise InvalidRequestError(f"KV cache type {self.name} needs a power-of-two head_dim, the model's is "
                                      f"{head_dim}; choose a type without _rot")
        if self.group and head_dim % self.group:
            raise InvalidRequestError(f"KV cache type {self.name} needs a head_dim divisible by {self.group}, "
                                      f"the model's is {head_dim}; choose int8 or a float type")


KV_CACHE_TYPES = {
    t.name: t
    for t in (
        KVCacheType("f32", torch.float32),
        KVCacheType("bf16", torch.bfloat16),
        KVCacheType("f16", torch.float16),
        KVCacheType("fp8_e4m3_plain", torch.float8_e4m3fn),
        KVCacheType("fp8_e5m2", torch.float8_e5m2),
        KVCacheType("int8", torch.int8, group=0, rotated=True, rotation_optional=True),
        KVCacheType("q8_0", torch.int8, group=32),
        KVCacheType("q4_0", torch.uint8, group=32, bits=4),
        KVCacheType("q4_0_rot", torch.uint8, group=32, bits=4, rotated=True),
        KVCacheType("q4_0_cal", torch.uint8, group=32, bits=4, rotated=True, calibrated=True),
        KVCacheType("q4_kivi", torch.uint8, group=0, bits=4, rotated=True, channel_keys=True),
        KVCacheType("fp8_e4m3_scaled", torch.float8_e4m3fn, group=0),
        KVCacheType("fp8_e4m3_centered", torch.float8_e4m3fn, group=0, channel_keys=True),
    )
}
ALIASES = {"fp8": "fp8_e4m3_centered", "fp8_e4m3": "fp8_e4m3_centered", "int8_rot": "int8", "float32": "f32", "fp32": "f32", "bfloat16": "bf16", "float16": "f16", "fp16": "f16"}
_BY_TORCH_DTYPE = {t.storage: t for t in KV_CACHE_TYPES.values() if t.group is None}
KV_CACHE_TYPE_NAMES = ["auto", *KV_CACHE_TYPES, *ALIASES]


def kv_cache_type(spec: "str | torch.dtype | KVCacheType", compute_dtype: str = "float32") -> KVCacheType:
    """A type from its name (vLLM's and llama.cpp's spellings), a torch dtype, or ``auto``:
    the matmuls' dtype (``compute_dtype``: bf16 where cholla's kernels run, else f32)."""
    if isinstance(spec, KVCacheType):
        return spec
    if isinstance(spec, torch.dtype):
        return _BY_TORCH_DTYPE[spec]
    name = str(spec).lower()
    if name == "auto":
        name = "bf16" if compute_dtype == "bfloat16" else "f32"
    name = ALIASES.get(name, name)
    if name not in KV_CACHE_TYPES:
        raise InvalidRequestError(f"unknown KV cache type {spec!r}; choose one of {', '.join(KV_CACHE_TYPE_NAMES)}")
    return KV_CACHE_TYPES[name]


class ScaledKV(NamedTuple):
    """One side of a layer's integer cache: values ``[blocks, block_size, kv_heads, head_dim]``
    (int8; uint8 ``head_dim / 2`` packed nibbles for q4_0) and fp16 scales ``[..., groups]``."""

    values: torch.Tensor
    scales: torch.Tensor
    rotated: bool = False  # heads stored Hadamard-rotated (int8, q4_0_rot)
    # Calibrated types (q4_0_cal): fp32 [kv_heads, head_dim] per-channel mean and spread, stored
    # values are (x - shift) / spread; filled by kv/calibration.py before the first write.
    shift: torch.Tensor | None = None
    spread: torch.Tensor | None = None
    # Keys quantized per channel over each block (q4_kivi): values [blocks, block_size, kv_heads,
    # head_dim / 2] packed codes, scales uint8 [blocks, kv_heads, head_dim + 16] (``channel_params``),
    # and the bf16 rows of blocks still filling.
    open_blocks: OpenBlocks | None = None

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes + (self.open_blocks.nbytes if self.open_blocks else 0)


CacheSide = Union[torch.Tensor, ScaledKV]

# The per-(block, head) plane of q4_kivi's keys: one code byte per channel, then fp16 base, step
# and unit (bytes head_dim .. head_dim + 5), the open flag (byte head_dim + 6), padding to 16;
# of fp8_e4m3_centered's: fp16 means [head_dim], fp16 scales [block_size], then the same tail
# of 16 bytes (the open flag its byte 6).
_PARAMS_TAIL = 16
_OPEN = 1  # flag byte of a block whose rows are in OpenBlocks; 0 (as zeroed) = quantized


def channel_params(head_dim: int, storage: torch.dtype = torch.uint8, block_size: int = 16) -> int:
    """Bytes of the key statistics per (block, head): q4_kivi's (uint8 codes), fp8_e4m3_centered's."""
    if storage == torch.float8_e4m3fn:
        return 2 * head_dim + 2 * block_size + _PARAMS_TAIL
    return head_dim + _PARAMS_TAIL


class OpenBlocks:
    """The bf16 rows of q4_kivi key blocks not yet full: KIVI's full-precision residual.

    A fixed pool of ``num_slots`` block-sized slots; ``slot_of[block]`` is a block's slot or -1.
    A block gets a slot when it is first written part-way and keeps it after it is quantized,
    so a rewrite of its last slots (speculative tokens rejected) starts again from the exact
    rows. When the pool is full, the least recently written slot is taken: its block, if still
    open, is quantized as it stands (an abandoned block's rows, or, with more open blocks than
    slots, an early quantization that a later write reopens from the quantized rows)."""

    def __init__(self, num_slots: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, zeros):
        self.rows = zeros((num_slots, block_size, num_kv_heads, head_dim), torch.bfloat16)
        self.slot_of = torch.full((num_blocks,), -1, dtype=torch.long)
        self.block_in: list[int] = [-1] * num_slots
        self.written: list[int] = [0] * num_slots  # clock of each slot's last write
        self.clock = 0

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def slot(self, cache: ScaledKV, block: int, fresh: bool) -> int:
        """The slot holding ``block``'s rows, taking one if it has none (``fresh``: the block starts
        filling from its first slot; else its quantized rows are read back into the slot)."""
        self.clock += 1
        slot = int(self.slot_of[block])
        if slot < 0:
            slot = min(range(len(self.written)), key=self.written.__getitem__)
            old = self.block_in[slot]
            if old >= 0:
                if _is_open(cache, old):
                    _close(cache, [old], self.rows[slot][None])
                self.slot_of[old] = -1
            self.block_in[slot], self.slot_of[block] = block, slot
            if not fresh:
                self.rows[slot] = _dequantize_block(cache.values[block], cache.scales[block]).to(torch.bfloat16)
        self.written[slot] = self.clock
        return slot

    def release(self, block: int) -> None:
        """``block`` keeps no slot (it is written whole: stale rows must not be reopened later)."""
        slot = int(self.slot_of[block])
        if slot >= 0:
            self.slot_of[block] = -1
            self.block_in[slot] = -1
            self.written[slot] = 0


def allocate(kv_type: KVCacheType, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
             zeros, key: bool = False, open_slots: int = 128) -> CacheSide:
    """One side of one layer's cache, zeroed (``zeros(shape, dtype)`` makes the memory). ``key``:
    the key side (q4_kivi's differs), whose open blocks get ``open_slots`` bf16 slots."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if key and kv_type.channel_keys:
        values = zeros((*shape[:3], head_dim * kv_type.bits // 8), kv_type.storage)
        scales = zeros((num_blocks, num_kv_heads, channel_params(head_dim, kv_type.storage, block_size)), torch.uint8)
        slots = OpenBlocks(min(open_slots, num_blocks), num_blocks, block_size, num_kv_heads, head_dim, zeros)
        return ScaledKV(values, scales, open_blocks=slots)
    if kv_type.group is None:
        return zeros(shape, kv_type.storage)
    values = zeros((*shape[:3], head_dim * kv_type.bits // 8), kv_type.storage)
    scales = zeros((*shape[:3], kv_type.groups(head_dim)), torch.float16)
    if not kv_type.calibrated:
        return ScaledKV(values, scales, kv_type.rotates(head_dim))
    return ScaledKV(values, scales, True, torch.zeros(num_kv_heads, head_dim), torch.ones(num_kv_heads, head_dim))


@functools.cache
def hadamard(n: int) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix [n, n] (n a power of two): symmetric and orthogonal."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)])
    return h / math.sqrt(n)


# The largest head_dim of a rotated type the C++ kernels take (their writer's stack buffer).
KERNEL_MAX_ROTATED_DIM = 1024


def head_dim(cache: CacheSide) -> int:
    """The values per (token, head) a side holds (q4_0 packs two to a byte)."""
    width = cache.values.shape[-1] if isinstance(cache, ScaledKV) else cache.shape[-1]
    return width * 2 if cache.dtype == torch.uint8 else width


def kernel_parts(cache: CacheSide) -> tuple[torch.Tensor, list[torch.Tensor], bool] | None:
    """One side as the C++ kernels take it (``paged_attention.cpp``'s ``kv_side``): its values,
    ``[]`` / ``[scales]`` / ``[scales, shift, spread]`` / q4_kivi keys' ``[params, open rows,
    open slots]``, and whether heads are rotated; None where they cannot: a non-contiguous view
    (a latent cache's V), a GPU cache, or a head the kernels' buffers do not hold."""
    if isinstance(cache, ScaledKV):
        tensors = [cache.values, cache.scales]
        if cache.shift is not None:
            tensors += [cache.shift, cache.spread]
        if cache.open_blocks is not None:
            tensors += [cache.open_blocks.rows, cache.open_blocks.slot_of]
        # q4_kivi's 4-bit heads and per-block keys, fp8_e4m3_centered's keys: dim / 2 a multiple of 16
        # for the nibble loaders, the writers' buffers for every head they transform first
        per_head_4bit = cache.values.dtype == torch.uint8 and (
            cache.open_blocks is not None or cache.scales.shape[-1] * 32 != head_dim(cache))
        buffered = cache.rotated or per_head_4bit or cache.open_blocks is not None
        if (not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors)
                or (buffered and head_dim(cache) > KERNEL_MAX_ROTATED_DIM) or (per_head_4bit and head_dim(cache) % 32)):
            return None
        return cache.values, tensors[1:], cache.rotated
    if not cache.is_contiguous() or cache.device.type != "cpu" or cache.dtype not in _BY_TORCH_DTYPE:
        return None
    return cache, [], False


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's (and gguf's) rounding: halves away from zero, not to even as torch.round."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def quantize_int8(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: fp32 [..., dim] -> (int8 [..., dim], fp16 scales [..., groups]); Q8_0's arithmetic."""
    blocks = x.float().unflatten(-1, (groups, -1))
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    values = _round_half_away(blocks * inverse).clamp_(-127, 127).to(torch.int8)
    return values.flatten(-2), scale.squeeze(-1).to(torch.float16)


def dequantize_int8(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The inverse: fp32 [..., dim]."""
    groups = scales.shape[-1]
    return (values.float().unflatten(-1, (groups, -1)) * scales.float().unsqueeze(-1)).flatten(-2)


def quantize_q4_0(x: torch.Tensor, groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: fp32 [..., dim] -> (uint8 packed [..., dim / 2], fp16 scales [..., groups]); Q4_0's
    arithmetic over ``groups`` groups (default: Q4_0's 32 values each; q4_kivi's values: 1)."""
    blocks = x.float().unflatten(-1, (groups or x.shape[-1] // 32, -1))
    extreme = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))
    scale = extreme / -8
    inverse = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    q = torch.trunc(blocks * inverse + 8.5).clamp_(0, 15).to(torch.uint8)
    half = blocks.shape[-1] // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return packed.flatten(-2), scale.squeeze(-1).to(torch.float16)


def dequantize_q4_0(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The inverse: fp32 [..., dim]."""
    nibbles = packed.unflatten(-1, (scales.shape[-1], -1))
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).float() - 8
    return (q * scales.float().unsqueeze(-1)).flatten(-2)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., dim / 2] -> fp32 [..., dim]: low nibbles are the first half, high the second."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()


def quantize_channel(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full key blocks rows: fp32 [n, block_size, kv_heads, dim] -> (uint8 codes [n, block_size,
    kv_heads, dim / 2], uint8 statistics [n, kv_heads, dim + 16]); q4_kivi's layout (module doc)."""
    low, high = rows.amin(dim=1), rows.amax(dim=1)  # [n, heads, dim]
    base = low.amin(dim=-1, keepdim=True).half().float()
    step = ((low.amax(dim=-1, keepdim=True) - base) / 15).half().float()
    low_code = torch.floor((low - base) / torch.where(step == 0, 1, step)).clamp_(0, 15)
    floor = base + low_code * step
    spans = (high - floor) / 15
    unit = (spans.amax(dim=-1, keepdim=True) / 16).half().float()
    span_code = torch.ceil(spans / torch.where(unit == 0, 1, unit)).clamp_(1, 16)
    scale = (span_code * unit).unsqueeze(1)  # [n, 1, heads, dim]
    q = torch.round((rows - floor.unsqueeze(1)) / torch.where(scale == 0, 1, scale)).clamp_(0, 15).to(torch.uint8)
    half = rows.shape[-1] // 2
    codes = low_code.to(torch.uint8) | ((span_code - 1).to(torch.uint8) << 4)
    tail = torch.zeros(*codes.shape[:-1], _PARAMS_TAIL, dtype=torch.uint8)
    tail[..., :6] = torch.cat([base, step, unit], dim=-1).half().view(torch.uint8)
    return q[..., :half] | (q[..., half:] << 4), torch.cat([codes, tail], dim=-1)


def _dequantize_channel(values: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """values [..., block_size, kv_heads, dim / 2], params [..., kv_heads, dim + 16] -> fp32
    [..., block_size, kv_heads, dim]."""
    dim = values.shape[-1] * 2
    codes = params[..., :dim]
    base, step, unit = params[..., dim : dim + 6].contiguous().view(torch.float16).float().split(1, dim=-1)
    floor = base + (codes & 0x0F).float() * step
    scale = ((codes >> 4).float() + 1) * unit
    return _unpack_nibbles(values) * scale.unsqueeze(-3) + floor.unsqueeze(-3)


def quantize_centered(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full key blocks rows: fp32 [n, block_size, kv_heads, dim] -> (float8_e4m3 [n, block_size,
    kv_heads, dim], uint8 statistics [n, kv_heads, 2 dim + 2 block_size + 16]): each channel's
    mean over the block (fp16) taken out, then each (token, head) as ``quantize_fp8``."""
    n, block_size, heads, dim = rows.shape
    mean = rows.mean(dim=1).half()  # [n, heads, dim]
    codes, scales = quantize_fp8(rows - mean.float().unsqueeze(1))  # scales [n, block_size, heads, 1]
    tail = torch.zeros(n, heads, _PARAMS_TAIL, dtype=torch.uint8)
    scales = scales.squeeze(-1).transpose(1, 2).contiguous()  # [n, heads, block_size]
    return codes, torch.cat([mean.view(torch.uint8), scales.view(torch.uint8), tail], dim=-1)


def _dequantize_centered(values: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """values [..., block_size, kv_heads, dim] e4m3, params [..., kv_heads, 2 dim + 2 block_size + 16]
    -> fp32 [..., block_size, kv_heads, dim]."""
    dim, block_size = values.shape[-1], values.shape[-3]
    mean = params[..., : 2 * dim].contiguous().view(torch.float16).float()  # [..., heads, dim]
    scales = params[..., 2 * dim : 2 * dim + 2 * block_size].contiguous().view(torch.float16).float()
    return values.float() * scales.transpose(-1, -2).unsqueeze(-1) + mean.unsqueeze(-3)


def _dequantize_block(values: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """A quantized key block (or blocks) of either per-block layout, as fp32."""
    if values.dtype == torch.float8_e4m3fn:
        return _dequantize_centered(values, params)
    return _dequantize_channel(values, params)


def _is_open(cache: ScaledKV, block: int) -> bool:
    return int(cache.scales[block, 0, -_PARAMS_TAIL + 6]) == _OPEN


def _close(cache: ScaledKV, blocks: list[int], rows: torch.Tensor) -> None:
    """Quantize full blocks ``blocks`` from their bf16 rows [n, block_size, kv_heads, dim]."""
    centered = cache.values.dtype == torch.float8_e4m3fn
    values, params = (quantize_centered if centered else quantize_channel)(rows.float())
    index = torch.tensor(blocks)
    _as_bytes(cache.values).index_copy_(0, index, _as_bytes(values))
    cache.scales.index_copy_(0, index, params)


def open_for_write(cache: CacheSide, slot_mapping: torch.Tensor) -> dict[int, tuple[list[int], list[int]]]:
    """Before q4_kivi keys are written to ``slot_mapping`` (by ``store`` or the C++ kernels): each
    block the write fills part-way gets its open slot (``OpenBlocks.slot``), each block it fills
    whole drops any slot it kept (its rows there are another write's). Returns per block the
    write's rows and their offsets; nothing to do (``{}``) for other sides."""
    if not (isinstance(cache, ScaledKV) and cache.open_blocks is not None):
        return {}
    block_size = cache.values.shape[1]
    open_blocks = cache.open_blocks
    by_block: dict[int, tuple[list[int], list[int]]] = {}
    for i, slot in enumerate(slot_mapping.tolist()):
        index, at = by_block.setdefault(slot // block_size, ([], []))
        index.append(i)
        at.append(slot % block_size)
    whole = {block for block, (_, at) in by_block.items() if sorted(at) == list(range(block_size))}
    if len(by_block) - len(whole) > len(open_blocks.written):
        raise ChollaError(f"a write fills {len(by_block) - len(whole)} q4_kivi key blocks part-way, more than its "
                          f"{len(open_blocks.written)} open slots (two per running sequence): raise max_num_seqs")
    for block, (_, at) in by_block.items():
        if block in whole:
            open_blocks.release(block)
        else:
            open_blocks.slot(cache, block, fresh=0 in at)
    return by_block


def _store_channel(cache: ScaledKV, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """q4_kivi keys: rows of blocks this write fills whole are quantized at once; the others go to
    their open slot, and a block whose last slot is written is quantized from it."""
    block_size = cache.values.shape[1]
    open_blocks = cache.open_blocks
    rows = x.to(torch.bfloat16)
    whole, whole_rows, filled, filled_slots = [], [], [], []
    for block, (index, at) in open_for_write(cache, slot_mapping).items():
        slot = int(open_blocks.slot_of[block])
        if slot < 0:
            whole.append(block)
            whole_rows.append(rows[[i for _, i in sorted(zip(at, index))]])
            continue
        open_blocks.rows[slot, at] = rows[index]
        if block_size - 1 in at:
            filled.append(block)
            filled_slots.append(slot)
        else:
            cache.scales[block, :, -_PARAMS_TAIL + 6] = _OPEN
    if whole:
        _close(cache, whole, torch.stack(whole_rows))
    if filled:
        _close(cache, filled, open_blocks.rows[filled_slots])


def _gather_channel(cache: ScaledKV, blocks: torch.Tensor) -> torch.Tensor:
    """q4_kivi's or fp8_e4m3_centered's keys of ``blocks`` (any index shape) as fp32; open blocks
    from their bf16 rows."""
    params = cache.scales[blocks]
    out = _dequantize_block(_as_bytes(cache.values)[blocks].view(cache.values.dtype), params)
    is_open = params[..., 0, -_PARAMS_TAIL + 6] == _OPEN
    if bool(is_open.any()):
        slots = cache.open_blocks.slot_of[blocks[is_open]]
        out[is_open] = cache.open_blocks.rows[slots].float()
    return out


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: fp32 [..., dim] -> (float8_e4m3 [..., dim], fp16 scales [..., 1]): each row scaled so its
    largest magnitude is e4m3's 448 (saturating where the fp16 scale rounded down)."""
    limit = torch.finfo(torch.float8_e4m3fn).max
    scale = (x.abs().amax(dim=-1, keepdim=True) / limit).to(torch.float16)
    inverse = torch.where(scale == 0, 0, 1 / scale.float())
    return (x * inverse).clamp_(-limit, limit).to(torch.float8_e4m3fn), scale


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors are copied and indexed as bytes (torch has no fp8 index_copy_ on CPU)."""
    return t.view(torch.uint8) if t.dtype.is_floating_point and t.dtype.itemsize == 1 else t


def _quantize(x: torch.Tensor, cache: ScaledKV) -> tuple[torch.Tensor, torch.Tensor]:
    if cache.shift is not None:
        x = (x - cache.shift) / cache.spread
    if cache.rotated:
        x = x @ hadamard(x.shape[-1])
    if cache.values.dtype == torch.float8_e4m3fn:
        return quantize_fp8(x)
    if cache.values.dtype == torch.uint8:
        return quantize_q4_0(x, cache.scales.shape[-1])
    return quantize_int8(x, cache.scales.shape[-1])


def _dequantize(values: torch.Tensor, scales: torch.Tensor, cache: ScaledKV) -> torch.Tensor:
    x = _dequantize_stored(values, scales)
    if cache.rotated:
        x = x @ hadamard(x.shape[-1])
    return x * cache.spread + cache.shift if cache.shift is not None else x


def _dequantize_stored(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if values.dtype == torch.float8_e4m3fn:
        return values.float() * scales.float()
    return dequantize_q4_0(values, scales) if values.dtype == torch.uint8 else dequantize_int8(values, scales)


def _encode_float(kv_type: KVCacheType, x: torch.Tensor) -> torch.Tensor:
    """x: fp32 [..., head_dim] in a float cache's dtype."""
    if kv_type.storage.is_floating_point and kv_type.storage.itemsize == 1:  # fp8: saturate, never NaN
        limit = torch.finfo(kv_type.storage).max
        return x.clamp(-limit, limit).to(kv_type.storage)
    return x.to(kv_type.storage)


def store(cache: CacheSide, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """x: fp32 [tokens, kv_heads, head_dim] into the flat cache slots ``slot_mapping``."""
    if isinstance(cache, ScaledKV) and cache.open_blocks is not None:
        _store_channel(cache, x, slot_mapping)
        return
    if isinstance(cache, ScaledKV):
        values, scales = _quantize(x, cache)
        _as_bytes(cache.values).view(-1, *cache.values.shape[2:]).index_copy_(0, slot_mapping, _as_bytes(values))
        cache.scales.view(-1, *cache.scales.shape[2:]).index_copy_(0, slot_mapping, scales)
        return
    rows = _encode_float(_BY_TORCH_DTYPE[cache.dtype], x)
    if cache.dtype.itemsize == 1:  # fp8: torch copies and indexes it only as bytes
        cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, rows)


def gather(cache: CacheSide, blocks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The blocks ``blocks`` (any index shape) read back: ``[*blocks.shape, block_size, kv_heads, head_dim]``."""
    if isinstance(cache, ScaledKV) and cache.open_blocks is not None:
        return _gather_channel(cache, blocks).to(dtype)
    if isinstance(cache, ScaledKV):
        values = _as_bytes(cache.values)[blocks].view(cache.values.dtype)
        return _dequantize(values, cache.scales[blocks], cache).to(dtype)
    if cache.dtype.itemsize == 1:  # fp8
        return cache.view(torch.uint8)[blocks].view(cache.dtype).to(dtype)
    return cache[blocks].to(dtype)


def gather_stored(cache: CacheSide, blocks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """As ``gather``, but a rotated side's heads come back as stored: still rotated and (calibrated)
    normalized, for attention that folds the rotation and statistics into its queries and outputs."""
    if isinstance(cache, ScaledKV):
        values = _as_bytes(cache.values)[blocks].view(cache.values.dtype)
        return _dequantize_stored(values, cache.scales[blocks]).to(dtype)
    return gather(cache, blocks, dtype)
