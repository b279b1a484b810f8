"""Time to first token with and without a cached prefix.

A request whose first 1,000 tokens (say, a long system prompt or an earlier
chat turn) were computed by an earlier request should only compute the rest.
Each repetition times a cold request (prefix cache emptied first) and a warm
one (same prefix, a different suffix), and prints both with the ratio.

    python benchmarks/prefix_cache.py                     # SmolLM2, 1000-token prefix
    python benchmarks/prefix_cache.py gemma3 --prefix-len 2000
"""

from __future__ import annotations

import argparse
import statistics

import torch

from cholla import LLM, SamplingParams
from cholla.download import resolve_model


def time_to_first_token(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    """Seconds from arrival to the first token, and how many prompt tokens came from the cache."""
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)[0]
    return out.metrics.first_token_time - out.metrics.arrival_time, out.metrics.num_cached_prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--prefix-len", type=int, default=1000)
    parser.add_argument("--suffix-len", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    path = resolve_model(args.model)
    total = args.prefix_len + args.suffix_len
    llm = LLM(path, max_model_len=total + 16, max_num_batched_tokens=2048)
    vocab = llm.engine.model_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(100, vocab, (args.prefix_len,), generator=generator).tolist()
    time_to_first_token(llm, prefix[:32])  # warm-up

    cold, warm = [], []
    for i in range(args.repeat):
        suffix_a = torch.randint(100, vocab, (args.suffix_len,), generator=generator).tolist()
        suffix_b = torch.randint(100, vocab, (args.suffix_len,), generator=generator).tolist()
        llm.engine.block_manager.reset_prefix_cache()
        seconds, cached = time_to_first_token(llm, prefix + suffix_a)
        assert cached == 0
        cold.append(seconds)
        seconds, cached = time_to_first_token(llm, prefix + suffix_b)
        warm.append(seconds)
    block = llm.engine.config.block_size
    print(f"\n{path.name}: {args.prefix_len}-token shared prefix + {args.suffix_len}-token suffix, "
          f"{args.repeat} repetitions, {torch.get_num_threads()} threads")
    print("| request | TTFT ms (mean ± sd) | prompt tokens from cache |\n|---|---|---|")
    print(f"| cold (cache emptied) | {1000 * statistics.mean(cold):.0f} ± {1000 * statistics.pstdev(cold):.0f} | 0 |")
    print(f"| warm (prefix cached) | {1000 * statistics.mean(warm):.0f} ± {1000 * statistics.pstdev(warm):.0f} "
          f"| {cached} (whole {block}-token blocks) |")
    print(f"warm/cold: {statistics.mean(warm) / statistics.mean(cold):.3f} (target <= 0.2)")


if __name__ == "__main__":
    main()
