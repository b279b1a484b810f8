"""N-gram (prompt lookup) speculation against cholla's plain decode, one stream at a time.

For each model and workload it decodes the same greedy chat request with and
without ``speculative_method="ngram"`` (both engines share one loaded model)
and reports decode tokens/s (first token to last, so prefill is left out; mean
± sd over ``-r`` runs), the speed-up, and for speculation the acceptance rate
(accepted / proposed drafts) and the mean accepted length (tokens each
verification step yields, its own token included). It also checks that both
produced the same tokens.

Workloads: ``copy`` (repeat a given paragraph), ``code`` (rewrite given code
with a small change), both copy-heavy; ``open`` (a story: nothing to copy).

    python benchmarks/speculative.py                      # both models, K=4, 3 runs
    python benchmarks/speculative.py --models smollm2 -k 8 -n 96 -r 1
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
    args = parser.parse_args()

    rows = []
    for name in args.models:
        loaded = load_model(resolve_model(name), args.dtype)
        base = dict(max_model_len=2048, kv_cache_memory=256 * 2**20, dtype=args.dtype)
        plain = LLMEngine(loaded, EngineConfig(**base))
        spec = LLMEngine(loaded, EngineConfig(**base, speculative_method="ngram",
                                              num_speculative_tokens=args.num_speculative_tokens))
        template = ChatTemplate.for_tokenizer(plain.tokenizer)
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        for workload, text in WORKLOADS.items():
            prompt_ids = encode_chat(plain.tokenizer, template, [{"role": "user", "content": text}])
            decode(plain, prompt_ids, params)  # warm-up (and the prefix cache) for both
            decode(spec, prompt_ids, params)
            speeds: dict[str, list[float]] = {"plain": [], "ngram": []}
            outputs = {}
            before = spec.stats()
            for _ in range(args.repetitions):
                for label, engine in (("plain", plain), ("ngram", spec)):
                    outputs[label], rate = decode(engine, prompt_ids, params)
                    speeds[label].append(rate)
            after = spec.stats()
            drafts = after.spec_draft_tokens - before.spec_draft_tokens
            accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
            steps = after.spec_verifications - before.spec_verifications
            rows.append((name, workload, speeds["plain"], speeds["ngram"], accepted / drafts if drafts else 0.0,
                         1 + accepted / steps if steps else 0.0, outputs["plain"] == outputs["ngram"]))
            print(f"[speculative] {name} {workload}: done", flush=True)

    def fmt(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):7.1f} ± {sd:5.1f}"

    print(f"\nbatch 1, greedy, {args.max_tokens} tokens, K={args.num_speculative_tokens}, dtype={args.dtype}, "
          f"{args.repetitions} runs\n")
    print("| model | workload | plain t/s | ngram t/s | speed-up | acceptance | mean accepted length | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for name, workload, plain_speeds, spec_speeds, acceptance, length, same in rows:
        speedup = statistics.mean(spec_speeds) / statistics.mean(plain_speeds)
        print(f"| {name} | {workload} | {fmt(plain_speeds)} | {fmt(spec_speeds)} | {speedup:.2f}x | "
              f"{acceptance:.0%} | {length:.2f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
