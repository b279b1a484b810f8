"""glibc heap settings for inference: keep big activation buffers mapped.

A forward pass allocates and frees the same multi-megabyte activations every
layer (a 512-token prefill: ~4 MB to 25 MB each). By default glibc serves
them with fresh ``mmap`` calls, or trims them off the top of the heap on
free, so every layer pays the kernel's page faults again: a third of a
512-token prefill's time on the 2-core benchmark machine. With the mmap
threshold at its maximum (32 MiB) and trimming off, freed blocks stay in the
heap and later layers reuse most of them (SmolLM2 pp512 2220 -> 2970 t/s;
Gemma 3, 32 sequences, 780 -> 905 t/s). The resident size then stays near its
high-water mark instead of returning to the OS between steps (peak RSS +7 MiB
and +37 MiB).

Loading is the other way round: building Gemma 3's tokenizer frees ~90 MiB of
Python lists and arrays that no step reuses in that shape, and with trimming
off they would stay resident for good. ``release_free_memory`` hands free heap
pages back once, after loading.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import mmap

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (4 * 1024 * 1024 * sizeof(long))
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def _glibc(name: str, argtypes: list, restype):
    """A glibc function through ctypes, or None where the C library lacks it (musl, macOS)."""
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


@functools.cache
def keep_buffers_mapped() -> bool:
    """Applies the settings once per process; False where the C library is not glibc."""
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_free_memory() -> bool:
    """Returns the heap's free pages to the OS (``malloc_trim``); False where the C library is not glibc."""
    malloc_trim = _glibc("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


MADV_HUGEPAGE = 14
HUGE_PAGE = 2 * 1024 * 1024


def mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype, huge_pages: bool = False) -> torch.Tensor:
    """A zeroed CPU tensor in an anonymous memory map of its own. The OS maps its
    pages (zeroed) on first write, so only what is written becomes resident, and
    the memory goes back to the OS with the tensor. (``calloc`` promises the same
    only for fresh memory: reusing freed heap, it zeroes, and so touches, every page.)

    With ``huge_pages`` the tensor starts on a 2 MiB boundary of a map asked for transparent
    huge pages (``madvise``, where the kernel's setting is "madvise" or "always"): what is
    written becomes resident 2 MiB at a time. A paged KV cache wants it: a decode step reads
    its blocks scattered, 8 KiB at a time, and on 4 KiB pages each block costs TLB misses
    (Gemma 3's 32-row decode attention out of cache: ~6% faster, docs/benchmarks.md)."""
    nbytes = math.prod(shape) * dtype.itemsize
    # private: a shared anonymous map is shmem, which the kernel's anonymous huge pages do not serve
    pages = mmap.mmap(-1, max(nbytes, 1) + (HUGE_PAGE if huge_pages else 0), flags=mmap.MAP_PRIVATE)  # kept alive by the tensor
    raw = torch.frombuffer(pages, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE if huge_pages else 0
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            pages.madvise(mmap.MADV_HUGEPAGE)  # advice only: a refusal changes nothing
        except OSError:
            pass
    return raw[start : start + nbytes].view(dtype).view(shape)


def fresh_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty``, for a buffer a step writes whole. One over glibc's mmap threshold is a fresh
    map each time, and its 4 KiB pages' faults cost ~40% of a 2048-row prompt product writing
    58 MB (fp32 gate+up); asked for transparent huge pages (``madvise``, where the kernel's
    setting is "madvise" or "always"), they cost ~5%."""
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * dtype.itemsize
    madvise = _madvise()
    if nbytes > MMAP_THRESHOLD_MAX and madvise is not None:
        start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        end = (out.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
        if end > start:
            madvise(start, end - start, MADV_HUGEPAGE)  # advice only: a refusal changes nothing
    return out


@functools.cache
def _madvise():
    return _glibc("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int)
