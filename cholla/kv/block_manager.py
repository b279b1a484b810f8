"""Which KV blocks each sequence owns, and the prefix cache that lets sequences share them.

Prefix caching: a full block is named by a hash chained over the previous
block's hash and its own token ids, so the hash of block ``i`` stands for the
whole prefix up to it and finding a cached prefix is a dictionary lookup per
block. Blocks whose last user finished stay cached (least recently used
first out) until a new allocation needs the memory. With a disk tier
(``disk_tier.py``) an evicted block goes to a file instead of being forgotten,
and a prefix that misses in memory is read back from there.

The hash is a BLAKE2b digest, not Python's ``hash()``: that of ``None`` (the
first block's parent) differs between processes before Python 3.12, and files
written by one process must be found by the next.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cholla.kv.block_allocator import BlockAllocator

if TYPE_CHECKING:  # (the tier pulls in torch; this module stays light)
    from cholla.kv.disk_tier import DiskTier


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
    """A 128-bit name for the prefix ending with ``tokens``, the same in every process."""
    digest = hashlib.blake2b(b"" if parent is None else parent.to_bytes(16, "little"), digest_size=16)
    digest.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return int.from_bytes(digest.digest(), "little")


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 disk: DiskTier | None = None):
        self.block_size = block_size
        self.disk = disk  # where evicted cached blocks go, and prefix misses are looked up next
        self._evicted: list[tuple[CachedBlock, int]] = []  # taken from the LRU, bytes not yet copied to disk
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
            if self.disk is not None:
                self._evicted.append((info, block))
            self.allocator.ref_counts[block] = 0
            self.allocator.free_ids.append(block)
        return self.allocator.allocate()

    def _offload_evicted(self) -> None:
        """Hand evicted blocks to the disk tier; before anything writes into them."""
        if self._evicted:
            self.disk.save([(info.hash, info.tokens) for info, _ in self._evicted], [b for _, b in self._evicted])
            self._evicted.clear()

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
        if self.disk is not None and resumable is None:  # the disk keeps no state snapshots
            self._load_from_disk(seq, token_ids, usable)
        return len(seq.block_table) * self.block_size

    def _disk_candidates(self, token_ids: list[int], start: int, parent: int | None,
                         limit: int) -> list[tuple[int, tuple[int, ...]]]:
        """(hash, tokens) of the blocks from ``start`` on that are on disk and not in memory, up to ``limit``."""
        found = []
        for i in range(start, limit):
            tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(parent, tokens)
            if h in self.cached or not self.disk.contains(h):
                break
            found.append((h, tokens))
            parent = h
        return found

    def _load_from_disk(self, seq: SequenceBlocks, token_ids: list[int], usable: int) -> None:
        """Extend a prefix match with blocks read back from the disk tier, as many as free blocks allow."""
        start = len(seq.block_table)
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        candidates = self._disk_candidates(token_ids, start, parent, min(usable, start + self.num_free_blocks))
        if not candidates:
            return
        blocks = [self._take_block() for _ in candidates]
        self._offload_evicted()
        loaded = self.disk.load(candidates, blocks)
        for (h, tokens), block in zip(candidates[:loaded], blocks):
            self.cached[h] = block
            self.block_info[block] = CachedBlock(h, tokens)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        for block in blocks[loaded:]:
            self.allocator.free(block)

    def prefetch(self, token_ids: list[int]) -> None:
        """Start reading the disk blocks a queued prompt will want (it may wait a few steps)."""
        if self.disk is not None and self.enable_prefix_caching:
            usable = (len(token_ids) - 1) // self.block_size
            start = 0
            parent = None
            while start < usable:  # skip the part cached in memory
                tokens = tuple(token_ids[start * self.block_size : (start + 1) * self.block_size])
                h = chain_hash(parent, tokens)
                if h not in self.cached:
                    break
                parent, start = h, start + 1
            self.disk.prefetch([h for h, _ in self._disk_candidates(token_ids, start, parent, usable)])

    def offload_cached(self) -> None:
        """Write every cached block that is only in memory to the disk tier, least recently used first
        (the engine closing: a restart finds them there)."""
        if self.disk is None:
            return
        blocks = list(self.evictable) + [b for b in self.block_info if b not in self.evictable]
        self.disk.save([(self.block_info[b].hash, self.block_info[b].tokens) for b in blocks], blocks, wait=True)

    def allocate(self, seq: SequenceBlocks, num_tokens: int) -> bool:
        """Grow ``seq`` to hold ``num_tokens`` tokens; False (and no change) if memory is short."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed == 0:  # a decoding sequence's step, 15 of 16 times: nothing to take or hand to the disk
            return True
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_block())
        if self._evicted:
            self._offload_evicted()
        return True

    def fills_block(self, seq: SequenceBlocks, num_computed: int) -> bool:
        """Whether ``num_computed`` tokens fill a block ``cache_full_blocks`` has not registered yet
        (a caller can skip building the token list on the steps where none did)."""
        return self.enable_prefix_caching and (len(seq.block_hashes) + 1) * self.block_size <= num_computed

    def cache_full_blocks(self, seq: SequenceBlocks, token_ids: list[int], num_computed: int) -> None:
        """Register blocks that became full (and computed) so later requests can reuse them."""
        while self.fills_block(seq, num_computed):
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
