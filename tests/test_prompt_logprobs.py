"""Prompt logprobs, scored in the prefill, against transformers on the same GGUF in float32.

transformers dequantizes the same file to fp32 and runs one forward pass over the
whole prompt; cholla scores each prompt token in the step that prefills it (in
chunks of ``max_num_batched_tokens``, beside other requests). Both compute fp32,
so every position's logprob agrees to summation order (well inside 1e-3).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from cholla import LLM, SamplingParams  # noqa: E402
from cholla.engine import runner  # noqa: E402
from tests.conftest import hf_gguf_model  # noqa: E402

ATOL = 1e-3
NUM_TOP = 5
PROMPTS = [
    "The quick brown fox jumps over the lazy dog, and then the dog chased the fox around the old barn " * 2,
    "Question: What is the boiling point of water at sea level?\nAnswer: 100 degrees Celsius.",
    "Hi",
]


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    return hf_gguf_model(smollm2_path)


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    # 16-token steps: every long prompt is prefilled (and scored) in several chunks.
    return LLM(smollm2_path, dtype="float32", max_model_len=256, max_num_batched_tokens=16, kv_cache_memory=64 * 2**20)


@torch.inference_mode()
def hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    """``[len(ids) - 1, vocab]``: row i is the distribution over token i + 1."""
    return model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def assert_matches(ids: list[int], scored: list, reference: torch.Tensor, num_top: int) -> None:
    assert len(scored) == len(ids) and scored[0] is None
    for i, entry in enumerate(scored[1:]):
        row = reference[i]
        want = float(row[ids[i + 1]])
        assert abs(entry.logprob - want) < ATOL, f"position {i + 1}: {entry.logprob} vs {want}"
        # The rank counts tokens strictly likelier; allow ties within the tolerance to fall either way.
        assert int((row > want + ATOL).sum()) + 1 <= entry.rank <= int((row > want - ATOL).sum()) + 1
        values, top_ids = row.topk(num_top)
        assert len(entry.top) == num_top
        for (token, logprob), ref_value in zip(entry.top, values.tolist()):
            assert abs(logprob - ref_value) < ATOL
            assert abs(float(row[token]) - logprob) < ATOL  # the id is one of the tied best, at worst
        assert [t for t, _ in entry.top][:1] == top_ids.tolist()[:1] or abs(values[0] - values[1]) < ATOL


def test_prompt_logprobs_match_transformers_chunked_and_batched(llm, hf_model):
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    scored = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=NUM_TOP)
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    # A plain request decodes while the scored prompts are prefilled chunk by chunk beside it.
    outs = llm.generate([PROMPTS[1], *ids], [plain, scored, scored, scored], use_tqdm=False)
    assert outs[0].prompt_logprobs is None and len(outs[0].outputs[0].token_ids) == 12
    for prompt_ids, out in zip(ids, outs[1:]):
        assert out.prompt_token_ids == prompt_ids
        assert_matches(prompt_ids, out.prompt_logprobs, hf_prompt_logprobs(hf_model, prompt_ids), NUM_TOP)
        assert len(out.outputs[0].token_ids) == 3


def test_logits_sliced_to_bound_memory(llm, hf_model, monkeypatch):
    # Three rows of logits at a time: the slices must join up into the same answer.
    monkeypatch.setattr(runner, "PROMPT_LOGITS_SLICE_BYTES", 3 * 4 * llm.engine.model_config.vocab_size)
    ids = llm.tokenizer.encode(PROMPTS[0])
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=0, prompt_logprobs=2), use_tqdm=False)[0]
    assert_matches(ids, out.prompt_logprobs, hf_prompt_logprobs(hf_model, ids), 2)


def test_max_tokens_zero_only_scores_the_prompt(llm):
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)[0]
    completion = out.outputs[0]
    assert completion.finish_reason == "length" and completion.token_ids == [] and completion.text == ""
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids) and all(e.top == [] for e in out.prompt_logprobs[1:])
    assert out.finished
    single = llm.generate("Hi", SamplingParams(max_tokens=0, prompt_logprobs=1), use_tqdm=False)[0]
    assert single.prompt_logprobs[0] is None and single.outputs[0].finish_reason == "length"
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_scored_prompts_skip_the_prefix_cache_but_fill_it(llm):
    engine = llm.engine
    prompt = PROMPTS[0] + " (cache check)"
    n = len(llm.tokenizer.encode(prompt))
    first = llm.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=1), use_tqdm=False)[0]
    again = llm.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=1), use_tqdm=False)[0]
    assert again.metrics.num_cached_prompt_tokens == 0  # no hidden states for cached tokens: computed again
    assert [e.logprob for e in again.prompt_logprobs[1:]] == [e.logprob for e in first.prompt_logprobs[1:]]
    plain = llm.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert plain.metrics.num_cached_prompt_tokens == (n - 1) // engine.config.block_size * engine.config.block_size > 0


def test_preempted_request_scores_each_token_once(llm, smollm2_path, hf_model):
    from cholla.kv.paged_cache import bytes_per_block

    block_bytes = bytes_per_block(llm.engine.model_config, 16, torch.float32)
    # Room for about two of these requests at a time: the newest is preempted and recomputed.
    small = LLM(smollm2_path, dtype="float32", max_model_len=112, max_num_batched_tokens=16,
                kv_cache_memory=7 * block_bytes, enable_prefix_caching=False)
    ids = small.tokenizer.encode(PROMPTS[0])[:40]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, prompt_logprobs=1)
    outs = small.generate([{"prompt_token_ids": ids}] * 3, params, use_tqdm=False)
    assert small.engine.metrics.preemptions > 0
    reference = hf_prompt_logprobs(hf_model, ids)
    for out in outs:
        assert_matches(ids, out.prompt_logprobs, reference, 1)
