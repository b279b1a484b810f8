"""The feed-forward blocks: gated ``down(act(gate(x)) * up(x))``, and plain ``down(act(up(x)))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cholla.kernels import cpu_kernels
from cholla.layers.linear import Linear, linear_group

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}
# Activations of the ungated block: these and squared ReLU (Nemotron-H).
UNGATED_ACTIVATIONS = {**ACTIVATIONS, "relu2": lambda x: torch.relu(x).square()}
ACTIVATION_IDS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu": 2}  # as cholla/kernels/activation.cpp numbers them


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` in fp32, returned in the inputs' dtype (fp32, or bf16 from a
    prefill's dense product). One pass of our kernel where it runs (PyTorch's
    tanh-GELU alone took 60 us on Gemma 3's 32-row decode activations), else PyTorch ops."""
    kernels = cpu_kernels()
    if (kernels is not None and gate.dim() == 2 and gate.dtype == up.dtype
            and gate.dtype in (torch.float32, torch.bfloat16) and gate.device.type == "cpu"
            and gate.stride(1) == 1 and up.stride(1) == 1):
        return kernels.gated_activation(gate, up, ACTIVATION_IDS[activation])
    return (ACTIVATIONS[activation](gate.float()) * up.float()).to(gate.dtype)


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
        # A prefill's bf16 product stays bf16 through the activation: the down
        # projection's matmul would round it to bf16 anyway.
        gate, up = linear_group((self.gate_proj, self.up_proj), x, keep_bf16=True)
        return self.down_proj(gated_activation(gate, up, self.activation))


class MLP(nn.Module):
    """The ungated block ``down(act(up(x)))`` (Nemotron-H's MLP layers and experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool = False):
        super().__init__()
        if activation not in UNGATED_ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported ({', '.join(UNGATED_ACTIVATIONS)} are)")
        self.up_proj = Linear(hidden_size, intermediate_size, bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias)
        self.activation = UNGATED_ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.up_proj(x)))
