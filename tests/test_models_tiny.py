"""Tiny random models built by transformers from a config, saved as SafeTensors:
cholla must load each folder and give the same logits as transformers itself."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cholla.engine.runner import forward_once  # noqa: E402
from cholla.models.loader import load_model  # noqa: E402

COMMON = dict(
    vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
)


def _configs():
    yield "llama", transformers.LlamaConfig(**COMMON, tie_word_embeddings=False)
    yield "llama-rope3", transformers.LlamaConfig(
        **COMMON, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    yield "mistral", transformers.MistralConfig(**COMMON, sliding_window=None)
    yield "mistral-sliding", transformers.MistralConfig(**COMMON, sliding_window=24)
    yield "qwen2", transformers.Qwen2Config(**COMMON, tie_word_embeddings=True)
    yield "qwen3", transformers.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False)
    yield "gemma3", transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 7}, head_dim=32, sliding_window=16, query_pre_attn_scalar=24,
        rope_local_base_freq=10000.0, rope_theta=1000000.0,
    )


CONFIGS = dict(_configs())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiny_model_matches_transformers(name, tmp_path):
    torch.manual_seed(0)
    config = CONFIGS[name]
    reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random init leaves norms at 1 (or Gemma's 0): perturb them so they matter
        for pname, p in reference.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    # Small shards exercise the index file path.
    reference.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()

    loaded = load_model(tmp_path, "float32")
    assert loaded.config.architecture == name.split("-")[0]
    ids = torch.randint(0, config.vocab_size, (40,)).tolist()
    ours = forward_once(loaded.model, ids, block_size=8)
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0]
    # fp32 on both sides; only summation order differs.
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
