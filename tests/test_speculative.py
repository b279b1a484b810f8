"""Speculative decoding (n-gram prompt lookup): greedy output must be token for token what
plain decoding gives, rejected drafts must leave no block and no prefix-cache entry behind,
and stops inside an accepted run must land where one-token decoding puts them."""

from __future__ import annotations

import itertools
import random

import pytest

from cholla import LLM, SamplingParams
from cholla.errors import InvalidRequestError
from cholla.speculative import ngram
from cholla.speculative.config import check_speculative
from cholla.speculative.ngram_cache import NgramCache
from cholla.speculative.speculator import FIRST_PAUSE, MISSES_BEFORE_PAUSE, NgramSpeculator, SpeculationState
from cholla.speculative.verify import accept_greedy

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.")
COPY = f"Repeat the following text exactly.\nText: {TEXT}\nRepeated text: {TEXT[:20]}"
OPEN = "Once upon a time, in a small village by the sea,"
CODE = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
        "# The same two functions, with docstrings:\ndef add(a, b):\n")
# Past Gemma 3's 512-token sliding window: verification rows must mask it as decoding does.
LONG = "A log:\n" + "\n".join(f"line {i}: status ok, value {i * 7 % 13}" for i in range(60)) + "\nline 60:"
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


# -- the pieces, against independent references ---------------------------------------------

def _propose_reference(tokens: list[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        for end in range(len(tokens) - 1, n - 1, -1):
            if tokens[end - n : end] == tokens[len(tokens) - n :]:
                return tokens[end : end + k]
    return []


def _match_reference(tokens: list[int], k: int, max_n: int) -> tuple[list[int], int]:
    """Every earlier end, how far back it agrees with the sequence (up to max_n); the longest, then the latest."""
    best, at = 0, None
    for end in range(1, len(tokens)):
        agree = 0
        while agree < min(max_n, end) and tokens[end - 1 - agree] == tokens[len(tokens) - 1 - agree]:
            agree += 1
        if agree and agree >= best:
            best, at = agree, end
    return ([], 0) if at is None else (tokens[at : at + k], best)


def test_ngram_matches_a_plain_search():
    rng = random.Random(0)
    for _ in range(500):
        tokens = [rng.randrange(rng.choice([2, 6])) for _ in range(rng.randrange(1, 50))]
        k = rng.randrange(1, 6)
        assert ngram.propose(tokens, k, max_n=3) == _propose_reference(tokens, k), tokens
        for max_n in (1, 5, ngram.MAX_MATCH):
            assert ngram.match(tokens, k, max_n) == _match_reference(tokens, k, max_n), (tokens, max_n)
    # The longest suffix wins over a later shorter match, and the latest occurrence of it.
    assert ngram.propose([1, 2, 3, 9, 7, 5, 2, 3, 8, 1, 2, 3], 2) == [9, 7]
    assert ngram.propose([5, 1, 2, 7, 1, 2, 8, 1, 2], 3) == [8, 1, 2]
    assert ngram.propose([1, 2, 3, 4], 3) == []
    # Past three tokens: the passage being copied, not the latest place its last words recur.
    copied = [4, 5, 6, 1, 2, 3, 7, 8]
    tokens = [*copied, 9, 5, 1, 2, 3, 0, 6, *copied[:6]]
    assert ngram.propose(tokens, 2, max_n=3) == [0, 6] and ngram.match(tokens, 2) == ([7, 8], 6)
    assert ngram.match([*copied * 2, 9] * 2 + copied[:1], 3, max_n=4) == ([5, 6, 1], 4)  # counted up to max_n


def test_the_kept_index_matches_as_the_search_does():
    """``TokenIndex.match`` (a sequence's index kept from step to step) answers as ``ngram.match``
    does at every step of random growing sequences, and starts afresh for a sequence that changed."""
    rng = random.Random(2)
    for _ in range(300):
        index, tokens = ngram.TokenIndex(), []
        for _ in range(rng.randrange(1, 60)):
            tokens += [rng.randrange(rng.choice([2, 3, 6, 50])) for _ in range(rng.choice([1, 1, 1, 4]))]
            k = rng.randrange(1, 6)
            for max_n, min_n in ((1, 1), (5, 1), (ngram.MAX_MATCH, 1), (ngram.MAX_MATCH, 2)):
                assert index.match(tokens, k, max_n, min_n) == ngram.match(tokens, k, max_n, min_n), (tokens, max_n)
    index = ngram.TokenIndex()
    assert index.match([1, 2, 3, 1], 2) == ([2, 3], 1)
    assert index.match([4, 2, 3, 4], 2) == ([2, 3], 1) and index.positions == {4: [0, 3], 2: [1], 3: [2]}
    assert index.match([4, 2], 2) == ([], 0) and index.size == 2  # shorter: indexed afresh


def test_a_short_match_drafts_on_the_record_alone():
    """A lookup whose suffix agrees with its source for just ``SHORT_MATCH`` tokens (a recurring
    "the" on open-ended text) promises nothing: a sequence with no accepted draft yet keeps none of
    its drafts, however cheap the rows; one whose drafts were accepted keeps them on that record."""
    from cholla.speculative.speculator import SHORT_MATCH, allot, match_acceptance

    flat = ((1, 1.0), (64, 1.0))  # rows free: only an acceptance of 0 keeps nothing
    bf16 = ((1, 1.0), (2, 1.14), (3, 1.77), (6, 2.83), (13, 3.04), (64, 9.26))
    for n in range(1, SHORT_MATCH + 1):
        fresh = SpeculationState(match_length=n)
        assert fresh.acceptance == 0.0
        assert allot([[7] * 12], [fresh], 1, flat) == [[]] and allot([[7] * 12], [fresh], 1, bf16) == [[]]
        proven = SpeculationState(tried=20, accepted=19, match_length=n)
        assert proven.acceptance == pytest.approx(19 / 21)
        assert allot([[7] * 12], [proven], 1, bf16) == [[7] * 12]
    longer = SpeculationState(match_length=SHORT_MATCH + 1)  # a longer match keeps its promise
    assert longer.acceptance == match_acceptance(SHORT_MATCH + 1) and allot([[7] * 4], [longer], 1, flat) == [[7] * 4]
    # Through the lookup: open-ended text whose last token recurred, and the passage being copied.
    speculator, greedy = NgramSpeculator(12), SamplingParams(temperature=0)
    story = [11, 12, 13, 14, 15, 16, 12, 17, 18, 19, 12]
    state = SpeculationState()
    drafts = speculator.propose(story, greedy, 5, state, 12)
    assert drafts == [17, 18, 19, 12] and state.match_length == 1 and allot([drafts], [state], 1, bf16) == [[]]
    copy = [*range(100, 120), 5, *range(100, 110)]
    drafts = speculator.propose(copy, greedy, 10, state, 12)
    assert state.match_length == 10 and allot([drafts], [state], 1, bf16) == [[*range(110, 120), 5, 100]]


def test_ngram_cache_keeps_the_latest_continuation_and_forgets_the_oldest():
    cache = NgramCache(capacity=100, span=3)
    cache.add([1, 2, 3, 4, 5, 6])
    cache.add([9, 2, 3, 7, 8])
    assert cache.lookup([0, 9, 2, 3], 5) == ([7, 8], 3)  # the 3-gram (9, 2, 3)
    assert cache.lookup([0, 1, 2, 3], 5) == ([4, 5, 6], 3)
    assert cache.lookup([5, 2, 3], 2) == ([7, 8], 2)  # no 3-gram: the 2-gram's latest continuation
    assert cache.lookup([5, 2, 3], 2, min_n=3) == ([], 0)
    assert cache.lookup([4, 5], 4) == ([6], 2) and cache.lookup([7, 3], 4) == ([], 0)  # no unigrams
    assert cache.lookup([6], 4) == ([], 0)
    small = NgramCache(capacity=4, span=2)
    small.add([1, 2, 3, 4, 5])  # (1,2) (2,3) (1,2,3) (3,4) (2,3,4): the oldest, (1,2), goes
    assert len(small) == 4 and small.lookup([1, 2], 2) == ([], 0)
    assert small.lookup([1, 2, 3], 2) == ([4, 5], 3)
    small.add([7, 8, 9])  # (7,8) evicts the least recently used, (2,3), not (1,2,3) just looked up
    assert len(small) == 4 and small.lookup([1, 2, 3], 2) == ([4, 5], 3) and small.lookup([0, 2, 3], 2) == ([], 0)


def test_greedy_acceptance():
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all drafts, then the bonus token
    assert accept_greedy([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # stops at the first disagreement
    assert accept_greedy([5, 6, 7], [4, 6, 7, 8]) == [4]


def test_settings_are_checked():
    check_speculative(None, 99)  # off: K is not looked at
    check_speculative("ngram", 1)
    for method, k, size in (("ngram", 0, 0), ("ngram", 17, 0), ("ngram", 2.5, 0), ("ngram", True, 0), ("medusa", 4, 0),
                            ("ngram", 4, -1), ("ngram", 4, 1.5)):
        with pytest.raises(InvalidRequestError) as error:
            check_speculative(method, k, ngram_cache_size=size)
        assert "\n" not in str(error.value)


def test_drafts_are_kept_where_they_pay_for_their_rows():
    """allot against a brute-force search over every way to cut the drafts, on a made-up cost curve
    shaped like the measured ones (steep GEMV rows, then flat tiles, then a per-row slope)."""
    from cholla.speculative.speculator import allot, step_cost

    table = ((1, 1.0), (3, 2.0), (4, 3.0), (12, 3.5), (40, 10.0))
    assert step_cost(table, 1) == 1.0 and step_cost(table, 8) == 3.25 and step_cost(table, 41) == float("inf")

    def state(accepted: float, tried: float) -> SpeculationState:
        return SpeculationState(tried=tried, accepted=accepted)

    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 4)
        drafts = [[7] * rng.randint(0, 4) for _ in range(n)]
        states = [state(a, a + rng.choice([0.5, 2.0, 6.0])) for a in (rng.uniform(0, 9) for _ in range(n))]
        rate = lambda cut: (n + sum(s.acceptance ** (j + 1) for c, s in zip(cut, states) for j in range(c))) \
            / step_cost(table, n + sum(cut))
        best = max(itertools.product(*(range(len(d) + 1) for d in drafts)), key=rate)
        got = [len(d) for d in allot(drafts, states, n, table)]
        assert rate(got) == pytest.approx(rate(best)), (drafts, got, best)
    # Many decoding sequences: no draft pays for its row; one stream that keeps being right drafts fully.
    assert allot([[7] * 4] * 30, [state(9, 10)] * 30, 30, table) == [[]] * 30
    assert allot([[7] * 4], [state(49, 50)], 1, table) == [[7] * 4]


def test_the_quick_no_is_never_wrong():
    """allot's shortcut (``_could_pay`` false: keep nothing, without sorting every draft) only where
    no prefix of the best drafts beats the plain step, on the measured bf16 curve and a made-up one,
    batches of 1 to 48 rows with acceptances around where drafts start to pay."""
    from cholla.speculative.speculator import STEP_COST, _could_pay, step_cost

    rng, said_no = random.Random(1), 0
    for table in (STEP_COST["bfloat16"], ((1, 1.0), (3, 2.0), (4, 3.0), (12, 3.5), (40, 10.0))):
        for _ in range(300):
            n = rng.randint(1, 48)
            limits = [rng.randint(0, 12) for _ in range(n)]
            acceptances = [rng.uniform(0.0, 0.95) for _ in range(n)]
            draft_cost = rng.choice([0.0, 0.0, 0.05, 0.3])
            gains = sorted((a ** (j + 1) for a, k in zip(acceptances, limits) for j in range(k)), reverse=True)
            rates = [(n + sum(gains[:m])) / (step_cost(table, n + m) + draft_cost * m) for m in range(len(gains) + 1)]
            best = max((a for a, k in zip(acceptances, limits) if k), default=0.0)
            if not _could_pay(best, sum(limits), n, table, draft_cost):
                said_no += 1
                assert max(rates[1:], default=0.0) <= rates[0], (n, limits, acceptances, draft_cost)
    assert said_no > 100  # the shortcut is taken, not only never wrong


def test_the_opt_out_field():
    from cholla.serve.openai_api import CompletionRequest

    assert CompletionRequest(prompt="x", speculative_decoding=False).sampling_kwargs()["speculative_decoding"] is False
    assert "speculative_decoding" not in CompletionRequest(prompt="x").sampling_kwargs()
    assert SamplingParams().speculative_decoding is True
    with pytest.raises(InvalidRequestError, match="speculative_decoding must be true or false"):
        SamplingParams(speculative_decoding="no")


def test_back_off_after_repeated_misses():
    speculator, state = NgramSpeculator(4), SpeculationState()
    tokens, greedy = [1, 2, 3, 1, 2], SamplingParams(temperature=0)
    for i in range(MISSES_BEFORE_PAUSE):
        assert speculator.propose(tokens, greedy, 10, state, 8) == [3, 1, 2]
        speculator.record(state, 3, 0, 10)
    assert speculator.propose(tokens, greedy, 10 + FIRST_PAUSE - 1, state, 8) == []
    assert speculator.propose(tokens, greedy, 10 + FIRST_PAUSE, state, 8) == [3, 1, 2]
    assert state.pause == 2 * FIRST_PAUSE  # a second pause would be longer, and follow one more miss...
    speculator.record(state, 3, 0, 18)
    assert state.resume_at == 18 + 2 * FIRST_PAUSE and state.pause == 4 * FIRST_PAUSE
    assert speculator.propose(tokens, greedy, 18 + 2 * FIRST_PAUSE, state, 8) == [3, 1, 2]
    speculator.record(state, 3, 2, 40)
    assert state.pause == FIRST_PAUSE and state.misses == 0  # ...unless a draft is accepted
    for i in range(MISSES_BEFORE_PAUSE - 1):  # then it takes as many misses in a row as at first
        speculator.record(state, 3, 0, 41 + i)
    assert state.resume_at == 18 + 2 * FIRST_PAUSE
    # Sampled, penalised and logprobs requests speculate; an opt-out does not.
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=0, repetition_penalty=1.2),
                   SamplingParams(temperature=0, logprobs=2)):
        assert speculator.propose(tokens, params, 100, SpeculationState(), 8) == [3, 1, 2]
    assert speculator.propose(tokens, SamplingParams(temperature=0.7, speculative_decoding=False), 100,
                              SpeculationState(), 8) == []


def test_a_long_match_drafts_fully_before_the_record_says_so():
    """The first steps of a copy: the record is still its prior (one draft pays), but a lookup whose
    suffix agrees with its source 8 tokens back is asked for, and keeps, all 12; a short match on a
    failing record keeps what the record alone would (allot against its brute-force test above)."""
    from cholla.speculative.speculator import allot, match_acceptance

    # bf16's measured shape (the session's conftest flattens STEP_COST itself for the engine tests)
    table, greedy = ((1, 1.0), (2, 1.14), (3, 1.77), (6, 2.83), (13, 3.04), (64, 9.26)), SamplingParams(temperature=0)
    assert [match_acceptance(n) for n in (0, 1, 3)] == [0.0, 0.5, 0.75]
    source = list(range(100, 140))
    tokens = [1, 2, *source, 3, *source[:8]]
    speculator, state = NgramSpeculator(12), SpeculationState()
    assert allot([[7] * 12], [state], 1, table) == [[7]]  # the record alone
    drafts = speculator.propose(tokens, greedy, 8, state, 12)
    assert drafts == source[8:20] and state.match_length == 8 and state.acceptance == match_acceptance(8)
    assert allot([drafts], [state], 1, table) == [drafts]
    failing = SpeculationState(tried=10, accepted=2)
    assert speculator.propose([*tokens, 5, 120], greedy, 10, failing, 12) == source[21:33]  # 120 recurs: a 1-match
    assert failing.match_length == 1 and allot([source[21:33]], [failing], 1, table) == [source[21:22]]
    paused = SpeculationState(resume_at=4, match_length=9)
    assert speculator.propose(tokens, greedy, 0, paused, 12) == [] and paused.match_length == 0  # nor its last match


# -- the engine, on both real models ----------------------------------------------------------

@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def make_llm(request):
    path = request.getfixturevalue(f"{request.param}_path")

    def make(**kwargs):
        kwargs.setdefault("max_model_len", 1024)
        kwargs.setdefault("kv_cache_memory", 64 * 2**20)
        kwargs.setdefault("dtype", "float32")  # batch-invariant: verification rows equal decode rows
        return LLM(path, **kwargs)

    return make


@pytest.fixture(scope="module")
def engines(make_llm):
    return make_llm(), make_llm(speculative_method="ngram", num_speculative_tokens=5)


def _prompts(llm: LLM) -> list:
    chat = llm.encode_messages([{"role": "user", "content": f"Copy this text word for word: {TEXT}"}])
    return [COPY, OPEN, CODE, {"prompt_token_ids": chat}, LONG]


def _assert_all_blocks_free(llm: LLM) -> None:
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert all(count == 0 for count in manager.allocator.ref_counts)


def _ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_identical_and_copying_is_accepted(engines, monkeypatch):
    from cholla.models import fused_decode

    plain, spec = engines
    prompts = _prompts(spec)
    assert len(spec.tokenizer.encode(LONG)) > 600
    expected = _ids(plain.generate(prompts, GREEDY, use_tqdm=False))
    stats = spec.engine.metrics
    before = stats.spec_accepted_tokens
    fused, verified = fused_decode.fused_layers, []

    def counting(plan, x, positions, kv_caches, meta, *logits):
        out = fused(plan, x, positions, kv_caches, meta, *logits)
        verified.append(meta.span_starts is not None and out is not None)
        return out

    monkeypatch.setattr(fused_decode, "fused_layers", counting)
    for prompt, want in zip(prompts, expected):  # one at a time: every one speculates
        assert _ids(spec.generate(prompt, GREEDY, use_tqdm=False)) == [want]
    assert stats.spec_accepted_tokens > before and any(verified)  # verification rows in the fused decode step
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens  # both accepted and rejected drafts
    assert spec.engine.stats().spec_mean_accepted_length > 1.5
    _assert_all_blocks_free(spec)


def test_batched_with_sampled_and_penalised_requests(engines):
    plain, spec = engines
    params = [GREEDY, SamplingParams(temperature=0.8, seed=3, max_tokens=30),
              SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=30)]
    prompts = [COPY, OPEN, CODE]
    expected = _ids(plain.generate(prompts, params, use_tqdm=False))
    before = spec.engine.metrics.spec_verifications
    assert _ids(spec.generate(prompts, params, use_tqdm=False)) == expected
    # Three decoding at once leave room for a few drafts within the engine-wide row limit.
    assert spec.engine.metrics.spec_verifications > before
    _assert_all_blocks_free(spec)


def test_stops_inside_an_accepted_run(engines):
    plain, spec = engines
    full = plain.generate(COPY, GREEDY, use_tqdm=False)[0].outputs[0]
    word = full.text.split()[6]
    stop_token = full.token_ids[17]
    for params in (SamplingParams(temperature=0, max_tokens=40, stop=[word]),
                   SamplingParams(temperature=0, max_tokens=40, stop=[word], include_stop_str_in_output=True),
                   SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_token]),
                   SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=40, min_tokens=20, stop_token_ids=[stop_token])):
        want, got = (llm.generate(COPY, params, use_tqdm=False)[0].outputs[0] for llm in (plain, spec))
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
               (want.token_ids, want.text, want.finish_reason, want.stop_reason), params
    _assert_all_blocks_free(spec)


def test_prefix_cache_holds_only_accepted_tokens(make_llm, engines):
    plain, _ = engines
    spec = make_llm(speculative_method="ngram", num_speculative_tokens=8)
    block_size = spec.engine.block_manager.block_size
    out = spec.generate(CODE, GREEDY, use_tqdm=False)[0]
    assert spec.engine.metrics.spec_accepted_tokens < spec.engine.metrics.spec_draft_tokens  # some were rejected
    tokens = out.prompt_token_ids + out.outputs[0].token_ids
    chunks = {tuple(tokens[i : i + block_size]) for i in range(0, len(tokens) - block_size + 1, block_size)}
    cached = [info.tokens for info in spec.engine.block_manager.block_info.values()]
    assert cached and all(c in chunks for c in cached)
    # A request that continues from the cached prefix gets what plain decoding gives it.
    follow = {"prompt_token_ids": tokens[: len(tokens) - 3]}
    before = spec.engine.block_manager.prefix_hits
    assert _ids(spec.generate(follow, GREEDY, use_tqdm=False)) == _ids(plain.generate(follow, GREEDY, use_tqdm=False))
    assert spec.engine.block_manager.prefix_hits > before
    _assert_all_blocks_free(spec)


def test_preemption_and_abort_leave_no_block(make_llm, engines):
    import torch

    from cholla.kv.paged_cache import bytes_per_block

    plain, _ = engines
    block_bytes = bytes_per_block(plain.engine.model_config, 16, torch.float32)
    spec = make_llm(speculative_method="ngram", num_speculative_tokens=4, kv_cache_memory=10 * block_bytes,
                    max_model_len=112, enable_prefix_caching=False)
    prompts = [COPY, CODE]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    assert _ids(spec.generate(prompts, params, use_tqdm=False)) == _ids(plain.generate(prompts, params, use_tqdm=False))
    assert spec.engine.metrics.preemptions > 0 and spec.engine.metrics.spec_accepted_tokens > 0
    _assert_all_blocks_free(spec)

    engine = spec.engine
    engine.add_request("copy", COPY, params)
    start = engine.metrics.spec_verifications
    while engine.metrics.spec_verifications == start and engine.has_unfinished_requests():
        engine.step()
    assert engine.has_unfinished_requests()  # aborted while speculating
    engine.abort("copy")
    assert not engine.has_unfinished_requests()
    _assert_all_blocks_free(spec)


def test_shared_cache_drafts_what_an_earlier_request_wrote(engines):
    """A request whose answer another request already gave drafts it from the shared cache:
    most drafts are accepted (more than from its own tokens alone), and the output is plain decoding's."""
    plain, spec = engines
    prompt = "Write two sentences about a lighthouse on a rocky island."
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = _ids(plain.generate(prompt, params, use_tqdm=False))
    speculator = spec.engine.speculator

    def run() -> tuple[int, int, int]:
        before = spec.engine.stats()
        assert _ids(spec.generate(prompt, params, use_tqdm=False)) == want
        after = spec.engine.stats()
        return (after.spec_draft_tokens - before.spec_draft_tokens,
                after.spec_accepted_tokens - before.spec_accepted_tokens,
                after.spec_verifications - before.spec_verifications)

    cache, speculator.cache = speculator.cache, None
    _, own_accepted, own_steps = run()  # its own tokens only; nothing enters the cache either
    speculator.cache = cache
    run()  # the first answer, into the cache
    drafts, accepted, steps = run()
    assert accepted > 0.8 * drafts and 1 + accepted / steps > 3
    assert accepted >= own_accepted and accepted / steps >= own_accepted / max(own_steps, 1)
    _assert_all_blocks_free(spec)


def test_metrics_reach_prometheus(engines):
    from types import SimpleNamespace

    from cholla.serve.metrics import ServerMetrics

    _, spec = engines
    spec.generate(COPY, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    host = SimpleNamespace(engine=SimpleNamespace(engine=spec.engine), num_in_flight=0)
    text = ServerMetrics(host, "m").render().decode()
    stats = spec.engine.stats()
    assert stats.spec_verifications > 0
    for name, value in (("drafts", stats.spec_verifications), ("draft_tokens", stats.spec_draft_tokens),
                        ("accepted_tokens", stats.spec_accepted_tokens)):
        assert f'cholla:spec_decode_num_{name}_total{{model_name="m"}} {float(value)}' in text
    assert f'cholla:spec_decode_mean_accepted_length{{model_name="m"}} {stats.spec_mean_accepted_length}' in text


def test_grammar_and_logprobs_requests_speculate(engines):
    """Grammar requests verify drafts under the mask after each draft (forced tokens and the
    grammar's end where one-token decoding puts them); logprobs requests get their verification
    rows' logprobs: tokens and logprobs as plain decoding gives them, batched with an opt-out."""
    from cholla.sampling.params import StructuredOutputsParams

    plain, spec = engines
    record = '{"name": "Ada Lovelace", "age": 36}'
    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    prompts = [f"Copy this record exactly.\nRecord: {record}\nCopy: ", COPY, COPY]
    params = [SamplingParams(temperature=0, max_tokens=24, structured_outputs=StructuredOutputsParams(json=person)),
              SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=8, speculative_decoding=False, ignore_eos=True)]
    want = plain.generate(prompts, params, use_tqdm=False)
    before = spec.engine.metrics.spec_accepted_tokens
    got = spec.generate(prompts, params, use_tqdm=False)
    for p, g, w in zip(params, got, want):
        g, w = g.outputs[0], w.outputs[0]
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason), p
        if p.logprobs is not None:
            assert [chosen for chosen, _ in g.logprobs] == pytest.approx([chosen for chosen, _ in w.logprobs], abs=1e-4)
            assert [[t for t, _ in top] for _, top in g.logprobs] == [[t for t, _ in top] for _, top in w.logprobs]
    assert got[0].outputs[0].finish_reason == "stop" and spec.engine.metrics.spec_accepted_tokens > before
    _assert_all_blocks_free(spec)
