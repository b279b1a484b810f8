"""The engine on the real default model: batching must not change greedy tokens,
and every KV block must come back when requests finish or are aborted."""

from __future__ import annotations

import time

import pytest

from cholla import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "List three colours:",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a " + "very " * 60 + "old dragon who",
    "1, 2, 3, 4,",
    "Water boils at",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def make_llm(smollm2_path):
    def make(**kwargs):
        kwargs.setdefault("max_model_len", 512)
        kwargs.setdefault("max_num_batched_tokens", 64)  # the long prompt is prefilled in chunks
        # float32 is batch-invariant (bfloat16 changes kernels with the step's size), so
        # "batched equals alone" holds exactly; the bfloat16 path: tests/test_fast_weights.py.
        kwargs.setdefault("dtype", "float32")
        return LLM(smollm2_path, **kwargs)

    return make


@pytest.fixture(scope="module")
def alone(make_llm):
    llm = make_llm(enable_prefix_caching=False)
    return [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]


def _assert_all_blocks_free(llm: LLM) -> None:
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert all(count == 0 for count in manager.allocator.ref_counts)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batched_equals_alone(make_llm, alone, prefix_caching):
    llm = make_llm(enable_prefix_caching=prefix_caching)
    outs = llm.generate(PROMPTS + PROMPTS, GREEDY, use_tqdm=False)  # repeats hit the prefix cache
    assert [o.outputs[0].token_ids for o in outs] == alone + alone
    _assert_all_blocks_free(llm)
    if prefix_caching:
        assert llm.engine.block_manager.prefix_hits > 0


def test_preemption_under_small_kv_budget(make_llm, alone):
    import torch

    from cholla.kv.paged_cache import bytes_per_block

    probe = make_llm(kv_cache_memory=64 * 2**20)
    block_bytes = bytes_per_block(probe.engine.model_config, 16, torch.float32)
    # Room for about two of the prompts at once: the scheduler must preempt and recompute.
    llm = make_llm(kv_cache_memory=7 * block_bytes, max_model_len=112, enable_prefix_caching=False)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert llm.engine.metrics.preemptions > 0
    _assert_all_blocks_free(llm)


def test_abort_in_prefill_and_decode_frees_blocks(make_llm):
    llm = make_llm()
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=50)
    engine.add_request("long", PROMPTS[3], params)  # several chunks of prefill
    engine.add_request("short", PROMPTS[0], params)
    engine.step()
    engine.abort("long")  # still in prefill
    for _ in range(3):
        engine.step()
    assert engine.states["short"].request.output_token_ids  # decoding
    engine.abort("short")
    assert not engine.has_unfinished_requests()
    _assert_all_blocks_free(llm)


def test_prompt_longer_than_context_is_a_clear_error(make_llm):
    from cholla.errors import ContextLengthError

    llm = make_llm(max_model_len=32)
    with pytest.raises(ContextLengthError, match="32"):
        llm.generate("word " * 100, GREEDY, use_tqdm=False)
    _assert_all_blocks_free(llm)


def test_seed_reproducible_and_n(make_llm):
    llm = make_llm()
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=7, n=2)
    a = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    b = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    assert len(a.outputs) == 2
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]


def test_stop_string_not_in_output(make_llm):
    llm = make_llm()
    free = llm.generate(PROMPTS[4], GREEDY, use_tqdm=False)[0].outputs[0].text
    stop = free.strip()[:2]
    assert stop
    out = llm.generate(PROMPTS[4], SamplingParams(temperature=0.0, max_tokens=6, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text and free.startswith(out.text)


def test_finished_only_steps_give_what_full_steps_give_the_finished(make_llm):
    """``step(finished_only=True)``, what ``LLM.generate`` runs, returns step by step exactly the
    outputs ``step()`` returns for the requests that finished in it (tokens, text, logprobs, reasons;
    stop strings and tokens, n, seeds, a grammar), and nothing for the others. (There the text of a
    request without stop strings is detokenized at its end; here, at every step's output.)"""
    from cholla.sampling.params import StructuredOutputsParams

    llm = make_llm(enable_prefix_caching=False)  # both runs compute the same prompts the same way
    engine = llm.engine
    params = [
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.9, seed=3, max_tokens=12, stop=[" the", "\n"]),
        SamplingParams(temperature=0.7, seed=5, max_tokens=7, n=2),
        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=llm.tokenizer.encode(".", False)),
        SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=StructuredOutputsParams(regex="[a-z]+ [0-9]")),
    ]

    def run(finished_only: bool) -> list[list[tuple]]:
        for i, (prompt, p) in enumerate(zip(PROMPTS * 2, params)):
            engine.add_request(f"r{i}", prompt, p)
        steps = []
        while engine.has_unfinished_requests():
            outputs = engine.step(finished_only=True) if finished_only else engine.step()
            steps.append([(o.request_id, o.prompt, o.prompt_token_ids, o.outputs, o.prompt_logprobs)
                          for o in outputs if o.finished])
            assert all(o.finished for o in outputs) or not finished_only
        return steps

    full, finished = run(False), run(True)
    assert finished == full
    reasons = {(o[0], o[3][0].finish_reason, o[3][0].stop_reason) for step in full for o in step}
    assert {("r2", "stop", "\n"), ("r5", "stop", llm.tokenizer.encode(".", False)[0]), ("r6", "stop", None)} <= reasons
    assert sum(map(len, full)) == 8 and any(not step for step in full)  # every sequence once; steps with none


def test_async_engine_streams_and_frees_on_hang_up(make_llm):
    import asyncio

    from cholla.engine.async_engine import AsyncLLMEngine

    llm = make_llm()
    engine = AsyncLLMEngine(llm.engine)

    async def full(request_id: str) -> list[int]:
        last = None
        async for out in engine.generate(PROMPTS[0], GREEDY, request_id):
            last = out
        assert last.finished
        return last.outputs[0].token_ids

    async def hang_up(request_id: str) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        async for _ in engine.generate(PROMPTS[1], params, request_id):
            break  # the client goes away after its first token

    async def main():
        return await asyncio.gather(full("a"), hang_up("b"), full("c"))

    try:
        tokens_a, _, tokens_c = asyncio.run(main())
        for _ in range(100):  # the hang-up's abort is applied by the engine thread
            if not llm.engine.has_unfinished_requests():
                break
            time.sleep(0.05)
    finally:
        engine.shutdown()
    _assert_all_blocks_free(llm)
    expected = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert tokens_a == tokens_c == expected


def _mixed_prompts(tokenizer, count: int = 64) -> list[list[int]]:
    """Prompts from 3 to ~170 tokens: short questions, long ones cut into several
    prefill chunks, and groups sharing a long preamble (prefix-cache hits that
    are in use by several running requests at once)."""
    import random

    rng = random.Random(0)
    topics = ["rivers", "the moon", "bread", "chess", "volcanoes", "music", "trains", "the ocean",
              "honey bees", "glass", "winter", "clocks", "maps", "salt", "bridges", "paper"]
    preamble = ("You are a careful assistant. Answer briefly, in plain words, and do not repeat the question. "
                "If you are not sure, say so. ") * 3
    prompts = []
    for i in range(count):
        topic = topics[i % len(topics)]
        kind = rng.choice(["short", "preamble", "long"])
        if kind == "short":
            text = f"Tell me about {topic}."
        elif kind == "preamble":
            text = f"{preamble}Question {i}: what do you know about {topic}?"
        else:
            text = f"Here is a list about {topic}: " + ", ".join(f"{topic} {j}" for j in range(rng.randint(10, 40)))
        prompts.append(tokenizer.encode(text))
    return prompts


MIXED = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def mixed(make_llm):
    """64 prompts, and the greedy tokens of each run alone (no batching, no cache)."""
    llm = make_llm(enable_prefix_caching=False, max_num_seqs=1)
    prompts = _mixed_prompts(llm.tokenizer)
    assert max(map(len, prompts)) > 128 and min(map(len, prompts)) < 16  # two chunks, and short ones
    alone = [llm.generate({"prompt_token_ids": p}, MIXED, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    return prompts, alone


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["prefix_caching", "no_prefix_caching", "tiny_kv_budget"])
def test_64_mixed_prompts_batched_equal_alone(make_llm, mixed, setting):
    import torch

    from cholla.kv.paged_cache import bytes_per_block

    prompts, alone = mixed
    # A 128-token step budget: the longest prompts take two chunks, shorter ones share steps.
    kwargs = {"enable_prefix_caching": setting != "no_prefix_caching", "max_num_batched_tokens": 128}
    if setting == "tiny_kv_budget":
        probe = make_llm()
        # Room for about three of the longest prompts: most requests wait, many are preempted.
        num_blocks = 3 * -(-(max(map(len, prompts)) + 4) // 16)
        kwargs["kv_cache_memory"] = num_blocks * bytes_per_block(probe.engine.model_config, 16, torch.float32)
        kwargs["max_model_len"] = num_blocks * 16
    llm = make_llm(**kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], MIXED, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert max(llm.engine.metrics.batch_sizes) >= 6  # they really ran together
    if setting == "prefix_caching":
        assert llm.engine.block_manager.prefix_hits > 0
    if setting == "tiny_kv_budget":
        assert llm.engine.metrics.preemptions > 0
    _assert_all_blocks_free(llm)


def test_kv_cache_budget(monkeypatch):
    from cholla.engine import engine as engine_module
    from cholla.engine.engine import EngineConfig, _kv_cache_budget
    from cholla.errors import InvalidRequestError

    monkeypatch.setattr(engine_module, "_available_memory", lambda: 16 * 2**30)
    assert _kv_cache_budget(EngineConfig()) == 2 * 2**30  # min(2 GiB, a quarter)
    assert _kv_cache_budget(EngineConfig(kv_cache_fraction=0.5)) == 8 * 2**30
    assert _kv_cache_budget(EngineConfig(kv_cache_memory=123, kv_cache_fraction=0.5)) == 123
    monkeypatch.setattr(engine_module, "_available_memory", lambda: 4 * 2**30)
    assert _kv_cache_budget(EngineConfig()) == 2**30
    with pytest.raises(InvalidRequestError, match="kv_cache_fraction"):
        _kv_cache_budget(EngineConfig(kv_cache_fraction=1.5))


def test_async_engine_shutdown_ends_streams_and_frees_blocks(make_llm):
    import asyncio

    from cholla.engine.async_engine import AsyncLLMEngine, EngineDeadError

    llm = make_llm()
    engine = AsyncLLMEngine(llm.engine)
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def main():
        stream = engine.generate(PROMPTS[1], params, "long")
        await stream.__anext__()  # generating
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.generate(PROMPTS[0], params, "late").__anext__()

    asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert not engine._thread.is_alive()
    assert not llm.engine.has_unfinished_requests()
    _assert_all_blocks_free(llm)


def test_heap_released_once_a_long_prefill_gives_way_to_decoding(make_llm, monkeypatch):
    """Freed prefill activations go back to the OS before the first step that is
    (nearly) all decoding, once per ~1024 prefilled tokens; short prompts never trigger it."""
    import cholla.engine.engine as engine_module

    llm = make_llm(max_model_len=1400, max_num_batched_tokens=512)
    calls = []
    monkeypatch.setattr(engine_module, "release_free_memory", lambda: calls.append(True))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate("Water boils at", params, use_tqdm=False)
    assert calls == []
    steps_before = llm.engine.metrics.steps
    llm.generate({"prompt_token_ids": [1] * 1100}, params, use_tqdm=False)  # three 512-token chunks, then decoding
    assert calls == [True]
    assert llm.engine.metrics.steps - steps_before == 3 + 3  # the release cost no step
