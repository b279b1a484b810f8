"""``cholla plan``: its KV figures are what the engine allocates and logs, its arithmetic adds up."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest

from cholla.cli import main
from cholla.engine.engine import EngineConfig, LLMEngine
from cholla.hardware import GB, TFLOP, Hardware, kernels_run_here
from cholla.kv.kv_types import kv_cache_type
from cholla.models.loader import load_model
from cholla.plan import (PlanRequest, _causal_pairs, best_for_latency, decode_step, littles_law, make_plan, prefill,
                         read_model_facts, resolve_hardware, window_aware_bytes)

BUDGET = 48 * 2**20
CONTEXT = 640


def _hand_bytes_per_token(config, type_name: str) -> int:
    """Both sides, every layer, worked out apart from the code: values plus fp16 scales."""
    value_bytes = {"f32": 4, "bf16": 2, "f16": 2, "fp8_e4m3_plain": 1, "fp8_e5m2": 1, "int8": 1, "q8_0": 1, "q4_0": 0.5}[type_name]
    scales = {"int8": 1, "q8_0": config.head_dim // 32, "q4_0": config.head_dim // 32}.get(type_name, 0)
    return int(2 * config.num_layers * config.num_kv_heads * (config.head_dim * value_bytes + 2 * scales))


@pytest.mark.parametrize("model_fixture", ["smollm2_path", "gemma3_path"])
def test_plan_matches_what_the_engine_allocates_and_logs(request, model_fixture, caplog, monkeypatch):
    from cholla.engine import engine as engine_module

    path = request.getfixturevalue(model_fixture)
    facts = read_model_facts(path)
    loaded = load_model(path, "float32")
    tokenizer = engine_module.load_tokenizer(loaded)  # built once: Gemma's 262k vocabulary takes seconds
    monkeypatch.setattr(engine_module, "load_tokenizer", lambda _: tokenizer)
    for type_name in ("bf16", "q8_0", "int8", "q4_0"):
        kv_type = kv_cache_type(type_name)
        plan = make_plan(facts, PlanRequest(context=CONTEXT, kv_cache_memory=BUDGET), kv_type, kv_type, None)
        assert plan.kv["bytes_per_token"] == _hand_bytes_per_token(facts.config, type_name)
        assert sum(kind["bytes_per_token"] for kind in plan.kv["layer_kinds"]) == plan.kv["bytes_per_token"]
        with caplog.at_level(logging.INFO, logger="cholla"):
            caplog.clear()
            engine = LLMEngine(loaded, EngineConfig(max_model_len=CONTEXT, kv_cache_memory=BUDGET, dtype="float32",
                                                    kv_cache_dtype=type_name))
        cache = engine.kv_cache
        assert cache.num_blocks == plan.layout["num_blocks"]
        assert cache.nbytes == plan.layout["bytes"] == cache.num_blocks * 16 * plan.kv["bytes_per_token"]
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:"))
        logged = re.search(r"(\d+) blocks of 16 tokens \((\d+) MiB.* (\d+) tokens per GiB\), (\d+) tokens; "
                           r"maximum concurrency for (\d+)-token requests: ([\d.]+)x", line)
        assert logged, line
        blocks, mib, per_gib, tokens, context, concurrency = logged.groups()
        assert int(blocks) == plan.layout["num_blocks"] and int(tokens) == plan.layout["num_tokens"]
        assert int(mib) == round(plan.layout["bytes"] / 2**20) and int(per_gib) == round(plan.kv["tokens_per_gib"])
        assert int(context) == CONTEXT == plan.layout["context"]
        assert concurrency == f"{plan.layout['max_concurrency']:.2f}"
        # The whole requests the scheduler can hold at once: admit full-context requests until it refuses one.
        manager, admitted = engine.block_manager, 0
        from cholla.kv.block_manager import SequenceBlocks

        while manager.allocate(SequenceBlocks(), CONTEXT):
            admitted += 1
        assert admitted == plan.layout["max_whole_requests"]


def test_sliding_window_layers_and_what_a_window_aware_allocation_saves(gemma3_path):
    facts = read_model_facts(gemma3_path)
    config, bf16 = facts.config, kv_cache_type("bf16")
    plan = make_plan(facts, PlanRequest(context=8192, kv_cache_memory=2**30), bf16, bf16, None)
    kinds = {kind["kind"]: kind for kind in plan.kv["layer_kinds"]}
    per_layer = 2 * config.num_kv_heads * config.head_dim * 2
    assert kinds["sliding_attention"]["layers"] == 15 and kinds["sliding_attention"]["window"] == 512
    assert kinds["full_attention"]["layers"] == 3 and kinds["full_attention"]["window"] is None
    assert kinds["sliding_attention"]["bytes_per_token"] == 15 * per_layer
    # A 512-token window over 16-token blocks reaches at most 33 blocks; global layers hold all 512.
    assert window_aware_bytes(config, bf16, bf16, 8192, 16) == per_layer * 16 * (15 * 33 + 3 * 512)
    assert plan.kv["window_aware_bytes_per_sequence"] < plan.kv["bytes_per_sequence"] == 18 * per_layer * 8192
    # Shorter than the window, nothing would be saved.
    assert window_aware_bytes(config, bf16, bf16, 300, 16) == 18 * per_layer * 304


def test_roofline_and_littles_law_arithmetic(smollm2_path):
    facts = read_model_facts(smollm2_path)
    bf16 = kv_cache_type("bf16")
    hw = Hardware("test", 1000 * GB, 100 * TFLOP, None, "test")
    weights = facts.weights
    assert weights.decode_bytes == weights.total_bytes  # tied: the head reads the embedding
    one = decode_step(facts, hw, bf16, bf16, 1, 100)
    kv_read = 100 * facts.config.num_layers * 2 * facts.config.num_kv_heads * facts.config.head_dim * 2
    assert one.bound == "memory" and one.seconds == pytest.approx((weights.decode_bytes + kv_read) / hw.bandwidth)
    big = prefill(facts, hw, 512)
    assert big.bound == "compute" and big.seconds > 2 * weights.matmul_params * 512 / hw.flops
    law = littles_law(facts, hw, bf16, bf16, 512, 128, 8)
    assert law.latency_s == pytest.approx(8 / law.requests_per_s)  # L = λW
    assert law.output_tokens_per_s == pytest.approx(128 * law.requests_per_s)
    step = decode_step(facts, hw, bf16, bf16, 8, 512 + 64).seconds
    assert 1 / law.requests_per_s == pytest.approx(prefill(facts, hw, 512).seconds + 128 * step / 8)
    brute = [b for b in range(1, 301) if littles_law(facts, hw, bf16, bf16, 512, 128, b).latency_s <= 0.05]
    best = best_for_latency(facts, hw, bf16, bf16, 512, 128, 0.05, 300)
    assert 1 < best.concurrency == max(brute) < 300
    assert best_for_latency(facts, hw, bf16, bf16, 512, 128, 1e-6, 300) is None
    for prompt, window in ((10, 512), (600, 512), (512, 512), (1000, 3)):
        assert _causal_pairs(prompt, window) == sum(min(t + 1, window) for t in range(prompt))
    reference = Hardware("cpu", 10 * GB, 0.1 * TFLOP, None, "test", reference_path=True, fp32_flops=0.05 * TFLOP,
                         dequant_rates={"Q4_1": 5e8, "Q8_0": 1e9, "F32": 1e10})
    expected = sum(params / reference.dequant_rates[kind] for kind, params in weights.matmul_params_by_type.items())
    assert decode_step(facts, reference, bf16, bf16, 1, 1).seconds == pytest.approx(expected, rel=1e-3)


def test_kernel_path_estimate_arithmetic(gemma3_path):
    """Where the kernels run, a decode step is its weights at the GEMV's measured rate per type plus
    each attention layer's measured work besides them (a fixed part and a part per key attended,
    windows capping the keys); a prompt multiplies all but the head by its rows at the prompt
    products' rate, the head by its last row only. Gemma's head (the tied embedding) is Q8_0, as
    are a few other weights."""
    facts = read_model_facts(gemma3_path)
    bf16 = kv_cache_type("bf16")
    types = facts.weights.matmul_params_by_type
    head = facts.weights.head_params_by_type
    assert head == {"Q8_0": facts.config.vocab_size * facts.config.hidden_size} and types["Q8_0"] > head["Q8_0"]
    gemv = {kind: (i + 1) * 1e9 for i, kind in enumerate(types)}
    prompt = {kind: (i + 1) * 1e11 for i, kind in enumerate(types)}
    hw = Hardware("test", 10 * GB, 1 * TFLOP, None, "test", kernel_path=True, gemv_rates=gemv, prompt_rates=prompt,
                  prompt_rows=64, layer_seconds=2e-5, key_seconds=3e-8)
    assert hw.estimate.startswith("measured: cholla's kernels")
    layers = 18 * 2e-5 + (3 * 1000 + 15 * 512) * 3e-8  # 3 global layers see 1000 keys, 15 sliding ones 512
    expected = sum(params / gemv[kind] for kind, params in types.items()) + layers
    assert decode_step(facts, hw, bf16, bf16, 1, 1000).seconds == pytest.approx(expected)
    two = sum(params / prompt[kind] for kind, params in types.items())  # the second row, at the batched rate
    assert decode_step(facts, hw, bf16, bf16, 2, 1000).seconds == pytest.approx(expected + layers + two)
    attention = 4 * facts.config.num_heads * facts.config.head_dim * facts.config.num_layers * _causal_pairs(64, 64) / hw.flops
    body = sum(64 * (params - head.get(kind, 0)) / prompt[kind] for kind, params in types.items())
    assert prefill(facts, hw, 64).seconds == pytest.approx(body + head["Q8_0"] / gemv["Q8_0"] + attention)
    # A type the kernels cannot read is dequantized at its measured rate, as the engine multiplies it.
    unread = Hardware("test", 10 * GB, 1 * TFLOP, None, "test", kernel_path=True,
                      gemv_rates={k: v for k, v in gemv.items() if k != "Q6_K"}, prompt_rates=prompt,
                      dequant_rates={"Q6_K": 1e8})
    assert decode_step(facts, unread, bf16, bf16, 1, 1000).seconds == pytest.approx(
        expected - layers - types["Q6_K"] / gemv["Q6_K"] + types["Q6_K"] / 1e8)
    assert Hardware("given", GB, TFLOP, None, "test").estimate == "roofline"


@pytest.mark.skipif(not kernels_run_here(), reason="cholla's C++ kernels need AVX-512 BF16 and VNNI")
def test_local_hardware_measures_the_kernels_over_the_models_weights(smollm2_path, monkeypatch, capsys):
    """``--hardware local`` where the kernels run measures their GEMV for each of the model's weight
    types (the head's Q8_0 included), the prompt products for the types outside the head (SmolLM2's
    head is its only Q8_0 weight), at the prompt's rows and the decode steps' thread count."""
    import torch

    facts = read_model_facts(smollm2_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    hw = resolve_hardware("local", None, None, smollm2_path, facts, prompt_tokens=24)
    assert torch.get_num_threads() == threads  # put back as found
    assert hw.kernel_path and not hw.reference_path and hw.threads == 1 and hw.prompt_rows == 24
    assert set(hw.gemv_rates) == set(facts.weights.matmul_params_by_type) == {"Q4_1", "Q8_0"}
    assert set(hw.prompt_rates) == {"Q4_1"} and not hw.dequant_rates and hw.layer_seconds > 0
    assert all(rate > 0 for rate in (*hw.gemv_rates.values(), *hw.prompt_rates.values()))
    assert main(["plan", str(smollm2_path), "--hardware", "local", "--prompt-tokens", "24", "--context", "256"]) == 0
    text = capsys.readouterr().out
    assert "estimate     measured: cholla's kernels" in text and "24-row prompt products" in text
    assert "(GEMV-bound)" in text


def test_cli_plan_json_and_errors(smollm2_path, capsys):
    assert main(["plan", str(smollm2_path), "--hardware", "h200", "--context", "4096", "--concurrency", "8",
                 "--kv-cache-dtype", "int8", "--latency", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["speed"]["estimate"] == "roofline"
    assert plan["kv"]["k_type"] == plan["kv"]["v_type"] == "int8"
    assert plan["layout"]["context"] == 4096 and plan["target"]["concurrency"] == 8
    assert plan["speed"]["decode_bound"] == "memory" and plan["speed"]["within_latency"]["best"]["concurrency"] >= 8
    assert main(["plan", str(smollm2_path), "--bandwidth", "100", "--flops", "10", "--cache-type-k", "q8_0",
                 "--cache-type-v", "bf16", "--memory", "1"]) == 0
    text = capsys.readouterr().out
    assert "K q8_0, V bf16" in text and "--memory less the weights" in text and "Little's law" in text
    for bad in (["--kv-cache-dtype", "q3"], ["--hardware", "abacus"], ["--bandwidth", "100"], ["--context", "0"]):
        assert main(["plan", str(smollm2_path), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cholla: error:") and len(err.strip().splitlines()) == 1


def test_default_context_is_capped_by_the_cache_as_in_the_engine(smollm2_path):
    facts = read_model_facts(smollm2_path)
    bf16 = kv_cache_type("bf16")
    small = make_plan(facts, PlanRequest(kv_cache_memory=4 * 2**20), bf16, bf16, None)
    assert small.layout["context"] == small.layout["num_tokens"] < facts.config.max_position_embeddings
    assert small.layout["max_concurrency"] == 1.0
    large = make_plan(facts, PlanRequest(kv_cache_memory=2**30), bf16, bf16, None)
    assert large.layout["context"] == facts.config.max_position_embeddings
    assert math.isclose(large.kv["tokens_per_gib"], 2**30 / large.kv["bytes_per_token"])


def test_q4_kivi_at_another_block_size_counts_its_block_statistics_and_open_blocks(smollm2_path):
    """q4_kivi's key statistics are shared by a block's tokens, and a request keeps two key blocks
    open in bf16: both follow ``--block-size``, worked out here apart from the code."""
    facts = read_model_facts(smollm2_path)
    config, kivi, block = facts.config, kv_cache_type("q4_kivi"), 32
    plan = make_plan(facts, PlanRequest(context=512, kv_cache_memory=2**26, block_size=block, concurrency=3),
                     kivi, kivi, None)
    heads, dim = config.num_kv_heads, config.head_dim
    per_token = config.num_layers * heads * ((dim / 2 + (dim + 16) / block) + (dim / 2 + 2))
    assert plan.kv["bytes_per_token"] == int(per_token)
    assert sum(kind["bytes_per_token"] for kind in plan.kv["layer_kinds"]) == per_token
    open_blocks = 2 * 3 * block * config.num_layers * heads * dim * 2
    assert plan.target["kv_bytes"] == 3 * plan.kv["bytes_per_sequence"] + open_blocks


def test_hugging_face_folder_weights(tmp_path):
    """A SafeTensors folder's sizes from its headers equal the model's own tensors."""
    import torch

    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=512, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    facts = read_model_facts(tmp_path)
    state = model.state_dict()
    assert facts.weights.bytes_by_type == {"BF16": sum(t.nbytes for t in state.values())}
    embedding = state["model.embed_tokens.weight"]
    assert facts.weights.decode_bytes == facts.weights.total_bytes - embedding.nbytes  # untied: rows only
    assert facts.weights.matmul_params == sum(t.numel() for n, t in state.items() if t.dim() == 2) - embedding.numel()
    bf16 = kv_cache_type("bf16")
    plan = make_plan(facts, PlanRequest(context=512, kv_cache_memory=2**20), bf16, bf16, None)
    assert plan.kv["bytes_per_token"] == 2 * 2 * 2 * 32 * 2
