"""Shared fixtures: the two real models, fetched once into cholla's cache, and the tiny random
models of ``tests/tiny_models.py`` with their GGUF conversions, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _model_path(name: str) -> Path:
    from cholla.download import resolve_model

    return resolve_model(name)


@pytest.fixture(scope="session", autouse=True)
def verify_every_draft():
    """How many drafts a step verifies is a speed policy (``speculator.STEP_COST``, measured on one
    machine, where float32 steps never speculate); the engine tests want drafts verified, so
    their steps cost the same at any row count (``allot``'s own test checks the policy)."""
    from cholla.speculative.speculator import STEP_COST

    measured = dict(STEP_COST)
    STEP_COST.update({dtype: ((1, 1.0), (table[-1][0], 1.0)) for dtype, table in measured.items()})
    yield
    STEP_COST.update(measured)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _model_path("smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return _model_path("gemma3")


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_path):
    """SmolLM2 loaded in float32 with its tokenizer, once for every test that builds engines on it."""
    from cholla.engine.engine import load_tokenizer
    from cholla.models.loader import load_model

    loaded = load_model(smollm2_path, "float32")
    return loaded, load_tokenizer(loaded)


def engine_on(loaded_and_tokenizer, monkeypatch, **config):
    """An ``LLMEngine`` over an already loaded ``(model, tokenizer)``: no file read, no tokenizer rebuilt."""
    from cholla.engine import engine as engine_module
    from cholla.engine.engine import EngineConfig, LLMEngine

    loaded, tokenizer = loaded_and_tokenizer
    monkeypatch.setattr(engine_module, "load_tokenizer", lambda _: tokenizer)
    return LLMEngine(loaded, EngineConfig(**config))


def hf_gguf_model(path: Path):
    """transformers' own load of the same GGUF file (it dequantizes to fp32): the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()



@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """name -> {"folder", "model"}: a tiny random model and its SafeTensors folder, built on first use."""
    from tests import tiny_models

    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            folder = root / name
            cache[name] = {"folder": folder,
                           "model": tiny_models.build_model(name, folder, tiny_models.tokenizer_for(name))}
        return cache[name]

    return get


@pytest.fixture(scope="session")
def gguf_of(tiny, tmp_path_factory):
    """(name, qtype or "F32", dequantized) -> a GGUF path. The first call converts every model of
    ``tiny_models.gguf_jobs()`` in one converter process (its imports cost ~10 s); requantized
    copies are made on demand and kept."""
    from tests import tiny_models

    converter = tiny_models.find_converter()
    if converter is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not available (set CHOLLA_CONVERT_HF_TO_GGUF)")
    root = tmp_path_factory.mktemp("tiny_gguf")
    cache: dict[tuple, Path] = {}

    def get(name: str, qtype: str = "F32", dequantized: bool = False) -> Path:
        if not cache:
            jobs = {name: (tiny(name)["folder"], root / f"{name}.gguf", args)
                    for name, args in tiny_models.gguf_jobs().items()}
            tiny_models.convert_to_gguf(converter, list(jobs.values()))
            cache.update({(name, "F32", False): out for name, (_, out, _) in jobs.items()})
        key = (name, qtype, dequantized)
        if key not in cache:
            suffix = "-roundtrip" if dequantized else ""
            cache[key] = tiny_models.requantize(cache[name, "F32", False], root / f"{name}-{qtype}{suffix}.gguf",
                                                qtype, dequantized)
        return cache[key]

    return get
