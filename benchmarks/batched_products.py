"""The bf16 path's batched products, per row count and weight type: int8 (``qgemv_int8``,
VNNI on the weights' own integers) against bf16 strips (``qmatmul``: AMX tiles, or
AVX512-BF16 where the CPU has no AMX).

For each model it takes one decode layer's product groups as the fused step makes
them (q+k+v, o, gate+up, down) and the output head, and times both kernels at each
row count; the last column is the int8 kernel's speed-up. ``INT8_BATCH_MAX_ROWS``
in cholla/layers/linear.py is picked from this table (docs/benchmarks.md).

    OMP_NUM_THREADS=1 python benchmarks/batched_products.py --models smollm2 gemma3 --rows 1 6 7 8 16 32 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cholla.formats.gguf import read_gguf
from cholla.kernels import amx_tiles, cpu_kernels
from cholla.download import resolve_model


def groups(path) -> dict[str, list]:
    """name -> the GGUF tensors one product call reads (layer 0's, and the head)."""
    tensors = read_gguf(path).tensors
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    found = {
        "qkv": [tensors[f"blk.0.attn_{n}.weight"] for n in "qkv"],
        "o": [tensors["blk.0.attn_output.weight"]],
        "gate+up": [tensors["blk.0.ffn_gate.weight"], tensors["blk.0.ffn_up.weight"]],
        "down": [tensors["blk.0.ffn_down.weight"]],
        "head": [head],
    }
    for layer in range(1, 64):  # a down projection of another type (Gemma 3 mixes Q4_K and Q6_K)
        down = tensors.get(f"blk.{layer}.ffn_down.weight")
        if down is not None and down.qtype != found["down"][0].qtype:
            found[f"down (layer {layer})"] = [down]
            break
    return found


def best_ms(fn, min_seconds: float) -> float:
    fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 6, 7, 8, 12, 16, 24, 32, 48, 64])
    parser.add_argument("--seconds", type=float, default=0.3, help="time per measurement (best of its runs)")
    args = parser.parse_args()
    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("the C++ kernels do not run on this machine")
    print(f"threads {torch.get_num_threads()}, batched products on {'AMX tiles' if amx_tiles() else 'AVX512-BF16'}")
    print("| model | product | types | rows | int8 ms | bf16 strips ms | int8 speed-up |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in args.models:
        for product, tensors in groups(resolve_model(name)).items():
            weights, types = [t.data for t in tensors], [int(t.qtype) for t in tensors]
            type_names = "+".join(sorted({t.qtype.name for t in tensors}))
            if not kernels.int8_kernel_types(types):
                print(f"| {name} | {product} | {type_names} | - | no int8 kernel | | |")
                continue
            for rows in args.rows:
                x = torch.randn(rows, tensors[0].shape[1])
                out = torch.zeros(rows, sum(t.shape[0] for t in tensors))  # kept, as the engine keeps its logits
                int8 = best_ms(lambda: kernels.qgemv_int8_out(x, weights, types, out), args.seconds)
                bf16 = best_ms(lambda: kernels.qmatmul_out(x, weights, types, out), args.seconds)
                print(f"| {name} | {product} | {type_names} | {rows} | {int8:.3f} | {bf16:.3f} | {bf16 / int8:.2f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
