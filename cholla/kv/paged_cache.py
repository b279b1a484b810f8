"""The KV cache itself: per layer, K and V tensors cut into fixed-size blocks.

Shape per layer: ``[num_blocks, block_size, num_kv_heads, head_dim]``. Token
``t`` of a sequence lives in block ``block_table[t // block_size]`` at offset
``t % block_size``; its flat slot is ``block * block_size + offset``.
"""

from __future__ import annotations

import torch

from cholla.heap import mapped_zeros
from cholla.models.config import ModelConfig

DEFAULT_BLOCK_SIZE = 16


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize
    return per_token * block_size


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
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.layers = [(_zeros(shape, dtype, device), _zeros(shape, dtype, device)) for _ in range(config.num_layers)]

    @classmethod
    def from_memory_budget(cls, config: ModelConfig, memory_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE,
                           dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "PagedKVCache":
        num_blocks = max(1, memory_bytes // bytes_per_block(config, block_size, dtype))
        return cls(config, num_blocks, block_size, dtype, device)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)
