"""The Mamba-2 mixer: a selective state-space layer with a fixed-size state per sequence.

Per token, ``in_proj`` gives a gate ``z``, the convolved stream ``xBC`` and one
time step ``dt`` per head. ``xBC`` goes through the short causal convolution
(``causal_conv.py``) and SiLU, then splits into ``x`` (``heads x head_dim``) and
``B``, ``C`` (``groups x state_size``, each group shared by ``heads / groups``
heads). With ``dt = softplus(dt + dt_bias)`` and ``A = -exp(A_log)`` (one scalar
per head), each head's state ``h`` (``head_dim x state_size``) evolves as

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        y_t = h_t C_t + D x_t

and ``y`` goes through a gated RMSNorm per group and ``out_proj``.

Decodes take that recurrence one step, batched over sequences (states gathered by
slot and scattered back). A prefill chunk uses the chunked "state space duality"
form: within a chunk of ``chunk_size`` tokens the output is a masked,
decay-weighted attention-like product (``C_l . B_s`` times the decay from ``s``
to ``l``), and the state is carried between chunks by the recurrence above at
chunk granularity; the chunk starts from, and writes back, the sequence's slot.
All state math is float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cholla.layers.attention import AttentionMetadata
from cholla.layers.causal_conv import causal_conv1d
from cholla.layers.linear import DenseTensor, Linear
from cholla.layers.norm import RMSNorm
from cholla.models.config import Mamba2Shape


class Conv1d(nn.Module):
    """The depthwise convolution's weights, under HF's names (``conv1d.weight`` [channels, kernel], ``conv1d.bias``)."""

    def __init__(self, channels: int, kernel: int, bias: bool):
        super().__init__()
        self.weight = DenseTensor(channels, kernel)
        self.bias = DenseTensor(channels) if bias else None


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """a: [..., Q] per-step log decays -> [..., Q, Q] with ``[l, s] = a[s+1] + ... + a[l]`` for
    ``l >= s`` and -inf above the diagonal: the log decay from step s to step l. Summed per
    pair (a masked cumulative sum), not as a difference of running sums, to stay exact."""
    q = a.shape[-1]
    strict = torch.ones(q, q, dtype=torch.bool, device=a.device).tril(-1)
    sums = a[..., :, None].expand(*a.shape, q).masked_fill(~strict, 0.0).cumsum(dim=-2)
    return sums.masked_fill(~strict.logical_or(torch.eye(q, dtype=torch.bool, device=a.device)), float("-inf"))


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                state: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's scan from ``state``. x: [L, H, P]; dt: [L, H] (after softplus); A: [H];
    B, C: [L, H, N] (already expanded from groups to heads); state: [H, P, N].
    Returns (y [L, H, P] without the D skip, the final state [H, P, N]). float32 throughout."""
    length = x.shape[0]
    pad = -length % chunk_size
    # Padded steps have dt = 0: no input and no decay, so they change nothing.
    x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) for t in (x, dt, B, C))
    chunks = x.shape[0] // chunk_size
    x, dt, B, C = (t.reshape(chunks, chunk_size, *t.shape[1:]) for t in (x, dt, B, C))  # [c, Q, ...]
    xdt = x * dt[..., None]  # [c, Q, H, P]
    log_decay = (dt * A).transpose(1, 2)  # [c, H, Q]
    cumulative = log_decay.cumsum(dim=-1)  # [c, H, Q]: log decay from the chunk's start to step l

    # Within each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(decay s -> l) dt_s x_s.
    scores = torch.einsum("clhn,cshn->chls", C, B) * torch.exp(segment_sum(log_decay))
    y = torch.einsum("chls,cshp->clhp", scores, xdt)

    # What each chunk adds to the state by its end, then the state entering each chunk.
    to_end = torch.exp(cumulative[:, :, -1:] - cumulative)  # [c, H, Q]
    added = torch.einsum("chs,cshn,cshp->chpn", to_end, B, xdt)  # [c, H, P, N]
    chunk_decay = torch.exp(cumulative[:, :, -1])  # [c, H]
    entering = []
    for c in range(chunks):
        entering.append(state)
        state = state * chunk_decay[c, :, None, None] + added[c]
    entering = torch.stack(entering)  # [c, H, P, N]

    # The entering state's part of each output, decayed to step l.
    y = y + torch.einsum("clhn,chpn->clhp", C, entering) * torch.exp(cumulative).transpose(1, 2)[..., None]
    return y.reshape(chunks * chunk_size, *y.shape[2:])[:length], state


def ssd_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step for a batch of sequences. x: [b, H, P]; dt: [b, H]; B, C: [b, H, N];
    state: [b, H, P, N]. Returns (y [b, H, P] without the D skip, the new state)."""
    decay = torch.exp(dt * A)[..., None, None]
    state = state * decay + (x * dt[..., None])[..., None] * B[:, :, None, :]
    return torch.einsum("bhpn,bhn->bhp", state, C), state


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
        z, xBC, dt = self.in_proj(x).float().split([s.inner_size, s.conv_channels, heads], dim=-1)
        conv_state, ssm_state = states
        conv = self.conv1d
        xBC = F.silu(causal_conv1d(xBC, conv.weight.value, conv.bias.value if conv.bias is not None else None, conv_state, meta))
        hs, B, C = xBC.split([s.inner_size, groups * s.state_size, groups * s.state_size], dim=-1)
        hs = hs.reshape(tokens, heads, s.head_dim)
        B = B.reshape(tokens, groups, s.state_size).repeat_interleave(heads // groups, dim=1)
        C = C.reshape(tokens, groups, s.state_size).repeat_interleave(heads // groups, dim=1)
        dt = F.softplus(dt + self.dt_bias.value)
        if s.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(*s.dt_limit)
        A = -torch.exp(self.A_log.value)

        y = torch.empty_like(hs)
        starts, slots = meta.query_start_loc, meta.state_slots
        for i in range(meta.num_prefills):
            a, b, slot = starts[i], starts[i + 1], int(slots[i])
            y[a:b], ssm_state[slot] = ssd_chunked(hs[a:b], dt[a:b], A, B[a:b], C[a:b], ssm_state[slot], s.chunk_size)
        first = starts[meta.num_prefills]
        if first < tokens:
            index = slots[meta.num_prefills:]
            y[first:], ssm_state[index] = ssd_step(hs[first:], dt[first:], A, B[first:], C[first:], ssm_state[index])
        y = (y + hs * self.D.value[:, None]).reshape(tokens, s.inner_size)
        return self.out_proj(self._gate(y, z))

    def _gate(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The output gate ``silu(z)`` and the RMSNorm taken over each group's ``inner / n_groups`` channels."""
        s = self.shape
        if self.norm is None:
            return y * F.silu(z)
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
