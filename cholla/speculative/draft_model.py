"""Draft-model speculation: a smaller model with the same vocabulary proposes K tokens greedily.

The draft runs through cholla's own ``ModelRunner`` on its own paged KV cache (its own
``BlockManager``, no prefix cache), all speculating sequences in one packed batch: the
first forward catches each sequence's draft cache up on the tokens it has not seen (the
whole prompt the first time, then the tokens accepted since) and proposes the first draft;
each later forward feeds every sequence its previous draft, one row each. K drafts cost K
draft forwards, however many sequences speculate.

The draft cache follows the target lazily: it remembers which drafts it wrote after the
sequence's tokens, and at the next proposal keeps only those the target accepted (their
common prefix with the sequence as it is now), handing back the blocks past them. A
sequence that decoded plainly for a while (the batch was large, or it was backing off)
simply has more to catch up on. Its draft blocks go back when it finishes, is aborted or
is preempted. As at most ``MAX_SPECULATING_SEQS`` sequences speculate at once, only as
many hold draft blocks; the cache is sized for them at full length, within ``DRAFT_CACHE_SHARE``
of the target's KV memory (a sequence longer than the draft cache holds decodes plainly).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cholla.engine.request import Request
from cholla.engine.runner import ModelRunner
from cholla.engine.scheduler import ScheduledBatch
from cholla.errors import InvalidRequestError
from cholla.kv.block_manager import BlockManager, SequenceBlocks
from cholla.kv.kv_types import KVCacheType
from cholla.kv.paged_cache import PagedKVCache, bytes_per_block
from cholla.models.loader import LoadedModel, load_model
from cholla.sampling.params import SamplingParams
from cholla.speculative.speculator import (
    MAX_SPECULATING_SEQS,
    NgramSpeculator,
    can_speculate,
)
from cholla.tokenizer.tokenizer import Tokenizer

log = logging.getLogger("cholla")

GREEDY = SamplingParams(temperature=0.0, max_tokens=None)
# The most of the target's KV cache memory the draft's cache takes.
DRAFT_CACHE_SHARE = 0.5


def check_vocabularies(target: Tokenizer, draft: Tokenizer) -> None:
    """The draft's token ids must mean what the target's mean: same size, same token strings."""
    if target.vocab_size != draft.vocab_size:
        raise InvalidRequestError(
            f"the draft model's vocabulary has {draft.vocab_size} tokens but the target's has {target.vocab_size}: "
            "a draft model must share the target's tokenizer; choose one from the same model family"
        )
    target_vocab = target.backend.get_vocab(with_added_tokens=True)
    if target_vocab != draft.backend.get_vocab(with_added_tokens=True):
        draft_ids = {i: t for t, i in draft.backend.get_vocab(with_added_tokens=True).items()}
        token, token_id = min(((t, i) for t, i in target_vocab.items() if draft_ids.get(i) != t), key=lambda x: x[1])
        raise InvalidRequestError(
            f"the draft model's vocabulary has the target's size ({target.vocab_size} tokens) but other tokens "
            f"(id {token_id} is {token!r} in the target, {draft_ids.get(token_id)!r} in the draft): "
            "a draft model must share the target's tokenizer; choose one from the same model family"
        )


@dataclass
class DraftSequence:
    """One sequence's place in the draft cache: its blocks hold the K/V of its first ``base``
    tokens and then of ``fed``, the drafts written at the last proposal."""

    blocks: SequenceBlocks = field(default_factory=SequenceBlocks)
    base: int = 0
    fed: list[int] = field(default_factory=list)

    def kept(self, token_ids: list[int]) -> int:
        """How many leading tokens of ``token_ids`` the cache holds: ``base`` plus the drafts the target accepted."""
        accepted = 0
        for draft, token in zip(self.fed, token_ids[self.base :]):
            if draft != token:
                break
            accepted += 1
        return min(self.base + accepted, len(token_ids) - 1)  # the last token is always fed again: it gives the logits


def draft_greedily(runner: ModelRunner, views: list[tuple[Request, int]]) -> None:
    """Run each view (a sequence as the drafting model sees it: its tokens, with its cache
    holding the first ``num_computed_tokens``) forward until it has ``limit`` greedy drafts in
    its ``output_token_ids``; every view that still drafts shares one forward per position."""
    # Sequences with more than their last token to catch up on go first, as prefill chunks.
    views = sorted(views, key=lambda item: item[0].num_tokens - item[0].num_computed_tokens == 1)
    for position in range(max((limit for _, limit in views), default=0)):
        step = [view for view, limit in views if limit > position]
        num_tokens = [view.num_tokens - view.num_computed_tokens for view in step]
        batch = ScheduledBatch(step, num_tokens, num_prefills=sum(n > 1 for n in num_tokens))
        for view, n, token in zip(step, num_tokens, runner.execute(batch).token_ids):
            view.num_computed_tokens += n
            view.output_token_ids.append(token)


class DraftModelSpeculator:
    """Greedy drafts of up to ``k`` tokens from a draft model, for every decoding sequence that can use them."""

    record = staticmethod(NgramSpeculator.record)  # the same per-sequence back-off as prompt lookup
    draft_cost = 0.0  # not charged: which draft model pays is the user's choice (docs/benchmarks.md)
    asks_full_limit = False  # each drafted token is a run of the draft model

    def __init__(self, loaded: LoadedModel, k: int, num_blocks: int, block_size: int,
                 k_type: KVCacheType, v_type: KVCacheType, target_vocab_size: int, eos_token_ids: set[int]):
        self.k = k
        self.loaded = loaded
        self.target_vocab_size = target_vocab_size
        self.kv_cache = PagedKVCache(loaded.config, num_blocks, block_size, k_type, v_dtype=v_type)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(loaded.model, self.kv_cache, eos_token_ids)
        self.max_len = min(num_blocks * block_size, loaded.config.max_position_embeddings)
        self.sequences: dict[str, DraftSequence] = {}  # by request id

    @classmethod
    def load(cls, model: str | os.PathLike | LoadedModel, dtype: str, target: LoadedModel, target_tokenizer: Tokenizer,
             k: int, target_kv_bytes: int, max_model_len: int, block_size: int, k_type: KVCacheType,
             v_type: KVCacheType) -> DraftModelSpeculator:
        """Load (or take) the draft model, check it can draft for ``target``, and size its cache."""
        from cholla.download import resolve_model
        from cholla.engine.engine import calibrate_kv_cache, load_tokenizer

        loaded = model if isinstance(model, LoadedModel) else load_model(resolve_model(model), dtype)
        if loaded.config.has_state:
            raise InvalidRequestError(
                f"draft model {Path(loaded.path).name} has recurrent (hybrid) layers, whose state cannot roll back "
                "rejected drafts; choose a draft model with attention layers only"
            )
        tokenizer = load_tokenizer(loaded)
        check_vocabularies(target_tokenizer, tokenizer)
        block_bytes = bytes_per_block(loaded.config, block_size, k_type, v_type)
        wanted = MAX_SPECULATING_SEQS * -(-(max_model_len + k) // block_size)
        num_blocks = max(1, min(wanted, int(target_kv_bytes * DRAFT_CACHE_SHARE) // block_bytes))
        log.info("draft model %s: KV cache of %d blocks (%.0f MiB), K=%d", Path(loaded.path).name, num_blocks,
                 num_blocks * block_bytes / 2**20, k)
        eos = set(tokenizer.eog_token_ids) | set(loaded.config.eos_token_ids)
        speculator = cls(loaded, k, num_blocks, block_size, k_type, v_type, target.config.vocab_size, eos)
        calibrate_kv_cache(loaded.model, tokenizer, speculator.kv_cache)  # calibrated KV types: the draft's own statistics
        return speculator

    def propose_batch(self, requests: list[Request], limits: list[int]) -> list[list[int]]:
        """Up to ``min(k, limit)`` greedy drafts per decoding request ([] where it should not speculate)."""
        drafts: list[list[int]] = [[] for _ in requests]
        active: list[tuple[int, Request, int]] = []  # (index in requests, the draft's view of it, drafts wanted)
        for i, (request, limit) in enumerate(zip(requests, limits)):
            limit = min(self.k, limit)
            if (limit <= 0 or len(request.output_token_ids) < request.speculation.resume_at
                    or not can_speculate(request.params)):
                continue
            view = self._catch_up(request, limit)
            if view is not None:
                active.append((i, view, limit))
        draft_greedily(self.runner, [(view, limit) for _, view, limit in active])
        for i, view, limit in active:
            drafts[i] = list(view.output_token_ids)
            sequence = self.sequences[requests[i].request_id]
            sequence.base, sequence.fed = len(view.prompt_token_ids), view.output_token_ids[: limit - 1]
            # The draft's logits may be wider than the target's (padded embeddings): the target can't take such ids.
            cut = next((j for j, token in enumerate(drafts[i]) if token >= self.target_vocab_size), len(drafts[i]))
            drafts[i] = drafts[i][:cut]
        return drafts

    def _catch_up(self, request: Request, limit: int) -> Request | None:
        """The draft's view of ``request``: its tokens, blocks for them and ``limit - 1`` drafts, and how
        many the draft cache already holds; None when the draft cache cannot take them."""
        token_ids = request.all_token_ids
        needed = len(token_ids) + limit - 1
        if needed > self.max_len:
            return None
        sequence = self.sequences.setdefault(request.request_id, DraftSequence())
        kept = sequence.kept(token_ids)
        self.block_manager.trim(sequence.blocks, kept)  # rejected drafts' blocks go back
        if not self.block_manager.allocate(sequence.blocks, needed):
            return None
        sequence.base, sequence.fed = kept, []  # until this proposal has run
        return Request(request.request_id, token_ids, GREEDY, blocks=sequence.blocks, num_computed_tokens=kept)

    def observe(self, token_ids: list[int]) -> None:
        """A request's tokens (the n-gram method's shared cache learns from them): a draft model keeps nothing."""

    def release(self, request: Request) -> None:
        """The request finished, was aborted or preempted: its draft blocks go back."""
        sequence = self.sequences.pop(request.request_id, None)
        if sequence is not None:
            self.block_manager.free(sequence.blocks)
