"""Hands out fixed-size KV blocks by id and takes them back, with reference counts.

A block shared by several sequences (a common prompt prefix) is freed only
when its last user lets go of it. Free blocks form a stack: the most recently
freed is handed out first, so a server keeps reusing blocks whose pages are
already resident (and likely cached) instead of faulting in fresh ones.
"""

from __future__ import annotations

from cholla.errors import ChollaError


class OutOfBlocksError(ChollaError):
    """No free KV block is left; the scheduler preempts before this can reach a user."""


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_ids: list[int] = list(reversed(range(num_blocks)))  # a stack: block 0 on top

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def allocate(self) -> int:
        if not self.free_ids:
            raise OutOfBlocksError("the KV cache is full")
        block = self.free_ids.pop()
        self.ref_counts[block] = 1
        return block

    def share(self, block: int) -> None:
        self.ref_counts[block] += 1

    def free(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"block {block} freed twice")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_ids.append(block)
