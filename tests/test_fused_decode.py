"""The one-call decode step (cholla/kernels/decode_layers.cpp) against the same
layers run one by one in Python, on the tiny random models of every
architecture: same hidden states, same KV cache writes.

Three sequences of different lengths decode together for a few steps (past the
sliding windows of the tiny Mistral and Gemma 3), once through each path, each
with its own copy of the cache.
"""

from __future__ import annotations

import copy
import dataclasses
import faulthandler
import os
import subprocess
import sys
import time

import pytest
import torch

from cholla.kernels import cpu_kernels
from cholla.kv.kv_types import kv_cache_type
from cholla.kv.paged_cache import PagedKVCache
from cholla.layers.attention import AttentionMetadata
from cholla.models.fused_decode import fused_layers, plan_decode
from cholla.models.loader import load_model
from tests.test_models_tiny import CONFIGS, transformers

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="needs a CPU with AVX512-BF16 and a C++ compiler")

BLOCK_SIZE = 8
BLOCKS_PER_SEQ = 8
PROMPT_LENS = (5, 19, 30)
MANY_PROMPT_LENS = tuple(range(3, 39, 3))  # 12 sequences: the bf16 layers multiply on the AMX tiles
DECODE_STEPS = 4


def _tiny_model(name: str, tmp_path, dtype: str):
    torch.manual_seed(0)
    config = CONFIGS[name]
    reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # perturb the norms so that each one matters
        for pname, p in reference.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    return load_model(tmp_path, dtype)


def _table(seq: int) -> torch.Tensor:
    return torch.arange(seq * BLOCKS_PER_SEQ, (seq + 1) * BLOCKS_PER_SEQ)


def _prefill(model, cache: PagedKVCache, seq: int, ids: list[int]) -> None:
    n = len(ids)
    meta = AttentionMetadata(
        slot_mapping=_table(seq)[torch.arange(n) // BLOCK_SIZE] * BLOCK_SIZE + torch.arange(n) % BLOCK_SIZE,
        query_start_loc=[0, n], context_lens=[n], block_tables=_table(seq)[None], num_prefills=1,
    )
    model(torch.tensor(ids), torch.arange(n), cache.layers, meta)


def _random_prefills(model, config, lengths: list[int], generator: torch.Generator) -> PagedKVCache:
    """A cache holding a random prompt of each of ``lengths``, one sequence each: a batched step's rows."""
    cache = PagedKVCache(config, num_blocks=len(lengths) * BLOCKS_PER_SEQ, block_size=BLOCK_SIZE)
    for seq, n in enumerate(lengths):
        _prefill(model, cache, seq, torch.randint(0, config.vocab_size, (n,), generator=generator).tolist())
    return cache


def _decode_meta(lengths: list[int]) -> tuple[torch.Tensor, AttentionMetadata]:
    """The next token of each sequence, whose cached lengths are ``lengths``."""
    positions = torch.tensor(lengths)
    tables = torch.stack([_table(s) for s in range(len(lengths))])
    slots = tables[torch.arange(len(lengths)), positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
    context = [n + 1 for n in lengths]
    meta = AttentionMetadata(
        slot_mapping=slots, query_start_loc=list(range(len(lengths) + 1)), context_lens=context,
        block_tables=tables, num_prefills=0, decode_context_lens=torch.tensor(context),
    )
    return positions, meta


def _layer_by_layer(model, x, positions, kv_caches, meta):
    for layer, kv_cache in zip(model.layers, kv_caches):
        x = layer(x, positions, kv_cache, meta)
    return x


@pytest.mark.parametrize("dtype, prompt_lens", [("float32", PROMPT_LENS), ("bfloat16", PROMPT_LENS),
                                                ("bfloat16", MANY_PROMPT_LENS)], ids=["fp32", "bf16", "bf16-12seqs"])
@pytest.mark.parametrize("name", [name for name in CONFIGS if name != "qwen2"])
@torch.inference_mode()
def test_fused_decode_matches_layer_by_layer(name, dtype, prompt_lens, tmp_path):
    loaded = _tiny_model(name, tmp_path, dtype)
    model, config = loaded.model, loaded.config
    plan = plan_decode(model)
    assert plan is not None
    fused_cache = PagedKVCache(config, num_blocks=len(prompt_lens) * BLOCKS_PER_SEQ, block_size=BLOCK_SIZE)
    generator = torch.Generator().manual_seed(1)
    for seq, n in enumerate(prompt_lens):
        _prefill(model, fused_cache, seq, torch.randint(0, config.vocab_size, (n,), generator=generator).tolist())
    python_cache = [(k.clone(), v.clone()) for k, v in fused_cache.layers]

    lengths = list(prompt_lens)
    for _ in range(DECODE_STEPS):
        positions, meta = _decode_meta(lengths)
        x = torch.randn(len(lengths), config.hidden_size, generator=generator)
        fused = fused_layers(plan, x, positions, fused_cache.layers, meta)
        expected = _layer_by_layer(model, x, positions, python_cache, meta)
        assert fused is not None
        # The same kernels in the same order: only PyTorch's own elementwise ops
        # (activation, adds) might round differently.
        torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
        lengths = [n + 1 for n in lengths]
    for (k, v), (k_ref, v_ref) in zip(fused_cache.layers, python_cache):
        torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["smollm2_path", "gemma3_path"])
@torch.inference_mode()
def test_fused_decode_of_many_sequences_takes_the_batched_int8_product(path, request):
    """SmolLM2's Q4_1 layers and Gemma 3's (Q5_0, Q8_0, Q4_K, Q6_K) at 12 sequences: the fused
    step multiplies on the batched int8 product (where the CPU has no AMX), as linear_group
    does for a decode step's rows."""
    from cholla.layers import linear

    loaded = load_model(request.getfixturevalue(path), "bfloat16")
    model, config = loaded.model, loaded.config
    plan = plan_decode(model)
    assert set(plan.types) <= {int(t) for t in linear.INT8_TYPES}  # every layer's products, all of them
    generator = torch.Generator().manual_seed(2)
    lengths = [3 + seq % 4 for seq in range(12)]
    cache = _random_prefills(model, config, lengths, generator)
    python_cache = [(k.clone(), v.clone()) for k, v in cache.layers]
    positions, meta = _decode_meta(lengths)
    x = torch.randn(len(lengths), config.hidden_size, generator=generator)
    fused = fused_layers(plan, x, positions, cache.layers, meta)
    with linear.decode_step():  # as the engine runs the Python layers in a decode-only step
        expected = _layer_by_layer(model, x, positions, python_cache, meta)
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)
    # Outside one the rows are a prompt's: they take the same int8 product only where every
    # weight is of linear.INT8_PROMPT_TYPES (neither real model's layers are), else the bf16 tiles.
    prompt = _layer_by_layer(model, x, positions, [(k.clone(), v.clone()) for k, v in cache.layers], meta)
    if set(plan.types) <= {int(t) for t in linear.int8_batch_types(False)}:
        torch.testing.assert_close(prompt, fused, atol=1e-4, rtol=1e-4)
    else:
        assert (fused - prompt).abs().max() > 1e-3 or linear.int8_batch_max_rows() == 0

@torch.inference_mode()
def test_verification_rows_take_the_decode_rows_int8_products(smollm2_path):
    """A speculating sequence's span of 1 + K rows (one step: its token and K drafts) against the
    same tokens decoded one per step, SmolLM2 in bf16, through the model and its head as the
    runner calls them (``decode_step()``, the head's kept output). Every row's activations are
    rounded to int8 as in a one-row step: up to ``INT8_MAX_ROWS`` rows the int8 GEMV gives each
    row bit for bit its one-row logits; past it the batched int8 product sums in another order
    (close; only near ties may pick another token)."""
    from cholla.layers import linear

    loaded = load_model(smollm2_path, "bfloat16")
    model, config = loaded.model, loaded.config
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, config.vocab_size, (11,), generator=generator).tolist()
    tokens = torch.randint(0, config.vocab_size, (17,), generator=generator).tolist()
    base = PagedKVCache(config, num_blocks=BLOCKS_PER_SEQ, block_size=BLOCK_SIZE)
    _prefill(model, base, 0, prompt)

    def run(cache, ids, start, meta):
        with linear.decode_step():
            hidden = model(torch.tensor(ids), torch.arange(start, start + len(ids)), cache.layers, meta)
            return model.compute_logits(hidden, reuse_output=True).clone()

    cache = PagedKVCache(config, num_blocks=BLOCKS_PER_SEQ, block_size=BLOCK_SIZE)
    for (k, v), (k0, v0) in zip(cache.layers, base.layers):
        k.copy_(k0), v.copy_(v0)
    one_row = []
    for i, token in enumerate(tokens):  # plain decoding: one row per step
        positions, meta = _decode_meta([len(prompt) + i])
        one_row.append(run(cache, [token], len(prompt) + i, meta))
    one_row = torch.cat(one_row)
    for rows in (2, linear.INT8_MAX_ROWS, linear.INT8_MAX_ROWS + 1, 17):
        cache = PagedKVCache(config, num_blocks=BLOCKS_PER_SEQ, block_size=BLOCK_SIZE)
        for (k, v), (k0, v0) in zip(cache.layers, base.layers):
            k.copy_(k0), v.copy_(v0)
        at = torch.arange(len(prompt), len(prompt) + rows)
        context = len(prompt) + rows
        meta = AttentionMetadata(
            slot_mapping=_table(0)[at // BLOCK_SIZE] * BLOCK_SIZE + at % BLOCK_SIZE, query_start_loc=[0, rows],
            context_lens=[context], block_tables=_table(0)[None], num_prefills=1,
            decode_context_lens=torch.tensor([], dtype=torch.long), span_starts=torch.tensor([0, rows]),
            span_context_lens=torch.tensor([context]))
        span = run(cache, tokens[:rows], len(prompt), meta)
        if rows <= linear.INT8_MAX_ROWS:
            assert torch.equal(span, one_row[:rows]), rows
        else:
            # Each layer rounds its activations to int8 again, so summation-order noise moves a
            # few roundings by a step, through 30 layers (and the span's later rows read keys so
            # made): logits of 10-25 differ by ~0.1 (~0.6%) on average, at most ~1.3, and a near
            # tie can flip: one of these 17 random tokens' rows picks its runner-up.
            torch.testing.assert_close(span, one_row[:rows], atol=2.0, rtol=0.1)
            assert (span - one_row[:rows]).abs().mean() < 0.25
            top = one_row[:rows].argmax(-1)
            assert (span.argmax(-1) == top).float().mean() > 0.9
            assert (span.max(-1).values - span.gather(1, top[:, None])[:, 0]).max() < 0.5  # only near ties flip


def _copy_side(side):
    """A side's tensors copied (q4_kivi's open blocks too)."""
    if not isinstance(side, tuple):
        return side.clone()
    return type(side)(*(t.clone() if isinstance(t, torch.Tensor) else copy.deepcopy(t) for t in side))


@pytest.mark.parametrize("name, k_type, v_type", [("gemma3", "q8_0", "q8_0"), ("qwen3", "q4_0_cal", "q4_0"),
                                                  ("llama", "fp8_e4m3_plain", "int8"), ("gemma3", "q4_kivi", "q4_kivi"),
                                                  ("llama", "fp8_e4m3_centered", "fp8_e4m3_scaled")])
@torch.inference_mode()
def test_fused_decode_reads_and_writes_quantized_kv_caches(name, k_type, v_type, tmp_path):
    """Every KV cache type runs fused (written and read in place by the kernels), as layer by layer."""
    loaded = _tiny_model(name, tmp_path, "float32")
    model, config = loaded.model, loaded.config
    plan = plan_decode(model)
    fused_cache = PagedKVCache(config, num_blocks=len(PROMPT_LENS) * BLOCKS_PER_SEQ, block_size=BLOCK_SIZE,
                               dtype=kv_cache_type(k_type), v_dtype=kv_cache_type(v_type))
    generator = torch.Generator().manual_seed(1)
    for side in (side for layer in fused_cache.layers for side in layer):
        if getattr(side, "shift", None) is not None:  # calibrated: statistics of its own
            side.shift.copy_(torch.randn(side.shift.shape, generator=generator))
            side.spread.copy_(torch.rand(side.spread.shape, generator=generator) + 0.5)
    for seq, n in enumerate(PROMPT_LENS):
        _prefill(model, fused_cache, seq, torch.randint(0, config.vocab_size, (n,), generator=generator).tolist())
    python_cache = [(_copy_side(k), _copy_side(v)) for k, v in fused_cache.layers]
    lengths = list(PROMPT_LENS)
    for _ in range(2):
        positions, meta = _decode_meta(lengths)
        x = torch.randn(len(lengths), config.hidden_size, generator=generator)
        fused = fused_layers(plan, x, positions, fused_cache.layers, meta)
        assert fused is not None
        torch.testing.assert_close(fused, _layer_by_layer(model, x, positions, python_cache, meta), atol=1e-5, rtol=1e-5)
        lengths = [n + 1 for n in lengths]
    for layer, reference in zip(fused_cache.layers, python_cache):
        for side, side_ref in zip(layer, reference):
            if getattr(side, "open_blocks", None) is not None:  # q4_kivi keys: the same blocks open, rows alike
                assert torch.equal(side.open_blocks.slot_of, side_ref.open_blocks.slot_of)
                assert torch.equal(side.open_blocks.rows, side_ref.open_blocks.rows)
            for t, t_ref in zip(*(s if isinstance(s, tuple) else (s,) for s in (side, side_ref))):
                if isinstance(t, torch.Tensor):
                    assert torch.equal(t.view(torch.uint8) if t.dtype.itemsize == 1 else t,
                                       t_ref.view(torch.uint8) if t_ref.dtype.itemsize == 1 else t_ref)


def test_layers_with_bias_stay_in_python(tmp_path):
    loaded = _tiny_model("qwen2", tmp_path, "float32")
    assert plan_decode(loaded.model) is None


@torch.inference_mode()
def test_prefill_and_wide_steps_are_not_fused(tmp_path):
    loaded = _tiny_model("llama", tmp_path, "float32")
    plan = plan_decode(loaded.model)
    cache = PagedKVCache(loaded.config, num_blocks=9 * BLOCKS_PER_SEQ, block_size=BLOCK_SIZE)
    positions, meta = _decode_meta([0] * 9)  # 9 rows: more than the fp32 GEMV serves
    assert fused_layers(plan, torch.randn(9, loaded.config.hidden_size), positions, cache.layers, meta) is None
    meta.num_prefills = 1
    assert fused_layers(plan, torch.randn(1, loaded.config.hidden_size), positions[:1], cache.layers, meta) is None


@torch.inference_mode()
def test_an_error_in_one_thread_of_the_team_is_raised_not_hung(tmp_path):
    """A weight of the wrong width in the last layer's down projection fails
    the members inside the team, at that stage: the error must come back, and the team must
    work afterwards. (A bad block id is refused before the team starts: the
    step's tables are checked once, for every layer.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    loaded = _tiny_model("llama", tmp_path, "bfloat16")
    plan = plan_decode(loaded.model)
    cache = PagedKVCache(loaded.config, num_blocks=3 * BLOCKS_PER_SEQ, block_size=BLOCK_SIZE)
    x = torch.randn(3, loaded.config.hidden_size)
    faulthandler.dump_traceback_later(120, exit=True)  # a hang fails the run instead of stalling it
    try:
        positions, meta = _decode_meta([1, 2, 3])
        meta.block_tables = meta.block_tables.clone()
        meta.block_tables[2, 0] = 10**6
        with pytest.raises(RuntimeError, match="block id out of range"):
            fused_layers(plan, x, positions, cache.layers, meta)
        # the last layer's down projection swapped for its gate: rows of the hidden size, not the MLP's
        broken = dataclasses.replace(plan, weights=plan.weights[:-1] + plan.weights[-3:-2],
                                     types=plan.types[:-1] + plan.types[-3:-2], bound=None)
        positions, meta = _decode_meta([1, 2, 3])
        with pytest.raises(RuntimeError, match="does not hold rows of"):
            fused_layers(broken, x, positions, cache.layers, meta)
        with pytest.raises(RuntimeError, match="position out of the table"):  # checked before the team starts
            fused_layers(plan, x, torch.tensor([1, 2, -1]), cache.layers, _decode_meta([1, 2, 3])[1])
        positions, meta = _decode_meta([1, 2, 3])
        assert fused_layers(plan, x, positions, cache.layers, meta) is not None
    finally:
        faulthandler.cancel_dump_traceback_later()
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@torch.inference_mode()
def test_an_oversubscribed_team_on_a_busy_machine_keeps_its_results_and_pace(tmp_path, dtype):
    """Twice as many threads as CPUs, and a busy loop on every CPU: the team's
    members are descheduled all the time, their chunks taken by the others,
    and their waits for a stage's end end in sleeps and futex wake-ups
    (kernels/team.h). The steps give exactly what one thread gives, within a
    time bound (the team's own pace under load: tests/test_team.py)."""
    threads = torch.get_num_threads()
    loaded = _tiny_model("llama", tmp_path, dtype)
    plan = plan_decode(loaded.model)
    lengths = [5, 19, 30]
    x = torch.randn(len(lengths), loaded.config.hidden_size, generator=torch.Generator().manual_seed(2))

    def steps(team: int) -> list[torch.Tensor]:
        torch.set_num_threads(team)
        cache = PagedKVCache(loaded.config, num_blocks=len(lengths) * BLOCKS_PER_SEQ, block_size=BLOCK_SIZE)
        outs = []
        for step in range(20):
            positions, meta = _decode_meta([n + step for n in lengths])
            outs.append(fused_layers(plan, x, positions, cache.layers, meta))
        return outs

    cpus = len(os.sched_getaffinity(0))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        expected = steps(1)
        start = time.perf_counter()
        crowded = steps(2 * cpus)
        seconds = time.perf_counter() - start
    finally:
        faulthandler.cancel_dump_traceback_later()
        for process in busy:
            process.kill()
            process.wait()
        torch.set_num_threads(threads)
    for got, want in zip(crowded, expected):  # each job's outputs computed by the same code, whoever takes it
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert seconds < 10, f"20 decode steps took {seconds:.1f} s"


@pytest.mark.parametrize("rows", [5, 7, 13, 32, 33])
@pytest.mark.parametrize("name", ["gemma3", "llama"])
@torch.inference_mode()
def test_the_steps_between_stages_shared_by_the_team_equal_one_thread(name, rows, tmp_path):
    """From 7 rows the steps between a layer's stages (q/k norms, rope and the cache writes; the
    residual adds and norms; the activation) are stages of rows that the team shares
    (decode_layers.cpp's ``between``); with fewer, one member runs them. Either way every row
    goes through the same code: 2 and 4 threads give one thread's hidden states and caches bit
    for bit, over steps that write and read what the last ones wrote. Gemma 3 (q/k norms,
    post-norms, tanh-GELU) and Llama (SiLU), in bf16."""
    threads = torch.get_num_threads()
    loaded = _tiny_model(name, tmp_path, "bfloat16")
    plan = plan_decode(loaded.model)
    lengths = [3 + seq % 11 for seq in range(rows)]
    x = torch.randn(rows, loaded.config.hidden_size, generator=torch.Generator().manual_seed(3))

    def steps(team: int) -> tuple[list[torch.Tensor], PagedKVCache]:
        torch.set_num_threads(team)
        cache = PagedKVCache(loaded.config, num_blocks=rows * BLOCKS_PER_SEQ, block_size=BLOCK_SIZE)
        outs = []
        for step in range(3):
            positions, meta = _decode_meta([n + step for n in lengths])
            outs.append(fused_layers(plan, x, positions, cache.layers, meta))
        return outs, cache

    try:
        expected, expected_cache = steps(1)
        for team in (2, 4):
            got, cache = steps(team)
            for a, b in zip(got, expected):
                assert a is not None and torch.equal(a, b)
            for (k, v), (k_ref, v_ref) in zip(cache.layers, expected_cache.layers):
                assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("path", ["smollm2_path", "gemma3_path"])
@torch.inference_mode()
def test_batched_steps_equal_the_python_layers_bit_for_bit(path, request):
    """The real models' int8 layers at 7, 13 and 33 rows, at one thread and two: the shared steps
    between stages and x quantized ahead by them for the batched int8 products (ops.h's
    QuantizedX) give what the Python layers give, bit for bit (their products quantize x for
    themselves), hidden states and caches. (33 rows: a last tile of one row.)"""
    from cholla.layers import linear

    threads = torch.get_num_threads()
    loaded = load_model(request.getfixturevalue(path), "bfloat16")
    model, config = loaded.model, loaded.config
    plan = plan_decode(model)
    generator = torch.Generator().manual_seed(4)
    try:
        for team in (1, 2):
            torch.set_num_threads(team)
            for rows in (7, 13, 33):
                lengths = [3 + seq % 4 for seq in range(rows)]
                cache = _random_prefills(model, config, lengths, generator)
                python_cache = [(k.clone(), v.clone()) for k, v in cache.layers]
                positions, meta = _decode_meta(lengths)
                x = torch.randn(rows, config.hidden_size, generator=generator)
                fused = fused_layers(plan, x, positions, cache.layers, meta)
                with linear.decode_step():
                    expected = _layer_by_layer(model, x, positions, python_cache, meta)
                assert fused is not None and torch.equal(fused, expected), (team, rows)
                for (k, v), (k_ref, v_ref) in zip(cache.layers, python_cache):
                    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("path", ["smollm2_path", "gemma3_path"])
@torch.inference_mode()
def test_batched_steps_with_the_head_in_the_team_equal_the_separate_head(path, request):
    """7, 32 and 33 rows through ``decode_logits``, the final norm and the head in the layers' team:
    greedy, the head's own jobs' argmax gives the tokens ``greedy_tokens`` gives over the model's
    forward (the layers' call, then the final norm and the head in a team of their own); not greedy,
    the logits are ``compute_logits``'s, bit for bit; one thread, two, and four (on fewer cores:
    members descheduled between their last chunk and the stage's end, where the member closing it
    reads every member's best), the greedy step repeated. (Gemma 3: its embedding scaled in Python
    first.)"""
    from cholla.layers import linear

    threads = torch.get_num_threads()
    loaded = load_model(request.getfixturevalue(path), "bfloat16")
    model, config = loaded.model, loaded.config
    generator = torch.Generator().manual_seed(5)
    try:
        for team in (1, 2, 4):
            torch.set_num_threads(team)
            for rows in (7, 32, 33):
                lengths = [3 + seq % 5 for seq in range(rows)]
                cache = _random_prefills(model, config, lengths, generator)
                greedy_cache, sampled_cache = ([(k.clone(), v.clone()) for k, v in cache.layers] for _ in range(2))
                positions, meta = _decode_meta(lengths)
                ids = torch.randint(0, config.vocab_size, (rows,), generator=generator)
                with linear.decode_step():
                    hidden = model(ids, positions, cache.layers, meta)
                    expected_tokens = model.greedy_tokens(hidden, decode=True)
                    expected_logits = model.compute_logits(hidden, reuse_output=True).clone()
                for _ in range(8):  # (the same step again: the same cache writes)
                    _, tokens = model.decode_logits(ids, positions, greedy_cache, meta, True)
                    assert expected_tokens is not None and torch.equal(tokens, expected_tokens), (team, rows)
                logits, no_tokens = model.decode_logits(ids, positions, sampled_cache, meta, False)
                assert no_tokens is None and torch.equal(logits, expected_logits), (team, rows)
                for (k, v), (k_greedy, v_greedy) in zip(cache.layers, greedy_cache):
                    assert torch.equal(k, k_greedy) and torch.equal(v, v_greedy)
    finally:
        torch.set_num_threads(threads)


def _engine_outputs(loaded, kv_cache_memory: int) -> tuple[dict, object]:
    """Five requests of every sampling kind through one engine whose KV cache holds about two of
    them: two start, three join after a few steps (one sharing the first's prompt: prefix-cache
    hits), sequences are preempted and recomputed, blocks are taken as they grow, and they leave
    at different lengths. Returns each request's tokens, logprobs, text and finish, and the stats."""
    from cholla.engine.engine import EngineConfig, LLMEngine
    from cholla.sampling.params import SamplingParams

    engine = LLMEngine(loaded, EngineConfig(max_model_len=128, kv_cache_memory=kv_cache_memory, block_size=16,
                                            max_num_seqs=4))
    shared = list(range(200, 240))
    requests = [
        (shared + [5, 6], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)),
        ([7, 8, 9] * 9, SamplingParams(temperature=0.9, top_k=40, seed=3, max_tokens=36, logprobs=2, ignore_eos=True)),
        (shared + [11], SamplingParams(temperature=0.0, max_tokens=44, logprobs=1, ignore_eos=True,
                                       repetition_penalty=1.3)),
        (list(range(300, 330)), SamplingParams(temperature=0.7, seed=5, max_tokens=30, ignore_eos=True,
                                               frequency_penalty=0.5, min_tokens=8, stop=["the"])),
        (list(range(400, 410)), SamplingParams(temperature=0.0, max_tokens=70, ignore_eos=True)),  # alone at the end
    ]
    outputs = {}
    for i, (ids, params) in enumerate(requests[:2]):
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                outputs[out.request_id] = (c.token_ids, c.logprobs, c.text, c.finish_reason)
        steps += 1
        if steps == 4:
            for i, (ids, params) in enumerate(requests[2:], start=2):
                engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    return outputs, engine.stats()


@pytest.mark.parametrize("dtype, kv_cache_memory", [("bfloat16", 23040 * 150), ("float32", 46080 * 150)])
def test_engine_steps_with_the_head_in_the_kernel_equal_the_unfused_steps(smollm2_path, dtype, kv_cache_memory,
                                                                         monkeypatch):
    """The runner's one call for the embedding, layers, final norm, head and greedy argmax
    (``DecoderModel.decode_logits``, the KV caches bound once) gives every request the tokens,
    logprobs and text of the model's forward, then ``compute_logits`` and the sampler, bit for bit,
    through preemption, prefix-cache hits, block growth and sequences joining and leaving.
    SmolLM2 Q4_1 (KV: 23040 bytes a token in bf16)."""
    from cholla.models.decoder import DecoderModel

    loaded = load_model(smollm2_path, dtype)
    served = []
    decode_logits = DecoderModel.decode_logits
    monkeypatch.setattr(DecoderModel, "decode_logits",
                        lambda self, *args: served.append(decode_logits(self, *args)) or served[-1])
    fused, stats = _engine_outputs(loaded, kv_cache_memory)
    assert sum(out is not None for out in served) >= 60
    assert any(out is not None and out[1] is not None for out in served)  # greedy rows' tokens from the kernel
    assert stats.preemptions > 0 and stats.prefix_cache_hits > 0  # the cases the bound caches must follow
    monkeypatch.setattr(DecoderModel, "decode_logits", lambda self, *args: None)
    unfused, _ = _engine_outputs(loaded, kv_cache_memory)
    assert fused == unfused
    assert sorted(fused) == ["0", "1", "2", "3", "4"] and fused["3"][3] in ("stop", "length")


def test_kept_decode_batches_follow_growth_preemption_and_requests_joining(smollm2_path, monkeypatch):
    """The scheduler's batch of steady decodes (``_steady_decodes``) and the runner's kept block
    tables and input buffer (``_prepare_decodes``) give every request what the general paths give,
    through block growth, preemption, prefix-cache hits and requests joining and leaving; and each
    step's kept tables equal the requests' tables of that step, its refilled inputs the requests'
    last tokens, positions, slots and context lengths."""
    from cholla.engine.runner import ModelRunner
    from cholla.engine.scheduler import Scheduler

    loaded = load_model(smollm2_path, "bfloat16")
    steady, reused, checked, refilled = Scheduler._steady_decodes, [], [], []

    def counted(self):
        batch = steady(self)
        reused.append(batch is not None)
        return batch

    prepare = ModelRunner._prepare_decodes

    def checked_prepare(self, batch):
        kept, inputs = self._decode_tables, self._decode_inputs
        out = prepare(self, batch)
        if out is not None:
            tables = [r.blocks.block_table for r in batch.requests]
            width = max(map(len, tables))
            want = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
            assert torch.equal(out[2].block_tables, want)
            checked.append(kept is not None and self._decode_tables is kept)
            positions = [r.num_computed_tokens for r in batch.requests]
            assert out[0].tolist() == [r.all_token_ids[p] for r, p in zip(batch.requests, positions)]
            assert out[1].tolist() == positions and out[2].decode_context_lens.tolist() == [p + 1 for p in positions]
            assert out[2].slot_mapping.tolist() == [t[p // 16] * 16 + p % 16 for t, p in zip(tables, positions)]
            refilled.append(inputs is not None and self._decode_inputs is inputs)
        return out

    monkeypatch.setattr(Scheduler, "_steady_decodes", counted)
    monkeypatch.setattr(ModelRunner, "_prepare_decodes", checked_prepare)
    kept, stats = _engine_outputs(loaded, 23040 * 150)
    assert stats.preemptions > 0 and stats.prefix_cache_hits > 0
    assert sum(reused) >= 30 and not all(reused)  # steady steps, and steps the general pass made
    assert sum(checked) >= 30 and not all(checked)  # tables kept, and rebuilt when a block came
    assert sum(refilled) >= 30 and not all(refilled)  # inputs refilled, and made anew for another batch size

    def fresh_prepare(self, batch):
        self._decode_tables = self._decode_inputs = None
        return prepare(self, batch)

    monkeypatch.setattr(Scheduler, "_steady_decodes", lambda self: None)
    monkeypatch.setattr(ModelRunner, "_prepare_decodes", fresh_prepare)
    general, _ = _engine_outputs(loaded, 23040 * 150)
    assert kept == general
