"""Mixture of experts: a router picks ``top_k`` of ``num_experts`` gated MLPs per token.

One layer serves every architecture; what differs between them is how router
logits become (weights, expert ids), written below as small functions
(``softmax_topk``, ``topk_softmax``, ``sigmoid_group_topk``, ``softmax_topk_scaled``), and the experts'
activation (``GatedMLP``'s, or GPT-OSS's clamped SwiGLU), or ungated experts
(``down(act(up(x)))``, Nemotron-H).

Each expert is three ``Linear`` layers over its own slice of the checkpoint's
stacked ``[experts, rows, cols]`` tensors (``split_experts``): a GGUF expert
stays in its quantized blocks and goes through the same kernels as a dense
weight. Tokens are grouped by expert (a sorted permutation of the token-expert
pairs), so each active expert's weights are read once per step in one matmul,
and experts no token chose are never touched: a decode step reads only the
routed experts' bytes.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cholla.errors import ModelFormatError
from cholla.formats.gguf import GGUFTensor
from cholla.kernels import cpu_kernels
from cholla.layers.linear import DenseTensor, Linear, Weight, kernel_products, linear_group
from cholla.layers.mlp import ACTIVATION_IDS, ACTIVATIONS, MLP, UNGATED_ACTIVATIONS, GatedMLP, gated_activation

# Router logits [tokens, experts] (fp32) -> (weights [tokens, k] fp32, expert ids [tokens, k]).
Router = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (gate, up) [rows, intermediate] -> activation [rows, intermediate]
GLU = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RouterSpec:
    """A router flavour as ``kernels/hybrid_decode.cpp``'s ``moe_decode`` takes it (``kind``: 0
    ``softmax_topk``, 1 ``topk_softmax``, 2 ``sigmoid_group_topk``), set on the route function as
    ``route.spec``; a flavour without one runs in Python."""

    kind: int
    top_k: int
    normalize: bool = False
    num_groups: int = 1
    groups_used: int = 1
    scale: float = 1.0


# Squared ReLU's id in moe_decode, beside mlp.py's ACTIVATION_IDS of the gated activations.
RELU2_ID = 3


def softmax_topk(top_k: int, normalize: bool) -> Router:
    """Mixtral, Qwen-MoE, OLMoE: softmax over all experts, keep the k largest,
    optionally rescaled to sum to one (Mixtral's softmax over the top k is the same)."""

    def route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    route.spec = RouterSpec(0, top_k, normalize)
    return route


def topk_softmax(top_k: int) -> Router:
    """GPT-OSS: the k largest logits, then a softmax over just those."""

    def route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, ids = torch.topk(logits.float(), top_k, dim=-1)
        return torch.softmax(values, dim=-1), ids

    route.spec = RouterSpec(1, top_k)
    return route


def softmax_topk_scaled(top_k: int, expert_scale: DenseTensor) -> Router:
    """Gemma 4: ``softmax_topk`` normalised to sum to one, each weight then times its expert's
    learned scale (``expert_scale``: [experts], read at call time, as it is loaded later)."""
    normalized = softmax_topk(top_k, normalize=True)

    def route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = normalized(logits)
        return weights * expert_scale.value[ids], ids

    return route


def sigmoid_group_topk(top_k: int, correction_bias: DenseTensor, num_groups: int, groups_used: int,
                       normalize: bool, scale: float) -> Router:
    """DeepSeek-V3 / GLM-4 MoE: sigmoid scores; experts are chosen by score plus a
    correction bias, first among the ``groups_used`` groups whose two best biased
    scores sum highest; the weights are the unbiased scores, optionally normalised,
    times ``scale``. ``correction_bias`` is read at call time (it is loaded later)."""

    def route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(logits.float())
        biased = scores + correction_bias.value
        if num_groups > 1:
            tokens = biased.shape[0]
            grouped = biased.view(tokens, num_groups, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(groups_used, dim=-1).indices, 1.0)
            mask = keep.unsqueeze(-1).expand_as(grouped).reshape(tokens, -1)
            biased = biased.masked_fill(mask == 0, float("-inf"))
        ids = biased.topk(top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * scale, ids

    route.spec = RouterSpec(2, top_k, normalize, num_groups, groups_used, scale)
    return route


def clamped_swiglu(alpha: float, limit: float) -> GLU:
    """GPT-OSS: ``(clamp(up) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``."""

    def glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.float().clamp(max=limit)
        up = up.float().clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return glu


class Expert(nn.Module):
    """One gated MLP; its activation is the layer's (``glu``). Ungated (``gated=False``): no
    ``gate_proj``, and ``glu`` is the activation alone."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, gated: bool = True):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias) if gated else None
        self.up_proj = Linear(hidden_size, intermediate_size, bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias)

    def forward(self, x: torch.Tensor, glu: GLU) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(glu(self.up_proj(x)))
        gate, up = linear_group((self.gate_proj, self.up_proj), x)
        return self.down_proj(glu(gate, up))


class SparseMoE(nn.Module):
    """Router + experts (+ an optional shared expert every token goes through, optionally
    weighted by its own sigmoid gate).

    ``gate`` is the router's linear layer (its HF name);
    ``correction_bias`` is the router's own tensor where it has one (DeepSeek-V3).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, route: Router,
                 activation: str = "silu", glu: GLU | None = None, router_bias: bool = False,
                 expert_bias: bool = False, shared_intermediate_size: int = 0,
                 correction_bias: DenseTensor | None = None, gated: bool = True,
                 shared_expert_gate: bool = False):
        super().__init__()
        known = ACTIVATIONS if gated else UNGATED_ACTIVATIONS
        if glu is None and activation not in known:
            raise ValueError(f"activation {activation!r} is not supported ({', '.join(known)} are)")
        self.num_experts, self.route = num_experts, route
        self.activation, self.gated, self.custom_glu = activation, gated, glu is not None
        if gated:
            self.glu = glu or (lambda gate, up: gated_activation(gate, up, activation))
        else:
            self.glu = UNGATED_ACTIVATIONS[activation]
        self.gate = Linear(hidden_size, num_experts, router_bias)
        self.experts = nn.ModuleList(Expert(hidden_size, intermediate_size, expert_bias, gated)
                                     for _ in range(num_experts))
        shared = GatedMLP if gated else MLP
        self.shared_expert = shared(hidden_size, shared_intermediate_size, activation) if shared_intermediate_size else None
        self.e_score_correction_bias = correction_bias
        # Qwen3-Next / Qwen 3.5: the shared expert's output scaled per token by sigmoid(gate . x)
        self.shared_expert_gate = Linear(hidden_size, 1) if shared_expert_gate else None

    def forward(self, x: torch.Tensor, router_input: torch.Tensor | None = None) -> torch.Tensor:
        """x: [tokens, hidden] -> [tokens, hidden]. ``router_input``: what the router reads when it
        is not the experts' input (Gemma 4 routes from the residual stream, normalised its own way)."""
        if router_input is None:
            out = self._kernel_forward(x)
            if out is not None:
                return out
        weights, ids = self.route(self.gate(x if router_input is None else router_input))
        top_k = ids.shape[1]
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)  # token-expert pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens_of_pair, weight_of_pair = order // top_k, weights.flatten()[order]
        out = torch.zeros(x.shape, dtype=torch.float32)
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            rows = tokens_of_pair[start:start + count]
            y = self.experts[expert](x[rows], self.glu)
            out.index_add_(0, rows, y * weight_of_pair[start:start + count, None])
            start += count
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            out += shared if self.shared_expert_gate is None else torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole layer in one ``moe_decode`` call where it serves (a step our kernels
        multiply: decodes, or a few rows), else None. Same routing and products as ``forward``."""
        plan = _kernel_plans.get(self)
        if plan is None:
            plan = _kernel_plans[self] = _plan_kernel(self) or ()
        if not plan or x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu":
            return None
        products = kernel_products(self.gate, x.shape[0])
        if products is None:
            return None
        return cpu_kernels().moe_decode(x, *plan, *products)


# Each MoE layer's moe_decode arguments after x (weights, types, routing), or () where it cannot serve.
_kernel_plans: weakref.WeakKeyDictionary[SparseMoE, tuple] = weakref.WeakKeyDictionary()


def _stacked(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """Equal-shaped uint8 views evenly spaced in one storage (a GGUF ``*_exps`` tensor's experts,
    ``split_experts``' views) as one [n, rows, row bytes] view; None when they are not."""
    first = weights[0]
    if not all(w.shape == first.shape and w.is_contiguous() and w.dtype == torch.uint8 for w in weights):
        return None
    if any(w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for w in weights):
        return None
    step = weights[1].storage_offset() - first.storage_offset() if len(weights) > 1 else first.numel()
    if step < first.numel() or any(w.storage_offset() != first.storage_offset() + i * step for i, w in enumerate(weights)):
        return None
    return first.as_strided((len(weights), *first.shape), (step, first.shape[1], 1), first.storage_offset())


def _plan_kernel(moe: SparseMoE) -> tuple | None:
    """``moe_decode``'s arguments for this layer, or None where the kernel does not cover it:
    kernels off, a router flavour or activation it does not have, biases, a gated shared expert,
    weights it cannot read or experts not stacked in one tensor."""
    spec = getattr(moe.route, "spec", None)
    ids = ACTIVATION_IDS if moe.gated else {"relu2": RELU2_ID}
    if (cpu_kernels() is None or spec is None or moe.custom_glu or moe.activation not in ids
            or moe.shared_expert_gate is not None or moe.gate.kernel_weight is None or moe.gate.bias is not None):
        return None
    stacks, types = [], []
    for name in ("gate_proj", "up_proj", "down_proj"):
        linears = [getattr(expert, name) for expert in moe.experts]
        if linears[0] is None:
            stacks.append(None)
            types.append(0)
            continue
        if any(linear.kernel_weight is None or linear.bias is not None for linear in linears):
            return None
        if len({linear.kernel_weight[1] for linear in linears}) != 1:
            return None
        stack = _stacked([linear.kernel_weight[0] for linear in linears])
        if stack is None:
            return None
        stacks.append(stack)
        types.append(linears[0].kernel_weight[1])
    shared_weights, shared_types = [], []
    if moe.shared_expert is not None:
        shared = moe.shared_expert
        linears = [shared.gate_proj, shared.up_proj, shared.down_proj] if moe.gated else [shared.up_proj, shared.down_proj]
        if any(linear.kernel_weight is None or linear.bias is not None for linear in linears):
            return None
        shared_weights = [linear.kernel_weight[0] for linear in linears]
        shared_types = [linear.kernel_weight[1] for linear in linears]
    bias = moe.e_score_correction_bias.value if moe.e_score_correction_bias is not None else None
    router, router_type = moe.gate.kernel_weight
    return (router, router_type, spec.kind, spec.top_k, spec.normalize, spec.num_groups, spec.groups_used, spec.scale,
            bias, stacks[0], stacks[1], stacks[2], types, ids[moe.activation], shared_weights, shared_types)


_STACKED = re.compile(r"(.*\.experts)\.(gate_proj|up_proj|down_proj)\.(weight|bias)$")


def split_experts(weights: dict[str, Weight], num_experts: int) -> dict[str, Weight]:
    """Stacked expert tensors (``...experts.gate_proj.weight: [experts, rows, cols]``, as
    GGUF's ``ffn_*_exps`` are) into one entry per expert (``...experts.3.gate_proj.weight``),
    views over the same memory. A stack whose first dimension is not ``num_experts``
    is a ``ModelFormatError`` naming the tensor."""
    out = {}
    for name, weight in weights.items():
        match = _STACKED.match(name)
        if not match:
            out[name] = weight
            continue
        prefix, proj, kind = match.groups()
        shape = tuple(weight.shape)
        expected_dims = 3 if kind == "weight" else 2
        if len(shape) != expected_dims or shape[0] != num_experts:
            label = weight.name if isinstance(weight, GGUFTensor) else name
            raise ModelFormatError(
                f"tensor {label} has shape {list(shape)} but the model declares {num_experts} experts"
            )
        for e in range(num_experts):
            if isinstance(weight, GGUFTensor):
                part = GGUFTensor(weight.name, weight.qtype, shape[1:], weight.data[e], weight.offset)
            else:
                part = weight[e]
            out[f"{prefix}.{e}.{proj}.{kind}"] = part
    return out
