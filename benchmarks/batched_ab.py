"""The 32 x (128+128) batched run of this checkout against another's (say, main's), in CPU time, taking turns.

On a shared machine the wall time of the same code moves by 2-3x within minutes, so
``compare.py``'s batched column cannot show a few percent. Here each checkout runs in its
own process (``python -c`` in that checkout: it imports that checkout's cholla and builds
its kernels) that loads the model once; then, in turns, each runs the same random prompts
(greedy, ``ignore_eos``) to ``max_tokens=1`` (the prompt phase) and to ``--max-tokens``,
timing each in the process's CPU time. The decode phase is the difference. Best of
``--turns`` for each side, then this side's speed-up:

    OMP_NUM_THREADS=1 python benchmarks/batched_ab.py --baseline ../main --model gemma3 --turns 4

One thread (``OMP_NUM_THREADS=1``) is what CPU time measures without counting a team's
waits; set ``TORCH_EXTENSIONS_DIR`` apart when both checkouts hold the same sources.
``--threads 2`` runs both sides with a team of two (what ``throughput.py`` runs) and compares
wall times instead, best and median of the turns (a team's waits count there, and so does
the machine's load: take many turns). The decode steps are also timed one by one (every
sequence decoding): on a busy machine a run's p10 step is the least disturbed figure:

    OMP_NUM_THREADS=1 python benchmarks/batched_ab.py --baseline ../main --model gemma3 --threads 2 --turns 8

``--prompt-only`` times the prompt phase alone (``max_tokens=1``), more turns in the same time:

    OMP_NUM_THREADS=1 python benchmarks/batched_ab.py --baseline ../main --threads 2 --prompt-only --turns 12
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One side: load the model, say so, then per line read run the prompts to 1 and to n tokens, print both times
# and the median and p10 of the decode steps of the second run (every sequence decoding), each timed alone;
# a line "prompt" runs the first only (nan for the rest).
WORKER = """
import sys, time
sys.path.insert(0, "benchmarks")
from throughput import random_prompts
from cholla import LLM, SamplingParams
from cholla.download import resolve_model
model, num, length, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = LLM(resolve_model(model), max_num_seqs=num, max_model_len=length + n + 16, threads=threads or None)
prompts = [{"prompt_token_ids": p} for p in random_prompts(num, length, llm.engine.model_config.vocab_size, 0)]
llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up

engine, clock = llm.engine, time.perf_counter if threads else time.process_time
steps, step = [], engine.step

def timed_step(*args, **kwargs):  # each step of all `num` sequences decoding, timed alone
    scheduler = engine.scheduler
    decoding = not scheduler.waiting and len(scheduler.running) == num and all(
        r.num_computed_tokens >= len(r.prompt_token_ids) for r in scheduler.running)
    start = clock()
    try:
        return step(*args, **kwargs)
    finally:
        if decoding:
            steps.append(clock() - start)

engine.step = timed_step

def seconds(max_tokens):
    engine.block_manager.reset_prefix_cache()
    steps.clear()
    start = clock()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return clock() - start

print("ready", flush=True)
for line in sys.stdin:
    prompt = seconds(1)
    if line.strip() == "prompt":
        print(prompt, "nan nan nan", flush=True)
        continue
    whole = seconds(n)
    steps.sort()
    print(prompt, whole, steps[len(steps) // 2], steps[len(steps) // 10], flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the other cholla checkout")
    parser.add_argument("--model", default="gemma3")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--turns", type=int, default=4, help="runs per side, taking turns")
    parser.add_argument("--threads", type=int, default=0,
                        help="a team of this many threads on each side, timed in wall seconds (default: CPU time "
                             "at the environment's threads)")
    parser.add_argument("--prompt-only", action="store_true", help="time the prompt phase (max_tokens=1) alone")
    args = parser.parse_args()

    command = [sys.executable, "-c", WORKER, args.model, str(args.num_requests), str(args.prompt_len), str(args.max_tokens),
               str(args.threads)]
    clock = f"wall s, {args.threads} threads" if args.threads else "CPU s"
    sides = {name: subprocess.Popen(command, cwd=checkout, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for name, checkout in (("this", ROOT), ("baseline", args.baseline.resolve()))}
    parts = ("prompt",) if args.prompt_only else ("whole", "prompt", "decode", "step median", "step p10")
    times = {name: {part: [] for part in parts} for name in sides}
    try:
        for name, process in sides.items():
            if process.stdout.readline().strip() != "ready":
                raise SystemExit(f"the {name} side did not start (see its error above)")
        for turn in range(args.turns):
            for name in ("this", "baseline") if turn % 2 else ("baseline", "this"):
                sides[name].stdin.write("prompt\n" if args.prompt_only else "go\n")
                sides[name].stdin.flush()
                prompt, whole, step, step_p10 = map(float, sides[name].stdout.readline().split())
                if args.prompt_only:
                    print(f"turn {turn} {name}: prompt {prompt:.3f} s ({clock})", flush=True)
                    times[name]["prompt"].append(prompt)
                    continue
                print(f"turn {turn} {name}: prompt {prompt:.2f} s, whole {whole:.2f} s, decode {whole - prompt:.2f}, "
                      f"a decode step {1000 * step:.2f} ms (p10 {1000 * step_p10:.2f}) ({clock})", flush=True)
                for part, value in zip(parts, (whole, prompt, whole - prompt, step, step_p10)):
                    times[name][part].append(value)
    finally:
        for process in sides.values():
            process.stdin.close()
            process.wait()
    print(f"\n{args.model}, {args.num_requests} x ({args.prompt_len}+{args.max_tokens}), {clock}, {args.turns} turns")
    print("| part | baseline best | this best | speed-up | baseline median | this median | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for part in parts:
        b, t = times["baseline"][part], times["this"][part]
        b_med, t_med = statistics.median(b), statistics.median(t)
        scale = 1000 if part.startswith("step") else 1  # (steps in ms)
        print(f"| {part} | {scale * min(b):.3f} | {scale * min(t):.3f} | {min(b) / min(t):.3f}x | {scale * b_med:.3f} | "
              f"{scale * t_med:.3f} | {b_med / t_med:.3f}x |")
    if args.prompt_only:
        return
    # Turn by turn: each turn's two runs are neighbours in time, so their ratio shares the minute's load.
    for part in ("decode", "step p10"):
        ratios = [b / t for b, t in zip(times["baseline"][part], times["this"][part])]
        print(f"{part}, baseline / this turn by turn: {' '.join(f'{r:.2f}' for r in ratios)} "
              f"(median {statistics.median(ratios):.2f})")


if __name__ == "__main__":
    main()
