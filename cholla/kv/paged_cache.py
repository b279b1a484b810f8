"""The KV cache itself: per layer, its cache tensors cut into fixed-size blocks.

What a layer keeps per token is its geometry (``layer_token_shapes``): K and V
``[num_kv_heads, head_dim]`` for ordinary attention, one latent
``[1, kv_lora_rank + rope_dim]`` for multi-head latent attention (whose V is a
view of the latent's first ``kv_lora_rank`` columns). Each side is
``[num_blocks, block_size, *token_shape]`` in its type (``cholla/kv/kv_types.py``:
K and V may differ, llama.cpp's ``--cache-type-k/-v``). Token ``t`` of a sequence
lives in block ``block_table[t // block_size]`` at offset ``t % block_size``; its
flat slot is ``block * block_size + offset``, the same in every layer.

Every layer gets the same number of blocks, sliding-window layers included:
one block table serves all layers (``cholla plan`` shows what a window-aware
allocation would save).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cholla.errors import InvalidRequestError
from cholla.heap import mapped_zeros
from cholla.kv.kv_types import KV_CACHE_TYPES, CacheSide, KVCacheType, ScaledKV, allocate, kv_cache_type
from cholla.kv.state_cache import state_bytes_per_sequence, state_slots_for, state_snapshots_for
from cholla.models.config import ATTENTION_TYPES, ModelConfig

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_SEQS = 64  # the engine's default cap on running sequences (and so on state slots)


def layer_token_shapes(config: ModelConfig) -> list[tuple[tuple[int, int], ...]]:
    """Per layer, the per-token shape ``(heads, dim)`` of each of its cache sides: (K, V) (Gemma 4's
    global layers have their own), the one latent, or none for a layer without attention (a hybrid
    model's recurrent and MLP-only layers) or one that reads another layer's cache (Gemma 4's KV sharing)."""
    if config.mla is not None:
        latent = ((1, config.mla.kv_lora_rank + config.mla.qk_rope_head_dim),)
        return [latent if kind in ATTENTION_TYPES else () for kind in config.layer_types]
    return [(config.layer_attention(i),) * 2 if kind in ATTENTION_TYPES and config.kv_producer(i) == i else ()
            for i, kind in enumerate(config.layer_types)]


def _types(k_type: KVCacheType | torch.dtype, v_type: KVCacheType | torch.dtype | None) -> tuple[KVCacheType, ...]:
    k_type = kv_cache_type(k_type)
    return k_type, kv_cache_type(v_type) if v_type is not None else k_type


def fit_kv_types(config: ModelConfig, k_type: KVCacheType, v_type: KVCacheType) -> tuple[KVCacheType, KVCacheType]:
    """The types this model's cache stores for the ones asked for: a latent cache has no per-head
    keys to center, so ``fp8`` (``fp8_e4m3_centered``) is stored there as plain e4m3, as vLLM does."""
    if config.mla is None:
        return k_type, v_type
    plain = KV_CACHE_TYPES["fp8_e4m3_plain"]
    return tuple(plain if t.name == "fp8_e4m3_centered" else t for t in (k_type, v_type))


def check_kv_types(config: ModelConfig, k_type: KVCacheType, v_type: KVCacheType) -> None:
    """Refuse, before anything is allocated, K and V types this model's cache cannot hold.

    A latent cache is one tensor read as K and (a view) as V, so it takes one type,
    and a plain one: the scaled types' groups would straddle the latent and rope parts."""
    if config.mla is not None:
        if k_type != v_type:
            raise InvalidRequestError(f"multi-head latent attention keeps keys and values in one latent cache: "
                                      f"give one KV cache type for both, not K {k_type.name} and V {v_type.name}")
        if k_type.group is not None:
            raise InvalidRequestError(f"kv cache type {k_type.name} is not supported for multi-head latent attention "
                                      "yet; choose f32, bf16, f16 or fp8 (stored as plain e4m3 there)")
    for heads_dims in set(layer_token_shapes(config)):
        for (_, dim), kv_type in zip(heads_dims, (k_type, v_type)):
            kv_type.check(dim)


def layer_bytes_per_token(config: ModelConfig, k_type: KVCacheType | torch.dtype,
                          v_type: KVCacheType | torch.dtype | None = None,
                          block_size: int = DEFAULT_BLOCK_SIZE) -> list[int | float]:
    """Per layer, the bytes one token's cache entries take (scales included): a latent layer counts its latent.
    ``q4_kivi``'s per-block key statistics are shared by ``block_size`` tokens (a fraction where it does not divide)."""
    types = _types(k_type, v_type)
    return [sum(heads * kv_type.bytes_per_head(dim, side == 0, block_size)
                for side, ((heads, dim), kv_type) in enumerate(zip(layer, types)))
            for layer in layer_token_shapes(config)]


def bytes_per_token(config: ModelConfig, k_type: KVCacheType | torch.dtype,
                    v_type: KVCacheType | torch.dtype | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> int | float:
    """Bytes one token's keys and values take in every layer (scales included)."""
    return sum(layer_bytes_per_token(config, k_type, v_type, block_size))


def bytes_per_block(config: ModelConfig, block_size: int, k_type: KVCacheType | torch.dtype,
                    v_type: KVCacheType | torch.dtype | None = None) -> int:
    return round(bytes_per_token(config, k_type, v_type, block_size) * block_size)


def open_slots_for(max_num_seqs: int, num_blocks: int) -> int:
    """q4_kivi's open key blocks kept in bf16 (``kv_types.OpenBlocks``): two per running sequence
    (its last block, and the next when a step's tokens cross into it), at most every block."""
    return min(2 * max_num_seqs, num_blocks)


def open_block_bytes(config: ModelConfig, block_size: int, k_type: KVCacheType | torch.dtype,
                     num_slots: int) -> int:
    """What ``num_slots`` open slots of q4_kivi keys take in every layer (0 for other key types)."""
    if not kv_cache_type(k_type).channel_keys:
        return 0
    return sum(num_slots * block_size * layer[0][0] * layer[0][1] * 2 for layer in layer_token_shapes(config) if layer)


@dataclass
class KVCacheLayout:
    """How a memory budget becomes blocks and state slots: what the engine allocates and logs,
    and ``cholla plan`` shows. A model without attention has blocks that cost nothing
    (``block_bytes`` 0): they only count tokens, enough for every slot at full context."""

    block_size: int
    block_bytes: int
    num_blocks: int
    max_model_len: int
    num_slots: int = 0  # models with recurrent layers: sequences whose states fit (kv/state_cache.py)
    slot_bytes: int = 0  # state bytes per sequence
    num_snapshots: int = 0  # prefix caching for a model with state: slots' snapshots at block boundaries

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        """The KV blocks' bytes (the state slots' are ``state_nbytes``)."""
        return self.num_blocks * self.block_bytes

    @property
    def state_nbytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def snapshot_nbytes(self) -> int:
        return self.num_snapshots * self.slot_bytes

    @property
    def max_concurrency(self) -> float:
        """Full-context requests that fit at once (the engine's log line): in the KV blocks and,
        for a model with state, in the slots too."""
        by_tokens = self.num_tokens / self.max_model_len
        return min(by_tokens, self.num_slots) if self.slot_bytes else by_tokens

    @property
    def tokens_per_gib(self) -> float:
        return 2**30 / (self.block_bytes / self.block_size) if self.block_bytes else math.inf


def plan_layout(config: ModelConfig, memory_bytes: int, block_size: int, k_type: KVCacheType,
                v_type: KVCacheType, max_model_len: int | None = None,
                max_num_seqs: int = DEFAULT_MAX_NUM_SEQS, prefix_caching: bool = True) -> KVCacheLayout:
    """Slots and blocks for ``memory_bytes``; the context defaults to the model's, capped by what the cache holds.
    State slots are taken first (``state_slots_for``), then with prefix caching their snapshots
    (``state_snapshots_for``), the KV blocks get what they leave."""
    check_kv_types(config, k_type, v_type)
    block_bytes = bytes_per_block(config, block_size, k_type, v_type)
    memory_bytes -= open_block_bytes(config, block_size, k_type, 2 * max_num_seqs)
    num_slots = state_slots_for(config, memory_bytes, max_num_seqs)
    slot_bytes = state_bytes_per_sequence(config)
    num_snapshots = state_snapshots_for(config, memory_bytes, num_slots, max_num_seqs) if prefix_caching else 0
    if block_bytes == 0:  # no attention layer: blocks only count tokens
        max_len = max_model_len or config.max_position_embeddings
        num_blocks = num_slots * -(-max_len // block_size)
    else:
        num_blocks = (memory_bytes - (num_slots + num_snapshots) * slot_bytes) // block_bytes
        max_len = max_model_len or min(config.max_position_embeddings, num_blocks * block_size)
    return KVCacheLayout(block_size, block_bytes, num_blocks, max_len, num_slots, slot_bytes, num_snapshots)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """A zeroed cache tensor. On CPU an anonymous memory map (``heap.mapped_zeros``):
    memory is only resident once blocks are written, so a large budget does not
    cost its full size in RSS up front (2 MiB at a time: huge pages, for the decode
    attention's scattered block reads). Zeros matter: padded decode reads touch
    unwritten slots, and masked garbage could be NaN."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return mapped_zeros(shape, dtype, huge_pages=True)


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 dtype: KVCacheType | torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 v_dtype: KVCacheType | torch.dtype | None = None, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k_type, self.v_type = _types(dtype, v_dtype)
        check_kv_types(config, self.k_type, self.v_type)
        open_slots = open_slots_for(max_num_seqs, num_blocks)

        def side(kv_type: KVCacheType, key: bool, heads: int, dim: int) -> CacheSide:
            return allocate(kv_type, num_blocks, block_size, heads, dim, lambda shape, dtype: _zeros(shape, dtype, device),
                            key, open_slots)

        self.layers = [tuple(side(kv_type, i == 0, *shape)
                             for i, (shape, kv_type) in enumerate(zip(layer, (self.k_type, self.v_type))))
                       for layer in layer_token_shapes(config)]

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
        return sum(t.nbytes for layer in self.layers for t in layer)

    def copy_slots(self, sources: list[int], destinations: list[int]) -> None:
        """Copy every layer's K and V (values and scales alike) from slot ``sources[i]`` to slot
        ``destinations[i]``, all read before any is written (a speculative tree's accepted path)."""
        src, dst = torch.tensor(sources), torch.tensor(destinations)
        for layer in self.layers:
            for side in layer:
                for t in (side.values, side.scales) if isinstance(side, ScaledKV) else (side,):
                    flat = t.view(self.num_tokens, -1)
                    flat[dst] = flat[src]
