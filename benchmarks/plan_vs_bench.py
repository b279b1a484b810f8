"""How close ``cholla plan``'s estimates for this machine come to ``cholla bench``.

    OMP_NUM_THREADS=1 python benchmarks/plan_vs_bench.py --models smollm2 gemma3 -p 64 -n 32 -r 5

On a machine shared with other work the pace drifts by tens of percent from one minute to
the next, so each repetition pairs a measurement with a bench run taken right after it:
this machine measured as ``cholla plan --hardware local`` measures it (where cholla's
kernels run: their one-row int8 GEMV over the model's weights by type, and a ``-p``-row
prompt's products; elsewhere the reference path's dequantization), then one
``cholla bench -p P -n N -r 1``, and the plan's prefill (``-p`` tokens) and single-sequence
decode estimates (over the contexts ``tg{n}`` walks through) divided by the bench's figures.
Prints each pair's ratios and their median, and the load average before each model's pairs.
"""

from __future__ import annotations

import argparse
import os
import statistics

from cholla.bench import run_bench
from cholla.download import resolve_model
from cholla.hardware import hardware_preset
from cholla.kv.kv_types import kv_cache_type
from cholla.plan import decode_step, prefill, read_model_facts, resolve_hardware


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("-p", "--n-prompt", type=int, default=64)
    parser.add_argument("-n", "--n-gen", type=int, default=32)
    parser.add_argument("-r", "--repetitions", type=int, default=5, help="measure-then-bench pairs")
    parser.add_argument("--hardware", default="local", help="a cholla plan preset, or local (default)")
    args = parser.parse_args()
    if args.hardware != "local":
        print("estimate:", hardware_preset(args.hardware).estimate)
    print("| model | rep | load | measured (GB/s; G weights/s by type) | plan pp | bench pp | ratio | plan tg | bench tg | ratio |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    summary = []
    for name in args.models:
        path = resolve_model(name)
        facts = read_model_facts(path)
        pp_ratios, tg_ratios = [], []
        for rep in range(args.repetitions):
            load = os.getloadavg()[0]
            hw = resolve_hardware(args.hardware, None, None, path, facts, args.n_prompt)
            report = run_bench(path, args.n_prompt, args.n_gen, 1, "auto", seed=rep)
            kv = kv_cache_type("auto", report.dtype)
            plan_pp = args.n_prompt / prefill(facts, hw, args.n_prompt).seconds
            plan_tg = 1 / decode_step(facts, hw, kv, kv, 1, 1 + args.n_gen // 2).seconds
            bench = {test.name: test.mean for test in report.tests}
            pp, tg = bench[f"pp{args.n_prompt}"], bench[f"tg{args.n_gen}"]
            pp_ratios.append(plan_pp / pp)
            tg_ratios.append(plan_tg / tg)
            rates = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in (hw.gemv_rates or hw.dequant_rates).items())
            print(f"| {name} | {rep + 1} | {load:.1f} | {hw.bandwidth / 1e9:.1f}; {rates} | {plan_pp:.1f} | {pp:.1f} | "
                  f"{pp_ratios[-1]:.2f} | {plan_tg:.2f} | {tg:.2f} | {tg_ratios[-1]:.2f} |", flush=True)
        summary.append((name, statistics.median(pp_ratios), statistics.median(tg_ratios), min(tg_ratios), max(tg_ratios)))
    for name, pp, tg, low, high in summary:
        print(f"{name}: median plan / bench: pp{args.n_prompt} {pp:.2f}, tg{args.n_gen} {tg:.2f} (range {low:.2f}-{high:.2f})")


if __name__ == "__main__":
    main()
