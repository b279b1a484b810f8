"""Greedy tokens and logprobs of this checkout against another's (say, main's), bit for bit.

A change meant to keep the numbers (a kernel's instructions reordered, a step's
Python trimmed) should give every token id and every logprob of a greedy decode
unchanged. Each checkout runs in its own process (``python -c`` in that
checkout: its cholla, its kernels), decodes a few prompts greedily with the
top-5 logprobs through ``LLM.generate``, then ``--batch`` random prompts of 128
tokens together (the batched benchmark's shape, 32 tokens each), and prints a
hash of every token id and logprob (their exact bits), text and finish reason;
the two hashes must be equal.

    OMP_NUM_THREADS=1 python benchmarks/checkout_bits.py --baseline ../main --models smollm2 gemma3 --threads 1 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

# One side: greedy decodes of the prompts, every token id and logprob hashed (struct-packed: exact bits).
WORKER = """
import hashlib, struct, sys
sys.path.insert(0, "benchmarks")
from throughput import random_prompts
from cholla import LLM, SamplingParams
model, threads, tokens, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = LLM(model, threads=threads, max_model_len=512, max_num_seqs=max(batch, 1))
digest = hashlib.sha256()

def update(out):
    digest.update(struct.pack(f"<{len(out.token_ids)}q", *out.token_ids))
    digest.update(f"{out.text}\\0{out.finish_reason}\\0{out.stop_reason}".encode())
    for chosen, top in out.logprobs or []:
        digest.update(struct.pack("<d", chosen))
        for token, logprob in top:
            digest.update(struct.pack("<qd", token, logprob))

for prompt in ["The capital of France is", "def fib(n):", "Once upon a time"]:
    update(llm.generate([prompt], SamplingParams(max_tokens=tokens, temperature=0, logprobs=5))[0].outputs[0])
prompts = [{"prompt_token_ids": p} for p in random_prompts(batch, 128, llm.engine.model_config.vocab_size, 0)]
for out in llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True), use_tqdm=False):
    update(out.outputs[0])
print(digest.hexdigest()[:16])
"""


def run(checkout: Path, model: str, threads: int, tokens: int, batch: int) -> str:
    done = subprocess.run([sys.executable, "-c", WORKER, model, str(threads), str(tokens), str(batch)], cwd=checkout,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the worker in {checkout} failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout (say, ../main)")
    parser.add_argument("--models", nargs="+", default=["smollm2"])
    parser.add_argument("--threads", nargs="+", type=int, default=[2])
    parser.add_argument("--tokens", type=int, default=96, help="greedy tokens a prompt")
    parser.add_argument("--batch", type=int, default=32, help="random 128-token prompts decoded together (0: none)")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    print("| model | threads | this | baseline | equal |")
    print("| --- | ---: | --- | --- | --- |")
    unequal = 0
    for model in args.models:
        for threads in args.threads:
            this, baseline = (run(checkout, model, threads, args.tokens, args.batch)
                              for checkout in (here, args.baseline))
            unequal += this != baseline
            print(f"| {model} | {threads} | {this} | {baseline} | {'yes' if this == baseline else 'NO'} |", flush=True)
    sys.exit(1 if unequal else 0)


if __name__ == "__main__":
    main()
