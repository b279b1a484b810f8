"""What the engine hands back, in vLLM's shape: a RequestOutput holding CompletionOutputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class PromptLogprob(NamedTuple):
    """One prompt token scored by the prefill: its logprob, the top alternatives, its rank.

    ``top`` is ``[(token id, logprob), ...]`` best first, as in ``CompletionOutput.logprobs``;
    ``rank`` is 1 + the number of tokens the model found likelier (vLLM's rank).
    """

    logprob: float
    top: list[tuple[int, float]]
    rank: int


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error" (a grammar dead end) or None while running
    stop_reason: int | str | None = None
    # Per token: (chosen logprob, [(token id, logprob), ...] best first), when asked for.
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    last_token_time: float | None
    num_cached_prompt_tokens: int = 0
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: RequestMetrics | None = None
    # With SamplingParams.prompt_logprobs, once the prefill is done: one entry per prompt
    # token, None for the first (nothing precedes it), as vLLM's RequestOutput.prompt_logprobs.
    prompt_logprobs: list[PromptLogprob | None] | None = None
