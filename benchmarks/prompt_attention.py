"""Whole prompts' attention: the explicit scores of ``_attend_short_prompts`` against SDPA's flash kernel.

``cholla/layers/attention.py`` sends runs of whole prompts of at most 2 x head_dim tokens, with heads of
at least 128, through explicit scores (our kernels' bf16 product, an fp32 softmax, oneDNN's bf16 batched
matmul) instead of ``scaled_dot_product_attention`` in bf16. This times both on the same random q, k, v
for a few shapes (Gemma 3 270M's: 4 heads, 1 KV head, dim 256; SmolLM2's: 9, 3, 64), CPU time (all
threads'), best of ``--repeats``,
and prints each one's largest and mean distance from fp64 attention.

    OMP_NUM_THREADS=1 python benchmarks/prompt_attention.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's cholla
from cholla.kernels import cpu_kernels
from cholla.layers import attention

# (prompts, tokens each, heads, KV heads, head dim)
SHAPES = [(16, 128, 4, 1, 256), (1, 512, 4, 1, 256), (2, 1024, 4, 1, 256), (4, 512, 8, 4, 256),
          (16, 128, 16, 8, 128), (8, 256, 32, 8, 128), (4, 512, 16, 8, 128), (16, 128, 9, 3, 64), (32, 128, 9, 3, 64),
          (1, 128, 9, 3, 64), (4, 256, 9, 3, 64), (1, 512, 9, 3, 64), (1, 2048, 4, 1, 256)]


def best_ms(fn, repeats: int) -> float:
    """Best CPU time of ``fn`` (the thread's at one thread, the process's beyond), ms."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.process_time
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if cpu_kernels() is None:
        raise SystemExit("the explicit scores are our kernels' product: they do not run here")
    print(f"threads {torch.get_num_threads()}, CPU time, best of {args.repeats}")
    print("| prompts x tokens | heads / KV heads, dim | chosen | explicit ms | SDPA ms | SDPA / explicit "
          "| max, mean error explicit | SDPA |\n|---|---|---|---:|---:|---:|---|---|")
    for shape in SHAPES:
        print(row(shape, args.repeats))


def row(shape: tuple[int, int, int, int, int], repeats: int) -> str:
    """One table row: both paths on the same random q, k, v of this shape."""
    n, length, heads, kv_heads, dim = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n * length, h, dim, generator=g) for h in (heads, kv_heads, kv_heads))
    scale = 3 * dim**-0.5

    def rows(x: torch.Tensor) -> torch.Tensor:  # [n, heads, L, dim], as the runs take them
        return x.unflatten(0, (n, length)).transpose(1, 2)

    def sdpa() -> torch.Tensor:
        out = attention._attend(rows(q), rows(k), rows(v), None, scale, None, torch.bfloat16)
        return out.transpose(1, 2).flatten(0, 1)

    def explicit() -> torch.Tensor:
        return attention._attend_short_prompts(q, k, v, length, scale).float()

    exact = F.scaled_dot_product_attention(rows(q).double(), rows(k).double(), rows(v).double(), is_causal=True,
                                           scale=scale, enable_gqa=True).transpose(1, 2).flatten(0, 1)
    errors = [(fn() - exact).abs() for fn in (explicit, sdpa)]
    ours, theirs = best_ms(explicit, repeats), best_ms(sdpa, repeats)
    chosen = "explicit" if attention._short_prompts(q, k, length, None, torch.bfloat16, None) else "SDPA"
    return (f"| {n} x {length} | {heads} / {kv_heads}, {dim} | {chosen} | {ours:.2f} | {theirs:.2f} | "
            f"{theirs / ours:.2f}x | " + " | ".join(f"{e.max():.4f}, {e.mean():.5f}" for e in errors) + " |")


if __name__ == "__main__":
    main()
