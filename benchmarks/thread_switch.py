"""What switching torch's thread count between steps costs (the adaptive default, cholla/threads.py).

The default gives decode steps the full team and prompt steps one thread per
free core, so on a busy machine the count changes whenever a prompt step
follows a decode step or the other way round. This measures, in one process:

- ``step_threads`` when nothing changes (every step pays it): microseconds a call;
- one switch and back around a parallel region, cores -> N -> cores, against
  the same regions at a fixed count (libgomp ends the threads a smaller team
  does not use and starts them again for a larger one; a one-thread region
  does not touch them);
- single-sequence decode tokens/s with a switch to N and back before every
  step (the worst case: every decode step follows a prompt step) against none,
  alternating bursts, medians.

    env -u OMP_NUM_THREADS python benchmarks/thread_switch.py --model smollm2 --to 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's cholla

import cholla  # noqa: E402,F401  (sets libgomp's spin before torch loads)
import torch  # noqa: E402

from cholla.bench import time_decode  # noqa: E402
from cholla.download import resolve_model  # noqa: E402
from cholla.engine import runner  # noqa: E402
from cholla.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from cholla.threads import physical_cores, step_threads  # noqa: E402


def region_pairs(cores: int, to: int | None, pairs: int) -> float:
    """Microseconds for two small parallel regions (one at ``to`` threads when given, one at ``cores``)."""
    x = torch.ones(1 << 16)
    start = time.perf_counter()
    for _ in range(pairs):
        if to is not None:
            torch.set_num_threads(to)
        x.mul_(1.0)
        if to is not None:
            torch.set_num_threads(cores)
        x.mul_(1.0)
    return (time.perf_counter() - start) / pairs * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--to", type=int, default=1, help="the prompt steps' count to switch to (default 1)")
    parser.add_argument("--bursts", type=int, default=8, help="decode bursts of each kind, alternating")
    parser.add_argument("--burst", type=int, default=32, help="tokens a burst")
    args = parser.parse_args()
    cores = physical_cores()
    if os.environ.get("OMP_NUM_THREADS"):
        parser.error("unset OMP_NUM_THREADS: the switch happens under the default only")
    engine = LLMEngine(resolve_model(args.model), EngineConfig(max_model_len=args.burst + 8, enable_prefix_caching=False))
    calls = 100_000
    start = time.perf_counter()
    for _ in range(calls):
        step_threads(True)
    check_us = (time.perf_counter() - start) / calls * 1e6

    torch.set_num_threads(cores)
    region_pairs(cores, None, 200)
    fixed, switched = [], []
    for _ in range(5):
        fixed.append(region_pairs(cores, None, 500))
        switched.append(region_pairs(cores, args.to, 500))

    plain_step = runner.step_threads

    def switching(decoding: bool) -> int:
        torch.set_num_threads(args.to)  # as if a prompt step had run just before
        return plain_step(decoding)

    time_decode(engine, 1, 4)  # warm-up
    rates: dict[str, list[float]] = {"no switch": [], "switch before every step": []}
    for burst in range(2 * args.bursts):
        kind = list(rates)[(burst + burst // 2) % 2]  # ABBA order
        runner.step_threads = switching if kind != "no switch" else plain_step
        rates[kind].append(time_decode(engine, 1, args.burst))
    runner.step_threads = plain_step

    print(f"\n{os.cpu_count()} CPUs, {cores} physical cores, load {os.getloadavg()[0]:.1f}; switch {cores} <-> {args.to}\n")
    print(f"step_threads(decoding=True), no change: {check_us:.2f} us a call")
    print(f"two small parallel regions, fixed {cores} threads: {statistics.median(fixed):.1f} us (median of 5)")
    print(f"the same with a switch to {args.to} and back: {statistics.median(switched):.1f} us")
    print(f"\n| {args.model} decode | tokens/s (median) | bursts |\n| --- | ---: | --- |")
    for kind, values in rates.items():
        print(f"| {kind} | {statistics.median(values):.1f} | {', '.join(f'{v:.0f}' for v in values)} |")


if __name__ == "__main__":
    main()
