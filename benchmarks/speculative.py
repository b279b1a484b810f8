"""N-gram (prompt lookup) speculation against cholla's plain decode, one stream at a time.

For each model, workload and temperature it decodes the same chat request with
and without ``speculative_method="ngram"`` (both engines share one loaded model)
and reports decode tokens/s (first token to last, so prefill is left out; mean
± sd over ``-r`` runs), the speed-up, and for speculation the acceptance rate
(accepted / proposed drafts) and the mean accepted length (tokens each
verification step yields, its own token included). It also checks that both
produced the same tokens: greedy requests, and sampled ones too, since a seeded
request's speculative sampling gives plain decoding's very tokens.

The shared n-gram cache is off here: every repetition asks the same question, and
the cache would draft each run from the one before. ``--cache`` adds a row per
workload where it is on, measured on such a repeat (the first run's answer asked again).

Workloads: ``copy`` (repeat a given paragraph), ``code`` (rewrite given code
with a small change), both copy-heavy; ``open`` (a story: nothing to copy).

    python benchmarks/speculative.py                      # both models, K=4, 3 runs, t=0 and t=0.7
    python benchmarks/speculative.py --models smollm2 -k 8 -n 96 -r 1 --temperatures 0.7 --cache
"""

from __future__ import annotations

import argparse
import statistics
import time

from cholla.download import resolve_model
from cholla.engine.engine import EngineConfig, LLMEngine
from cholla.models.loader import load_model
from cholla.sampling.params import SamplingParams
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


def decode(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], float]:
    """Generate one request; returns its tokens and decode tokens/s (first token to last)."""
    engine.add_request("bench", {"prompt_token_ids": prompt_ids}, params)
    first = last = None
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            if out.outputs[0].token_ids and first is None:
                first = now
            last, tokens = now, out.outputs[0].token_ids
    return tokens, (len(tokens) - 1) / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    parser.add_argument("-n", "--max-tokens", type=int, default=128)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 0.7],
                        help="sampled rows (> 0) use top_p=0.95 and seed 0")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--cache", action="store_true", help="also measure the shared n-gram cache on a repeated request")
    args = parser.parse_args()

    rows = []
    for name in args.models:
        loaded = load_model(resolve_model(name), args.dtype)
        base = dict(max_model_len=2048, kv_cache_memory=256 * 2**20, dtype=args.dtype)
        plain = LLMEngine(loaded, EngineConfig(**base))
        spec = LLMEngine(loaded, EngineConfig(**base, speculative_method="ngram", speculative_ngram_cache_size=0,
                                              num_speculative_tokens=args.num_speculative_tokens))
        template = ChatTemplate.for_tokenizer(plain.tokenizer)
        for temperature in args.temperatures:
            params = SamplingParams(temperature=temperature, top_p=0.95 if temperature else 1.0, seed=0,
                                    max_tokens=args.max_tokens, ignore_eos=True)
            for workload in args.workloads:
                prompt_ids = encode_chat(plain.tokenizer, template, [{"role": "user", "content": WORKLOADS[workload]}])
                decode(plain, prompt_ids, params)  # warm-up (and the prefix cache) for both
                decode(spec, prompt_ids, params)
                engines = [("ngram", spec)]
                if args.cache:
                    cached = LLMEngine(loaded, EngineConfig(**base, speculative_method="ngram",
                                                            num_speculative_tokens=args.num_speculative_tokens))
                    decode(cached, prompt_ids, params)  # the answer the repeats are drafted from
                    engines.append(("ngram+cache", cached))
                for label, engine in engines:
                    speeds: dict[str, list[float]] = {"plain": [], label: []}
                    outputs = {}
                    before = engine.stats()
                    for _ in range(args.repetitions):
                        for run_label, run_engine in (("plain", plain), (label, engine)):
                            outputs[run_label], rate = decode(run_engine, prompt_ids, params)
                            speeds[run_label].append(rate)
                    after = engine.stats()
                    drafts = after.spec_draft_tokens - before.spec_draft_tokens
                    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
                    steps = after.spec_verifications - before.spec_verifications
                    rows.append((name, workload, temperature, label, speeds["plain"], speeds[label],
                                 accepted / drafts if drafts else 0.0, 1 + accepted / steps if steps else 0.0,
                                 outputs["plain"] == outputs[label]))
                print(f"[speculative] {name} {workload} t={temperature}: done", flush=True)

    def fmt(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):7.1f} ± {sd:5.1f}"

    print(f"\nbatch 1, {args.max_tokens} tokens, K={args.num_speculative_tokens}, dtype={args.dtype}, "
          f"{args.repetitions} runs; t > 0: top_p 0.95, seed 0\n")
    print("| model | workload | temperature | method | plain t/s | speculative t/s | speed-up | acceptance "
          "| mean accepted length | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, workload, temperature, label, plain_speeds, spec_speeds, acceptance, length, same in rows:
        speedup = statistics.mean(spec_speeds) / statistics.mean(plain_speeds)
        print(f"| {name} | {workload} | {temperature:g} | {label} | {fmt(plain_speeds)} | {fmt(spec_speeds)} | "
              f"{speedup:.2f}x | {acceptance:.0%} | {length:.2f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
