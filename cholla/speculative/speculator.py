"""Who speculates this step, how far, and when to stop trying.

Only greedy requests without a grammar, logprobs or penalties speculate in this
slice: their next token is the plain argmax, so verification is a comparison.
(Sampled requests would need rejection sampling; a grammar would need its mask
for every drafted position; logprobs and penalties change with each accepted
token.) Everything else decodes one token per step, exactly as before.

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
from cholla.speculative import ngram

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
    return (params.greedy and not has_grammar and params.logprobs is None and params.repetition_penalty == 1.0
            and params.frequency_penalty == 0.0 and params.presence_penalty == 0.0)


class Speculator(Protocol):
    """What the scheduler and engine ask of a speculative method (``NgramSpeculator``,
    ``draft_model.DraftModelSpeculator``)."""

    def propose_batch(self, requests: list[Request], limits: list[int]) -> list[list[int]]: ...

    def record(self, state: SpeculationState, num_accepted: int, num_output: int) -> None: ...

    def release(self, request: Request) -> None: ...


class NgramSpeculator:
    """Prompt-lookup drafts of up to ``k`` tokens for sequences that can use them."""

    def __init__(self, k: int):
        self.k = k

    def propose(self, token_ids: list[int], params: SamplingParams, has_grammar: bool, num_output: int,
                state: SpeculationState, limit: int) -> list[int]:
        """Drafts for one decoding sequence: at most ``min(k, limit)``; [] when it should not speculate."""
        limit = min(self.k, limit)
        if limit <= 0 or num_output < state.resume_at or not can_speculate(params, has_grammar):
            return []
        return ngram.propose(token_ids, limit)

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
