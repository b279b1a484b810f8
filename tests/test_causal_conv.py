"""The shared short causal convolution, chunked and decoded step by step, against one
``torch.nn.functional.conv1d`` over each whole sequence: decode steps on our kernel where it
runs, and on the PyTorch step."""

import pytest
import torch
import torch.nn.functional as F

from cholla.layers import causal_conv
from cholla.layers.attention import AttentionMetadata
from cholla.layers.causal_conv import causal_conv1d


def _meta(lengths: list[int], num_prefills: int, slots: list[int]) -> AttentionMetadata:
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    return AttentionMetadata(slot_mapping=torch.zeros(0), query_start_loc=starts, context_lens=[], block_tables=torch.zeros(0),
                             num_prefills=num_prefills, state_slots=torch.tensor(slots))


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("kernels", [True, False])
def test_chunks_and_decodes_match_whole_convolution(monkeypatch, kernels, silu):
    if not kernels:
        monkeypatch.setattr(causal_conv, "cpu_kernels", lambda: None)
    torch.manual_seed(0)
    channels, kernel = 6, 4
    weight, bias = torch.randn(channels, kernel), torch.randn(channels)
    seqs = [torch.randn(13, channels), torch.randn(9, channels)]
    expected = [F.conv1d(F.pad(s.T, (kernel - 1, 0))[None], weight[:, None], bias, groups=channels)[0].T for s in seqs]
    expected = [F.silu(e) for e in expected] if silu else expected
    state = torch.zeros(3, channels, kernel - 1)
    slots = [2, 0]  # sequence i lives in slot slots[i]
    got = [[], []]
    # Step 1: both prefill a first chunk (5 and 2 tokens: shorter than the kernel).
    # Step 2: sequence 0 prefills 6 more, sequence 1 prefills 3 more.
    # Step 3: sequence 0 prefills 1 more while sequence 1 decodes one token (a mixed step).
    # Then both decode one token a step together.
    cuts = [(5, 2, 2), (6, 3, 2), (1, 1, 1)]
    at = [0, 0]
    for a, b, num_prefills in cuts:
        x = torch.cat((seqs[0][at[0]:at[0] + a], seqs[1][at[1]:at[1] + b]))
        out = causal_conv1d(x, weight, bias, state, _meta([a, b], num_prefills, slots), silu)
        got[0].append(out[:a]), got[1].append(out[a:])
        at = [at[0] + a, at[1] + b]
    while at[0] < 13 or at[1] < 9:
        live = [i for i in (0, 1) if at[i] < len(seqs[i])]
        x = torch.stack([seqs[i][at[i]] for i in live])
        out = causal_conv1d(x, weight, bias, state, _meta([1] * len(live), 0, [slots[i] for i in live]), silu)
        for row, i in enumerate(live):
            got[i].append(out[row:row + 1])
            at[i] += 1
    for i in (0, 1):
        torch.testing.assert_close(torch.cat(got[i]), expected[i], rtol=1e-5, atol=1e-5)
    assert state[1].abs().sum() == 0  # a slot nobody owns is never written
