"""Gemma 4 (text) on tiny random models (``tests/tiny_models.py``: the dense variant with
per-layer embeddings and KV-shared layers, the MoE one with K = V global layers): cholla against
transformers from SafeTensors, against itself from llama.cpp's GGUF conversion (f32 and Q8_0),
its cache geometry, a multimodal checkpoint's text tower, and config contradictions.
Prompts run past the sliding window (8). The engine check is in ``test_models_moe.py``."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cholla import LLM, SamplingParams  # noqa: E402
from cholla.engine.runner import forward_once  # noqa: E402
from cholla.errors import ModelFormatError  # noqa: E402
from cholla.models.loader import load_model  # noqa: E402
from tests import tiny_models  # noqa: E402

NAMES = list(tiny_models.gemma4_configs())
PROMPT = [(i * 37 + 11) % tiny_models.VOCAB for i in range(40)]


@pytest.mark.parametrize("name", NAMES)
def test_safetensors_match_transformers(tiny, name):
    entry = tiny(name)
    loaded = load_model(entry["folder"], "float32")
    config = loaded.config
    assert config.architecture == "gemma4" and (config.moe is not None) == (name == "gemma4_moe")
    tiny_models.assert_close(forward_once(loaded.model, PROMPT, block_size=8), tiny_models.reference_logits(entry["model"], PROMPT))

    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    llm = LLM(entry["folder"], dtype="float32", max_model_len=128, max_num_batched_tokens=8)  # chunked prefill
    ours = llm.generate({"prompt_token_ids": PROMPT[:20]}, greedy, use_tqdm=False)[0].outputs[0].token_ids
    with torch.no_grad():
        ref = entry["model"].generate(torch.tensor([PROMPT[:20]]), max_new_tokens=32, do_sample=False,
                                      min_new_tokens=32)[0, 20:].tolist()
    assert list(ours) == ref


@pytest.mark.parametrize("name", NAMES)
def test_gguf_f32_and_q8_0(tiny, gguf_of, name):
    """llama.cpp's conversion (fused experts, router scales, partial rope as frequency divisors,
    per-layer FFN widths and KV heads) gives transformers' logits; Q8_0, read from its blocks, gives
    what its dequantized values give, and stays near the float model."""
    ref = tiny_models.reference_logits(tiny(name)["model"], PROMPT)
    loaded = load_model(gguf_of(name), "float32")
    assert loaded.config.architecture == "gemma4"
    tiny_models.assert_close(forward_once(loaded.model, PROMPT, block_size=8), ref)

    quantized = load_model(gguf_of(name, "Q8_0"), "float32")
    assert quantized.model.layers[1].self_attn.q_proj.weight.qtype.name == "Q8_0"
    ours = forward_once(quantized.model, PROMPT, block_size=8)
    exact = forward_once(load_model(gguf_of(name, "Q8_0", dequantized=True), "float32").model, PROMPT, block_size=8)
    tiny_models.assert_close(ours, exact)
    # Unscaled scores of unit-RMS q and k make these random models' softmaxes sharp: Q8_0 noise in any
    # one tensor alone moves the logits 2-8% (RMS); a misread tensor moves them by their whole size.
    assert ((ours - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item() <= 0.25


def test_gguf_vocabulary_matches_tokenizer_json(tiny, gguf_of):
    """The ``gemma4`` GGUF tokenizer (listed merges, byte fallback, "▁" spaces) encodes as the
    checkpoint's own tokenizer.json does (plus the BOS the file asks for)."""
    from cholla.formats.gguf import read_gguf
    from cholla.tokenizer.tokenizer import Tokenizer

    ours = Tokenizer.from_gguf(read_gguf(gguf_of("gemma4")).metadata)
    hf = transformers.AutoTokenizer.from_pretrained(tiny("gemma4")["folder"])
    for text in ("hello world, the quick brown fox", "the lazy dog\n\nsays little é€"):
        assert ours.encode(text) == [2, *hf(text).input_ids]


def test_cache_geometry_and_info(tiny, gguf_of):
    """Sliding layers keep 2 heads x 16, global ones their own heads x 32, KV-shared layers nothing;
    ``cholla info`` says so."""
    from cholla.info import format_info, model_info
    from cholla.kv.paged_cache import bytes_per_token

    dense = load_model(tiny("gemma4")["folder"], "float32").config
    assert bytes_per_token(dense, torch.float32) == 4 * 2 * (2 * 16 + 2 * 16 + 2 * 32)  # layers 3, 4 share
    moe = load_model(tiny("gemma4_moe")["folder"], "float32").config
    assert bytes_per_token(moe, torch.float32) == 4 * 2 * (2 * 16 + 1 * 32 + 1 * 32)
    for path in (tiny("gemma4")["folder"], gguf_of("gemma4")):
        shown = format_info(model_info(path))
        assert "global layers: head dim 32, KV heads 2" in shown and "last 2 layers share KV" in shown
        assert "per-layer embeddings 8" in shown
    info = model_info(gguf_of("gemma4_moe"))
    assert info["experts"] == {"count": 8, "active": 2, "shared_size": 0}
    assert "K = V" in info["attention"]


def test_plan_counts_per_layer_geometry_as_the_engine_allocates(tiny):
    """``cholla plan`` on the dense model: per kind, the bytes its layers store (KV-shared ones none),
    what a window-aware allocation would keep, and the decode step's reads (shared layers read their
    producer's blocks); the engine allocates what the plan counts."""
    from cholla.kv.kv_types import kv_cache_type
    from cholla.plan import GB, TFLOP, Hardware, PlanRequest, decode_step, make_plan, read_model_facts, window_aware_bytes

    facts, bf16 = read_model_facts(tiny("gemma4")["folder"]), kv_cache_type("bf16")
    plan = make_plan(facts, PlanRequest(context=64, kv_cache_memory=2**20), bf16, bf16, None)
    sliding, full = 2 * 2 * 16 * 2, 2 * 2 * 32 * 2  # K and V, 2 heads, bf16
    kinds = {kind["kind"]: kind for kind in plan.kv["layer_kinds"]}
    assert kinds["sliding_attention"]["layers"] == 3 and kinds["sliding_attention"]["bytes_per_token"] == 2 * sliding
    assert kinds["full_attention"]["layers"] == 2 and kinds["full_attention"]["bytes_per_token"] == full
    assert plan.kv["bytes_per_token"] == 2 * sliding + full
    # 64 tokens in 8 blocks of 8; a window of 8 reaches at most 2 of them
    assert window_aware_bytes(facts.config, bf16, bf16, 64, 8) == 8 * (2 * 2 * sliding + 8 * full)
    hw = Hardware("test", 1000 * GB, 100 * TFLOP, None, "test")
    kv_read = 2 * (3 * 8 * sliding + 2 * 64 * full)  # two sequences at 64 tokens; sliding layers see 8
    step = decode_step(facts, hw, bf16, bf16, 2, 64)
    assert step.bound == "memory" and step.seconds == pytest.approx((facts.weights.decode_bytes + kv_read) / hw.bandwidth)
    engine = LLM(tiny("gemma4")["folder"], dtype="float32", max_model_len=64, kv_cache_dtype="bf16",
                 kv_cache_memory=2**20).engine
    assert engine.kv_cache.nbytes == engine.kv_layout.nbytes == plan.layout["bytes"]


def test_multimodal_checkpoint_runs_its_text_tower(tiny, tmp_path, caplog):
    """A Gemma4ForConditionalGeneration folder: the config's ``text_config``, the
    ``model.language_model.*`` tensors; the vision tower's tensors are skipped with a log line."""
    from safetensors.torch import load_file, save_file

    folder = tiny("gemma4")["folder"]
    text = json.loads((folder / "config.json").read_text())
    config = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
              "text_config": text, "vision_config": {"model_type": "gemma4_vision", "hidden_size": 16}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = {name.replace("model.", "model.language_model.", 1): w
             for name, w in load_file(folder / "model.safetensors").items()}
    state["model.vision_tower.encoder.layers.0.mlp.gate_proj.linear.weight"] = torch.zeros(4, 16)
    save_file(state, tmp_path / "model.safetensors")
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    with caplog.at_level(logging.INFO):
        loaded = load_model(tmp_path, "float32")
    assert "skipped 1 vision/audio tensors" in caplog.text
    tiny_models.assert_close(forward_once(loaded.model, PROMPT, block_size=8), tiny_models.reference_logits(tiny("gemma4")["model"], PROMPT))


@pytest.mark.parametrize("change, needle", [
    ({"num_kv_shared_layers": 4}, "num_kv_shared_layers = 4 leaves layer 2 no earlier full_attention layer"),
    ({"per_layer_config": {"2": {"head_dim": 24}, "4": {"head_dim": 32}}}, "different head sizes"),
    ({"hidden_size_per_layer_input": 6}, "embed_tokens_per_layer"),
    ({"use_bidirectional_attention": "all"}, "encoder"),
])
def test_config_contradictions_are_one_line_errors(tiny, tmp_path, change, needle):
    folder = tiny_models.with_config(tiny("gemma4")["folder"], tmp_path / "model", change)
    with pytest.raises(ModelFormatError, match=needle) as error:
        load_model(folder, "float32")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("shared, needle", [
    (3, "gemma4.attention.shared_kv_layers = 3 leaves layer 2 no earlier full_attention layer"),
    (1, "needs gate_proj of layer 3 to be (96, 64), but it is (192, 64)"),  # a double-wide MLP, but unshared
])
def test_gguf_kv_sharing_contradicting_the_file_is_one_line_error(gguf_of, tmp_path, shared, needle):
    from tests.test_models_moe import _with_metadata

    path = _with_metadata(gguf_of("gemma4"), tmp_path / "bad.gguf", "gemma4.attention.shared_kv_layers", shared)
    with pytest.raises(ModelFormatError, match=re.escape(needle)) as error:
        load_model(path, "float32")
    assert "\n" not in str(error.value)
