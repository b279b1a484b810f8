"""Decides, each step, which requests run and how many of their tokens.

Continuous batching: running requests decode one token per step; waiting
requests join as soon as there is room, their prompts cut into chunks that fit
the step's token budget (chunked prefill), so a long prompt never stalls the
decodes. When the KV cache runs out, the newest running request is preempted:
its blocks are freed and it goes back to the front of the queue to be
recomputed later (prefix caching usually makes that cheap).

A model with recurrent layers also needs a state slot per running sequence
(``kv/state_cache.py``): a waiting request is admitted only when its blocks and
a free slot are both there; the slot goes back when the request finishes, is
aborted or is preempted (it is then recomputed from its first token, whose
prefill starts from a zeroed slot). With prefix caching such a model resumes a
cached prefix only where a state snapshot was taken (``StateSnapshots``): its
slot is filled from it on admission. Snapshots are taken where a step ends on a
block boundary, so its prefill chunks are cut to end on one (and once at the
prompt's last full block, where a repeat of the prompt would resume).

With a speculator, a decoding request may also carry drafted tokens: it then
runs 1 + K tokens (its last token and the drafts), like a small prefill chunk,
when the budget and free blocks allow, and decodes plainly otherwise. Drafts
never preempt anyone, and a step keeps only the drafts worth their rows' cost
(``speculator.allot`` over ``step_cost``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cholla.engine.request import Request, RequestStatus
from cholla.kv.block_manager import BlockManager
from cholla.kv.state_cache import SlotAllocator, StateSnapshots
from cholla.speculative.speculator import STEP_COST, Speculator, allot
from cholla.speculative.tree import DraftTree


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # the token budget of one step
    max_model_len: int = 8192
    # A step's cost by rows (speculator.STEP_COST): what decides how many drafts a step verifies.
    step_cost: tuple[tuple[int, float], ...] = STEP_COST["bfloat16"]


@dataclass
class ScheduledBatch:
    """Requests to run this step, prefill chunks first, with the token count of each."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    num_prefills: int = 0
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, speculator: Speculator | None = None,
                 state_slots: SlotAllocator | None = None, snapshots: StateSnapshots | None = None):
        self.config = config
        self.block_manager = block_manager
        self.speculator = speculator
        self.state_slots = state_slots  # models with recurrent layers
        self.snapshots = snapshots  # and their prefix cache's states, where it is on
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        if self.speculator is not None:
            self.speculator.observe(request.prompt_token_ids)
        if not request.needs_prompt_logprobs:
            self.block_manager.prefetch(request.all_token_ids)  # disk tier reads start while it waits

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: str) -> None:
        """End a request (stopped, at its length, or aborted) and free its blocks at once."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING and request in self.waiting:
            self.waiting.remove(request)
        if self.speculator is not None and request.status != RequestStatus.FINISHED:
            self.speculator.observe(request.all_token_ids)
        self._release(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = request.finish_reason or reason

    def _release(self, request: Request) -> None:
        """Give back the request's blocks, its state slot and what the speculator keeps for it."""
        self.block_manager.free(request.blocks)
        if self.speculator is not None:
            self.speculator.release(request)
        if request.state_slot is not None:
            self.state_slots.free(request.state_slot)
            request.state_slot = None

    def _preempt(self, request: Request, batch: ScheduledBatch) -> None:
        self.running.remove(request)
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.draft_token_ids, request.draft_parents = [], None
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        batch.preempted.append(request)

    def schedule(self) -> ScheduledBatch:
        steady = self._steady_decodes()
        if steady is not None:
            return steady
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, tuple[Request, int]] = {}  # request id -> (request, new tokens), in order

        # 1. Running requests, oldest first: the rest of their prompt, or one decode token (and drafts).
        # Drafted rows this step may add: up to the cost table's last row (the fused step's limit).
        room = self.config.step_cost[-1][0] - sum(map(_is_decoding, self.running))
        proposals = self._propose(room) if self.speculator is not None and room > 0 else {}
        for request in list(self.running):
            request.draft_token_ids, request.draft_parents = [], None
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted below to make room for an older request
            num_new = self._chunk(request, min(request.num_tokens - request.num_computed_tokens, budget))
            if request.request_id in proposals:
                num_new += self._draft(request, proposals[request.request_id], budget - 1)
            while not self.block_manager.allocate(request.blocks, request.num_computed_tokens + num_new):
                victim = self.running[-1]  # the newest request gives way
                self._preempt(victim, batch)
                if victim.request_id in scheduled:
                    budget += scheduled.pop(victim.request_id)[1]
                if victim is request:
                    break
            else:
                scheduled[request.request_id] = (request, num_new)
                budget -= num_new

        # 2. Waiting requests, first come first served, while budget, seats and blocks allow.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not batch.preempted:
            if self.state_slots is not None and self.state_slots.num_free == 0:
                break
            request = self.waiting[0]
            # Cached blocks have no hidden states: a request still scoring its prompt computes it all.
            if request.num_computed_tokens == 0 and not request.blocks.block_table and not request.needs_prompt_logprobs:
                resumable = self.snapshots.__contains__ if self.snapshots is not None else None
                request.num_computed_tokens = self.block_manager.match_prefix(request.blocks, request.all_token_ids,
                                                                              resumable)
                if not request.output_token_ids:
                    request.num_cached_prompt_tokens = request.num_computed_tokens
            num_new = self._chunk(request, min(request.num_tokens - request.num_computed_tokens, budget))
            if not self.block_manager.allocate(request.blocks, request.num_computed_tokens + num_new):
                # Its matched blocks go back until the next try (which matches again; a snapshot may be
                # gone by then): a waiting request that kept them could hold the blocks the one ahead of
                # it needs, with nothing running to free any, and the engine would wait forever.
                self.block_manager.free(request.blocks)
                request.num_computed_tokens = 0
                if not request.output_token_ids:
                    request.num_cached_prompt_tokens = 0
                break
            self.waiting.popleft()
            if self.state_slots is not None:
                request.state_slot = self.state_slots.allocate()
                if request.num_computed_tokens:  # a cached prefix: its state from the snapshot at its end
                    self.snapshots.restore(request.blocks.block_hashes[-1], request.state_slot)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request.request_id] = (request, num_new)
            budget -= num_new

        # Prefill chunks (and speculating decodes) first, then single-token decodes: the layout attention expects.
        items = list(scheduled.values())
        is_decode = [r.output_token_ids and r.num_computed_tokens + 1 == r.num_tokens and n == 1 for r, n in items]
        for want_decode in (False, True):
            for (request, n), decode in zip(items, is_decode):
                if bool(decode) == want_decode:
                    batch.requests.append(request)
                    batch.num_tokens.append(n)
        batch.num_prefills = sum(not d for d in is_decode)
        return batch

    def _steady_decodes(self) -> ScheduledBatch | None:
        """The batch ``schedule`` makes when every running request decodes one token, nothing waits
        and nothing speculates: the running requests in order, one token each; or None (then
        ``schedule`` decides). Blocks grown here before one is short stay grown: ``schedule``'s
        own pass asks each request for the same blocks, in the same order, before it preempts."""
        running = self.running
        if self.waiting or self.speculator is not None or not running \
                or len(running) > self.config.max_num_batched_tokens:
            return None
        allocate = self.block_manager.allocate
        for request in running:
            num_tokens = request.num_tokens
            if (request.num_computed_tokens + 1 != num_tokens or not request.output_token_ids
                    or request.draft_token_ids or not allocate(request.blocks, num_tokens)):
                return None
        return ScheduledBatch(list(running), [1] * len(running))

    def _chunk(self, request: Request, num_new: int) -> int:
        """A prefill chunk of a model with state snapshots, cut to end on a block boundary (where
        a snapshot is taken): the prompt's last full block, or the last boundary the budget reaches."""
        start, end = request.num_computed_tokens, request.num_computed_tokens + num_new
        if self.snapshots is None or end - start <= 1:
            return num_new
        block_size = self.block_manager.block_size
        last = (request.num_tokens - 1) // block_size * block_size  # the longest prefix a match can resume
        if start < last < end:
            return last - start
        if end < request.num_tokens and end - end % block_size > start:
            return end - end % block_size - start
        return num_new

    def _propose(self, room: int) -> dict[str, list[int] | DraftTree]:
        """Drafts for the decoding requests at once (a draft model runs them as one batch), each
        short of the context's end, of ``max_tokens`` and of the step's ``room`` for drafts, then
        cut to those worth their cost (``allot``); the step's token budget cuts them later.
        Only requests whose full drafts could pay are asked (at batch 32 none is: no lookup runs);
        a single stream's lookup is asked at once (it costs less than asking whether it could pay)."""
        decoding = [r for r in self.running if _is_decoding(r)]
        limits = []
        for request in decoding:
            request.speculation.match_length = 0  # the last step's match: this step's lookup finds its own
            limit = min(room, self.speculator.k, self.config.max_model_len - request.num_tokens - 1)
            if request.params.max_tokens is not None:
                limit = min(limit, request.params.max_tokens - len(request.output_token_ids) - 1)
            limits.append(max(limit, 0))
        table = self.config.step_cost
        # A lookup is asked for its full limit: its match may promise more than the sequence's record
        # (allot, after it); a model that drafts is asked for what its record pays for.
        full = self.speculator.asks_full_limit
        if full and len(decoding) == 1:
            asked = [(decoding[0], limits[0])] if limits[0] else []
        else:
            # Drafting's own cost counts here, where it is still to be paid; once drafted, only the rows do.
            at_best = allot([[0] * limit for limit in limits], [r.speculation for r in decoding], len(decoding),
                            table, self.speculator.draft_cost)
            asked = [(r, limit if full else len(d)) for r, limit, d in zip(decoding, limits, at_best) if d]
        if not asked:
            return {}
        drafts = self.speculator.propose_batch([r for r, _ in asked], [limit for _, limit in asked])
        if not any(drafts):
            return {}
        # A grammar's request drafts only what its grammar would take: a refused token can't be verified.
        drafts = [d[: r.grammar.valid_prefix(d)] if d and r.grammar is not None else d for (r, _), d in zip(asked, drafts)]
        drafts = allot(drafts, [r.speculation for r, _ in asked], len(decoding), table)
        return {r.request_id: d for (r, _), d in zip(asked, drafts) if d}

    def _draft(self, request: Request, proposal: list[int] | DraftTree, limit: int) -> int:
        """Give a decoding request up to ``limit`` of its drafts (``request.draft_token_ids``, and a
        tree's ``draft_parents``) if they fit; returns how many.

        Only with blocks to spare: a draft's block must never be the one another running request needs.
        """
        tree = proposal.cut(limit) if isinstance(proposal, DraftTree) else None
        drafts = tree.tokens if tree is not None else proposal[:limit]
        if not drafts:
            return 0
        total = request.num_tokens + len(drafts)
        spare = self.block_manager.num_free_blocks - self.block_manager.blocks_needed(request.blocks, total)
        if spare < len(self.running) or not self.block_manager.allocate(request.blocks, total):
            return 0
        request.draft_token_ids = drafts
        request.draft_parents = tree.parents if tree is not None else None
        return len(drafts)


def _is_decoding(request: Request) -> bool:
    """Whether the request's next step computes just its last token (its prompt is done)."""
    return bool(request.output_token_ids) and request.num_computed_tokens + 1 == request.num_tokens
