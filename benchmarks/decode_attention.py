"""Decode attention for many sequences (``paged_attention_decode``), this checkout against another.

Gemma 3 270M's shapes by default (4 query heads per KV head, head_dim 256, bf16 KV in blocks of
16): 32 sequences of 129-256 tokens, as in the 32 x (128+128) benchmark's decode phase. Two
figures per checkout, thread CPU time per layer (best of --reps): "in cache", one layer's KV
attended over and over (the arithmetic), and "out of cache", --layers layers' KV attended in
turn (~114 MB at 18 layers: the reads come from memory, as in a decode step). Each checkout runs
in its own process (its own kernels), the two taking turns.

    OMP_NUM_THREADS=1 python benchmarks/decode_attention.py --baseline /tmp/base-attn --turns 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = """
import sys, time, torch
from cholla.kernels import cpu_kernels
seqs, heads, kv_heads, dim, low, high, layers, reps = map(int, sys.argv[1:9])
kernels, block_size = cpu_kernels(), 16
torch.manual_seed(0)
lens = torch.randint(low, high + 1, (seqs,))
per = (high + block_size - 1) // block_size
blocks = seqs * per
caches = [tuple(torch.randn(blocks, block_size, kv_heads, dim).bfloat16() for _ in range(2)) for _ in range(layers)]
tables = torch.randperm(blocks)[: seqs * per].reshape(seqs, per)
q = torch.randn(seqs, heads, dim)
def per_layer(used):
    best = float("inf")
    for _ in range(reps):
        start = time.thread_time()
        for _ in range(10):
            for k, v in used:
                kernels.paged_attention_decode(q, k, v, tables, lens, dim ** -0.5, 0, 0.0, [], [])
        best = min(best, (time.thread_time() - start) / 10 / len(used))
    return best * 1e3
per_layer(caches[:1])
print(per_layer(caches[:1]), per_layer(caches), 2 * int(lens.sum()) * kv_heads * dim * 2 / 1e6, flush=True)
"""


def run(checkout: Path, args) -> list[float]:
    argv = [str(a) for a in (args.seqs, args.heads, args.kv_heads, args.head_dim, args.min_len, args.max_len,
                             args.layers, args.reps)]
    out = subprocess.run([sys.executable, "-c", WORKER, *argv], cwd=checkout, capture_output=True, text=True,
                         check=True)
    return [float(x) for x in out.stdout.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout (say, main's) to run in turns with this one")
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=129)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    sides = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    best = {name: [float("inf"), float("inf")] for name in sides}
    kv_mb = 0.0
    for turn in range(args.turns):
        for name in (list(sides) if turn % 2 == 0 else list(sides)[::-1]):
            in_cache, out_of_cache, kv_mb = run(sides[name], args)
            best[name] = [min(best[name][0], in_cache), min(best[name][1], out_of_cache)]
            print(f"turn {turn} {name}: in cache {in_cache:.3f} ms, out of cache {out_of_cache:.3f} ms a layer",
                  flush=True)
    print(f"\n{args.seqs} sequences of {args.min_len}-{args.max_len} tokens, {args.heads} / {args.kv_heads} heads, "
          f"dim {args.head_dim}, bf16 KV ({kv_mb:.2f} MB a layer); thread CPU ms per layer, best of turns\n")
    print("| checkout | in cache | out of cache |")
    print("|---|---:|---:|")
    for name, (a, b) in best.items():
        print(f"| {name} | {a:.3f} | {b:.3f} |")
    if args.baseline:
        (a0, b0), (a1, b1) = best["baseline"], best["this"]
        print(f"| baseline / this | {a0 / a1:.2f}x | {b0 / b1:.2f}x |")


if __name__ == "__main__":
    main()
