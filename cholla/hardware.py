"""What a machine can do, for ``cholla plan``'s roofline: presets and a measurement of this one.

A roofline needs two roofs: memory bandwidth (bytes/s, what a decode step's
weight and KV reads are bound by) and matmul FLOP/s (what a prefill is bound
by). GPU presets carry their makers' published figures (dense, no 2:4
sparsity). A CPU preset is measured (``measure()``, ``benchmarks/hardware.py``)
and adds a third roof: where cholla's C++ kernels do not run (no AVX512-BF16),
its reference path dequantizes every weight to fp32 at every step
(``cholla/layers/linear.py``), and that, not memory, bounds decoding. Its rate
per GGUF type (weights dequantized and multiplied per second) is measured with
the real dequantizer and ``F.linear``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from cholla.errors import InvalidRequestError


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float  # bytes/s a long streaming read sustains
    flops: float  # dense bf16 matmul FLOP/s
    memory_bytes: int | None  # device memory, for the default budget
    source: str
    # CPUs where cholla's C++ kernels do not run: the engine multiplies in fp32 (fp32_flops) after
    # dequantizing every weight at every step, at dequant_rates weights/s by GGUF type name.
    reference_path: bool = False
    fp32_flops: float | None = None
    dequant_rates: dict[str, float] = field(default_factory=dict)
    threads: int | None = None  # threads the figures were measured with (CPUs)


GB, TFLOP = 1e9, 1e12

# Published figures. NVIDIA's datasheets give dense bf16 tensor-core FLOP/s (their
# headline numbers with sparsity are twice these); Apple gives bandwidth and GPU fp32 FLOP/s.
PRESETS: dict[str, Hardware] = {
    "h100-sxm": Hardware("H100 SXM", 3350 * GB, 989 * TFLOP, 80 * 10**9, "NVIDIA H100 datasheet: 3.35 TB/s HBM3, 989 TFLOP/s bf16 dense"),
    "h200": Hardware("H200 SXM", 4800 * GB, 989 * TFLOP, 141 * 10**9, "NVIDIA H200 datasheet: 4.8 TB/s HBM3e, 1,979 TFLOP/s bf16 with sparsity"),
    "a100-80gb": Hardware("A100 80GB SXM", 2039 * GB, 312 * TFLOP, 80 * 10**9, "NVIDIA A100 datasheet: 2,039 GB/s HBM2e, 312 TFLOP/s bf16 dense"),
    "l4": Hardware("L4", 300 * GB, 121 * TFLOP, 24 * 10**9, "NVIDIA L4 datasheet: 300 GB/s GDDR6, 242 TFLOP/s bf16 with sparsity"),
    "rtx-4090": Hardware("GeForce RTX 4090", 1008 * GB, 165.2 * TFLOP, 24 * 10**9,
                         "NVIDIA Ada whitepaper: 1,008 GB/s GDDR6X, 165.2 TFLOP/s bf16 with fp32 accumulate, dense"),
    "m2-ultra": Hardware("Apple M2 Ultra", 800 * GB, 27.2 * TFLOP, 192 * 10**9,
                         "Apple: 800 GB/s unified memory, 27.2 TFLOP/s GPU (fp32)"),
    "m4-max": Hardware("Apple M4 Max (40-core GPU)", 546 * GB, 18.4 * TFLOP, 128 * 10**9,
                       "Apple: 546 GB/s; FLOP/s not published by Apple: 40 cores x 128 ALUs x 2 x ~1.8 GHz"),
    # The machine of docs/benchmarks.md's KV-cache section: a 2-core AMD EPYC (Zen 5, AVX512-BF16,
    # no AMX) VM, one thread, one run of benchmarks/hardware.py while other work shared the machine
    # (load average 8: its figures drift with the load; --hardware local measures it as it is now).
    "epyc-zen5-1t": Hardware(
        "AMD EPYC Zen 5 VM, 1 thread (measured under load)", 11.2 * GB, 0.172 * TFLOP, None,
        "benchmarks/hardware.py, docs/benchmarks.md", reference_path=True, fp32_flops=0.025 * TFLOP,
        dequant_rates={"Q4_1": 0.502e9, "Q8_0": 0.475e9, "Q5_0": 0.382e9, "Q4_K": 0.490e9, "Q6_K": 0.526e9},
        threads=1,
    ),
}


def hardware_preset(name: str) -> Hardware:
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidRequestError(
            f"unknown hardware {name!r}; presets: {', '.join(PRESETS)}, or 'local' to measure this machine, "
            "or give --bandwidth and --flops"
        ) from None


def _seconds(run, repeats: int) -> list[float]:
    run()  # warm-up: page faults, oneDNN's kernel choice
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def _best_seconds(run, repeats: int) -> float:
    """A roof: the fastest run."""
    return min(_seconds(run, repeats))


def measure_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (a sum) over a buffer far larger than the caches."""
    x = torch.ones(megabytes * 2**20 // 4)
    return x.numel() * 4 / _best_seconds(lambda: x.sum(), repeats)


def measure_flops(dtype: torch.dtype = torch.bfloat16, n: int = 1024, repeats: int = 5) -> float:
    """Dense matmul FLOP/s in ``dtype`` (oneDNN: AMX where present, else AVX-512 BF16 or FMA)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), repeats)


def measure_dequant_rate(weights: list, repeats: int = 5) -> float:
    """Weights/s the reference path multiplies one row by (dequantize to fp32, then ``F.linear``),
    over a pass through all of ``weights`` (a model's tensors of one type: cold from memory, as a
    decode step meets them, not one tensor hot in cache). The median pass, not the fastest: this
    is the engine's sustained pace, which a machine shared with other work slows down too."""
    from cholla.layers.linear import Linear

    layers = []
    for weight in weights:
        layer = Linear(weight.shape[1], weight.shape[0])
        layer.load(weight)
        layers.append((layer, torch.randn(1, weight.shape[1])))

    def one_pass():
        for layer, x in layers:
            layer.dense_forward(x)

    return sum(w.shape[0] * w.shape[1] for w in weights) / statistics.median(_seconds(one_pass, repeats))


def kernels_run_here() -> bool:
    """Whether this CPU has what cholla's C++ kernels need (``cholla/kernels``), without building them."""
    from cholla.kernels import CPU_FLAGS, cpu_flags

    return all(flag in cpu_flags() for flag in CPU_FLAGS)


def measure(weights: dict[str, list] | None = None) -> Hardware:
    """This machine, with torch's current thread count. Where cholla's kernels do not run,
    ``weights`` (a model's 2-D weights by GGUF type name) give the reference path's rates."""
    from cholla.heap import keep_buffers_mapped

    keep_buffers_mapped()  # as the engine does: freed dequantization buffers stay mapped
    reference = not kernels_run_here()
    with torch.inference_mode():
        rates = {name: measure_dequant_rate(w) for name, w in (weights or {}).items()} if reference else {}
        return Hardware("this machine (measured now)", measure_bandwidth(), measure_flops(), None,
                        "cholla.hardware.measure()", reference, measure_flops(torch.float32) if reference else None,
                        rates, threads=torch.get_num_threads())
