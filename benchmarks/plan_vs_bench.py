"""How close ``cholla plan``'s estimates for this machine come to ``cholla bench``.

    OMP_NUM_THREADS=1 python benchmarks/plan_vs_bench.py --models smollm2 gemma3 -p 64 -n 32 -r 3

Per model: this machine measured as ``cholla plan --hardware local`` measures it, right
before and right after the bench run (the two averaged: on a shared machine the pace
drifts), then the plan's prefill (``-p`` tokens) and single-sequence decode estimates (over
the contexts ``tg{n}`` walks through) next to the bench's figures.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from cholla.bench import run_bench
from cholla.download import resolve_model
from cholla.hardware import Hardware
from cholla.kv.kv_types import kv_cache_type
from cholla.plan import decode_step, prefill, read_model_facts, resolve_hardware


def _average(a: Hardware, b: Hardware) -> Hardware:
    def mean(x, y):
        return None if x is None else (x + y) / 2

    rates = {k: (a.dequant_rates[k] + b.dequant_rates[k]) / 2 for k in a.dequant_rates}
    return replace(a, bandwidth=mean(a.bandwidth, b.bandwidth), flops=mean(a.flops, b.flops),
                   fp32_flops=mean(a.fp32_flops, b.fp32_flops), dequant_rates=rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("-p", "--n-prompt", type=int, default=64)
    parser.add_argument("-n", "--n-gen", type=int, default=32)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--hardware", default="local", help="a cholla plan preset, or local (default)")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        path = resolve_model(name)
        facts = read_model_facts(path)
        before = resolve_hardware(args.hardware, None, None, path)
        report = run_bench(path, args.n_prompt, args.n_gen, args.repetitions, "auto")
        hw = _average(before, resolve_hardware(args.hardware, None, None, path))
        kv = kv_cache_type("auto", report.dtype)
        plan_pp = args.n_prompt / prefill(facts, hw, args.n_prompt).seconds
        plan_tg = 1 / decode_step(facts, hw, kv, kv, 1, 1 + args.n_gen // 2).seconds
        bench = {test.name: test for test in report.tests}
        pp, tg = bench[f"pp{args.n_prompt}"], bench[f"tg{args.n_gen}"]
        rows.append((name, report.dtype, hw, plan_pp, pp, plan_tg, tg))
    print("| model | dtype | hardware | plan pp t/s | bench pp t/s | plan / bench | plan tg t/s | bench tg t/s | plan / bench |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, dtype, hw, plan_pp, pp, plan_tg, tg in rows:
        rates = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in hw.dequant_rates.items())
        print(f"| {name} | {dtype} | {hw.bandwidth / 1e9:.1f} GB/s; {rates} G/s | {plan_pp:.1f} | {pp.mean:.1f} ± {pp.sd:.1f} "
              f"| {plan_pp / pp.mean:.2f} | {plan_tg:.2f} | {tg.mean:.2f} ± {tg.sd:.2f} | {plan_tg / tg.mean:.2f} |")


if __name__ == "__main__":
    main()
