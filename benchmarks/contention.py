"""cholla against llama.cpp on a busy machine: prefill and decode tokens/s with 0, 1, 2 ... competing processes.

Each competing process is a CPU-bound busy loop (``python -c "while True: pass"``),
started before the measured program and killed after it. For each model and
each number of them it runs, each in its own process and bounded in time:

- ``cholla bench`` with ``--threads T`` (T: ``--threads``, default one per physical core),
- ``cholla bench`` with its default thread count (the full team for decode steps,
  one thread per core others leave free for prompt steps; the log lines say so),
- ``llama-bench -t T`` on the same GGUF file (with ``--llama-bin-dir``),
- with ``--baseline DIR``, ``cholla bench --threads T`` of another checkout
  (say, main's), under the same busy loops as this one's: an A/B
  (``--baseline-default``: the other checkout's default thread count instead),

and prints ppN / tgN (mean over ``-r`` repetitions) with each program's decode
speed as a share of its own speed without competition.

Taking turns fairly. On a machine others share, one run says little, and
which program goes first under a set of busy loops matters: the last quiet
sitting had the forced team ahead of the default by 1.5x when it always ran
first, and behind when it went second by hand. So ``--rounds N`` repeats the
whole sequence N times, each round in the reverse order of the one before, and
the forced team and the default trade places every two rounds (C D L, L D C,
D C L, L C D: over four rounds every program's mean place is the same, and
neither of the two is always in the middle; see ``round_order``), the busy loops run ``--warm`` seconds before the
first timed program, and each cell is the median over the rounds with the
spread (min-max) beside it. The table's header says the orders. A run that
does not finish within ``--timeout`` seconds counts as 0 (a collapse).

Goals (issue 18): with one busy process per core, cholla keeps at least 40% of
its quiet decode speed and is at least as fast as llama.cpp under the same
load; never below 25%.

    python benchmarks/contention.py --llama-bin-dir /work/llamacpp/bin
    python benchmarks/contention.py --llama-bin-dir /work/llamacpp/bin --models smollm2 --busy 0 2 -n 16 -r 1
    env -u OMP_NUM_THREADS python benchmarks/contention.py --models smollm2 gemma3 --busy 0 2 --rounds 4 -p 128 -n 64
    env -u OMP_NUM_THREADS python benchmarks/contention.py --baseline ../main --baseline-default --rounds 2 -p 128 -n 64

(cholla's default honours ``$OMP_NUM_THREADS``: unset it to measure the default;
the table's header says when it was set.)

Every program runs with the environment this script was given: cholla's own
OpenMP setting (GOMP_SPINCOUNT, which importing cholla sets) is not passed on
to llama-bench, which keeps libgomp's default as its users get it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ)  # as given, before anything here imports cholla
# The baseline builds its kernels in a folder of its own: torch keys a build by the extension's
# name, and two checkouts of the same sources at two paths would rebuild one folder in turn.
BASELINE_ENV = {**ENV, "TORCH_EXTENSIONS_DIR": os.path.join(
    ENV.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions")), "baseline")}
BUSY_LOOP = [sys.executable, "-c", "while True: pass"]


def physical_cores() -> int:
    sys.path.insert(0, str(ROOT))
    from cholla.threads import physical_cores as count  # no torch import happens before this returns

    return count()


def start_busy(count: int, warm: float, own_sessions: bool = False) -> list[subprocess.Popen]:
    """``count`` busy loops, ``warm`` seconds old: the first program timed under them meets loops already running.

    ``own_sessions``: each loop in a session of its own. Where the kernel groups
    tasks by session (``/proc/sys/kernel/sched_autogroup_enabled``), loops in
    this script's session compete with cholla's threads one for one (a team of
    2 against 2 loops gets half the CPUs); loops in sessions of their own, as
    other programs usually are, get a session's share each, however many
    threads cholla runs.
    """
    busy = [subprocess.Popen(BUSY_LOOP, env=ENV, start_new_session=own_sessions) for _ in range(count)]
    time.sleep(warm if count else 0.0)
    return busy


def round_order(programs: list[str], round_index: int) -> list[str]:
    """The programs' order in round ``round_index``: as listed in even rounds, reversed in odd ones,
    with cholla's forced team and its default trading places in rounds 2-3 of every 4.

    Reversing alone (C D L, L D C) keeps the middle program in the middle: over four rounds
    (C D L, L D C, D C L, L C D) every program's mean place is the same, the default and the
    forced team each go first of the two twice, and each of them also takes both ends of a
    round once."""
    order = list(programs)
    if round_index // 2 % 2 and {"cholla", "cholla default"} <= set(order):
        i, j = order.index("cholla"), order.index("cholla default")
        order[i], order[j] = order[j], order[i]
    return order if round_index % 2 == 0 else order[::-1]


def spread(values: list[float], digits: int = 1, range_digits: int = 0) -> str:
    """The median of ``values`` and, over several, their range: ``"213.4 (205-241)"``."""
    middle = f"{statistics.median(values):.{digits}f}"
    return middle if len(values) == 1 else f"{middle} ({min(values):.{range_digits}f}-{max(values):.{range_digits}f})"


def stop_busy(busy: list[subprocess.Popen]) -> None:
    for process in busy:
        process.kill()
    for process in busy:
        process.wait()


def timed(cmd: list[str], timeout: float, cwd: Path = ROOT, env: dict[str, str] = ENV) -> tuple[str, str] | None:
    """(stdout, stderr) of ``cmd`` run in ``cwd``, or None when it ran past ``timeout`` seconds or failed."""
    print(f"[contention] {cwd}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    except subprocess.TimeoutExpired:
        print(f"[contention]   timed out after {timeout:.0f} s", file=sys.stderr, flush=True)
        return None
    print(f"[contention]   {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    if done.returncode != 0:
        print(f"[contention]   failed (exit {done.returncode}): {done.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return done.stdout, done.stderr


def cholla(model: str, threads: int | None, args, checkout: Path = ROOT) -> dict:
    """``python -m cholla bench`` run in ``checkout``, so that it imports that checkout's cholla."""
    cmd = [sys.executable, "-m", "cholla", "bench", model, "-p", str(args.n_prompt), "-n", str(args.n_gen),
           "-r", str(args.repetitions), "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    out = timed(cmd, args.timeout, checkout, ENV if checkout == ROOT else BASELINE_ENV)
    if out is None:
        return {"pp": 0.0, "tg": 0.0, "threads": threads, "note": "timed out or failed"}
    report = json.loads(out[0].strip().splitlines()[-1])
    tests = {t["name"][:2]: t["mean"] for t in report["tests"]}
    # the default's thread choices: at start, and each change of the prompt steps' count
    note = " / ".join(line.split("cholla: ", 1)[-1] for line in out[1].splitlines() if "cores busy" in line)
    return {"pp": tests.get("pp", 0.0), "tg": tests.get("tg", 0.0), "threads": report["threads"], "note": note}


def llama_cpp(model_path: Path, threads: int, args) -> dict:
    cmd = [str(args.llama_bin_dir / "llama-bench"), "-m", str(model_path), "-p", str(args.n_prompt),
           "-n", str(args.n_gen), "-r", str(args.repetitions), "-t", str(threads), "-o", "json"]
    out = timed(cmd, args.timeout)
    if out is None:
        return {"pp": 0.0, "tg": 0.0, "threads": threads, "note": "timed out or failed"}
    result = {"pp": 0.0, "tg": 0.0, "threads": threads, "note": ""}
    for entry in json.loads(out[0][out[0].find("["):]):
        result["pp" if entry["n_gen"] == 0 else "tg"] = entry["avg_ts"]
    return result


def resolve(model: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from cholla.download import resolve_model

    return resolve_model(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-bin-dir", type=Path, default=None, help="folder with llama-bench (none: no llama.cpp)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another cholla checkout to run at the fixed threads beside this one (an A/B)")
    parser.add_argument("--baseline-default", action="store_true",
                        help="run the baseline with its default thread count, not --threads")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeats, in turned orders (see round_order; 4 for fair places); each figure is their median")
    parser.add_argument("--warm", type=float, default=5.0,
                        help="seconds the busy loops run before the first timed program")
    parser.add_argument("--own-sessions", action="store_true",
                        help="start each busy loop in a session of its own (see start_busy)")
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="competing busy loops per run")
    parser.add_argument("-p", "--n-prompt", type=int, default=64)
    parser.add_argument("-n", "--n-gen", type=int, default=16)
    parser.add_argument("-r", "--repetitions", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="threads of the fixed runs (default: physical cores)")
    parser.add_argument("--dtype", default=None, help="cholla's --dtype (default: its own)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one run may take before it counts as 0")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    threads = args.threads or physical_cores()
    if 0 not in args.busy:
        parser.error("--busy needs 0: the quiet run each share is taken of")

    baseline = "baseline default" if args.baseline_default else "baseline"
    programs = ["cholla"] + ([baseline] if args.baseline else []) + ["cholla default"]
    # Build each checkout's kernels first, untimed: a run killed at --timeout while it builds
    # leaves torch's build lock behind, and every later run waits on it.
    for checkout, env in [(ROOT, ENV)] + ([(args.baseline.resolve(), BASELINE_ENV)] if args.baseline else []):
        subprocess.run([sys.executable, "-c", "from cholla.kernels import cpu_kernels; cpu_kernels()"],
                       cwd=checkout, env=env, check=True)
    programs += ["llama.cpp"] if args.llama_bin_dir else []
    pair = ("cholla default", baseline) if args.baseline_default else ("cholla", baseline)  # the A/B
    runs: dict[tuple[str, int, str], list[dict]] = {}
    loads: dict[tuple[str, int], list[float]] = {}
    for round_index in range(args.rounds):
        order = round_order(programs, round_index)
        for model in args.models:
            model_path = resolve(model)
            for busy_count in sorted(args.busy):
                busy = start_busy(busy_count, args.warm, args.own_sessions)
                try:
                    loads.setdefault((model, busy_count), []).append(os.getloadavg()[0])
                    for name in order:
                        if name == "llama.cpp":
                            run = llama_cpp(model_path, threads, args)
                        else:
                            checkout = args.baseline.resolve() if name == baseline else ROOT
                            run = cholla(str(model_path), None if name.endswith("default") else threads, args, checkout)
                        runs.setdefault((model, busy_count, name), []).append(run)
                finally:
                    stop_busy(busy)
    rows = []
    for (model, busy_count), load in loads.items():
        row = {"model": model, "busy": busy_count, "loadavg": statistics.median(load)}
        for name in programs:
            done = runs[(model, busy_count, name)]
            row[name] = {**done[0], "pp": statistics.median(r["pp"] for r in done),
                         "tg": statistics.median(r["tg"] for r in done),
                         "pp_runs": [r["pp"] for r in done], "tg_runs": [r["tg"] for r in done]}
        rows.append(row)

    orders = " / ".join(", ".join(round_order(programs, i)) for i in range(min(args.rounds, 4)))
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, {threads} threads for the fixed runs, "
          f"pp{args.n_prompt} / tg{args.n_gen}, {args.repetitions} repetitions, {args.rounds} round(s) "
          f"(median, range over rounds), busy loops warmed {args.warm:.0f} s"
          f"{', each in its own session' if args.own_sessions else ''}, "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}; baseline: {args.baseline}")
    print(f"orders of rounds 1-{min(args.rounds, 4)} (then again): {orders}" if args.rounds > 1 else f"order: {orders}")
    if omp_num_threads := ENV.get("OMP_NUM_THREADS"):
        print(f"OMP_NUM_THREADS={omp_num_threads} was set: 'cholla default' took that count, not its own default")
    print()
    print("| model | busy loops | load (1 min) | program | threads | pp t/s | tg t/s | tg share of quiet |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    quiet = {(row["model"], name): row[name]["tg"] for row in rows if row["busy"] == 0 for name in programs}
    for row in rows:
        for name in programs:
            run = row[name]
            base = quiet[(row["model"], name)]
            share = f"{100 * run['tg'] / base:.0f}%" if base else "-"
            print(f"| {row['model']} | {row['busy']} | {row['loadavg']:.1f} | {name} | {run['threads']} "
                  f"| {spread(run['pp_runs'])} | {spread(run['tg_runs'])} | {share} |")
    print()
    for row in rows:
        if row["busy"] != threads:
            continue
        for name in ("cholla", "cholla default"):
            base = quiet[(row["model"], name)]
            share = row[name]["tg"] / base if base else 0.0
            verdict = "met" if share >= 0.4 else "MISSED" if share >= 0.25 else "COLLAPSED"
            line = (f"{row['model']}, one busy loop per core: {name} keeps {100 * share:.1f}% of its quiet decode "
                    f"(goal >= 40%, never < 25%): {verdict}")
            if "llama.cpp" in row:
                faster = row[name]["tg"] >= row["llama.cpp"]["tg"]
                line += (f"; {'at least as fast as' if faster else 'SLOWER than'} llama.cpp "
                         f"({row[name]['tg']:.1f} vs {row['llama.cpp']['tg']:.1f} t/s)")
            print(line)
    # Each round's pair ran under the same busy loops, one right after the other: their ratio per round
    # says more than the ratio of the medians when the load moves between rounds.
    pairs = [("cholla default", "cholla")] + ([pair] if args.baseline else [])
    for first, second in pairs:
        for row in rows:
            ratios = {test: [a / b for a, b in zip(row[first][f"{test}_runs"], row[second][f"{test}_runs"]) if b]
                      for test in ("pp", "tg")}
            said = [f"{test} {spread(ratios[test], 2, 2)}x" if ratios[test] else f"{test} -"
                    for test in ("pp", "tg")]
            tg_runs = [[round(r) for r in row[name]["tg_runs"]] for name in (first, second)]
            print(f"{row['model']}, {row['busy']} busy loop(s): {first} / {second}, per round: {', '.join(said)} "
                  f"(tg runs {tg_runs[0]} vs {tg_runs[1]})")
    for name in programs:
        if name.endswith("default"):
            for note in sorted({row[name]["note"] for row in rows if row[name]["note"]}):
                print(f"{name}: {note}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
