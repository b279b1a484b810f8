"""The recurrent layers' decode kernels (cholla/kernels/state_update.cpp) against the PyTorch
steps they replace (``conv_step_ops``; the delta rule through ``GatedDeltaNet``'s own PyTorch
path, ``delta_rule_step``), on random inputs and states in slots that are neither the batch's
order nor contiguous: only the batch's slots change, each as the reference changes it. Then
whole tiny models decoding on the kernels: each decode step's logits against transformers'."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cholla.kernels import cpu_kernels
from cholla.layers import gated_deltanet
from cholla.layers.causal_conv import conv_step_ops
from cholla.models.loader import load_model
from tests import tiny_models
from tests.test_models_deltanet import _Sequences

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="needs a CPU with AVX512-BF16 and a C++ compiler")

SLOTS = [5, 1, 3]  # the batch's slots of a 7-slot cache: out of order, with gaps


@pytest.mark.parametrize("channels, kernel, bias, silu, dtype", [
    (200, 4, False, True, torch.float32),  # Gated DeltaNet's: SiLU, no bias (200: a 16-lane tail)
    (37, 4, True, True, torch.bfloat16),  # Mamba-2's: a bias; bf16 input
    (70, 3, False, False, torch.float32),  # LFM2's: 3 taps, no activation
])
def test_conv_step_matches_ops_in_place(channels, kernel, bias, silu, dtype):
    torch.manual_seed(0)
    state = torch.randn(7, channels, kernel - 1)
    weight, b = torch.randn(channels, kernel), (torch.randn(channels) if bias else None)
    x = torch.randn(len(SLOTS), 2 * channels)[:, :channels].to(dtype)  # rows with a stride, as a split's are
    slots = torch.tensor(SLOTS)
    expected_state = state.clone()
    expected = conv_step_ops(x, weight, b, expected_state, slots, silu)
    out = kernels.causal_conv_step(x, weight, b, state, slots, silu)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(state, expected_state)  # the shifted inputs exactly, every other slot untouched


@pytest.mark.parametrize("k_heads, v_heads, dk, dv, tiled", tiny_models.DELTANET_SHAPES)
def test_delta_rule_step_matches_layer_ops_in_place(monkeypatch, k_heads, v_heads, dk, dv, tiled):
    torch.manual_seed(0)
    layer = tiny_models.random_deltanet(k_heads, v_heads, dk, dv, tiled)
    qkv = F.silu(torch.randn(len(SLOTS), 2 * k_heads * dk + v_heads * dv))
    ab = torch.randn(len(SLOTS), 2 * v_heads) * 3  # a and b as the projections' split gives them
    a, b = ab[:, :v_heads], ab[:, v_heads:]
    state = torch.randn(7, v_heads, dk, dv) * 0.3
    slots, expected_state = torch.tensor(SLOTS), state.clone()
    out = layer._decode(qkv, a, b, state, slots)
    monkeypatch.setattr(gated_deltanet, "cpu_kernels", lambda: None)
    expected = layer._decode(qkv, a, b, expected_state, slots)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-6)
    untouched = [s for s in range(7) if s not in SLOTS]
    assert torch.equal(state[untouched], expected_state[untouched])


def test_steps_chain_over_many_tokens(monkeypatch):
    """64 decode steps in a row stay with the PyTorch path (errors do not grow with the state's age)."""
    torch.manual_seed(1)
    layer = tiny_models.random_deltanet(2, 4, 64, 64, False)
    state = torch.zeros(4, 4, 64, 64)
    reference = state.clone()
    slots = torch.tensor([2, 0])
    inputs = [(F.silu(torch.randn(2, 2 * 2 * 64 + 4 * 64)), torch.randn(2, 4), torch.randn(2, 4)) for _ in range(64)]
    outs = [layer._decode(qkv, a, b, state, slots) for qkv, a, b in inputs]
    monkeypatch.setattr(gated_deltanet, "cpu_kernels", lambda: None)
    expected = [layer._decode(qkv, a, b, reference, slots) for qkv, a, b in inputs]
    torch.testing.assert_close(torch.stack(outs), torch.stack(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, reference, rtol=1e-5, atol=1e-5)


def test_bad_slots_are_refused():
    state = torch.zeros(2, 8, 3)
    with pytest.raises(RuntimeError, match="slot 2 is outside"):
        kernels.causal_conv_step(torch.zeros(1, 8), torch.zeros(8, 4), None, state, torch.tensor([2]), False)
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        kernels.gated_delta_rule_step(torch.zeros(1, 48), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(2),
                                      torch.zeros(2), torch.zeros(2, 2, 8, 8).transpose(2, 3), torch.tensor([0]), 2, False)


@pytest.mark.parametrize("name", ["qwen3_5", "lfm2", "mamba2"])  # the delta rule; the conv without and with SiLU and bias
def test_decode_logits_match_transformers(tiny, name):
    """Two sequences prefill, then decode 8 tokens in batched steps (their slots out of order):
    every decode step's logits within 1e-4 of transformers' over the same tokens."""
    entry = tiny(name)
    model = load_model(entry["folder"], "float32").model
    prompts = [[(i * 37 + 11) % tiny_models.VOCAB for i in range(12)], [(i * 53 + 5) % tiny_models.VOCAB for i in range(7)]]
    run = _Sequences(model, 2, 12 + 8)
    logits = run.step([(0, prompts[0]), (1, prompts[1])], num_prefills=2)
    last, decoded = [logits[11], logits[-1]], [[], []]
    for _ in range(8):
        tokens = [int(row.argmax()) for row in last]
        for seq in (0, 1):
            decoded[seq].append((tokens[seq], last[seq]))
        last = list(run.step([(0, tokens[:1]), (1, tokens[1:])], num_prefills=0))
    for seq in (0, 1):
        ids = prompts[seq] + [token for token, _ in decoded[seq]]
        reference = tiny_models.reference_logits(entry["model"], ids)[len(prompts[seq]) - 1 : -1]
        tiny_models.assert_close(torch.stack([row for _, row in decoded[seq]]), reference)
