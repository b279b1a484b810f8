"""One Mamba-2 mixer layer: cholla's (``cholla/layers/mamba2.py``) against transformers'
``Mamba2Mixer`` (its PyTorch path, the one that runs without the CUDA kernels), same weights.

Reported (mean ± sd over ``-r`` runs, ms): a ``-p``-token prefill of one sequence
(chunked SSD scan), and one decode step at batch 1 and 32, batch 1 after each ``-c``
context length and batch 32 after the first. cholla's decode runs twice: with its C++
SSD step on the state slots in place (``kernels/ssd.cpp``, where the kernels run) and
with the PyTorch step (states gathered by slot, one vectorised step, scattered back);
transformers takes its recurrent step on a batched cache. Also shown: the share of
cholla's C++ decode step spent outside the two projections (conv, SSD step, gate), and
the SSD step alone (C++ against PyTorch's gather, step and scatter; medians, as one
preempted run on a busy machine outweighs a hundred 40-us steps). Default shape:
Mamba-2 780M's (hidden 1536, 48 heads of 64, state 128, one group).

    python benchmarks/mamba2_mixer.py
    python benchmarks/mamba2_mixer.py -p 512 -c 128,4096 -r 5 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cholla.kernels import cpu_kernels  # noqa: E402
from cholla.layers import mamba2  # noqa: E402
from cholla.layers.attention import AttentionMetadata  # noqa: E402
from cholla.layers.mamba2 import Mamba2Mixer, Mamba2Shape, sanitize_mixer_weights  # noqa: E402
from cholla.models.loading import load_named_weights  # noqa: E402


def meta(lengths: list[int], num_prefills: int) -> AttentionMetadata:
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    return AttentionMetadata(slot_mapping=torch.zeros(0), query_start_loc=starts, context_lens=[],
                             block_tables=torch.zeros(0), num_prefills=num_prefills,
                             state_slots=torch.arange(len(lengths)))


def timed(fn, runs: int, median: bool = False) -> tuple[float, float]:
    """(mean or median, sd) of ``runs`` calls, in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return (statistics.median if median else statistics.mean)(times), statistics.stdev(times) if runs > 1 else 0.0


@contextlib.contextmanager
def pytorch_step():
    """The mixer's PyTorch decode step (the projections keep their own kernels)."""
    mamba2.cpu_kernels = lambda: None
    try:
        yield
    finally:
        mamba2.cpu_kernels = cpu_kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=48)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--state", type=int, default=128)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("-p", "--prompt", type=int, default=512)
    parser.add_argument("-c", "--contexts", default="128,4096", help="decode after these many tokens")
    parser.add_argument("-r", "--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from transformers.cache_utils import DynamicCache
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMixer

    transformers.logging.set_verbosity_error()
    config = transformers.Mamba2Config(hidden_size=args.hidden, num_heads=args.heads, head_dim=args.head_dim,
                                       state_size=args.state, n_groups=args.groups, expand=args.heads * args.head_dim // args.hidden,
                                       chunk_size=256, num_hidden_layers=1)
    torch.manual_seed(0)
    ref = HFMixer(config, layer_idx=0).eval()
    shape = Mamba2Shape(args.hidden, args.heads, args.head_dim, args.state, args.groups, chunk_size=256)
    ours = Mamba2Mixer(shape)
    weights = sanitize_mixer_weights({f"mixer.{k}": v.detach() for k, v in ref.state_dict().items()})
    load_named_weights(ours, {k.removeprefix("mixer."): v for k, v in weights.items()})

    if cpu_kernels() is None:
        sys.exit("the C++ kernels do not run here (cholla.kernels.cpu_kernels() is None): nothing to compare")
    rows, steps = [], []
    x = torch.randn(args.prompt, args.hidden)
    conv, ssm = (torch.zeros(32, *s) for s in shape.state_shapes)
    with torch.inference_mode():
        ours_p = timed(lambda: ours(x, (conv, ssm), meta([args.prompt], 1)), args.runs)
        ref_p = timed(lambda: ref(x[None]), args.runs)
        rows.append((f"prefill {args.prompt} tokens", ours_p, None, ref_p, None))
        contexts = [int(c) for c in args.contexts.split(",")]
        for batch, context in [(1, c) for c in contexts] + [(32, contexts[0])]:
            history = torch.randn(batch, context, args.hidden)
            ours(history.reshape(-1, args.hidden), (conv, ssm), meta([context] * batch, batch))
            cache = DynamicCache(config=config)
            ref(history, cache=cache)
            step = torch.randn(batch, args.hidden)
            step_meta = meta([1] * batch, 0)
            ours_d = timed(lambda step=step, m=step_meta: ours(step, (conv, ssm), m), args.runs * 4)
            with pytorch_step():
                torch_d = timed(lambda step=step, m=step_meta: ours(step, (conv, ssm), m), args.runs * 4)
            ref_d = timed(lambda step=step, cache=cache: ref(step[:, None], cache=cache), args.runs * 4)
            projections = timed(lambda step=step: ours.out_proj(ours.in_proj(step)[:, : shape.inner_size]), args.runs * 4)
            rows.append((f"decode batch {batch} at {context}", ours_d, torch_d, ref_d, 1 - projections[0] / ours_d[0]))
            if context == contexts[0]:
                steps.append((batch, *ssd_steps(ours, shape, ssm, batch, args.runs * 20)))

    print(f"Mamba-2 mixer: hidden {args.hidden}, {args.heads} heads x {args.head_dim}, state {args.state}, "
          f"{args.groups} group(s), fp32, {args.threads} threads")
    print("| step | cholla C++ ms | cholla PyTorch ms | transformers ms | C++ vs PyTorch | C++ vs transformers "
          "| C++ outside projections |")
    print("|---|---|---|---|---|---|---|")
    for name, (om, osd), torch_d, (rm, rsd), share in rows:
        torch_ms, torch_ratio = ("", "") if torch_d is None else (f"{torch_d[0]:.2f} ± {torch_d[1]:.2f}",
                                                                  f"{torch_d[0] / om:.2f}x")
        print(f"| {name} | {om:.2f} ± {osd:.2f} | {torch_ms} | {rm:.2f} ± {rsd:.2f} | {torch_ratio} | {rm / om:.2f}x "
              f"| {'' if share is None else f'{share:.0%}'} |")
    print()
    print("| SSD step alone (median ± sd) | C++ ms | PyTorch ms (gather, step, scatter) | speed-up |")
    print("|---|---|---|---|")
    for batch, (cm, csd), (tm, tsd) in steps:
        print(f"| batch {batch} | {cm:.3f} ± {csd:.3f} | {tm:.3f} ± {tsd:.3f} | {tm / cm:.2f}x |")


def ssd_steps(mixer: Mamba2Mixer, shape: Mamba2Shape, ssm: torch.Tensor, batch: int, runs: int):
    """The mixer's decode SSD step alone (``_decode``, the D skip included), C++ and PyTorch, on
    ``batch`` sequences in slots ``0 .. batch - 1``."""
    x = torch.randn(batch, shape.inner_size)
    dt = torch.randn(batch, shape.num_heads)
    B, C = (torch.randn(batch, shape.n_groups * shape.state_size) for _ in range(2))
    slots = torch.arange(batch)
    step = lambda: mixer._decode(x, dt, B, C, ssm, slots)  # noqa: E731
    kernel = timed(step, runs, median=True)
    with pytorch_step():
        return kernel, timed(step, runs, median=True)

if __name__ == "__main__":
    main()
