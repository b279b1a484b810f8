"""The state cache's slots: how a memory budget is split between them and the KV blocks, and the
scheduler handing them out (admission needs blocks and a slot; finish, abort and preemption free it)."""

from __future__ import annotations

import math

import pytest

from cholla.engine.request import Request, RequestStatus
from cholla.engine.scheduler import Scheduler, SchedulerConfig
from cholla.kv.block_manager import BlockManager
from cholla.kv.kv_types import kv_cache_type
from cholla.kv.paged_cache import PagedKVCache, plan_layout
from cholla.kv.state_cache import (SlotAllocator, StateCache, StateSnapshots, state_bytes_per_sequence,
                                   state_slots_for, state_snapshots_for)
from cholla.models.config import FULL_ATTENTION, MAMBA, SHORT_CONV, ModelConfig
from cholla.sampling.params import SamplingParams

F32 = kv_cache_type("f32")


def _config(layer_types: list[str], state_shapes) -> ModelConfig:
    return ModelConfig(architecture="test", vocab_size=100, hidden_size=64, intermediate_size=128,
                       num_layers=len(layer_types), num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                       max_position_embeddings=1024, layer_types=layer_types, state_shapes=state_shapes)


def _hybrid() -> ModelConfig:
    """Two short-conv layers (a [64, 2] conv state each) around one attention layer."""
    return _config([SHORT_CONV, FULL_ATTENTION, SHORT_CONV], [((64, 2),), (), ((64, 2),)])


def test_budget_split_between_slots_and_blocks():
    config = _hybrid()
    slot_bytes = 2 * 64 * 2 * 4
    block_bytes = 16 * 2 * 2 * 16 * 4  # one attention layer's K and V, 16 tokens
    assert state_bytes_per_sequence(config) == slot_bytes
    # Plenty of memory: one slot per seat, snapshots for prefix caching (4 per seat at most), the blocks the rest.
    layout = plan_layout(config, 2**20, 16, F32, F32, 256, max_num_seqs=8)
    assert (layout.num_slots, layout.slot_bytes, layout.block_bytes) == (8, slot_bytes, block_bytes)
    assert layout.num_snapshots == 32 and layout.snapshot_nbytes == 32 * slot_bytes
    assert layout.num_blocks == (2**20 - 40 * slot_bytes) // block_bytes
    off = plan_layout(config, 2**20, 16, F32, F32, 256, max_num_seqs=8, prefix_caching=False)
    assert off.num_snapshots == 0 and off.num_blocks == (2**20 - 8 * slot_bytes) // block_bytes
    # Snapshots take at most a tenth of the budget, and none where not one fits there.
    assert state_snapshots_for(config, 64 * slot_bytes, 8, 8) == 6
    assert state_snapshots_for(config, 9 * slot_bytes, 3, 8) == 0
    assert layout.max_concurrency == 8  # the slots bind, not the tokens
    # Little memory: the slots take at most half of it.
    small = 7 * slot_bytes
    assert state_slots_for(config, small, 8) == 3
    layout = plan_layout(config, small, 16, F32, F32, 16, max_num_seqs=8)
    assert layout.num_slots == 3 and layout.num_snapshots == 0
    assert layout.num_blocks == (small - 3 * slot_bytes) // block_bytes
    assert layout.max_concurrency == min(3, layout.num_tokens / 16)
    # The engine allocates exactly that.
    assert PagedKVCache(config, layout.num_blocks).nbytes == layout.nbytes
    assert StateCache(config, layout.num_slots).nbytes == layout.state_nbytes == 3 * slot_bytes


def test_a_model_without_attention_has_free_blocks_that_only_count_tokens():
    config = _config([MAMBA, MAMBA], [((32, 3), (4, 8, 8)), ((32, 3), (4, 8, 8))])
    per_sequence = 2 * (32 * 3 + 4 * 8 * 8) * 4
    layout = plan_layout(config, 10 * per_sequence, 16, F32, F32, None, max_num_seqs=64)
    assert layout.block_bytes == 0 and layout.nbytes == 0
    assert layout.num_slots == 10  # the whole budget: no KV blocks to share it with
    assert layout.max_model_len == 1024 and layout.num_blocks == 10 * 1024 // 16
    assert layout.max_concurrency == 10 and math.isinf(layout.tokens_per_gib)
    assert PagedKVCache(config, layout.num_blocks).nbytes == 0


def test_slot_allocator_reuses_the_last_freed_and_refuses_a_double_free():
    slots = SlotAllocator(3)
    taken = [slots.allocate() for _ in range(3)]
    assert sorted(taken) == [0, 1, 2] and slots.allocate() is None and slots.num_free == 0
    slots.free(taken[1])
    assert slots.allocate() == taken[1]
    slots.free(taken[0])
    with pytest.raises(RuntimeError):
        slots.free(taken[0])


def _run(scheduler: Scheduler, requests: list[Request], max_tokens: int, on_step=None) -> None:
    """Drive the scheduler as the engine does, without a model: each step's tokens count as
    computed, and a request whose prompt is done gets one output token per step."""
    for request in requests:
        scheduler.add(request)
    while scheduler.has_work():
        batch = scheduler.schedule()
        assert not batch.is_empty
        running_slots = [r.state_slot for r in scheduler.running]
        assert None not in running_slots and len(set(running_slots)) == len(running_slots)
        assert all(r.state_slot is None for r in scheduler.waiting)
        for request, n in zip(batch.requests, batch.num_tokens):
            request.num_computed_tokens += n
            if request.num_computed_tokens == request.num_tokens:
                request.output_token_ids.append(7)
                if len(request.output_token_ids) == max_tokens:
                    scheduler.finish(request, "length")
        if on_step is not None:
            on_step(batch)


def test_scheduler_admits_only_with_a_free_slot_and_frees_it_on_finish_abort_and_preemption():
    blocks, slots = BlockManager(64, 4, enable_prefix_caching=False), SlotAllocator(3)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=64), blocks,
                          state_slots=slots)
    requests = [Request(str(i), list(range(1, 6 + i)), SamplingParams(max_tokens=5)) for i in range(7)]
    most = []
    _run(scheduler, requests, 5, lambda batch: most.append(len(scheduler.running)))
    assert max(most) == 3  # three slots, though eight seats and blocks for more
    assert all(r.status == RequestStatus.FINISHED and len(r.output_token_ids) == 5 for r in requests)
    assert slots.num_free == 3 and blocks.num_free_blocks == 64
    # Abort: a running request's slot comes back at once, a waiting one never had any.
    running, waiting = Request("a", [1, 2, 3], SamplingParams()), Request("b", [1, 2], SamplingParams())
    scheduler.add(running)
    scheduler.schedule()
    scheduler.add(waiting)
    assert running.state_slot is not None and slots.num_free == 2
    scheduler.finish(running, "abort"), scheduler.finish(waiting, "abort")
    assert slots.num_free == 3 and blocks.num_free_blocks == 64 and running.state_slot is None
    # Preemption: too few blocks for all; the preempted give their slots back and are recomputed from 0.
    blocks = BlockManager(6, 4, enable_prefix_caching=False)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=64), blocks,
                          state_slots=slots)
    requests = [Request(str(i), list(range(1, 8)), SamplingParams(max_tokens=8)) for i in range(3)]
    preempted = []

    def check(batch):
        assert all(r.state_slot is None and r.num_computed_tokens == 0 for r in batch.preempted)
        preempted.extend(batch.preempted)

    _run(scheduler, requests, 8, check)
    assert preempted
    assert all(len(r.output_token_ids) == 8 for r in requests)
    assert slots.num_free == 3 and blocks.num_free_blocks == 6


def test_snapshots_copy_whole_slots_and_evict_the_least_recently_used():
    config = _hybrid()
    live = StateCache(config, 2)
    snapshots = StateSnapshots(live, config, 2)
    for value, slot in ((1.0, 0), (2.0, 1)):
        for layer in live.layers:
            for state in layer:
                state[slot].fill_(value)
    snapshots.save(101, 0)
    snapshots.save(102, 1)
    snapshots.restore(101, 1)  # 101 now the most recently used
    assert all(float(state[1].min()) == float(state[1].max()) == 1.0 for layer in live.layers for state in layer)
    snapshots.save(103, 0)  # evicts 102
    assert 101 in snapshots and 103 in snapshots and 102 not in snapshots
    assert (snapshots.saved, snapshots.restored) == (3, 1)


def test_prefix_match_stops_at_the_last_block_with_a_snapshot_and_chunks_end_on_boundaries():
    config = _hybrid()
    live = StateCache(config, 2)
    snapshots = StateSnapshots(live, config, 4)
    blocks = BlockManager(16, 4)
    first = Request("a", list(range(1, 15)), SamplingParams(max_tokens=1))  # 14 tokens: 3 full blocks before the last
    blocks.allocate(first.blocks, 14)
    blocks.cache_full_blocks(first.blocks, first.all_token_ids, 12)
    snapshots.save(first.blocks.block_hashes[0], 0)  # a snapshot after block 0 only
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=6, max_model_len=64), blocks,
                          state_slots=SlotAllocator(2), snapshots=snapshots)
    second = Request("b", list(range(1, 15)), SamplingParams(max_tokens=1))
    scheduler.add(second)
    batch = scheduler.schedule()
    # Three blocks are cached but only the first has a state: resume at 4, restored, a chunk to 8 (not 10).
    assert second.num_computed_tokens == 4 and second.num_cached_prompt_tokens == 4 and snapshots.restored == 1
    assert batch.num_tokens == [4] and blocks.prefix_hits == 1
    second.num_computed_tokens += 4
    assert scheduler.schedule().num_tokens == [4]  # 8 -> 12, the prompt's last full block: not 8 -> 13
    second.num_computed_tokens += 4
    assert scheduler.schedule().num_tokens == [2]
