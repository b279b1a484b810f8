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
the pause doubles each time it recurs (up to ``MAX_PAUSE``) and resets once a
draft is accepted.

Engine-wide: a verification step runs in the fused C++ decode step like any
decode (its rows are query spans, causal within each sequence's), so a drafted
row costs what a decoding row costs, and the question is only how much a row
costs. A step takes drafts while its rows (every decoding sequence's, plus
the drafts) stay within ``max_step_rows``, oldest requests first; past that
everyone decodes plainly. Measured per-step CPU time of SmolLM2's fused step by
rows (docs/benchmarks.md, bf16, one thread): the int8 GEMV's rows cost ~60% of
the first each (1 row 4.8 ms, 5 rows 15.5 ms), the bf16 tiles past it are
~21 ms at 7-9 rows and 25 ms at 13, then grow ~1 ms a row (40 ms at 32, 69 ms
at 64). A draft pays where a step's accepted drafts outgrow that; at batch 32
no draft can (the step is already at its per-row cost), while a single stream
copying text gets 8-12 accepted tokens for ~5x a row's cost. So bf16 steps
speculate up to ``MAX_STEP_ROWS`` (13) rows, float32 ones (whose fused step
takes at most ``GEMV_MAX_ROWS``) within the fp32 GEMV's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cholla.layers.linear import GEMV_MAX_ROWS
from cholla.sampling.params import SamplingParams
from cholla.speculative import ngram
from cholla.speculative.ngram_cache import NgramCache

if TYPE_CHECKING:
    from cholla.engine.request import Request

MISSES_BEFORE_PAUSE = 3
FIRST_PAUSE = 8
MAX_PAUSE = 128
# Rows (decodes plus drafts) of a bf16 step within which sequences speculate (module doc).
MAX_STEP_ROWS = 13


@dataclass
class SpeculationState:
    """One sequence's record: consecutive fruitless verifications and the current pause."""

    misses: int = 0
    pause: int = FIRST_PAUSE
    resume_at: int = 0  # number of output tokens from which proposing resumes


def can_speculate(params: SamplingParams) -> bool:
    return params.speculative_decoding


def max_step_rows(dtype: str) -> int:
    """Rows a speculating step may reach for an engine computing in ``dtype`` (module doc): in
    float32 the fused step's limit, past which a step runs layer by layer."""
    return MAX_STEP_ROWS if dtype == "bfloat16" else GEMV_MAX_ROWS


class Speculator(Protocol):
    """What the scheduler and engine ask of a speculative method (``NgramSpeculator``,
    ``draft_model.DraftModelSpeculator``)."""

    def propose_batch(self, requests: list[Request], limits: list[int]) -> list[list[int]]: ...

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

    def propose(self, token_ids: list[int], params: SamplingParams, num_output: int, state: SpeculationState,
                limit: int) -> list[int]:
        """Drafts for one decoding sequence: at most ``min(k, limit)``; [] when it should not speculate."""
        limit = min(self.k, limit)
        if limit <= 0 or num_output < state.resume_at or not can_speculate(params):
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
        return [self.propose(r.all_token_ids, r.params, len(r.output_token_ids), r.speculation, limit)
                for r, limit in zip(requests, limits)]

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
