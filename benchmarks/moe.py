"""A mixture-of-experts workload: cholla against llama.cpp and transformers on one random MoE.

The model is a Qwen3-MoE of realistic proportions with random weights (default:
32 experts, top-4, hidden 1024, 4 layers, expert width 512, 32k vocabulary),
built by transformers, converted by llama.cpp's ``convert_hf_to_gguf.py`` and
requantized with ``gguf.quants`` (Q4_0, Q8_0): the same files for cholla and
``llama-bench``; transformers runs the SafeTensors folder (its own GGUF loader
drops Qwen3-MoE's experts). Reported, llama-bench style (mean ± sd):

- ``pp`` prompt tokens/s and ``tg`` generated tokens/s for each engine;
- the decode floor: the bytes one token reads (every non-expert weight, plus the
  routed ``top_k / experts`` share of the expert weights, in the file's types)
  divided by the read bandwidth measured here (a ``torch`` sum over 1 GiB), against
  cholla's measured time per token.

    python benchmarks/moe.py --llama-bin-dir /work/llamacpp/bin
    python benchmarks/moe.py -p 128 -n 32 -r 2 --quants Q4_0 --peers llama.cpp
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

from benchmarks.compare import cholla_bench, fmt, llama_bench, machine, stats  # noqa: E402
from tests import tiny_models  # noqa: E402  (tokenizer, converter and requantizer of the model tests)


def build(args) -> Path:
    """The random model as SafeTensors (cached by its shape under --cache)."""
    import transformers

    name = f"qwen3moe-e{args.experts}k{args.top_k}-h{args.hidden}-l{args.layers}-f{args.expert_size}-v{args.vocab}"
    folder = args.cache / name
    if (folder / "config.json").exists():
        return folder
    config = transformers.Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 256,
        head_dim=64, num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_size,
        norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False)
    return save_random_model(folder, config)


def save_random_model(folder: Path, config) -> Path:
    """A random-weight model of ``config`` (seed 0) saved into ``folder`` with the tests' byte-level
    tokenizer: the benchmarks time token ids, any vocabulary serves."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    tiny_models.tiny_tokenizer().save_pretrained(folder)
    return folder


def ggufs(folder: Path, quants: list[str], convert_args: tuple[str, ...] = ()) -> dict[str, Path]:
    """The f32 conversion of ``folder`` (llama.cpp's converter, ``convert_args`` passed on) and its
    requantized copies, each made once and kept beside the folder."""
    f32 = folder.with_suffix(".f32.gguf")
    if not f32.exists():
        converter = tiny_models.find_converter()
        if converter is None:
            sys.exit("llama.cpp's convert_hf_to_gguf.py is needed (set CHOLLA_CONVERT_HF_TO_GGUF)")
        tiny_models.convert_to_gguf(converter, [(folder, f32)], convert_args)
    out = {}
    for q in quants:
        path = folder.with_suffix(f".{q}.gguf")
        if not path.exists():
            tiny_models.requantize(f32, path, q)
        out[q] = path
    return out


def bytes_per_token(path: Path) -> tuple[int, int, int]:
    """(bytes one decode token reads, total weight bytes, active parameters) of a GGUF file."""
    from math import prod

    from cholla.formats.gguf import read_gguf
    from cholla.models.config import config_from_gguf

    gguf = read_gguf(path)
    moe = config_from_gguf(gguf.metadata, set(gguf.tensors)).moe
    share = moe.top_k / moe.num_experts
    read = total = active = 0
    for name, t in gguf.tensors.items():
        if name == "token_embd.weight":  # one row per token
            read += t.num_bytes // t.shape[0]
            total += t.num_bytes
            continue
        part = share if "_exps." in name else 1.0
        read += int(t.num_bytes * part)
        total += t.num_bytes
        active += int(prod(t.shape) * part)
    return read, total, active


def bandwidth() -> float:
    """Read bandwidth in bytes/s: a sum over 1 GiB of float32, best of five (what decode does: stream weights)."""
    import torch

    data = torch.ones(2**28)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def transformers_bench(folder: Path, args) -> dict:
    """pp: one forward over a random prompt; tg: greedy generate after a one-token prompt."""
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.hf_dtype)).eval()
    prompt = torch.randint(0, args.vocab, (1, args.n_prompt))
    pp, tg = [], []
    with torch.no_grad():
        model(prompt[:, :16])  # warm-up
        for _ in range(args.repetitions):
            start = time.perf_counter()
            model(prompt)
            pp.append(args.n_prompt / (time.perf_counter() - start))
            start = time.perf_counter()
            model.generate(prompt[:, :1], max_new_tokens=args.n_gen, min_new_tokens=args.n_gen, do_sample=False)
            tg.append(args.n_gen / (time.perf_counter() - start))
    return {"pp": stats(pp), "tg": stats(tg)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--expert-size", type=int, default=512, help="each expert's intermediate width")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--quants", nargs="+", default=["Q4_0", "Q8_0"])
    parser.add_argument("--peers", default="llama.cpp,transformers", help="comma-separated; '' for cholla alone")
    parser.add_argument("--llama-bin-dir", type=Path, default=Path("/work/llamacpp/bin"))
    parser.add_argument("--hf-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--dtype", default=None, help="cholla's --dtype (default: its own)")
    parser.add_argument("-p", "--n-prompt", type=int, default=512)
    parser.add_argument("-n", "--n-gen", type=int, default=128)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "cholla" / "bench-moe")
    args = parser.parse_args()
    peers = [p for p in args.peers.split(",") if p]

    folder = build(args)
    files = ggufs(folder, args.quants)
    bw = bandwidth()
    hf = transformers_bench(folder, args) if "transformers" in peers else None
    lines = [f"Machine: {machine()}; read bandwidth (sum over 1 GiB) {bw / 1e9:.1f} GB/s; threads {args.threads}.",
             f"Model: random Qwen3-MoE, {args.experts} experts, top-{args.top_k}, hidden {args.hidden}, "
             f"{args.layers} layers, expert width {args.expert_size}, vocabulary {args.vocab}.", "",
             f"| file | engine | pp{args.n_prompt} t/s | tg{args.n_gen} t/s | decode ms/token | floor ms/token |",
             "|---|---|---|---|---|---|"]
    for q, path in files.items():
        read, total, active = bytes_per_token(path)
        floor_ms = read / bw * 1e3
        results = {"cholla": cholla_bench(path, args)}
        if "llama.cpp" in peers:
            results["llama.cpp"] = llama_bench(path, args)
        for engine, res in results.items():
            tg = res.get("tg")
            ms = f"{1e3 / tg['mean']:.2f}" if tg else "-"
            lines.append(f"| {q} ({total / 2**20:.0f} MiB, {active / 1e6:.0f}M active, {read / 2**20:.1f} MiB/token) "
                         f"| {engine} | {fmt(res.get('pp'))} | {fmt(tg)} | {ms} | {floor_ms:.2f} |")
    if hf:
        lines.append(f"| SafeTensors ({args.hf_dtype}) | transformers | {fmt(hf['pp'])} | {fmt(hf['tg'])} "
                     f"| {1e3 / hf['tg']['mean']:.2f} | - |")
    print("\n".join(lines))
    print(json.dumps({"bandwidth": bw, "args": {k: str(v) for k, v in vars(args).items()}}), file=sys.stderr)


if __name__ == "__main__":
    main()
