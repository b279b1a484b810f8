"""A pure Mamba-2 model: cholla against llama.cpp (same GGUF files) and transformers.

The model is a Mamba-2 of Mamba-2 130M's proportions with random weights (hidden
768, 24 layers of 24 heads x 64, state 128, one group, 32k vocabulary), or with
``--arch nemotron_h`` a Nemotron Nano-shaped hybrid of the same hidden size (Mamba-2
layers of eight groups, MoE layers of 8 squared-ReLU experts, top 2, with a shared
expert, and one attention layer in eight, in Nemotron-H's order; MoE rather than dense
MLPs because llama.cpp's converter, reading transformers 5's ``layers_block_type``,
files a dense ``mlp`` layer as a Mamba-2 one and llama.cpp then refuses the file), built by
transformers, converted by llama.cpp's ``convert_hf_to_gguf.py`` and requantized
with ``gguf.quants``. Reported llama-bench style (mean ± sd), tokens/s: ``pp`` for a
``-p``-token prompt, ``tg`` single-sequence decode at depth 0 and after a ``--depth``-token
prompt (flat: a Mamba-2 layer's state does not grow with the context), and 32
sequences decoding together (as ``benchmarks/qwen35.py`` measures them, whose
harness this is); transformers runs the SafeTensors folder, pp and tg only (its
PyTorch path: no ``mamba_ssm`` kernels on CPU).

    python benchmarks/mamba2.py --threads 1 -p 128 -n 32 -r 2
    python benchmarks/mamba2.py --threads 1 -p 128 -n 32 -r 2 --depth 4096 --peers llama.cpp --quants Q8_0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.compare import fmt, machine  # noqa: E402
from benchmarks.moe import ggufs, save_random_model, transformers_bench  # noqa: E402
from benchmarks.qwen35 import cholla_all, llama_all  # noqa: E402


def build(args) -> Path:
    """The random model as SafeTensors (cached by its shape under --cache)."""
    import transformers

    folder = args.cache / f"{args.arch}-h{args.hidden}-l{args.layers}-s{args.state}-v{args.vocab}"
    if (folder / "config.json").exists():
        return folder
    if args.arch == "nemotron_h":  # MEMEMEM*: Nemotron-H's layer order, one attention layer in eight
        pattern = (["linear_attention", "moe"] * 3 + ["linear_attention", "full_attention"]) * (args.layers // 8)
        config = transformers.NemotronHConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, layers_block_type=pattern + ["moe"] * (args.layers % 8),
            mamba_num_heads=2 * args.hidden // 64, mamba_head_dim=64, ssm_state_size=args.state, n_groups=8,
            num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256), head_dim=64,
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=args.hidden,
            moe_shared_expert_intermediate_size=2 * args.hidden, max_position_embeddings=8192, tie_word_embeddings=False)
        return save_random_model(folder, config)
    config = transformers.Mamba2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                       num_heads=2 * args.hidden // 64, head_dim=64, expand=2, state_size=args.state,
                                       n_groups=1, tie_word_embeddings=False)
    return save_random_model(folder, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["mamba2", "nemotron_h"], default="mamba2")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--state", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--quants", nargs="+", default=["Q8_0", "Q4_0"])
    parser.add_argument("--peers", default="llama.cpp,transformers", help="comma-separated; '' for cholla alone")
    parser.add_argument("--llama-bin-dir", type=Path, default=Path("/work/llamacpp/bin"))
    parser.add_argument("--hf-dtype", choices=["bfloat16", "float32"], default="float32")
    parser.add_argument("-p", "--n-prompt", type=int, default=512)
    parser.add_argument("-n", "--n-gen", type=int, default=128)
    parser.add_argument("--depth", type=int, nargs="+", default=[4096])
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "cholla" / "bench-mamba2")
    args = parser.parse_args()
    peers = [p for p in args.peers.split(",") if p]

    folder = build(args)
    files = ggufs(folder, args.quants)
    lines = [f"Machine: {machine()}; threads {args.threads}.",
             f"Model: random {args.arch}, hidden {args.hidden}, {args.layers} layers, state {args.state}, "
             f"vocabulary {args.vocab}.", "",
             f"| file | engine | pp{args.n_prompt} t/s | tg{args.n_gen} t/s | "
             + "".join(f"tg{args.n_gen} @ d{depth} t/s | " for depth in args.depth) + f"32 x tg{args.n_gen} total t/s |",
             "|---" * (5 + len(args.depth)) + "|"]
    for q, path in files.items():
        results = {"cholla": cholla_all(path, args)}
        if "llama.cpp" in peers:
            results["llama.cpp"] = llama_all(path, args)
        for engine, res in results.items():
            cells = [res.get("pp"), res.get("tg"), *(res.get(f"tg@{depth}") for depth in args.depth), res.get("batch")]
            lines.append(f"| {q} | {engine} | " + " | ".join(fmt(cell) for cell in cells) + " |")
    if "transformers" in peers:
        hf = transformers_bench(folder, args)
        lines.append(f"| SafeTensors ({args.hf_dtype}) | transformers | {fmt(hf['pp'])} | {fmt(hf['tg'])} |"
                     + " |" * (len(args.depth) + 1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
