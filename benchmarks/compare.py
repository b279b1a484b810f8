"""cholla against llama.cpp and transformers on the same GGUF files, in one table per model.

For each model it measures, each run in its own process:

- pp512 and tg128 (tokens/s, mean ± sd over ``-r`` repetitions): ``cholla bench --json``,
  ``llama-bench -o json``, and transformers (a 512-token forward; ``generate``
  of exactly 128 greedy tokens after a one-token prompt), all with the same
  ``-p``/``-n``;
- batched throughput: 32 sequences x (128 prompt + 128 generated tokens),
  total tokens/s = 32 * 256 / seconds: cholla's scheduler (the functions of
  benchmarks/throughput.py), ``llama-batched-bench`` (its PP=128, TG=128, B=32
  row, column ``S t/s``) and transformers' batched ``generate``;
- the peak RSS of every process (from wait4), cholla's included;
- the decode roof of this minute: the streaming read bandwidth (``cholla.hardware.
  measure_bandwidth``, as ``benchmarks/hardware.py``, with the engines' threads) measured
  just before and just after cholla's pp/tg run, and the bytes a tg token reads (the
  weights a decode step multiplies, from the GGUF's headers, plus the KV cache at the run's
  mean context); tg is then also given as a share of bandwidth / bytes. The machine's
  bandwidth moves between sittings (and with other work), so the share is the figure that
  compares across them.

transformers loads the GGUF dequantized into bfloat16 (``--hf-dtype``).
cholla runs with its default dtype unless ``--dtype`` is given.

    benchmarks/build_llama_cpp.sh /work/llama-build          # the two llama.cpp binaries
    python benchmarks/compare.py --llama-bin-dir /work/llama-build/bin
    python benchmarks/compare.py --llama-bin-dir /work/llama-build/bin --models smollm2 -r 1 \\
        --peers llama.cpp --dtype bfloat16
    python benchmarks/compare.py --models smollm2 gemma3 --peers '' --no-throughput -p 0   # tg and its roof only

Model names are cholla's known models (``smollm2``, ``gemma3``; fetched into
the cache the first time) or paths to GGUF files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = ("llama.cpp", "transformers")


# ---------------------------------------------------------------- running things

COMMANDS: list[str] = []


def run(cmd: list[str], what: str) -> tuple[str, str, int]:
    """Run ``cmd``; (stdout, stderr, peak RSS in bytes). Raises with the stderr tail on failure."""
    line = shlex.join(cmd)
    COMMANDS.append(line)
    print(f"[compare] {what}: {line}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: this child's own peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    print(f"[compare]   {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {line}\n{tail}")
    return stdout, stderr, usage.ru_maxrss * 1024  # Linux: KiB


def last_json(stdout: str):
    """The last line of ``stdout`` that parses as JSON."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    raise ValueError(f"no JSON in the output:\n{stdout[-2000:]}")


def stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


# ---------------------------------------------------------------- cholla

def cholla_bench(model: Path, args) -> dict:
    cmd = [sys.executable, "-m", "cholla", "bench", str(model), "-p", str(args.n_prompt), "-n", str(args.n_gen),
           "-r", str(args.repetitions), "--json"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    stdout, _, rss = run(cmd, "cholla bench")
    report = last_json(stdout)
    tests = {t["name"]: stats(t["tokens_per_s"]) for t in report["tests"]}
    return {"pp": tests.get(f"pp{args.n_prompt}"), "tg": tests.get(f"tg{args.n_gen}"), "rss": rss,
            "dtype": report["dtype"], "threads": report["threads"]}


def cholla_throughput(model: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "cholla-throughput", "--model-path", str(model),
           *_batch_args(args)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    stdout, _, rss = run(cmd, "cholla batched throughput")
    result = last_json(stdout)
    return {"tp": stats(result["tokens_per_s"]), "rss": rss, "dtype": result["dtype"]}


def _batch_args(args) -> list[str]:
    out = ["--num-seqs", str(args.num_seqs), "--seq-prompt", str(args.seq_prompt), "--seq-gen", str(args.seq_gen),
           "--throughput-reps", str(args.throughput_reps), "-p", str(args.n_prompt), "-n", str(args.n_gen),
           "-r", str(args.repetitions)]
    if args.threads:
        out += ["--threads", str(args.threads)]
    return out


def worker_cholla_throughput(args) -> dict:
    import resource

    sys.path.insert(0, str(HERE))
    from throughput import random_prompts, run_cholla  # benchmarks/throughput.py

    from cholla import LLM, SamplingParams

    kwargs = {"max_num_seqs": args.num_seqs, "max_model_len": args.seq_prompt + args.seq_gen + 16,
              "threads": args.threads}
    if args.dtype:
        kwargs["dtype"] = args.dtype
    llm = LLM(args.model_path, **kwargs)
    prompts = random_prompts(args.num_seqs, args.seq_prompt, llm.engine.model_config.vocab_size, 0)
    params = SamplingParams(temperature=0.0, max_tokens=args.seq_gen, ignore_eos=True)
    run_cholla(llm, [prompts[0][:16]], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
    rates = []
    for _ in range(args.throughput_reps):
        llm.engine.block_manager.reset_prefix_cache()  # no prompt served from an earlier repetition
        seconds, tokens = run_cholla(llm, prompts, params)
        rates.append(tokens / seconds)
    return {"tokens_per_s": rates, "dtype": llm.engine.loaded.dtype,  # as resolved (--dtype auto)
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# ---------------------------------------------------------------- the decode roof

ROOF_MEGABYTES = 512  # the streaming read's buffer: far past the caches (32 MiB L3 on the Zen 5 of docs/benchmarks.md)


def measure_bandwidth(args) -> float:
    """Bytes/s of a streaming read with the engines' threads, in its own process (as the engines run)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "bandwidth", "--threads", str(args.threads)]
    stdout, _, _ = run(cmd, "streaming bandwidth")
    return last_json(stdout)["bytes_per_s"]


def worker_bandwidth(args) -> dict:
    import torch

    from cholla.hardware import measure_bandwidth as measure

    torch.set_num_threads(args.threads)
    return {"bytes_per_s": measure(megabytes=ROOF_MEGABYTES, repeats=5), "threads": torch.get_num_threads()}


def decode_read_bytes(model: Path, n_gen: int, dtype: str) -> dict:
    """What one token of a tg{n_gen} run reads: the weights a decode step multiplies (the
    embedding only where it is the tied head) and the KV cache at the run's mean context
    (its steps attend to 2 .. n_gen + 1 tokens after the one-token prompt; KV types as the
    engine resolves them for ``dtype``)."""
    from cholla.plan import attention_layer_bytes, layer_windows, read_model_facts, resolve_kv_types

    facts = read_model_facts(model)
    k_type, v_type = resolve_kv_types("auto", None, None, dtype)
    layers = list(zip(layer_windows(facts.config), attention_layer_bytes(facts.config, k_type, v_type)))
    contexts = range(2, n_gen + 2)
    kv = sum(sum((c if w is None else min(c, w)) * nbytes for w, (_, nbytes) in layers) for c in contexts) / len(contexts)
    return {"weights": facts.weights.decode_bytes, "kv": kv, "total": facts.weights.decode_bytes + kv}


def decode_roof(model: Path, args, dtype: str, bandwidths: list[float]) -> dict:
    """The tg bound of this minute: the higher of the bandwidths measured around the run, over the bytes a token reads."""
    read = decode_read_bytes(model, args.n_gen, dtype)
    return {**read, "bandwidths": bandwidths, "tokens_per_s": max(bandwidths) / read["total"]}


# ---------------------------------------------------------------- llama.cpp

def llama_bench(model: Path, args) -> dict:
    cmd = [str(args.llama_bin_dir / "llama-bench"), "-m", str(model), "-p", str(args.n_prompt), "-n", str(args.n_gen),
           "-r", str(args.repetitions), "-t", str(args.threads), "-o", "json"]
    stdout, _, rss = run(cmd, "llama-bench")
    start = stdout.find("[")
    entries = json.loads(stdout[start:])
    out = {"rss": rss, "pp": None, "tg": None}
    for e in entries:
        key = "pp" if e["n_gen"] == 0 else "tg" if e["n_prompt"] == 0 else None
        if key:
            out[key] = {"mean": e["avg_ts"], "sd": e["stddev_ts"], "values": e.get("samples_ts", [])}
        out["build"] = f"{e.get('build_commit', '?')} ({e.get('build_number', '?')}), {e.get('cpu_info', '')}".strip()
    return out


def llama_batched_bench(model: Path, args) -> dict:
    ctx = max(8192, args.num_seqs * (args.seq_prompt + args.seq_gen))
    cmd = [str(args.llama_bin_dir / "llama-batched-bench"), "-m", str(model), "-c", str(ctx), "-b", "2048",
           "-ub", "512", "-npp", str(args.seq_prompt), "-ntg", str(args.seq_gen), "-npl", str(args.num_seqs),
           "-t", str(args.threads)]
    rates, rss = [], 0
    for _ in range(args.throughput_reps):
        stdout, stderr, r = run(cmd, "llama-batched-bench")
        rss = max(rss, r)
        rates.append(_parse_batched_bench(stdout + "\n" + stderr, args))
    return {"tp": stats(rates), "rss": rss}


def _parse_batched_bench(text: str, args) -> float:
    """``S t/s`` of the row PP=seq_prompt, TG=seq_gen, B=num_seqs of llama-batched-bench's table."""
    header = None
    for line in text.splitlines():
        if not line.strip().startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "PP" in cells and "S t/s" in cells:
            header = cells
            continue
        if header and len(cells) == len(header):
            try:
                row = dict(zip(header, cells))
                if (int(row["PP"]), int(row["TG"]), int(row["B"])) == (args.seq_prompt, args.seq_gen, args.num_seqs):
                    return float(row["S t/s"])
            except ValueError:
                continue
    raise ValueError(f"no PP={args.seq_prompt} TG={args.seq_gen} B={args.num_seqs} row in llama-batched-bench's output:\n"
                     + text[-3000:])


# ---------------------------------------------------------------- transformers

def transformers_all(model: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "transformers", "--model-path", str(model),
           "--hf-dtype", args.hf_dtype, *_batch_args(args)]
    if args.no_throughput:
        cmd.append("--no-throughput")
    stdout, _, rss = run(cmd, "transformers")
    result = last_json(stdout)
    return {"pp": stats(result["pp"]), "tg": stats(result["tg"]),
            "tp": stats(result["tp"]) if result.get("tp") else None, "rss": rss,
            "load_s": result["load_s"], "version": result["version"]}


def worker_transformers(args) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model_path)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=getattr(torch, args.hf_dtype)).eval()
    load_s = time.perf_counter() - start
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def ids(batch: int, length: int) -> torch.Tensor:
        return torch.randint(100, vocab, (batch, length), generator=gen)

    def generate(input_ids: torch.Tensor, n: int):
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)

    result = {"load_s": load_s, "version": transformers.__version__, "pp": [], "tg": [], "tp": []}
    with torch.inference_mode():
        model(ids(1, 16))  # warm-up
        generate(ids(1, 1), 2)
        for _ in range(args.repetitions):
            x = ids(1, args.n_prompt)
            t0 = time.perf_counter()
            model(x)
            result["pp"].append(args.n_prompt / (time.perf_counter() - t0))
        for _ in range(args.repetitions):
            x = ids(1, 1)
            t0 = time.perf_counter()
            out = generate(x, args.n_gen)
            result["tg"].append((out.shape[1] - 1) / (time.perf_counter() - t0))
        if not args.no_throughput:
            for _ in range(args.throughput_reps):
                x = ids(args.num_seqs, args.seq_prompt)  # equal lengths: no padding
                t0 = time.perf_counter()
                out = generate(x, args.seq_gen)
                result["tp"].append(out.numel() / (time.perf_counter() - t0))
    return result


# ---------------------------------------------------------------- report

def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = "?"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info = dict(l.split(":", 1) for l in lscpu.splitlines() if ":" in l)
        cores = int(info["Core(s) per socket"].strip()) * int(info.get("Socket(s)", "1").strip())
    except Exception:
        pass
    return f"{cpu}, {cores} physical cores, {os.cpu_count()} logical CPUs"


def fmt(m: dict | None, unit: float = 1.0, digits: int = 1) -> str:
    if not m:
        return "—"
    s = f"{m['mean'] / unit:.{digits}f}"
    if len(m.get("values") or []) > 1:
        s += f" ± {m['sd'] / unit:.{digits}f}"
    return s


def ratio(a: dict | None, b: dict | None) -> str:
    return f"{a['mean'] / b['mean']:.2f}" if a and b and b["mean"] else "—"


def _cholla_dtype(c: dict) -> str:
    asked, loaded = c.get("dtype", "?"), c.get("loaded_dtype")
    return f"{asked} (loads as {loaded})" if loaded and loaded != asked else asked


def table(name: str, model: Path, res: dict, args) -> str:
    c, l, t = res.get("cholla", {}), res.get("llama.cpp"), res.get("transformers")
    tp = f"{args.num_seqs} x ({args.seq_prompt}+{args.seq_gen}) total t/s"
    rows = [(f"{test}{n} t/s", c.get(test), (l or {}).get(test), (t or {}).get(test))
            for test, n in (("pp", args.n_prompt), ("tg", args.n_gen)) if n]
    if not args.no_throughput:
        rows.append((tp, c.get("tp"), (l or {}).get("tp"), (t or {}).get("tp")))
    mib = 2**20

    def rss(value):
        return {"mean": value, "sd": 0.0, "values": [value]} if value else None

    roof = res.get("roof")
    if roof:
        def share(m):
            return {"mean": 100 * m["mean"] / roof["tokens_per_s"], "sd": 100 * m["sd"] / roof["tokens_per_s"],
                    "values": m.get("values")} if m else None

        rows.insert(1 + bool(args.n_prompt), (f"tg{args.n_gen} % of the memory bound", share(c.get("tg")),
                                              share((l or {}).get("tg")), share((t or {}).get("tg"))))
    rows.append(("peak RSS MiB, pp/tg run (lower is better)", rss(c.get("rss")), rss((l or {}).get("rss")),
                 rss((t or {}).get("rss"))))
    if not args.no_throughput:
        rows.append(("peak RSS MiB, batched run (lower is better)", rss(c.get("tp_rss")), rss((l or {}).get("tp_rss")),
                     rss((t or {}).get("rss"))))
    lines = [f"### {name}: {model.name} ({model.stat().st_size / mib:.1f} MiB)", "",
             f"cholla dtype {_cholla_dtype(c)}, transformers dtype {args.hf_dtype}, "
             f"{args.threads} threads, {args.repetitions} repetition(s) of pp/tg, "
             f"{args.throughput_reps} of the batched run", "",
             "| metric | cholla | llama.cpp | cholla / llama.cpp | transformers | cholla / transformers |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, cv, lv, tv in rows:
        unit = mib if label.startswith("peak RSS") else 1.0
        digits = 0 if unit == mib else 1
        lines.append(f"| {label} | {fmt(cv, unit, digits)} | {fmt(lv, unit, digits) if l else '—'} | "
                     f"{ratio(cv, lv) if l else '—'} | {fmt(tv, unit, digits) if t else '—'} | "
                     f"{ratio(cv, tv) if t else '—'} |")
    if roof:
        lines += ["", f"memory bound of tg{args.n_gen}: {roof['tokens_per_s']:.0f} t/s = streaming read "
                  f"{max(roof['bandwidths']) / 1e9:.1f} GB/s (the higher of "
                  f"{' and '.join(f'{b / 1e9:.1f}' for b in roof['bandwidths'])} GB/s measured just before and after "
                  f"cholla's run, {args.threads} threads) / {roof['total'] / 1e6:.2f} MB a token "
                  f"(weights {roof['weights'] / 1e6:.2f} MB, KV cache {roof['kv'] / 1e6:.2f} MB at the mean context)"]
    if t:
        lines.append("")
        lines.append(f"transformers {t['version']}: loading the GGUF took {t['load_s']:.1f} s; its peak RSS is "
                     "one process for pp, tg and the batched run")
    if l and l.get("build"):
        lines.append(f"llama.cpp build {l['build']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-bin-dir", type=Path, default=None,
                        help="folder with llama-bench and llama-batched-bench (benchmarks/build_llama_cpp.sh)")
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"], help="known names or GGUF paths")
    parser.add_argument("-r", "--repetitions", type=int, default=3, help="runs of pp and tg (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="threads for every engine (default: cholla's, one per physical core)")
    parser.add_argument("--dtype", default=None,
                        help="cholla's --dtype, passed through (default: none, i.e. cholla's default)")
    parser.add_argument("--hf-dtype", choices=["bfloat16", "float32"], default="bfloat16", help="transformers' dtype")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated, from llama.cpp,transformers "
                        "(default both; '' for cholla alone)")
    parser.add_argument("-p", "--n-prompt", type=int, default=512)
    parser.add_argument("-n", "--n-gen", type=int, default=128)
    parser.add_argument("--num-seqs", type=int, default=32, help="sequences in the batched run (default 32)")
    parser.add_argument("--seq-prompt", type=int, default=128, help="prompt tokens per sequence (default 128)")
    parser.add_argument("--seq-gen", type=int, default=128, help="generated tokens per sequence (default 128)")
    parser.add_argument("--throughput-reps", type=int, default=1, help="runs of the batched test (default 1)")
    parser.add_argument("--no-throughput", action="store_true", help="skip the batched test")
    parser.add_argument("--output", type=Path, default=None, help="also write the report (markdown) here")
    parser.add_argument("--worker", choices=["cholla-throughput", "transformers", "bandwidth"], help=argparse.SUPPRESS)
    parser.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # this checkout's cholla, also in the workers

    if args.worker:
        fn = {"cholla-throughput": worker_cholla_throughput, "transformers": worker_transformers,
              "bandwidth": worker_bandwidth}[args.worker]
        print(json.dumps(fn(args)))
        return

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(sorted(unknown))}; choose from {', '.join(PEERS)}")
    if "llama.cpp" in peers:
        if args.llama_bin_dir is None:
            parser.error("llama.cpp needs --llama-bin-dir (build it with benchmarks/build_llama_cpp.sh DIR)")
        for exe in ("llama-bench", "llama-batched-bench"):
            if not (args.llama_bin_dir / exe).is_file():
                parser.error(f"no {exe} in {args.llama_bin_dir}")

    from cholla.download import resolve_model
    from cholla.threads import physical_cores

    args.threads = args.threads or physical_cores()  # cholla's default, given to every engine

    # Build cholla's kernels (first use compiles them) outside the measured runs: a
    # child's peak RSS as wait4 reports it includes the compiler's, ~800 MiB.
    run([sys.executable, "-c", "from cholla.kernels import cpu_kernels; cpu_kernels()"], "cholla kernels build")
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    sections = []
    for name in args.models:
        model = resolve_model(name)
        before = measure_bandwidth(args) if args.n_gen else None
        res: dict = {"cholla": cholla_bench(model, args)}
        if args.n_gen:
            res["roof"] = decode_roof(model, args, res["cholla"]["dtype"], [before, measure_bandwidth(args)])
        if not args.no_throughput:
            tp = cholla_throughput(model, args)
            res["cholla"].update(tp=tp["tp"], tp_rss=tp["rss"], loaded_dtype=tp["dtype"])
        if "llama.cpp" in peers:
            res["llama.cpp"] = llama_bench(model, args)
            if not args.no_throughput:
                tp = llama_batched_bench(model, args)
                res["llama.cpp"].update(tp=tp["tp"], tp_rss=tp["rss"])
        if "transformers" in peers:
            try:
                res["transformers"] = transformers_all(model, args)
            except (RuntimeError, ValueError) as e:  # e.g. an architecture transformers cannot read from GGUF
                print(f"[compare] transformers skipped for {name}: {e}", file=sys.stderr)
        section = table(name, model, res, args)
        print("\n" + section + "\n", flush=True)
        sections.append(section)

    load_after = os.getloadavg()
    import torch

    header = [
        "## cholla vs llama.cpp vs transformers", "",
        f"- date: {started:%Y-%m-%d %H:%M %Z} (took {(datetime.datetime.now().astimezone() - started).seconds / 60:.1f} min)",
        f"- machine: {machine()}; threads used: {args.threads}",
        f"- load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}",
        f"- python {platform.python_version()}, torch {torch.__version__}",
        "- ratios are cholla / peer: above 1, cholla is faster (for peak RSS: uses more memory)",
        "", "commands:", "", "```", *COMMANDS, "```", "",
    ]
    report = "\n".join(header) + "\n" + "\n\n".join(sections) + "\n"
    print("\n" + report)
    if args.output:
        args.output.write_text(report)


if __name__ == "__main__":
    main()
