"""A request's life: its prompt, its sampling parameters, its tokens and blocks so far."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from cholla.kv.block_manager import SequenceBlocks
from cholla.sampling.params import SamplingParams
from cholla.sampling.structured import GrammarMatcher
from cholla.speculative.speculator import SpeculationState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache. Reset to 0 when preempted (recomputed later).
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache
    blocks: SequenceBlocks = field(default_factory=SequenceBlocks)
    state_slot: int | None = None  # models with recurrent layers: its slot in the state cache while running
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" (a grammar dead end)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    generator: torch.Generator | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    # Per output token: (chosen logprob, [(token id, logprob), ...]) when asked for.
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    # With params.prompt_logprobs: [None, then one PromptLogprob per prompt token scored so far].
    prompt_logprobs: list = field(default_factory=list)
    grammar: GrammarMatcher | None = None  # structured output: where the output stands in its grammar
    # Speculative decoding: this step's drafted tokens (computed after the last token, not yet
    # accepted) and the sequence's back-off record.
    draft_token_ids: list[int] = field(default_factory=list)
    # A token tree's drafts (speculative/tree.py): each draft's parent (-1: the last token); None: a chain.
    draft_parents: list[int] | None = None
    speculation: SpeculationState = field(default_factory=SpeculationState)

    def __post_init__(self):
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed)
        if self.params.prompt_logprobs is not None and not self.prompt_logprobs:
            self.prompt_logprobs = [None]  # the first prompt token has nothing before it

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prefill rows of this request still have prompt tokens to score (no prefix cache for them)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
