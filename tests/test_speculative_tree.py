"""Tree speculation: the tree's pieces against brute-force references, each node's logits against
the model run on the context plus that node's path alone, and on SmolLM2 greedy output token for
token plain decoding's, with no block leaked and no rejected token in the prefix cache."""

from __future__ import annotations

import random

import pytest
import torch

from cholla.engine.request import Request
from cholla.engine.runner import forward_once
from cholla.engine.scheduler import ScheduledBatch
from cholla.errors import InvalidRequestError
from cholla.layers.attention import TreeRows
from cholla.sampling.params import SamplingParams
from cholla.speculative import ngram, tree
from cholla.speculative.config import check_speculative
from cholla.speculative.ngram_cache import NgramCache
from cholla.speculative.speculator import NgramTreeSpeculator, SpeculationState
from cholla.tokenizer.chat_template import ChatTemplate, encode_chat
from tests.conftest import engine_on
from tests.test_speculative import _match_reference

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.")
COPY = f"Repeat the following text exactly.\nText: {TEXT}\nRepeated text: {TEXT[:20]}"
CODE = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
        "# The same two functions, with docstrings:\ndef add(a, b):\n")
OPEN = "Once upon a time, in a small village by the sea,"
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


# -- the pieces -----------------------------------------------------------------------------------

def _random_tree(rng: random.Random, n: int, vocab: int = 4) -> tree.DraftTree:
    """Up to ``n`` nodes, each under a random earlier one, siblings with distinct tokens (as a trie's)."""
    tokens, parents = [], []
    for _ in range(n):
        parent = rng.randrange(-1, len(tokens))
        free = sorted(set(range(vocab)) - {t for t, p in zip(tokens, parents) if p == parent})
        if free:
            tokens.append(rng.choice(free))
            parents.append(parent)
    return tree.DraftTree(tokens, parents)


def _path_rows(parents: list[int], node: int) -> list[int]:
    """Rows (1-based) from the root's child down to ``node``."""
    rows = []
    while node >= 0:
        rows.append(node + 1)
        node = parents[node]
    return rows[::-1]


def test_build_is_a_trie_of_the_candidates_within_budget_and_depth():
    built = tree.build([[1, 2, 3], [1, 2, 4], [5], [1, 6, 7, 8]], max_nodes=6, max_depth=3)
    assert built.tokens == [1, 2, 3, 4, 5, 6] and built.parents == [-1, 0, 1, 1, -1, 0]
    assert tree.build([[1, 2, 3, 4]], 10, 2).tokens == [1, 2]
    assert tree.depths(built.parents) == [1, 2, 3, 3, 1, 2]
    assert tree.paths(built.tokens, built.parents) == [[], [1], [1, 2], [1, 2, 3], [1, 2, 4], [5], [1, 6]]
    rng = random.Random(0)
    for _ in range(200):
        candidates = [[rng.randrange(3) for _ in range(rng.randrange(1, 5))] for _ in range(rng.randrange(1, 6))]
        budget, depth = rng.randrange(1, 12), rng.randrange(1, 5)
        built = tree.build(candidates, budget, depth)
        paths = tree.paths(built.tokens, built.parents)[1:]
        assert len(built) <= budget and len(set(map(tuple, paths))) == len(paths)  # no duplicate node
        every_prefix = {tuple(c[:i]) for c in candidates for i in range(1, min(len(c), depth) + 1)}
        assert set(map(tuple, paths)) <= every_prefix
        if len(built) < budget:
            assert set(map(tuple, paths)) == every_prefix
        assert built.cut(2).parents == built.parents[:2]


def test_mask_and_acceptance_against_brute_force():
    rng = random.Random(1)
    for _ in range(200):
        draft = _random_tree(rng, rng.randrange(1, 10))
        n = len(draft)
        mask = tree.ancestor_mask(draft.parents)
        for i in range(n + 1):
            seen = {0, *(_path_rows(draft.parents, i - 1) if i else [])}
            assert mask[i].tolist() == [j in seen for j in range(n + 1)]
        targets = [rng.randrange(4) for _ in range(n + 1)]
        run, rows = tree.accept(draft, targets)
        # The reference: the longest root-to-node path whose every token is the target after its parent.
        best: list[int] = []
        for node in range(n):
            path = _path_rows(draft.parents, node)
            ok = all(draft.tokens[r - 1] == targets[([0] + path)[k]] for k, r in enumerate(path))
            if ok and len(path) > len(best):
                best = path
        assert rows == best and run == [draft.tokens[r - 1] for r in best] + [targets[best[-1] if best else 0]]
        assert all(src > dst for src, dst in tree.relocations(rows))
    chain = tree.DraftTree([7, 8, 9], [-1, 0, 1])
    assert tree.accept(chain, [7, 8, 5, 1]) == ([7, 8, 5], [1, 2]) and tree.relocations([1, 2]) == []


def test_tree_rows_mask_with_a_sliding_window():
    parents = [-1, 0, -1, 2]  # two branches of depth 2 under the root
    rows = TreeRows(torch.tensor([5, 6, 7, 6, 7]), tree.ancestor_mask(parents))
    mask = rows.mask(context_len=10, window=3)  # context positions 0..4, then the 5 rows' slots
    # Node 3 (row 4, position 7) sees positions 5 (root) and 6 (its parent, row 3) only, within the window.
    assert mask[4].tolist() == [False] * 5 + [True, False, False, True, True]
    assert mask[0].tolist() == [False, False, False, True, True, True] + [False] * 4


def test_continuations_and_cache_alternatives():
    tokens = [1, 2, 3, 9, 1, 2, 3, 8, 5, 2, 3, 7, 1, 2, 3]
    found, n = ngram.continuations(tokens, 2, max_count=10)
    assert n == 3 and found[0] == ngram.propose(tokens, 2) == [8, 5]
    assert found == [[8, 5], [9, 1], [7, 1]]  # the 3-gram's occurrences, newest first; shorter ones add nothing new
    rng = random.Random(2)
    for _ in range(300):
        seq = [rng.randrange(4) for _ in range(rng.randrange(2, 30))]
        count = rng.randrange(1, 8)
        first = _match_reference(seq, 3, ngram.MAX_MATCH)[0]  # the longest match, then n-grams by length
        want: list[list[int]] = [first] if first else []  # and latest occurrence first, distinct
        for n in range(3, 0, -1):
            for end in range(len(seq) - 1, n - 1, -1):
                if seq[end - n : end] == seq[len(seq) - n :] and seq[end : end + 3] not in want:
                    want.append(seq[end : end + 3])
        found, n = ngram.continuations(seq, 3, max_count=count)
        assert found == want[:count] and n == ngram.match(seq, 3)[1], seq
    cache = NgramCache(capacity=100, span=3, alternatives=2)
    cache.add([1, 2, 3, 4, 5])
    cache.add([1, 2, 6, 7])
    cache.add([0, 1, 2, 8])
    assert cache.lookup_alternatives([5, 1, 2], 3) == ([[8], [6, 7]], 2)  # the two latest, newest first
    assert cache.lookup([5, 1, 2], 3) == ([8], 2)


def test_sampled_requests_get_a_chain_and_bad_budgets_are_refused():
    speculator = NgramTreeSpeculator(k=3, budget=6)
    tokens = [1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 3]
    proposal = speculator.propose_tree(tokens, SamplingParams(temperature=0), False, 5, SpeculationState(), 8)
    assert isinstance(proposal, tree.DraftTree) and proposal.tokens[:3] == [8, 1, 2] and len(proposal) == 6
    sampled = speculator.propose_tree(tokens, SamplingParams(temperature=0.7), False, 5, SpeculationState(), 8)
    assert sampled == [8, 1, 2]
    for budget in (0, 65, 2.5, True):
        with pytest.raises(InvalidRequestError, match="spec_tree_budget"):
            check_speculative("tree", 4, tree_budget=budget)
    check_speculative("ngram", 4, tree_budget=0)  # only "tree" reads it


@pytest.mark.parametrize("key_type", ["q4_kivi", "fp8_e4m3_centered"])
def test_trees_refuse_keys_with_block_statistics(key_type):
    """A tree moves K/V slot by slot; these keys' statistics span a block. Refused before loading."""
    from cholla.engine.engine import EngineConfig, LLMEngine

    with pytest.raises(InvalidRequestError, match=f"tree cannot move {key_type}"):
        LLMEngine("/no/such/model.gguf", EngineConfig(speculative_method="tree", cache_type_k=key_type))


def test_cli_bad_budget_is_one_line(capsys):
    from cholla.cli import main

    assert main(["run", "--speculative-method", "tree", "--spec-tree-budget", "0", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert "spec-tree-budget" in err and err.count("\n") == 0


# -- on SmolLM2 -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines(smollm2_loaded):
    config = {"max_model_len": 1024, "kv_cache_memory": 64 * 2**20, "dtype": "float32"}
    with pytest.MonkeyPatch.context() as monkeypatch:
        plain = engine_on(smollm2_loaded, monkeypatch, **config)
        spec = engine_on(smollm2_loaded, monkeypatch, speculative_method="tree", num_speculative_tokens=5,
                         spec_tree_budget=12, speculative_ngram_cache_size=0, **config)
    return plain, spec


def _generate(engine, prompts: list, params: list[SamplingParams]) -> list[list[int]]:
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] = o.outputs[0].token_ids
    return [out[f"r{i}"] for i in range(len(prompts))]


def _assert_all_blocks_free(engine) -> None:
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(count == 0 for count in engine.block_manager.allocator.ref_counts)


def test_each_node_sees_exactly_its_path(engines):
    """One tree step's logits at every row equal the model's on the context plus that row's path alone."""
    _, spec = engines
    prompt = spec.tokenizer.encode(f"Repeat: {TEXT[:40]}")
    draft = tree.DraftTree([11, 22, 33, 44, 55, 66], [-1, 0, 1, -1, 3, 0])
    request = Request("t", prompt[:-1], GREEDY, output_token_ids=prompt[-1:])
    assert spec.block_manager.allocate(request.blocks, request.num_tokens + len(draft))
    try:
        runner = spec.runner
        runner.execute(ScheduledBatch([request], [request.num_tokens - 1], num_prefills=1))  # the context
        request.num_computed_tokens = request.num_tokens - 1
        request.draft_token_ids, request.draft_parents = draft.tokens, draft.parents
        input_ids, positions, meta, rows, _, _ = runner._prepare(ScheduledBatch([request], [1 + len(draft)], 1))
        with torch.inference_mode():
            logits = runner.model.compute_logits(runner.model(input_ids, positions, runner.caches, meta)[rows]).float()
        for row, path in enumerate(tree.paths(draft.tokens, draft.parents)):
            want = forward_once(runner.model, prompt + path)[-1]
            torch.testing.assert_close(logits[row], want, atol=2e-3, rtol=1e-4)
    finally:
        spec.block_manager.free(request.blocks)
    _assert_all_blocks_free(spec)


def test_greedy_identical_raw_chat_and_batched(engines, monkeypatch):
    plain, spec = engines
    moved: list[int] = []
    move_kv = type(spec)._move_kv
    monkeypatch.setattr(type(spec), "_move_kv", lambda self, request, moves: (moved.append(len(moves)),
                                                                              move_kv(self, request, moves)))
    chat = encode_chat(spec.tokenizer, ChatTemplate.for_tokenizer(spec.tokenizer),
                       [{"role": "user", "content": f"Copy this text word for word: {TEXT}"}])
    prompts = [COPY, {"prompt_token_ids": chat}]
    before = spec.metrics.spec_accepted_tokens
    for prompt in prompts:  # one at a time: each speculates
        assert _generate(spec, [prompt], [GREEDY]) == _generate(plain, [prompt], [GREEDY])
    assert spec.metrics.spec_accepted_tokens > before
    assert sum(moved) > 0  # some accepted paths left the first chain: their K/V moved
    assert spec.stats().spec_mean_accepted_length > 2
    # Batched with a request that opts out and a penalised one (each node's penalties count its own
    # path): all keep plain decoding's tokens.
    # Past 2 decoding sequences nobody speculates: the opt-out ends first, then the other two do.
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=8, speculative_decoding=False),
              SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.3)]
    batch = [COPY, OPEN, CODE]
    verifications = spec.metrics.spec_verifications
    assert _generate(spec, batch, params) == _generate(plain, batch, params)
    assert spec.metrics.spec_verifications > verifications
    _assert_all_blocks_free(spec)


def test_prefix_cache_holds_only_accepted_tokens(engines):
    plain, spec = engines
    spec.block_manager.reset_prefix_cache()
    block_size = spec.block_manager.block_size
    prompt_ids = spec.tokenizer.encode(CODE)
    (output,) = _generate(spec, [{"prompt_token_ids": prompt_ids}], [GREEDY])
    tokens = prompt_ids + output
    chunks = {tuple(tokens[i : i + block_size]) for i in range(0, len(tokens) - block_size + 1, block_size)}
    cached = [info.tokens for info in spec.block_manager.block_info.values()]
    assert cached and all(c in chunks for c in cached)
    follow = {"prompt_token_ids": tokens[: len(tokens) - 3]}
    hits = spec.block_manager.prefix_hits
    assert _generate(spec, [follow], [GREEDY]) == _generate(plain, [follow], [GREEDY])
    assert spec.block_manager.prefix_hits > hits
    _assert_all_blocks_free(spec)
