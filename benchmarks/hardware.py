"""Measure this machine's roofs for ``cholla plan``: streaming bandwidth, bf16 and fp32
matmul FLOP/s, and the reference path's weights/s per GGUF type in the real models.

    OMP_NUM_THREADS=1 python benchmarks/hardware.py --models smollm2 gemma3

Prints a table; the ``epyc-zen5-1t`` preset in ``cholla/hardware.py`` holds its figures.
"""

from __future__ import annotations

import argparse

import torch

from cholla.download import resolve_model
from cholla.formats.gguf import read_gguf
from cholla.heap import keep_buffers_mapped
from cholla.hardware import GB, TFLOP, measure_bandwidth, measure_dequant_rate, measure_flops


def weights_by_type(name: str) -> dict[str, list]:
    """A model's 2-D weights by GGUF type name (what a decode step's matmuls read)."""
    found: dict[str, list] = {}
    for tensor in read_gguf(resolve_model(name)).tensors.values():
        if len(tensor.shape) == 2:
            found.setdefault(tensor.qtype.name, []).append(tensor)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("-r", "--repetitions", type=int, default=5)
    args = parser.parse_args()
    with torch.inference_mode():
        print(f"threads: {torch.get_num_threads()}")
        print("| roof | value |\n| --- | ---: |")
        print(f"| streaming read (sum over 512 MiB) | {measure_bandwidth(repeats=args.repetitions) / GB:.1f} GB/s |")
        print(f"| bf16 matmul 1024^3 | {measure_flops(torch.bfloat16, repeats=args.repetitions) / TFLOP:.3f} TFLOP/s |")
        print(f"| fp32 matmul 1024^3 | {measure_flops(torch.float32, repeats=args.repetitions) / TFLOP:.3f} TFLOP/s |")
        keep_buffers_mapped()  # as the engine does
        for model in args.models:
            for kind, weights in weights_by_type(model).items():
                rate = measure_dequant_rate(weights, repeats=args.repetitions)
                count = sum(w.shape[0] * w.shape[1] for w in weights)
                print(f"| reference path, {model}'s {kind} ({count / 1e6:.1f}M weights) | {rate / 1e9:.3f} G weights/s |")


if __name__ == "__main__":
    main()
