"""Structured output's cost: N concurrent JSON-schema-constrained streams against N unconstrained ones.

Both runs send the same chat prompts through one in-process engine, all at once,
with the same sampling (temperature 0.7, seeded) and the same ``max_tokens``. The
schema (a list of at least 50 people) cannot be finished within ``max_tokens``, and
the unconstrained run sets ``ignore_eos``, so every stream of both runs generates
exactly ``max_tokens`` tokens and the batches stay equally full. Printed per run:
generated tokens/s over the wall time, steps, ms per step, the time spent filling
and unpacking the grammar masks (llguidance) and sampling. Tokens the
grammar forced shows as fewer steps for the same tokens (fast-forward tokens are
appended without a forward pass each, and computed with the next one). The goal:
constrained >= 90% of the unconstrained throughput.

    python benchmarks/structured.py                      # SmolLM2, 32 streams x 128 tokens
    python benchmarks/structured.py --num-requests 8 --max-tokens 64 --no-fast-forward
"""

from __future__ import annotations

import argparse
import time

from cholla import LLM, SamplingParams
from cholla.engine import runner as runner_module
from cholla.sampling.params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 50,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "city": {"type": "string", "maxLength": 40},
                    "email": {"type": "string", "format": "email"},
                },
                "required": ["name", "age", "city", "email"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
CITIES = ["Lima", "Oslo", "Tokyo", "Nairobi", "Quito", "Perth", "Lyon", "Hanoi"]


class Timers:
    """Wall time spent in the runner's grammar masks and in the sampler, summed over a run."""

    def __init__(self, llm: LLM):
        self.mask_s = self.sample_s = 0.0
        runner = llm.engine.runner
        masks, sample = runner._grammar_masks, runner_module.sample

        def timed_masks(*args):
            start = time.perf_counter()
            try:
                return masks(*args)
            finally:
                self.mask_s += time.perf_counter() - start

        def timed_sample(*args):
            start = time.perf_counter()
            try:
                return sample(*args)
            finally:
                self.sample_s += time.perf_counter() - start

        runner._grammar_masks = timed_masks
        runner_module.sample = timed_sample


def run(llm: LLM, timers: Timers, prompts: list[list[dict]], params: SamplingParams, fast_forward: bool) -> dict:
    timers.mask_s = timers.sample_s = 0.0
    steps = llm.engine.metrics.steps
    llm.engine.block_manager.reset_prefix_cache()
    if not fast_forward:
        # Sampling every token: fast-forward stays off when a request asks for logprobs.
        params = SamplingParams(**{**params.__dict__, "logprobs": 0})
    start = time.perf_counter()
    outs = llm.chat(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    steps = llm.engine.metrics.steps - steps
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "steps": steps,
        "ms_per_step": 1e3 * seconds / steps,
        "mask_ms_per_step": 1e3 * timers.mask_s / steps,
        "sample_ms_per_step": 1e3 * timers.sample_s / steps,
        "outputs": [o.outputs[0] for o in outs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-fast-forward", action="store_true", help="sample every token of the constrained run")
    parser.add_argument("--repetitions", type=int, default=2, help="runs of each kind, alternating; the best counts")
    args = parser.parse_args()

    llm = LLM(args.model, max_num_seqs=args.num_requests, dtype=args.dtype, threads=args.threads)
    timers = Timers(llm)
    prompts = [
        [{"role": "user", "content": f"List fifty people living in {CITIES[i % len(CITIES)]} as JSON, with name, "
                                     f"age, city and email. Start with person number {i + 1}."}]
        for i in range(args.num_requests)
    ]
    base = dict(temperature=0.7, seed=0, max_tokens=args.max_tokens)
    kinds = {
        "unconstrained": SamplingParams(**base, ignore_eos=True),
        "json_schema": SamplingParams(**base, structured_outputs=StructuredOutputsParams(json=SCHEMA)),
    }
    llm.chat(prompts[0], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(json=SCHEMA)),
             use_tqdm=False)  # warm-up: builds llguidance's tokenizer and compiles the schema
    best: dict[str, dict] = {}
    for _ in range(args.repetitions):
        for name, params in kinds.items():
            result = run(llm, timers, prompts, params, fast_forward=not args.no_fast_forward)
            if name not in best or result["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = result

    constrained = best["json_schema"]
    ff_note = "off" if args.no_fast_forward else "on"
    print(f"{args.model}, {args.num_requests} streams x {args.max_tokens} tokens, dtype {llm.engine.loaded.dtype}, "
          f"fast-forward {ff_note}, best of {args.repetitions}")
    print()
    print("| run | tokens | tokens/s | steps | ms/step | mask ms/step | sample ms/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in best.items():
        print(f"| {name} | {r['tokens']} | {r['tokens_per_s']:.1f} | {r['steps']} | {r['ms_per_step']:.2f} | "
              f"{r['mask_ms_per_step']:.2f} | {r['sample_ms_per_step']:.2f} |")
    ratio = constrained["tokens_per_s"] / best["unconstrained"]["tokens_per_s"]
    print()
    print(f"constrained / unconstrained throughput: {ratio:.1%} (goal >= 90%)")
    sample_text = constrained["outputs"][0].text
    print(f"a constrained output starts: {sample_text[:120]!r}")
    assert all(o.finish_reason == "length" for o in constrained["outputs"]), "a constrained stream ended early"


if __name__ == "__main__":
    main()
