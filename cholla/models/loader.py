"""From a path on disk to a ready model: read the file, build the config, place the weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cholla.errors import InvalidRequestError, ModelFormatError, ModelNotFoundError
from cholla.formats.gguf import GGUFFile, read_gguf
from cholla.formats.safetensors import read_hf_folder
from cholla.layers.linear import Linear, dense
from cholla.models.config import ModelConfig, config_from_gguf, config_from_hf
from cholla.models.gemma3 import Gemma3ForCausalLM
from cholla.models.gguf_names import gguf_to_hf_name
from cholla.models.registry import model_class
from cholla.quant import check_supported

log = logging.getLogger("cholla")

# "float32": the reference path, every weight dequantized to fp32 before its matmul.
# "bfloat16": Linear weights packed for PyTorch's weight-only kernels, matmuls in bf16.
DTYPES = ("float32", "bfloat16")


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    path: Path
    gguf: GGUFFile | None = None  # kept for `cholla info` and to hold the memory map open
    generation_config: dict | None = None
    dtype: str = "float32"


def load_model(path: str | Path, dtype: str = "float32") -> LoadedModel:
    """Load a GGUF file or an HF folder; ``dtype`` is one of ``DTYPES``."""
    if dtype not in DTYPES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(path)
    if path.is_dir():
        loaded = _load_hf(path)
    elif not path.exists():
        raise ModelNotFoundError(f"model not found: {path}")
    else:
        loaded = _load_gguf(path)
    if dtype == "bfloat16":
        pack_linears(loaded.model)
        loaded.dtype = dtype
    return loaded


def pack_linears(model: nn.Module) -> None:
    """Switch every Linear (the output head included) to packed weights and bf16 matmuls.

    Embedding lookups keep dequantizing just the rows they need: that is exact
    and cheap, so only the matmuls change.
    """
    packed_bytes = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack()
            packed_bytes += module.packed.nbytes
    log.info("bfloat16: packed the Linear weights into %.0f MiB", packed_bytes / 2**20)


def _load_gguf(path: Path) -> LoadedModel:
    gguf = read_gguf(path)
    config = config_from_gguf(gguf.metadata, set(gguf.tensors))
    weights = {}
    for name, tensor in gguf.tensors.items():
        if name == "rope_freqs.weight":
            config.rope.freq_factors = dense(tensor, torch.float32).tolist()
            continue
        hf_name = gguf_to_hf_name(name, config.architecture)
        if hf_name is None:
            continue
        check_supported(tensor.qtype, name)
        weights[hf_name] = tensor
    model = model_class(config.architecture)(config)
    model.load_weights(weights)
    return LoadedModel(model.eval(), config, path, gguf=gguf)


def _load_hf(path: Path) -> LoadedModel:
    folder = read_hf_folder(path)
    config = config_from_hf(folder.config)
    cls = model_class(config.architecture)
    weights = folder.tensors()
    if cls is Gemma3ForCausalLM:
        weights = Gemma3ForCausalLM.sanitize_hf(weights)
    if not weights:
        raise ModelFormatError(f"{path}: no weights found")
    model = cls(config)
    model.load_weights(weights)
    return LoadedModel(model.eval(), config, path, generation_config=folder.generation_config)
