"""The Mamba-2 mixer: a selective state-space layer with a fixed-size state per sequence.

Per token, ``in_proj`` gives a gate ``z``, the convolved stream ``xBC`` and one
time step ``dt`` per head. ``xBC`` goes through the short causal convolution
(``causal_conv.py``) and SiLU, then splits into ``x`` (``heads x head_dim``) and
``B``, ``C`` (``groups x state_size``, each group shared by ``heads / groups``
heads). With ``dt = softplus(dt + dt_bias)`` and ``A = -exp(A_log)`` (one scalar
per head), each head's state ``h`` (``head_dim x state_size``) evolves as

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        y_t = h_t C_t + D x_t

and ``y`` goes through a gated RMSNorm per group (one C++ pass where the kernels
run) and ``out_proj``.

Decodes take that recurrence one step, batched over sequences: in C++ on the
state slots in place (``kernels/ssd.cpp``) where the kernels run, else in PyTorch
(``ssd_step``, the kernel's reference: states gathered by slot and scattered
back). A prefill chunk uses the chunked "state space duality" form: within a
chunk of ``chunk_size`` tokens the output is a masked, decay-weighted
attention-like product (``C_l . B_s`` times the decay from ``s`` to ``l``), and
the state is carried between chunks by the recurrence above at chunk
granularity; the chunk starts from, and writes back, the sequence's slot. It
runs in C++ where the kernels run (``kernels/chunked_scan.cpp``: every prompt
chunk of the step in one call, 64-token chunks, one job per sequence and head);
``ssd_chunked`` below is its PyTorch form and reference. All state math is float32.
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
from cholla.layers.mlp import gated_activation
from cholla.layers.norm import RMSNorm
from cholla.models.config import Mamba2Shape


class Conv1d(nn.Module):
    """The depthwise convolution's weights, under HF's names (``conv1d.weight`` [channels, kernel], ``conv1d.bias``)."""

    def __init__(self, channels: int, kernel: int, bias: bool):
        super().__init__()
        self.weight = DenseTensor(channels, kernel)
        self.bias = DenseTensor(channels) if bias else None


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                state: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's scan from ``state``. x: [L, H, P]; dt: [L, H] (after softplus); A: [H];
    B, C: [L, G, N], group g serving heads ``g * H/G ... (g + 1) * H/G - 1``; state: [H, P, N].
    Returns (y [L, H, P] without the D skip, the final state [H, P, N]). float32 throughout.

    B and C stay per group: ``C_l . B_s`` is computed once per group, not per head."""
    length, heads, head_dim = x.shape
    groups, state_size = B.shape[1:]
    per_group = heads // groups
    chunk_size = min(chunk_size, length)  # the result does not depend on it: no padding a short prompt to a chunk
    pad = -length % chunk_size
    # Padded steps have dt = 0: no input and no decay, so they change nothing.
    x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) for t in (x, dt, B, C))
    chunks = x.shape[0] // chunk_size
    x, dt, B, C = (t.reshape(chunks, chunk_size, *t.shape[1:]) for t in (x, dt, B, C))  # [c, Q, ...]
    xdt = (x * dt[..., None]).view(chunks, chunk_size, groups, per_group, head_dim)  # [c, Q, G, R, P]
    cumulative = (dt * A).transpose(1, 2).cumsum(dim=-1)  # [c, H, Q]: log decay from the chunk's start to step l

    # Within each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(decay s -> l) dt_s x_s, the decay being a
    # difference of running sums (as mamba_ssm's kernels take it), masked to s <= l before exp.
    decay = cumulative[..., :, None] - cumulative[..., None, :]  # [c, H, Q(l), Q(s)]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    decay = decay.masked_fill_(~causal, float("-inf")).exp_().view(chunks, groups, per_group, chunk_size, chunk_size)
    scores = decay.mul_(torch.einsum("clgn,csgn->cgls", C, B)[:, :, None])  # [c, G, R, Q, Q]
    y = torch.einsum("cgrls,csgrp->clgrp", scores, xdt)

    # What each chunk adds to the state by its end, then the state entering each chunk.
    to_end = torch.exp(cumulative[:, :, -1:] - cumulative).transpose(1, 2)  # [c, Q, H]
    weighted = xdt * to_end.view(chunks, chunk_size, groups, per_group, 1)
    added = torch.einsum("csgrp,csgn->cgrpn", weighted, B).reshape(chunks, heads, head_dim, state_size)
    chunk_decay = torch.exp(cumulative[:, :, -1])  # [c, H]
    entering = torch.empty(chunks, heads, head_dim, state_size, dtype=x.dtype, device=x.device)
    for c in range(chunks):
        entering[c] = state
        state = state * chunk_decay[c, :, None, None] + added[c]

    # The entering state's part of each output, decayed to step l.
    from_start = torch.exp(cumulative).transpose(1, 2).reshape(chunks, chunk_size, groups, per_group, 1)
    y += torch.einsum("clgn,cgrpn->clgrp", C, entering.view(chunks, groups, per_group, head_dim, state_size)) * from_start
    return y.reshape(chunks * chunk_size, heads, head_dim)[:length], state


def ssd_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             state: torch.Tensor) -> torch.Tensor:
    """One step for a batch of sequences, ``state`` [b, H, P, N] updated in place. x: [b, H, P];
    dt: [b, H]; B, C: [b, G, N]. Returns y [b, H, P] without the D skip."""
    batch, heads, head_dim = x.shape
    groups, state_size = B.shape[1:]
    B, C = (t.repeat_interleave(heads // groups, dim=1).reshape(batch * heads, 1, state_size) for t in (B, C))
    state.mul_(torch.exp(dt * A)[..., None, None])
    flat = state.view(batch * heads, head_dim, state_size)
    flat.baddbmm_((x * dt[..., None]).reshape(batch * heads, head_dim, 1), B)  # += dt x B^T
    return torch.bmm(flat, C.transpose(1, 2)).view(batch, heads, head_dim)


# PyTorch's decode step gathers its sequences' SSM states into this buffer, reused by every layer and step:
# a fresh tensor of that size costs more in page faults than the step's arithmetic.
_gathered: dict[tuple, torch.Tensor] = {}


def _gather_buffer(ssm_state: torch.Tensor, batch: int) -> torch.Tensor:
    # A buffer made under inference mode cannot be written outside it (tests run both ways).
    key = (tuple(ssm_state.shape[1:]), ssm_state.dtype, ssm_state.device, torch.is_inference_mode_enabled())
    buffer = _gathered.get(key)
    if buffer is None or buffer.shape[0] < batch:
        buffer = _gathered[key] = torch.empty(batch, *key[0], dtype=key[1], device=key[2])
    return buffer[:batch]


class Mamba2Mixer(nn.Module):
    """HF's ``Mamba2Mixer`` / ``NemotronHMamba2Mixer`` (same names): in_proj, conv1d, dt_bias,
    A_log, D, norm, out_proj."""

    def __init__(self, shape: Mamba2Shape):
        super().__init__()
        self.shape = shape
        inner, heads = shape.inner_size, shape.num_heads
        self.in_proj = Linear(shape.hidden_size, inner + shape.conv_channels + heads, shape.bias)
        self.conv1d = Conv1d(shape.conv_channels, shape.conv_kernel, shape.conv_bias)
        self.dt_bias = DenseTensor(heads)
        self.A_log = DenseTensor(heads)
        self.D = DenseTensor(heads)
        self.norm = RMSNorm(inner, shape.norm_eps) if shape.gated_norm else None
        self.out_proj = Linear(inner, shape.hidden_size, shape.bias)

    def forward(self, x: torch.Tensor, states: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """x: [tokens, hidden] packed as ``meta`` says; states: (conv [slots, channels, kernel - 1],
        ssm [slots, H, P, N]), updated in place for this step's sequences. -> [tokens, hidden]."""
        s = self.shape
        tokens, heads, groups = x.shape[0], s.num_heads, s.n_groups
        # a prefill's product stays bf16 (the conv reads it as is): no fp32 copy of it
        z, xBC, dt = linear_group((self.in_proj,), x, keep_bf16=True)[0].split([s.inner_size, s.conv_channels, heads], dim=-1)
        dt = dt.float()
        conv_state, ssm_state = states
        conv = self.conv1d
        xBC = causal_conv1d(xBC, conv.weight.value, conv.bias.value if conv.bias is not None else None, conv_state, meta, silu=True)
        hs, B, C = xBC.split([s.inner_size, groups * s.state_size, groups * s.state_size], dim=-1)  # [tokens, ...]

        starts, slots = meta.query_start_loc, meta.state_slots
        first = starts[meta.num_prefills]
        y = self._prefill(hs[:first], dt[:first], B[:first], C[:first], ssm_state, meta) if meta.num_prefills else None
        if first < tokens:
            decodes = self._decode(hs[first:], dt[first:], B[first:], C[first:], ssm_state, slots[meta.num_prefills:])
            y = decodes if y is None else torch.cat((y, decodes))
        return self.out_proj(self._gate(y, z))

    def _prefill(self, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, ssm_state: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """The step's prompt chunks, each continuing from its slot of ``ssm_state`` and leaving its final
        state there: in one kernel call where ours run, else ``ssd_chunked`` per sequence. x: [tokens,
        inner]; dt: [tokens, H] before softplus; B, C: [tokens, G * N]. -> y [tokens, inner], the D skip included."""
        s, starts, slots, kernels = self.shape, meta.query_start_loc, meta.state_slots, cpu_kernels()
        if kernels is not None and ssm_state.device.type == "cpu" and ssm_state.is_contiguous():
            return kernels.ssd_chunked(ssm_state, torch.tensor(starts[: meta.num_prefills + 1]),
                                       slots[: meta.num_prefills].to(torch.long), x, dt, self.dt_bias.value,
                                       self.A_log.value, B, C, self.D.value, *s.dt_limit)
        y = x.new_empty(x.shape[0], s.inner_size)
        for i in range(meta.num_prefills):
            a, b, slot = starts[i], starts[i + 1], int(slots[i])
            x_i = x[a:b].reshape(b - a, s.num_heads, s.head_dim)
            B_i, C_i = (t[a:b].reshape(b - a, s.n_groups, s.state_size) for t in (B, C))
            y_i, ssm_state[slot] = ssd_chunked(x_i, self._dt(dt[a:b]), self._A(), B_i, C_i, ssm_state[slot],
                                               s.chunk_size)
            y[a:b] = (y_i + x_i * self.D.value[:, None]).reshape(b - a, s.inner_size)
        return y

    def decode_layer(self, x: torch.Tensor, norm: RMSNorm, states: tuple[torch.Tensor, torch.Tensor],
                     meta: AttentionMetadata) -> torch.Tensor | None:
        """``x + self(norm(x), states, meta)`` for a decode-only step in one ``mamba2_decode`` call
        (``kernels/hybrid_decode.cpp``: the same products and state steps as ``forward``, on one
        thread team), or None where it does not serve (prompt rows, kernels off, biases, weights
        or a step size our kernels do not multiply)."""
        inputs = one_call_inputs(self, lambda: self._plan_decode(norm), self.in_proj, x, states, meta)
        if inputs is None:
            return None
        (weights, limits), products = inputs
        return cpu_kernels().mamba2_decode(x, *weights, *states, meta.state_slots.to(torch.long), *limits, *products)

    def _plan_decode(self, norm: RMSNorm) -> tuple[tuple, tuple] | None:
        """``mamba2_decode``'s weight arguments (before the states, after the slots), or None where it cannot run."""
        s = self.shape
        if (cpu_kernels() is None or self.in_proj.kernel_weight is None or self.out_proj.kernel_weight is None
                or self.in_proj.bias is not None or self.out_proj.bias is not None or s.conv_kernel > 16):
            return None
        conv = self.conv1d
        weights = (norm.weight, norm.eps, *self.in_proj.kernel_weight, conv.weight.value.contiguous(),
                   conv.bias.value if conv.bias is not None else None, self.dt_bias.value, self.A_log.value,
                   self.D.value, self.norm.weight if self.norm is not None else None, s.n_groups, s.norm_eps,
                   s.norm_before_gate, *self.out_proj.kernel_weight)
        return weights, tuple(s.dt_limit)

    def _A(self) -> torch.Tensor:
        """The per-head decay rate ``-exp(A_log)`` [H], negative."""
        return -torch.exp(self.A_log.value)

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        """The time steps in use: ``softplus(dt + dt_bias)``, clamped to ``dt_limit``."""
        dt = F.softplus(dt + self.dt_bias.value)
        return dt.clamp(*self.shape.dt_limit) if self.shape.dt_limit != (0.0, float("inf")) else dt

    def _decode(self, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, ssm_state: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
        """One step of ``len(slots)`` sequences, their states updated in place. x: [b, inner]; dt: [b, H]
        before softplus; B, C: [b, G * N]. -> y [b, inner], the D skip included.

        The C++ kernel works on the slots where they lie; PyTorch gathers them by slot and scatters them back."""
        s, batch = self.shape, x.shape[0]
        kernels = cpu_kernels()
        if kernels is not None and ssm_state.device.type == "cpu":
            return kernels.ssd_step(ssm_state, slots, x, dt, self.dt_bias.value, self.A_log.value, B, C, self.D.value,
                                    *s.dt_limit)
        x = x.reshape(batch, s.num_heads, s.head_dim)
        B, C = (t.reshape(batch, s.n_groups, s.state_size) for t in (B, C))
        index = slots.to(ssm_state.device)
        gathered = torch.index_select(ssm_state, 0, index, out=_gather_buffer(ssm_state, batch))
        y = ssd_step(x, self._dt(dt), self._A(), B, C, gathered)
        ssm_state.index_copy_(0, index, gathered)
        return (y + x * self.D.value[:, None]).reshape(batch, s.inner_size)

    def _gate(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The output gate ``silu(z)`` and the RMSNorm taken over each group's ``inner / n_groups`` channels.
        y: [tokens, inner] contiguous; z: [tokens, inner] (a view, bf16 from a prefill's product)."""
        s, kernels, z = self.shape, cpu_kernels(), z.float()
        if self.norm is None:
            return gated_activation(z, y, "silu")
        if kernels is not None and y.device.type == "cpu":
            return kernels.gated_rms_norm(y, z, self.norm.weight, s.n_groups, s.norm_eps, s.norm_before_gate)
        if not s.norm_before_gate:
            y = y * F.silu(z)
        grouped = y.reshape(y.shape[0], s.n_groups, -1)
        y = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + s.norm_eps)).reshape(y.shape)
        y = y * self.norm.weight
        return y * F.silu(z) if s.norm_before_gate else y


def sanitize_mixer_weights(weights: dict, module: str = "mixer") -> dict:
    """Checkpoint layouts of the mixers' small tensors (names ``...{module}.*``) -> ours: HF's
    conv weight ``[channels, 1, kernel]``; llama.cpp's ``A = -exp(A_log)`` (GGUF ``ssm_a``,
    renamed ``{module}.A``, ``[heads, 1]``), ``D`` and ``dt_bias`` as ``[heads, 1]``, the norm as
    ``[groups, inner / groups]``."""
    from cholla.layers.linear import dense

    out = {}
    for name, w in weights.items():
        if name.endswith(f"{module}.conv1d.weight") and len(w.shape) == 3:
            w = dense(w, torch.float32).reshape(w.shape[0], w.shape[2])
        elif name.endswith(f"{module}.A"):
            name, w = name + "_log", torch.log(-dense(w, torch.float32).reshape(-1))
        elif name.endswith((f"{module}.D", f"{module}.dt_bias", f"{module}.norm.weight")) and len(w.shape) == 2:
            w = dense(w, torch.float32).reshape(-1)
        out[name] = w
    return out
