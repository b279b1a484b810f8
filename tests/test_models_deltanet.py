"""Gated DeltaNet hybrids (Qwen3-Next, Qwen 3.5 dense and MoE) on tiny random models
(``tests/tiny_models.py``): the delta rule's chunked form against its recurrence, then
cholla against transformers from SafeTensors (a prompt prefilled in two chunks through one
state slot, then greedy decoding batched with a second sequence), and from llama.cpp's GGUF
conversion (f32 and Q8_0)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cholla.engine.runner import forward_once  # noqa: E402
from cholla.kv.paged_cache import PagedKVCache  # noqa: E402
from cholla.kv.state_cache import StateCache, layer_caches  # noqa: E402
from cholla.layers.attention import AttentionMetadata  # noqa: E402
from cholla.layers.gated_deltanet import delta_rule_chunked, delta_rule_step, l2_normalize  # noqa: E402
from cholla.models.loader import load_model  # noqa: E402
from tests import tiny_models  # noqa: E402

NAMES = list(tiny_models.deltanet_configs())
PROMPT = [(i * 37 + 11) % tiny_models.VOCAB for i in range(100)]
FIRST_CHUNK = 70  # the first prefill call spans two of the delta rule's 64-token chunks
BLOCK = 8


def test_chunked_and_step_forms_are_the_delta_rule():
    """From a nonzero state, the chunked form (lengths around the chunk size) and the batched
    step (two sequences side by side) == the rule applied one token at a time as written."""
    torch.manual_seed(0)
    heads, dk, dv = 3, 8, 5
    for tokens, chunk in ((37, 16), (16, 16), (5, 64)):
        q = l2_normalize(torch.randn(tokens, heads, dk)) * dk**-0.5
        k = l2_normalize(torch.randn(tokens, heads, dk))
        v, beta = torch.randn(tokens, heads, dv), torch.rand(tokens, heads)
        g = -torch.rand(tokens, heads) * 2
        start = torch.randn(heads, dk, dv)
        out, state = delta_rule_chunked(q, k, v, g, beta, start.clone(), chunk)
        expected, step_state = [], start[None].clone()
        for t in range(tokens):  # the rule as written, token by token
            step_state = step_state * g[t, :, None, None].exp()
            correction = (v[t] - (k[t, :, None, :] @ step_state[0]).squeeze(1)) * beta[t, :, None]
            step_state = step_state + k[t, :, :, None] * correction[:, None, :]
            expected.append((q[t, :, None, :] @ step_state[0]).squeeze(1)[None])
        torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, step_state[0], rtol=1e-5, atol=1e-5)
        batch = torch.stack((start, -start))  # a second sequence (its state negated) beside the first
        stepped = torch.stack([delta_rule_step(q[t].expand(2, -1, -1), k[t].expand(2, -1, -1), v[t].expand(2, -1, -1),
                                               g[t].expand(2, -1), beta[t].expand(2, -1), batch) for t in range(tokens)])
        torch.testing.assert_close(stepped[:, 0], torch.cat(expected), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch[0], step_state[0], rtol=1e-5, atol=1e-5)


class _Sequences:
    """Drives a model step by step the way the engine will: each sequence owns a run of KV blocks
    and a state slot; prefill chunks come first in a step, then one-token decodes."""

    def __init__(self, model, num_seqs: int, max_len: int):
        self.model = model
        self.blocks_per_seq = -(-max_len // BLOCK)
        kv = PagedKVCache(model.config, num_blocks=num_seqs * self.blocks_per_seq, block_size=BLOCK)
        self.states = StateCache(model.config, num_slots=num_seqs + 1)
        self.caches = layer_caches(kv.layers, self.states)
        self.lengths = [0] * num_seqs
        self.slots = [num_seqs - i for i in range(num_seqs)]  # not the sequence's index: slots are looked up

    def step(self, chunks: list[tuple[int, list[int]]], num_prefills: int) -> torch.Tensor:
        """chunks: (sequence, its new tokens), prefills first. Returns logits [tokens, vocab]."""
        ids, positions, slot_mapping, starts, context = [], [], [], [0], []
        for seq, tokens in chunks:
            if self.lengths[seq] == 0:
                self.states.reset([self.slots[seq]])
            for token in tokens:
                pos = self.lengths[seq]
                ids.append(token), positions.append(pos)
                slot_mapping.append((seq * self.blocks_per_seq + pos // BLOCK) * BLOCK + pos % BLOCK)
                self.lengths[seq] += 1
            starts.append(len(ids))
            context.append(self.lengths[seq])
        seqs = [seq for seq, _ in chunks]
        tables = torch.stack([torch.arange(self.blocks_per_seq) + s * self.blocks_per_seq for s in seqs])
        meta = AttentionMetadata(slot_mapping=torch.tensor(slot_mapping), query_start_loc=starts, context_lens=context,
                                 block_tables=tables, num_prefills=num_prefills,
                                 decode_context_lens=torch.tensor(context[num_prefills:], dtype=torch.long),
                                 state_slots=torch.tensor([self.slots[s] for s in seqs]))
        with torch.inference_mode():
            return self.model.compute_logits(self.model(torch.tensor(ids), torch.tensor(positions), self.caches, meta))


@pytest.mark.parametrize("name", NAMES)
def test_safetensors_match_transformers(tiny, name):
    entry = tiny(name)
    loaded = load_model(entry["folder"], "float32")
    assert loaded.config.architecture == name and loaded.config.has_state
    reference = entry["model"]

    # One prompt in two prefill calls (the second continues the state in the slot), alongside a
    # short second sequence prefilled in the same steps: logits at every position.
    run = _Sequences(loaded.model, 2, len(PROMPT) + 40)
    other = PROMPT[::-1][:9]
    first = run.step([(0, PROMPT[:FIRST_CHUNK]), (1, other[:4])], num_prefills=2)
    second = run.step([(0, PROMPT[FIRST_CHUNK:]), (1, other[4:])], num_prefills=2)
    ours = torch.cat((first[:FIRST_CHUNK], second[: len(PROMPT) - FIRST_CHUNK]))
    tiny_models.assert_close(ours, tiny_models.reference_logits(reference, PROMPT))
    tiny_models.assert_close(torch.cat((first[FIRST_CHUNK:], second[len(PROMPT) - FIRST_CHUNK:])), tiny_models.reference_logits(reference, other))

    # 32 greedy tokens, the two sequences decoding in one batched step (their slots gathered) or,
    # every other token, each in a step of its own (its slot used in place).
    prompt, generated = PROMPT[:12], [[], []]
    run = _Sequences(loaded.model, 2, 12 + 9 + 32)
    logits = run.step([(0, prompt), (1, other)], num_prefills=2)
    last = [logits[len(prompt) - 1], logits[-1]]
    for step in range(32):
        for seq in (0, 1):
            generated[seq].append(int(last[seq].argmax()))
        if step % 2:
            last = [run.step([(seq, generated[seq][-1:])], num_prefills=0)[0] for seq in (0, 1)]
        else:
            last = run.step([(0, generated[0][-1:]), (1, generated[1][-1:])], num_prefills=0)
    for seq, ids in ((0, prompt), (1, other)):
        with torch.no_grad():
            ref = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                     min_new_tokens=32)[0, len(ids):].tolist()
        assert generated[seq] == ref


@pytest.mark.parametrize("name", NAMES)
def test_gguf_matches_transformers_and_q8_0_its_round_trip(tiny, gguf_of, name):
    """f32 GGUF == transformers; Q8_0 read from its blocks == its dequantized values stored as
    f32, and near the float model."""
    loaded = load_model(gguf_of(name), "float32")
    assert loaded.config.architecture == name and loaded.config.deltanet is not None
    ref = tiny_models.reference_logits(tiny(name)["model"], PROMPT)
    tiny_models.assert_close(forward_once(loaded.model, PROMPT, block_size=BLOCK), ref)

    quantized = load_model(gguf_of(name, "Q8_0"), "float32")
    assert quantized.model.layers[0].linear_attn.in_proj_qkv.weight.qtype.name == "Q8_0"
    ours = forward_once(quantized.model, PROMPT, block_size=BLOCK)
    exact = forward_once(load_model(gguf_of(name, "Q8_0", dequantized=True), "float32").model, PROMPT, block_size=BLOCK)
    tiny_models.assert_close(ours, exact)
    relative_rms = ((ours - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
    assert relative_rms <= 0.05


def test_qwen3_5_multimodal_checkpoint_loads_its_text_tower(tiny, tmp_path):
    """Qwen 3.5 as published: a ``qwen3_5`` config wrapping ``text_config``, the text tower under
    ``model.language_model.``, a vision tower and MTP layers beside it (not read)."""
    import json

    from safetensors.torch import load_file, save_file

    src = tiny("qwen3_5")["folder"]
    text = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5", "text_config": text,
                                                      "vision_config": {"depth": 1}, "tie_word_embeddings": False}))
    weights = load_file(src / "model.safetensors")
    renamed = {name.replace("model.", "model.language_model.", 1): w for name, w in weights.items()}
    save_file({**renamed, "model.visual.patch_embed.proj.weight": torch.zeros(4, 3),
               "mtp.fc.weight": torch.zeros(64, 128)}, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path, "float32")
    assert loaded.config.architecture == "qwen3_5"
    tiny_models.assert_close(forward_once(loaded.model, PROMPT[:20], block_size=BLOCK),
                  tiny_models.reference_logits(tiny("qwen3_5")["model"], PROMPT[:20]))


@pytest.mark.parametrize("change, needle", [
    ({"linear_num_value_heads": 3}, "linear_num_value_heads = 3 must be a multiple of the 2 key heads"),
    ({"linear_value_head_dim": 8}, "needs in_proj_qkvz of layer 0 to be (128, 64), but it is (192, 64)"),
    ({"linear_conv_kernel_dim": 1}, "linear_conv_kernel_dim = 1 must be a whole number in [2, 64]"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.0}},
     "partial_rotary_factor = 0.0"),
])
def test_contradictory_deltanet_config_names_the_key(tiny, tmp_path, change, needle):
    import re

    from cholla.errors import ModelFormatError

    bad = tiny_models.with_config(tiny("qwen3_next")["folder"], tmp_path / "bad", change)
    with pytest.raises(ModelFormatError, match=re.escape(needle)):
        load_model(bad, "float32")


def test_gguf_with_mtp_layers_is_refused(gguf_of, tmp_path):
    """A conversion without ``--no-mtp`` says how to make one cholla runs."""
    import gguf
    import numpy as np

    from cholla.errors import ModelFormatError

    src = gguf_of("qwen3_5")
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(tmp_path / "mtp.gguf", "qwen35")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_uint32("qwen35.nextn_predict_layers", 1)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFormatError, match="--no-mtp"):
        load_model(tmp_path / "mtp.gguf", "float32")


def test_engine_batched_chunked_preempted_equal_alone(tiny):
    """Through the engine's state slots: prompts batched (prefilled in chunks, decoded together)
    give what each gives alone, also when few blocks force preemption; aborts free every slot."""
    from cholla import LLM, SamplingParams
    from cholla.kv.paged_cache import bytes_per_block
    from cholla.kv.state_cache import state_bytes_per_sequence

    folder = tiny("qwen3_next")["folder"]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [{"prompt_token_ids": [(i * 7 + n * 13) % tiny_models.VOCAB for i in range(n)]} for n in (5, 23, 90, 70)]

    def engine(**kwargs) -> LLM:
        return LLM(folder, dtype="float32", max_model_len=128, max_num_batched_tokens=32, block_size=8, **kwargs)

    single = engine()
    alone = [single.generate(p, greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    config = single.engine.model_config
    # Two slots (their states take at most half the budget) and 17 blocks: the two long prompts
    # (12 and 10 blocks) cannot both stay, so one is preempted and recomputed from its first token.
    budget = 17 * bytes_per_block(config, 8, torch.float32) + 2 * state_bytes_per_sequence(config)
    small = engine(kv_cache_memory=budget, max_num_seqs=2)
    assert small.engine.state_cache.num_slots == 2
    outs = small.generate(prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert small.engine.metrics.preemptions > 0 and tiny_models.all_free(small)

    tiny_models.abort_in_prefill_and_decode(single.engine, prompts[2], prompts[0])
    assert not single.engine.has_unfinished_requests() and tiny_models.all_free(single)
