"""Prefill of the hybrid recurrent models: cholla against llama.cpp on the same GGUF files.

The random models of ``benchmarks/qwen35.py`` (Qwen 3.5 shape: hidden 1024, 8 layers, 6 of them
Gated DeltaNet with 16 x 128 heads, 2 gated full attention) and ``benchmarks/mamba2.py``
(Mamba-2 130M's proportions: hidden 768, 24 Mamba-2 layers of 24 heads x 64, state 128), built
and converted as those scripts do (cached under ~/.cache/cholla/bench-*). Reported, mean ± sd
over ``-r`` runs, tokens/s:

- ``pp``: one ``-p``-token prompt (cholla: one prefill step, as ``cholla bench``; llama.cpp:
  ``llama-bench -p``);
- ``32 x pp``: 32 prompts of ``--batch-prompt`` tokens prefilled together, total prompt
  tokens/s (cholla: one engine step for all of them; llama.cpp: ``llama-batched-bench``'s
  ``S_PP t/s`` for B=32).

``--cholla-root`` runs another checkout's cholla (say, a worktree of the commit before a change)
with this script, for before/after rows in one command each.

    python benchmarks/hybrid_prefill.py --threads 1 -r 3
    python benchmarks/hybrid_prefill.py --threads 1 -r 3 --models mamba2 --quants Q8_0 --peers ''
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def model_path(name: str, quant: str, cache: Path) -> Path:
    """The benchmark model's GGUF file, built, converted and requantized on first use."""
    from benchmarks import mamba2, qwen35
    from benchmarks.moe import ggufs

    if name == "qwen35":
        args = argparse.Namespace(hidden=1024, layers=8, vocab=32000, cache=cache / "bench-qwen35")
        return ggufs(qwen35.build(args), [quant], ("--no-mtp",))[quant]
    args = argparse.Namespace(arch="mamba2", hidden=768, layers=24, state=128, vocab=32000, cache=cache / "bench-mamba2")
    return ggufs(mamba2.build(args), [quant])[quant]


def cholla_prefill(path: Path, args) -> dict:
    import torch

    from benchmarks.compare import stats
    from cholla.bench import time_prefill
    from cholla.engine.engine import EngineConfig, LLMEngine
    from cholla.sampling.params import SamplingParams

    batch_tokens = 32 * args.batch_prompt
    engine = LLMEngine(path, EngineConfig(max_model_len=max(args.n_prompt, args.batch_prompt) + 2,
                                          max_num_batched_tokens=max(args.n_prompt, batch_tokens),
                                          kv_cache_memory=1024 * 2**20, enable_prefix_caching=False,
                                          threads=args.threads, max_num_seqs=32))
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(0, engine.model_config.vocab_size, (n,), generator=gen).tolist()

    def batch_prefill() -> float:  # 32 prompts in one step, each sampling its first token
        for _ in range(32):
            engine.add_request(None, {"prompt_token_ids": prompt(args.batch_prompt)},
                               SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return batch_tokens / (time.perf_counter() - start)

    time_prefill(engine, prompt(64))  # warm-up
    reps = range(args.repetitions)
    return {"pp": stats([time_prefill(engine, prompt(args.n_prompt)) for _ in reps]),
            "batch": stats([batch_prefill() for _ in reps])}


def llama_prefill(path: Path, args) -> dict:
    import json

    from benchmarks.compare import run, stats

    bench = [str(args.llama_bin_dir / "llama-bench"), "-m", str(path), "-p", str(args.n_prompt), "-n", "0",
             "-r", str(args.repetitions), "-t", str(args.threads), "-o", "json"]
    stdout, _, _ = run(bench, "llama-bench")
    e = json.loads(stdout[stdout.find("["):])[0]
    out = {"pp": {"mean": e["avg_ts"], "sd": e["stddev_ts"], "values": e.get("samples_ts", [])}}
    batched = [str(args.llama_bin_dir / "llama-batched-bench"), "-m", str(path), "-c", str(32 * (args.batch_prompt + 2)),
               "-npp", str(args.batch_prompt), "-ntg", "1", "-npl", "32", "-t", str(args.threads)]
    rates = []
    for _ in range(args.repetitions):
        stdout, stderr, _ = run(batched, "llama-batched-bench")
        header = None
        for line in (stdout + stderr).splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if "S_PP t/s" in cells:
                header = cells
            elif header and len(cells) == len(header) and cells[:3] == [str(args.batch_prompt), "1", "32"]:
                rates.append(float(cells[header.index("S_PP t/s")]))
    out["batch"] = stats(rates) if rates else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["qwen35", "mamba2"], default=["qwen35", "mamba2"])
    parser.add_argument("--quants", nargs="+", default=["Q8_0", "Q4_0"])
    parser.add_argument("--peers", default="llama.cpp", help="'' for cholla alone")
    parser.add_argument("--llama-bin-dir", type=Path, default=Path("/work/llamacpp/bin"))
    parser.add_argument("--cholla-root", type=Path, default=ROOT, help="the checkout whose cholla runs (default: this one)")
    parser.add_argument("--label", default="cholla", help="the cholla rows' engine name")
    parser.add_argument("-p", "--n-prompt", type=int, default=512)
    parser.add_argument("--batch-prompt", type=int, default=128, help="tokens in each of the 32 prompts")
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "cholla")
    args = parser.parse_args()
    sys.path[:0] = [str(args.cholla_root.resolve()), str(ROOT)]  # its cholla first; these benchmarks' helpers

    import cholla
    from benchmarks.compare import fmt, machine

    lines = [f"Machine: {machine()}; threads {args.threads}; cholla from {Path(cholla.__file__).parent.parent}.", "",
             f"| model | file | engine | pp{args.n_prompt} t/s | 32 x pp{args.batch_prompt} total t/s |", "|---" * 5 + "|"]
    for name in args.models:
        for q in args.quants:
            path = model_path(name, q, args.cache)
            results = {args.label: cholla_prefill(path, args)}
            if "llama.cpp" in args.peers:
                results["llama.cpp"] = llama_prefill(path, args)
            for engine, res in results.items():
                lines.append(f"| {name} | {q} | {engine} | {fmt(res['pp'])} | {fmt(res['batch'])} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
