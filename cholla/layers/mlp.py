"""The gated feed-forward block: ``down(act(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cholla.kernels import amx_kernels
from cholla.layers.linear import Linear, linear_group

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}
ACTIVATION_IDS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu": 2}  # as cholla/kernels/activation.cpp numbers them


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up``: one pass of our kernel where it runs (PyTorch's tanh-GELU
    alone took 60 us on Gemma 3's 32-row decode activations), else PyTorch ops."""
    kernels = amx_kernels()
    if (kernels is not None and gate.dim() == 2 and gate.dtype == up.dtype == torch.float32
            and gate.device.type == "cpu" and gate.stride(1) == 1 and up.stride(1) == 1):
        return kernels.gated_activation(gate, up, ACTIVATION_IDS[activation])
    return ACTIVATIONS[activation](gate) * up


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported ({', '.join(ACTIVATIONS)} are)")
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear_group((self.gate_proj, self.up_proj), x)
        return self.down_proj(gated_activation(gate, up, self.activation))
