"""Decode speed of this checkout against another (say, main's), in short alternating bursts, with 0, 1, 2 ... busy loops.

On a machine that others share, the load moves by several times within
minutes: two ``cholla bench`` runs a minute apart compare the minutes more than
the code. Here each checkout runs in its own process that loads the model once
(``python -c`` in that checkout, so it imports that checkout's cholla and
builds its kernels) and then decodes ``--burst`` tokens of one sequence
whenever it is told to; the two take turns, ``--bursts`` times each, the first
to go alternating, so both see the same load at a few seconds' distance. For
each number of competing busy loops (``python -c "while True: pass"``,
started before the bursts and killed after them) it prints the median tokens/s
of each side, the ratio, and each side's share of its own quiet speed.

    python benchmarks/checkout_ab.py --baseline ../main --models smollm2 gemma3 --busy 0 1 2 --threads 2
    env -u OMP_NUM_THREADS python benchmarks/checkout_ab.py --baseline . --threads 0 --baseline-threads 2 --busy 0 2

(``--threads 0``: cholla's default thread choice, which honours ``$OMP_NUM_THREADS``;
the second line so compares this checkout's default with its forced team of 2.)

Set ``TORCH_EXTENSIONS_DIR`` to a folder of your own when the baseline is a
second checkout of the same sources as another in use: torch's build folder
is named by the sources, and two checkouts of them rebuild it in turn.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUSY_LOOP = [sys.executable, "-c", "while True: pass"]

# One side: load the model, say so, then decode `n` tokens per line read and print tokens/s.
WORKER = """
import sys
from cholla.bench import BENCH_KV_CACHE_MEMORY, time_decode
from cholla.engine.engine import EngineConfig, LLMEngine
model, threads, burst = sys.argv[1], int(sys.argv[2]) or None, int(sys.argv[3])
engine = LLMEngine(model, EngineConfig(max_model_len=burst + 2, max_num_batched_tokens=burst + 2,
                                       kv_cache_memory=BENCH_KV_CACHE_MEMORY, enable_prefix_caching=False,
                                       threads=threads))
time_decode(engine, 1, 4)
print("ready", flush=True)
for line in sys.stdin:
    print(time_decode(engine, 1, int(line)), flush=True)
"""


class Side:
    """A checkout's worker process."""

    def __init__(self, checkout: Path, model: str, threads: int, burst: int):
        self.process = subprocess.Popen([sys.executable, "-c", WORKER, model, str(threads), str(burst)],
                                        cwd=checkout, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the worker in {checkout} did not start (see its error above)")

    def decode(self, tokens: int) -> float:
        self.process.stdin.write(f"{tokens}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def resolve(model: str) -> str:
    sys.path.insert(0, str(ROOT))
    from cholla.download import resolve_model

    return str(resolve_model(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the other cholla checkout")
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="competing busy loops per condition")
    parser.add_argument("--threads", type=int, default=2, help="this side's threads (0: cholla's default)")
    parser.add_argument("--baseline-threads", type=int, default=None, help="the baseline's (default: --threads)")
    parser.add_argument("--burst", type=int, default=32, help="tokens a side decodes per turn")
    parser.add_argument("--bursts", type=int, default=12, help="turns per side and condition")
    args = parser.parse_args()
    if 0 not in args.busy:
        parser.error("--busy needs 0: the quiet run each share is taken of")

    baseline_threads = args.threads if args.baseline_threads is None else args.baseline_threads
    rows = []
    for model in args.models:
        path = resolve(model)
        sides = {"this": Side(ROOT, path, args.threads, args.burst),
                 "baseline": Side(args.baseline.resolve(), path, baseline_threads, args.burst)}
        try:
            for busy_count in sorted(args.busy):
                busy = [subprocess.Popen(BUSY_LOOP) for _ in range(busy_count)]
                time.sleep(0.5)
                rates: dict[str, list[float]] = {"this": [], "baseline": []}
                loads = []
                try:
                    for turn in range(args.bursts):
                        loads.append(os.getloadavg()[0])
                        for name in (("this", "baseline") if turn % 2 == 0 else ("baseline", "this")):
                            rates[name].append(sides[name].decode(args.burst))
                finally:
                    for process in busy:
                        process.kill()
                        process.wait()
                rows.append((model, busy_count, statistics.median(loads), {k: statistics.median(v) for k, v in rates.items()}))
                # each turn's two bursts ran seconds apart: their ratio, turn by turn, cancels the load's drift
                paired = statistics.median(a / b for a, b in zip(rates["this"], rates["baseline"]))
                print(f"[checkout_ab] {model}, {busy_count} busy: this {sorted(round(r) for r in rates['this'])}, "
                      f"baseline {sorted(round(r) for r in rates['baseline'])}, this / baseline turn by turn: "
                      f"median {paired:.2f}", file=sys.stderr, flush=True)
        finally:
            for side in sides.values():
                side.close()

    threads = f"{args.threads or 'default'} / {baseline_threads or 'default'}"
    print(f"\n{os.cpu_count()} CPUs, {threads} threads (this / baseline), "
          f"{args.bursts} alternating bursts of {args.burst} tokens per side; baseline: {args.baseline}\n")
    print("| model | busy loops | load (1 min) | this t/s | baseline t/s | this / baseline | this, share of quiet | baseline, share of quiet |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    quiet = {model: medians for model, busy_count, _, medians in rows if busy_count == 0}
    for model, busy_count, load, medians in rows:
        print(f"| {model} | {busy_count} | {load:.1f} | {medians['this']:.1f} | {medians['baseline']:.1f} "
              f"| {medians['this'] / medians['baseline']:.2f} | {100 * medians['this'] / quiet[model]['this']:.0f}% "
              f"| {100 * medians['baseline'] / quiet[model]['baseline']:.0f}% |")


if __name__ == "__main__":
    main()
