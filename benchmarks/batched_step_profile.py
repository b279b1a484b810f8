"""Where a batched decode step's wall time goes: Gemma 3's 32 rows, part by part, at a given team size.

``--seqs`` random prompts of ``--prompt-len`` tokens are prefilled, then every decode step
(greedy, ``ignore_eos``, ``--steps`` of them) is timed with ``time.perf_counter_ns`` around the
engine's parts: the scheduler, the runner's tensors, the embedding, the layers' one C++ call
(``decode_layers``), the final norm, the head's greedy product (``greedy_tokens``), the outputs.
The rest of ``runner.execute`` and ``engine.step`` is their Python. Medians and p10 over
``--reps`` runs; also the process's CPU time a step (at two threads, past the wall time by what
the team's members spent, waits included). "Python" is the step less the two kernel calls:

    OMP_NUM_THREADS=1 python benchmarks/batched_step_profile.py --model gemma3 --threads 2 --reps 3

Run it with ``--threads 1`` and ``--threads 2`` in turns: each part's ratio is its scaling. On a
busy machine, ``--threads 1 --thread-time`` times every part in the thread's CPU time instead
(what the load cannot spoil; the wrappers then cost ~1 us each).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's cholla
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_profile import Timers, _TimedKernels  # noqa: E402
from throughput import random_prompts  # noqa: E402

from cholla import LLM, SamplingParams  # noqa: E402
from cholla.download import resolve_model  # noqa: E402
from cholla.models import fused_decode  # noqa: E402

PARTS = ("engine.step", "process CPU", "Python", "scheduler.schedule", "runner.execute", "runner._prepare", "embedding",
         "decode_layers (C++)", "final norm", "head (greedy_tokens)", "engine._postprocess")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--thread-time", action="store_true", help="time the parts in thread CPU time (one thread)")
    args = parser.parse_args()
    llm = LLM(resolve_model(args.model), max_num_seqs=args.seqs, max_model_len=args.prompt_len + args.steps + 16,
              threads=args.threads)
    engine = llm.engine
    model = engine.loaded.model
    clock = time.thread_time_ns if args.thread_time else time.perf_counter_ns
    timers = Timers(clock)  # (step_profile's: each part's nanoseconds in the current step)
    step, wrap = timers.step, timers.wrap
    wrap(engine.scheduler, "schedule", "scheduler.schedule")
    wrap(engine.runner, "execute", "runner.execute")
    wrap(engine.runner, "_prepare", "runner._prepare")
    wrap(engine, "_postprocess", "engine._postprocess")
    wrap(model, "greedy_tokens", "head (greedy_tokens)")
    wrap(model.embed_tokens, "forward", "embedding")
    wrap(model.norm, "forward", "final norm")
    timed_kernels = _TimedKernels(fused_decode.cpu_kernels(), timers)
    fused_decode.cpu_kernels = lambda: timed_kernels
    prompts = [{"prompt_token_ids": p} for p in random_prompts(args.seqs, args.prompt_len, engine.model_config.vocab_size, 0)]
    steps: list[dict[str, int]] = []
    for _ in range(args.reps):
        engine.block_manager.reset_prefix_cache()
        for prompt in prompts:
            engine.add_request(None, prompt, SamplingParams(temperature=0.0, max_tokens=args.steps + 1, ignore_eos=True))
        while engine.scheduler.waiting or any(r.num_computed_tokens < len(r.prompt_token_ids)
                                              for r in engine.scheduler.running):
            engine.step()  # the prompts
        while engine.has_unfinished_requests():
            step.clear()
            wall, cpu = clock(), time.process_time_ns()
            engine.step(finished_only=True)  # as LLM.generate runs it
            step["engine.step"] = clock() - wall
            step["process CPU"] = time.process_time_ns() - cpu
            step["Python"] = step["engine.step"] - step.get("decode_layers (C++)", 0) - step.get("head (greedy_tokens)", 0)
            if step.get("decode_layers (C++)") and len(engine.scheduler.running) == args.seqs:
                steps.append(dict(step))
    print(f"{args.model}, {args.seqs} rows, {args.threads} threads, {len(steps)} decode steps, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| part | median us | p10 us |\n| --- | ---: | ---: |")
    for label in PARTS:
        values = sorted(s.get(label, 0) / 1000 for s in steps)
        print(f"| {label} | {statistics.median(values):.1f} | {values[len(values) // 10]:.1f} |")


if __name__ == "__main__":
    main()
