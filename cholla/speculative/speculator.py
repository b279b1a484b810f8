"""Who speculates this step, how far, and when to stop trying.

Greedy and sampled requests speculate, penalties included: each drafted row is
sampled as plain decoding would sample it (``verify.py``: for point-mass drafts
that is speculative sampling). Requests with a grammar (its mask would be needed
at every drafted position), with logprobs, or that opted out
(``SamplingParams.speculative_decoding=False``) decode one token per step.

Back-off, per sequence: after ``MISSES_BEFORE_PAUSE`` verifications in a row that
accepted nothing, the sequence stops proposing for ``pause`` generated tokens;
the pause doubles each time it recurs (up to ``MAX_PAUSE``) and resets once a
draft is accepted. A step that speculates runs the general (Python, per layer)
path instead of the fused C++ decode step, so a draft that is never accepted
costs real time.

Engine-wide: no sequence speculates when more than ``MAX_DECODING_SEQS`` are
decoding. With a few sequences a CPU decode step is bound by reading the
weights, and verifying K more rows per sequence is nearly free; with many, the
step's matmuls already have rows enough to be compute-bound, every drafted row
costs as much as a real one, and a speculating row takes the whole step off the
fused decode path (llama.cpp's lookup measured 0.86x at 4 slots, 0.77x at 8).
"""

from __future__ import annotations

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
MAX_DECODING_SEQS = 2


@dataclass
class SpeculationState:
    """One sequence's record: consecutive fruitless verifications and the current pause."""

    misses: int = 0
    pause: int = FIRST_PAUSE
    resume_at: int = 0  # number of output tokens from which proposing resumes


def can_speculate(params: SamplingParams, has_grammar: bool) -> bool:
    return params.speculative_decoding and not has_grammar and params.logprobs is None


class Speculator(Protocol):
    """What the scheduler and engine ask of a speculative method (``NgramSpeculator``,
    ``draft_model.DraftModelSpeculator``)."""

    def propose_batch(self, requests: list[Request], limits: list[int]) -> list[list[int] | tree.DraftTree]: ...

    def record(self, state: SpeculationState, num_accepted: int, num_output: int) -> None: ...

    def release(self, request: Request) -> None: ...

    def observe(self, token_ids: list[int]) -> None: ...


class NgramSpeculator:
    """Drafts of up to ``k`` tokens for sequences that can use them: from the sequence's own
    tokens (prompt lookup), or, where an engine-wide cache of ``cache_size`` n-grams (0: none)
    knows a longer match, from what other requests wrote after the same words."""

    def __init__(self, k: int, cache_size: int = 0):
        self.k = k
        self.cache = NgramCache(cache_size, k) if cache_size else None

    def propose(self, token_ids: list[int], params: SamplingParams, has_grammar: bool, num_output: int,
                state: SpeculationState, limit: int) -> list[int]:
        """Drafts for one decoding sequence: at most ``min(k, limit)``; [] when it should not speculate."""
        limit = min(self.k, limit)
        if limit <= 0 or num_output < state.resume_at or not can_speculate(params, has_grammar):
            return []
        drafts, n = ngram.match(token_ids, limit)
        if self.cache is not None and n < ngram.MAX_NGRAM:
            cached, _ = self.cache.lookup(token_ids, limit, min_n=n + 1)
            drafts = cached or drafts
        return drafts

    def observe(self, token_ids: list[int]) -> None:
        """Feed a request's tokens to the shared cache (a prompt as it arrives, prompt + output as it ends)."""
        if self.cache is not None:
            self.cache.add(token_ids)

    def propose_batch(self, requests: list[Request], limits: list[int]) -> list[list[int]]:
        """Drafts for each decoding request (at most its limit), as the scheduler asks for them."""
        return [self.propose(r.all_token_ids, r.params, r.grammar is not None, len(r.output_token_ids), r.speculation,
                             limit) for r, limit in zip(requests, limits)]

    def release(self, request: Request) -> None:
        """A request finished or was preempted: prompt lookup keeps nothing per sequence to free."""

    @staticmethod
    def record(state: SpeculationState, num_accepted: int, num_output: int) -> None:
        """After a verification: back off after repeated misses, reset on any acceptance."""
        if num_accepted:
            state.misses, state.pause = 0, FIRST_PAUSE
            return
        state.misses += 1
        if state.misses >= MISSES_BEFORE_PAUSE:
            state.resume_at = num_output + state.pause
            state.misses, state.pause = 0, min(2 * state.pause, MAX_PAUSE)


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

    def __init__(self, k: int, budget: int, cache_size: int = 0):
        super().__init__(k)
        self.budget = budget
        self.cache = NgramCache(cache_size, k, alternatives=TREE_CACHE_ALTERNATIVES) if cache_size else None

    def propose_tree(self, token_ids: list[int], params: SamplingParams, has_grammar: bool, num_output: int,
                     state: SpeculationState, limit: int) -> list[int] | tree.DraftTree:
        """A tree for one decoding greedy sequence, the first chain for a sampled one, [] for none."""
        limit = min(self.k, limit)
        if limit <= 0 or num_output < state.resume_at or not can_speculate(params, has_grammar):
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
