"""The Gated DeltaNet core (the delta rule, without its projections) against transformers' own
PyTorch forms of it, at a real model's head shapes (default Qwen3.5's 16 x 128 x 128 per layer).

Reported per layer, mean ± sd over ``-r`` repetitions (ms):

- prefill: one ``-p``-token sequence through the chunked form (ours: ``delta_rule_chunked``;
  transformers: ``torch_chunk_gated_delta_rule``), both from a zero state, chunk 64;
- decode: one token for each of ``B`` sequences from their states (ours: ``delta_rule_step``,
  the batch's states updated in place; transformers: ``torch_recurrent_gated_delta_rule``),
  at each ``--batch``. The state is fixed-size, so this cost is the same at any context length.

Then one decode step of a whole ``GatedDeltaNet`` layer (random fp32 weights, ``--hidden``),
its states in a state cache's slots, with our C++ state kernels (``kernels/state_update.cpp``:
the conv step and the delta-rule step on the slots in place) against the layer's PyTorch path,
and the state steps alone (``causal_conv1d`` + the delta rule, no projections or norm).

    python benchmarks/deltanet.py
    python benchmarks/deltanet.py -p 2048 --batch 1 8 32 -r 5
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cholla.kernels import cpu_kernels  # noqa: E402
from cholla.layers import causal_conv, gated_deltanet  # noqa: E402
from cholla.layers.attention import AttentionMetadata  # noqa: E402
from cholla.layers.gated_deltanet import GatedDeltaNet, delta_rule_chunked, delta_rule_step, l2_normalize  # noqa: E402
from cholla.models.config import DeltaNetConfig  # noqa: E402


def _inputs(batch: int, tokens: int, heads: int, dk: int, dv: int):
    """q (normalised, scaled), k (normalised), v, g (log decay), beta: [batch, tokens, heads, ...]."""
    q = l2_normalize(torch.randn(batch, tokens, heads, dk)) * dk**-0.5
    k = l2_normalize(torch.randn(batch, tokens, heads, dk))
    return q, k, torch.randn(batch, tokens, heads, dv), -torch.rand(batch, tokens, heads), torch.rand(batch, tokens, heads)


def _time(fn, reps: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.mean(times), statistics.stdev(times) if len(times) > 1 else 0.0


def pytorch_state_steps():
    """The layers' PyTorch state steps: both modules see no kernels."""
    stack = contextlib.ExitStack()
    for module in (causal_conv, gated_deltanet):
        stack.enter_context(mock.patch.object(module, "cpu_kernels", lambda: None))
    return stack


def _decode_layer(hidden: int, heads: int, dim: int, batch: int):
    """A Qwen 3.5-shaped layer with random fp32 weights, its states, and one decode step's input and metadata."""
    config = DeltaNetConfig(num_k_heads=heads, num_v_heads=heads, k_head_dim=dim, v_head_dim=dim, conv_kernel=4)
    layer = GatedDeltaNet(hidden, config, 1e-6)
    for linear in (layer.in_proj_qkv, layer.in_proj_z, layer.in_proj_b, layer.in_proj_a, layer.out_proj):
        linear.load(torch.randn(linear.out_features, linear.in_features) * linear.in_features**-0.5)
    layer.conv1d.weight.value = torch.randn(config.conv_channels, config.conv_kernel) * 0.5
    layer.A.value, layer.dt_bias.value = -torch.rand(heads), torch.randn(heads)
    states = (torch.randn(batch + 1, config.conv_channels, config.conv_kernel - 1),
              torch.randn(batch + 1, heads, dim, dim) * 0.1)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0), query_start_loc=list(range(batch + 1)), context_lens=[],
                             block_tables=torch.zeros(0), num_prefills=0, state_slots=torch.arange(1, batch + 1))
    return layer, states, torch.randn(batch, hidden), meta


def layer_rows(args) -> list:
    """(label, kernels' time, PyTorch's time) of a layer's decode step and of its state steps alone."""
    rows = []
    for batch in args.batch:
        layer, states, x, meta = _decode_layer(args.hidden, args.heads, args.head_dim, batch)
        qkv = torch.randn(batch, layer.config.conv_channels)
        a, b = torch.randn(batch, args.heads), torch.randn(batch, args.heads)

        def state_steps():
            convolved = causal_conv.causal_conv1d(qkv, layer.conv1d.weight.value, None, states[0], meta, silu=True)
            return layer._decode(convolved, a, b, states[1], meta.state_slots)

        with torch.inference_mode():
            kernels = [_time(lambda: layer(x, states, meta), args.reps), _time(state_steps, args.reps)]
            with pytorch_state_steps():
                pytorch = [_time(lambda: layer(x, states, meta), args.reps), _time(state_steps, args.reps)]
        rows.append((f"whole layer, batch {batch}", kernels[0], pytorch[0]))
        rows.append((f"conv + delta-rule steps, batch {batch}", kernels[1], pytorch[1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-p", "--prompt", type=int, default=512)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1024, help="the layer's model width (Qwen 3.5 0.8B: 1024)")
    parser.add_argument("-r", "--reps", type=int, default=3)
    args = parser.parse_args()
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    heads, dim = args.heads, args.head_dim
    torch.manual_seed(0)
    rows = []
    q, k, v, g, beta = _inputs(1, args.prompt, heads, dim, dim)
    zero = torch.zeros(heads, dim, dim)

    def prefill_ours():
        return delta_rule_chunked(q[0], k[0], v[0], g[0], beta[0], zero.clone())[0]

    def prefill_theirs():  # transformers scales the query itself
        return hf.torch_chunk_gated_delta_rule(q * dim**0.5, k, v, g, beta, initial_state=zero[None].clone(),
                                               output_final_state=True, use_qk_l2norm_in_kernel=False)[0][0]

    torch.testing.assert_close(prefill_ours(), prefill_theirs(), rtol=1e-4, atol=1e-4)  # the same computation
    ours, theirs = _time(prefill_ours, args.reps), _time(prefill_theirs, args.reps)
    rows.append((f"prefill {args.prompt} tokens", ours, theirs))
    for batch in args.batch:
        q, k, v, g, beta = _inputs(batch, 1, heads, dim, dim)
        states = torch.randn(batch, heads, dim, dim) * 0.1
        expected = hf.torch_recurrent_gated_delta_rule(q * dim**0.5, k, v, g, beta, initial_state=states.clone(),
                                                       use_qk_l2norm_in_kernel=False)[0][:, 0]
        torch.testing.assert_close(delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], states.clone()),
                                   expected, rtol=1e-4, atol=1e-4)
        ours = _time(lambda: delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], states), args.reps)
        theirs = _time(lambda: hf.torch_recurrent_gated_delta_rule(q * dim**0.5, k, v, g, beta, initial_state=states,
                                                                   output_final_state=True, use_qk_l2norm_in_kernel=False),
                       args.reps)
        rows.append((f"decode, batch {batch}", ours, theirs))
    print(f"Gated DeltaNet core per layer: {heads} heads x {dim} x {dim} state, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| step | cholla ms | transformers ms |\n|---|---|---|")
    for label, (mean, sd), (their_mean, their_sd) in rows:
        print(f"| {label} | {mean:.2f} ± {sd:.2f} | {their_mean:.2f} ± {their_sd:.2f} |")
    if cpu_kernels() is None:
        print("\nOur C++ kernels do not run here: no state-kernel comparison.")
        return
    print(f"\nOne decode step, hidden {args.hidden}, states in slots 1..B of a state cache")
    print("| decode step | C++ state kernels ms | PyTorch path ms |\n|---|---|---|")
    for label, (mean, sd), (their_mean, their_sd) in layer_rows(args):
        print(f"| {label} | {mean:.3f} ± {sd:.3f} | {their_mean:.3f} ± {their_sd:.3f} |")


if __name__ == "__main__":
    main()
