"""A Hugging Face folder whose config.json contradicts itself or its weights: a ModelFormatError naming the key.

(GGUF files get the same checks, fuzzed, in ``test_gguf_fuzz.py``.)
"""

from __future__ import annotations

import time

import pytest
import torch

from cholla.errors import ModelFormatError
from cholla.models.loader import load_model
from tests import tiny_models

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("change, needle", [
    ({"num_attention_heads": 0}, "num_attention_heads = 0"),
    ({"num_attention_heads": 3}, "num_key_value_heads = 2 does not divide the 3 attention heads"),
    ({"num_key_value_heads": 0}, "num_key_value_heads = 0"),
    ({"num_hidden_layers": 100_000}, "num_hidden_layers = 100000"),
    ({"num_hidden_layers": 4}, "num_hidden_layers = 4 but the file holds tensors for layers 0-2"),
    ({"hidden_size": 96}, "hidden_size = 96 but the token embedding has shape (257, 64)"),
    ({"vocab_size": 300}, "vocab_size = 300 but the token embedding has 257 rows"),
    ({"intermediate_size": 100}, "intermediate_size = 100"),
    ({"head_dim": 15}, "head_dim = 15 is odd"),
    ({"max_position_embeddings": 0}, "max_position_embeddings = 0"),
    ({"rms_norm_eps": -1}, "rms_norm_eps = -1"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0.0}}, "rope_theta = 0.0"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 0}}, "linear rope scaling's factor"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "original_max_position_embeddings"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 4.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}, "low < high"),
    ({"num_attention_heads": "four"}, "num_attention_heads = 'four' is not a finite number"),
    ({"eos_token_id": 257}, "eos_token_id = 257 is not a token id"),
])
def test_contradictory_config_json_names_the_key(folder, tmp_path, change, needle):
    bad = tiny_models.with_config(folder, tmp_path / "bad", change)
    start = time.perf_counter()
    with pytest.raises(ModelFormatError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_model(bad, "float32")
    assert time.perf_counter() - start < 1.0


def test_the_intact_folder_loads(folder):
    assert load_model(folder, "float32").config.num_layers == 3
