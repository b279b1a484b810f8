"""What each KV cache type costs in quality, and what it buys in capacity.

    OMP_NUM_THREADS=1 python benchmarks/kv_quality.py --models smollm2 gemma3 --tokens 1024

Scores a fixed real text that ships with the system (``/usr/share/common-licenses/Apache-2.0``)
with every KV type side by side: the text goes through the model in chunks (the first chunk
one token), each attending to the keys and values the cache holds, so every score after the
first token reads the quantized cache. Prints, per model and type: bytes per token, tokens per
GiB, perplexity and its change against bf16, and the largest and mean absolute logit
difference from the bf16 cache over all positions.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from cholla.download import resolve_model
from cholla.engine.engine import calibrate_kv_cache, load_tokenizer
from cholla.kv.kv_types import kv_cache_type
from cholla.kv.paged_cache import PagedKVCache, bytes_per_token
from cholla.layers.attention import AttentionMetadata
from cholla.models.loader import load_model

TEXT = Path("/usr/share/common-licenses/Apache-2.0")
TYPES = ["f32", "bf16", "f16", "fp8_e4m3_plain", "fp8_e4m3", "fp8_e5m2", "int8", "q8_0", "q4_0", "q4_0_rot", "q4_0_cal",
         "q4_0_cal/q4_0_rot", "q4_kivi", "fp8_e4m3_scaled"]
BASELINE = "bf16"


def chunked_logits(model, caches: dict[str, PagedKVCache], token_ids: list[int], chunk: int):
    """Yield (start, {type: logits [n, vocab]}) chunk by chunk, one cache per type."""
    block_size = next(iter(caches.values())).block_size
    tables = torch.arange(-(-len(token_ids) // block_size))[None]
    bounds = [0, 1, *range(1 + chunk, len(token_ids), chunk), len(token_ids)]
    for start, stop in zip(bounds, bounds[1:]):
        meta = AttentionMetadata(slot_mapping=torch.arange(start, stop), query_start_loc=[0, stop - start],
                                 context_lens=[stop], block_tables=tables, num_prefills=1)
        ids, positions = torch.tensor(token_ids[start:stop]), torch.arange(start, stop)
        out = {}
        for name, cache in caches.items():
            hidden = model(ids, positions, cache.layers, meta)
            out[name] = model.compute_logits(hidden).float()
        yield start, out


def _sides(name: str) -> tuple:
    """``TYPE`` for both sides, or ``K_TYPE/V_TYPE`` for keys and values apart."""
    k_name, _, v_name = name.partition("/")
    return kv_cache_type(k_name), kv_cache_type(v_name or k_name)


@torch.inference_mode()
def score(model_name: str, tokens: int, chunk: int, types: list[str]) -> list[dict]:
    loaded = load_model(resolve_model(model_name), "float32")
    tokenizer = load_tokenizer(loaded)
    ids = tokenizer.encode(TEXT.read_text())
    if loaded.config.bos_token_id is not None and (not ids or ids[0] != loaded.config.bos_token_id):
        ids = [loaded.config.bos_token_id] + ids
    ids = ids[:tokens]
    blocks = -(-len(ids) // 16)
    caches = {name: PagedKVCache(loaded.config, blocks, 16, _sides(name)[0], v_dtype=_sides(name)[1]) for name in types}
    for cache in caches.values():  # the calibrated types measure their statistics, as the engine does
        calibrate_kv_cache(loaded.model, tokenizer, cache)
    nll = {name: 0.0 for name in types}
    max_diff = {name: 0.0 for name in types}
    sum_diff = {name: 0.0 for name in types}
    for start, logits in chunked_logits(loaded.model, caches, ids, chunk):
        targets = torch.tensor(ids[start + 1: start + 1 + logits[types[0]].shape[0]])
        for name in types:
            rows = logits[name][: len(targets)]
            nll[name] -= torch.log_softmax(rows, dim=-1).gather(1, targets[:, None]).sum().item()
            diff = (logits[name] - logits[BASELINE]).abs()
            max_diff[name] = max(max_diff[name], diff.max().item())
            sum_diff[name] += diff.mean(dim=-1).sum().item()
    scored = len(ids) - 1
    results = []
    for name in types:
        per_token = bytes_per_token(loaded.config, *_sides(name))
        results.append({"model": model_name, "type": name, "bytes_per_token": per_token,
                        "tokens_per_gib": 2**30 / per_token, "perplexity": math.exp(nll[name] / scored),
                        "max_logit_diff": max_diff[name], "mean_logit_diff": sum_diff[name] / len(ids),
                        "tokens": len(ids)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of the text to score (default 1024)")
    parser.add_argument("--chunk", type=int, default=64, help="tokens per forward after the first (default 64)")
    parser.add_argument("--types", nargs="+", default=TYPES, help="KV types; K_TYPE/V_TYPE for a pair (q4_0_cal/q4_0_rot)")
    args = parser.parse_args()
    types = list(dict.fromkeys([BASELINE, *args.types]))
    for model_name in args.models:
        start = time.perf_counter()
        results = score(model_name, args.tokens, args.chunk, types)
        base = next(r for r in results if r["type"] == BASELINE)
        print(f"\n{model_name}: {results[0]['tokens']} tokens of {TEXT}, {time.perf_counter() - start:.0f} s")
        print("| KV type | bytes/token | tokens/GiB | x bf16 | perplexity | vs bf16 | max abs logit diff | mean |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in results:
            print(f"| {r['type']} | {r['bytes_per_token']} | {r['tokens_per_gib']:.0f} | "
                  f"{r['tokens_per_gib'] / base['tokens_per_gib']:.2f} | {r['perplexity']:.4f} | "
                  f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.3f}% | {r['max_logit_diff']:.4f} | "
                  f"{r['mean_logit_diff']:.4f} |")


if __name__ == "__main__":
    main()
