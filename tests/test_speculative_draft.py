"""Draft-model speculation: a second model proposes K tokens greedily for every decoding
sequence, batched, on its own paged KV cache. Greedy output must be token for token what
plain decoding gives; a model drafting for itself is always right, a truncated copy of the
target only sometimes; neither KV cache may keep a block once requests finish, are aborted
or preempted; a draft whose vocabulary differs from the target's, or that carries recurrent
state, is refused in one line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cholla import SamplingParams
from cholla.engine.engine import EngineConfig, LLMEngine
from cholla.errors import InvalidRequestError
from cholla.kv.paged_cache import bytes_per_block
from cholla.models.loader import load_model
from cholla.speculative.config import check_speculative
from cholla.tokenizer.chat_template import ChatTemplate, encode_chat
from tests import tiny_models

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs."
BASE = {"max_model_len": 512, "kv_cache_memory": 64 * 2**20, "dtype": "float32"}


def _assert_all_blocks_free(engine: LLMEngine) -> None:
    for manager in (engine.block_manager, engine.speculator.block_manager):
        assert manager.num_free_blocks == manager.num_blocks
        assert all(count == 0 for count in manager.allocator.ref_counts)
    assert not engine.speculator.sequences


def test_settings_are_checked():
    check_speculative("draft", 4, "smollm2")
    for method, k, draft in (("draft", 4, None), ("ngram", 4, "smollm2"), (None, 4, "smollm2"), ("draft", 0, "smollm2"),
                             ("draft", 17, "smollm2")):
        with pytest.raises(InvalidRequestError) as error:
            check_speculative(method, k, draft)
        assert "\n" not in str(error.value)


# -- SmolLM2 drafting for itself: every draft is the target's own choice -----------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_model(smollm2_path, "float32")


def test_real_model_drafting_for_itself_is_exact_and_always_accepted(smollm2):
    plain = LLMEngine(smollm2, EngineConfig(**BASE))
    spec = LLMEngine(smollm2, EngineConfig(**BASE, speculative_method="draft", draft_model=smollm2,
                                           num_speculative_tokens=4))
    chat = encode_chat(spec.tokenizer, ChatTemplate.for_tokenizer(spec.tokenizer),
                       [{"role": "user", "content": f"Copy this text word for word: {TEXT}"}])
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    prompt = {"prompt_token_ids": chat}
    assert tiny_models.generate(spec, [prompt], params) == tiny_models.generate(plain, [prompt], params)
    assert spec.metrics.spec_draft_tokens > 0 and spec.metrics.spec_accepted_tokens == spec.metrics.spec_draft_tokens
    _assert_all_blocks_free(spec)


def test_a_draft_with_another_vocabulary_is_refused(smollm2, gemma3_path):
    with pytest.raises(InvalidRequestError) as error:
        LLMEngine(smollm2, EngineConfig(**BASE, speculative_method="draft", draft_model=gemma3_path))
    message = str(error.value)
    assert "262144" in message and "49152" in message and "\n" not in message


# -- a tiny random llama and a truncated copy of it: drafts sometimes right --------------------

def _truncated_pair(root, config, keep: int):
    """(target folder, draft folder) of a tiny random model and a copy of its first ``keep``
    layers; the later layers' outputs are damped so the two often, not always, agree."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers[keep:]:
            layer.self_attn.o_proj.weight.mul_(0.3)
            layer.mlp.down_proj.weight.mul_(0.3)
    layer_types = getattr(model.config, "layer_types", None)
    tokenizer = tiny_models.tiny_tokenizer()
    for name, layers in (("target", model.model.layers), ("draft", model.model.layers[:keep])):
        model.model.layers, model.config.num_hidden_layers = layers, len(layers)
        if layer_types:
            model.config.layer_types = layer_types[: len(layers)]
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root / "target", root / "draft"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama of 4 layers and a draft of its first 2."""
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=False)
    return _truncated_pair(tmp_path_factory.mktemp("draft"), config, keep=2)


TINY = {"max_model_len": 256, "kv_cache_memory": 8 * 2**20, "dtype": "float32"}


def _tiny_prompts(*lengths: int) -> list[dict]:
    return [{"prompt_token_ids": [(i * 7 + n * 13) % 300 for i in range(n)]} for n in lengths]


@pytest.fixture(scope="module")
def tiny_target(tiny):
    loaded = load_model(tiny[0], "float32")
    return loaded, LLMEngine(loaded, EngineConfig(**TINY))


def test_truncated_draft_is_partly_accepted_and_exact(tiny, tiny_target):
    target, plain = tiny_target
    spec = LLMEngine(target, EngineConfig(**TINY, speculative_method="draft", draft_model=tiny[1],
                                          num_speculative_tokens=4))
    prompts = _tiny_prompts(5, 17, 30)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    draft_batches = []  # sequences in each draft forward
    execute = spec.speculator.runner.execute
    spec.speculator.runner.execute = lambda batch: draft_batches.append(len(batch.requests)) or execute(batch)
    assert tiny_models.generate(spec, prompts[:2], params) == tiny_models.generate(plain, prompts[:2], params)  # two speculate together
    assert 2 in draft_batches  # one forward per drafted position for both, not one per sequence
    assert [tiny_models.generate(spec, [p], params)[0] for p in prompts] == [tiny_models.generate(plain, [p], params)[0] for p in prompts]
    assert 0 < spec.metrics.spec_accepted_tokens < spec.metrics.spec_draft_tokens
    _assert_all_blocks_free(spec)


def test_batched_with_plain_requests(tiny_target):
    """Three decoding at once is past the engine-wide cap: none speculates until the short one
    ends; then the greedy one drafts, its draft cache first catching up on all it has so far,
    beside a sampled request that opted out of speculation."""
    target, plain = tiny_target
    spec = LLMEngine(target, EngineConfig(**TINY, speculative_method="draft", draft_model=target,
                                          num_speculative_tokens=3))
    params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True, speculative_decoding=False)]
    prompts = _tiny_prompts(9, 21, 14)
    assert tiny_models.generate(spec, prompts, params) == tiny_models.generate(plain, prompts, params)
    metrics = spec.metrics
    assert metrics.spec_verifications > 0 and metrics.spec_accepted_tokens == metrics.spec_draft_tokens
    assert metrics.spec_draft_tokens <= 3 * metrics.spec_verifications
    _assert_all_blocks_free(spec)


def test_sampled_requests_keep_plain_decodings_tokens(tiny_target):
    """A draft model's greedy proposals are point masses: a sampled request keeps a draft while its
    sample (drawn as plain decoding draws it) agrees, so a seeded one gets plain decoding's tokens."""
    target, plain = tiny_target
    spec = LLMEngine(target, EngineConfig(**TINY, speculative_method="draft", draft_model=target,
                                          num_speculative_tokens=3))
    params = [SamplingParams(temperature=0.8, top_k=20, seed=5, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=6, max_tokens=30, ignore_eos=True)]
    prompts = _tiny_prompts(9, 21)
    assert tiny_models.generate(spec, prompts, params) == tiny_models.generate(plain, prompts, params)
    assert 0 < spec.metrics.spec_accepted_tokens < spec.metrics.spec_draft_tokens
    _assert_all_blocks_free(spec)


def test_preemption_and_abort_free_both_caches(tiny, tiny_target):
    target, plain = tiny_target
    block_bytes = bytes_per_block(target.config, 16, torch.float32)
    spec = LLMEngine(target, EngineConfig(**{**TINY, "kv_cache_memory": 10 * block_bytes, "max_model_len": 112},
                                          enable_prefix_caching=False, speculative_method="draft",
                                          draft_model=tiny[1], num_speculative_tokens=4))
    prompts = _tiny_prompts(30, 41)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    assert tiny_models.generate(spec, prompts, params) == tiny_models.generate(plain, prompts, params)
    assert spec.metrics.preemptions > 0 and spec.metrics.spec_accepted_tokens > 0
    _assert_all_blocks_free(spec)

    spec.add_request("open", prompts[0], params)
    start = spec.metrics.spec_verifications
    while spec.metrics.spec_verifications == start:
        spec.step()
    assert spec.has_unfinished_requests() and spec.speculator.sequences  # aborted while speculating
    spec.abort("open")
    _assert_all_blocks_free(spec)


def test_sliding_window_past_its_length(tmp_path):
    """Gemma 3's sliding-window layers (window 16) in both models, sequences of 60-70 tokens:
    the draft's catch-up chunks and its one-row decodes must mask the window as the target does."""
    config = transformers.Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                           head_dim=32, sliding_window=16, query_pre_attn_scalar=24,
                                           rope_local_base_freq=10000.0, rope_theta=1000000.0)
    target_path, draft_path = _truncated_pair(tmp_path, config, keep=3)
    target = load_model(target_path, "float32")
    assert target.config.sliding_window == 16
    plain = LLMEngine(target, EngineConfig(**TINY))
    spec = LLMEngine(target, EngineConfig(**TINY, speculative_method="draft", draft_model=draft_path,
                                          num_speculative_tokens=4))
    prompts = _tiny_prompts(5, 30)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    assert tiny_models.generate(spec, prompts, params) == tiny_models.generate(plain, prompts, params)
    assert 0 < spec.metrics.spec_accepted_tokens < spec.metrics.spec_draft_tokens
    _assert_all_blocks_free(spec)


def test_a_draft_with_other_tokens_or_recurrent_state_is_refused(tiny, tmp_path):
    target_path, draft_path = tiny
    target = load_model(target_path, "float32")
    # Same size, two token strings swapped.
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((draft_path / name).read_bytes())
    tokenizer = json.loads((draft_path / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = (token for token, i in vocab.items() if i in (100, 101))
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(InvalidRequestError) as error:
        LLMEngine(target, EngineConfig(speculative_method="draft", draft_model=tmp_path, kv_cache_memory=2**20))
    assert "other tokens" in str(error.value) and "\n" not in str(error.value)

    draft = load_model(draft_path, "float32")
    hybrid = dataclasses.replace(draft, config=dataclasses.replace(
        draft.config, state_shapes=[((4, 8),)] + [()] * (draft.config.num_layers - 1)))
    with pytest.raises(InvalidRequestError) as error:
        LLMEngine(target, EngineConfig(speculative_method="draft", draft_model=hybrid, kv_cache_memory=2**20))
    assert "recurrent" in str(error.value) and "\n" not in str(error.value)


def test_cli_flags(tiny, capsys):
    from cholla.cli import main

    assert main(["run", "--speculative-method", "draft", "hello"]) == 2  # no --draft-model
    assert capsys.readouterr().err.strip().count("\n") == 0
    target, draft = tiny
    assert main(["run", "--speculative-method", "draft", "--draft-model", str(draft), "--num-speculative-tokens", "3",
                 "--raw", "-t", "0", "-n", "12", "--ignore-eos", "--json", str(target), "the quick brown fox"]) == 0
    assert json.loads(capsys.readouterr().out)["usage"]["completion_tokens"] == 12
