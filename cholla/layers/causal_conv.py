"""The short causal convolution every recurrent layer starts with (Mamba-2, Gated DeltaNet, LFM2).

Each channel is convolved with its own ``kernel``-tap filter over the current
and previous ``kernel - 1`` inputs. Across steps the only thing to remember is
those last ``kernel - 1`` inputs: the conv state, ``[channels, kernel - 1]`` per
sequence in the state cache (oldest first). A prefill chunk convolves the state
followed by its tokens; a batch of decodes does one multiply-add per channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cholla.layers.attention import AttentionMetadata


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor,
                  meta: AttentionMetadata) -> torch.Tensor:
    """x: [tokens, channels] packed as ``meta`` says; weight: [channels, kernel]; conv_state:
    [slots, channels, kernel - 1] float32, updated in place for every sequence of the step.
    Returns [tokens, channels] in float32 (no activation: callers apply their own)."""
    x = x.float()
    weight = weight.float()
    bias = bias.float() if bias is not None else None
    width = weight.shape[1] - 1
    out = torch.empty_like(x)
    starts, slots = meta.query_start_loc, meta.state_slots
    for s in range(meta.num_prefills):
        start, end, slot = starts[s], starts[s + 1], int(slots[s])
        window = torch.cat((conv_state[slot], x[start:end].T), dim=1)  # [channels, width + n]
        out[start:end] = F.conv1d(window[None], weight[:, None, :], bias, groups=weight.shape[0])[0].T
        conv_state[slot] = window[:, window.shape[1] - width :]
    first = starts[meta.num_prefills]
    if first < x.shape[0]:
        index = slots[meta.num_prefills :]
        window = torch.cat((conv_state[index], x[first:, :, None]), dim=2)  # [decodes, channels, kernel]
        result = (window * weight).sum(dim=2)
        out[first:] = result + bias if bias is not None else result
        conv_state[index] = window[:, :, 1:]
    return out
