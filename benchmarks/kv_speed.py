"""Decode speed at a long context for each KV cache type: the C++ kernels reading the cache in
place against the PyTorch path (gather and dequantize the context, then attend).

    OMP_NUM_THREADS=1 python benchmarks/kv_speed.py --models smollm2 gemma3 --context 4096

Each sequence's cache is filled with ``--context`` tokens of random keys and values (attention's
cost does not depend on them), then ``--steps`` decode steps run at that context, once with the
kernels (the fused decode step, every KV type written and read in place) and once with the
attention forced onto the PyTorch path (what every type but f32/bf16 ran on before), alternating
path by path so load on a shared machine hits both alike. Prints ms per step (median) and decode
tokens per second (sequences / step time) per model, type and path.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch

from cholla.download import resolve_model
from cholla.kv.kv_types import head_dim, kv_cache_type
from cholla.kv.paged_cache import PagedKVCache
from cholla.layers import attention
from cholla.layers.attention import AttentionMetadata
from cholla.models import fused_decode
from cholla.models.loader import load_model

TYPES = ["bf16", "fp8_e4m3_plain", "fp8_e4m3", "int8", "q8_0", "q4_0", "q4_0_cal", "q8_0/q4_0_cal", "q4_kivi",
         "fp8_e4m3_scaled"]
BLOCK_SIZE = 16


@contextmanager
def torch_attention():
    """Attention (and KV writes) on the PyTorch path: the kernels refuse every cache."""
    saved = attention.kernel_reads, fused_decode.kernel_reads
    attention.kernel_reads = fused_decode.kernel_reads = lambda k_cache, v_cache: False
    try:
        yield
    finally:
        attention.kernel_reads, fused_decode.kernel_reads = saved


def _sides(name: str) -> tuple:
    k_name, _, v_name = name.partition("/")
    return kv_cache_type(k_name), kv_cache_type(v_name or k_name)


def filled_cache(config, name: str, seqs: int, blocks_per_seq: int) -> PagedKVCache:
    k_type, v_type = _sides(name)
    cache = PagedKVCache(config, seqs * blocks_per_seq, BLOCK_SIZE, k_type, v_dtype=v_type)
    generator = torch.Generator().manual_seed(0)
    slots = torch.arange(cache.num_tokens)
    for k_cache, v_cache in cache.layers:
        shape = (cache.num_tokens, k_cache.shape[2], head_dim(k_cache))
        attention.write_kv(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator),
                           k_cache, v_cache, slots)
    return cache


def step_meta(context: int, seqs: int, blocks_per_seq: int, step: int):
    tables = torch.arange(seqs * blocks_per_seq).view(seqs, blocks_per_seq)
    position = context + step
    positions = torch.full((seqs,), position)
    slots = tables[:, position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE
    lens = [position + 1] * seqs
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=list(range(seqs + 1)), context_lens=lens,
                             block_tables=tables, num_prefills=0, decode_context_lens=torch.tensor(lens))
    return positions, meta


@torch.inference_mode()
def run(model_name: str, types: list[str], context: int, seqs: int, steps: int, rounds: int) -> list[dict]:
    loaded = load_model(resolve_model(model_name))
    model, config = loaded.model, loaded.config
    blocks_per_seq = -(-(context + steps + 1) // BLOCK_SIZE)
    ids = torch.randint(0, config.vocab_size, (seqs,), generator=torch.Generator().manual_seed(1))
    results = []
    for name in types:
        cache = filled_cache(config, name, seqs, blocks_per_seq)
        times = {"kernel": [], "pytorch": []}
        for _ in range(rounds):
            for path, samples in times.items():
                with torch_attention() if path == "pytorch" else nullcontext():
                    positions, meta = step_meta(context, seqs, blocks_per_seq, 0)
                    model(ids, positions, cache.layers, meta)  # a warm-up step, untimed
                    for step in range(steps):
                        positions, meta = step_meta(context, seqs, blocks_per_seq, step)
                        start = time.perf_counter()
                        model.compute_logits(model(ids, positions, cache.layers, meta))
                        samples.append(time.perf_counter() - start)
        for path, samples in times.items():
            ms = 1000 * statistics.median(samples)
            results.append({"model": model_name, "type": name, "path": path, "ms": ms, "tokens_per_s": seqs * 1000 / ms})
        del cache
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("--types", nargs="+", default=TYPES, help="KV types; K_TYPE/V_TYPE for a pair")
    parser.add_argument("--context", type=int, default=4096, help="cached tokens per sequence (default 4096)")
    parser.add_argument("--seqs", type=int, default=1, help="sequences decoding together (default 1)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per round and path (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two paths (default 3)")
    args = parser.parse_args()
    for model_name in args.models:
        results = run(model_name, args.types, args.context, args.seqs, args.steps, args.rounds)
        print(f"\n{model_name}: context {args.context}, {args.seqs} sequence(s), median of "
              f"{args.steps * args.rounds} steps per path, {torch.get_num_threads()} thread(s)")
        print("| KV type | kernel ms/step | kernel tok/s | PyTorch ms/step | PyTorch tok/s | speed-up |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name in args.types:
            kernel, pytorch = (next(r for r in results if r["type"] == name and r["path"] == p)
                               for p in ("kernel", "pytorch"))
            print(f"| {name} | {kernel['ms']:.2f} | {kernel['tokens_per_s']:.1f} | {pytorch['ms']:.2f} | "
                  f"{pytorch['tokens_per_s']:.1f} | {pytorch['ms'] / kernel['ms']:.2f}x |")


if __name__ == "__main__":
    main()
