"""Speculative decoding (n-gram prompt lookup, a draft model) against cholla's plain decode.

For each model, method, batch size and workload it decodes the same greedy chat
request (``--batch`` copies of it at once) with and without speculation (the
engines share one loaded model) and reports decode tokens/s (all sequences'
tokens from the first token to the last, so prefill is left out; mean ± sd over
``-r`` runs), the speed-up, the speed-up by the process's CPU time (steadier than the
wall clock on a machine shared with other work), and for speculation the acceptance rate (accepted /
proposed drafts) and the mean accepted length (tokens each verification step
yields, its own token included). It also checks that both produced the same tokens:
greedy requests, and sampled ones (``--temperatures``) too, since a seeded request's
speculative sampling gives plain decoding's very tokens.

The shared n-gram cache is off in the ``ngram`` rows: every repetition asks the same
question, and the cache would draft each run from the one before. ``--cache`` adds an
``ngram+cache`` row, measured on such a repeat (the first run's answer asked again).

Workloads: ``copy`` (repeat a given paragraph), ``code`` (rewrite given code
with a small change), both copy-heavy; ``open`` (a story: nothing to copy).
``--methods draft`` drafts with ``--draft-model`` (default: the model itself,
which accepts every draft: it measures the machinery's cost, not a gain).

    python benchmarks/speculative.py                      # both models, ngram, K=4, 3 runs
    python benchmarks/speculative.py --models smollm2 -k 8 -n 96 -r 1
    python benchmarks/speculative.py --models smollm2 --methods draft --batch 1 32 -r 1
    python benchmarks/speculative.py --models smollm2 -n 64 -r 2 --temperatures 0 0.7 --cache
    python benchmarks/speculative.py --models smollm2 --step-cost   # the table speculator.STEP_COST holds

``--step-cost`` measures what decides how many drafts a step verifies: a plain decode
step's time by rows (``rows`` sequences decoding at once), relative to a one-row step,
as wall time and as the process's CPU time (the steadier of the two on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

from cholla.download import resolve_model
from cholla.engine.engine import EngineConfig, LLMEngine
from cholla.models.loader import load_model
from cholla.sampling.params import SamplingParams
from cholla.speculative.config import DEFAULT_NGRAM_CACHE_SIZE
from cholla.tokenizer.chat_template import ChatTemplate, encode_chat

PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished the "
    "great lens, and wound the clockwork that turned the light. Ships passing the reef at night counted the "
    "flashes, three short and one long, and knew exactly where they were."
)
CODE = '''def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for value in values:
        total += (value - m) ** 2
    return total / len(values)
'''
WORKLOADS = {
    "copy": f"Repeat the following paragraph exactly, word for word.\n\n{PARAGRAPH}",
    "code": f"Here is some Python code:\n\n{CODE}\nRewrite this code exactly, renaming the variable `total` to `acc`.",
    "open": "Write a short story about a dragon who learns to bake bread.",
}


def decode(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams,
           batch: int) -> tuple[list[int], float, float]:
    """Generate ``batch`` copies of one request; returns the first one's tokens and decode tokens/s
    over all of them (first token to last), by the wall clock and by the process's CPU time."""
    for i in range(batch):
        engine.add_request(f"bench-{i}", {"prompt_token_ids": prompt_ids}, params)
    first = last = None
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter(), time.process_time()
            if out.outputs[0].token_ids and first is None:
                first = now
            last, tokens[out.request_id] = now, out.outputs[0].token_ids
    generated = sum(map(len, tokens.values())) - batch
    return tokens["bench-0"], generated / (last[0] - first[0]), generated / (last[1] - first[1])


STEP_ROWS = {"bfloat16": [1, 2, 3, 5, 6, 7, 9, 13, 17, 24, 32, 48, 64], "float32": [1, 2, 3, 4, 5, 6, 7, 8]}


def step_cost(loaded, dtype: str, steps: int = 12) -> None:
    """Median wall and CPU time of a decode step by rows, each relative to one row's."""
    engine = LLMEngine(loaded, EngineConfig(max_model_len=512, kv_cache_memory=128 * 2**20, max_num_seqs=64, dtype=dtype))
    print(f"\n{loaded.dtype} step cost by rows ({steps} steps each, median)\n")
    print("| rows | wall ms | CPU ms | wall cost | CPU cost |")
    print("|---|---|---|---|---|")
    first = None
    for rows in STEP_ROWS[loaded.dtype]:
        params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
        for i in range(rows):
            engine.add_request(f"rows{rows}-{i}", f"Count to {i}:", params)
        for _ in range(4):  # the prompts and the first decode steps
            engine.step()
        wall, cpu = [], []
        for _ in range(steps):
            w, c = time.perf_counter(), time.process_time()
            engine.step()
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        while engine.has_unfinished_requests():
            engine.step()
        times = statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3
        first = first or times
        print(f"| {rows} | {times[0]:.2f} | {times[1]:.2f} | {times[0] / first[0]:.2f} | {times[1] / first[1]:.2f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("--methods", nargs="+", choices=["ngram", "draft"], default=["ngram"])
    parser.add_argument("--draft-model", default=None, help="with --methods draft (default: the model itself)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="concurrent copies of each request")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    parser.add_argument("-n", "--max-tokens", type=int, default=128)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.0],
                        help="sampled rows (> 0) use top_p=0.95 and seed 0")
    parser.add_argument("--cache", action="store_true", help="with ngram: also measure the shared n-gram cache on a repeat")
    parser.add_argument("--step-cost", action="store_true", help="measure a decode step's cost by rows instead")
    args = parser.parse_args()
    if args.step_cost:
        for name in args.models:
            step_cost(load_model(resolve_model(name), args.dtype), args.dtype)
        return

    rows = []
    for name in args.models:
        loaded = load_model(resolve_model(name), args.dtype)
        base = {"max_model_len": 2048, "kv_cache_memory": 256 * 2**20, "max_num_seqs": max(args.batch), "dtype": args.dtype}
        plain = LLMEngine(loaded, EngineConfig(**base))
        template = ChatTemplate.for_tokenizer(plain.tokenizer)
        labels = [m for method in args.methods for m in ([method, "ngram+cache"] if method == "ngram" and args.cache
                                                          else [method])]
        for label in labels:
            method = label.split("+")[0]
            draft = (args.draft_model or loaded) if method == "draft" else None
            cache_size = DEFAULT_NGRAM_CACHE_SIZE if label == "ngram+cache" else 0
            for temperature in args.temperatures:
                params = SamplingParams(temperature=temperature, top_p=0.95 if temperature else 1.0, seed=0,
                                        max_tokens=args.max_tokens, ignore_eos=True)
                for batch in args.batch:
                    for workload in args.workloads:
                        # A fresh engine per row: the shared cache holds only this row's first (warm-up) answer.
                        spec = LLMEngine(loaded, EngineConfig(**base, speculative_method=method, draft_model=draft,
                                                              num_speculative_tokens=args.num_speculative_tokens,
                                                              speculative_ngram_cache_size=cache_size))
                        prompt_ids = encode_chat(plain.tokenizer, template, [{"role": "user", "content": WORKLOADS[workload]}])
                        decode(plain, prompt_ids, params, 1)  # warm-up (and the prefix cache) for both
                        decode(spec, prompt_ids, params, 1)
                        speeds: dict[str, list[float]] = {"plain": [], "spec": []}
                        cpu: dict[str, list[float]] = {"plain": [], "spec": []}
                        outputs = {}
                        before = spec.stats()
                        for _ in range(args.repetitions):
                            for run, engine in (("plain", plain), ("spec", spec)):
                                outputs[run], rate, cpu_rate = decode(engine, prompt_ids, params, batch)
                                speeds[run].append(rate)
                                cpu[run].append(cpu_rate)
                        after = spec.stats()
                        drafts = after.spec_draft_tokens - before.spec_draft_tokens
                        accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
                        steps = after.spec_verifications - before.spec_verifications
                        rows.append((name, label, temperature, batch, workload, speeds["plain"], speeds["spec"],
                                     statistics.mean(cpu["spec"]) / statistics.mean(cpu["plain"]),
                                     accepted / drafts if drafts else None, 1 + accepted / steps if steps else None,
                                     outputs["plain"] == outputs["spec"]))
                        print(f"[speculative] {name} {label} t={temperature:g} batch {batch} {workload}: done", flush=True)

    def fmt(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):7.1f} ± {sd:5.1f}"

    print(f"\n{args.max_tokens} tokens, K={args.num_speculative_tokens}, dtype={args.dtype}, "
          f"{args.repetitions} runs, t > 0: top_p 0.95 and seed 0, "
          f"draft model: {args.draft_model or 'the model itself'}\n")
    print("| model | method | temperature | batch | workload | plain t/s | speculative t/s | speed-up | "
          "speed-up (CPU time) | acceptance | mean accepted length | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, method, temperature, batch, workload, plain_speeds, spec_speeds, cpu_speedup, acceptance, length, same \
            in rows:
        speedup = statistics.mean(spec_speeds) / statistics.mean(plain_speeds)
        acceptance, length = ("-", "-") if length is None else (f"{acceptance:.0%}", f"{length:.2f}")  # never speculated
        print(f"| {name} | {method} | {temperature:g} | {batch} | {workload} | {fmt(plain_speeds)} | {fmt(spec_speeds)} | "
              f"{speedup:.2f}x | {cpu_speedup:.2f}x | "
              f"{acceptance} | {length} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
