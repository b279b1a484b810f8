"""Hybrid models (recurrent layers with a state per sequence beside attention) on tiny random
models (``tests/tiny_models.py``): cholla against transformers from SafeTensors, against itself
from llama.cpp's GGUF conversion, and through the engine's state cache."""

from __future__ import annotations

import logging
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cholla import LLM, SamplingParams  # noqa: E402
from cholla.engine.runner import forward_once  # noqa: E402
from cholla.errors import InvalidRequestError  # noqa: E402
from cholla.kv.state_cache import state_bytes_per_sequence  # noqa: E402
from cholla.models.loader import load_model  # noqa: E402
from tests import tiny_models  # noqa: E402

NAMES = list(tiny_models.hybrid_configs())
ENGINE_NAMES = [name for name in NAMES if name != "lfm2_moe"]  # LFM2-MoE takes LFM2's path through the engine
PROMPT = [(i * 37 + 11) % tiny_models.VOCAB for i in range(40)]
CHUNK = 16  # tokens per step: PROMPT is prefilled in three chunks, the state carried across them


def _engine(folder, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 128)
    kwargs.setdefault("max_num_batched_tokens", CHUNK)
    return LLM(folder, dtype="float32", **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_safetensors_match_transformers_across_prefill_chunks(tiny, name):
    entry = tiny(name)
    loaded = load_model(entry["folder"], "float32")
    assert loaded.config.architecture == name and loaded.config.has_state
    reference = tiny_models.reference_logits(entry["model"], PROMPT)
    tiny_models.assert_close(forward_once(loaded.model, PROMPT, block_size=8), reference)

    # Through the engine: prompt logprobs of three prefill chunks, then 32 greedy tokens of decode.
    llm = _engine(entry["folder"])
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, prompt_logprobs=0)
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    want = reference[:-1].log_softmax(-1)[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    got = torch.tensor([e.logprob for e in out.prompt_logprobs[1:]])
    assert (got - want).abs().max().item() < 1e-4
    with torch.no_grad():
        ref = entry["model"].generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False,
                                      min_new_tokens=32)[0, len(PROMPT):].tolist()
    assert list(out.outputs[0].token_ids) == ref
    # Again, the prefix and its state snapshots cached: prompt logprobs still compute the whole prompt,
    # and a plain request resumes from a snapshot to the same tokens.
    again = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    assert again.metrics.num_cached_prompt_tokens == 0
    assert [e.logprob for e in again.prompt_logprobs[1:]] == [e.logprob for e in out.prompt_logprobs[1:]]
    plain = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    resumed = llm.generate({"prompt_token_ids": PROMPT}, plain, use_tqdm=False)[0]
    assert resumed.metrics.num_cached_prompt_tokens > 0 and llm.engine.snapshots.restored == 1
    assert list(resumed.outputs[0].token_ids) == ref
    # /metrics reports the slots (all free again) and the restore.
    from types import SimpleNamespace

    from cholla.serve.metrics import _EngineCollector

    host = SimpleNamespace(engine=SimpleNamespace(engine=llm.engine), num_in_flight=0)
    scraped = {m.name: m.samples[0].value for m in _EngineCollector(host, "tiny").collect() if m.samples}
    assert scraped["cholla:state_slots_usage_perc"] == 0.0 and scraped["cholla:state_snapshots_restored"] == 1


@pytest.mark.parametrize("name", NAMES)
def test_gguf_matches_own_safetensors(tiny, gguf_of, name):
    """llama.cpp's f32 conversion gives transformers' logits; Q8_0 stays within its rounding."""
    reference = tiny_models.reference_logits(tiny(name)["model"], PROMPT)
    loaded = load_model(gguf_of(name), "float32")
    assert loaded.config.architecture == name and loaded.config.has_state
    tiny_models.assert_close(forward_once(loaded.model, PROMPT, block_size=8), reference)
    ours = forward_once(load_model(gguf_of(name, "Q8_0"), "float32").model, PROMPT, block_size=8)
    relative_rms = ((ours - reference).pow(2).mean() / reference.pow(2).mean()).sqrt().item()
    assert relative_rms <= 0.05


def _prompts() -> list[dict]:
    lengths = [5, 23, 9, 40, 17, 3, 30, 12]
    return [{"prompt_token_ids": [(i * 7 + n * 13) % tiny_models.VOCAB for i in range(n)]} for n in lengths]


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_engine_batched_chunked_preempted_equal_alone(tiny, name, caplog):
    folder = tiny(name)["folder"]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = _prompts()
    single = _engine(folder)
    alone = [single.generate(p, greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]

    # Prefix caching on: repeats resume from cached blocks and the state snapshot at their end.
    with caplog.at_level(logging.INFO, logger="cholla"):
        llm = _engine(folder, block_size=8)
    assert any(r.getMessage().startswith(f"prefix caching for {name} resumes from state snapshots")
               for r in caplog.records)
    outs = llm.generate(prompts + prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone + alone
    snapshots = llm.engine.snapshots
    assert llm.engine.block_manager.prefix_hits > 0 and snapshots.restored > 0 and tiny_models.all_free(llm)
    assert sum(o.metrics.num_cached_prompt_tokens for o in outs[len(prompts):]) > 0
    assert len(snapshots.by_hash) <= snapshots.cache.num_slots == llm.engine.kv_layout.num_snapshots

    # Few blocks: the newest requests are preempted, give their slots back and are recomputed, from 0
    # or from their own snapshots.
    from cholla.kv.paged_cache import bytes_per_block

    config = llm.engine.model_config
    budget = 10 * bytes_per_block(config, 8, torch.float32) + 12 * state_bytes_per_sequence(config)
    small = _engine(folder, block_size=8, kv_cache_memory=budget, max_model_len=64, max_num_seqs=8)
    assert small.engine.state_cache.num_slots == 8 and small.engine.snapshots is not None
    outs = small.generate(prompts + prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone + alone
    assert small.engine.metrics.preemptions > 0 and small.engine.snapshots.restored > 0 and tiny_models.all_free(small)

    # A budget with no room for one snapshot beside the slots: prefix caching off, said so.
    budget = 2 * bytes_per_block(config, 8, torch.float32) + 4 * state_bytes_per_sequence(config)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cholla"):
        tight = _engine(folder, block_size=8, kv_cache_memory=budget, max_model_len=16)
    assert any(r.getMessage().startswith(f"prefix caching is off for {name}") for r in caplog.records)
    assert tight.engine.snapshots is None and not tight.engine.block_manager.enable_prefix_caching

    # Three state slots for eight requests: they take turns, and all finish as alone.
    three = _engine(folder, max_num_seqs=3)
    assert three.engine.state_cache.num_slots == 3 and three.engine.stats().state_slots_total == 3
    outs = three.generate(prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone and tiny_models.all_free(three)

    # Aborts, in prefill and while decoding, leave every block and every slot free.
    engine = llm.engine
    engine.add_request("long", prompts[3], SamplingParams(temperature=0.0, max_tokens=20))
    engine.add_request("short", prompts[0], SamplingParams(temperature=0.0, max_tokens=20))
    engine.add_request("queued", prompts[1], SamplingParams(temperature=0.0, max_tokens=20))
    engine.step()
    assert engine.stats().state_slots_free < engine.stats().state_slots_total
    engine.abort("long")  # still in prefill
    for _ in range(3):
        engine.step()
    engine.abort("short")  # decoding
    engine.abort("queued")
    assert not engine.has_unfinished_requests() and tiny_models.all_free(llm)


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_engine_refuses_speculation_and_logs_both_caches(tiny, name, caplog):
    folder = tiny(name)["folder"]
    with pytest.raises(InvalidRequestError, match="speculative decoding is not supported") as error:
        _engine(folder, speculative_method="ngram")
    assert "\n" not in str(error.value)
    with pytest.raises(InvalidRequestError, match="holds no sequence's recurrent state") as error:
        _engine(folder, kv_cache_memory=1000)  # half of it is less than one sequence's state
    assert "\n" not in str(error.value)
    with caplog.at_level(logging.INFO, logger="cholla"):
        llm = _engine(folder, kv_cache_memory=2**20, max_num_seqs=16)
    engine = llm.engine
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:"))
    per_sequence = state_bytes_per_sequence(engine.model_config)
    logged = re.search(r"(\d+) bytes per token.*state cache: (\d+) slots of (\d+) bytes per sequence.*"
                       r"maximum concurrency for 128-token requests: ([\d.]+)x", line)
    assert logged, line
    per_token, slots, per_seq, concurrency = logged.groups()
    assert int(per_token) == engine.kv_layout.block_bytes // engine.kv_layout.block_size
    assert int(slots) == 16 == engine.state_cache.num_slots and int(per_seq) == per_sequence
    assert float(concurrency) == 16  # the slots bind before the tokens do
    assert engine.state_cache.nbytes == 16 * per_sequence
    assert engine.kv_cache.nbytes + engine.state_cache.nbytes <= 2**20


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_plan_counts_the_state_as_the_engine_allocates(tiny, name):
    from cholla.kv.kv_types import kv_cache_type
    from cholla.plan import PlanRequest, format_plan, make_plan, read_model_facts

    folder = tiny(name)["folder"]
    facts = read_model_facts(folder)
    f32 = kv_cache_type("f32")
    for budget, seqs in ((2**20, 16), (80 * 1024, 64)):  # seats bind, then half the budget does
        plan = make_plan(facts, PlanRequest(context=128, kv_cache_memory=budget, max_num_seqs=seqs), f32, f32, None)
        engine = _engine(folder, kv_cache_memory=budget, max_num_seqs=seqs).engine
        assert plan.kv["state_bytes_per_sequence"] == state_bytes_per_sequence(engine.model_config) > 0
        assert plan.layout["state_slots"] == engine.state_cache.num_slots
        assert plan.layout["state_bytes"] == engine.state_cache.nbytes
        assert plan.layout["state_snapshots"] == engine.snapshots.cache.num_slots > 0
        assert plan.layout["snapshot_bytes"] == engine.snapshots.cache.nbytes
        assert plan.layout["num_blocks"] == engine.kv_cache.num_blocks and plan.layout["bytes"] == engine.kv_cache.nbytes
        assert plan.layout["max_concurrency"] == engine.kv_layout.max_concurrency
        assert plan.layout["max_whole_requests"] <= plan.layout["state_slots"]
    assert plan.layout["state_bytes"] <= budget // 2 < 64 * plan.kv["state_bytes_per_sequence"]
    assert "state slots" in format_plan(plan) and "snapshots for prefix caching" in format_plan(plan)
    assert "no KV" in format_plan(plan)


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_info_shows_state_per_sequence(tiny, gguf_of, name):
    from cholla.info import format_info, model_info

    for path in (tiny(name)["folder"], gguf_of(name)):
        info = model_info(path)
        assert info["state_bytes_per_sequence"] == state_bytes_per_sequence(load_model(path, "float32").config) > 0
        assert "state per sequence" in format_info(info)
    # The attention line counts only the attention layers (a hybrid's others are recurrent).
    assert model_info(tiny("mamba2")["folder"])["attention"] == "none (recurrent layers only)"
    config = load_model(tiny(name)["folder"], "float32").config
    attention_layers = sum(kind == "full_attention" for kind in config.layer_types)
    assert f"in {attention_layers} of {config.num_layers} layers" in model_info(tiny(name)["folder"])["attention"]


def test_a_model_without_attention_runs_on_token_counting_blocks(tmp_path):
    """LFM2 with convolution layers only keeps no KV at all (as pure Mamba-2): its blocks cost
    nothing and only count tokens, the state slots take the whole budget, and it still matches
    transformers through the engine, batched and chunked."""
    config = tiny_models.hybrid_configs()["lfm2"]
    config.layer_types = ["conv"] * config.num_hidden_layers
    torch.manual_seed(1)
    reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in reference.named_parameters():
            p.mul_(15.0 if "conv.in_proj" in pname else 30.0 if "conv.conv" in pname else 1.0)
    reference.save_pretrained(tmp_path)
    tiny_models.tiny_tokenizer().save_pretrained(tmp_path)

    llm = _engine(tmp_path, max_model_len=None, kv_cache_memory=4 * 2**20)
    engine = llm.engine
    assert engine.kv_layout.block_bytes == 0 and engine.kv_cache.nbytes == 0
    assert engine.max_model_len == config.max_position_embeddings
    assert engine.state_cache.num_slots == 64  # max_num_seqs: the budget holds far more
    assert engine.block_manager.num_blocks == 64 * config.max_position_embeddings // 16
    from cholla.kv.kv_types import kv_cache_type
    from cholla.plan import PlanRequest, format_plan, make_plan, read_model_facts

    f32 = kv_cache_type("f32")
    plan = make_plan(read_model_facts(tmp_path), PlanRequest(kv_cache_memory=4 * 2**20), f32, f32, None)
    assert (plan.layout["state_slots"], plan.layout["num_blocks"], plan.layout["bytes"]) == (64, engine.kv_cache.num_blocks, 0)
    assert plan.layout["max_concurrency"] == engine.kv_layout.max_concurrency == 64 and plan.layout["fits"]
    assert "(no attention layers)" in format_plan(plan)
    prompts = [PROMPT, PROMPT[:7], PROMPT[5:30]]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = list(prompt)  # transformers' generate needs an attention layer for its cache: whole forwards
        for _ in range(16):
            with torch.no_grad():
                ids.append(int(reference(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        assert list(out.outputs[0].token_ids) == ids[len(prompt):]
    assert tiny_models.all_free(llm)
