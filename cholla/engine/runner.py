"""Turns a scheduled batch into tensors, runs the model over it, and samples.

All sequences of a step go through the model as one packed batch of tokens
(no padding); logits are computed only where a sequence needs its next token,
on every drafted position of a speculating sequence (its last token and each
draft: what the model would choose after each; a token tree's nodes sit at
their depth's position and see only their ancestors, ``speculative/tree.py``),
and on the prompt rows of requests that asked for prompt logprobs (scored here,
in the prefill that computes them, a slice of rows at a time).
"""

from __future__ import annotations

import operator
from array import array
from dataclasses import dataclass, field

import torch

from cholla.engine.outputs import PromptLogprob
from cholla.engine.request import Request
from cholla.engine.scheduler import ScheduledBatch
from cholla.kv.paged_cache import PagedKVCache
from cholla.kv.state_cache import StateCache, layer_caches
from cholla.layers.attention import MAX_QUERY_SPAN, AttentionMetadata, TreeRows
from cholla.layers.linear import decode_step
from cholla.sampling.sampler import SamplerOutput, SamplingBatch, argmax, sample, skip_draws
from cholla.sampling.structured import StructuredOutputs, allowed_tokens
from cholla.speculative import tree
from cholla.speculative.verify import accept_greedy
from cholla.threads import step_threads


@dataclass
class StepResult:
    """Per scheduled request: the sampled token, or None for a prompt chunk that is not the last."""

    token_ids: list[int | None]
    # Per scheduled request, when it asked for logprobs: (chosen logprob, top [(id, logprob)]).
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]
    # Scheduled requests whose grammar allows no token at all: they get no token and must end.
    dead_ends: set[int] = field(default_factory=set)
    # Per scheduled request: the prompt tokens this step scored (prompt logprobs), else None.
    prompt_logprobs: list[list[PromptLogprob] | None] | None = None
    # Speculating requests (by place in the batch): the model's token after the last token and
    # after each draft, 1 + K of them (None where the grammar allows no token); token_ids holds the first.
    targets: dict[int, list[int | None]] = field(default_factory=dict)
    # Speculating requests that asked for logprobs: each target's (chosen logprob, top alternatives).
    target_logprobs: dict[int, list] = field(default_factory=dict)


# Prompt logprobs take the logits of this many bytes of rows at a time (a 2048-token
# chunk at a 49k vocabulary would be 400 MB of fp32 logits at once).
PROMPT_LOGITS_SLICE_BYTES = 64 * 2**20


@dataclass
class PromptRows:
    """Rows of the packed batch whose next prompt token one request wants scored."""

    index: int  # the request's place in the batch
    rows: list[int]  # rows of the packed batch (positions p)
    targets: list[int]  # the prompt tokens at p + 1
    num_top: int


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache, eos_token_ids: set[int],
                 structured: StructuredOutputs | None = None, state_cache: StateCache | None = None):
        self.model = model
        self.kv_cache = kv_cache
        self.state_cache = state_cache  # models with recurrent layers; requests then own a state_slot
        self.caches = layer_caches(kv_cache.layers, state_cache)
        self.vocab_size = model.config.vocab_size
        self.eos_token_ids = eos_token_ids
        self.structured = structured
        # The last step's sampling batch and the rows (requests) it was built for, while it depends
        # on their parameters only (see _sampling_batch)
        self._sampling: tuple[tuple[Request, ...], SamplingBatch] | None = None
        # The last decode step's block tables (a copy), their padded tensor, query_start_loc and
        # rows, kept while the tables are equal (a new block, another request: built anew)
        self._decode_tables: tuple[list[list[int]], torch.Tensor, list[int], list[int]] | None = None
        # A decode step's ids, positions, slots and context lengths: [4, rows] int64 over one buffer
        # that each such step of as many rows refills in place (a tensor built from a list, then
        # viewed four times, cost ~70 us a 32-row step between kernels that leave every cache cold)
        self._decode_inputs: tuple[array, tuple[torch.Tensor, ...]] | None = None

    def _prepare_decodes(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[int], list[PromptRows]] | None:
        """``_prepare`` of a step of one-token decodes only (each request's last token at its last
        position, no drafts; every row's logits), or None for another step. The four per-row
        tensors are the kept views of one buffer (``_decode_inputs``): valid until the next step."""
        block_size, requests = self.kv_cache.block_size, batch.requests
        n = len(requests)
        ids, positions, slots, lens = [], [], [], []
        for request, num_new in zip(requests, batch.num_tokens):
            p, table, output = request.num_computed_tokens, request.blocks.block_table, request.output_token_ids
            if (num_new != 1 or p + 1 != len(request.prompt_token_ids) + len(output) or request.draft_token_ids
                    or request.params.max_tokens == 0):
                return None
            ids.append(output[-1] if output else request.prompt_token_ids[-1])  # the last token, at p
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
            lens.append(p + 1)
        tables = [r.blocks.block_table for r in requests]
        kept = self._decode_tables
        if kept is None or kept[0] != tables:
            width = max(map(len, tables))
            padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
            kept = self._decode_tables = ([list(t) for t in tables], padded, list(range(n + 1)), list(range(n)))
        _, block_tables, starts, rows = kept
        inputs = self._decode_inputs
        if inputs is None or len(inputs[0]) != 4 * n:
            buffer = array("q", bytes(32 * n))
            inputs = self._decode_inputs = (buffer, torch.frombuffer(buffer, dtype=torch.long).view(4, n).unbind())
        buffer, (input_ids, input_positions, slot_mapping, context_lens) = inputs
        buffer[:] = array("q", ids + positions + slots + lens)  # (the same length: in place, never resized)
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            query_start_loc=starts,
            context_lens=lens,
            block_tables=block_tables,
            num_prefills=0,
            decode_context_lens=context_lens,
        )
        return input_ids, input_positions, meta, rows, rows, []

    def _prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[int], list[PromptRows]]:
        """Packed inputs, plus which token rows need logits and which request each belongs to.

        Built as Python lists and turned into tensors once per field: a decode
        step has one token per request, and a few small tensor ops per request
        cost more than the list arithmetic (SmolLM2: 29 -> 17 us a step).
        """
        if not batch.num_prefills and self.state_cache is None:
            decodes = self._prepare_decodes(batch)
            if decodes is not None:
                return decodes
        block_size = self.kv_cache.block_size
        input_ids, positions, slots, starts, context_lens, logits_rows, needs_token = [], [], [], [0], [], [], []
        prompt_rows: list[PromptRows] = []
        trees: dict[int, TreeRows] = {}
        for i, (request, n) in enumerate(zip(batch.requests, batch.num_tokens)):
            start, table = request.num_computed_tokens, request.blocks.block_table
            if i < batch.num_prefills and request.needs_prompt_logprobs:
                # Position p predicts prompt token p + 1; those scored before a preemption are skipped.
                first, end = max(start, len(request.prompt_logprobs) - 1), min(start + n, len(request.prompt_token_ids) - 1)
                if first < end:
                    prompt_rows.append(PromptRows(i, [starts[-1] + p - start for p in range(first, end)],
                                                  request.prompt_token_ids[first + 1 : end + 1], request.params.prompt_logprobs))
            drafts = request.draft_token_ids
            input_ids += (request.all_token_ids + drafts if drafts else request.all_token_ids)[start : start + n]
            if request.draft_parents is not None and drafts:  # a tree: the root, then each node at its depth
                rows = [start] + [start + depth for depth in tree.depths(request.draft_parents)]
                trees[i] = TreeRows(torch.tensor(rows), tree.ancestor_mask(request.draft_parents))
                positions += rows
            else:
                positions += range(start, start + n)
            slots += [table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]
            starts.append(starts[-1] + n)
            context_lens.append(start + n)
            # The prompt is done: this step yields a token (none when max_tokens=0 only scores the prompt),
            # and a speculating request one after each of its drafts too.
            if start + n == request.num_tokens + len(drafts) and request.params.max_tokens != 0:
                logits_rows += range(starts[-1] - 1 - len(drafts), starts[-1])
                needs_token += [i] * (1 + len(drafts))
        max_blocks = max(len(r.blocks.block_table) for r in batch.requests)
        tables = [r.blocks.block_table + [0] * (max_blocks - len(r.blocks.block_table)) for r in batch.requests]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            query_start_loc=starts,
            context_lens=context_lens,
            block_tables=torch.tensor(tables, dtype=torch.long),
            num_prefills=batch.num_prefills,
            decode_context_lens=torch.tensor(context_lens[batch.num_prefills :], dtype=torch.long),
            trees=trees or None,
        )
        # Speculating decodes with chains only: their drafts attend to the cache as decode steps do
        # (written, then read back in the cache's type); a prompt chunk's rows attend to each other
        # as computed, and a tree's by its ancestor mask, on the prefill path.
        if (batch.num_prefills and max(batch.num_tokens) <= MAX_QUERY_SPAN and not trees
                and all(r.draft_token_ids for r in batch.requests[: batch.num_prefills])):
            meta.span_starts = torch.tensor(starts, dtype=torch.long)
            meta.span_context_lens = torch.tensor(context_lens, dtype=torch.long)
        if self.state_cache is not None:
            slots = [r.state_slot for r in batch.requests]
            # A prefill from the first token starts from a zero state; later chunks carry theirs on.
            self.state_cache.reset([slot for r, slot in zip(batch.requests, slots) if r.num_computed_tokens == 0])
            meta.state_slots = torch.tensor(slots, dtype=torch.long)
        return (torch.tensor(input_ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long), meta, logits_rows,
                needs_token, prompt_rows)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        input_ids, positions, meta, logits_rows, needs_token, prompt_rows = self._prepare(batch)
        # No prompt rows: plain decodes and speculating sequences' verification rows, which
        # take the products a decode step of as many rows takes (the batched int8 ones).
        decoding = all(r.draft_token_ids for r in batch.requests[: batch.num_prefills])
        step_threads(decoding)  # the full team for decode steps; a prompt's, fewer while the machine is busy
        logits = tokens = sampling = None
        vocab_size = self.model.lm_head.out_features
        requests: list[Request] = [batch.requests[i] for i in needs_token]
        with decode_step(decoding):
            if (not batch.num_prefills and len(logits_rows) == len(batch.requests)  # one token per sequence
                    and hasattr(self.model, "decode_logits")):
                # Embedding to logits in one kernel call, and greedy rows' tokens with them: the
                # sampling batch first (the grammar's masks do not depend on this step's logits).
                allowed, dead_rows = self._grammar_masks(requests, vocab_size)
                sampling = self._sampling_batch(requests, vocab_size, input_ids.device, allowed)
                fused = self.model.decode_logits(input_ids, positions, self.caches, meta, sampling.argmax_only)
                if fused is not None:
                    logits, tokens = fused
            if logits is None:
                hidden = self.model(input_ids, positions, self.caches, meta)
        sampled: list[int | None] = [None] * len(batch.requests)
        logprobs: list = [None] * len(batch.requests)
        scored = self._score_prompts(hidden, prompt_rows, len(batch.requests)) if prompt_rows else None
        if not logits_rows:
            return StepResult(sampled, logprobs, prompt_logprobs=scored)
        if logits is None:  # decoding: every row, in order
            rows = hidden if len(logits_rows) == hidden.shape[0] else hidden[logits_rows]
        if sampling is None:
            allowed, dead_rows = self._grammar_masks(requests, vocab_size)
            sampling = self._sampling_batch(requests, vocab_size, rows.device, allowed)
        # A seeded speculating request draws once per row; the draws of rows past its accepted run are undone.
        seeded = {i: r.generator.get_state() for i, r in enumerate(batch.requests)
                  if r.draft_token_ids and r.generator is not None and not r.params.greedy} if batch.num_prefills else {}
        # Where every row's token is its logits' argmax, the head's product can give it without
        # the logits (Gemma 3's 32 x 262k fp32: 33.5 MB written and read again each step).
        if logits is None and sampling.argmax_only:
            tokens = self.model.greedy_tokens(rows, decode=decoding)
        if tokens is not None:
            out = SamplerOutput(tokens)
        else:
            if logits is None:
                # Decoding steps write the logits into the head's kept buffer (used up within
                # the step; see Linear.forward); a prefill step's own freed activations serve better.
                logits = self.model.compute_logits(rows, reuse_output=decoding).float()
            out = SamplerOutput(argmax(logits)) if sampling.argmax_only else sample(logits, sampling)
        tokens = out.token_ids.tolist()
        if not batch.num_prefills and not dead_rows:  # one-token decodes: row i is request i, no drafts
            if out.logprobs is None:
                return StepResult(tokens, logprobs)
            return StepResult(tokens, [lp if r.params.logprobs is not None else None
                                       for r, lp in zip(requests, out.logprobs)])
        targets: dict[int, list[int | None]] = {}
        target_logprobs: dict[int, list] = {}
        dead_ends: set[int] = set()
        dead_rows = set(dead_rows)
        for row, i in enumerate(needs_token):
            dead = row in dead_rows
            token = None if dead else tokens[row]
            lp = out.logprobs[row] if out.logprobs is not None and requests[row].params.logprobs is not None else None
            if batch.requests[i].draft_token_ids:
                targets.setdefault(i, []).append(token)
                target_logprobs.setdefault(i, []).append(lp)
            if row and needs_token[row - 1] == i:
                continue  # a speculating request's later rows
            sampled[i], logprobs[i] = token, None if dead else lp
            if dead:
                dead_ends.add(i)
        for i, state in seeded.items():
            _rewind(batch.requests[i], targets[i], state, vocab_size)
        return StepResult(sampled, logprobs, dead_ends, scored, targets, target_logprobs)

    def _sampling_batch(self, requests: list[Request], vocab_size: int, device: torch.device,
                        allowed: tuple[list[int], torch.Tensor] | None) -> SamplingBatch:
        """The step's ``SamplingBatch``: the last step's where the rows are the same requests and it
        read nothing that changes between steps (no grammar mask, no penalties or min_tokens ban,
        which count the output; min_tokens, once met, stays met), else built anew."""
        if allowed is None and self._sampling is not None:
            rows, sampling = self._sampling
            if len(rows) == len(requests) and all(map(operator.is_, rows, requests)):
                return sampling
        sampling = SamplingBatch.build(
            params=[r.params for r in requests],
            prompt_token_ids=[r.prompt_token_ids for r in requests],
            output_token_ids=_outputs_so_far(requests),
            generators=[r.generator for r in requests],
            vocab_size=vocab_size,
            device=device,
            eos_token_ids=self.eos_token_ids,
            allowed=allowed,
        )
        steady = sampling.allowed is None and sampling.output_counts is None and sampling.banned is None
        self._sampling = (tuple(requests), sampling) if steady else None
        return sampling

    def _score_prompts(self, hidden: torch.Tensor, prompt_rows: list[PromptRows], num_requests: int) -> list:
        """Each requested prompt row's next-token logprob, rank and top alternatives (fp32 log_softmax).

        The rows of all requests go through the LM head together, a slice at a time, so
        the logits never take more than ``PROMPT_LOGITS_SLICE_BYTES``.
        """
        rows = [r for pr in prompt_rows for r in pr.rows]
        targets = torch.tensor([t for pr in prompt_rows for t in pr.targets], dtype=torch.long)
        num_top = max(pr.num_top for pr in prompt_rows)
        step = max(1, PROMPT_LOGITS_SLICE_BYTES // (4 * self.vocab_size))
        chosen, ranks, top_values, top_ids = [], [], [], []
        for at in range(0, len(rows), step):
            logprobs = self.model.compute_logits(hidden[rows[at : at + step]]).float().log_softmax(dim=-1)
            picked = logprobs.gather(1, targets[at : at + step, None])
            chosen += picked[:, 0].tolist()
            ranks += ((logprobs > picked).sum(dim=-1) + 1).tolist()
            if num_top:
                values, ids = torch.topk(logprobs, min(num_top, logprobs.shape[-1]), dim=-1)
                top_values += values.tolist()
                top_ids += ids.tolist()
        scored: list = [None] * num_requests
        at = 0
        for pr in prompt_rows:
            scored[pr.index] = [
                PromptLogprob(chosen[j], list(zip(top_ids[j][: pr.num_top], top_values[j][: pr.num_top])) if num_top else [],
                              ranks[j])
                for j in range(at, at + len(pr.rows))
            ]
            at += len(pr.rows)
        return scored

    def _grammar_masks(self, requests: list[Request], vocab_size: int) -> tuple[tuple[list[int], torch.Tensor] | None, list[int]]:
        """The constrained rows with their allowed tokens ``[rows, vocab]`` bool, and the rows where none is.

        One bitmask ``[rows, ceil(vocab/32)]`` for the step: each request's first row filled by
        the grammar engine in parallel; a speculating request's later rows, the masks after each
        of its drafts, one by one, its matcher walked through the drafts and rolled back.
        A dead-end row (a matcher in error allows only end-of-generation, which would end the
        request as if complete) is let free here, so sampling stays defined, and dropped by ``execute``.
        """
        rows = [row for row, r in enumerate(requests) if r.grammar is not None]
        if not rows:
            return None, []
        firsts = [k for k, row in enumerate(rows) if row == 0 or requests[row - 1] is not requests[row]]
        bitmask = torch.zeros(len(rows), self.structured.mask_words, dtype=torch.int32)
        first_masks = torch.zeros(len(firsts), self.structured.mask_words, dtype=torch.int32)
        self.structured.fill_bitmask([requests[rows[k]].grammar for k in firsts], first_masks)
        bitmask[firsts] = first_masks
        errors = {k for k in firsts if requests[rows[k]].grammar.error is not None}
        for k in firsts:
            request = requests[rows[k]]
            for j, draft in enumerate(request.draft_token_ids):  # the scheduler kept only drafts the grammar takes
                request.grammar.consume([draft])
                self.structured.fill_bitmask([request.grammar], bitmask[k + 1 + j : k + 2 + j])
            if request.draft_token_ids:
                request.grammar.rollback(len(request.draft_token_ids))
        allowed = allowed_tokens(bitmask, vocab_size)
        empty = (~allowed.any(dim=1)).tolist()
        dead = [i for i in range(len(rows)) if empty[i] or i in errors]
        if dead:
            allowed = allowed.clone()
            allowed[dead] = True
        return (rows, allowed), [rows[d] for d in dead]


def _rewind(request: Request, targets: list[int], state: torch.Tensor, vocab_size: int) -> None:
    """Leave a seeded request's generator where plain decoding of the kept tokens would: it drew
    once per row, and the rows past the accepted run were never tokens of the output."""
    kept = len(accept_greedy(request.draft_token_ids, targets))
    if kept < len(targets):
        request.generator.set_state(state)
        skip_draws(request.generator, kept, vocab_size)


def _outputs_so_far(requests: list[Request]) -> list[list[int]]:
    """Per logits row, the output its token would follow: a speculating request's rows
    (consecutive) see one more of its drafts each (a tree's: the drafts on the way to its
    node), so min_tokens, penalties and logit bias apply as in one-token decoding."""
    outputs, seen = [], 0
    for row, request in enumerate(requests):
        seen = seen + 1 if row and request is requests[row - 1] else 0
        if not seen:
            outputs.append(request.output_token_ids)
        elif request.draft_parents is not None:
            if seen == 1:
                paths = tree.paths(request.draft_token_ids, request.draft_parents)
            outputs.append(request.output_token_ids + paths[seen])
        else:
            outputs.append(request.output_token_ids + request.draft_token_ids[:seen])
    return outputs


@torch.inference_mode()
def forward_once(model: torch.nn.Module, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits ``[len(token_ids), vocab]`` for one sequence in a throwaway cache (scoring, tests)."""
    cache = PagedKVCache(model.config, num_blocks=-(-len(token_ids) // block_size), block_size=block_size)
    return model.compute_logits(prefill_once(model, token_ids, cache)).float()


@torch.inference_mode()
def prefill_once(model: torch.nn.Module, token_ids: list[int], cache: PagedKVCache) -> torch.Tensor:
    """One sequence's final hidden states ``[len(token_ids), hidden]``, its keys and values written
    into ``cache`` from slot 0 on (read back by KV calibration; no logits are computed)."""
    n = len(token_ids)
    states = StateCache(model.config, num_slots=1) if model.config.has_state else None
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n),
        query_start_loc=[0, n],
        context_lens=[n],
        block_tables=torch.arange(cache.num_blocks)[None],
        num_prefills=1,
        state_slots=torch.zeros(1, dtype=torch.long) if states is not None else None,
    )
    return model(torch.tensor(token_ids), torch.arange(n), layer_caches(cache.layers, states), meta)
