"""Gated DeltaNet: the linear-attention layer of Qwen3-Next and Qwen 3.5.

Instead of keeping every past key and value, each value head keeps one matrix
``S: [k_head_dim, v_head_dim]`` that maps keys to values. Per token, with the
key ``k`` and query ``q`` L2-normalised:

    S = exp(g) * S                      # decay, g = A * softplus(a + dt_bias) <= 0
    S = S + k (beta * (v - k S))^T      # delta rule: move k's read-out towards v, beta = sigmoid(b)
    o = q S / sqrt(k_head_dim)

q, k and v first pass a short causal convolution (``causal_conv.py``) and SiLU;
the output is RMS-normalised per head and gated by ``silu(z)`` before
``out_proj``. One sequence's state is the convolution's last ``kernel - 1``
inputs and ``S`` for every value head, float32, in its state-cache slot.

Decodes run the recurrence above for the whole batch at once, in one call of
our kernel (``kernels/state_update.cpp``) where it runs: each sequence's slot
stepped in place, q and k normalised and g and beta formed inside it. A prefill chunk
uses the chunked form: within a chunk of ``CHUNK`` tokens the delta-rule updates
are solved together as one triangular system (the "UT transform"), so the
sequential part is one small matrix product per chunk instead of per token. It
runs in C++ (``kernels/chunked_scan.cpp``: one job per sequence and value head,
the chunk's products in L1/L2) where the kernels run; ``delta_rule_chunked`` is
its PyTorch form and reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cholla.kernels import cpu_kernels
from cholla.layers.attention import AttentionMetadata
from cholla.layers.causal_conv import causal_conv1d
from cholla.layers.layer_decode import one_call_inputs
from cholla.layers.linear import DenseTensor, Linear, linear_group
from cholla.layers.norm import RMSNorm, rms_norm
from cholla.models.config import DeltaNetConfig

CHUNK = 64


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / ||x|| over the last dim, as the FLA kernels (and transformers) compute it."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def delta_rule_chunked(q, k, v, g, beta, state: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence. q, k: [tokens, heads, dk] (normalised, q already scaled); v: [tokens, heads, dv];
    g, beta: [tokens, heads]; state: [heads, dk, dv]. Returns (out [tokens, heads, dv], final state).

    Per chunk with ``G`` the running sum of g from the chunk's start, the tokens' own
    updates are coupled through ``M[i, j] = beta_i k_i.k_j exp(G_i - G_j)`` (j < i); solving
    ``(I + M) U = beta v`` and ``(I + M) W = beta k exp(G)`` gives each token's correction
    ``U - W S`` to write, where S is the state entering the chunk."""
    tokens = q.shape[0]
    pad = -tokens % chunk
    # [heads, chunks, chunk, dim], zero-padded at the end (padding writes nothing: its k and beta are 0)
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(0, 1).unflatten(1, (-1, chunk)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, 0, 0, pad)).transpose(0, 1).unflatten(1, (-1, chunk)) for x in (g, beta))
    G = g.cumsum(dim=-1)
    lower = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # exp(G_i - G_j), j <= i
    k_beta = k * beta[..., None]
    coupling = (k_beta @ k.transpose(-1, -2)) * decay  # its diagonal is ignored (unit triangular)
    corrections = torch.linalg.solve_triangular(coupling, torch.cat((v * beta[..., None], k_beta * G.exp()[..., None]), -1),
                                                upper=False, unitriangular=True)
    U, W = corrections.split((v.shape[-1], k.shape[-1]), dim=-1)
    within = (q @ k.transpose(-1, -2)) * decay  # causal attention inside the chunk
    q_decayed = q * G.exp()[..., None]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]
    chunk_decay = G[..., -1].exp()[..., None, None]
    out = torch.empty_like(v)
    for c in range(q.shape[1]):
        new = U[:, c] - W[:, c] @ state
        out[:, c] = q_decayed[:, c] @ state + within[:, c] @ new
        state = state * chunk_decay[:, c] + k_to_end[:, c].transpose(-1, -2) @ new
    return out.flatten(1, 2)[:, :tokens].transpose(0, 1), state


def delta_rule_step(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """One token of each of a batch of sequences. q, k: [batch, heads, dk]; v: [batch, heads, dv];
    g, beta: [batch, heads]; state: [batch, heads, dk, dv], updated in place. Returns out [batch, heads, dv].

    With ``d = exp(g)`` and ``delta = beta (v - d k S)``, the new state is ``d S + k delta^T`` and
    its read-out ``q S' = d q S + (q.k) delta``: both reads of S happen in one product before the
    update, which then rewrites S in place (the state is the step's largest tensor by far)."""
    decay = g.exp()[..., None]
    reads = torch.stack((q, k), dim=-2) @ state  # [batch, heads, 2, dv]: q S and k S
    delta = beta[..., None] * (v - decay * reads[..., 1, :])
    out = decay * reads[..., 0, :] + (q * k).sum(-1, keepdim=True) * delta
    state.mul_(decay[..., None])
    state.view(-1, *state.shape[2:]).baddbmm_(k.reshape(-1, k.shape[-1], 1), delta.reshape(-1, 1, delta.shape[-1]))
    return out


class _Conv(nn.Module):
    """Holds the depthwise convolution's ``weight: [channels, kernel]`` under HF's name."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = DenseTensor(channels, kernel)


class GatedDeltaNet(nn.Module):
    """x: [tokens, hidden] -> [tokens, hidden], reading and writing each sequence's slot in
    ``state = (conv_state [slots, channels, kernel - 1], recurrent [slots, v_heads, dk, dv])``.
    Weights under Qwen 3.5's names (Qwen3-Next's fused projections are split at load)."""

    def __init__(self, hidden_size: int, config: DeltaNetConfig, eps: float):
        super().__init__()
        self.config = config
        key_dim, value_dim = config.num_k_heads * config.k_head_dim, config.num_v_heads * config.v_head_dim
        self.in_proj_qkv = Linear(hidden_size, 2 * key_dim + value_dim)
        self.in_proj_z = Linear(hidden_size, value_dim)
        self.in_proj_b = Linear(hidden_size, config.num_v_heads)
        self.in_proj_a = Linear(hidden_size, config.num_v_heads)
        self.conv1d = _Conv(config.conv_channels, config.conv_kernel)
        self.A = DenseTensor(config.num_v_heads)  # -exp(A_log): the decay rate, negative
        self.dt_bias = DenseTensor(config.num_v_heads)
        self.norm = RMSNorm(config.v_head_dim, eps)  # plain weight (not 1 + w), shared by all heads
        self.out_proj = Linear(value_dim, hidden_size)
        self._norm_weights: tuple[torch.Tensor, torch.Tensor] | None = None  # (norm.weight, it repeated per head)

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The convolved [tokens, channels] as q, k (normalised, repeated to the value heads) and v."""
        c, tokens = self.config, qkv.shape[0]
        key_dim = c.num_k_heads * c.k_head_dim
        q, k, v = qkv.split((key_dim, key_dim, c.num_v_heads * c.v_head_dim), dim=-1)
        q = l2_normalize(q.reshape(tokens, c.num_k_heads, c.k_head_dim)) * c.k_head_dim**-0.5
        k = l2_normalize(k.reshape(tokens, c.num_k_heads, c.k_head_dim))
        ratio = c.num_v_heads // c.num_k_heads
        if ratio > 1:
            q, k = ((x.repeat(1, ratio, 1) if c.v_heads_tiled else x.repeat_interleave(ratio, dim=1)) for x in (q, k))
        return q, k, v.reshape(tokens, c.num_v_heads, c.v_head_dim)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        conv_state, recurrent = state
        # a prefill's product stays bf16 (the conv reads it as is): no fp32 copy of the widest activation
        qkv, z, b, a = linear_group((self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a), x, keep_bf16=True)
        qkv = causal_conv1d(qkv, self.conv1d.weight.value, None, conv_state, meta, silu=True)
        starts, slots = meta.query_start_loc, meta.state_slots
        if meta.num_prefills == 0:
            out = self._decode(qkv, a, b, recurrent, slots)
        else:
            first = starts[meta.num_prefills]
            out = self._prefill(qkv[:first], a[:first], b[:first], recurrent, meta)
            if first < x.shape[0]:
                out = torch.cat((out, self._decode(qkv[first:], a[first:], b[first:], recurrent, slots[meta.num_prefills:])))
        return self.out_proj(self._gated_norm(out, z))

    def _gated_norm(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Qwen's gated norm: each head's output normalised, then gated by ``silu(z)``; one C++ pass
        where the kernels run. out: [tokens, v_heads, v_head_dim]; z: [tokens, value_dim] -> [tokens, value_dim]."""
        kernels, c = cpu_kernels(), self.config
        if kernels is not None and out.device.type == "cpu":
            z = z if z.dtype == torch.float32 and z.stride(-1) == 1 else z.float().contiguous()
            if self._norm_weights is None or self._norm_weights[0] is not self.norm.weight:  # per head, side by side
                self._norm_weights = (self.norm.weight, self.norm.weight.float().repeat(c.num_v_heads).contiguous())
            return kernels.gated_rms_norm(out.reshape(out.shape[0], -1).contiguous(), z, self._norm_weights[1],
                                          c.num_v_heads, self.norm.eps, True)
        return (rms_norm(out, self.norm.weight, self.norm.eps) * F.silu(z.float().view_as(out))).flatten(1)

    def _prefill(self, qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, recurrent: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """The step's prompt chunks (qkv: [tokens, channels], convolved), each continuing from its slot of
        ``recurrent`` and leaving its final state there: in one kernel call where ours run, else
        ``delta_rule_chunked`` per sequence. -> [tokens, v_heads, v_head_dim]."""
        c, starts, slots, kernels = self.config, meta.query_start_loc, meta.state_slots, cpu_kernels()
        if kernels is not None and qkv.device.type == "cpu" and recurrent.is_contiguous() and max(c.k_head_dim, c.v_head_dim) <= 512:
            return kernels.gated_delta_rule_chunked(qkv, a.float(), b.float(), self.A.value.contiguous(),
                                                    self.dt_bias.value.contiguous(), recurrent,
                                                    torch.tensor(starts[: meta.num_prefills + 1]),
                                                    slots[: meta.num_prefills].to(torch.long), c.num_k_heads, c.v_heads_tiled)
        out = torch.empty(qkv.shape[0], c.num_v_heads, c.v_head_dim)
        q, k, v = self._heads(qkv)
        beta, g = self._beta_g(a, b)
        for s in range(meta.num_prefills):
            span, slot = slice(starts[s], starts[s + 1]), int(slots[s])
            out[span], recurrent[slot] = delta_rule_chunked(q[span], k[span], v[span], g[span], beta[span], recurrent[slot])
        return out

    def decode_layer(self, x: torch.Tensor, norm: RMSNorm, state: tuple[torch.Tensor, torch.Tensor],
                     meta: AttentionMetadata) -> torch.Tensor | None:
        """``x + self(norm(x), state, meta)`` for a decode-only step in one ``deltanet_decode`` call
        (``kernels/hybrid_decode.cpp``: the same products and state steps as ``forward``, on one
        thread team), or None where it does not serve (prompt rows, kernels off, biases, weights
        or a step size our kernels do not multiply)."""
        inputs = one_call_inputs(self, lambda: self._plan_decode(norm), self.in_proj_qkv, x, state, meta)
        if inputs is None:
            return None
        weights, products = inputs
        c = self.config
        return cpu_kernels().deltanet_decode(x, *weights, *state, meta.state_slots.to(torch.long),
                                             c.num_k_heads, c.v_heads_tiled, *products)

    def _plan_decode(self, norm: RMSNorm) -> tuple | None:
        """``deltanet_decode``'s weight arguments (between x and the states), or None where it cannot run."""
        projections = (self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a, self.out_proj)
        if (cpu_kernels() is None or self.config.conv_kernel > 16 or self.config.k_head_dim > 1024
                or any(p.kernel_weight is None or p.bias is not None for p in projections)):
            return None
        return (norm.weight, norm.eps, [p.kernel_weight[0] for p in projections[:4]],
                [p.kernel_weight[1] for p in projections[:4]], self.conv1d.weight.value.contiguous(),
                self.A.value.contiguous(), self.dt_bias.value.contiguous(), self.norm.weight, self.norm.eps,
                *self.out_proj.kernel_weight)

    def _beta_g(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """beta = sigmoid(b) and the log decay g = A softplus(a + dt_bias), [tokens, v_heads]."""
        return torch.sigmoid(b.float()), self.A.value * F.softplus(a.float() + self.dt_bias.value)

    def _decode(self, qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, recurrent: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
        """One token per sequence (qkv: [batch, channels], convolved), each stepping its slot of
        ``recurrent`` in place: in one kernel call where ours run. -> [batch, v_heads, v_head_dim]."""
        kernels = cpu_kernels()
        if kernels is not None and qkv.device.type == "cpu" and recurrent.is_contiguous() and self.config.k_head_dim <= 1024:
            c = self.config
            return kernels.gated_delta_rule_step(qkv, a.float(), b.float(), self.A.value.contiguous(),
                                                 self.dt_bias.value.contiguous(), recurrent,
                                                 slots.to(torch.long), c.num_k_heads, c.v_heads_tiled)
        q, k, v = self._heads(qkv)
        beta, g = self._beta_g(a, b)
        low = int(slots[0])
        run = bool((slots == torch.arange(low, low + len(slots))).all())  # consecutive slots (one decode always)
        batch_state = recurrent[low:low + len(slots)] if run else recurrent[slots]  # a view, or a gathered copy
        out = delta_rule_step(q, k, v, g, beta, batch_state)
        if not run:
            recurrent[slots] = batch_state
        return out
