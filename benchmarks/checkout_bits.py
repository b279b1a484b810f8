"""Greedy tokens and logprobs of this checkout against another's (say, main's), bit for bit.

A change meant to keep the numbers (a kernel's instructions reordered, a step's
Python trimmed) should give every token id and every logprob of a greedy decode
unchanged. Each checkout runs in its own process (``python -c`` in that
checkout: its cholla, its kernels), decodes a few prompts greedily with the
top-5 logprobs through ``LLM.generate``, and prints a hash of every token id and
logprob (their exact bits); the two hashes must be equal.

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
from cholla import LLM, SamplingParams
model, threads, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = LLM(model, threads=threads, max_model_len=512)
digest = hashlib.sha256()
for prompt in ["The capital of France is", "def fib(n):", "Once upon a time"]:
    out = llm.generate([prompt], SamplingParams(max_tokens=tokens, temperature=0, logprobs=5))[0].outputs[0]
    digest.update(struct.pack(f"<{len(out.token_ids)}q", *out.token_ids))
    for chosen, top in out.logprobs:
        digest.update(struct.pack("<d", chosen))
        for token, logprob in top:
            digest.update(struct.pack("<qd", token, logprob))
print(digest.hexdigest()[:16])
"""


def run(checkout: Path, model: str, threads: int, tokens: int) -> str:
    done = subprocess.run([sys.executable, "-c", WORKER, model, str(threads), str(tokens)], cwd=checkout,
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
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    print("| model | threads | this | baseline | equal |")
    print("| --- | ---: | --- | --- | --- |")
    unequal = 0
    for model in args.models:
        for threads in args.threads:
            this, baseline = run(here, model, threads, args.tokens), run(args.baseline, model, threads, args.tokens)
            unequal += this != baseline
            print(f"| {model} | {threads} | {this} | {baseline} | {'yes' if this == baseline else 'NO'} |", flush=True)
    sys.exit(1 if unequal else 0)


if __name__ == "__main__":
    main()
