"""Mamba-2 and Nemotron-H (dense, and MoE as Nemotron Nano) on tiny random models
(``tests/tiny_models.py``): cholla against transformers from SafeTensors, with the state
carried across prefill chunks and through a one-token decode loop, and against
itself from llama.cpp's GGUF conversion (f32 and Q8_0)."""

from __future__ import annotations

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cholla.errors import ModelFormatError  # noqa: E402
from cholla.kv.paged_cache import PagedKVCache  # noqa: E402
from cholla.kv.state_cache import StateCache, layer_caches  # noqa: E402
from cholla.layers.attention import AttentionMetadata  # noqa: E402
from cholla.models.loader import load_model  # noqa: E402
from tests import tiny_models  # noqa: E402

NAMES = list(tiny_models.mamba_configs())
GGUF_NAMES = tiny_models.MAMBA_GGUF  # between them every kind of layer and tensor
PROMPT = [(i * 37 + 11) % tiny_models.VOCAB for i in range(40)]
BLOCK = 8


class Sequence:
    """One sequence driven through the model step by step, in its own KV blocks and state slot
    (slot 1 of 2, so a slot mix-up shows): prefill chunks, then one-token decodes."""

    def __init__(self, model, max_len: int):
        self.model, self.length = model, 0
        self.num_blocks = -(-max_len // BLOCK)
        kv = PagedKVCache(model.config, num_blocks=self.num_blocks, block_size=BLOCK)
        self.caches = layer_caches(kv.layers, StateCache(model.config, num_slots=2))

    def step(self, ids: list[int]) -> torch.Tensor:
        """Logits [len(ids), vocab]: a prefill chunk, or (one id after a prefill) a decode."""
        start, end = self.length, self.length + len(ids)
        decode = start > 0 and len(ids) == 1
        meta = AttentionMetadata(slot_mapping=torch.arange(start, end), query_start_loc=[0, len(ids)],
                                 context_lens=[end], block_tables=torch.arange(self.num_blocks)[None],
                                 num_prefills=0 if decode else 1,
                                 decode_context_lens=torch.tensor([end]) if decode else None,
                                 state_slots=torch.tensor([1]))
        self.length = end
        hidden = self.model(torch.tensor(ids), torch.arange(start, end), self.caches, meta)
        return self.model.compute_logits(hidden).float()


def _chunked_logits(model) -> torch.Tensor:
    """PROMPT's logits from two prefill chunks (23 + 17 tokens: both cross the SSD's 16-token chunks)."""
    seq = Sequence(model, len(PROMPT))
    return torch.cat((seq.step(PROMPT[:23]), seq.step(PROMPT[23:])))


@pytest.mark.parametrize("name", NAMES)
def test_safetensors_match_transformers(tiny, name):
    entry = tiny(name)
    loaded = load_model(entry["folder"], "float32")
    config = loaded.config
    assert config.architecture == name.removesuffix("_moe") and config.has_state
    assert (config.moe is not None) == name.endswith("_moe")
    tiny_models.assert_close(_chunked_logits(loaded.model), tiny_models.reference_logits(entry["model"], PROMPT))

    seq, ours = Sequence(loaded.model, 12 + 32), []
    seq.step(PROMPT[:5])
    logits = seq.step(PROMPT[5:12])
    for _ in range(32):
        ours.append(int(logits[-1].argmax()))
        logits = seq.step(ours[-1:])
    with torch.no_grad():
        ref = entry["model"].generate(torch.tensor([PROMPT[:12]]), max_new_tokens=32, do_sample=False,
                                      min_new_tokens=32)[0, 12:].tolist()
    assert ours == ref


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_gguf_matches_safetensors(tiny, gguf_of, name):
    """llama.cpp's conversion (A stored as -exp(A_log), the conv squeezed, the norm per group,
    stacked experts): f32 exact against transformers, Q8_0 near cholla's own SafeTensors run."""
    ref = tiny_models.reference_logits(tiny(name)["model"], PROMPT)
    loaded = load_model(gguf_of(name), "float32")
    assert loaded.config.layer_types == load_model(tiny(name)["folder"], "float32").config.layer_types
    tiny_models.assert_close(_chunked_logits(loaded.model), ref)
    quantized = load_model(gguf_of(name, "Q8_0"), "float32")
    assert quantized.model.layers[0].mixer.in_proj.weight.qtype.name == "Q8_0"
    ours = _chunked_logits(quantized.model)
    assert ((ours - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item() <= 0.05


@pytest.mark.parametrize("change, needle", [
    ({"ssm_state_size": 4}, "needs in_proj.weight of layer 0 to be (152, 64), but it is (168, 64)"),
    ({"n_groups": 3}, "groups do not divide their 8 heads"),
    ({"hybrid_override_pattern": "M*X-M", "layers_block_type": None}, "must name each layer M (Mamba-2)"),
])
def test_config_contradictions_name_the_key(tiny, tmp_path, change, needle):
    folder = tiny_models.with_config(tiny("nemotron_h_moe")["folder"], tmp_path / "model", change)
    with pytest.raises(ModelFormatError, match=re.escape(needle)) as error:
        load_model(folder, "float32")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_engine_batched_chunked_preempted_equal_alone(tiny, name):
    """Through the engine (16-token prefill chunks): each prompt alone gives transformers' tokens;
    all together, and under a budget so small that requests are preempted (their slots freed and
    their prefill recomputed from 0), give the same; aborts leave every block and slot free."""
    from cholla import LLM, SamplingParams
    from cholla.kv.state_cache import state_bytes_per_sequence

    entry = tiny(name)

    def engine(**kwargs) -> LLM:
        return LLM(entry["folder"], dtype="float32", max_model_len=64, max_num_batched_tokens=16, **kwargs)

    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [[(i * 7 + n * 13) % tiny_models.VOCAB for i in range(n)] for n in (5, 23, 9, 40, 17, 3, 30, 12)]
    single = engine()
    alone = [single.generate({"prompt_token_ids": p}, greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    with torch.no_grad():
        ref = entry["model"].generate(torch.tensor([prompts[3]]), max_new_tokens=8, do_sample=False,
                                      min_new_tokens=8)[0, 40:].tolist()
    assert list(alone[3]) == ref

    batch = [{"prompt_token_ids": p} for p in prompts]
    outs = single.generate(batch, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone and tiny_models.all_free(single)
    config = single.engine.model_config
    # Four slots (the state takes at most half the budget) and the KV blocks of 96 tokens between them.
    budget = 8 * state_bytes_per_sequence(config)
    small = engine(block_size=8, kv_cache_memory=budget, max_num_seqs=4)
    assert small.engine.state_cache.num_slots == 4
    outs = small.generate(batch, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone and tiny_models.all_free(small)
    if name != "mamba2":  # a model without attention counts tokens in free blocks: nothing to run short of
        assert small.engine.metrics.preemptions > 0

    tiny_models.abort_in_prefill_and_decode(single.engine, {"prompt_token_ids": prompts[3]},
                                            {"prompt_token_ids": prompts[0]})
    assert not single.engine.has_unfinished_requests() and tiny_models.all_free(single)
