"""When a recurrent layer's decode-only step runs as one kernel call (``kernels/hybrid_decode.cpp``).

A Mamba-2 or Gated DeltaNet layer decoding one token per sequence does a dozen small
products and state steps; the kernel runs them, norm to residual, on one thread team.
Its weight arguments are gathered once per layer, at the first decode step (after
loading), and kept here beside the layer rather than rebuilt every step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from cholla.layers.attention import AttentionMetadata
from cholla.layers.linear import Linear, kernel_products

# Each layer's (and its input norm's) weight arguments for its one-call decode; () where it cannot run.
_plans: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def one_call_inputs(layer: nn.Module, plan: Callable[[], tuple | None], first: Linear, x: torch.Tensor,
                    states: tuple[torch.Tensor, ...], meta: AttentionMetadata) -> tuple[tuple, tuple] | None:
    """(the layer's weight arguments, its first product's kernel arguments for this step's rows), or
    None where the one call does not serve: prompt rows, kernels off, fp32 activations off the CPU,
    weights or a step size our kernels do not multiply, states not contiguous. ``plan`` makes the
    weight arguments (None where the kernel cannot run); it is called once per layer."""
    if meta.num_prefills or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    weights = _plans.get(layer)
    if weights is None:
        weights = _plans[layer] = plan() or ()
    products = kernel_products(first, x.shape[0]) if weights else None
    if products is None or not all(state.is_contiguous() for state in states):
        return None
    return weights, products
