"""The Gated DeltaNet core (the delta rule, without its projections) against transformers' own
PyTorch forms of it, at a real model's head shapes (default Qwen3.5's 16 x 128 x 128 per layer).

Reported per layer, mean ± sd over ``-r`` repetitions (ms):

- prefill: one ``-p``-token sequence through the chunked form (ours: ``delta_rule_chunked``;
  transformers: ``torch_chunk_gated_delta_rule``), both from a zero state, chunk 64;
- decode: one token for each of ``B`` sequences from their states (ours: ``delta_rule_step``,
  the batch's states updated in place; transformers: ``torch_recurrent_gated_delta_rule``),
  at each ``--batch``. The state is fixed-size, so this cost is the same at any context length.

    python benchmarks/deltanet.py
    python benchmarks/deltanet.py -p 2048 --batch 1 8 32 -r 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cholla.layers.gated_deltanet import delta_rule_chunked, delta_rule_step, l2_normalize  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-p", "--prompt", type=int, default=512)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
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


if __name__ == "__main__":
    main()
