"""Prefill of the hybrid recurrent models: cholla against llama.cpp on the same GGUF files.

The random models of ``benchmarks/qwen35.py`` (Qwen 3.5 shape: hidden 1024, 8 layers, 6 of them
Gated DeltaNet with 16 x 128 heads, 2 gated full attention) and ``benchmarks/mamba2.py``
(Mamba-2 130M's proportions: hidden 768, 24 Mamba-2 layers of 24 heads x 64, state 128), built
and converted as those scripts do (cached under ~/.cache/cholla/bench-*). Reported, mean ± sd
over ``-r`` runs, tokens/s:

- ``pp``: one ``-p``-token prompt (cholla: one prefill step, as ``cholla bench``; llama.cpp:
  ``llama-bench -p``);
- ``32 x pp``: 32 prompts of ``--batch-prompt`` tokens prefilled together, total prompt
  tokens/s (cholla: the engine's default 2048 tokens per step, so 16 prompts of 128 a step;
  llama.cpp: ``llama-batched-bench``'s ``S_PP t/s`` for B=32, its default batch of 2048).

``--cpu-time`` reports tokens per CPU-second instead, for a machine shared with other work:
cholla's thread CPU time over the same steps; llama.cpp's process CPU time, the difference
between two runs that differ only in the work measured (``-r R+1`` against ``-r 1``; 32 prompts
against one), so loading and warm-up cancel.

``--cholla-root`` runs another checkout's cholla (say, a worktree of the commit before a change)
with this script, for before/after rows in one command each. ``--profile`` prints instead where
one ``-p``-token prefill's time goes (and the 32 prompts'), by part of the model (thread CPU
time, each part's own: the projections inside a layer count as projections, not as the layer).

    python benchmarks/hybrid_prefill.py --threads 1 -r 3
    python benchmarks/hybrid_prefill.py --threads 1 -r 3 --models mamba2 --quants Q8_0 --peers ''
    python benchmarks/hybrid_prefill.py --threads 1 -r 3 --cpu-time
    python benchmarks/hybrid_prefill.py --threads 1 -r 3 --quants Q8_0 --profile
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
    """{"pp", "batch"}: tokens/s over -r runs; in wall time, or with --cpu-time in the thread's CPU time."""
    import torch

    from benchmarks.compare import stats
    from cholla.engine.engine import EngineConfig, LLMEngine
    from cholla.sampling.params import SamplingParams

    engine = LLMEngine(path, EngineConfig(max_model_len=max(args.n_prompt, args.batch_prompt) + 2,
                                          max_num_batched_tokens=max(args.n_prompt, 2048),
                                          kv_cache_memory=1024 * 2**20, enable_prefix_caching=False,
                                          threads=args.threads, max_num_seqs=32))
    gen = torch.Generator().manual_seed(0)
    clock = time.thread_time if args.cpu_time else time.perf_counter

    def prefill(prompts: int, length: int) -> float:  # prompts of `length` tokens together, each sampling one token
        for _ in range(prompts):
            prompt = torch.randint(0, engine.model_config.vocab_size, (length,), generator=gen).tolist()
            engine.add_request(None, {"prompt_token_ids": prompt},
                               SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        start = clock()
        while engine.has_unfinished_requests():
            engine.step()
        return prompts * length / (clock() - start)

    prefill(1, 64)  # warm-up
    reps = range(args.repetitions)
    return {"pp": stats([prefill(1, args.n_prompt) for _ in reps]),
            "batch": stats([prefill(32, args.batch_prompt) for _ in reps])}


def cpu_seconds(cmd: list[str]) -> float:
    """User + system CPU seconds of running ``cmd`` (its output discarded)."""
    import os
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        sys.exit(f"{cmd[0]} failed (status {status})")
    return usage.ru_utime + usage.ru_stime


def llama_cpu_rates(path: Path, args) -> dict:
    """llama.cpp's tokens per CPU-second: the difference between two runs that differ only in the
    work measured (-r R+1 against -r 1 pp runs; 32 prompts against 1), so loading and warm-up cancel."""
    from benchmarks.compare import stats

    bench = [str(args.llama_bin_dir / "llama-bench"), "-m", str(path), "-p", str(args.n_prompt), "-n", "0",
             "-t", str(args.threads), "-r"]
    batched = [str(args.llama_bin_dir / "llama-batched-bench"), "-m", str(path), "-c", str(32 * (args.batch_prompt + 2)),
               "-npp", str(args.batch_prompt), "-ntg", "1", "-t", str(args.threads), "-npl"]
    pp, batch = [], []
    for _ in range(args.repetitions):
        pp.append(args.n_prompt * args.repetitions
                  / (cpu_seconds(bench + [str(args.repetitions + 1)]) - cpu_seconds(bench + ["1"])))
        batch.append(31 * args.batch_prompt / (cpu_seconds(batched + ["32"]) - cpu_seconds(batched + ["1"])))
    return {"pp": stats(pp), "batch": stats(batch)}


# The parts of a prefill step: (name, module, attribute); functions are timed wherever a cholla
# module imported them, methods on their class; those a checkout lacks (an older one) are skipped.
PARTS = [
    ("projections (dequantize + matmul)", "cholla.layers.linear", "linear_group"),
    ("delta rule, chunked", "cholla.layers.gated_deltanet", "GatedDeltaNet._prefill"),
    ("delta rule, chunked", "cholla.layers.gated_deltanet", "delta_rule_chunked"),  # the PyTorch form
    ("SSD scan, chunked", "cholla.layers.mamba2", "Mamba2Mixer._prefill"),
    ("SSD scan, chunked", "cholla.layers.mamba2", "ssd_chunked"),  # the PyTorch form
    ("causal conv", "cholla.layers.causal_conv", "causal_conv1d"),
    ("gated norm", "cholla.layers.gated_deltanet", "GatedDeltaNet._gated_norm"),
    ("gated norm", "cholla.layers.mamba2", "Mamba2Mixer._gate"),
    ("RMSNorm", "cholla.layers.norm", "RMSNorm.forward"),
    ("attention (SDPA, KV write)", "cholla.layers.attention", "paged_attention"),
    ("attention glue (qk-norm, rope, gate)", "cholla.layers.attention", "Attention.forward"),
    ("MLP activation", "cholla.layers.mlp", "gated_activation"),
    ("DeltaNet glue (splits, beta/g casts)", "cholla.layers.gated_deltanet", "GatedDeltaNet.forward"),
    ("Mamba-2 glue (splits)", "cholla.layers.mamba2", "Mamba2Mixer.forward"),
]


_TOTALS: list[dict[str, float]] = []  # install_timers' dict, once installed


def install_timers() -> dict[str, float]:
    """Wraps each of PARTS in a timer, once per process. -> the dict of each part's own thread CPU seconds."""
    import importlib
    import time as clock

    if _TOTALS:
        return _TOTALS[0]
    totals: dict[str, float] = {}
    stack: list[list] = []  # [part, start, time of timed calls inside]

    def timed(part, fn):
        def wrapper(*a, **k):
            stack.append([part, clock.thread_time(), 0.0])
            try:
                return fn(*a, **k)
            finally:
                _, start, inner = stack.pop()
                spent = clock.thread_time() - start
                totals[part] = totals.get(part, 0.0) + spent - inner
                if stack:
                    stack[-1][2] += spent
        return wrapper

    for part, module, attribute in PARTS:
        owner = importlib.import_module(module)
        if "." in attribute:
            cls, name = attribute.split(".")
            if hasattr(getattr(owner, cls), name):
                setattr(getattr(owner, cls), name, timed(part, getattr(getattr(owner, cls), name)))
            continue
        original = getattr(owner, attribute)
        for mod in [m for n, m in list(sys.modules.items()) if n.startswith("cholla") and m is not None]:
            if getattr(mod, attribute, None) is original:
                setattr(mod, attribute, timed(part, original))
    _TOTALS.append(totals)
    return totals


def profile_prefill(path: Path, args, batch: bool) -> list[tuple[str, float]]:
    """(part, ms of thread CPU time) of one -p-token prefill (``batch``: of 32 --batch-prompt-token
    prompts, prefilled together), best of -r, with the total."""
    import time as clock

    import torch

    from cholla.engine.engine import EngineConfig, LLMEngine
    from cholla.sampling.params import SamplingParams

    totals = install_timers()
    engine = LLMEngine(path, EngineConfig(max_model_len=max(args.n_prompt, args.batch_prompt) + 2,
                                          max_num_batched_tokens=max(args.n_prompt, 2048),
                                          kv_cache_memory=1024 * 2**20, enable_prefix_caching=False,
                                          threads=args.threads, max_num_seqs=32))
    gen = torch.Generator().manual_seed(0)
    best = None
    for _ in range(args.repetitions + 1):  # the first is a warm-up
        totals.clear()
        start = clock.thread_time()
        for _ in range(32 if batch else 1):
            prompt = torch.randint(0, engine.model_config.vocab_size, (args.batch_prompt if batch else args.n_prompt,),
                                   generator=gen).tolist()
            engine.add_request(None, {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
        total = clock.thread_time() - start
        if best is None or total < best[0]:
            best = (total, dict(totals))
    total, parts = best
    rows = sorted(((part, 1e3 * t) for part, t in parts.items()), key=lambda r: -r[1])
    return rows + [("engine, sampling and Python between", 1e3 * (total - sum(parts.values()))),
                   ("total", 1e3 * total)]


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
    parser.add_argument("--profile", action="store_true", help="where one prefill's time goes, instead of the table")
    parser.add_argument("--cpu-time", action="store_true",
                        help="tokens per CPU-second instead of per second (a shared machine's load barely moves it); with --threads 1")
    args = parser.parse_args()
    sys.path[:0] = [str(args.cholla_root.resolve()), str(ROOT)]  # its cholla first; these benchmarks' helpers

    import cholla
    from benchmarks.compare import fmt, machine

    if args.profile:
        for name in args.models:
            for q in args.quants:
                for batch in (False, True):
                    rows = profile_prefill(model_path(name, q, args.cache), args, batch)
                    total = rows[-1][1]
                    test = f"32 x pp{args.batch_prompt}" if batch else f"pp{args.n_prompt}"
                    print(f"\n{name} {q}, {test}, thread CPU ms (best of {args.repetitions}):\n"
                          "| part | ms | share |\n|---|---|---|")
                    print("\n".join(f"| {part} | {ms:.1f} | {100 * ms / total:.0f}% |" for part, ms in rows))
        return

    lines = [f"Machine: {machine()}; threads {args.threads}; cholla from {Path(cholla.__file__).parent.parent}.", "",
             f"Rates in tokens per {'CPU-' if args.cpu_time else ''}second.", "",
             f"| model | file | engine | pp{args.n_prompt} | 32 x pp{args.batch_prompt} total |", "|---" * 5 + "|"]
    for name in args.models:
        for q in args.quants:
            path = model_path(name, q, args.cache)
            results = {args.label: cholla_prefill(path, args)}
            if "llama.cpp" in args.peers:
                results["llama.cpp"] = (llama_cpu_rates if args.cpu_time else llama_prefill)(path, args)
            for engine, res in results.items():
                lines.append(f"| {name} | {q} | {engine} | {fmt(res['pp'])} | {fmt(res['batch'])} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
