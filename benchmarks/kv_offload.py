"""Time to first token when a long prefix comes back from the KV disk tier, against recomputing it.

A request shares a ~4,000-token prefix with an earlier one whose blocks were
evicted from the in-memory prefix cache (the KV cache holds one such request,
so another long request pushes them out) and written under --kv-offload-dir.
Rows, each the mean ± sd of --repeat requests with fresh random prefixes:

- recompute: the prefix was never seen (what every request costs without the tier);
- from disk: same engine, the prefix evicted to disk and read back;
- after restart: a new process on the same directory (the first engine closed);
- after restart, not in page cache: as above with the files dropped from the OS page
  cache first (``posix_fadvise(DONTNEED)``), so they come from the disk itself.

--io measures only the engine thread's share of the tier's work on the model's
real cache layout: copying a prefix's evicted blocks out (waiting for the
writer when its staging buffer is full) and reading them back in.

    python benchmarks/kv_offload.py                       # SmolLM2, 4000-token prefix
    python benchmarks/kv_offload.py gemma3 --prefix-len 4000 --kv-cache-dtype bf16
    python benchmarks/kv_offload.py --io
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cholla import SamplingParams
from cholla.download import resolve_model
from cholla.engine.engine import EngineConfig, LLMEngine, kv_cache_types
from cholla.kv.paged_cache import bytes_per_block, fit_kv_types
from cholla.models.loader import load_model

GREEDY_ONE = SamplingParams(temperature=0.0, max_tokens=1)


def time_to_first_token(engine: LLMEngine, prompt: list[int]) -> tuple[float, int]:
    """Seconds from arrival to the first token, and how many prompt tokens came from a cache."""
    engine.add_request("r", {"prompt_token_ids": prompt}, GREEDY_ONE)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                metrics = out.metrics
    return metrics.first_token_time - metrics.arrival_time, metrics.num_cached_prompt_tokens


def random_tokens(count: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(100, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def build(args: argparse.Namespace, directory: str) -> LLMEngine:
    """An engine whose KV cache holds one long request (and a little): a second one evicts the first's blocks."""
    loaded = load_model(resolve_model(args.model))
    config = EngineConfig(max_model_len=args.prefix_len + args.suffix_len + 16, max_num_batched_tokens=2048,
                          kv_cache_dtype=args.kv_cache_dtype, kv_offload_dir=directory, kv_offload_gib=args.offload_gib)
    k_type, v_type = fit_kv_types(loaded.config, *kv_cache_types(config, loaded.dtype))
    blocks = -(-(config.max_model_len + 48) // config.block_size)
    config.kv_cache_memory = blocks * bytes_per_block(loaded.config, config.block_size, k_type, v_type)
    return LLMEngine(loaded, config)


def child(args: argparse.Namespace) -> None:
    """The restarted process: one warm-up request, then each prefix from disk."""
    engine = build(args, args.dir)
    vocab = engine.model_config.vocab_size
    time_to_first_token(engine, random_tokens(32, vocab, 999))
    results = []
    for seed in args.seeds:
        prompt = random_tokens(args.prefix_len, vocab, seed) + random_tokens(args.suffix_len, vocab, seed + 500)
        results.append(time_to_first_token(engine, prompt))
    print(json.dumps({"results": results, "hits": engine.block_manager.disk.stats.hits}))


def io_costs(args: argparse.Namespace) -> None:
    """Milliseconds per block the engine thread spends saving (copy-out, back-pressure) and loading."""
    from cholla.kv.block_manager import chain_hash
    from cholla.kv.disk_tier import DiskTier, cache_parts

    with tempfile.TemporaryDirectory(prefix="cholla-kv-offload-") as directory:
        engine = build(args, directory)
        parts = cache_parts(engine.kv_cache.layers)
        size = engine.config.block_size
        blocks = args.prefix_len // size
        entries, parent = [], None
        for i in range(blocks):
            tokens = tuple(range(size * i, size * (i + 1)))
            parent = chain_hash(parent, tokens)
            entries.append((parent, tokens))
        tier = DiskTier(Path(directory) / "io", 2 * blocks * engine.kv_layout.block_bytes, bytes(16), parts)
        start = time.perf_counter()
        tier.save(entries, list(range(blocks)))
        saved = time.perf_counter() - start
        tier.flush()
        written = time.perf_counter() - start
        start = time.perf_counter()
        assert tier.load(entries, list(range(blocks))) == blocks
        loaded = time.perf_counter() - start
        tier.close()
    print(f"{args.model}: {blocks} blocks of {engine.kv_layout.block_bytes / 2**10:.0f} KiB on the engine thread: "
          f"save {1000 * saved / blocks:.2f} ms/block (all on disk after {1000 * written:.0f} ms), "
          f"load {1000 * loaded / blocks:.2f} ms/block (from the page cache)")


def drop_page_cache(directory: str) -> None:
    for path in Path(directory).rglob("*.kvb"):
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def restarted(args: argparse.Namespace, directory: str, seeds: list[int], cold: bool) -> list[tuple[float, int]]:
    if cold:
        drop_page_cache(directory)
    command = [sys.executable, __file__, args.model, "--prefix-len", str(args.prefix_len), "--suffix-len",
               str(args.suffix_len), "--kv-cache-dtype", args.kv_cache_dtype, "--offload-gib", str(args.offload_gib),
               "--child", "--dir", directory, "--seeds", *map(str, seeds)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return [tuple(r) for r in json.loads(out.strip().splitlines()[-1])["results"]]


def summary(name: str, rows: list[tuple[float, int]], base: float | None) -> str:
    seconds = [s for s, _ in rows]
    mean = statistics.mean(seconds)
    ratio = f"{mean / base:.3f}" if base else "1"
    return (f"| {name} | {1000 * mean:.0f} ± {1000 * statistics.pstdev(seconds):.0f} | "
            f"{min(c for _, c in rows)} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--prefix-len", type=int, default=4000)
    parser.add_argument("--suffix-len", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--offload-gib", type=float, default=4.0)
    parser.add_argument("--io", action="store_true", help="only the engine thread's save and load cost per block")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.io:
        io_costs(args)
        return

    with tempfile.TemporaryDirectory(prefix="cholla-kv-offload-") as directory:
        engine = build(args, directory)
        vocab = engine.model_config.vocab_size
        time_to_first_token(engine, random_tokens(32, vocab, 999))  # warm-up
        recompute, from_disk = [], []
        seeds = [1000 * (i + 1) for i in range(args.repeat)]
        for seed in seeds:
            prefix = random_tokens(args.prefix_len, vocab, seed)
            recompute.append(time_to_first_token(engine, prefix + random_tokens(args.suffix_len, vocab, seed + 100)))
            assert recompute[-1][1] == 0
            time_to_first_token(engine, random_tokens(args.prefix_len, vocab, seed + 1))  # evicts the prefix
            engine.block_manager.disk.flush()
            from_disk.append(time_to_first_token(engine, prefix + random_tokens(args.suffix_len, vocab, seed + 200)))
        stats, layout = engine.block_manager.disk.stats, engine.kv_layout
        engine.close()
        after_restart = restarted(args, directory, seeds, cold=False)
        not_cached = restarted(args, directory, seeds, cold=True)

    base = statistics.mean(s for s, _ in recompute)
    print(f"\n{args.model}: {args.prefix_len}-token prefix + {args.suffix_len}-token suffix, KV "
          f"{layout.block_bytes / 2**10:.0f} KiB per {layout.block_size}-token block "
          f"({args.prefix_len // layout.block_size * layout.block_bytes / 2**20:.0f} MiB per prefix), "
          f"{args.repeat} repetitions, {torch.get_num_threads()} threads")
    print("| request | TTFT ms (mean ± sd) | prompt tokens from cache | / recompute |\n|---|---|---|---|")
    print(summary("recompute (prefix never seen)", recompute, None))
    print(summary("from disk (evicted, same engine)", from_disk, base))
    print(summary("after restart (new process)", after_restart, base))
    print(summary("after restart, files not in page cache", not_cached, base))
    blocks = args.prefix_len // layout.block_size
    print(f"per {layout.block_size}-token block: recompute {1000 * base / blocks:.2f} ms, read back "
          f"{1000 * statistics.mean(s for s, _ in not_cached) / blocks:.2f} ms (uncached, suffix included); "
          f"disk tier: {stats.hits} blocks read, {stats.writes} written, {stats.dropped} dropped")
    print("goal: <= 0.25 of recompute")


if __name__ == "__main__":
    main()
