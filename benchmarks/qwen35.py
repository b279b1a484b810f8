"""A Gated DeltaNet hybrid end to end: cholla against llama.cpp on one random Qwen 3.5-shaped model.

The model has Qwen 3.5's layer plan and head shapes with random weights (default: hidden
1024, 8 layers of which every 4th is gated full attention, 16 x 128 DeltaNet heads, 8 x 256
attention heads over 2 KV heads, vocabulary 32000), built by transformers, converted by
llama.cpp's ``convert_hf_to_gguf.py --no-mtp`` and requantized with ``gguf.quants``: the same
files for both engines. Reported, mean ± sd over ``-r`` runs, tokens/s:

- ``pp``: one ``-p``-token prompt (cholla: one prefill step, as ``cholla bench``);
- ``tg`` at depth 0 and at each ``--depth``: single-sequence decode after a prompt of that many
  tokens (a recurrent layer's cost does not grow with it; the attention layers' does);
- ``batch``: 32 sequences decoding together (one-token prompts, ``-n`` tokens each), total
  generated tokens/s (llama.cpp: ``llama-batched-bench``'s ``S_TG t/s`` for PP=1, B=32).

    python benchmarks/qwen35.py
With ``--pytorch-states`` cholla also runs with its recurrent layers' decode state steps
in PyTorch instead of the C++ kernels (``kernels/state_update.cpp``), a row of its own.

    python benchmarks/qwen35.py -p 256 -n 32 --depth 2048 -r 2 --quants Q8_0
    python benchmarks/qwen35.py -p 256 -n 32 --depth 128 4096 -r 2 --quants Q8_0 --pytorch-states
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compare import fmt, machine, run, stats  # noqa: E402
from benchmarks.moe import ggufs, save_random_model  # noqa: E402


def build(args) -> Path:
    """The random model as SafeTensors (cached by its shape under --cache)."""
    import transformers

    folder = args.cache / f"qwen35-h{args.hidden}-l{args.layers}-v{args.vocab}"
    if (folder / "config.json").exists():
        return folder
    config = transformers.Qwen3_5TextConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(3.5 * args.hidden),
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
        max_position_embeddings=8192, tie_word_embeddings=False)
    return save_random_model(folder, config)


def cholla_all(path: Path, args) -> dict:
    """pp, tg at depth 0 and each --depth, and 32-sequence decode, on one engine."""
    import torch

    from cholla.bench import time_decode, time_prefill
    from cholla.engine.engine import EngineConfig, LLMEngine
    from cholla.sampling.params import SamplingParams

    engine = LLMEngine(path, EngineConfig(max_model_len=max(args.depth) + args.n_gen + 2, max_num_batched_tokens=args.n_prompt,
                                          kv_cache_memory=512 * 2**20, enable_prefix_caching=False, threads=args.threads,
                                          max_num_seqs=32))
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    def deep_decode(depth: int) -> float:  # after a prompt of depth tokens, prefilled in --n-prompt chunks
        greedy = SamplingParams(temperature=0.0, max_tokens=args.n_gen + 1, ignore_eos=True)
        engine.add_request(None, {"prompt_token_ids": prompt(depth)}, greedy)
        engine.step()
        while engine.scheduler.running[0].num_computed_tokens < depth:
            engine.step()
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return args.n_gen / (time.perf_counter() - start)

    def batch_decode() -> float:
        greedy = SamplingParams(temperature=0.0, max_tokens=args.n_gen + 1, ignore_eos=True)
        for _ in range(32):
            engine.add_request(None, {"prompt_token_ids": prompt(1)}, greedy)
        engine.step()  # the 32 one-token prompts
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return 32 * args.n_gen / (time.perf_counter() - start)

    time_prefill(engine, prompt(16)), time_decode(engine, 0, 2)  # warm-up
    reps = range(args.repetitions)
    return {"pp": stats([time_prefill(engine, prompt(args.n_prompt)) for _ in reps]),
            "tg": stats([time_decode(engine, prompt(1)[0], args.n_gen) for _ in reps]),
            **{f"tg@{depth}": stats([deep_decode(depth) for _ in reps]) for depth in args.depth},
            "batch": stats([batch_decode() for _ in reps])}


def llama_all(path: Path, args) -> dict:
    bench = [str(args.llama_bin_dir / "llama-bench"), "-m", str(path), "-p", str(args.n_prompt), "-n", str(args.n_gen),
             "-d", ",".join(map(str, [0, *args.depth])), "-r", str(args.repetitions), "-t", str(args.threads), "-o", "json"]
    stdout, _, _ = run(bench, "llama-bench")
    out = {}
    for e in json.loads(stdout[stdout.find("["):]):
        depth = e.get("n_depth", 0)
        key = "pp" if e["n_gen"] == 0 else ("tg" if depth == 0 else f"tg@{depth}")
        if e["n_gen"] == 0 and depth:
            continue
        out[key] = {"mean": e["avg_ts"], "sd": e["stddev_ts"], "values": e.get("samples_ts", [])}
    batched = [str(args.llama_bin_dir / "llama-batched-bench"), "-m", str(path), "-c", str(32 * (args.n_gen + 2)),
               "-npp", "1", "-ntg", str(args.n_gen), "-npl", "32", "-t", str(args.threads)]
    rates = []
    for _ in range(args.repetitions):
        stdout, stderr, _ = run(batched, "llama-batched-bench")
        header = None
        for line in (stdout + stderr).splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if "S_TG t/s" in cells:
                header = cells
            elif header and len(cells) == len(header) and cells[:3] == ["1", str(args.n_gen), "32"]:
                rates.append(float(cells[header.index("S_TG t/s")]))
    out["batch"] = stats(rates) if rates else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--quants", nargs="+", default=["Q8_0", "Q4_0"])
    parser.add_argument("--peers", default="llama.cpp", help="'' for cholla alone")
    parser.add_argument("--llama-bin-dir", type=Path, default=Path("/work/llamacpp/bin"))
    parser.add_argument("-p", "--n-prompt", type=int, default=512)
    parser.add_argument("-n", "--n-gen", type=int, default=64)
    parser.add_argument("--depth", type=int, nargs="+", default=[4096])
    parser.add_argument("--pytorch-states", action="store_true",
                        help="also run cholla with the recurrent state steps in PyTorch (no state kernels)")
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "cholla" / "bench-qwen35")
    args = parser.parse_args()

    folder = build(args)
    files = ggufs(folder, args.quants, ("--no-mtp",))
    lines = [f"Machine: {machine()}; threads {args.threads}.",
             f"Model: random Qwen 3.5 shape, hidden {args.hidden}, {args.layers} layers (every 4th full attention), "
             f"vocabulary {args.vocab}.", "",
             f"| file | engine | pp{args.n_prompt} t/s | tg{args.n_gen} t/s | "
             + "".join(f"tg{args.n_gen} @ d{depth} t/s | " for depth in args.depth) + f"32 x tg{args.n_gen} total t/s |",
             "|---" * (5 + len(args.depth)) + "|"]
    for q, path in files.items():
        results = {"cholla": cholla_all(path, args)}
        if args.pytorch_states:
            from benchmarks.deltanet import pytorch_state_steps

            with pytorch_state_steps():
                results["cholla, PyTorch state steps"] = cholla_all(path, args)
        if "llama.cpp" in args.peers:
            results["llama.cpp"] = llama_all(path, args)
        size = path.stat().st_size / 2**20
        for engine, res in results.items():
            cells = [res.get("pp"), res.get("tg"), *(res.get(f"tg@{depth}") for depth in args.depth), res.get("batch")]
            lines.append(f"| {q} ({size:.0f} MiB) | {engine} | " + " | ".join(fmt(cell) for cell in cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
