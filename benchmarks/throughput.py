"""Batched serving throughput: N concurrent requests against the same requests one at a time.

What continuous batching buys: with 32 requests in flight, each decode step
reads the weights once for 32 tokens instead of once per token. The script
runs the same random prompts (fixed lengths, ``ignore_eos``, greedy) three
ways and prints total tokens/s (prompt + generated, over wall time):

- cholla, all requests through the scheduler at once;
- cholla, one request at a time (a subset: the rate per request does not
  depend on how many run back to back, and the full set takes minutes);
- transformers' batched ``generate`` on the same GGUF (left-padded), when it
  is installed and ``--no-transformers`` is not given.

    python benchmarks/throughput.py                 # SmolLM2, 32 x (128 in + 128 out)
    python benchmarks/throughput.py gemma3 --num-requests 16
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from cholla import LLM, SamplingParams
from cholla.download import resolve_model


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    # Skip the lowest ids, where vocabularies keep their special tokens.
    return torch.randint(100, vocab_size, (num, length), generator=generator).tolist()


def run_cholla(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(p) + len(o.outputs[0].token_ids) for p, o in zip(prompts, outs))
    return seconds, tokens


def run_transformers(path, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    input_ids = torch.tensor(prompts)  # equal lengths: no padding needed
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
            min_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
        )
    seconds = time.perf_counter() - start
    return seconds, out.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--sequential-requests", type=int, default=4, help="how many to time one at a time")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    path = resolve_model(args.model)
    llm = LLM(path, max_num_seqs=args.num_requests, max_model_len=args.prompt_len + args.max_tokens + 16,
              dtype=args.dtype)
    prompts = random_prompts(args.num_requests, args.prompt_len, llm.engine.model_config.vocab_size, args.seed)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    run_cholla(llm, [prompts[0][:16]], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
    llm.engine.block_manager.reset_prefix_cache()

    rows = []
    seconds, tokens = run_cholla(llm, prompts, params)
    batched_rate = tokens / seconds
    rows.append((f"cholla, {args.num_requests} at once", seconds, tokens, batched_rate))
    llm.engine.block_manager.reset_prefix_cache()

    seconds = tokens = 0
    for prompt in prompts[: args.sequential_requests]:
        s, t = run_cholla(llm, [prompt], params)
        seconds, tokens = seconds + s, tokens + t
    sequential_rate = tokens / seconds
    rows.append((f"cholla, one at a time ({args.sequential_requests} timed)", seconds, tokens, sequential_rate))

    if not args.no_transformers:
        try:
            seconds, tokens = run_transformers(path, prompts, args.max_tokens)
            rows.append((f"transformers generate, batch {args.num_requests}", seconds, tokens, tokens / seconds))
        except ImportError:
            print("(transformers is not installed: skipped)")

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{path.name}: {args.num_requests} requests x ({args.prompt_len} in + {args.max_tokens} out), "
          f"greedy, cholla dtype {args.dtype}, {torch.get_num_threads()} threads")
    print(f"| run | seconds | tokens | total tokens/s | vs one at a time |\n|---|---|---|---|---|")
    for name, s, t, rate in rows:
        print(f"| {name} | {s:.1f} | {t} | {rate:.1f} | {rate / sequential_rate:.2f}x |")
    print(f"peak RSS of this process: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
