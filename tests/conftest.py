"""Shared fixtures: the two real models, fetched once into cholla's cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _model_path(name: str) -> Path:
    from cholla.download import resolve_model

    return resolve_model(name)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _model_path("smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return _model_path("gemma3")


def hf_gguf_model(path: Path):
    """transformers' own load of the same GGUF file (it dequantizes to fp32): the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()

