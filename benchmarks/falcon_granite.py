"""Falcon-H1 and Granite 4 hybrid end to end: cholla's engine against transformers (its PyTorch
path, the one that runs without the CUDA kernels) on random models with the released models'
layer shapes (Falcon-H1 0.5B's, Granite 4.0-H Tiny's) but only ``--layers`` of their layers, fp32.

Reported (mean ± sd over ``-r`` runs): a ``-p``-token prompt's prefill (generation of one
token, ms) and decode at batch 1 (tokens/s over ``-n`` more tokens, greedy).

    python benchmarks/falcon_granite.py
    python benchmarks/falcon_granite.py --layers 4 -p 512 -n 64 -r 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cholla import LLM, SamplingParams  # noqa: E402
from tests.tiny_models import tiny_tokenizer  # noqa: E402  (the prompts are token ids: any vocabulary serves)


def configs(layers: int) -> dict:
    import transformers

    return {
        "Falcon-H1 0.5B layers": transformers.FalconH1Config(
            vocab_size=32784, hidden_size=1024, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64, mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head=64, mamba_d_state=128,
            mamba_n_groups=1, mamba_chunk_size=128, mamba_rms_norm=False, rope_theta=1e11, embedding_multiplier=5.66,
            lm_head_multiplier=0.039, mlp_multipliers=[0.88, 0.59], key_multiplier=0.39, attention_out_multiplier=0.94,
            ssm_in_multiplier=1.25, ssm_out_multiplier=0.24, ssm_multipliers=[0.35, 0.25, 0.35, 0.5, 0.35],
            tie_word_embeddings=False),
        "Granite 4.0-H Tiny layers": transformers.GraniteMoeHybridConfig(
            vocab_size=100352, hidden_size=1536, intermediate_size=512, shared_intermediate_size=1024,
            num_local_experts=64, num_experts_per_tok=6, num_hidden_layers=layers, num_attention_heads=12,
            num_key_value_heads=4, layer_types=["mamba"] * (layers - 1) + ["attention"], mamba_n_heads=48,
            mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_chunk_size=256, position_embedding_type="nope",
            attention_multiplier=0.0078125, embedding_multiplier=12.0, logits_scaling=6.0, residual_multiplier=0.22,
            tie_word_embeddings=True),
    }


def timed(fn, runs: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure(generate, prompt: list[int], new_tokens: int, runs: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(prefill ms mean, sd), (decode tokens/s mean, sd), from runs of 1 and of 1 + new_tokens tokens."""
    first = timed(lambda: generate(prompt, 1), runs)
    whole = timed(lambda: generate(prompt, 1 + new_tokens), runs)
    rates = [new_tokens / max(w - statistics.mean(first), 1e-9) for w in whole]
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    return (statistics.mean(first) * 1e3, sd(first) * 1e3), (statistics.mean(rates), sd(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("-p", "--prompt", type=int, default=256)
    parser.add_argument("-n", "--new-tokens", type=int, default=32)
    parser.add_argument("-r", "--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    for name, config in configs(args.layers).items():
        torch.manual_seed(0)
        reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        reference.generation_config.eos_token_id = None
        prompt = torch.randint(0, config.vocab_size, (args.prompt,)).tolist()
        with tempfile.TemporaryDirectory() as folder:
            reference.save_pretrained(folder)
            tiny_tokenizer().save_pretrained(folder)
            # no prefix caching: every run repeats the prompt, which the cache (and its state snapshots) would serve
            llm = LLM(folder, dtype="float32", max_model_len=args.prompt + args.new_tokens + 8, threads=args.threads,
                      enable_prefix_caching=False)

            def ours(ids: list[int], count: int) -> None:
                params = SamplingParams(temperature=0.0, max_tokens=count, ignore_eos=True)
                llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)

            def theirs(ids: list[int], count: int) -> None:
                with torch.inference_mode():
                    reference.generate(torch.tensor([ids]), max_new_tokens=count, min_new_tokens=count, do_sample=False)

            rows.append((name, measure(ours, prompt, args.new_tokens, args.runs),
                         measure(theirs, prompt, args.new_tokens, args.runs)))
            del llm
        del reference

    print(f"{args.layers} layers each, fp32, {args.threads} threads, prompt {args.prompt} tokens, "
          f"decode {args.new_tokens} tokens at batch 1")
    print("| model | cholla prefill ms | transformers prefill ms | cholla decode tok/s | transformers decode tok/s |")
    print("|---|---|---|---|---|")
    for name, ((op, ops), (od, ods)), ((rp, rps), (rd, rds)) in rows:
        print(f"| {name} | {op:.0f} ± {ops:.0f} | {rp:.0f} ± {rps:.0f} | {od:.1f} ± {ods:.1f} | {rd:.1f} ± {rds:.1f} |")


if __name__ == "__main__":
    main()
