"""Who speculates this step, how far, and when to stop trying.

Greedy and sampled requests speculate, penalties, grammars and logprobs included:
each drafted row is sampled as plain decoding would sample it (``verify.py``: for
point-mass drafts that is speculative sampling), under the grammar's mask after
the drafts before it (the scheduler cuts a draft at the first token the grammar
refuses), and the logprobs of the kept tokens are their verification rows'.
Requests that opted out (``SamplingParams.speculative_decoding=False``) decode one
token per step.

Back-off, per sequence: after ``MISSES_BEFORE_PAUSE`` verifications in a row that
accepted nothing, the sequence stops proposing for ``pause`` generated tokens;
until a draft is accepted again, each later miss pauses it again at once, the
pause doubling each time (up to ``MAX_PAUSE``); an accepted draft resets both.
Before any of that, a lookup's match of at most ``SHORT_MATCH`` tokens drafts only on the
sequence's own accepted drafts (``SpeculationState.acceptance``): text with nothing to copy
matches words that merely recur, and SmolLM2's open-ended story now drafts nothing at all
(it paid for ~6 failed drafts in 96 tokens before, each a step 1.3x a plain one).

Engine-wide: a verification step runs in the fused C++ decode step like any
decode (its rows are query spans, causal within each sequence's), so a drafted
row costs what a decoding row costs, and how much that is depends on the rows
already there: ``STEP_COST`` is a step's measured cost by rows. Each step
``allot`` keeps the drafts that maximise expected tokens per unit of cost: a
sequence's j-th draft is accepted with probability ``acceptance ** j`` (its
decayed acceptance rate, ``SpeculationState.acceptance``, or for a lookup what its match
length promises where that is more: a copy's first steps, before its record can say so). With the table
measured here, a single stream verifies one draft a step while its acceptance is
middling (a second row costs 0.14 of the first, a third 0.6) and up to 12 once it
copies well (7-13 rows, one tile of the batched int8 product, cost about what 6 do),
32 sequences none, and a sequence whose
drafts keep failing none; the scheduler asks for drafts only where full ones
could pay, so a large batch runs no lookup at all, and a single stream looks up at
once (its lookup, ``ngram.TokenIndex``, costs less than that question).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cholla.sampling.params import SamplingParams
from cholla.speculative import ngram, tree
from cholla.speculative.ngram_cache import NgramCache

if TYPE_CHECKING:
    from cholla.engine.request import Request

MISSES_BEFORE_PAUSE = 3
FIRST_PAUSE = 8
MAX_PAUSE = 128
# A decode step's cost by rows, relative to a one-row step: (rows, cost) points, linear in
# between; a step past the last point leaves the fused step. SmolLM2's fused step on a 2-core
# Zen 5 (no AMX) with one thread, from `benchmarks/speculative.py --step-cost` (docs/benchmarks.md;
# bf16: the mean of two runs' CPU time): the int8 GEMV's rows (up to 6) cost ~50% of the first
# each, the batched int8 product's tiles of 16 rows past it are flat from 7 to 13 rows and from 17
# to 32, then each row adds ~15% of a one-row step; in float32 the second row costs ~1.9 rows (the
# one-row GEMV is a path of its own), later ones ~0.6.
STEP_COST = {
    "bfloat16": ((1, 1.0), (2, 1.14), (3, 1.77), (5, 2.58), (6, 2.83), (7, 2.83), (9, 2.83), (13, 3.04), (17, 4.38),
                 (24, 4.72), (32, 5.27), (48, 7.51), (64, 9.26)),
    "float32": ((1, 1.0), (2, 2.87), (3, 3.41), (4, 4.03), (5, 4.89), (6, 5.36), (7, 6.06), (8, 6.69)),
}
# Sequences a draft model's cache is sized for (more than cost allows to speculate at once here;
# past them a sequence finds no draft blocks and decodes plainly).
MAX_SPECULATING_SEQS = 8
# A lookup's match this long or shorter drafts only where the sequence's drafts have been accepted before
# (``SpeculationState.acceptance``): on open-ended text SmolLM2's one-token matches failed 66 times in 66,
# its two-token ones 15 in 15, while copy and code, whose records vouch for their short matches, verified
# as few steps as before or fewer (docs/benchmarks.md).
SHORT_MATCH = 2
# Each draft's weight in a sequence's acceptance rate decays by this much per later draft that met
# the verifier (a memory of ~10 drafts: a copy that ends is noticed within a step or two; one draft a
# step accepted every time reaches 0.92, which pays for longer drafts).
ACCEPTANCE_DECAY = 0.9


@dataclass
class SpeculationState:
    """One sequence's record: consecutive fruitless verifications and the current pause."""

    misses: int = 0
    pause: int = FIRST_PAUSE
    resume_at: int = 0  # number of output tokens from which proposing resumes
    # Drafts that met the verifier (each accepted one and the first rejected) and those accepted,
    # each draft weighing ACCEPTANCE_DECAY less per later draft that met the verifier.
    tried: float = 0.0
    accepted: float = 0.0
    # How far back the suffix behind the latest lookup's drafts agreed with the text they came from (0: none).
    match_length: int = 0
    # Prompt lookup's index of the sequence's tokens (``NgramSpeculator``), kept between its steps.
    lookup: ngram.TokenIndex | None = None

    @property
    def acceptance(self) -> float:
        """The chance a draft is accepted once those before it were (drafts after a rejection never
        meet the verifier): the sequence's record, with one accepted and one rejected draft as prior,
        or what its current match promises (``match_acceptance``) where that is more. A lookup's
        match of at most ``SHORT_MATCH`` tokens promises nothing, and its drafts count on the
        record's own evidence alone, without the prior: words that merely recur ("the", ", and")
        are what open-ended text matches, and its drafts fail there (docs/benchmarks.md)."""
        if 0 < self.match_length <= SHORT_MATCH:
            return self.accepted / (self.tried + 1)
        return max((self.accepted + 1) / (self.tried + 2), match_acceptance(self.match_length))


def match_acceptance(match_length: int) -> float:
    """The chance a draft from a suffix match of ``match_length`` tokens is accepted, drafts before it
    accepted: L / (L + 1), from below the rates measured over copy, rewrite, code and open-ended chat
    on SmolLM2 and Gemma 3 (``docs/benchmarks.md``: ~0.5 at 1 token, 0.8-1.0 at 2-3, 0.92-0.99 past 10).
    A copy in progress is told by its long match from its first steps, before its record can say so,
    and again after each edit breaks it."""
    return match_length / (match_length + 1)


def can_speculate(params: SamplingParams) -> bool:
    return params.speculative_decoding


@functools.lru_cache(maxsize=4096)  # asked for the same few (table, rows) pairs every step
def step_cost(table: tuple[tuple[int, float], ...], rows: int) -> float:
    """A step of ``rows`` rows, relative to a one-row step (``STEP_COST``); inf past the table."""
    for (r0, c0), (r1, c1) in zip(table, table[1:]):
        if rows <= r1:
            return c0 + (c1 - c0) * (max(rows, r0) - r0) / (r1 - r0)
    return float("inf")


@functools.lru_cache(maxsize=16)
def _cost_curve(table: tuple[tuple[int, float], ...]) -> list[float]:
    """``step_cost`` by rows, read by index and filled as ``allot`` asks (a table may reach far):
    ``allot`` runs every step, and hashing the table once per row asked cost more than its sums."""
    return [step_cost(table, 1)]  # rows 0: never asked


def allot(drafts: list[list[int] | tree.DraftTree], states: list[SpeculationState], num_rows: int,
          table: tuple[tuple[int, float], ...], draft_cost: float = 0.0) -> list[list[int] | tree.DraftTree]:
    """Each sequence's drafts cut to those a step of ``num_rows`` rows (without drafts) should verify:
    the most expected tokens per unit of ``step_cost``, the j-th draft of a sequence counting
    ``acceptance ** j`` tokens, and each draft costing ``draft_cost`` more (a method that runs the
    model to draft, ``Speculator.draft_cost``; 0 once the drafts exist). Returns the kept prefixes,
    [] for a sequence that drafts nothing."""
    acceptances = [state.acceptance if d else 0.0 for d, state in zip(drafts, states)]
    best_acceptance = max(acceptances, default=0.0)
    num_drafts = sum(map(len, drafts))
    # No draft can be accepted, or (where the shortcut's tries are fewer than the sort's) none can pay.
    if best_acceptance <= 0.0 or (num_drafts > len(table)
                                  and not _could_pay(best_acceptance, num_drafts, num_rows, table, draft_cost)):
        return _keep(drafts, [0] * len(drafts), states)
    # Each sequence's gains fall with j: one sequence's (a single stream's) are already in order.
    gains = [[(a ** (j + 1), j, i) for j in range(len(d))] for i, (d, a) in enumerate(zip(drafts, acceptances)) if a > 0.0]
    gains = gains[0] if len(gains) == 1 else sorted(itertools.chain(*gains), key=lambda g: (-g[0], g[1]))
    costs = _cost_curve(table)
    best_rate, best, tokens = num_rows / step_cost(table, num_rows), 0, float(num_rows)
    for m, (gain, _, _) in enumerate(gains, 1):
        while len(costs) <= num_rows + m:
            costs.append(step_cost(table, len(costs)))
        if costs[num_rows + m] == float("inf"):
            break  # past the table
        tokens += gain
        rate = tokens / (costs[num_rows + m] + draft_cost * m)
        if rate > best_rate:
            best_rate, best = rate, m
    keep = [0] * len(drafts)
    for _, j, i in gains[:best]:
        keep[i] = max(keep[i], j + 1)
    return _keep(drafts, keep, states)


def _keep(drafts: list[list[int] | tree.DraftTree], keep: list[int], states: list[SpeculationState]
          ) -> list[list[int] | tree.DraftTree]:
    """``allot``'s answer: each sequence's first ``keep`` drafts (a tree cut to as many nodes)."""
    for d, k, state in zip(drafts, keep, states):
        if d and not k:  # unverified, its rate drifts back to the prior: it gets to try again some day
            state.tried, state.accepted = ACCEPTANCE_DECAY * state.tried, ACCEPTANCE_DECAY * state.accepted
    return [d.cut(k) if isinstance(d, tree.DraftTree) else d[:k] for d, k in zip(drafts, keep)]


def _could_pay(acceptance: float, num_drafts: int, num_rows: int, table: tuple[tuple[int, float], ...],
               draft_cost: float) -> bool:
    """Whether some count of ``num_drafts`` drafts, none accepted with more than ``acceptance``, might
    beat a step of ``num_rows`` plain rows: ``allot``'s rate with every gain at that bound, which is
    monotone between the table's points, so checked at them and the ends (a handful of tries for
    ``allot``'s hundreds at batch 32, where no draft pays). False only where none can pay."""
    if not num_drafts or acceptance <= 0.0:
        return False
    base = num_rows / step_cost(table, num_rows)
    counts = {1, num_drafts} | {rows - num_rows for rows, _ in table if 0 < rows - num_rows < num_drafts}
    best = max((num_rows + m * acceptance) / (step_cost(table, num_rows + m) + draft_cost * m) for m in counts)
    return best > base * (1 - 1e-9)  # rounding aside: a near tie is left to allot's own sums


class Speculator(Protocol):
    """What the scheduler and engine ask of a speculative method (``NgramSpeculator``,
    ``draft_model.DraftModelSpeculator``)."""

    k: int  # the most tokens it drafts per sequence and step (a tree's depth)
    draft_cost: float  # what drafting one token costs, relative to a one-row decode step (0: a lookup)
    # Asked for every draft it may give, not only those its record pays for: drafting costs nothing and
    # each lookup's match says how far its drafts should hold (``SpeculationState.match_length``).
    asks_full_limit: bool

    def propose_batch(self, requests: list[Request], limits: list[int]) -> list[list[int] | tree.DraftTree]: ...

    def record(self, state: SpeculationState, num_drafted: int, num_accepted: int, num_output: int) -> None: ...

    def release(self, request: Request) -> None: ...

    def observe(self, token_ids: list[int]) -> None: ...


class NgramSpeculator:
    """Drafts of up to ``k`` tokens for sequences that can use them: from the sequence's own
    tokens (prompt lookup), or, where an engine-wide cache of ``cache_size`` n-grams (0: none)
    knows a longer match, from what other requests wrote after the same words."""

    draft_cost = 0.0  # a lookup: next to nothing beside a decode step
    asks_full_limit = True

    def __init__(self, k: int, cache_size: int = 0):
        self.k = k
        self.cache = NgramCache(cache_size, k) if cache_size else None

    def propose(self, token_ids: list[int], params: SamplingParams, num_output: int, state: SpeculationState,
                limit: int) -> list[int]:
        """Drafts for one decoding sequence: at most ``min(k, limit)``; [] when it should not speculate."""
        limit = min(self.k, limit)
        state.match_length = 0
        if limit <= 0 or num_output < state.resume_at or not can_speculate(params):
            return []
        if state.lookup is None:
            state.lookup = ngram.TokenIndex()
        drafts, n = state.lookup.match(token_ids, limit)
        if self.cache is not None and n < ngram.MAX_NGRAM:
            cached, cached_n = self.cache.lookup(token_ids, limit, min_n=n + 1)
            drafts, n = (cached, cached_n) if cached else (drafts, n)
        state.match_length = n
        return drafts

    def observe(self, token_ids: list[int]) -> None:
        """Feed a request's tokens to the shared cache (a prompt as it arrives, prompt + output as it ends)."""
        if self.cache is not None:
            self.cache.add(token_ids)

    def propose_batch(self, requests: list[Request], limits: list[int]) -> list[list[int]]:
        """Drafts for each decoding request (at most its limit), as the scheduler asks for them."""
        return [self.propose(r.all_token_ids, r.params, len(r.output_token_ids), r.speculation, limit)
                for r, limit in zip(requests, limits)]

    def release(self, request: Request) -> None:
        """A request finished or was preempted: prompt lookup keeps nothing per sequence to free."""

    @staticmethod
    def record(state: SpeculationState, num_drafted: int, num_accepted: int, num_output: int) -> None:
        """After a verification: update the acceptance rate; back off after repeated misses, reset on any acceptance."""
        met = num_accepted + (num_accepted < num_drafted)  # drafts that met the verifier
        decay = ACCEPTANCE_DECAY ** met  # per draft: a long accepted run is not ten verifications' worth of trust
        state.tried = decay * state.tried + met
        state.accepted = decay * state.accepted + num_accepted
        if num_accepted:
            state.misses, state.pause = 0, FIRST_PAUSE
            return
        state.misses += 1
        if state.misses >= MISSES_BEFORE_PAUSE:  # the next miss, unless a draft is accepted first, pauses again
            state.resume_at = num_output + state.pause
            state.misses, state.pause = MISSES_BEFORE_PAUSE - 1, min(2 * state.pause, MAX_PAUSE)


# Continuations gathered per sequence for a tree: each earlier occurrence of its suffix gives one.
TREE_CANDIDATES = 16
# Continuations the shared cache keeps per n-gram for trees.
TREE_CACHE_ALTERNATIVES = 4


class NgramTreeSpeculator(NgramSpeculator):
    """Prompt lookup with every earlier occurrence: the continuations of the sequence's suffix
    (and, where the shared cache knows a longer match, the cache's alternatives) as one token
    tree of at most ``budget`` nodes and depth ``k`` (``tree.py``), verified in one pass.

    The first chain is ``NgramSpeculator``'s draft, so a tree accepts at least what a linear
    draft would. Only greedy requests get a tree: a sampled request's rows must draw from its
    generator in its tokens' order, which only a chain keeps; it gets the first chain (as would
    one with logprobs or a grammar, where those speculate: their rows are read in chain order).
    """

    asks_full_limit = False  # a tree's rows are cut by its node budget; its match is not recorded

    def __init__(self, k: int, budget: int, cache_size: int = 0):
        super().__init__(k)
        self.budget = budget
        self.cache = NgramCache(cache_size, k, alternatives=TREE_CACHE_ALTERNATIVES) if cache_size else None

    def propose_tree(self, token_ids: list[int], params: SamplingParams, has_grammar: bool, num_output: int,
                     state: SpeculationState, limit: int) -> list[int] | tree.DraftTree:
        """A tree for one decoding greedy sequence, the first chain for a sampled one, [] for none."""
        limit = min(self.k, limit)
        if limit <= 0 or num_output < state.resume_at or not can_speculate(params):
            return []
        own, n = ngram.continuations(token_ids, limit, TREE_CANDIDATES)
        cached: list[list[int]] = []
        if self.cache is not None:
            cached, cached_n = self.cache.lookup_alternatives(token_ids, limit)
            if cached_n <= n:  # the sequence's own match is as long: it leads, as in NgramSpeculator
                own, cached = own + cached, []
        candidates = cached + own
        if not candidates:
            return []
        if not params.greedy or params.logprobs is not None or has_grammar:
            return candidates[0]  # rows drawn, scored or masked in the chain's order: only a chain keeps it
        return tree.build(candidates, self.budget, limit)

    def propose_batch(self, requests: list[Request], limits: list[int]) -> list[list[int] | tree.DraftTree]:
        return [self.propose_tree(r.all_token_ids, r.params, r.grammar is not None, len(r.output_token_ids),
                                  r.speculation, limit) for r, limit in zip(requests, limits)]
