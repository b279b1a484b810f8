"""Speculative decoding (n-gram prompt lookup, a draft model) against cholla's plain decode.

For each model, method, batch size and workload it decodes the same greedy chat
request (``--batch`` copies of it at once) with and without speculation (the
engines share one loaded model) and reports decode tokens/s (all sequences'
tokens from the first token to the last, so prefill is left out; mean ± sd over
``-r`` runs), the speed-up, and for speculation the acceptance rate (accepted /
proposed drafts) and the mean accepted length (tokens each verification step
yields, its own token included). It also checks that both produced the same tokens.

Workloads: ``copy`` (repeat a given paragraph), ``code`` (rewrite given code
with a small change), both copy-heavy; ``open`` (a story: nothing to copy).
``--methods draft`` drafts with ``--draft-model`` (default: the model itself,
which accepts every draft: it measures the machinery's cost, not a gain).

    python benchmarks/speculative.py                      # both models, ngram, K=4, 3 runs
    python benchmarks/speculative.py --models smollm2 -k 8 -n 96 -r 1
    python benchmarks/speculative.py --models smollm2 --methods draft --batch 1 32 -r 1
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


def decode(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams, batch: int) -> tuple[list[int], float]:
    """Generate ``batch`` copies of one request; returns the first one's tokens and decode tokens/s
    over all of them (first token to last)."""
    for i in range(batch):
        engine.add_request(f"bench-{i}", {"prompt_token_ids": prompt_ids}, params)
    first = last = None
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            if out.outputs[0].token_ids and first is None:
                first = now
            last, tokens[out.request_id] = now, out.outputs[0].token_ids
    return tokens["bench-0"], (sum(map(len, tokens.values())) - batch) / (last - first)


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
    args = parser.parse_args()

    rows = []
    for name in args.models:
        loaded = load_model(resolve_model(name), args.dtype)
        base = {"max_model_len": 2048, "kv_cache_memory": 256 * 2**20, "max_num_seqs": max(args.batch), "dtype": args.dtype}
        plain = LLMEngine(loaded, EngineConfig(**base))
        template = ChatTemplate.for_tokenizer(plain.tokenizer)
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        for method in args.methods:
            draft = (args.draft_model or loaded) if method == "draft" else None
            spec = LLMEngine(loaded, EngineConfig(**base, speculative_method=method, draft_model=draft,
                                                  num_speculative_tokens=args.num_speculative_tokens))
            for batch in args.batch:
                for workload in args.workloads:
                    prompt_ids = encode_chat(plain.tokenizer, template, [{"role": "user", "content": WORKLOADS[workload]}])
                    decode(plain, prompt_ids, params, 1)  # warm-up (and the prefix cache) for both
                    decode(spec, prompt_ids, params, 1)
                    speeds: dict[str, list[float]] = {"plain": [], "spec": []}
                    outputs = {}
                    before = spec.stats()
                    for _ in range(args.repetitions):
                        for label, engine in (("plain", plain), ("spec", spec)):
                            outputs[label], rate = decode(engine, prompt_ids, params, batch)
                            speeds[label].append(rate)
                    after = spec.stats()
                    drafts = after.spec_draft_tokens - before.spec_draft_tokens
                    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
                    steps = after.spec_verifications - before.spec_verifications
                    rows.append((name, method, batch, workload, speeds["plain"], speeds["spec"],
                                 accepted / drafts if drafts else None, 1 + accepted / steps if steps else None,
                                 outputs["plain"] == outputs["spec"]))
                    print(f"[speculative] {name} {method} batch {batch} {workload}: done", flush=True)

    def fmt(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):7.1f} ± {sd:5.1f}"

    print(f"\ngreedy, {args.max_tokens} tokens, K={args.num_speculative_tokens}, dtype={args.dtype}, "
          f"{args.repetitions} runs, draft model: {args.draft_model or 'the model itself'}\n")
    print("| model | method | batch | workload | plain t/s | speculative t/s | speed-up | acceptance | "
          "mean accepted length | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, method, batch, workload, plain_speeds, spec_speeds, acceptance, length, same in rows:
        speedup = statistics.mean(spec_speeds) / statistics.mean(plain_speeds)
        acceptance, length = ("-", "-") if length is None else (f"{acceptance:.0%}", f"{length:.2f}")  # never speculated
        print(f"| {name} | {method} | {batch} | {workload} | {fmt(plain_speeds)} | {fmt(spec_speeds)} | {speedup:.2f}x | "
              f"{acceptance} | {length} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
