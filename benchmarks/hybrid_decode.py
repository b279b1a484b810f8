"""Where a hybrid or MoE model's decode step goes: time per op kind and Python between ops.

For each GGUF file and batch size (sequences decoding together), the engine decodes a few
warm-up steps, then times ``-n`` steps (median step time and tokens/s), then runs ``-n`` more
under ``torch.profiler`` and sums the ops' self time by kind: the quantized products
(``qgemv*``, ``qmatmul*``), the recurrent state steps (conv, SSD, delta rule), the fused
layer calls (``mamba2_decode``, ``moe_decode``, ``decode_layers``: products and state steps
inside them), attention, the other torch ops, and what is left of the profiled step's wall
time: Python between ops. ``--compare`` also runs each case with the one-call hybrid layers
switched off (the per-op PyTorch-driven layers), alternating the two ``-r`` times, best of each.

``--vs-llama`` instead times cholla and llama.cpp on each file in turns, ``-r`` rounds of one
run each (``benchmarks/qwen35.py``'s harness: ``tg`` at depth 0 and each ``--depth``, 32
sequences decoding together; llama.cpp: ``llama-bench``, ``llama-batched-bench``), so a
machine whose load moves between runs moves both engines alike; best and mean of the rounds.

    python benchmarks/hybrid_decode.py ~/.cache/cholla/bench-mamba2/*Q4_0.gguf --batch 1 32 --compare
    python benchmarks/hybrid_decode.py FILE.gguf --vs-llama -n 128 -r 3 --depth 4096
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.compare import machine  # noqa: E402

KINDS = [  # (label, op name prefixes), first match wins
    ("products", ("cholla::qgemv", "cholla::qmatmul")),
    ("state steps", ("cholla::ssd_step", "cholla::causal_conv_step", "cholla::gated_delta_rule_step",
                     "cholla::gated_rms_norm")),
    ("fused layers", ("cholla::mamba2_decode", "cholla::deltanet_decode", "cholla::moe_decode",
                      "cholla::decode_layers")),
    ("attention", ("cholla::paged_attention", "cholla::write_kv")),
    ("norms, activations", ("cholla::rms_norm", "cholla::gated_activation")),
    ("other torch ops", ("",)),
]


@contextlib.contextmanager
def per_op_layers():
    """The hybrid layers as before their one-call kernels: Mamba-2, Gated DeltaNet and MoE layers op by op."""
    from cholla.layers import gated_deltanet, mamba2, moe

    saved = mamba2.Mamba2Mixer.decode_layer, gated_deltanet.GatedDeltaNet.decode_layer, moe.SparseMoE._kernel_forward
    mamba2.Mamba2Mixer.decode_layer = gated_deltanet.GatedDeltaNet.decode_layer = lambda self, *args: None
    moe.SparseMoE._kernel_forward = lambda self, x: None
    try:
        yield
    finally:
        mamba2.Mamba2Mixer.decode_layer, gated_deltanet.GatedDeltaNet.decode_layer, moe.SparseMoE._kernel_forward = saved


def engine_for(path: Path, threads: int):
    from cholla.engine.engine import EngineConfig, LLMEngine

    return LLMEngine(path, EngineConfig(max_model_len=2048, max_num_batched_tokens=256, kv_cache_memory=256 * 2**20,
                                        enable_prefix_caching=False, threads=threads, max_num_seqs=32))


def decoding(engine, batch: int):
    """``batch`` sequences past their prompts, decoding for as long as the engine is stepped."""
    from cholla.sampling.params import SamplingParams

    for request in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        engine.abort(request.request_id)
    greedy = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)
    for i in range(batch):
        engine.add_request(None, {"prompt_token_ids": [1 + i, 2, 3]}, greedy)
    for _ in range(4):  # the prompts, then a few decode steps
        engine.step()


def step_ms(engine, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def profile(engine, steps: int) -> dict[str, float]:
    """ms per step by op kind, and "Python between ops" (the profiled wall time less all ops' self time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - start
    out = {label: 0.0 for label, _ in KINDS}
    for event in prof.key_averages():
        label = next(label for label, prefixes in KINDS if event.key.startswith(prefixes))
        out[label] += event.self_cpu_time_total / 1e3 / steps
    out["Python between ops"] = wall * 1e3 / steps - sum(out.values())
    out["profiled step"] = wall * 1e3 / steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("-n", "--steps", type=int, default=32)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare", action="store_true", help="also time the per-op layers, interleaved")
    parser.add_argument("--vs-llama", action="store_true", help="cholla against llama.cpp, in turns (see above)")
    parser.add_argument("--depth", type=int, nargs="+", default=[4096], help="with --vs-llama: tg after this context")
    parser.add_argument("-p", "--n-prompt", type=int, default=512, help="with --vs-llama: prompt and prefill chunk")
    parser.add_argument("--llama-bin-dir", type=Path, default=Path("/work/llamacpp/bin"))
    args = parser.parse_args()
    if args.vs_llama:
        return versus_llama(args)

    print(f"Machine: {machine()}; threads {args.threads}.\n")
    labels = [label for label, _ in KINDS] + ["Python between ops"]
    print("| file | batch | layers | step ms | t/s | profiled step ms | " + " | ".join(labels) + " |")
    print("|---" * (6 + len(labels)) + "|")
    for path in args.files:
        engine = engine_for(path, args.threads)
        for batch in args.batch:
            variants = {"one call": contextlib.nullcontext}
            if args.compare:
                variants["per op"] = per_op_layers
            best = {name: float("inf") for name in variants}
            for _ in range(args.repetitions):  # A, B, A, B, ...: the machine's load moves both alike
                for name, variant in variants.items():
                    with variant():
                        decoding(engine, batch)
                        best[name] = min(best[name], step_ms(engine, args.steps))
            for name, variant in variants.items():
                with variant():
                    decoding(engine, batch)
                    kinds = profile(engine, args.steps)
                cells = [f"{kinds[label]:.2f}" for label in labels]
                print(f"| {path.name} | {batch} | {name} | {best[name]:.2f} | {batch * 1e3 / best[name]:.1f} | "
                      f"{kinds['profiled step']:.2f} | " + " | ".join(cells) + " |", flush=True)


def versus_llama(args) -> None:
    """tg, tg at each depth and 32-sequence decode of both engines, alternating run by run."""
    from types import SimpleNamespace

    from benchmarks.compare import stats
    from benchmarks.qwen35 import cholla_all, llama_all

    one = SimpleNamespace(**{**vars(args), "repetitions": 1, "n_gen": args.steps})
    keys = ["tg", *(f"tg@{depth}" for depth in args.depth), "batch"]
    print(f"Machine: {machine()}; threads {args.threads}; {args.repetitions} rounds, cholla then llama.cpp in each.\n")
    print(f"| file | engine | tg{args.steps} t/s best (mean) | "
          + "".join(f"tg{args.steps} @ d{depth} best (mean) | " for depth in args.depth)
          + f"32 x tg{args.steps} total t/s best (mean) |")
    print("|---" * (2 + len(keys)) + "|")
    for path in args.files:
        runs = {"cholla": [], "llama.cpp": []}
        for _ in range(args.repetitions):
            runs["cholla"].append(cholla_all(path, one))
            runs["llama.cpp"].append(llama_all(path, one))
        for engine, results in runs.items():
            cells = []
            for key in keys:
                values = [v for r in results if r.get(key) for v in r[key]["values"]]
                cells.append(f"{max(values):.1f} ({stats(values)['mean']:.1f})" if values else "-")
            print(f"| {path.name} | {engine} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
