"""cholla.heap: a freed activation buffer stays mapped for the next layer instead of going back to the OS."""

from __future__ import annotations

import platform

import pytest
import torch

from cholla.heap import keep_buffers_mapped, release_free_memory

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
