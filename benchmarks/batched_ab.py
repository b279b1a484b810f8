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
``--threads 2 --wall --prompt-only`` times the prompt phase alone in wall time with the team
of two (more turns then: wall time moves with the machine's load; medians are printed too):

    OMP_NUM_THREADS=1 python benchmarks/batched_ab.py --baseline ../main --threads 2 --wall --prompt-only --turns 12
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One side: load the model, say so, then per line read run the prompts to 1 and to n tokens, print both CPU times.
WORKER = """
import sys, time
sys.path.insert(0, "benchmarks")
from throughput import random_prompts
from cholla import LLM, SamplingParams
from cholla.download import resolve_model
model, num, length, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
threads, clock = int(sys.argv[5]) or None, time.perf_counter if sys.argv[6] == "wall" else time.process_time
llm = LLM(resolve_model(model), max_num_seqs=num, max_model_len=length + n + 16, threads=threads)
prompts = [{"prompt_token_ids": p} for p in random_prompts(num, length, llm.engine.model_config.vocab_size, 0)]
llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up

def cpu_seconds(max_tokens):
    llm.engine.block_manager.reset_prefix_cache()
    start = clock()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return clock() - start

print("ready", flush=True)
for line in sys.stdin:
    print(cpu_seconds(1), cpu_seconds(n) if line.strip() == "go" else float("nan"), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the other cholla checkout")
    parser.add_argument("--model", default="gemma3")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--turns", type=int, default=4, help="runs per side, taking turns")
    parser.add_argument("--threads", type=int, default=0, help="fixed threads for every step (0: the default)")
    parser.add_argument("--wall", action="store_true", help="wall time instead of the process's CPU time")
    parser.add_argument("--prompt-only", action="store_true", help="time the prompt phase (max_tokens=1) alone")
    args = parser.parse_args()

    command = [sys.executable, "-c", WORKER, args.model, str(args.num_requests), str(args.prompt_len), str(args.max_tokens),
               str(args.threads), "wall" if args.wall else "cpu"]
    sides = {name: subprocess.Popen(command, cwd=checkout, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for name, checkout in (("this", ROOT), ("baseline", args.baseline.resolve()))}
    runs = {name: {"prompt": [], "whole": [], "decode": []} for name in sides}
    try:
        for name, process in sides.items():
            if process.stdout.readline().strip() != "ready":
                raise SystemExit(f"the {name} side did not start (see its error above)")
        for turn in range(args.turns):
            for name in ("this", "baseline") if turn % 2 else ("baseline", "this"):
                sides[name].stdin.write("prompt\n" if args.prompt_only else "go\n")
                sides[name].stdin.flush()
                prompt, whole = map(float, sides[name].stdout.readline().split())
                print(f"turn {turn} {name}: prompt {prompt:.3f} s, whole {whole:.2f} s, decode {whole - prompt:.2f} s",
                      flush=True)
                for part, value in (("prompt", prompt), ("whole", whole), ("decode", whole - prompt)):
                    runs[name][part].append(value)
    finally:
        for process in sides.values():
            process.stdin.close()
            process.wait()
    clock = "wall" if args.wall else "CPU"
    print(f"\n{args.model}, {args.num_requests} x ({args.prompt_len}+{args.max_tokens}), {clock} s, "
          f"{args.threads or 'default'} threads, best and median of {args.turns}")
    print("| part | baseline best | this best | speed-up | baseline median | this median | speed-up |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for part in ("prompt",) if args.prompt_only else ("whole", "prompt", "decode"):
        (b, bm), (t, tm) = ((min(runs[s][part]), statistics.median(runs[s][part])) for s in ("baseline", "this"))
        print(f"| {part} | {b:.3f} | {t:.3f} | {b / t:.3f}x | {bm:.3f} | {tm:.3f} | {bm / tm:.3f}x |")


if __name__ == "__main__":
    main()
