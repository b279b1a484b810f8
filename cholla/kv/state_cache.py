"""The second kind of cache: a fixed-size recurrent state per sequence, for hybrid models.

A recurrent layer (Mamba-2, Gated DeltaNet, a short convolution) does not keep
anything per token: it folds the whole prefix into a few tensors of fixed size
(the last ``kernel - 1`` inputs of its causal convolution, and the recurrent
state of its SSM or delta rule). So instead of blocks, the cache is a pool of
*slots*: one per running sequence, each holding every recurrent layer's state
tensors (``ModelConfig.state_shapes``), always in float32 whatever the weights'
dtype, because the state accumulates over the whole sequence.

A sequence takes a slot when it is scheduled and gives it back when it ends or
is preempted; its prefill's first chunk starts from a zeroed slot (the runner
resets it), later chunks and decode steps update it in place.

How many slots: the engine's KV memory budget pays for both caches
(``state_slots_for``). Every running sequence needs one slot, so slots come
first, ``max_num_seqs`` of them, but where the model also has attention they
may take at most half the budget (the KV blocks get the rest, so a model with
large states still holds long contexts); a model without attention gives them
the whole budget.

Prefix caching needs the state too: a cached KV block says nothing of the
recurrent state at its end. So the engine keeps *snapshots* (``StateSnapshots``):
copies of a sequence's whole slot taken when a step leaves it exactly at a block
boundary, keyed by the chained hash of that last full block (``kv/block_manager.py``),
in a second, bounded pool of slots (``state_snapshots_for``: a small share of the
budget), least recently used first out. A new request resumes only at a boundary
where both the KV blocks and a snapshot are cached, its slot filled from the snapshot.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from cholla.models.config import ATTENTION_TYPES, ModelConfig

STATE_DTYPE = torch.float32


def state_bytes_per_sequence(config: ModelConfig) -> int:
    """Bytes one sequence's recurrent states take over all layers (0 for attention-only models)."""
    return sum(math.prod(shape) for layer in config.state_shapes for shape in layer) * STATE_DTYPE.itemsize


# Of the memory budget, the most the state slots may take when attention layers need KV blocks too.
MAX_STATE_SHARE = 0.5


def state_slots_for(config: ModelConfig, memory_bytes: int, max_num_seqs: int) -> int:
    """How many state slots the engine allocates from a ``memory_bytes`` budget (0 without state):
    ``max_num_seqs``, or fewer where they would take more than their share (see the module's docstring)."""
    per_sequence = state_bytes_per_sequence(config)
    if per_sequence == 0:
        return 0
    has_attention = any(kind in ATTENTION_TYPES for kind in config.layer_types)
    share = int(memory_bytes * MAX_STATE_SHARE) if has_attention else memory_bytes
    return max(0, min(max_num_seqs, share // per_sequence))


# Of the budget, the most the prefix cache's state snapshots may take, and at most this many per seat.
SNAPSHOT_SHARE = 0.1
MAX_SNAPSHOTS_PER_SEQ = 4


def state_snapshots_for(config: ModelConfig, memory_bytes: int, num_slots: int, max_num_seqs: int) -> int:
    """How many state snapshots (for prefix caching) the budget keeps beside ``num_slots`` slots:
    at most ``SNAPSHOT_SHARE`` of it, what the slots leave, and ``MAX_SNAPSHOTS_PER_SEQ`` per seat;
    0 without state, or where not one fits (prefix caching is then off for the model)."""
    per_sequence = state_bytes_per_sequence(config)
    if per_sequence == 0 or num_slots == 0:
        return 0
    left = memory_bytes - num_slots * per_sequence
    return max(0, min(MAX_SNAPSHOTS_PER_SEQ * max_num_seqs, int(memory_bytes * SNAPSHOT_SHARE) // per_sequence,
                      left // per_sequence))


class SlotAllocator:
    """Hands out state slots by id; a stack, so a freed slot (its pages resident) is reused first."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.free_ids: list[int] = list(reversed(range(num_slots)))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def allocate(self) -> int | None:
        """A free slot, or None when every slot is taken."""
        return self.free_ids.pop() if self.free_ids else None

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self.free_ids:
            raise RuntimeError(f"state slot {slot} freed twice or never allocated")
        self.free_ids.append(slot)


@dataclass
class LayerCache:
    """What one layer of a model with recurrent layers is handed each step: its KV cache
    sides (empty for a layer without attention) and its state tensors, each
    ``[num_slots, *shape]`` (empty for a layer without state). ``meta.state_slots``
    says which slot each sequence of the step owns."""

    kv: tuple
    state: tuple[torch.Tensor, ...]


class StateCache:
    def __init__(self, config: ModelConfig, num_slots: int, device: str | torch.device = "cpu"):
        self.num_slots = num_slots
        self.layers: list[tuple[torch.Tensor, ...]] = [
            tuple(torch.zeros((num_slots, *shape), dtype=STATE_DTYPE, device=device) for shape in layer)
            for layer in config.state_shapes
        ]

    def reset(self, slots: list[int]) -> None:
        """Zero the states of ``slots``: a sequence whose prefill starts from its first token."""
        if not slots:
            return
        index = torch.tensor(slots, dtype=torch.long)
        for layer in self.layers:
            for state in layer:
                state.index_fill_(0, index.to(state.device), 0.0)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self.layers for t in layer)


def copy_slot(src: StateCache, src_slot: int, dst: StateCache, dst_slot: int) -> None:
    """Every layer's state of ``src_slot`` in ``src`` into ``dst_slot`` of ``dst``."""
    for src_layer, dst_layer in zip(src.layers, dst.layers):
        for a, b in zip(src_layer, dst_layer):
            b[dst_slot].copy_(a[src_slot])


class StateSnapshots:
    """Sequences' states at block boundaries for prefix caching (see the module's docstring):
    block hash -> a slot of its own ``StateCache``, least recently used first out."""

    def __init__(self, live: StateCache, config: ModelConfig, num_snapshots: int):
        self.live = live
        self.cache = StateCache(config, num_snapshots)
        self.by_hash: OrderedDict[int, int] = OrderedDict()
        self.free_ids: list[int] = list(reversed(range(num_snapshots)))
        self.saved = 0
        self.restored = 0

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.by_hash

    def save(self, block_hash: int, slot: int) -> None:
        """Keep the state of live ``slot``, which has computed exactly the prefix ``block_hash`` ends."""
        if block_hash in self.by_hash:  # the same prefix's state, kept already
            self.by_hash.move_to_end(block_hash)
            return
        snapshot = self.free_ids.pop() if self.free_ids else self.by_hash.popitem(last=False)[1]
        copy_slot(self.live, slot, self.cache, snapshot)
        self.by_hash[block_hash] = snapshot
        self.saved += 1

    def restore(self, block_hash: int, slot: int) -> None:
        """Fill live ``slot`` with the state after the prefix ``block_hash`` ends (it must be kept)."""
        snapshot = self.by_hash[block_hash]
        self.by_hash.move_to_end(block_hash)
        copy_slot(self.cache, snapshot, self.live, slot)
        self.restored += 1


def layer_caches(kv_layers: list[tuple], state_cache: StateCache | None) -> list:
    """Per layer, what the model's layers are called with: the KV sides alone for an
    attention-only model (as always), a ``LayerCache`` per layer for a model with state."""
    if state_cache is None:
        return kv_layers
    return [LayerCache(kv, state) for kv, state in zip(kv_layers, state_cache.layers)]
