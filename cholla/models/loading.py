"""Put named checkpoint tensors into a model, with one clear error per mismatch."""

from __future__ import annotations

import torch
from torch import nn

from cholla.errors import ModelFormatError
from cholla.formats.gguf import GGUFTensor
from cholla.layers.linear import DenseTensor, Embedding, Linear, Weight, dense
from cholla.layers.norm import RMSNorm


def load_named_weights(model: nn.Module, weights: dict[str, Weight]) -> set[str]:
    """``weights`` maps module paths (``layers.3.self_attn.q_proj.weight``) to tensors.

    Every Linear, Embedding, RMSNorm and DenseTensor in the model must receive its
    weight. Returns the names no module took: HF checkpoints carry harmless extras
    (rotary tables), while the GGUF loader treats any leftover as an error.
    """
    used = set()
    for name, module in model.named_modules():
        if not isinstance(module, (Linear, Embedding, RMSNorm, DenseTensor)):
            continue
        key = name if isinstance(module, DenseTensor) else f"{name}.weight"
        if key not in weights:
            raise ModelFormatError(f"the checkpoint has no tensor for {key}; the file is incomplete")
        try:
            if isinstance(module, Linear):
                bias = weights.get(f"{name}.bias")
                if module.has_bias and bias is None:
                    raise ModelFormatError(f"the checkpoint has no tensor for {name}.bias")
                module.load(weights[key], None if bias is None else dense(bias, torch.float32))
                used.add(f"{name}.bias")
            elif isinstance(module, Embedding):
                module.load(weights[key])
            else:
                module.load(dense(weights[key], torch.float32))
        except ValueError as e:  # named as the file names it (a GGUF expert slice keeps its stack's name)
            label = weights[key].name if isinstance(weights[key], GGUFTensor) else key
            raise ModelFormatError(f"tensor {label}: {e}") from None
        used.add(key)
    return set(weights) - used
