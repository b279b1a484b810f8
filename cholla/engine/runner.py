"""Turns a scheduled batch into tensors, runs the model over it, and samples.

All sequences of a step go through the model as one packed batch of tokens
(no padding); logits are computed only where a sequence needs its next token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cholla.engine.request import Request
from cholla.engine.scheduler import ScheduledBatch
from cholla.kv.paged_cache import PagedKVCache
from cholla.layers.attention import AttentionMetadata
from cholla.sampling.sampler import SamplingBatch, sample
from cholla.sampling.structured import StructuredOutputs, allowed_tokens


@dataclass
class StepResult:
    """Per scheduled request: the sampled token, or None for a prompt chunk that is not the last."""

    token_ids: list[int | None]
    # Per scheduled request, when it asked for logprobs: (chosen logprob, top [(id, logprob)]).
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]
    # Scheduled requests whose grammar allows no token at all: they get no token and must end.
    dead_ends: set[int] = field(default_factory=set)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache, eos_token_ids: set[int],
                 structured: StructuredOutputs | None = None):
        self.model = model
        self.kv_cache = kv_cache
        self.vocab_size = model.config.vocab_size
        self.eos_token_ids = eos_token_ids
        self.structured = structured

    def _prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[int]]:
        """Packed inputs, plus which token rows need logits and which requests they belong to.

        Built as Python lists and turned into tensors once per field: a decode
        step has one token per request, and a few small tensor ops per request
        cost more than the list arithmetic (SmolLM2: 29 -> 17 us a step).
        """
        block_size = self.kv_cache.block_size
        input_ids, positions, slots, starts, context_lens, logits_rows, needs_token = [], [], [], [0], [], [], []
        for i, (request, n) in enumerate(zip(batch.requests, batch.num_tokens)):
            start, table = request.num_computed_tokens, request.blocks.block_table
            input_ids += request.all_token_ids[start : start + n]
            positions += range(start, start + n)
            slots += [table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]
            starts.append(starts[-1] + n)
            context_lens.append(start + n)
            if start + n == request.num_tokens:  # the prompt is done: this step yields a token
                logits_rows.append(starts[-1] - 1)
                needs_token.append(i)
        max_blocks = max(len(r.blocks.block_table) for r in batch.requests)
        tables = [r.blocks.block_table + [0] * (max_blocks - len(r.blocks.block_table)) for r in batch.requests]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            query_start_loc=starts,
            context_lens=context_lens,
            block_tables=torch.tensor(tables, dtype=torch.long),
            num_prefills=batch.num_prefills,
            decode_context_lens=torch.tensor(context_lens[batch.num_prefills :], dtype=torch.long),
        )
        return (torch.tensor(input_ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long), meta, logits_rows,
                needs_token)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        input_ids, positions, meta, logits_rows, needs_token = self._prepare(batch)
        hidden = self.model(input_ids, positions, self.kv_cache.layers, meta)
        sampled: list[int | None] = [None] * len(batch.requests)
        logprobs: list = [None] * len(batch.requests)
        if not logits_rows:
            return StepResult(sampled, logprobs)
        rows = hidden if len(logits_rows) == hidden.shape[0] else hidden[logits_rows]  # decoding: every row, in order
        # Decoding steps write the logits into the head's kept buffer (used up within
        # the step; see Linear.forward); a prefill step's own freed activations serve better.
        logits = self.model.compute_logits(rows, reuse_output=batch.num_prefills == 0).float()
        requests: list[Request] = [batch.requests[i] for i in needs_token]
        allowed, dead_rows = self._grammar_masks(requests, logits.shape[-1])
        sampling = SamplingBatch.build(
            params=[r.params for r in requests],
            prompt_token_ids=[r.prompt_token_ids for r in requests],
            output_token_ids=[r.output_token_ids for r in requests],
            generators=[r.generator for r in requests],
            vocab_size=logits.shape[-1],
            device=logits.device,
            eos_token_ids=self.eos_token_ids,
            allowed=allowed,
        )
        out = sample(logits, sampling)
        tokens = out.token_ids.tolist()
        for row, i in enumerate(needs_token):
            sampled[i] = tokens[row]
            if out.logprobs is not None and requests[row].params.logprobs is not None:
                logprobs[i] = out.logprobs[row]
        dead_ends = {needs_token[row] for row in dead_rows}
        for i in dead_ends:
            sampled[i] = logprobs[i] = None
        return StepResult(sampled, logprobs, dead_ends)

    def _grammar_masks(self, requests: list[Request], vocab_size: int) -> tuple[tuple[list[int], torch.Tensor] | None, list[int]]:
        """The constrained rows with their allowed tokens ``[rows, vocab]`` bool, and the rows where none is.

        One bitmask ``[rows, ceil(vocab/32)]`` for the step, filled by the grammar engine in parallel.
        A dead-end row (a matcher in error allows only end-of-generation, which would end the
        request as if complete) is let free here, so sampling stays defined, and dropped by ``execute``.
        """
        rows = [row for row, r in enumerate(requests) if r.grammar is not None]
        if not rows:
            return None, []
        matchers = [requests[row].grammar for row in rows]
        bitmask = torch.zeros(len(rows), self.structured.mask_words, dtype=torch.int32)
        self.structured.fill_bitmask(matchers, bitmask)
        allowed = allowed_tokens(bitmask, vocab_size)
        empty = (~allowed.any(dim=1)).tolist()
        dead = [i for i, m in enumerate(matchers) if empty[i] or m.error is not None]
        if dead:
            allowed = allowed.clone()
            allowed[dead] = True
        return (rows, allowed), [rows[d] for d in dead]


@torch.inference_mode()
def forward_once(model: torch.nn.Module, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits ``[len(token_ids), vocab]`` for one sequence in a throwaway cache (scoring, tests)."""
    n = len(token_ids)
    cache = PagedKVCache(model.config, num_blocks=-(-n // block_size), block_size=block_size)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n),
        query_start_loc=[0, n],
        context_lens=[n],
        block_tables=torch.arange(cache.num_blocks)[None],
        num_prefills=1,
    )
    hidden = model(torch.tensor(token_ids), torch.arange(n), cache.layers, meta)
    return model.compute_logits(hidden).float()
