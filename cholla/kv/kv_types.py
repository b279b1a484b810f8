"""The element types a KV cache can hold, and how keys/values go in and come back out.

Each side of a layer's cache (K or V) is stored as ``[blocks, block_size, kv_heads, head_dim]``
(a latent-attention layer has one side, ``[blocks, block_size, 1, kv_lora_rank + rope_dim]``,
in a float type: ``paged_cache.check_kv_types``):

- float types (``f32``, ``bf16``, ``f16``) and fp8 (``fp8_e4m3``, ``fp8_e5m2``, torch's
  float8 dtypes, no scale, as vLLM's default ``--kv-cache-dtype fp8``) are a plain tensor of
  that dtype; fp8 values are clamped to the type's finite range first (a cast would give NaN);
- ``int8``, ``q8_0`` and ``q4_0`` are a ``ScaledKV``: integer values plus an fp16 scale per
  group of values along ``head_dim``: one group per (token, head) for ``int8``, 32 values for
  ``q8_0`` (llama.cpp's Q8_0 block: ``d = max|x| / 127``, ``q = round(x / d)`` half away from
  zero, ``d`` stored as fp16) and ``q4_0`` (llama.cpp's Q4_0: ``d = m / -8`` for the value
  ``m`` of largest magnitude, ``q = trunc(x / d + 8.5)`` clipped to 0..15, value ``(q - 8) d``,
  two per byte: values 0-15 of a block in the low nibbles, 16-31 in the high ones), kept as
  two planes (values, scales) instead of interleaved blocks;
- ``int8_rot`` and ``q4_0_rot`` are ``int8`` and ``q4_0`` of each head rotated by a
  normalized Hadamard matrix ``H`` (``H = H^T = H^-1``), and rotated back on reading. The
  rotation spreads a few outlier channels over all of them, so each scale is set by typical
  values, not the outliers: QuaRot's treatment of the KV cache (Ashkboos et al., "QuaRot:
  Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024). Same sizes as unrotated.
- ``q4_0_cal`` is ``q4_0_rot`` of each channel first shifted by its mean and divided by its
  spread, both measured once per layer, head and channel on a fixed calibration text when the
  cache is made (``kv/calibration.py``), and undone on reading. Keys carry a large per-channel
  offset shared by every token (outlier channels, QK-norm weights): rotation alone spreads it
  over all channels, where it still sets every scale; subtracting it first leaves the part that
  differs between tokens, which is what attention scores depend on. Per-channel statistics of
  keys are KVQuant's and KIVI's observation (Hooper et al., "KVQuant", NeurIPS 2024; Liu et al.,
  "KIVI", ICML 2024), here calibrated offline so a token's row is still written once.
  The same bytes as ``q4_0`` per token; the statistics are a few KiB per layer.

The PyTorch path reads every type back as fp32 (``gather``). cholla's C++ kernels
(``kernels/paged_attention.cpp``) write and read every type in place, a row at a time
(``kernel_parts`` hands them a side): rotated and calibrated types are read without undoing
the rotation per key, by rotating the query once and each head's output once instead.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch

from cholla.errors import InvalidRequestError


@dataclass(frozen=True)
class KVCacheType:
    name: str
    storage: torch.dtype  # element dtype of the values
    group: int | None = None  # values per fp16 scale along head_dim; 0 = the whole head; None = no scale
    bits: int = 8  # per value; 4: two to a byte (q4_0)
    rotated: bool = False  # each head Hadamard-rotated before quantizing (int8_rot, q4_0_rot)
    calibrated: bool = False  # channels shifted and scaled by calibrated statistics first (q4_0_cal)

    def groups(self, head_dim: int) -> int:
        """Scales per (token, head)."""
        if self.group is None:
            return 0
        return 1 if self.group == 0 else head_dim // self.group

    def bytes_per_head(self, head_dim: int) -> int:
        """Bytes one token's one head takes: values plus scales."""
        return head_dim * self.bits // 8 * self.storage.itemsize + self.groups(head_dim) * 2

    def check(self, head_dim: int) -> None:
        if self.rotated and head_dim & (head_dim - 1):
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
        KVCacheType("fp8_e4m3", torch.float8_e4m3fn),
        KVCacheType("fp8_e5m2", torch.float8_e5m2),
        KVCacheType("int8", torch.int8, group=0),
        KVCacheType("q8_0", torch.int8, group=32),
        KVCacheType("q4_0", torch.uint8, group=32, bits=4),
        KVCacheType("int8_rot", torch.int8, group=0, rotated=True),
        KVCacheType("q4_0_rot", torch.uint8, group=32, bits=4, rotated=True),
        KVCacheType("q4_0_cal", torch.uint8, group=32, bits=4, rotated=True, calibrated=True),
    )
}
ALIASES = {"fp8": "fp8_e4m3", "float32": "f32", "fp32": "f32", "bfloat16": "bf16", "float16": "f16", "fp16": "f16"}
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
    rotated: bool = False  # heads stored Hadamard-rotated (int8_rot, q4_0_rot)
    # Calibrated types (q4_0_cal): fp32 [kv_heads, head_dim] per-channel mean and spread, stored
    # values are (x - shift) / spread; filled by kv/calibration.py before the first write.
    shift: torch.Tensor | None = None
    spread: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes


CacheSide = Union[torch.Tensor, ScaledKV]


def allocate(kv_type: KVCacheType, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
             zeros) -> CacheSide:
    """One side of one layer's cache, zeroed (``zeros(shape, dtype)`` makes the memory)."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if kv_type.group is None:
        return zeros(shape, kv_type.storage)
    values = zeros((*shape[:3], head_dim * kv_type.bits // 8), kv_type.storage)
    scales = zeros((*shape[:3], kv_type.groups(head_dim)), torch.float16)
    if not kv_type.calibrated:
        return ScaledKV(values, scales, kv_type.rotated)
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
    ``[]`` / ``[scales]`` / ``[scales, shift, spread]``, and whether heads are rotated; None where
    they cannot: a non-contiguous view (a latent cache's V) or a GPU cache."""
    if isinstance(cache, ScaledKV):
        tensors = [cache.values, cache.scales] + ([] if cache.shift is None else [cache.shift, cache.spread])
        if (not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors)
                or (cache.rotated and head_dim(cache) > KERNEL_MAX_ROTATED_DIM)):
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


def quantize_q4_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: fp32 [..., dim] -> (uint8 packed [..., dim / 2], fp16 scales [..., dim / 32]); Q4_0's arithmetic."""
    blocks = x.float().unflatten(-1, (-1, 32))
    extreme = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))
    scale = extreme / -8
    inverse = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    q = torch.trunc(blocks * inverse + 8.5).clamp_(0, 15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    return packed.flatten(-2), scale.squeeze(-1).to(torch.float16)


def dequantize_q4_0(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The inverse: fp32 [..., dim]."""
    nibbles = packed.unflatten(-1, (-1, 16))
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).float() - 8
    return (q * scales.float().unsqueeze(-1)).flatten(-2)


def _quantize(x: torch.Tensor, cache: ScaledKV) -> tuple[torch.Tensor, torch.Tensor]:
    if cache.shift is not None:
        x = (x - cache.shift) / cache.spread
    if cache.rotated:
        x = x @ hadamard(x.shape[-1])
    if cache.values.dtype == torch.uint8:
        return quantize_q4_0(x)
    return quantize_int8(x, cache.scales.shape[-1])


def _dequantize(values: torch.Tensor, scales: torch.Tensor, cache: ScaledKV) -> torch.Tensor:
    x = _dequantize_stored(values, scales)
    if cache.rotated:
        x = x @ hadamard(x.shape[-1])
    return x * cache.spread + cache.shift if cache.shift is not None else x


def _dequantize_stored(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return dequantize_q4_0(values, scales) if values.dtype == torch.uint8 else dequantize_int8(values, scales)


def _encode_float(kv_type: KVCacheType, x: torch.Tensor) -> torch.Tensor:
    """x: fp32 [..., head_dim] in a float cache's dtype."""
    if kv_type.storage.is_floating_point and kv_type.storage.itemsize == 1:  # fp8: saturate, never NaN
        limit = torch.finfo(kv_type.storage).max
        return x.clamp(-limit, limit).to(kv_type.storage)
    return x.to(kv_type.storage)


def store(cache: CacheSide, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """x: fp32 [tokens, kv_heads, head_dim] into the flat cache slots ``slot_mapping``."""
    if isinstance(cache, ScaledKV):
        values, scales = _quantize(x, cache)
        cache.values.view(-1, *cache.values.shape[2:]).index_copy_(0, slot_mapping, values)
        cache.scales.view(-1, *cache.scales.shape[2:]).index_copy_(0, slot_mapping, scales)
        return
    rows = _encode_float(_BY_TORCH_DTYPE[cache.dtype], x)
    if cache.dtype.itemsize == 1:  # fp8: torch copies and indexes it only as bytes
        cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, rows)


def gather(cache: CacheSide, blocks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The blocks ``blocks`` (any index shape) read back: ``[*blocks.shape, block_size, kv_heads, head_dim]``."""
    if isinstance(cache, ScaledKV):
        return _dequantize(cache.values[blocks], cache.scales[blocks], cache).to(dtype)
    if cache.dtype.itemsize == 1:  # fp8
        return cache.view(torch.uint8)[blocks].view(cache.dtype).to(dtype)
    return cache[blocks].to(dtype)


def gather_stored(cache: CacheSide, blocks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """As ``gather``, but a rotated side's heads come back as stored: still rotated and (calibrated)
    normalized, for attention that folds the rotation and statistics into its queries and outputs."""
    if isinstance(cache, ScaledKV):
        return _dequantize_stored(cache.values[blocks], cache.scales[blocks]).to(dtype)
    return gather(cache, blocks, dtype)
