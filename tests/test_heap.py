"""cholla.heap: a freed activation buffer stays mapped for the next layer instead of going back to the OS."""

from __future__ import annotations

import platform

import pytest
import torch

from cholla.heap import HUGE_PAGE, keep_buffers_mapped, mapped_zeros, release_free_memory
from cholla.kv.paged_cache import _zeros

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


def _resident_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_freed_activation_buffer_stays_mapped():
    """By default glibc unmaps a freed 24 MiB block at once (and the next one faults its pages in again)."""
    assert keep_buffers_mapped()
    buffer = torch.empty(6 * 2**20).fill_(1.0)  # 24 MiB, a 2048 x 3072 fp32 prefill activation
    touched = _resident_kib()
    del buffer
    assert touched - _resident_kib() < 4 * 1024, "the freed buffer went back to the OS"


def test_freed_heap_memory_goes_back_when_released():
    """What loading frees (the tokenizer's lists) would otherwise stay resident with trimming off."""
    assert keep_buffers_mapped()
    scratch = [torch.ones(2**16) for _ in range(512)]  # 128 MiB in 256 KiB pieces: heap memory, not maps
    del scratch
    held = _resident_kib()
    assert release_free_memory()
    assert held - _resident_kib() > 64 * 1024


def _transparent_huge_pages() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping that holds ``address`` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def test_a_huge_page_map_starts_on_a_boundary_and_holds_zeros():
    """The KV cache's tensors (paged_cache._zeros): zeros, on a 2 MiB boundary, the shape asked for."""
    cache = _zeros((5, 16, 1, 256), torch.bfloat16, "cpu")
    assert cache.data_ptr() % HUGE_PAGE == 0 and cache.shape == (5, 16, 1, 256)
    assert cache.is_contiguous() and not cache.any()
    small = mapped_zeros((3,), torch.float32)  # without huge pages: the map as it comes
    assert not small.any()


@pytest.mark.skipif(_transparent_huge_pages() == "never", reason="the kernel gives no transparent huge pages")
def test_written_cache_memory_is_backed_by_huge_pages():
    """What a step writes into the cache becomes resident as 2 MiB pages, not 4 KiB ones."""
    cache = mapped_zeros((8 * 2**20,), torch.uint8, huge_pages=True)
    cache.fill_(1)
    assert _anon_huge_kib(cache.data_ptr()) >= 2048
