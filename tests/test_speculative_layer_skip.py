"""Layer-skip self-speculation: the model drafts for itself with some layers left out, in its
own KV cache. The draft model must be the model without those layers (against transformers
with them removed); greedy output must be token for token plain decoding's, batched with
sampled and opted-out requests and under preemption; the draft's slots must leave no block
leaked and nothing in the prefix cache; a draft that cannot pay must not run; bad skip sets
are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cholla import LLM, SamplingParams
from cholla.engine.engine import EngineConfig, LLMEngine
from cholla.errors import InvalidRequestError
from cholla.models.loader import load_model
from cholla.speculative import layer_skip
from cholla.speculative.config import check_speculative
from cholla.speculative.speculator import SpeculationState, allot
from cholla.tokenizer.chat_template import ChatTemplate, encode_chat
from tests import tiny_models

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs."
COPY = f"Repeat the following text exactly.\nText: {TEXT}\nRepeated text:"
OPEN = "Once upon a time, in a small village by the sea,"


def test_skip_layers_are_parsed_and_checked():
    assert layer_skip.parse_skip_layers("8-11", 30) == [8, 9, 10, 11]
    assert layer_skip.parse_skip_layers("4, 6,20-24:2", 30) == [4, 6, 20, 22, 24]
    assert layer_skip.parse_skip_layers([3, 1], 4) == [1, 3]
    for spec, fragment in (("0-3", "skips all 4 layers"), ("2,4", "layer 4 is out of range"), ("", "names no layer"),
                           ("1-x", "is not a layer index"), ("1-3:0", "is not a layer index"), ([1.5], "integers")):
        with pytest.raises(InvalidRequestError, match=fragment) as error:
            layer_skip.parse_skip_layers(spec, 4)
        assert "\n" not in str(error.value)
    check_speculative("layer_skip", 4, skip_layers="1-2")
    with pytest.raises(InvalidRequestError, match="only used with speculative_method='layer_skip'"):
        check_speculative("ngram", 4, skip_layers="1-2")
    with pytest.raises(InvalidRequestError, match="does not support gemma4") as error:
        layer_skip.check_model(torch.nn.Module(), "gemma4")
    assert "\n" not in str(error.value)


def test_drafting_is_charged_its_cost():
    """A draft that costs a step's share is kept only where its expected tokens repay rows and drafting."""
    table, right = ((1, 1.0), (64, 1.0)), SpeculationState(tried=50, accepted=49)
    assert allot([[7] * 4], [right], 1, table) == [[7] * 4]
    assert allot([[7] * 4], [right], 1, table, draft_cost=0.5) == [[7] * 4]  # 0.98 a token for 0.5
    assert allot([[7] * 4], [SpeculationState()], 1, table, draft_cost=0.9) == [[]]  # 0.5 a token for 0.9


# -- the draft is the model without the skipped layers: against transformers ------------------

def _gemma3_config():
    return transformers.Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         head_dim=32, sliding_window=8, query_pre_attn_scalar=24,
                                         rope_local_base_freq=10000.0, rope_theta=1000000.0)


@pytest.mark.parametrize("name", ["gemma3", "deepseek_v3"])
def test_a_skipping_view_is_the_model_without_those_layers(name, tmp_path):
    config = _gemma3_config() if name == "gemma3" else None
    reference = tiny_models.build_model(name, tmp_path, tiny_models.tiny_tokenizer(), config)
    ours = load_model(tmp_path, "float32").model
    keep = [0, 2]  # deepseek_v3: its dense first layer and an MoE one; gemma3: sliding windows of 8 at 20 tokens
    ids = [(i * 37 + 11) % 300 for i in range(20)]
    reference.model.layers = torch.nn.ModuleList(reference.model.layers[i] for i in keep)
    reference.config.num_hidden_layers = len(keep)
    with torch.no_grad():  # no cache: its layers are numbered by their place in the full model
        expected = reference(torch.tensor([ids]), use_cache=False).logits[0]
    tiny_models.assert_close(layer_skip.logits_of(ours, ids, keep), expected)


# -- the engine, on both real models ----------------------------------------------------------

SKIPS = {"smollm2": "13-16", "gemma3": "8-9"}


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def model(request):
    return request.param, load_model(request.getfixturevalue(f"{request.param}_path"), "float32")


def _engine(loaded, **kwargs) -> LLMEngine:
    return LLMEngine(loaded, EngineConfig(**{"max_model_len": 512, "kv_cache_memory": 32 * 2**20, "dtype": "float32",
                                             **kwargs}))


def _spec(name, loaded, **kwargs) -> LLMEngine:
    engine = _engine(loaded, speculative_method="layer_skip", spec_skip_layers=SKIPS[name], num_speculative_tokens=3,
                     **kwargs)
    engine.speculator.draft_cost = 0.0  # verify every draft (the policy's own test is above)
    return engine


def test_greedy_identical_batched_and_the_prefix_cache_clean(model):
    name, loaded = model
    plain, spec = _engine(loaded), _spec(name, loaded)
    chat = encode_chat(spec.tokenizer, ChatTemplate.for_tokenizer(spec.tokenizer),
                       [{"role": "user", "content": f"Copy this text: {TEXT}"}])
    prompts = [COPY, {"prompt_token_ids": chat}, OPEN, COPY]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)] * 3 + [
        SamplingParams(temperature=0.8, seed=3, max_tokens=16, speculative_decoding=False)]
    expected = tiny_models.generate(plain, prompts, params)
    assert tiny_models.generate(spec, prompts[:2], params[:2]) == expected[:2]  # raw and chat, alone
    assert tiny_models.generate(spec, prompts[1:], params[1:]) == expected[1:]  # together, beside an opt-out
    metrics = spec.metrics
    assert 0 < metrics.spec_accepted_tokens < metrics.spec_draft_tokens
    assert tiny_models.all_free(spec)
    block_size = spec.block_manager.block_size
    chunks = set()
    for prompt, out in zip(prompts, expected):
        tokens = (prompt["prompt_token_ids"] if isinstance(prompt, dict) else spec.tokenizer.encode(prompt)) + out
        chunks |= {tuple(tokens[i : i + block_size]) for i in range(0, len(tokens) - block_size + 1, block_size)}
    cached = [info.tokens for info in spec.block_manager.block_info.values()]
    assert cached and all(c in chunks for c in cached)  # drafted slots never reached the prefix cache


def test_preemption_and_abort_leave_no_block(model):
    from cholla.kv.paged_cache import bytes_per_block

    name, loaded = model
    block_bytes = bytes_per_block(loaded.config, 16, torch.float32)
    small = {"kv_cache_memory": 7 * block_bytes, "max_model_len": 96, "enable_prefix_caching": False}
    plain, spec = _engine(loaded, **small), _spec(name, loaded, **small)
    prompts, params = [COPY, OPEN], [SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)] * 2
    assert tiny_models.generate(spec, prompts, params) == tiny_models.generate(plain, prompts, params)
    assert spec.metrics.preemptions > 0 and spec.metrics.spec_accepted_tokens > 0
    assert tiny_models.all_free(spec)
    tiny_models.abort_in_prefill_and_decode(spec, OPEN * 2, COPY)
    assert tiny_models.all_free(spec)


def test_a_draft_that_cannot_pay_does_not_run(smollm2_path):
    """With its real cost (most of a step: SmolLM2's head and 26 of its 30 layers) no draft is asked for:
    the engine decodes plainly, at plain decoding's speed, and says so at start."""
    llm = LLM(smollm2_path, max_model_len=256, kv_cache_memory=16 * 2**20, dtype="float32",
              speculative_method="layer_skip", spec_skip_layers="13-16")
    assert llm.engine.speculator.draft_cost > 0.8
    calls = []
    propose = llm.engine.speculator.propose_batch
    llm.engine.speculator.propose_batch = lambda *args: calls.append(args) or propose(*args)
    llm.generate(COPY, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert not calls and llm.engine.metrics.spec_verifications == 0


def test_cli_flags(capsys, tmp_path):
    from cholla.cli import main

    tiny_models.build_model("llama", tmp_path, tiny_models.tiny_tokenizer(), transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512))
    capsys.readouterr()  # the build's progress bars
    for flags in (["--spec-skip-layers", "9"], ["--spec-skip-layers", "0-3"]):
        assert main(["run", "--speculative-method", "layer_skip", *flags, "--raw", str(tmp_path), "hi"]) == 2
        assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["run", "--speculative-method", "ngram", "--spec-skip-layers", "1", str(tmp_path), "hi"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["run", "--speculative-method", "layer_skip", "--spec-skip-layers", "1-2", "--raw", "-t", "0", "-n", "8",
                 "--ignore-eos", "--json", str(tmp_path), "the quick brown fox"]) == 0
    assert json.loads(capsys.readouterr().out)["usage"]["completion_tokens"] == 8
