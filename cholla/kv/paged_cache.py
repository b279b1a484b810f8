"""The KV cache itself: per layer, K and V tensors cut into fixed-size blocks.

Shape per layer: ``[num_blocks, block_size, num_kv_heads, head_dim]``. Token
``t`` of a sequence lives in block ``block_table[t // block_size]`` at offset
``t % block_size``; its flat slot is ``block * block_size + offset``. K and V
may hold different types (``cholla/kv/kv_types.py``: llama.cpp's
``--cache-type-k/-v``).

Every layer gets the same number of blocks, sliding-window layers included:
one block table serves all layers (``cholla plan`` shows what a window-aware
allocation would save).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cholla.heap import mapped_zeros
from cholla.kv.kv_types import CacheSide, KVCacheType, allocate, kv_cache_type
from cholla.models.config import ModelConfig

DEFAULT_BLOCK_SIZE = 16


def bytes_per_token(config: ModelConfig, k_type: KVCacheType | torch.dtype,
                    v_type: KVCacheType | torch.dtype | None = None) -> int:
    """Bytes one token's keys and values take in every layer (scales included)."""
    k_type = kv_cache_type(k_type)
    v_type = kv_cache_type(v_type) if v_type is not None else k_type
    per_layer = config.num_kv_heads * (k_type.bytes_per_head(config.head_dim) + v_type.bytes_per_head(config.head_dim))
    return config.num_layers * per_layer


def bytes_per_block(config: ModelConfig, block_size: int, k_type: KVCacheType | torch.dtype,
                    v_type: KVCacheType | torch.dtype | None = None) -> int:
    return bytes_per_token(config, k_type, v_type) * block_size


@dataclass
class KVCacheLayout:
    """How a memory budget becomes blocks: what the engine allocates and logs, and ``cholla plan`` shows."""

    block_size: int
    block_bytes: int
    num_blocks: int
    max_model_len: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def max_concurrency(self) -> float:
        """Full-context requests that fit at once (the engine's log line)."""
        return self.num_tokens / self.max_model_len

    @property
    def tokens_per_gib(self) -> float:
        return 2**30 / (self.block_bytes / self.block_size)


def plan_layout(config: ModelConfig, memory_bytes: int, block_size: int, k_type: KVCacheType,
                v_type: KVCacheType, max_model_len: int | None = None) -> KVCacheLayout:
    """Blocks for ``memory_bytes``; the context defaults to the model's, capped by what the cache holds."""
    block_bytes = bytes_per_block(config, block_size, k_type, v_type)
    num_blocks = memory_bytes // block_bytes
    max_len = max_model_len or min(config.max_position_embeddings, num_blocks * block_size)
    return KVCacheLayout(block_size, block_bytes, num_blocks, max_len)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """A zeroed cache tensor. On CPU an anonymous memory map (``heap.mapped_zeros``):
    memory is only resident once blocks are written, so a large budget does not
    cost its full size in RSS up front. Zeros matter: padded decode reads touch
    unwritten slots, and masked garbage could be NaN."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return mapped_zeros(shape, dtype)


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 dtype: KVCacheType | torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 v_dtype: KVCacheType | torch.dtype | None = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k_type = kv_cache_type(dtype)
        self.v_type = kv_cache_type(v_dtype) if v_dtype is not None else self.k_type
        for kv_type in (self.k_type, self.v_type):
            kv_type.check(config.head_dim)

        def side(kv_type: KVCacheType) -> CacheSide:
            return allocate(kv_type, num_blocks, block_size, config.num_kv_heads, config.head_dim,
                            lambda shape, dtype: _zeros(shape, dtype, device))

        self.layers = [(side(self.k_type), side(self.v_type)) for _ in range(config.num_layers)]

    @classmethod
    def from_memory_budget(cls, config: ModelConfig, memory_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE,
                           dtype: KVCacheType | torch.dtype = torch.float32, device: str | torch.device = "cpu",
                           v_dtype: KVCacheType | torch.dtype | None = None) -> "PagedKVCache":
        num_blocks = max(1, memory_bytes // bytes_per_block(config, block_size, dtype, v_dtype))
        return cls(config, num_blocks, block_size, dtype, device, v_dtype)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)
