"""The synchronous engine. ``step()`` is the whole loop: schedule, run, postprocess."""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from cholla.engine.metrics import EngineMetrics, EngineStats
from cholla.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from cholla.engine.request import Request
from cholla.engine.runner import ModelRunner, prefill_once
from cholla.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from cholla.errors import ContextLengthError, InvalidRequestError
from cholla.kv.block_manager import BlockManager
from cholla.kv.calibration import CALIBRATION_TEXT, fill_statistics, needs_calibration
from cholla.kv.disk_tier import DEFAULT_OFFLOAD_GIB, DiskTier, cache_parts, fingerprint
from cholla.kv.kv_types import KVCacheType, kv_cache_type
from cholla.kv.paged_cache import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_SEQS, PagedKVCache, fit_kv_types, plan_layout
from cholla.kv.state_cache import SlotAllocator, StateCache, StateSnapshots
from cholla.models.loader import LoadedModel, load_model, resolve_dtype
from cholla.sampling.params import SamplingParams
from cholla.sampling.stop import find_stop, safe_prefix_len
from cholla.sampling.structured import DEAD_END, StructuredOutputs
from cholla.speculative import layer_skip, tree
from cholla.speculative.config import (
    DEFAULT_NGRAM_CACHE_SIZE,
    DEFAULT_SPECULATIVE_TOKENS,
    DEFAULT_TREE_BUDGET,
    check_speculative,
)
from cholla.speculative.draft_model import DraftModelSpeculator
from cholla.speculative.speculator import STEP_COST, NgramSpeculator, NgramTreeSpeculator, Speculator
from cholla.speculative.verify import accept_greedy
from cholla.heap import keep_buffers_mapped, release_free_memory
from cholla.threads import set_threads
from cholla.tokenizer.detokenizer import IncrementalDetokenizer
from cholla.tokenizer.tokenizer import Tokenizer

log = logging.getLogger("cholla")

DEFAULT_KV_CACHE_MEMORY = 2 * 1024**3
# Once prefill chunks of this many tokens in all have run, the first step that
# is (nearly) all decoding hands their freed activations back to the OS
# (cholla/heap.py keeps freed buffers for reuse, and decoding reuses few of
# them): Gemma 3's 2048-token chunks leave ~100 MiB behind.
RELEASE_AFTER_PREFILL_TOKENS = 1024
SMALL_PREFILL_TOKENS = 256  # a step prefilling fewer needs little activation memory


@dataclass
class EngineConfig:
    max_model_len: int | None = None  # default: the model's context, capped by the KV cache
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS  # running sequences at most (a model with state: at most its slots)
    max_num_batched_tokens: int = 2048
    kv_cache_memory: int | None = None  # bytes; wins over kv_cache_fraction
    kv_cache_fraction: float | None = None  # of the RAM available at start; default: min(2 GiB, 1/4)
    block_size: int = DEFAULT_BLOCK_SIZE
    enable_prefix_caching: bool = True
    dtype: str = "auto"  # "float32", "bfloat16" or "auto" (cholla.models.loader.DTYPES)
    threads: int | None = None  # torch threads, fixed; default adapts per step (cholla/threads.py)
    # What the KV cache holds (cholla/kv/kv_types.py): "auto" is the matmuls' dtype (bf16 or f32);
    # cache_type_k / cache_type_v, where given, override it for one side (llama.cpp's flags).
    kv_cache_dtype: str = "auto"
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    # The KV cache's disk tier (cholla/kv/disk_tier.py): evicted prefix-cache blocks are kept in files
    # under this folder, up to kv_offload_gib GiB, and read back by later requests and restarts.
    kv_offload_dir: str | None = None
    kv_offload_gib: float = DEFAULT_OFFLOAD_GIB
    speculative_method: str | None = None  # "ngram" (prompt lookup), "draft", "tree"; None: no speculation
    num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS  # K: drafts verified per step and sequence
    draft_model: str | Path | LoadedModel | None = None  # with "draft": a model sharing the target's vocabulary
    speculative_ngram_cache_size: int = DEFAULT_NGRAM_CACHE_SIZE  # "ngram", "tree": n-grams shared across requests; 0: off
    spec_tree_budget: int = DEFAULT_TREE_BUDGET  # "tree": drafted nodes (rows) per step and sequence, depth <= K
    # "layer_skip": the layers its draft leaves out ("8-15", "4,6,8", "4-20:2" or indices); None: searched at start
    spec_skip_layers: str | list[int] | None = None


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3


def _kv_cache_budget(config: EngineConfig) -> int:
    """Bytes for the KV cache: given outright, as a fraction of free memory, or the default."""
    if config.kv_cache_memory:
        return config.kv_cache_memory
    if config.kv_cache_fraction is not None:
        if not 0.0 < config.kv_cache_fraction <= 0.95:
            raise InvalidRequestError(f"kv_cache_fraction must be in (0, 0.95], got {config.kv_cache_fraction}")
        return int(_available_memory() * config.kv_cache_fraction)
    return min(DEFAULT_KV_CACHE_MEMORY, _available_memory() // 4)


def kv_cache_types(config: EngineConfig, compute_dtype: str) -> tuple[KVCacheType, KVCacheType]:
    """(K type, V type) for an engine whose matmuls run in ``compute_dtype``."""
    both = config.kv_cache_dtype
    return (kv_cache_type(config.cache_type_k or both, compute_dtype),
            kv_cache_type(config.cache_type_v or both, compute_dtype))


def load_tokenizer(loaded: LoadedModel) -> Tokenizer:
    if loaded.gguf is not None:
        return Tokenizer.from_gguf(loaded.gguf.metadata)
    return Tokenizer.from_hf_dir(loaded.path)


def calibrate_kv_cache(model: torch.nn.Module, tokenizer: Tokenizer, cache: PagedKVCache) -> None:
    """Measure the calibrated KV types' per-channel statistics (``kv/calibration.py``) on the
    model's own keys and values for the calibration text; nothing to do for other types."""
    if not needs_calibration(cache.layers):
        return
    ids = tokenizer.encode(CALIBRATION_TEXT)
    bos = model.config.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    probe = PagedKVCache(model.config, -(-len(ids) // cache.block_size), cache.block_size, torch.float32)
    prefill_once(model, ids, probe)
    fill_statistics(cache.layers, probe.layers, len(ids))


def _close_disk_tier(block_manager: BlockManager) -> None:
    disk = block_manager.disk
    if disk is not None and not disk.closed:
        block_manager.offload_cached()
        disk.close()
        block_manager.disk = None  # an engine used after close() goes on without the tier
        log.info("KV offload: %d blocks read back, %d written, %d dropped, %d removed as unsound",
                 disk.stats.hits, disk.stats.writes, disk.stats.dropped, disk.stats.invalid)


class _RequestState:
    """Text-side state of one request: incremental detokenization and stop strings.

    Tokens go through the detokenizer where the text is read (``LLMEngine._text``): each step
    for a request with stop strings (matched on the text), else for an output or at the end;
    ``pending`` holds those not yet through. ``LLM.generate`` reads no text before the end: its
    requests' tokens then go through in one run, not one a step between kernels that leave every
    cache cold. The same detokenizer steps in the same order: the same text.
    """

    def __init__(self, request: Request, detokenizer: IncrementalDetokenizer, prompt: str | None, index: int):
        self.request, self.detokenizer, self.prompt, self.index = request, detokenizer, prompt, index
        self.text = ""  # the text of the tokens through the detokenizer
        self.pending: list[int] = []


class LLMEngine:
    def __init__(self, model: str | Path | LoadedModel, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        check_speculative(config.speculative_method, config.num_speculative_tokens, config.draft_model,
                          config.speculative_ngram_cache_size, config.spec_tree_budget, config.spec_skip_layers)
        key_type, _ = kv_cache_types(config, "float32")  # a misspelt KV type fails before the model loads
        if config.speculative_method == "tree" and key_type.channel_keys:
            # A tree's accepted path moves K/V slot by slot; these keys' statistics span a block.
            raise InvalidRequestError(f"--speculative-method tree cannot move {key_type.name} keys (their statistics "
                                      "span a block): use --speculative-method ngram, or another --cache-type-k")
        keep_buffers_mapped()
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, config.dtype)
        set_threads(config.threads)  # after loading: a corrupt file's error stays the only line printed
        if config.dtype != "auto" and self.loaded.dtype != resolve_dtype(config.dtype):
            raise InvalidRequestError(
                f"the model was loaded with dtype {self.loaded.dtype} but the engine asks for {config.dtype}; "
                "load it again with load_model(path, dtype)"
            )
        self.model_config = self.loaded.config
        if config.speculative_method and self.model_config.has_state:
            raise InvalidRequestError(
                f"speculative decoding is not supported for {self.model_config.architecture}: its recurrent state "
                "cannot roll back rejected drafts; run it without a speculative method")
        self.tokenizer = load_tokenizer(self.loaded)
        self.eos_token_ids = set(self.tokenizer.eog_token_ids) | set(self.model_config.eos_token_ids)
        release_free_memory()  # what loading freed (see cholla/heap.py)

        memory = _kv_cache_budget(config)
        # "auto" holds K and V in the matmuls' dtype: bf16 halves the bytes each decode step reads.
        k_type, v_type = fit_kv_types(self.model_config, *kv_cache_types(config, self.loaded.dtype))
        layout = plan_layout(self.model_config, memory, config.block_size, k_type, v_type, config.max_model_len,
                             config.max_num_seqs, config.enable_prefix_caching)
        num_blocks, max_len = layout.num_blocks, layout.max_model_len
        if self.model_config.has_state and layout.num_slots == 0:
            raise InvalidRequestError(
                f"a cache of {memory / 2**20:.0f} MiB holds no sequence's recurrent state "
                f"({layout.slot_bytes / 2**20:.2f} MiB each); raise the KV cache memory"
            )
        if layout.num_blocks == 0 or layout.num_tokens < max_len:
            raise InvalidRequestError(
                f"a KV cache of {memory / 2**20:.0f} MiB holds {layout.num_tokens} tokens, "
                f"fewer than max_model_len={max_len}; raise the KV cache memory or lower max_model_len"
            )
        self.max_model_len, self.kv_layout = max_len, layout
        self.kv_cache = PagedKVCache(self.model_config, num_blocks, config.block_size, k_type, v_dtype=v_type,
                                     max_num_seqs=config.max_num_seqs)
        calibrate_kv_cache(self.loaded.model, self.tokenizer, self.kv_cache)
        log.info(
            "KV cache: %d blocks of %d tokens (%.0f MiB, K %s, V %s, %d bytes per token, %.0f tokens per GiB), "
            "%d tokens%s; maximum concurrency for %d-token requests: %.2fx",
            num_blocks, config.block_size, layout.nbytes / 2**20, k_type.name, v_type.name,
            layout.block_bytes // config.block_size, layout.tokens_per_gib, layout.num_tokens,
            f"; state cache: {layout.num_slots} slots of {layout.slot_bytes} bytes per sequence "
            f"({layout.state_nbytes / 2**20:.1f} MiB)" if layout.slot_bytes else "",
            max_len, layout.max_concurrency,
        )
        self.state_cache = StateCache(self.model_config, layout.num_slots) if layout.slot_bytes else None
        prefix_caching = config.enable_prefix_caching
        self.snapshots: StateSnapshots | None = None  # a model with state: its prefix cache's states
        if prefix_caching and self.model_config.has_state:
            if layout.num_snapshots:
                self.snapshots = StateSnapshots(self.state_cache, self.model_config, layout.num_snapshots)
                log.info("prefix caching for %s resumes from state snapshots at block boundaries: %d snapshots "
                         "(%.1f MiB)", self.model_config.architecture, layout.num_snapshots,
                         layout.snapshot_nbytes / 2**20)
            else:
                # Cached blocks hold K/V, not the recurrent state at their end: without snapshots a hit would be wrong.
                log.info("prefix caching is off for %s: not one snapshot of its recurrent state (%d bytes) fits "
                         "beside the state slots; raise the KV cache memory", self.model_config.architecture,
                         layout.slot_bytes)
                prefix_caching = False
        self.block_manager = BlockManager(num_blocks, config.block_size, prefix_caching,
                                          self._disk_tier(k_type, v_type))
        self._close_disk = weakref.finalize(self, _close_disk_tier, self.block_manager)
        self.speculator: Speculator | None = None
        if config.speculative_method == "ngram":
            self.speculator = NgramSpeculator(config.num_speculative_tokens, config.speculative_ngram_cache_size)
        elif config.speculative_method == "tree":
            self.speculator = NgramTreeSpeculator(config.num_speculative_tokens, config.spec_tree_budget,
                                                  config.speculative_ngram_cache_size)
        elif config.speculative_method == "draft":
            self.speculator = DraftModelSpeculator.load(
                config.draft_model, self.loaded.dtype, self.loaded, self.tokenizer, config.num_speculative_tokens,
                layout.nbytes, max_len, config.block_size, k_type, v_type)
        elif config.speculative_method == "layer_skip":
            self.speculator = self._layer_skip_speculator()
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, max(config.max_num_batched_tokens, 1), max_len,
                            STEP_COST[self.loaded.dtype]), self.block_manager,
            self.speculator, SlotAllocator(layout.num_slots) if self.state_cache is not None else None,
            self.snapshots,
        )
        self.structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.runner = ModelRunner(self.loaded.model, self.kv_cache, self.eos_token_ids, self.structured,
                                  self.state_cache)
        self.states: dict[str, _RequestState] = {}
        self.metrics = EngineMetrics()
        self._prefill_tokens_held = 0  # prefilled since the heap was last released
        self._ids = itertools.count()

    def _layer_skip_speculator(self) -> layer_skip.LayerSkipSpeculator:
        """The target drafting for itself without some layers: those given, or the best of a few
        tried on the calibration text (``speculative/layer_skip.py``)."""
        model, k = self.loaded.model, self.config.num_speculative_tokens
        layer_skip.check_model(model, self.model_config.architecture)
        if self.config.spec_skip_layers is not None:
            skipped = layer_skip.parse_skip_layers(self.config.spec_skip_layers, len(model.layers))
        else:
            ids = self.tokenizer.encode(CALIBRATION_TEXT)[: layer_skip.SEARCH_TOKENS]
            skipped = layer_skip.search(model, ids, k, STEP_COST[self.loaded.dtype])
        return layer_skip.LayerSkipSpeculator(model, self.kv_cache, self.block_manager, k, skipped, self.eos_token_ids,
                                              STEP_COST[self.loaded.dtype])

    def _disk_tier(self, k_type: KVCacheType, v_type: KVCacheType) -> DiskTier | None:
        """The disk tier, when asked for and the prefix cache is on (not for models with recurrent state:
        their prefix cache also needs state snapshots, which stay in memory)."""
        config = self.config
        if not config.kv_offload_dir:
            return None
        if self.model_config.has_state:
            log.warning("KV offload is off: a model with recurrent state keeps its state snapshots in memory only")
            return None
        if not config.enable_prefix_caching:
            raise InvalidRequestError("the KV offload keeps prefix-cache blocks: it needs the prefix cache on")
        if not config.kv_offload_gib > 0:
            raise InvalidRequestError(f"kv_offload_gib must be positive, got {config.kv_offload_gib}")
        layers = self.kv_cache.layers
        tier = DiskTier(config.kv_offload_dir, int(config.kv_offload_gib * 2**30),
                        fingerprint(self.loaded.path, layers, config.block_size, f"K {k_type.name} V {v_type.name}",
                                    self.loaded.dtype), cache_parts(layers))
        log.info("KV offload: %s, %d blocks (%.2f of %.2f GiB) found", tier.dir, tier.num_files,
                 tier.bytes_on_disk / 2**30, config.kv_offload_gib)
        return tier

    def close(self) -> None:
        """Write the prefix cache's blocks to the disk tier and wait for every write (no-op without one),
        so a restart finds what this process computed. Runs by itself when the engine is collected or
        the interpreter exits."""
        self._close_disk()

    # -- requests -------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    def add_request(self, request_id: str | None, prompt: str | list[int] | dict, params: SamplingParams) -> list[str]:
        """Queue a prompt; returns the ids of its ``params.n`` sequences."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        text, token_ids = self.tokenize_prompt(prompt)
        self.check_prompt(token_ids, params)
        grammar = self.structured.compile(params.structured_outputs) if params.structured_outputs else None
        ids = []
        for i in range(params.n):
            sub_id = request_id if params.n == 1 else f"{request_id}#{i}"
            if sub_id in self.states:
                raise InvalidRequestError(f"request id {sub_id!r} is already in use")
            request = Request(sub_id, token_ids, params, grammar=grammar.matcher() if grammar else None)
            if params.seed is not None and i:
                request.generator = torch.Generator().manual_seed(params.seed + i)
            detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
            self.states[sub_id] = _RequestState(request, detok, text, i)
            self.scheduler.add(request)
            self.metrics.prompt_tokens += len(token_ids)
            ids.append(sub_id)
        return ids

    def check_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raise the error a request would meet, before it is queued (servers answer 400 with it)."""
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        params.verify_vocab(self.model_config.vocab_size)
        if max(token_ids) >= self.model_config.vocab_size or min(token_ids) < 0:
            raise InvalidRequestError(f"prompt token ids must lie in [0, {self.model_config.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {len(token_ids)} tokens but the context holds {self.max_model_len}; "
                "shorten the prompt or raise --max-model-len"
            )
        if params.structured_outputs is not None:
            self.structured.compile(params.structured_outputs)  # a bad schema, regex or grammar fails here

    def abort(self, request_id: str) -> None:
        """Stop a request (or all ``n`` sequences of it) and free its blocks now."""
        for sub_id in [k for k in self.states if k == request_id or k.startswith(f"{request_id}#")]:
            state = self.states.pop(sub_id)
            self.scheduler.finish(state.request, "abort")
            self.metrics.on_finish("abort", state.request.arrival_time, time.monotonic())

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # -- the loop -------------------------------------------------------------

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one step: the outputs of the requests it advanced (a stream shows each as it grows),
        or with ``finished_only`` of those it finished only (``LLM.generate`` reads nothing else,
        and each output copies its request's tokens so far)."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        prefill_tokens = sum(batch.num_tokens[: batch.num_prefills])
        if prefill_tokens < SMALL_PREFILL_TOKENS and self._prefill_tokens_held >= RELEASE_AFTER_PREFILL_TOKENS:
            release_free_memory()
            self._prefill_tokens_held = 0
        self._prefill_tokens_held += prefill_tokens
        result = self.runner.execute(batch)
        self.metrics.steps += 1
        self.metrics.batch_sizes.append(len(batch.requests))
        self.metrics.preemptions += len(batch.preempted)
        return self._postprocess(batch, result.token_ids, result.logprobs, result.dead_ends, result.prompt_logprobs,
                                 result.targets, result.target_logprobs, finished_only)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_free=bm.num_free_blocks,
            state_slots_total=self.state_cache.num_slots if self.state_cache is not None else 0,
            state_slots_free=self.scheduler.state_slots.num_free if self.state_cache is not None else 0,
            state_snapshots_restored=self.snapshots.restored if self.snapshots is not None else 0,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            prompt_tokens=self.metrics.prompt_tokens,
            generation_tokens=self.metrics.generation_tokens,
            preemptions=self.metrics.preemptions,
            spec_verifications=self.metrics.spec_verifications,
            spec_draft_tokens=self.metrics.spec_draft_tokens,
            spec_accepted_tokens=self.metrics.spec_accepted_tokens,
            kv_offload_blocks_read=bm.disk.stats.hits if bm.disk is not None else 0,
            kv_offload_blocks_written=bm.disk.stats.writes if bm.disk is not None else 0,
        )

    def _postprocess(self, batch: ScheduledBatch, tokens: list[int | None], logprobs: list,
                     dead_ends: set[int], prompt_logprobs: list | None = None,
                     targets: dict[int, list[int | None]] | None = None,
                     target_logprobs: dict[int, list] | None = None,
                     finished_only: bool = False) -> list[RequestOutput]:
        now = time.monotonic()
        outputs = []
        for i, (request, n, token, lp) in enumerate(zip(batch.requests, batch.num_tokens, tokens, logprobs)):
            state = self.states[request.request_id]
            if targets and i in targets:
                self._accept_drafts(state, targets[i], (target_logprobs or {}).get(i), now)  # counts its computed tokens
            else:
                request.num_computed_tokens += n
                if self.block_manager.fills_block(request.blocks, request.num_computed_tokens):  # all_token_ids is a new list
                    self.block_manager.cache_full_blocks(request.blocks, request.all_token_ids,
                                                         request.num_computed_tokens)
                if self.snapshots is not None:
                    self._snapshot(request)
                if prompt_logprobs is not None and prompt_logprobs[i] is not None:
                    request.prompt_logprobs += prompt_logprobs[i]
                if i in dead_ends:
                    self._end_grammar(state, request.grammar.error or DEAD_END)
                elif token is None:
                    if request.params.max_tokens != 0 or request.num_computed_tokens < request.num_tokens:
                        continue
                    # max_tokens=0: the prompt is scored (prompt logprobs), nothing is generated.
                    request.finish_reason = "length"
                    request.first_token_time = request.last_token_time = now
                else:
                    self._append_token(state, token, lp, now)
                    if request.grammar is not None and request.finish_reason is None:
                        self._advance_grammar(state, now)
            if request.finish_reason is not None or not finished_only:
                outputs.append(self._make_output(state))
            if request.finish_reason is not None:
                self.scheduler.finish(request, request.finish_reason)
                self.metrics.on_finish(request.finish_reason, request.arrival_time, now)
                del self.states[request.request_id]
        return outputs

    def _snapshot(self, request: Request) -> None:
        """Keep the request's state where this step left it exactly at a block boundary (the
        prefix its last full block's hash names), for a later request with that prefix."""
        hashes = request.blocks.block_hashes
        if hashes and len(hashes) * self.block_manager.block_size == request.num_computed_tokens:
            self.snapshots.save(hashes[-1], request.state_slot)

    def _accept_drafts(self, state: _RequestState, targets: list[int | None], logprobs: list | None,
                       now: float) -> None:
        """Keep the verified run of a speculating request and roll back the rest.

        The run is appended token by token, with its rows' logprobs, so a stop token,
        stop string, EOS, max_tokens or a grammar's end inside it ends the request exactly
        where one-token decoding would; where the grammar forces tokens after one, they are
        appended as one-token decoding does and the rest of the run (verified without them)
        is dropped. Only the kept tokens count as computed (the rejected drafts' K/V is
        overwritten later), only they can enter the prefix cache, and blocks taken for the
        rest go back. A token tree's accepted path (greedy requests only) first moves its
        K/V to the slots its tokens now own.
        """
        request = state.request
        drafts, request.draft_token_ids = request.draft_token_ids, []
        parents, request.draft_parents = request.draft_parents, None
        if parents is None:
            run = accept_greedy(drafts, targets)
        else:
            run, rows = tree.accept(tree.DraftTree(drafts, parents), targets)
            self._move_kv(request, tree.relocations(rows))
        self.speculator.record(request.speculation, len(drafts), len(run) - 1, len(request.output_token_ids) + len(run))
        self.metrics.on_verification(len(drafts), len(run) - 1)
        computed, kept = request.num_tokens - 1, 0
        for token, lp in zip(run, logprobs or [None] * len(run)):
            if token is None:  # the grammar allows nothing after the accepted drafts
                self._end_grammar(state, request.grammar.error or DEAD_END)
                break
            self._append_token(state, token, lp, now)
            kept += 1
            if request.finish_reason is not None or (request.grammar is not None and self._advance_grammar(state, now)):
                break
        request.num_computed_tokens = computed + kept  # the last kept token (and forced ones) are computed next step
        self.block_manager.cache_full_blocks(request.blocks, request.all_token_ids, request.num_computed_tokens)
        self.block_manager.trim(request.blocks, request.num_tokens)

    def _move_kv(self, request: Request, moves: list[tuple[int, int]]) -> None:
        """Copy K/V between the request's slots, ``moves`` as (from, to) offsets after its last
        computed token (the tree's root)."""
        if not moves:
            return
        table, block_size, root = request.blocks.block_table, self.block_manager.block_size, request.num_computed_tokens
        slot = [table[p // block_size] * block_size + p % block_size for p in (root + m for move in moves for m in move)]
        self.kv_cache.copy_slots(slot[0::2], slot[1::2])

    def _append_token(self, state: _RequestState, token: int, logprobs, now: float) -> None:
        request = state.request
        request.output_token_ids.append(token)
        if logprobs is not None:
            request.logprobs.append(logprobs)
        self.metrics.on_token(request.arrival_time, request.last_token_time, now)
        request.first_token_time = request.first_token_time or now
        request.last_token_time = now
        if request.grammar is not None and not request.grammar.consume([token]):
            self._end_grammar(state, request.grammar.error or DEAD_END)
            return
        self._check_stop(state, token)

    def _advance_grammar(self, state: _RequestState, now: float) -> bool:
        """After a sampled token: end a complete grammar with "stop", or append the tokens it forces.
        Returns whether it did either (a speculating request's later tokens then no longer follow).

        Forced (fast-forward) tokens skip sampling: the next step computes them as a
        chunk, with the token after them. Requests that want logprobs sample every token.
        """
        request, forced = state.request, []
        if not request.grammar.is_finished and request.params.logprobs is None:
            forced = request.grammar.fast_forward_tokens()
            for token in forced:
                self._append_token(state, token, None, now)
                if request.finish_reason is not None:
                    return True
        if request.grammar.is_finished:
            request.finish_reason, request.stop_reason = "stop", None
            self._flush_text(state)
            return True
        return bool(forced)

    def _end_grammar(self, state: _RequestState, why: str) -> None:
        """No token can continue the grammar: finish with "error" and the reason, never hang."""
        state.request.finish_reason, state.request.stop_reason = "error", why
        self._flush_text(state)

    def _text(self, state: _RequestState) -> str:
        """The request's text, its pending tokens put through the detokenizer (see ``_RequestState``)."""
        if state.pending:
            step = state.detokenizer.step
            state.text += "".join([step(token) for token in state.pending])
            state.pending.clear()
        return state.text

    def _flush_text(self, state: _RequestState) -> None:
        """At the end: the text with what the detokenizer held back (a dangling partial character, U+FFFD)."""
        state.text = self._text(state) + state.detokenizer.flush()

    def _check_stop(self, state: _RequestState, token: int) -> None:
        request, params = state.request, state.request.params
        state.pending.append(token)
        if params.stop:
            previous_len = len(state.text)
            self._text(state)
        num_out = len(request.output_token_ids)
        if num_out >= params.min_tokens:
            if token in params.stop_token_ids:
                request.finish_reason, request.stop_reason = "stop", token
            elif not params.ignore_eos and token in self.eos_token_ids:
                request.finish_reason, request.stop_reason = "stop", None
            if params.stop and request.finish_reason is None:
                at = find_stop(state.text, params.stop, previous_len)
                if at is not None:
                    stop = next(s for s in params.stop if state.text.startswith(s, at))
                    state.text = state.text[: at + (len(stop) if params.include_stop_str_in_output else 0)]
                    request.finish_reason, request.stop_reason = "stop", stop
        if request.finish_reason is None:
            if params.max_tokens is not None and num_out >= params.max_tokens:
                request.finish_reason = "length"
            elif request.num_tokens >= self.max_model_len:
                request.finish_reason = "length"
        if request.finish_reason is not None and not isinstance(request.stop_reason, str):
            self._flush_text(state)

    def _make_output(self, state: _RequestState) -> RequestOutput:
        request = state.request
        finished = request.finish_reason is not None
        text = self._text(state)
        if not finished and request.params.stop:
            text = text[: safe_prefix_len(text, request.params.stop)]
        completion = CompletionOutput(
            index=state.index,
            text=text,
            token_ids=list(request.output_token_ids),
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            logprobs=list(request.logprobs) if request.params.logprobs is not None else None,
        )
        metrics = RequestMetrics(
            request.arrival_time, request.first_token_time, request.last_token_time,
            request.num_cached_prompt_tokens, request.num_preemptions,
        )
        prompt_logprobs = list(request.prompt_logprobs) if request.params.prompt_logprobs is not None else None
        return RequestOutput(request.request_id, state.prompt, request.prompt_token_ids, [completion], finished, metrics,
                             prompt_logprobs)
