"""The bf16 path's batched products, per row count and weight type: int8 (``qgemv_int8``,
VNNI on the weights' own integers) against bf16 strips (``qmatmul``: AMX tiles, or
AVX512-BF16 where the CPU has no AMX).

For each model it takes one decode layer's product groups as the fused step makes
them (q+k+v, o, gate+up, down) and the output head, and times both kernels at each
row count; the last column is the int8 kernel's speed-up. Up to 8 rows the exact fp32
GEMV (``qgemv``: what a type without an int8 kernel gets there) is timed too. ``INT8_BATCH_MAX_ROWS``
in cholla/layers/linear.py is picked from this table (docs/benchmarks.md).

``--generate N``: instead, N sequences x (32 prompt + 32 generated tokens) through
the engine, alternately with decode steps routed to the batched int8 product and
to the bf16 strips (``int8_batch_max_rows`` forced to 0), three runs each, in one
process: total tokens/s.

    OMP_NUM_THREADS=1 python benchmarks/batched_products.py --models smollm2 gemma3 --rows 1 6 7 8 16 32 64

``--baseline CHECKOUT``: instead, the int8 product alone, this checkout's against
another's (say, main's), each in its own process (``python -c`` in that checkout, so
it imports that checkout's kernels), taking turns for every measurement, ``--turns``
times each; best of each side, then this side's speed-up:

    OMP_NUM_THREADS=1 python benchmarks/batched_products.py --baseline /work/main --cpu-time --rows 7 13 32

``--cpu-time`` times each call in this thread's CPU time instead of wall time: on
a shared machine, a product longer than a time slice (the heads) is preempted
in every run, so its best wall time says more about the load than about the
kernel. (One thread only: other threads' work is not counted.)
    OMP_NUM_THREADS=1 python benchmarks/batched_products.py --models smollm2 gemma3 --generate 32

Past 64 rows (a prompt's products) the int8 column is ``qmatmul_int8`` and the
dense bf16 column is what such steps took before (the weight dequantized to bf16,
one oneDNN matmul); the speed-up is over the faster bf16 one. ``--models`` also
takes GGUF paths, such as the hybrid benchmarks' (``benchmarks/hybrid_prefill.py``):

    OMP_NUM_THREADS=1 python benchmarks/batched_products.py --cpu-time --rows 128 512 \
        --models ~/.cache/cholla/bench-qwen35/qwen35-h1024-l8-v32000.Q4_0.gguf

``--prefill N``: instead, one N-token prompt through each model's layers, in thread
CPU time, with prompts' products on the batched int8 kernel and on bf16 taking turns:

    OMP_NUM_THREADS=1 python benchmarks/batched_products.py --models smollm2 gemma3 --prefill 512
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cholla.download import resolve_model
from cholla.formats.gguf import read_gguf
from cholla.kernels import amx_tiles, cpu_kernels


# A layer's product groups as the models make them (one call each), by GGUF tensor names;
# the first layer that has every tensor of a group gives it.
PRODUCTS = {
    "qkv": ["attn_q", "attn_k", "attn_v"],
    "o": ["attn_output"],
    "deltanet in": ["attn_qkv", "attn_gate", "ssm_beta", "ssm_alpha"],  # Qwen 3.5's Gated DeltaNet
    "ssm out": ["ssm_out"],  # Gated DeltaNet's and Mamba-2's output projection
    "mamba in": ["ssm_in"],
    "gate+up": ["ffn_gate", "ffn_up"],
    "down": ["ffn_down"],
}


def groups(path) -> dict[str, list]:
    """name -> the GGUF tensors one product call reads (the first layer's that has them, and the head)."""
    tensors = read_gguf(path).tensors
    layers = sorted({int(n.split(".")[1]) for n in tensors if n.startswith("blk.")})
    found = {}
    for product, names in PRODUCTS.items():
        for layer in layers:
            group = [tensors.get(f"blk.{layer}.{n}.weight") for n in names]
            if all(t is not None for t in group):
                found[product] = group
                break
    found["head"] = [tensors.get("output.weight", tensors["token_embd.weight"])]
    for layer in layers:  # a down projection of another type (Gemma 3 mixes Q4_K and Q6_K)
        down = tensors.get(f"blk.{layer}.ffn_down.weight")
        if down is not None and down.qtype != found["down"][0].qtype:
            found[f"down (layer {layer})"] = [down]
            break
    return found


def best_ms(fn, min_seconds: float, clock=time.perf_counter) -> float:
    fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 3:
        t = clock()
        fn()
        times.append(clock() - t)
    return min(times) * 1e3


# One side of --baseline: time the int8 product of (model, product, rows) for each line read.
WORKER = """
import functools, sys, time, torch
sys.path.insert(0, "benchmarks")
from batched_products import best_ms, groups
from cholla.download import resolve_model
from cholla.kernels import cpu_kernels
kernels, seconds, clock = cpu_kernels(), float(sys.argv[1]), time.thread_time if sys.argv[2] == "cpu" else time.perf_counter
found = {}
print("ready", flush=True)
for line in sys.stdin:
    model, product, rows = line.rstrip("\\n").split("\\t")
    if model not in found:
        found[model] = groups(resolve_model(model))
    tensors = found[model][product]
    weights, types = [t.data for t in tensors], [int(t.qtype) for t in tensors]
    x = torch.randn(int(rows), tensors[0].shape[1])
    out = torch.zeros(int(rows), sum(t.shape[0] for t in tensors))
    product = kernels.qgemv_int8_out if int(rows) <= 64 else kernels.qmatmul_int8_out  # a prompt's beyond 64 rows
    print(best_ms(functools.partial(product, x, weights, types, out), seconds, clock), flush=True)
"""


class Side:
    """A checkout's worker process (WORKER)."""

    def __init__(self, checkout: Path, seconds: float, cpu_time: bool):
        self.process = subprocess.Popen([sys.executable, "-c", WORKER, str(seconds), "cpu" if cpu_time else "wall"],
                                        cwd=checkout, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the worker in {checkout} did not start (see its error above)")

    def time(self, model: str, product: str, rows: int) -> float:
        self.process.stdin.write(f"{model}\t{product}\t{rows}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def baseline_ab(names: list[str], rows_list: list[int], baseline: Path, seconds: float, cpu_time: bool,
                turns: int) -> None:
    sides = {"this": Side(Path(__file__).resolve().parent.parent, seconds, cpu_time),
             "baseline": Side(baseline.resolve(), seconds, cpu_time)}
    print(f"int8 product (qgemv_int8_out; past 64 rows qmatmul_int8_out), best of {turns} turns each, {'CPU' if cpu_time else 'wall'} time; "
          f"baseline {baseline}")
    print("| model | product | types | rows | baseline ms | this ms | speed-up |\n|---|---|---|---:|---:|---:|---:|")
    try:
        for name in names:
            for product, tensors in groups(resolve_model(name)).items():
                if not cpu_kernels().int8_kernel_types([int(t.qtype) for t in tensors]):
                    continue
                type_names = "+".join(sorted({t.qtype.name for t in tensors}))
                for rows in rows_list:
                    best = {"this": float("inf"), "baseline": float("inf")}
                    for turn in range(turns):
                        for side in (("this", "baseline") if turn % 2 else ("baseline", "this")):
                            best[side] = min(best[side], sides[side].time(name, product, rows))
                    print(f"| {name} | {product} | {type_names} | {rows} | {best['baseline']:.3f} | {best['this']:.3f} "
                          f"| {best['baseline'] / best['this']:.2f}x |", flush=True)
    finally:
        for side in sides.values():
            side.close()


def generate_ab(names: list[str], sequences: int, length: int = 32, runs: int = 3) -> None:
    from cholla import LLM, SamplingParams
    from cholla.layers import linear
    from cholla.models import fused_decode

    routed = linear.int8_batch_max_rows

    def route(int8: bool) -> None:
        linear.int8_batch_max_rows = fused_decode.int8_batch_max_rows = routed if int8 else (lambda: 0)

    print(f"| model | decode steps of {sequences} rows on | best t/s | runs |\n|---|---|---:|---|")
    for name in names:
        llm = LLM(name, max_model_len=4 * length, kv_cache_memory=256 * 2**20)
        prompts = [{"prompt_token_ids": [1 + (i * 7 + j) % 500 for j in range(length)]} for i in range(sequences)]
        params = SamplingParams(temperature=0.0, max_tokens=length, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(runs):
            for int8 in (False, True):
                route(int8)
                start = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                rates[int8].append(sequences * 2 * length / (time.perf_counter() - start))
        route(True)
        for int8, label in ((False, "bf16 strips"), (True, "batched int8")):
            runs_text = " / ".join(f"{r:.0f}" for r in rates[int8])
            print(f"| {name} | {label} | {max(rates[int8]):.0f} | {runs_text} |", flush=True)


def prefill_ab(names: list[str], tokens: int, runs: int = 4) -> None:
    """One ``tokens``-token prompt through each model's layers (``prefill_once``: no logits), in this
    thread's CPU time, with prompts' products on the batched int8 kernel and on bf16
    (``linear.INT8_PROMPT_TYPES`` emptied), taking turns: best of ``runs`` each."""
    from cholla import LLM
    from cholla.engine.runner import prefill_once
    from cholla.kv.paged_cache import PagedKVCache
    from cholla.layers import linear

    routed = linear.INT8_PROMPT_TYPES
    print(f"| model | {tokens}-token prefill, prompts' products on | best CPU ms | runs |\n|---|---|---:|---|")
    for name in names:
        model = LLM(name, max_model_len=2 * tokens, kv_cache_memory=256 * 2**20).engine.loaded.model
        ids = [1 + (7 * j) % 500 for j in range(tokens)]
        times: dict[bool, list[float]] = {False: [], True: []}
        for turn in range(runs + 1):  # the first turn warms up
            for int8 in (False, True) if turn % 2 else (True, False):
                linear.INT8_PROMPT_TYPES = routed if int8 else frozenset()
                cache = PagedKVCache(model.config, num_blocks=-(-tokens // 16), block_size=16)
                start = time.thread_time()
                prefill_once(model, ids, cache)
                if turn:
                    times[int8].append((time.thread_time() - start) * 1e3)
        linear.INT8_PROMPT_TYPES = routed
        for int8, label in ((False, "bf16 (dense oneDNN)"), (True, "batched int8")):
            runs_text = " / ".join(f"{t:.0f}" for t in times[int8])
            print(f"| {name} | {label} | {min(times[int8]):.1f} | {runs_text} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 6, 7, 8, 12, 16, 24, 32, 48, 64])
    parser.add_argument("--seconds", type=float, default=0.3, help="time per measurement (best of its runs)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time in this thread's CPU time, not wall time (a shared machine; one thread)")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="the int8 product only, this checkout's against CHECKOUT's, taking turns (see above)")
    parser.add_argument("--turns", type=int, default=4, help="--baseline: measurements per side")
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="N sequences through the engine, int8 batched decode on and off (see above)")
    parser.add_argument("--prefill", type=int, default=0, metavar="N",
                        help="an N-token prompt through each model, int8 prompt products on and off (see above)")
    args = parser.parse_args()
    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("the C++ kernels do not run on this machine")
    if args.generate:
        return generate_ab(args.models, args.generate)
    if args.prefill:
        if torch.get_num_threads() != 1:
            raise SystemExit("--prefill counts this thread's CPU time: run with OMP_NUM_THREADS=1")
        return prefill_ab(args.models, args.prefill)
    if args.baseline:
        if args.cpu_time and torch.get_num_threads() != 1:
            raise SystemExit("--cpu-time counts this thread alone: run with OMP_NUM_THREADS=1")
        return baseline_ab(args.models, args.rows, args.baseline, args.seconds, args.cpu_time, args.turns)
    if args.cpu_time and torch.get_num_threads() != 1:
        raise SystemExit("--cpu-time counts this thread alone: run with OMP_NUM_THREADS=1")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    print(f"threads {torch.get_num_threads()}, batched products on {'AMX tiles' if amx_tiles() else 'AVX512-BF16'}, "
          f"{'CPU' if args.cpu_time else 'wall'} time")
    print("| model | product | types | rows | int8 ms | bf16 strips ms | dense bf16 ms | int8 speed-up | fp32 GEMV ms |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        for product, tensors in groups(resolve_model(name)).items():
            weights, types = [t.data for t in tensors], [int(t.qtype) for t in tensors]
            type_names = "+".join(sorted({t.qtype.name for t in tensors}))
            if not kernels.int8_kernel_types(types):
                print(f"| {name} | {product} | {type_names} | - | no int8 kernel | | | |")
                continue
            k = tensors[0].shape[1]
            for rows in args.rows:
                x = torch.randn(rows, k)
                out = torch.zeros(rows, sum(t.shape[0] for t in tensors))  # kept, as the engine keeps its logits
                # Up to 64 rows the decode steps' entry (qgemv_int8), beyond it the prompts' (qmatmul_int8).
                int8_call = kernels.qgemv_int8_out if rows <= 64 else kernels.qmatmul_int8_out
                int8, bf16 = (best_ms(functools.partial(call, x, weights, types, out), args.seconds, clock)
                              for call in (int8_call, kernels.qmatmul_out))
                times = [bf16]
                dense = "-"
                if rows > 64:  # a prompt's product before int8: the weight dequantized to bf16, one oneDNN matmul
                    xb = x.to(torch.bfloat16)
                    dense_ms = best_ms(lambda: torch.nn.functional.linear(xb, kernels.dequantize_bf16(weights, types, k)),
                                       args.seconds, clock)
                    times.append(dense_ms)
                    dense = f"{dense_ms:.3f}"
                exact = (f"{best_ms(functools.partial(kernels.qgemv, x, weights, types), args.seconds, clock):.3f}"
                         if rows <= 8 else "-")
                print(f"| {name} | {product} | {type_names} | {rows} | {int8:.3f} | {bf16:.3f} | {dense} "
                      f"| {min(times) / int8:.2f}x | {exact} |", flush=True)

if __name__ == "__main__":
    main()
