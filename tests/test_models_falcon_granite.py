"""Falcon-H1 and Granite 4 hybrid on tiny random models (``tests/tiny_models.py``): cholla
against transformers from SafeTensors (a prompt prefilled in two chunks, so the Mamba-2
states cross from one to the next, then greedy decoding), and against itself from
llama.cpp's GGUF conversion (f32, and Q8_0 requantized)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cholla.engine.runner import forward_once  # noqa: E402
from cholla.kv.paged_cache import PagedKVCache  # noqa: E402
from cholla.kv.state_cache import StateCache, layer_caches  # noqa: E402
from cholla.layers.attention import AttentionMetadata  # noqa: E402
from cholla.models.config import FULL_ATTENTION, MAMBA  # noqa: E402
from cholla.models.fused_decode import _covered  # noqa: E402
from cholla.models.loader import load_model  # noqa: E402
from tests import tiny_models  # noqa: E402

NAMES = list(tiny_models.falcon_granite_configs())
ARCHITECTURE = {"granite_dense": "granitemoehybrid", "falcon_h1_rms_norm": "falcon_h1"}
CONVERTED = tiny_models.FALCON_GRANITE_GGUF  # through llama.cpp's converter
PROMPT = [(i * 37 + 11) % tiny_models.VOCAB for i in range(40)]
NEW_TOKENS = 32


@torch.inference_mode()
def prefill_then_decode(model, prompt: list[int], cut: int, new_tokens: int, block_size: int = 8):
    """The prompt prefilled as two chunks (``prompt[:cut]``, then the rest) and ``new_tokens``
    greedy decode steps, all in state slot 1 of 2 (slot 0 must stay untouched).
    Returns (the prompt's logits [len(prompt), vocab], the generated tokens)."""
    total = len(prompt) + new_tokens
    kv = PagedKVCache(model.config, num_blocks=-(-total // block_size), block_size=block_size)
    states = StateCache(model.config, num_slots=2)
    caches = layer_caches(kv.layers, states)

    def step(ids: list[int], start: int, prefill: bool) -> torch.Tensor:
        end = start + len(ids)
        meta = AttentionMetadata(slot_mapping=torch.arange(start, end), query_start_loc=[0, len(ids)], context_lens=[end],
                                 block_tables=torch.arange(kv.num_blocks)[None], num_prefills=int(prefill),
                                 decode_context_lens=None if prefill else torch.tensor([end]),
                                 state_slots=torch.tensor([1]))
        return model.compute_logits(model(torch.tensor(ids), torch.arange(start, end), caches, meta)).float()

    logits = torch.cat((step(prompt[:cut], 0, True), step(prompt[cut:], cut, True)))
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < new_tokens:
        tokens.append(int(step(tokens[-1:], len(prompt) + len(tokens) - 1, False)[0].argmax()))
    assert all(state[0].abs().sum() == 0 for layer in states.layers for state in layer)
    return logits, tokens


@pytest.mark.parametrize("name", NAMES)
def test_safetensors_match_transformers(tiny, name):
    entry = tiny(name)
    loaded = load_model(entry["folder"], "float32")
    config = loaded.config
    assert config.architecture == ARCHITECTURE.get(name, name) and config.has_state
    if name == "falcon_h1":  # attention and a mixer in every layer: KV and state everywhere
        assert config.layer_types == [FULL_ATTENTION] * 3 and all(config.state_shapes)
        assert config.mamba.num_heads == 8 and config.mamba.head_dim == 8 and config.mamba.n_groups == 2
        assert not config.mamba.gated_norm
    elif name == "falcon_h1_rms_norm":
        assert config.mamba.gated_norm and config.mamba.norm_before_gate and config.tie_word_embeddings
    elif name == "granitemoehybrid":
        assert config.layer_types == [MAMBA, FULL_ATTENTION, MAMBA] and config.no_rope and config.moe.num_experts == 4
        assert [bool(s) for s in config.state_shapes] == [True, False, True]
    else:
        assert config.layer_types == [FULL_ATTENTION, MAMBA] and not config.no_rope and config.moe is None
    # the fused C++ decode step runs Llama-shaped layers only: it must decline every one of these
    assert not any(_covered(layer) for layer in loaded.model.layers)

    ours, generated = prefill_then_decode(loaded.model, PROMPT, 19, NEW_TOKENS)
    tiny_models.assert_close(ours, tiny_models.reference_logits(entry["model"], PROMPT))
    with torch.no_grad():
        ref = entry["model"].generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                      min_new_tokens=NEW_TOKENS)[0, len(PROMPT):].tolist()
    assert generated == ref


@pytest.mark.parametrize("name", ["falcon_h1", "granitemoehybrid"])
def test_gguf_matches_transformers_and_q8_0_its_safetensors(tiny, gguf_of, name):
    """The f32 conversion (Falcon-H1's multipliers folded by llama.cpp's converter, Granite's
    kept as metadata) gives transformers' logits; Q8_0, read from its blocks, stays near the
    SafeTensors run."""
    reference = tiny_models.reference_logits(tiny(name)["model"], PROMPT)
    loaded = load_model(gguf_of(name), "float32")
    assert loaded.config.architecture == name and not loaded.config.multipliers
    tiny_models.assert_close(forward_once(loaded.model, PROMPT, block_size=8), reference)

    quantized = load_model(gguf_of(name, "Q8_0"), "float32")
    mixer = next(layer.mamba for layer in quantized.model.layers if layer.mamba is not None)
    assert mixer.in_proj.weight.qtype.name == "Q8_0"
    ours, _ = prefill_then_decode(quantized.model, PROMPT, 19, 1)
    safetensors = forward_once(load_model(tiny(name)["folder"], "float32").model, PROMPT, block_size=8)
    relative_rms = ((ours - safetensors).pow(2).mean() / safetensors.pow(2).mean()).sqrt().item()
    assert relative_rms <= 0.05


def test_dense_granite_gguf_runs_without_rope_as_llama_cpp_does(tiny, gguf_of):
    """A dense Granite hybrid's MLP is GGUF's plain ffn_gate/up/down, sized by the shared width; the
    converter drops rope for any hybrid Granite (its metadata says so), so the file equals the
    SafeTensors weights run without rope."""
    from cholla.formats.safetensors import read_hf_folder
    from cholla.models.config_checks import hf_config
    from cholla.models.granitemoehybrid import GraniteMoeHybridForCausalLM

    loaded = load_model(gguf_of("granite_dense"), "float32")
    config = loaded.config
    assert config.no_rope and config.moe is None and config.intermediate_size == 80
    assert config.layer_types == [FULL_ATTENTION, MAMBA]
    folder = read_hf_folder(tiny("granite_dense")["folder"])
    unrotated = hf_config(folder)
    unrotated.no_rope = True
    reference = GraniteMoeHybridForCausalLM(unrotated)
    reference.load_weights(folder.tensors())
    tiny_models.assert_close(forward_once(loaded.model, PROMPT, block_size=8), forward_once(reference, PROMPT, block_size=8))


def test_info_counts_granites_active_parameters(tiny, gguf_of):
    """Granite's fused expert stacks (``block_sparse_moe.input_linear``) count as routed experts:
    a token uses 2 of the 4 in each of its 3 layers. Falcon-H1's layers are attention and Mamba-2."""
    from cholla.info import model_info

    assert model_info(tiny("falcon_h1")["folder"])["layer_kinds"] == {"full_attention + mamba": 3}
    routed = 3 * 4 * (2 * 96 * 64 + 64 * 96)
    for path in (tiny("granitemoehybrid")["folder"], gguf_of("granitemoehybrid")):
        info = model_info(path)
        assert info["experts"] == {"count": 4, "active": 2, "shared_size": 48}
        assert info["parameters"] - info["active_parameters"] == routed // 2
        assert info["layer_kinds"] == {"mamba": 2, "full_attention": 1}


@pytest.mark.parametrize("name, change, needle", [
    ("falcon_h1", {"mamba_d_ssm": 48}, "mamba_n_heads = 8 heads of mamba_d_head = 8 are not the mixer's 48 channels"),
    ("falcon_h1", {"mamba_d_state": 8}, "needs in_proj.weight of layer 0 to be (168, 64), but it is (200, 64)"),
    ("falcon_h1", {"ssm_multipliers": [1.0, 2.0]}, "ssm_multipliers = '[1.0, 2.0]' must be a list of 5 numbers"),
    ("falcon_h1", {"projectors_bias": True}, "projectors_bias unlike mamba_proj_bias, is not supported"),
    ("granitemoehybrid", {"mamba_n_groups": 3}, "3 groups do not divide their 8 heads"),
    ("granitemoehybrid", {"layer_types": ["mamba", "attention"]}, "layer_types = 2 layer kinds do not match the 3 layers"),
])
def test_config_contradictions_are_one_line_errors(tiny, tmp_path, name, change, needle):

    from cholla.errors import ModelFormatError

    folder = tiny_models.with_config(tiny(name)["folder"], tmp_path / "model", change)
    with pytest.raises(ModelFormatError) as error:
        load_model(folder, "float32")
    assert needle in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["falcon_h1", "granitemoehybrid"])
def test_engine_batched_chunked_equal_alone(tiny, name):
    """Through the engine's state slots: prompts prefilled in chunks of 16 tokens and decoded
    together give what each gives alone (and what the two-chunk run above gives), and every
    block and slot comes back."""
    from cholla import LLM, SamplingParams

    folder = tiny(name)["folder"]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [{"prompt_token_ids": [(i * 7 + n * 13) % tiny_models.VOCAB for i in range(n)]} for n in (5, 37, 23)]
    llm = LLM(folder, dtype="float32", max_model_len=64, max_num_batched_tokens=16, max_num_seqs=3)
    alone = [llm.generate(p, greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert together == alone
    _, reference = prefill_then_decode(load_model(folder, "float32").model, prompts[1]["prompt_token_ids"], 16, 6)
    assert list(alone[1]) == reference
    stats = llm.engine.stats()
    assert stats.state_slots_free == stats.state_slots_total == 3
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
