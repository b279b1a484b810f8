"""cholla.sampling: stages against transformers' logits processors, the sampler's draws, stop strings."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from cholla.errors import InvalidRequestError
from cholla.sampling.params import SamplingParams
from cholla.sampling.sampler import (
    SamplingBatch,
    apply_min_p,
    apply_penalties,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    sample,
    token_counts,
)
from cholla.sampling.stop import find_stop, safe_prefix_len

VOCAB = 64
NO_INPUT = torch.zeros(1, 0, dtype=torch.long)


def random_logits(rows: int = 8, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def hf_rows(warper_for_row, logits: torch.Tensor) -> torch.Tensor:
    """Apply a transformers warper row by row (each row with its own parameter)."""
    return torch.cat([warper_for_row(row)(NO_INPUT, logits[row : row + 1]) for row in range(len(logits))])


def assert_same_mask_and_values(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))
    kept = ~torch.isinf(reference)
    assert kept.any(dim=-1).all()
    torch.testing.assert_close(ours[kept], reference[kept], rtol=0, atol=0)


def build(params, prompts=None, outputs=None, generators=None, vocab=VOCAB, eos=frozenset()) -> SamplingBatch:
    rows = len(params)
    return SamplingBatch.build(
        params=params,
        prompt_token_ids=prompts or [[1, 2, 3]] * rows,
        output_token_ids=outputs or [[]] * rows,
        generators=generators or [None] * rows,
        vocab_size=vocab,
        device="cpu",
        eos_token_ids=set(eos),
    )


def seeded(params: SamplingParams) -> torch.Generator | None:
    return None if params.seed is None else torch.Generator().manual_seed(params.seed)


# -- stages against transformers ---------------------------------------------------


def test_top_k_matches_transformers():
    logits = random_logits()
    logits[0, :4] = logits[0].max() + 1  # ties at the k-th value stay, as in transformers
    ks = [3, 1, 5, 10, VOCAB - 1, 2, 40, 7]
    ours = apply_top_k(logits, torch.tensor(ks))
    assert_same_mask_and_values(ours, hf_rows(lambda r: TopKLogitsWarper(ks[r]), logits))
    # 0 and >= vocab mean off.
    assert torch.equal(apply_top_k(logits[:2], torch.tensor([0, VOCAB])), logits[:2])


def test_top_p_matches_transformers():
    logits = random_logits()
    ps = [0.9, 0.5, 0.1, 0.99, 0.01, 0.75, 1.0, 0.3]
    ours = apply_top_p(logits, torch.tensor(ps))
    assert_same_mask_and_values(ours, hf_rows(lambda r: TopPLogitsWarper(ps[r]), logits))
    assert (~torch.isinf(ours)).sum(dim=-1).min() >= 1


def test_min_p_matches_transformers():
    logits = random_logits()
    ps = [0.05, 0.1, 0.5, 0.0, 1.0, 0.2, 0.01, 0.9]
    ours = apply_min_p(logits, torch.tensor(ps))
    assert_same_mask_and_values(ours, hf_rows(lambda r: MinPLogitsWarper(ps[r]), logits))


def test_temperature_matches_transformers():
    logits = random_logits()
    ts = [0.7, 1.0, 1.5, 0.1, 2.0, 0.3, 0.9, 1.2]
    ours = apply_temperature(logits, torch.tensor(ts))
    torch.testing.assert_close(ours, hf_rows(lambda r: TemperatureLogitsWarper(ts[r]), logits))


def test_repetition_penalty_matches_transformers():
    logits = random_logits()
    gen = torch.Generator().manual_seed(1)
    seen = torch.randint(0, VOCAB, (len(logits), 20), generator=gen)
    penalties = [1.3, 0.8, 2.0, 1.0, 1.1, 1.7, 0.5, 1.05]
    counts = token_counts(seen.tolist(), VOCAB)
    ours = apply_penalties(logits, counts, torch.zeros_like(counts), torch.tensor(penalties), None, None)
    reference = torch.cat(
        [RepetitionPenaltyLogitsProcessor(penalties[r])(seen[r : r + 1], logits[r : r + 1]) for r in range(len(logits))]
    )
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_warper_chain_matches_transformers():
    """temperature → top-k → top-p → min-p through sample's own stage order, one row at a time in HF."""
    logits = random_logits(rows=4)
    params = [
        SamplingParams(temperature=0.7, top_k=10, top_p=0.8, min_p=0.05),
        SamplingParams(temperature=1.3, top_k=0, top_p=0.6),
        SamplingParams(temperature=1.0, top_k=5, min_p=0.2),
        SamplingParams(temperature=0.5, top_p=0.95, min_p=0.1),
    ]
    batch = build(params)
    ours = apply_temperature(logits, batch.temperatures)
    ours = apply_min_p(apply_top_p(apply_top_k(ours, batch.top_k), batch.top_p), batch.min_p)
    for row, p in enumerate(params):
        ref = TemperatureLogitsWarper(p.temperature)(NO_INPUT, logits[row : row + 1])
        if p.top_k:
            ref = TopKLogitsWarper(p.top_k)(NO_INPUT, ref)
        ref = TopPLogitsWarper(p.top_p)(NO_INPUT, ref)
        ref = MinPLogitsWarper(p.min_p)(NO_INPUT, ref)
        assert_same_mask_and_values(ours[row : row + 1], ref)


# -- penalties, bias, min_tokens, logprobs -------------------------------------------


def test_frequency_and_presence_penalties_by_hand():
    logits = torch.zeros(1, 6)
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, temperature=0)]
    # Prompt tokens do not count for frequency/presence; output token 2 three times, 4 once.
    batch = build(params, prompts=[[1, 1, 5]], outputs=[[2, 4, 2, 2]], vocab=6)
    out = apply_penalties(
        logits, batch.prompt_counts, batch.output_counts,
        batch.repetition_penalties, batch.frequency_penalties, batch.presence_penalties,
    )
    expected = torch.tensor([[0.0, 0.0, -(0.5 * 3 + 0.25), 0.0, -(0.5 * 1 + 0.25), 0.0]])
    torch.testing.assert_close(out, expected)


def test_penalties_steer_greedy_choice():
    logits = torch.tensor([[0.0, 2.0, 1.9, -1.0]])
    params = [SamplingParams(temperature=0, repetition_penalty=1.2)]
    # Token 1 was in the prompt: 2.0 / 1.2 < 1.9, so the argmax moves to token 2.
    assert sample(logits, build(params, prompts=[[1]], vocab=4)).token_ids.tolist() == [2]
    params = [SamplingParams(temperature=0, frequency_penalty=0.2)]
    assert sample(logits, build(params, prompts=[[2]], outputs=[[1]], vocab=4)).token_ids.tolist() == [2]
    assert sample(logits, build(params, prompts=[[1]], outputs=[[2]], vocab=4)).token_ids.tolist() == [1]


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, 1.0]] * 4)
    params = [
        SamplingParams(temperature=0, min_tokens=2),  # EOS (1) banned, falls to 2
        SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2]),  # 1 and 2 banned
        SamplingParams(temperature=0, min_tokens=2),  # already 2 tokens out: free
        SamplingParams(temperature=0, min_tokens=2, ignore_eos=True),  # EOS cannot stop it, so not banned
    ]
    outputs = [[0], [0], [0, 0], [0]]
    out = sample(logits, build(params, outputs=outputs, vocab=5, eos={1}))
    assert out.token_ids.tolist() == [2, 3, 1, 1]
    # Also for sampled rows: the banned ids are never drawn.
    params = [SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=[2])] * 200
    tokens = sample(logits[:1].expand(200, -1), build(params, outputs=[[]] * 200, vocab=5, eos={1})).token_ids
    assert not torch.isin(tokens, torch.tensor([1, 2])).any()


def test_logit_bias():
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    params = [SamplingParams(temperature=0, logit_bias={"2": 2.5}), SamplingParams(temperature=0, logit_bias={1: -100})]
    assert sample(logits, build(params, vocab=3)).token_ids.tolist() == [2, 2]
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        build([SamplingParams(logit_bias={7: 1.0})], vocab=3)
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias={7: 1.0}).verify_vocab(3)


def test_logprobs_are_raw_log_softmax():
    logits = random_logits(rows=3)
    params = [
        SamplingParams(temperature=0.5, top_k=3, logprobs=4, repetition_penalty=1.5),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logprobs=0, logit_bias={0: 50.0}),
    ]
    out = sample(logits, build(params))
    reference = torch.log_softmax(logits, dim=-1)
    chosen, top = out.logprobs[0]
    assert chosen == pytest.approx(reference[0, out.token_ids[0]].item(), abs=1e-6)
    values, ids = torch.topk(reference[0], 4)
    assert [t for t, _ in top] == ids.tolist()
    assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-6)
    assert out.logprobs[1] is None
    chosen, top = out.logprobs[2]
    assert out.token_ids[2] == 0 and top == []
    assert chosen == pytest.approx(reference[2, 0].item(), abs=1e-6)
    assert sample(logits, build([SamplingParams()] * 3)).logprobs is None


# -- drawing -----------------------------------------------------------------------


MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.8, top_k=5, seed=1234),
    SamplingParams(temperature=1.0, top_p=0.5),
    SamplingParams(temperature=1.2, top_k=8, top_p=0.9, min_p=0.02, seed=7),
    SamplingParams(temperature=0, repetition_penalty=1.3),
    SamplingParams(temperature=0.9, min_p=0.3),
]


def run_steps(params: list[SamplingParams], logits: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` decode steps on fixed logits, each row keeping its own generator: ``[steps, rows]``."""
    generators = [seeded(p) for p in params]
    tokens = [sample(logits, build(params, generators=generators)).token_ids for _ in range(steps)]
    return torch.stack(tokens)


def test_mixed_batch():
    logits = random_logits(rows=len(MIXED))
    first = run_steps(MIXED, logits, steps=50)
    # Greedy rows are the argmax (of the penalised logits for row 4).
    assert (first[:, 0] == logits[0].argmax()).all()
    penalised = logits[4].clone()
    penalised[[1, 2, 3]] = torch.where(penalised[[1, 2, 3]] < 0, penalised[[1, 2, 3]] * 1.3, penalised[[1, 2, 3]] / 1.3)
    assert (first[:, 4] == penalised.argmax()).all()
    # Seeded rows repeat exactly; unseeded ones (almost surely) do not.
    second = run_steps(MIXED, logits, steps=50)
    assert torch.equal(first[:, [1, 3]], second[:, [1, 3]])
    assert not torch.equal(first[:, 2], second[:, 2]) or not torch.equal(first[:, 5], second[:, 5])
    # A seeded row gives the same tokens alone as in the batch.
    for row in (1, 3):
        alone = run_steps([MIXED[row]], logits[row : row + 1], steps=50)
        assert torch.equal(alone[:, 0], first[:, row])
    # Every draw lies inside the row's top-k / top-p / min-p set.
    batch = build(MIXED)
    allowed = apply_temperature(logits, batch.temperatures)
    allowed = ~torch.isinf(apply_min_p(apply_top_p(apply_top_k(allowed, batch.top_k), batch.top_p), batch.min_p))
    for row in (1, 2, 3, 5):
        assert allowed[row, first[:, row]].all()
        assert allowed[row].sum() < VOCAB


def test_draws_follow_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0])
    draws = 20_000
    batch = build([SamplingParams(temperature=0.7)] * draws, prompts=[[]] * draws, vocab=5)
    tokens = sample(logits.expand(draws, -1), batch).token_ids
    empirical = torch.bincount(tokens, minlength=5) / draws
    torch.testing.assert_close(empirical, torch.softmax(logits / 0.7, dim=-1), rtol=0, atol=0.015)


def test_seeded_draws_follow_softmax():
    logits = torch.tensor([[0.3, -1.0, 1.2, 0.0]])
    batch = build([SamplingParams(temperature=1.0, seed=3)], generators=[torch.Generator().manual_seed(3)], vocab=4)
    tokens = torch.cat([sample(logits, batch).token_ids for _ in range(4000)])
    empirical = torch.bincount(tokens, minlength=4) / len(tokens)
    torch.testing.assert_close(empirical, torch.softmax(logits[0], dim=-1), rtol=0, atol=0.03)


# -- SamplingParams ----------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 1.1),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("max_tokens", -1),
        ("n", 0),
        ("logprobs", -1),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", 1.5),
        ("min_tokens", -1),
        ("stop", ["ok", ""]),
        # Non-finite, out of float32's range, or numbers where the sampler would make inf and NaN of them.
        ("temperature", float("inf")),
        ("temperature", float("nan")),
        ("temperature", 1e39),
        ("top_p", float("nan")),
        ("repetition_penalty", float("inf")),
        ("repetition_penalty", 1e-30),
        ("presence_penalty", float("nan")),
        ("min_p", float("-inf")),
        ("logit_bias", {5: float("inf")}),
        ("logit_bias", {5: float("nan")}),
        ("logit_bias", {5: 101}),
        ("logit_bias", {5: 10**400}),
        ("seed", 2**64),
        ("seed", 1.5),
        ("max_tokens", 2**63),
        ("n", True),
        ("top_k", 1.5),
        ("prompt_logprobs", -1),
        ("stop_token_ids", [2**63]),
        ("temperature", "hot"),
    ],
)
def test_params_validation_names_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value})


def test_params_normalisation():
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    p = SamplingParams(stop="###", stop_token_ids=None, top_k=-1, max_tokens=None)
    assert p.stop == ["###"] and p.stop_token_ids == [] and p.top_k == 0 and not p.greedy
    g = SamplingParams(temperature=0.0, top_k=5, top_p=0.5)
    assert g.greedy and g.top_k == 0 and g.top_p == 1.0
    assert SamplingParams(temperature=1e-6).greedy


# -- stop strings ------------------------------------------------------------------


def test_find_stop_earliest_of_several():
    text = "Hello world. The END is here\n\nUser:"
    assert find_stop(text, ["User:", "END", "\n\n"], 0) == text.index("END")
    assert find_stop(text, ["nothing"], 0) is None
    assert find_stop("", ["x"], 0) is None


def test_find_stop_across_chunks():
    stops = ["<|end|>", "STOP"]
    text = ""
    found = None
    for chunk in ["some text <|e", "nd|> more"]:
        start = len(text)
        text += chunk
        found = find_stop(text, stops, start)
    assert found == text.index("<|end|>")
    # Only new matches are searched for: one wholly before start - len + 1 is not found again.
    assert find_stop("STOP and more", ["STOP"], 8) is None
    assert find_stop("xxSTO" + "P", ["STOP"], 5) == 2


def test_safe_prefix_len_holds_back_partial_stop():
    assert safe_prefix_len("Hello <|e", ["<|end|>"]) == len("Hello ")
    assert safe_prefix_len("Hello <", ["<|end|>", "<<"]) == len("Hello ")
    assert safe_prefix_len("Hello", ["<|end|>"]) == 5
    assert safe_prefix_len("a\n", ["\n\nUser", "x"]) == 1
    assert safe_prefix_len("abab", ["abac"]) == 2  # the longest suffix that starts a stop
    assert safe_prefix_len("", ["abc"]) == 0


def test_argmax_takes_the_first_of_tied_maxima():
    from cholla.sampling.sampler import argmax

    logits = torch.zeros(3, 262144)
    logits[0, [7, 70000]] = 1.0
    logits[1, 262143] = 2.0
    assert argmax(logits).tolist() == [7, 262143, 0]
    random_logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(argmax(random_logits), random_logits.argmax(dim=-1))


def test_argmax_only_where_nothing_reads_the_logits():
    """The head may give tokens without logits only where every row is greedy and no stage or logprobs reads them."""
    def batch(**changes):
        params = [SamplingParams(temperature=0.0), SamplingParams(**{"temperature": 0.0, **changes})]
        return SamplingBatch.build(params, [[1, 2], [3]], [[4], [5]], [None, None], 10, "cpu", eos_token_ids={9})

    assert batch().argmax_only
    for changes in ({"temperature": 0.7}, {"logprobs": 0}, {"logit_bias": {3: 1.0}}, {"min_tokens": 5},
                    {"repetition_penalty": 1.1}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5}):
        assert not batch(**changes).argmax_only, changes
    constrained = SamplingBatch.build([SamplingParams(temperature=0.0)] * 2, [[1], [2]], [[], []], [None, None], 10,
                                      "cpu", allowed=([1], torch.ones(1, 10, dtype=torch.bool)))
    assert not constrained.argmax_only  # a grammar masks them
