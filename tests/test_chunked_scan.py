"""The recurrent layers' prefill kernels (cholla/kernels/chunked_scan.cpp) against the PyTorch
forms they replace, which the model tests check against transformers: the prompt chunks'
causal convolution (``causal_conv1d``'s PyTorch loop), the chunked gated delta rule
(``delta_rule_chunked`` through ``GatedDeltaNet._prefill``) and the chunked SSD (``ssd_chunked``).
Every case packs several sequences of lengths that cross the kernels' 64-token chunks (and one
shorter than the convolution), continues non-zero states in slots out of order with gaps, and
checks that only those slots change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cholla.kernels import cpu_kernels
from cholla.layers import causal_conv, gated_deltanet
from cholla.layers.attention import AttentionMetadata
from cholla.layers.causal_conv import causal_conv1d
from cholla.layers.mamba2 import ssd_chunked
from tests import tiny_models

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="needs a CPU with AVX512-BF16 and a C++ compiler")

LENGTHS = [70, 2, 130]  # over one chunk, shorter than the conv's window, over two chunks
SLOTS = [5, 1, 3]  # of a 7-slot cache: out of order, with gaps
UNTOUCHED = [0, 2, 4, 6]


def _starts(lengths: list[int]) -> list[int]:
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    return starts


def _meta(lengths: list[int], slots: list[int]) -> AttentionMetadata:
    return AttentionMetadata(slot_mapping=torch.zeros(0), query_start_loc=_starts(lengths), context_lens=[],
                             block_tables=torch.zeros(0), num_prefills=len(lengths), state_slots=torch.tensor(slots))


@pytest.mark.parametrize("channels, kernel, bias, silu, dtype", [
    (1100, 4, False, True, torch.float32),  # Gated DeltaNet's; over one 1024-channel job, a 16-lane tail
    (37, 4, True, True, torch.bfloat16),  # Mamba-2's: a bias; bf16 input
    (70, 3, False, False, torch.float32),  # LFM2's: 3 taps, no activation
])
def test_conv_prefill_matches_pytorch_chunks(monkeypatch, channels, kernel, bias, silu, dtype):
    torch.manual_seed(0)
    tokens = sum(LENGTHS)
    x = torch.randn(tokens, channels + 9)[:, :channels].to(dtype)  # rows with a stride, as a split's are
    weight, b = torch.randn(channels, kernel), (torch.randn(channels) if bias else None)
    state = torch.randn(7, channels, kernel - 1)
    expected_state = state.clone()
    out = causal_conv1d(x, weight, b, state, _meta(LENGTHS, SLOTS), silu)
    monkeypatch.setattr(causal_conv, "cpu_kernels", lambda: None)
    expected = causal_conv1d(x, weight, b, expected_state, _meta(LENGTHS, SLOTS), silu)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(state, expected_state)  # each slot's last inputs, exactly; the others untouched


@pytest.mark.parametrize("k_heads, v_heads, dk, dv, tiled", tiny_models.DELTANET_SHAPES)
def test_chunked_delta_rule_matches_pytorch_form(monkeypatch, k_heads, v_heads, dk, dv, tiled):
    torch.manual_seed(0)
    layer = tiny_models.random_deltanet(k_heads, v_heads, dk, dv, tiled)
    tokens = sum(LENGTHS)
    qkv = F.silu(torch.randn(tokens, 2 * k_heads * dk + v_heads * dv))
    ab = torch.randn(tokens, 2 * v_heads) * 3  # a and b as the projections' split gives them (strided rows)
    a, b = ab[:, :v_heads], ab[:, v_heads:]
    state = torch.randn(7, v_heads, dk, dv) * 0.3
    expected_state = state.clone()
    z = torch.randn(tokens, v_heads * dv + 5)[:, :v_heads * dv]
    out = layer._prefill(qkv, a, b, state, _meta(LENGTHS, SLOTS))
    gated = layer._gated_norm(out, z)
    monkeypatch.setattr(gated_deltanet, "cpu_kernels", lambda: None)
    expected = layer._prefill(qkv, a, b, expected_state, _meta(LENGTHS, SLOTS))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, expected_state, rtol=1e-4, atol=1e-5)
    assert torch.equal(state[UNTOUCHED], expected_state[UNTOUCHED])
    torch.testing.assert_close(gated, layer._gated_norm(expected, z), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("heads, head_dim, groups, state_size, dt_limit, chunk_size", [
    (8, 24, 1, 40, (0.0, float("inf")), 256),  # one group; the reference's chunk larger than the kernel's 64
    (8, 64, 2, 128, (0.01, 0.5), 32),  # groups of 4 heads, Mamba-2's head and state sizes, a dt limit
])
def test_chunked_ssd_matches_pytorch_form(heads, head_dim, groups, state_size, dt_limit, chunk_size):
    torch.manual_seed(0)
    tokens, starts = sum(LENGTHS), _starts(LENGTHS)
    xBC = torch.randn(tokens, heads * head_dim + 2 * groups * state_size)  # the convolved stream, split as the mixer does
    x, B, C = xBC.split([heads * head_dim, groups * state_size, groups * state_size], dim=-1)
    dt = (torch.randn(tokens, heads + 3) - 1)[:, :heads]
    dt_bias, A_log, D = torch.randn(heads), torch.randn(heads), torch.randn(heads)
    state = torch.randn(7, heads, head_dim, state_size)
    expected_state = state.clone()
    y = kernels.ssd_chunked(state, torch.tensor(starts), torch.tensor(SLOTS), x, dt, dt_bias, A_log, B, C, D, *dt_limit)
    for i, n in enumerate(LENGTHS):
        span, slot = slice(starts[i], starts[i + 1]), SLOTS[i]
        x_i = x[span].reshape(n, heads, head_dim)
        step = F.softplus(dt[span] + dt_bias).clamp(*dt_limit)
        y_i, expected_state[slot] = ssd_chunked(x_i, step, -torch.exp(A_log), B[span].reshape(n, groups, state_size),
                                                C[span].reshape(n, groups, state_size), expected_state[slot], chunk_size)
        expected = (y_i + x_i * D[:, None]).reshape(n, -1)
        torch.testing.assert_close(y[span], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, expected_state, rtol=1e-4, atol=1e-4)
    assert torch.equal(state[UNTOUCHED], expected_state[UNTOUCHED])


def test_kernels_refuse_a_slot_twice_or_offsets_that_miss_the_tokens():
    x, state = torch.randn(10, 16), torch.zeros(3, 16, 3)
    weight = torch.randn(16, 4)
    with pytest.raises(RuntimeError, match="given twice"):
        kernels.causal_conv_prefill(x, weight, None, state, torch.tensor([0, 4, 10]), torch.tensor([1, 1]), True)
    with pytest.raises(RuntimeError, match="from 0 to the 10 tokens"):
        kernels.causal_conv_prefill(x, weight, None, state, torch.tensor([0, 4, 9]), torch.tensor([1, 2]), True)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.ssd_chunked(torch.zeros(2, 2, 4, 8), torch.tensor([0, 10]), torch.tensor([2]), torch.randn(10, 8),
                            torch.randn(10, 2), torch.zeros(2), torch.zeros(2), torch.randn(10, 8), torch.randn(10, 8),
                            torch.zeros(2), 0.0, float("inf"))
