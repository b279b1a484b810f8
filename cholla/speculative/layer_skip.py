"""Self-speculative drafting by layer skipping (LayerSkip, SWIFT, Draft & Verify).

The draft is the target model itself with some of its decoder layers left out: the same
weights, the same embeddings and head, and the target's own KV cache for the layers it runs.
``skipping(model, keep)`` is that model as a view (a shallow copy whose ``layers`` are the
kept ones), so the model files know nothing of speculation and the fused decode step plans
the view like any model. Each proposal runs the view greedily through ``draft_model``'s
``draft_greedily``, one forward per drafted position for all speculating sequences.

The cache: a sequence's drafted positions (its last token and all but the last draft)
write K/V into its own blocks, in the kept layers only, at slots past its computed
tokens. The verification step that follows runs every layer on those positions and
overwrites them; a sequence that is not verified recomputes them before anything reads
them, as every position is written by the step that computes it. Earlier positions are
read as the full model wrote them. The slots come from blocks taken for the proposal and
handed back right after it (only free ones: a draft never evicts a cached prefix), so the
scheduler allocates exactly as for any other method.

Drafting costs real forwards: each drafted token costs about the kept layers' and the
head's share of a decode step (``draft_cost``, from their weight bytes), which
``speculator.allot`` charges before it asks for drafts. Without ``--spec-skip-layers`` the
skipped layers are chosen once at start (SWIFT's idea, on a fixed text instead of the
prompt): a few middle blocks and interleavings are tried on ``CALIBRATION_TEXT``, and the
set whose greedy tokens agree with the full model's often enough to yield the most tokens
per unit of cost is kept. On the small models here it never pays (docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence

import torch
from torch import nn

from cholla.engine.request import Request
from cholla.engine.runner import ModelRunner
from cholla.errors import InvalidRequestError
from cholla.kv.block_manager import BlockManager
from cholla.kv.paged_cache import PagedKVCache
from cholla.layers.attention import AttentionMetadata
from cholla.layers.linear import Linear
from cholla.models.decoder import DecoderModel
from cholla.models.gemma3 import Gemma3ForCausalLM
from cholla.speculative.draft_model import GREEDY, draft_greedily
from cholla.speculative.speculator import NgramSpeculator, can_speculate, step_cost

log = logging.getLogger("cholla")

# Calibration text tokens the skip-set search scores (the head's logits on each).
SEARCH_TOKENS = 48
# Fractions of the layers the search tries to skip.
SEARCH_FRACTIONS = (0.125, 0.25)
# Models whose forward is embeddings, then layer i on cache i, then the head: a view of
# some layers is then the model without the others (Gemma 4 shares KV across layers).
_STACK_FORWARDS = (DecoderModel.forward, Gemma3ForCausalLM.forward)


def parse_skip_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """The layers to skip, sorted: ``"8-15"``, ``"4,6,8"``, ``"4-20:2"`` (every 2nd) or a list of
    indices. A one-line ``InvalidRequestError`` for bad syntax, an index out of ``[0, num_layers)``
    or a set that skips every layer (the draft must run at least one)."""
    if isinstance(spec, str):
        skipped: set[int] = set()
        for part in filter(None, (p.strip() for p in spec.split(","))):
            match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
            if match is None or (match[3] is not None and int(match[3]) < 1):
                raise InvalidRequestError(
                    f"spec_skip_layers (--spec-skip-layers) {spec!r}: {part!r} is not a layer index, a range A-B "
                    "or a strided range A-B:S (e.g. '8-15' or '4,6,8')")
            first = int(match[1])
            last = int(match[2]) if match[2] is not None else first
            skipped.update(range(first, last + 1, int(match[3] or 1)))
    else:
        if any(isinstance(i, bool) or not isinstance(i, int) for i in spec):
            raise InvalidRequestError(f"spec_skip_layers must be layer indices (integers), got {list(spec)!r}")
        skipped = set(spec)
    outside = sorted(i for i in skipped if not 0 <= i < num_layers)
    if outside:
        raise InvalidRequestError(
            f"spec_skip_layers: layer {outside[0]} is out of range; this model has layers 0-{num_layers - 1}")
    if not skipped:
        raise InvalidRequestError("spec_skip_layers names no layer; give the layers the draft leaves out, e.g. '8-15'")
    if len(skipped) == num_layers:
        raise InvalidRequestError(
            f"spec_skip_layers skips all {num_layers} layers; the draft must run at least one")
    return sorted(skipped)


def check_model(model: nn.Module, architecture: str) -> None:
    """Layer skipping needs a model whose layer ``i`` reads and writes only cache ``i``."""
    if type(model).forward not in _STACK_FORWARDS or not isinstance(getattr(model, "layers", None), nn.ModuleList):
        raise InvalidRequestError(
            f"layer-skip speculation does not support {architecture}: its layers do not each run on their own "
            "cache alone; choose another --speculative-method")


def skipping(model: nn.Module, keep: list[int]) -> nn.Module:
    """``model`` running only layers ``keep`` (a view: the same modules and weights; its forward
    takes the kept layers' caches). Its fused decode plan is its own (``fused_decode``)."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view._modules["layers"] = nn.ModuleList(model.layers[i] for i in keep)
    return view


def _weight_bytes(module: nn.Module) -> int:
    total = 0
    for linear in module.modules():
        if isinstance(linear, Linear) and linear.weight is not None:
            weight = linear.weight
            total += weight.num_bytes if hasattr(weight, "num_bytes") else weight.nbytes
    return total


def draft_cost_of(model: nn.Module, keep: list[int]) -> float:
    """A drafted token's cost relative to a one-row decode step: the weight bytes it reads (the
    kept layers and the head) over a full step's. Decode is bound by those reads."""
    head = _weight_bytes(model.lm_head)
    layers = [_weight_bytes(layer) for layer in model.layers]
    return (head + sum(layers[i] for i in keep)) / (head + sum(layers))


@torch.inference_mode()
def logits_of(model: nn.Module, token_ids: list[int], keep: list[int]) -> torch.Tensor:
    """Logits ``[len(token_ids), vocab]`` of ``model`` running layers ``keep``, in a throwaway fp32 cache."""
    n = len(token_ids)
    cache = PagedKVCache(model.config, num_blocks=-(-n // 16), block_size=16)
    meta = AttentionMetadata(slot_mapping=torch.arange(n), query_start_loc=[0, n], context_lens=[n],
                             block_tables=torch.arange(cache.num_blocks)[None], num_prefills=1)
    view = model if len(keep) == len(model.layers) else skipping(model, keep)
    hidden = view(torch.tensor(token_ids), torch.arange(n), [cache.layers[i] for i in keep], meta)
    return view.compute_logits(hidden).float()


def expected_rate(agreement: float, draft_cost: float, k: int, table: tuple[tuple[int, float], ...]) -> float:
    """Tokens per unit of cost of a single stream that drafts its best number (up to ``k``) of
    tokens each step, each accepted with probability ``agreement`` (1.0: plain decoding's rate)."""
    best, tokens = 1.0, 1.0
    for j in range(1, k + 1):
        tokens += agreement ** j
        best = max(best, tokens / (step_cost(table, 1 + j) + draft_cost * j))
    return best


def search(model: nn.Module, token_ids: list[int], k: int, table: tuple[tuple[int, float], ...]) -> list[int]:
    """The skip set, of a few middle blocks and interleavings of the layers, whose greedy tokens on
    ``token_ids`` agree with the full model's often enough to yield the most tokens per unit of cost
    (``expected_rate``); ties go to the set that agrees more. Logs what it measured."""
    num_layers = len(model.layers)
    full = logits_of(model, token_ids, list(range(num_layers))).argmax(dim=-1)
    candidates: list[list[int]] = []
    for fraction in SEARCH_FRACTIONS:
        n = max(1, round(num_layers * fraction))
        if n > num_layers - 2:
            continue
        start = (num_layers - n) // 2
        candidates.append(list(range(start, start + n)))  # a block in the middle
        start = (num_layers - 2 * n) // 2
        if start >= 1:
            candidates.append(list(range(start + 1, start + 2 * n, 2)))  # every other layer around the middle
    if not candidates:  # a one- or two-layer model: the draft runs its first layer
        candidates.append(list(range(1, num_layers)) or [0])
    scored = []
    for skipped in {tuple(c) for c in candidates if len(c) < num_layers}:
        keep = [i for i in range(num_layers) if i not in skipped]
        agreement = float((logits_of(model, token_ids, keep).argmax(dim=-1) == full).float().mean())
        cost = draft_cost_of(model, keep)
        scored.append((expected_rate(agreement, cost, k, table), agreement, cost, list(skipped)))
    rate, agreement, cost, skipped = max(scored)
    log.info("layer skip: skipping layers %s (of %d): %.0f%% of greedy tokens agree on the calibration text, a draft "
             "costs %.2f of a decode step; expected %.2fx plain decoding's tokens per unit of cost%s", skipped,
             num_layers, 100 * agreement, cost, rate, "" if rate > 1 else " (it does not pay: sequences decode plainly "
             "unless their drafts prove better)")
    return skipped


class LayerSkipSpeculator:
    """Greedy drafts of up to ``k`` tokens from the target with ``skipped`` layers left out, written
    into the target's own cache (module doc)."""

    record = staticmethod(NgramSpeculator.record)  # the same per-sequence back-off as prompt lookup
    asks_full_limit = False  # each drafted token is a pass of the target's kept layers

    def __init__(self, model: nn.Module, kv_cache: PagedKVCache, block_manager: BlockManager, k: int,
                 skipped: list[int], eos_token_ids: set[int], table: tuple[tuple[int, float], ...]):
        self.k = k
        self.skipped = skipped
        keep = [i for i in range(len(model.layers)) if i not in set(skipped)]
        self.draft_cost = draft_cost_of(model, keep)
        if expected_rate(1.0, self.draft_cost, k, table) <= 1.0:
            log.warning("layer skip: a draft without layers %s costs %.2f of a decode step, which even drafts that "
                        "were always right cannot repay here; requests will decode plainly", skipped, self.draft_cost)
        self.block_manager = block_manager
        view_cache = copy.copy(kv_cache)  # the kept layers' caches: the runner pairs them with the view's layers
        view_cache.layers = [kv_cache.layers[i] for i in keep]
        self.runner = ModelRunner(skipping(model, keep), view_cache, eos_token_ids)

    def propose_batch(self, requests: list[Request], limits: list[int]) -> list[list[int]]:
        """Up to ``min(k, limit)`` greedy drafts per decoding request ([] where it should not speculate)."""
        manager = self.block_manager
        drafts: list[list[int]] = [[] for _ in requests]
        active: list[tuple[int, Request, int, int]] = []  # (index, view, drafts wanted, blocks it had)
        for i, (request, limit) in enumerate(zip(requests, limits)):
            limit = min(self.k, limit)
            if limit <= 0 or len(request.output_token_ids) < request.speculation.resume_at \
                    or not can_speculate(request.params):
                continue
            # Slots for the positions the draft feeds: the last token's and all drafts' but the last.
            num_tokens = request.num_tokens + limit - 1
            held = len(request.blocks.block_table)
            if manager.blocks_needed(request.blocks, num_tokens) > manager.allocator.num_free:
                continue  # only blocks nobody holds, not even the prefix cache
            manager.allocate(request.blocks, num_tokens)
            view = Request(request.request_id, request.all_token_ids, GREEDY, blocks=request.blocks,
                           num_computed_tokens=request.num_computed_tokens)
            active.append((i, view, limit, held))
        draft_greedily(self.runner, [(view, limit) for _, view, limit, _ in active])
        for i, view, _, held in active:
            drafts[i] = list(view.output_token_ids)
            manager.trim(view.blocks, held * manager.block_size)  # the proposal's blocks go back
        return drafts

    def observe(self, token_ids: list[int]) -> None:
        """A request's tokens (the n-gram method's shared cache learns from them): nothing to keep here."""

    def release(self, request: Request) -> None:
        """The request finished, was aborted or preempted: its blocks are the scheduler's to free."""
