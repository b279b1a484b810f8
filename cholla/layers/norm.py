"""RMSNorm, written out the way the reference computes it (fp32 statistics)."""

from __future__ import annotations

import torch
from torch import nn

from cholla.kernels import cpu_kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., dim] normalised by its root mean square, then scaled by ``weight``.

    One fused call where our kernels run (a decode step has two per layer, and
    the op chain below costs more in dispatch than in arithmetic).
    """
    kernels = cpu_kernels()
    if kernels is not None and x.dtype == torch.float32:
        return kernels.rms_norm(x, weight, eps)
    return rms_norm_ops(x, weight, eps)


def residual_rms_norm(x: torch.Tensor, a: torch.Tensor, norm: RMSNorm,
                      next_norm: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x + norm(a)``, and ``next_norm`` of that sum where one is given (Gemma's sublayers: the
    post-norm, the residual add, the next pre-norm). One pass of our kernel where it runs (a
    prompt step's three passes over [2048, hidden] and two parallel regions fewer), the same
    values as the three ops; x, a: [tokens, hidden]."""
    kernels = cpu_kernels()
    if (kernels is not None and x.dtype == a.dtype == torch.float32 and x.dim() == 2 and x.shape == a.shape
            and x.is_contiguous() and a.is_contiguous() and (next_norm is None or next_norm.eps == norm.eps)):
        total, normed = kernels.residual_rms_norm(x, a, norm.weight, norm.eps,
                                                  None if next_norm is None else next_norm.weight)
        return total, None if next_norm is None else normed
    total = x + norm(a)
    return total, None if next_norm is None else next_norm(total)


def rms_norm_ops(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm`` in PyTorch ops: the fallback, and the kernel's reference."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * x32).to(x.dtype)


class RMSNorm(nn.Module):
    """``weight`` is the final multiplier: Gemma's ``1 + w`` is folded in at load time."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = torch.ones(dim)

    def load(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != (self.dim,):
            raise ValueError(f"norm weight shape {tuple(weight.shape)} != {(self.dim,)}")
        self.weight = weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
