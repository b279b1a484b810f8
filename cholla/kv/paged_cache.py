"""The KV cache itself: per layer, its cache tensors cut into fixed-size blocks.

What a layer keeps per token is its geometry (``layer_token_shapes``): K and V
``[num_kv_heads, head_dim]`` for ordinary attention, one latent
``[1, kv_lora_rank + rope_dim]`` for multi-head latent attention. Each tensor is
``[num_blocks, block_size, *token_shape]``. Token ``t`` of a sequence lives in block
``block_table[t // block_size]`` at offset ``t % block_size``; its flat slot is
``block * block_size + offset``, the same in every layer.
"""

from __future__ import annotations

import math

import torch

from cholla.heap import mapped_zeros
from cholla.models.config import ModelConfig

DEFAULT_BLOCK_SIZE = 16


def layer_token_shapes(config: ModelConfig) -> list[tuple[tuple[int, ...], ...]]:
    """Per layer, the per-token shape of each of its cache tensors."""
    if config.mla is not None:
        return [((1, config.mla.kv_lora_rank + config.mla.qk_rope_head_dim),)] * config.num_layers
    return [((config.num_kv_heads, config.head_dim),) * 2] * config.num_layers


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return sum(math.prod(shape) for layer in layer_token_shapes(config) for shape in layer) * dtype.itemsize


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return bytes_per_token(config, dtype) * block_size


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
        self.layers = [tuple(_zeros((num_blocks, block_size, *shape), dtype, device) for shape in layer)
                       for layer in layer_token_shapes(config)]

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
        return sum(t.nbytes for layer in self.layers for t in layer)
