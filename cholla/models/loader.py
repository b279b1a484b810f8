"""From a path on disk to a ready model: read the file, build the config, place the weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cholla.errors import InvalidRequestError, ModelFormatError, ModelNotFoundError
from cholla.formats.gguf import GGUFFile, read_gguf
from cholla.formats.safetensors import read_hf_folder
from cholla.kernels import cpu_kernels
from cholla.layers.attention import Attention
from cholla.layers.linear import Linear, dense
from cholla.layers.mla import LatentAttention
from cholla.models.config import ModelConfig
from cholla.models.config_checks import gguf_config, hf_config
from cholla.models.gguf_names import gguf_to_hf_name
from cholla.models.registry import model_class
from cholla.quant import check_supported

# "float32": fp32 matmuls only (decode steps through the exact fp32 kernel, larger
#   steps dequantize to fp32): the reference path.
# "bfloat16": steps of more than a few rows multiply in bf16 (AMX tiles, oneDNN).
# "auto": bfloat16 where our C++ kernels run (AVX512-BF16), float32 elsewhere.
DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return "bfloat16" if cpu_kernels() is not None else "float32"
    return dtype


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    path: Path
    gguf: GGUFFile | None = None  # kept for `cholla info` and to hold the memory map open
    generation_config: dict | None = None
    dtype: str = "float32"


def load_model(path: str | Path, dtype: str = "auto") -> LoadedModel:
    """Load a GGUF file or an HF folder; ``dtype`` is one of ``DTYPES``."""
    dtype = resolve_dtype(dtype)
    path = Path(path)
    if path.is_dir():
        loaded = _load_hf(path)
    elif not path.exists():
        raise ModelNotFoundError(f"model not found: {path}")
    else:
        loaded = _load_gguf(path)
    if dtype == "bfloat16":
        for module in loaded.model.modules():
            if isinstance(module, (Linear, Attention, LatentAttention)):
                module.compute_dtype = torch.bfloat16
    loaded.dtype = dtype
    return loaded


def _load_gguf(path: Path) -> LoadedModel:
    gguf = read_gguf(path)
    config = gguf_config(gguf)
    weights, gguf_names = {}, {}
    for name, tensor in gguf.tensors.items():
        if name == "rope_freqs.weight":
            config.rope.freq_factors = dense(tensor, torch.float32).tolist()
            continue
        hf_name = gguf_to_hf_name(name, config.architecture)
        if hf_name is None:
            raise ModelFormatError(f"{path.name}: tensor {name} has no place in a {config.architecture} model")
        check_supported(tensor.qtype, name)
        weights[hf_name] = tensor
        gguf_names[hf_name.removeprefix("model.")] = name
    model = model_class(config.architecture)(config)
    leftover = model.load_weights(weights)
    if leftover:  # a tensor the file has but no module took: the metadata and tensors disagree
        name = min(leftover)
        raise ModelFormatError(f"{path.name}: tensor {gguf_names.get(name, name)} has no place in this "
                               f"{config.architecture} model ({len(leftover)} such tensors)")
    return LoadedModel(model.eval(), config, path, gguf=gguf)


def _load_hf(path: Path) -> LoadedModel:
    folder = read_hf_folder(path)
    config = hf_config(folder)
    cls = model_class(config.architecture)
    weights = folder.tensors()
    if "sanitize_hf" in vars(cls):  # the class's own HF -> GGUF-form step (not inherited: Gemma 4 keeps its norms)
        weights = cls.sanitize_hf(weights)
    if not weights:
        raise ModelFormatError(f"{path}: no weights found")
    model = cls(config)
    model.load_weights(weights)
    return LoadedModel(model.eval(), config, path, generation_config=folder.generation_config)
