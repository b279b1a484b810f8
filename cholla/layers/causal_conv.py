"""The short causal convolution every recurrent layer starts with (Mamba-2, Gated DeltaNet, LFM2).

Each channel is convolved with its own ``kernel``-tap filter over the current
and previous ``kernel - 1`` inputs. Across steps the only thing to remember is
those last ``kernel - 1`` inputs: the conv state, ``[channels, kernel - 1]`` per
sequence in the state cache (oldest first). A prefill chunk convolves the state
followed by its tokens; a batch of decodes does one multiply-add per channel,
in our kernels (``kernels/chunked_scan.cpp`` for prompt chunks,
``kernels/state_update.cpp`` for decodes) where they run, on each sequence's
slot in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cholla.kernels import cpu_kernels
from cholla.layers.attention import AttentionMetadata


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor,
                  meta: AttentionMetadata, silu: bool = False) -> torch.Tensor:
    """x: [tokens, channels] packed as ``meta`` says; weight: [channels, kernel]; conv_state:
    [slots, channels, kernel - 1] float32, updated in place for every sequence of the step.
    Returns [tokens, channels] in float32, through SiLU when ``silu`` (Mamba-2's and Gated
    DeltaNet's convolutions; LFM2 gates its own)."""
    weight = weight.float()
    bias = bias.float() if bias is not None else None
    starts, slots = meta.query_start_loc, meta.state_slots
    if meta.num_prefills == 0:
        return conv_step(x, weight, bias, conv_state, slots, silu)
    first, width = starts[meta.num_prefills], weight.shape[1] - 1
    kernels = cpu_kernels()
    if kernels is not None and x.device.type == "cpu" and conv_state.is_contiguous() and weight.shape[1] <= 16:
        if x.dtype not in (torch.float32, torch.bfloat16) or x.stride(-1) != 1:
            x = x.float().contiguous()
        out = kernels.causal_conv_prefill(x[:first], weight.contiguous(), bias.contiguous() if bias is not None else None,
                                          conv_state, torch.tensor(starts[: meta.num_prefills + 1]),
                                          slots[: meta.num_prefills].to(torch.long), silu)
        if first == x.shape[0]:
            return out
        decodes = conv_step(x[first:], weight, bias, conv_state, slots[meta.num_prefills :], silu)
        return torch.cat((out, decodes))
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for s in range(meta.num_prefills):
        start, end, slot = starts[s], starts[s + 1], int(slots[s])
        window = torch.cat((conv_state[slot], x[start:end].float().T), dim=1)  # [channels, width + n]
        out[start:end] = F.conv1d(window[None], weight[:, None, :], bias, groups=weight.shape[0])[0].T
        conv_state[slot] = window[:, window.shape[1] - width :]
    if silu:
        F.silu(out[:first], inplace=True)
    if first < x.shape[0]:
        out[first:] = conv_step(x[first:], weight, bias, conv_state, slots[meta.num_prefills :], silu)
    return out


def conv_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor,
              slots: torch.Tensor, silu: bool) -> torch.Tensor:
    """One new input per sequence: x [batch, channels], ``slots`` [batch] its sequences' slots of
    ``conv_state``, each shifted on by one input in place. -> float32 [batch, channels]."""
    kernels = cpu_kernels()
    if kernels is not None and x.device.type == "cpu" and conv_state.is_contiguous() and weight.shape[1] <= 16:
        if x.dtype not in (torch.float32, torch.bfloat16) or x.stride(-1) != 1:
            x = x.float().contiguous()
        return kernels.causal_conv_step(x, weight.contiguous(), bias.contiguous() if bias is not None else None,
                                        conv_state, slots.to(torch.long), silu)
    return conv_step_ops(x, weight, bias, conv_state, slots, silu)


def conv_step_ops(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor,
                  slots: torch.Tensor, silu: bool) -> torch.Tensor:
    """``conv_step`` in PyTorch ops (the slots gathered, then written back): the fallback, and the kernel's reference."""
    window = torch.cat((conv_state[slots], x.float()[:, :, None]), dim=2)  # [batch, channels, kernel]
    out = (window * weight).sum(dim=2)
    if bias is not None:
        out += bias
    conv_state[slots] = window[:, :, 1:]
    return F.silu(out) if silu else out
