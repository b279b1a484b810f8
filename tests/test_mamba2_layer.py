"""The Mamba-2 mixer (``cholla/layers/mamba2.py``) against transformers' ``Mamba2Mixer``
on the whole sequence: two sequences in their own state slots, prefilled in chunks
that cross the SSD's chunk boundaries, then decoded one token a step together (with
the C++ decode step and with PyTorch's); and the C++ step (``kernels/ssd.cpp``)
against PyTorch's ``ssd_step`` in float64, and the C++ gated RMSNorm against PyTorch's."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cholla.kernels import cpu_kernels  # noqa: E402
from cholla.layers import mamba2  # noqa: E402
from cholla.layers.attention import AttentionMetadata  # noqa: E402
from cholla.layers.mamba2 import Mamba2Mixer, Mamba2Shape, sanitize_mixer_weights, ssd_step  # noqa: E402
from cholla.models.loading import load_named_weights  # noqa: E402


def _meta(lengths: list[int], num_prefills: int, slots: list[int]) -> AttentionMetadata:
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    return AttentionMetadata(slot_mapping=torch.zeros(0), query_start_loc=starts, context_lens=[],
                             block_tables=torch.zeros(0), num_prefills=num_prefills, state_slots=torch.tensor(slots))


def _pair(n_groups: int, chunk_size: int):
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMixer

    config = transformers.Mamba2Config(hidden_size=32, num_heads=8, head_dim=8, state_size=6, n_groups=n_groups,
                                       expand=2, conv_kernel=4, chunk_size=chunk_size, layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    ref = HFMixer(config, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "proj" in name or "conv" in name else 0.5))
        ref.dt_bias.uniform_(-2.0, 0.5)  # decays from mild to strong
    shape = Mamba2Shape(hidden_size=32, num_heads=8, head_dim=8, state_size=6, n_groups=n_groups, conv_kernel=4,
                        chunk_size=chunk_size, norm_eps=1e-5)
    ours = Mamba2Mixer(shape)
    weights = sanitize_mixer_weights({f"mixer.{k}": v.detach().clone() for k, v in ref.state_dict().items()})
    assert not load_named_weights(ours, {k.removeprefix("mixer."): v for k, v in weights.items()})
    return ref, ours, shape


needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="needs a CPU with AVX512-BF16 and a C++ compiler")


@pytest.mark.parametrize("kernels", [pytest.param(True, marks=needs_kernels), False], ids=["cpp", "pytorch"])
@pytest.mark.parametrize("n_groups, chunk_size", [(1, 8), (2, 5)])
def test_chunked_prefill_and_batched_decode_match_transformers(n_groups, chunk_size, kernels, monkeypatch):
    if not kernels:
        monkeypatch.setattr(mamba2, "cpu_kernels", lambda: None)
    ref, ours, shape = _pair(n_groups, chunk_size)
    torch.manual_seed(1)
    seqs = [torch.randn(30, 32), torch.randn(21, 32)]
    with torch.no_grad():
        expected = [ref(s[None])[0] for s in seqs]
    conv = torch.zeros(3, *shape.state_shapes[0])
    ssm = torch.zeros(3, *shape.state_shapes[1])
    slots, got, at = [2, 0], [[], []], [0, 0]
    # Both prefill a chunk; then sequence 0 prefills on while sequence 1 decodes in the same step;
    # then both prefill again, each chunk continuing from its slot's state.
    for a, b, num_prefills in [(13, 3, 2), (9, 1, 1), (8, 12, 2)]:
        x = torch.cat((seqs[0][at[0]:at[0] + a], seqs[1][at[1]:at[1] + b]))
        out = ours(x, (conv, ssm), _meta([a, b], num_prefills, slots))
        got[0].append(out[:a]), got[1].append(out[a:])
        at = [at[0] + a, at[1] + b]
    while at[0] < 30 or at[1] < 21:
        live = [i for i in (0, 1) if at[i] < len(seqs[i])]
        x = torch.stack([seqs[i][at[i]] for i in live])
        out = ours(x, (conv, ssm), _meta([1] * len(live), 0, [slots[i] for i in live]))
        for row, i in enumerate(live):
            got[i].append(out[row:row + 1])
            at[i] += 1
    for i in (0, 1):
        torch.testing.assert_close(torch.cat(got[i]), expected[i], rtol=1e-4, atol=1e-4)
    assert conv[1].abs().sum() == 0 and ssm[1].abs().sum() == 0  # a slot nobody owns is never written


def test_gguf_layouts_of_the_small_tensors():
    """llama.cpp stores ``A = -exp(A_log)`` and ``D`` as [heads, 1], the norm per group: read back as HF's."""
    A_log, D, norm = torch.randn(4), torch.randn(4), torch.randn(8)
    out = sanitize_mixer_weights({"l.mixer.A": -torch.exp(A_log)[:, None], "l.mixer.D": D[:, None],
                                  "l.mixer.norm.weight": norm.view(2, 4)})
    torch.testing.assert_close(out["l.mixer.A_log"], A_log)
    torch.testing.assert_close(out["l.mixer.D"], D)
    torch.testing.assert_close(out["l.mixer.norm.weight"], norm)


@needs_kernels
@pytest.mark.parametrize("heads, head_dim, state_size, groups, dt_limit", [
    (8, 8, 24, 2, (0.0, float("inf"))),  # a state row of 16 + a masked 8
    (6, 64, 128, 3, (0.05, 0.4)),  # Mamba-2's row length, Falcon-H1-style clamp
])
def test_cpp_ssd_step_matches_pytorch_on_its_slots(heads, head_dim, state_size, groups, dt_limit):
    """Three sequences in slots 4, 1, 2 of 6 (not consecutive, not in order): their states advance
    as PyTorch's ``ssd_step`` takes them (in float64), y includes the D skip, and no other slot changes."""
    torch.manual_seed(0)
    batch, slots = 3, torch.tensor([4, 1, 2])
    state = torch.randn(6, heads, head_dim, state_size)
    # x, dt, B, C as the mixer hands them over: column slices of one wider row (row stride != width).
    packed = torch.randn(batch, heads * head_dim + heads + 2 * groups * state_size + 5)
    x, dt, B, C, _ = packed.split([heads * head_dim, heads, groups * state_size, groups * state_size, 5], dim=-1)
    dt_bias, A_log, D = torch.randn(heads), torch.randn(heads), torch.randn(heads)
    dt_bias[0] = 30.0  # softplus's linear branch

    expected_state = state.double().clone()
    step = torch.nn.functional.softplus(dt.double() + dt_bias.double()).clamp(*dt_limit)
    x3 = x.double().reshape(batch, heads, head_dim)
    gathered = expected_state[slots]  # a copy, which ssd_step updates in place
    B3, C3 = (t.double().reshape(batch, groups, -1) for t in (B, C))
    y_ref = ssd_step(x3, step, -A_log.double().exp(), B3, C3, gathered)
    expected_state[slots] = gathered
    y_ref = (y_ref + x3 * D.double()[:, None]).reshape(batch, -1)

    y = cpu_kernels().ssd_step(state, slots, x, dt, dt_bias, A_log, B, C, D, *dt_limit)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.double(), expected_state, rtol=1e-5, atol=1e-5)  # slots 0, 3, 5 included


@needs_kernels
def test_cpp_ssd_step_refuses_a_slot_twice_or_outside_the_cache():
    state, x, dt = torch.zeros(4, 2, 4, 16), torch.zeros(2, 8), torch.zeros(2, 2)
    B = C = torch.zeros(2, 16)
    small = torch.zeros(2)
    for slots in ([1, 1], [0, 4]):
        with pytest.raises(RuntimeError, match="out of range .* or given twice"):
            cpu_kernels().ssd_step(state, torch.tensor(slots), x, dt, small, small, B, C, small, 0.0, float("inf"))


@needs_kernels
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_cpp_gated_rms_norm_matches_pytorch(groups, norm_before_gate, monkeypatch):
    """Groups of 40 channels (16 + 16 + a masked 8), z a view into a wider row as in the mixer."""
    shape = Mamba2Shape(hidden_size=32, num_heads=15, head_dim=8, state_size=4, n_groups=groups,
                        norm_before_gate=norm_before_gate)
    mixer = Mamba2Mixer(shape)
    torch.manual_seed(0)
    mixer.norm.weight = torch.randn(120)
    y, z = torch.randn(5, 120) * 3, torch.randn(5, 130)[:, 10:]
    got = mixer._gate(y, z)
    monkeypatch.setattr(mamba2, "cpu_kernels", lambda: None)
    torch.testing.assert_close(got, mixer._gate(y, z), rtol=1e-5, atol=1e-5)
