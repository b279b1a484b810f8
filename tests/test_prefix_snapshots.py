"""Prefix caching for every family with recurrent state, through state snapshots (``kv/state_cache.py``):
repeated prompts, their cached prefixes resumed from a snapshot, give token for token the greedy
output of the same engine without prefix caching (whose chunks fall elsewhere), and leave every
block and slot free, the snapshots bounded."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from cholla import LLM, SamplingParams  # noqa: E402
from tests import tiny_models  # noqa: E402

# One of each kind of recurrent layer the engine runs: short convolution, Mamba-2 alone, Mamba-2 beside
# attention and MoE, Mamba-2 beside attention in parallel (Falcon-H1) and in sequence (Granite 4), Gated
# DeltaNet beside gated attention (Qwen3-Next with MoE, Qwen 3.5 dense).
NAMES = ["lfm2", "mamba2", "nemotron_h_moe", "falcon_h1", "granitemoehybrid", "qwen3_next", "qwen3_5"]


def _run(folder, prompts, prefix_caching: bool) -> tuple[LLM, list]:
    llm = LLM(folder, dtype="float32", max_model_len=96, max_num_batched_tokens=16, block_size=8,
              enable_prefix_caching=prefix_caching)
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    first = llm.generate(prompts, greedy, use_tqdm=False)  # in one batch: repeats among them too
    again = llm.generate(prompts[:3], greedy, use_tqdm=False)  # after they finished: snapshots only
    return llm, [list(o.outputs[0].token_ids) for o in first + again]


@pytest.mark.parametrize("name", NAMES)
def test_repeated_prompts_resume_from_snapshots_exactly(name, tiny):
    folder = tiny(name)["folder"]
    shared = [(i * 37 + 11) % tiny_models.VOCAB for i in range(27)]
    prompts = [{"prompt_token_ids": shared + [(i * 5 + n) % tiny_models.VOCAB for i in range(n)]} for n in (1, 14, 6)]
    prompts += prompts[:2]
    _, want = _run(folder, prompts, prefix_caching=False)
    llm, got = _run(folder, prompts, prefix_caching=True)
    assert got == want
    engine = llm.engine
    assert engine.block_manager.prefix_hits > 0 and engine.snapshots.restored > 0
    assert len(engine.snapshots.by_hash) <= engine.kv_layout.num_snapshots
    manager, slots = engine.block_manager, engine.scheduler.state_slots
    assert manager.num_free_blocks == manager.num_blocks and not any(manager.allocator.ref_counts)
    assert slots.num_free == slots.num_slots
