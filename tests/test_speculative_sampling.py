"""Speculative sampling (temperature > 0) keeps the distribution plain decoding samples from.

Three checks: the general rejection sampler (a draft model's ``q``) against the exact joint
distribution of two tokens; the engine's n-gram speculation on a tiny 8-token model,
chi-square over the first generated tokens against the distribution computed from the
model through the sampler's own pipeline (penalties counting the drafts as output); and
seeded requests, whose tokens must be the very ones plain decoding gives them.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from cholla.engine.engine import EngineConfig, LLMEngine
from cholla.engine.runner import forward_once
from cholla.models.loader import load_model
from cholla.sampling.params import SamplingParams
from cholla.sampling.sampler import SamplingBatch, probabilities, process_logits
from cholla.speculative.verify import rejection_sample

scipy_stats = pytest.importorskip("scipy.stats")
transformers = pytest.importorskip("transformers")

VOCAB = 8
# Every token occurs with a continuation, so every sequence gets a draft after its first token.
PROMPT = [1, 4, 7, 4, 6, 4, 3, 4, 0, 4, 2, 4, 5, 4, 4]
P_VALUE = 1e-3  # fixed seeds: a failure is a wrong distribution, not bad luck


def chi_square_p_value(observed: Counter, expected: dict, total: int) -> float:
    """Pearson's test; cells expected below 5 are pooled. Asserts nothing was drawn outside the support."""
    assert set(observed) <= set(expected), set(observed) - set(expected)
    big = [cell for cell, p in expected.items() if p * total >= 5]
    small = [cell for cell in expected if cell not in big]
    obs = [observed[c] for c in big] + ([sum(observed[c] for c in small)] if small else [])
    exp = [expected[c] * total for c in big] + ([sum(expected[c] for c in small) * total] if small else [])
    return scipy_stats.chisquare(obs, [e * sum(obs) / sum(exp) for e in exp]).pvalue


# -- the general form, with a draft distribution q ----------------------------------------------

def test_rejection_sample_keeps_the_joint_distribution():
    """Two drafts from q (the second depending on the first), against targets p: the first two
    tokens out must be distributed as p1(x) p2(y | x), whether the step accepted them or not."""
    g = torch.Generator().manual_seed(0)
    v = 4
    p1 = torch.softmax(torch.randn(v, generator=g) * 2, 0)
    p2 = torch.softmax(torch.randn(v, v, generator=g) * 2, 1)  # p2[x]: after token x
    q1 = torch.softmax(torch.randn(v, generator=g) * 2, 0)
    q2 = torch.softmax(torch.randn(v, v, generator=g) * 2, 1)
    p1[3] = 0.0  # a token the target never emits, though the draft proposes it
    p1 /= p1.sum()
    expected = {(x, y): float(p1[x] * p2[x, y]) for x in range(v) for y in range(v) if p1[x] * p2[x, y] > 0}
    for point_mass in (False, True):
        observed, num = Counter(), 6_000
        for _ in range(num):
            if point_mass:  # a deterministic draft: the first token's likeliest follower under q2
                d1 = 1
                drafts, draft_probs = [d1, int(q2[d1].argmax())], None
            else:
                d1 = int(torch.multinomial(q1, 1, generator=g))
                drafts = [d1, int(torch.multinomial(q2[d1], 1, generator=g))]
                draft_probs = torch.stack([q1, q2[d1]])
            run = rejection_sample(drafts, torch.stack([p1, p2[d1], p1]), draft_probs, g)
            if len(run) == 1:  # rejected at once: the second token comes from plain decoding
                run.append(int(torch.multinomial(p2[run[0]], 1, generator=g)))
            observed[tuple(run[:2])] += 1
        assert chi_square_p_value(observed, expected, num) > P_VALUE, point_mass


def test_rejection_sample_of_a_greedy_target_is_greedy_acceptance():
    target = torch.zeros(3, 4).scatter_(1, torch.tensor([[2], [1], [3]]), 1.0)  # one-hot: temperature 0
    assert rejection_sample([2, 1], target, None) == [2, 1, 3]
    assert rejection_sample([2, 0], target, None) == [2, 1]
    assert rejection_sample([0, 1], target, None) == [2]
    with pytest.raises(ValueError):
        rejection_sample([2], target, None)


# -- the engine, on a tiny model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """A random 2-layer Llama over an 8-token word-level vocabulary, its head scaled so that
    its distributions are peaked and a draft is often, but not always, accepted."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny-spec")
    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate("abcdefgh")}, unk_token="a"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=None, eos_token_id=None)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_engines(tiny_path):
    loaded = load_model(tiny_path, "float32")
    base = {"max_model_len": 64, "max_num_seqs": 4096, "max_num_batched_tokens": 1 << 16, "kv_cache_memory": 256 * 2**20,
                "dtype": "float32"}
    return (LLMEngine(loaded, EngineConfig(**base)),
            LLMEngine(loaded, EngineConfig(**base, speculative_method="ngram", num_speculative_tokens=2)))


@pytest.fixture
def speculate_in_large_batches(monkeypatch, tiny_engines):
    """The engine-wide row limit and the short matches' wait for a record are speed policies; these
    tests want every sequence of a big batch to speculate, from its first match on."""
    from cholla.speculative import speculator

    monkeypatch.setattr(tiny_engines[1].scheduler.config, "step_cost", ((1, 1.0), (1 << 30, 1.0)))
    monkeypatch.setattr(speculator, "SHORT_MATCH", 0)


def _run(engine: LLMEngine, params: list[SamplingParams]) -> list[tuple[int, ...]]:
    for i, p in enumerate(params):
        engine.add_request(f"s{i}", {"prompt_token_ids": PROMPT}, p)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = tuple(out.outputs[0].token_ids)
    return [done[f"s{i}"] for i in range(len(params))]


def _exact_distribution(model, params: SamplingParams, length: int) -> dict[tuple[int, ...], float]:
    """P(first ``length`` tokens) under plain decoding: the model's logits after each prefix
    through the sampler's pipeline (penalties and min_tokens see the output so far)."""
    dist = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for prefix, p in dist.items():
            logits = forward_once(model, PROMPT + list(prefix))[-1:]
            batch = SamplingBatch.build([params], [PROMPT], [list(prefix)], [None], VOCAB, "cpu")
            probs = probabilities(process_logits(logits, batch), batch)[0].tolist()
            nxt.update({prefix + (t,): p * q for t, q in enumerate(probs) if q > 0})
        dist = nxt
    return dist


def test_sampled_speculation_keeps_the_distribution(tiny_engines, speculate_in_large_batches):
    """The first three tokens: the first from the prefill, the next two from the first
    verification (its draft accepted or not), 8k sequences in one batch."""
    _, spec = tiny_engines
    params = SamplingParams(temperature=0.9, top_k=4, top_p=0.95, repetition_penalty=1.3, frequency_penalty=0.6,
                            logit_bias={7: 1.5}, max_tokens=3, ignore_eos=True)
    torch.manual_seed(0)
    num = 8_000
    before = spec.stats()
    observed = Counter(_run(spec, [params] * num))
    after = spec.stats()
    drafts = after.spec_draft_tokens - before.spec_draft_tokens
    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
    assert drafts >= num * 0.9 and 0.2 * drafts < accepted < 0.9 * drafts  # both outcomes, often
    expected = _exact_distribution(spec.loaded.model, params, 3)
    assert chi_square_p_value(observed, expected, num) > P_VALUE


def test_seeded_requests_give_plain_decodings_tokens(tiny_engines, speculate_in_large_batches):
    """A seeded request draws its rows from its own generator in plain decoding's order, and the
    draws of rejected rows are undone: its tokens are those of plain decoding, all settings."""
    plain, spec = tiny_engines
    settings = [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 3, "presence_penalty": 1.0},
                {"temperature": 1.2, "top_p": 0.8, "min_p": 0.05, "repetition_penalty": 1.5},
                {"temperature": 0.8, "frequency_penalty": 1.0, "logit_bias": {2: 2.0}, "min_tokens": 5, "stop_token_ids": [6]}]
    params = [SamplingParams(**settings[i % len(settings)], seed=i, max_tokens=12) for i in range(200)]
    before = spec.stats()
    assert _run(spec, params) == _run(plain, params)
    after = spec.stats()
    assert after.spec_accepted_tokens - before.spec_accepted_tokens > 200  # the runs did speculate
    assert after.spec_draft_tokens - before.spec_draft_tokens > after.spec_accepted_tokens - before.spec_accepted_tokens
