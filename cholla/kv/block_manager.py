"""Which KV blocks each sequence owns, and the prefix cache that lets sequences share them.

Prefix caching: a full block is named by a hash chained over the previous
block's hash and its own token ids, so the hash of block ``i`` stands for the
whole prefix up to it and finding a cached prefix is a dictionary lookup per
block. Blocks whose last user finished stay cached (least recently used
first out) until a new allocation needs the memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from cholla.kv.block_allocator import BlockAllocator


@dataclass
class CachedBlock:
    hash: int
    tokens: tuple[int, ...]  # kept to rule out hash collisions


@dataclass
class SequenceBlocks:
    """The blocks of one sequence, in token order, and how many are full and hashed."""

    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.cached: dict[int, int] = {}  # hash -> block id
        self.block_info: dict[int, CachedBlock] = {}  # block id -> its hash and tokens
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, LRU first
        self.prefix_queries = 0  # blocks looked up
        self.prefix_hits = 0  # blocks found

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can get: truly free plus cached-but-unused."""
        return self.allocator.num_free + len(self.evictable)

    def blocks_needed(self, seq: SequenceBlocks, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _take_block(self) -> int:
        if self.allocator.num_free == 0:
            block, _ = self.evictable.popitem(last=False)
            info = self.block_info.pop(block)
            del self.cached[info.hash]
            self.allocator.ref_counts[block] = 0
            self.allocator.free_ids.append(block)
        return self.allocator.allocate()

    def match_prefix(self, seq: SequenceBlocks, token_ids: list[int],
                     resumable: Callable[[int], bool] | None = None) -> int:
        """Attach the longest cached prefix of ``token_ids`` to an empty sequence.

        Returns how many tokens are already computed. At least one token is
        always left to compute, since the model must produce the next logits.
        With ``resumable`` (a model with recurrent state), the prefix ends at the
        last cached block whose hash it accepts (one with a state snapshot).
        """
        if not self.enable_prefix_caching:
            return 0
        parent = None
        found: list[tuple[int, int]] = []  # (block, hash) of the cached prefix, in order
        keep = 0
        usable = (len(token_ids) - 1) // self.block_size
        for i in range(usable):
            tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(parent, tokens)
            self.prefix_queries += 1
            block = self.cached.get(h)
            if block is None or self.block_info[block].tokens != tokens:
                break
            found.append((block, h))
            if resumable is None or resumable(h):
                keep = len(found)
            parent = h
        self.prefix_hits += keep
        for block, h in found[:keep]:
            if block in self.evictable:
                del self.evictable[block]
                self.allocator.ref_counts[block] = 1
            else:
                self.allocator.share(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        return len(seq.block_table) * self.block_size

    def allocate(self, seq: SequenceBlocks, num_tokens: int) -> bool:
        """Grow ``seq`` to hold ``num_tokens`` tokens; False (and no change) if memory is short."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_block())
        return True

    def cache_full_blocks(self, seq: SequenceBlocks, token_ids: list[int], num_computed: int) -> None:
        """Register blocks that became full (and computed) so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        while (len(seq.block_hashes) + 1) * self.block_size <= num_computed:
            i = len(seq.block_hashes)
            tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached and block not in self.block_info:
                self.cached[h] = block
                self.block_info[block] = CachedBlock(h, tokens)

    def trim(self, seq: SequenceBlocks, num_tokens: int) -> None:
        """Return the blocks past the first ``num_tokens`` tokens (speculated slots that were rejected).

        Only blocks beyond every hashed (full, computed) block can go: they were
        allocated for this step's drafts and never entered the prefix cache.
        """
        keep = max(-(-num_tokens // self.block_size), len(seq.block_hashes))
        while len(seq.block_table) > keep:
            self.allocator.free(seq.block_table.pop())

    def free(self, seq: SequenceBlocks) -> None:
        """Let go of every block; cached ones wait in the LRU, the rest are free at once."""
        for block in reversed(seq.block_table):
            if self.allocator.ref_counts[block] == 1 and block in self.block_info:
                self.allocator.ref_counts[block] = 0
                self.evictable[block] = None
            else:
                self.allocator.free(block)
        seq.block_table.clear()
        seq.block_hashes.clear()

    def reset_prefix_cache(self) -> None:
        for block in list(self.evictable):
            del self.cached[self.block_info.pop(block).hash]
            self.allocator.free_ids.append(block)
        self.evictable.clear()
