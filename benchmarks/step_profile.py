"""Where a single-sequence decode step's time goes: each part of ``engine.step()`` wrapped in a timer.

The engine's parts (scheduling, the runner's tensors, the fused layers' C++ call and
the Python around it, the head, sampling, the outputs) are wrapped with
``time.perf_counter_ns`` for the whole run, one sequence decoding ``--tokens`` tokens
greedily, ``--reps`` times; the table gives each part's median and p10 per step.
The rest of a step (``engine.step`` less its named parts) is the engine's own Python.

    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --model smollm2 --threads 2 --tokens 128 --reps 6

Wrapping costs ~1 us a part a step; compare runs of this script, not its sums with
``cholla bench``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's cholla

from cholla.download import resolve_model
from cholla.bench import BENCH_KV_CACHE_MEMORY, time_decode
from cholla.engine import runner as runner_module
from cholla.engine.engine import EngineConfig, LLMEngine
from cholla.models import fused_decode


class Timers:
    """Per named part, the nanoseconds of each call during the current step (summed if called twice),
    by ``clock``: wall time, or ``time.thread_time_ns`` where the machine's load spoils it."""

    def __init__(self, clock=time.perf_counter_ns):
        self.clock = clock
        self.step: dict[str, int] = defaultdict(int)
        self.steps: list[dict[str, int]] = []
        self.recording = False

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = self.clock()
            try:
                return original(*args, **kwargs)
            finally:
                self.step[label] += self.clock() - start

        setattr(owner, name, timed)

    def end_step(self) -> None:
        if self.recording:
            self.steps.append(dict(self.step))
        self.step.clear()


class _TimedKernels:
    """``cpu_kernels()`` as fused_decode sees it, with its ``decode_layers.op`` timed."""

    def __init__(self, kernels, timers: Timers):
        self._kernels = kernels
        self.decode_layers = type("op", (), {})()
        original = kernels.decode_layers.op

        def op(*args):
            start = timers.clock()
            try:
                return original(*args)
            finally:
                timers.step["decode_layers (C++)"] += timers.clock() - start

        self.decode_layers.op = op

    def __getattr__(self, name):
        return getattr(self._kernels, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=6)
    args = parser.parse_args()
    engine = LLMEngine(resolve_model(args.model), EngineConfig(max_model_len=args.tokens + 2, max_num_batched_tokens=args.tokens + 2,
                                                kv_cache_memory=BENCH_KV_CACHE_MEMORY, enable_prefix_caching=False,
                                                threads=args.threads))
    timers = Timers()
    original_step = LLMEngine.step

    def step(self):
        start = time.perf_counter_ns()
        try:
            return original_step(self)
        finally:
            timers.step["engine.step"] += time.perf_counter_ns() - start
            timers.end_step()

    LLMEngine.step = step
    runner, model = engine.runner, engine.loaded.model
    timers.wrap(engine.scheduler, "schedule", "scheduler.schedule")
    timers.wrap(engine, "_postprocess", "engine._postprocess")
    timers.wrap(runner, "execute", "runner.execute")
    for name in ("_prepare", "_fast_step"):
        if hasattr(runner, name):
            timers.wrap(runner, name, f"runner.{name}")
    timers.wrap(model, "compute_logits", "head (compute_logits)")
    if hasattr(model, "decode_logits"):  # the layers, final norm and head in one call
        timers.wrap(model, "decode_logits", "decode_logits (embedding, layers, norm, head)")
    timers.wrap(model.embed_tokens, "forward", "embedding")
    timers.wrap(model.norm, "forward", "final norm")
    timers.wrap(fused_decode, "fused_layers", "fused_layers (Python + C++)")
    timers.wrap(runner_module, "sample", "sample")
    timers.wrap(runner_module.SamplingBatch, "build", "SamplingBatch.build")
    kernels = fused_decode.cpu_kernels()
    timed_kernels = _TimedKernels(kernels, timers)
    fused_decode.cpu_kernels = lambda: timed_kernels
    time_decode(engine, 1, 8)  # warm up
    timers.recording = True
    rates = [time_decode(engine, 1, args.tokens) for _ in range(args.reps)]
    # Decode steps only: each run's first step is its one-token prompt.
    steps = [s for s in timers.steps if "decode_layers (C++)" in s]
    labels = list(dict.fromkeys(label for s in steps for label in s))
    print(f"{args.model}, {args.threads} threads, {len(steps)} steps; {statistics.median(rates):.1f} t/s "
          "(median of the runs, with the timers)")
    print(f"| part | median us | p10 us |\n| --- | ---: | ---: |")
    for label in labels:
        values = sorted(s.get(label, 0) / 1000 for s in steps)
        print(f"| {label} | {statistics.median(values):.1f} | {values[len(values) // 10]:.1f} |")


if __name__ == "__main__":
    main()
