"""The paged KV cache's memory: zeroed, yet resident only where blocks are written."""

from __future__ import annotations

import platform

import pytest
import torch

from cholla.heap import keep_buffers_mapped, release_free_memory
from cholla.kv.paged_cache import PagedKVCache, bytes_per_block
from cholla.models.config import ModelConfig


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_cache_pages_become_resident_only_when_written():
    config = ModelConfig(architecture="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                         max_position_embeddings=64)
    num_blocks = 2**30 // bytes_per_block(config, 16, torch.float32)  # a 1 GiB budget
    before = _resident_bytes()
    cache = PagedKVCache(config, num_blocks)
    assert cache.nbytes >= 2**30 - bytes_per_block(config, 16, torch.float32)
    assert _resident_bytes() - before < 64 * 2**20
    k, v = cache.layers[0]
    assert k.dtype == torch.float32 and k.shape == (num_blocks, 16, 2, 16)
    assert not k[-1].any() and not v[num_blocks // 2].any()  # reads as zeros all the same
    k[:64] = 1.0  # written blocks are ordinary memory
    assert k[:64].sum().item() == 64 * 16 * 2 * 16


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's heap")
def test_cache_stays_unwritten_where_freed_heap_memory_was_trimmed():
    """The engine trims the heap after loading; a cache carved from that freed (but still
    listed) heap memory by ``calloc`` would be zeroed, so resident, all at once."""
    keep_buffers_mapped()
    pieces = [(torch.ones(2**21), torch.ones(2**14)) for _ in range(16)]  # 8 MiB (heap, not maps), 64 KiB
    kept = [small for _, small in pieces]  # live between the freed 8 MiB holes: they cannot merge away
    del pieces
    assert release_free_memory()
    config = ModelConfig(architecture="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
                         num_layers=8, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                         max_position_embeddings=64)
    before = _resident_bytes()
    cache = PagedKVCache(config, (64 * 2**20) // bytes_per_block(config, 16, torch.float32))  # 4 MiB per tensor
    assert _resident_bytes() - before < 8 * 2**20
    assert not cache.layers[3][1].any()
    del kept
