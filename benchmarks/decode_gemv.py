"""The one-row int8 GEMV of single-stream decode, per product, against another checkout's, alternately.

A decode step multiplies one row by every layer's weights in turn, reading them
from L3 or memory. Here each product kind (q+k+v, o, gate+up, down, the head)
is run over every layer's weights in turn, one row (``qgemv_int8_out``), and
timed as a sweep; the figure is the best sweep of many, which on a shared
machine is the one no other process interrupted (a sweep of SmolLM2's 30
layers takes 0.1-1.5 ms). Each checkout runs in its own process (``python -c``
in that checkout: its cholla, its kernels) and the two take turns, so both
see the same load; the table gives each side's best and the ratio, with the
rate at which the sweep read the weights.

    OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=/tmp/ext-ab python benchmarks/decode_gemv.py --baseline ../main --models smollm2 gemma3 --threads 1 2

Set ``TORCH_EXTENSIONS_DIR`` to a folder of your own when the baseline is a
second checkout of the same sources as another in use (torch names its build
folder by the sources, and two checkouts of them rebuild it in turn).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One side: load the weights, say so, then per line read time each product's sweep for that many seconds.
WORKER = """
import json, sys, time
import torch
from cholla.download import resolve_model
from cholla.formats.gguf import read_gguf
from cholla.kernels import cpu_kernels
model, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
kernels = cpu_kernels()
tensors = read_gguf(resolve_model(model)).tensors
layers = sum(1 for name in tensors if name.endswith(".ffn_down.weight"))
names = {"qkv": ["attn_q", "attn_k", "attn_v"], "o": ["attn_output"], "gate+up": ["ffn_gate", "ffn_up"],
         "down": ["ffn_down"]}
products = {kind: [[tensors[f"blk.{l}.{n}.weight"] for n in ns] for l in range(layers)] for kind, ns in names.items()}
products["head"] = [[tensors.get("output.weight", tensors["token_embd.weight"])]]
calls = {}
for kind, groups in products.items():
    args = []
    for group in groups:
        x = torch.randn(1, group[0].shape[1])
        out = torch.zeros(1, sum(t.shape[0] for t in group))
        args.append((x, [t.data for t in group], [int(t.qtype) for t in group], out))
    calls[kind] = (args, sum(t.data.numel() * t.data.element_size() for g in groups for t in g))
def sweep(args):
    for a in args:
        kernels.qgemv_int8_out(*a)
for args, _ in calls.values():
    sweep(args)
print("ready", flush=True)
for line in sys.stdin:
    seconds, best = float(line), {}
    for kind, (args, nbytes) in calls.items():
        times, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < 3:
            t = time.perf_counter()
            sweep(args)
            times.append(time.perf_counter() - t)
        best[kind] = (min(times), nbytes)
    print(json.dumps(best), flush=True)
"""


class Side:
    """A checkout's worker process."""

    def __init__(self, checkout: Path, model: str, threads: int):
        self.process = subprocess.Popen([sys.executable, "-c", WORKER, model, str(threads)], cwd=checkout,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the worker in {checkout} did not start (see its error above)")

    def measure(self, seconds: float) -> dict[str, tuple[float, int]]:
        self.process.stdin.write(f"{seconds}\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout (say, ../main)")
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--turns", type=int, default=6, help="turns of each side")
    parser.add_argument("--seconds", type=float, default=0.5, help="per product and turn")
    args = parser.parse_args()
    print("| model | threads | product | this ms | baseline ms | baseline / this | this GB/s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for model in args.models:
        for threads in args.threads:
            sides = [Side(ROOT, model, threads), Side(args.baseline.resolve(), model, threads)]
            best: list[dict[str, tuple[float, int]]] = [{}, {}]
            try:
                for turn in range(args.turns):
                    for i in (0, 1) if turn % 2 == 0 else (1, 0):
                        for kind, (seconds, nbytes) in sides[i].measure(args.seconds).items():
                            best[i][kind] = (min(seconds, best[i].get(kind, (seconds,))[0]), nbytes)
            finally:
                for side in sides:
                    side.close()
            for kind, (this, nbytes) in best[0].items():
                base = best[1][kind][0]
                print(f"| {model} | {threads} | {kind} | {this * 1e3:.3f} | {base * 1e3:.3f} | {base / this:.3f} "
                      f"| {nbytes / this / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
