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

Where the kernels run, memory is not the whole story either: a decode step's
one-row int8 GEMV (``qgemv_int8``, what the fused decode step runs) reaches a
different share of the streaming bandwidth for each weight type and tensor
shape. So ``measure()`` then times that kernel over the model's own weights,
per GGUF type and with the decode steps' thread count, and the products a
prompt takes (``linear_group``, as the engine calls it) over a sample of them,
and an attention layer's other work (norms, activation, attention over the
context); ``cholla plan`` estimates from those instead of the roofs.
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
    # CPUs where cholla's kernels run, measured with a model's own weights: the decode steps'
    # one-row int8 GEMV in weights/s by GGUF type name, and a prompt's products of prompt_rows
    # rows in weight-rows/s (a weight multiplied by one row of x: one multiply-add).
    # And what a decode step's attention layer costs besides its products, per sequence, with the
    # model's shapes: layer_seconds (two norms, the MLP's activation, attention's fixed part) plus
    # key_seconds per key attended (attention over the context's bf16 KV).
    kernel_path: bool = False
    gemv_rates: dict[str, float] = field(default_factory=dict)
    prompt_rates: dict[str, float] = field(default_factory=dict)
    prompt_rows: int | None = None
    layer_seconds: float = 0.0
    key_seconds: float = 0.0

    @property
    def estimate(self) -> str:
        """Which kind of estimate ``cholla plan`` makes from these figures."""
        if self.kernel_path:
            return "measured: cholla's kernels over the model's weights"
        if self.reference_path:
            return "measured: cholla's reference path (its kernels do not run)"
        return "roofline"


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


def _kernel_groups(weights: list) -> list[tuple[list, list[int], int, int]] | None:
    """A type's weights as the fused decode step multiplies them: one call per layer for the weights
    reading the same x (GGUF names ``blk.N.``; other weights alone): (rows, type ids, in_features,
    weights) in the file's order. None where the kernels cannot read them (the engine dequantizes
    those, as the reference path)."""
    from cholla.layers.linear import kernel_view

    groups: dict[tuple[str, int], tuple[list, list[int], int, int]] = {}
    for i, weight in enumerate(weights):
        view = kernel_view(weight)
        if view is None:
            return None
        name = getattr(weight, "name", None) or ""  # a plain tensor's is None
        layer = name.split(".")[1] if name.startswith("blk.") else f"#{i}"
        cols = weight.shape[1]
        data, types, _, params = groups.get((layer, cols), ([], [], cols, 0))
        groups[layer, cols] = (data + [view[0]], types + [view[1]], cols, params + weight.shape[0] * cols)
    return list(groups.values())


def _sustained_seconds(run, seconds: float, least: int = 3) -> float:
    """Seconds per call of ``run`` over at least ``seconds`` (and ``least`` calls) after a warm-up:
    the mean, as ``cholla bench`` reports a run's pace. A machine shared with other work hands out
    its cores in time slices of milliseconds, longer than one call; over a fraction of a second
    the calls meet the same share of the cores that a decode run does."""
    run()
    calls, start = 0, time.perf_counter()
    while calls < least or time.perf_counter() - start < seconds:
        run()
        calls += 1
    return (time.perf_counter() - start) / calls


def measure_gemv_rate(weights: list, seconds: float = 0.3) -> float:
    """Weights/s the decode steps' one-row int8 GEMV (``qgemv_int8``, as the fused decode step
    calls it: per layer, the weights reading the same x together) multiplies, over passes through
    all of ``weights`` (a model's tensors of one type, cold from memory as a decode step meets them)."""
    from cholla.kernels import cpu_kernels

    kernels = cpu_kernels()
    calls = [(torch.randn(1, cols), data, types) for data, types, cols, _ in _kernel_groups(weights)]

    def one_pass():
        for x, data, types in calls:
            kernels.qgemv_int8(x, data, types)

    return sum(w.shape[0] * w.shape[1] for w in weights) / _sustained_seconds(one_pass, seconds)


def measure_prompt_rate(weights: list, rows: int, seconds: float = 0.2, sample: int = 2) -> float:
    """Weight-rows/s of a ``rows``-row prompt's products (``linear_group`` in bfloat16, which picks
    the kernel the engine's prompt steps take), over the first ``sample`` weights of each width:
    a prompt is bound by compute, so a few weights give the rate (and keep this quick)."""
    from cholla.layers.linear import Linear, linear_group

    by_width: dict[int, list] = {}
    for weight in weights:
        by_width.setdefault(weight.shape[1], []).append(weight)
    picked = [weight for same in by_width.values() for weight in same[:sample]]
    layers = []
    for weight in picked:
        layer = Linear(weight.shape[1], weight.shape[0])
        layer.load(weight)
        layer.compute_dtype = torch.bfloat16
        layers.append((layer, torch.randn(rows, weight.shape[1])))

    def one_pass():
        for layer, x in layers:
            linear_group((layer,), x)

    return rows * sum(w.shape[0] * w.shape[1] for w in picked) / _sustained_seconds(one_pass, seconds)


@dataclass(frozen=True)
class LayerShape:
    """What an attention layer's work besides its products depends on."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


def measure_layer_seconds(shape: LayerShape, contexts: tuple[int, int] = (16, 1024),
                          seconds: float = 0.1) -> tuple[float, float]:
    """(seconds per layer, seconds per key attended) of a decode step's work in an attention layer
    besides its products, for one sequence: two RMS norms, the gated activation and our paged
    attention over a bf16 cache, timed at two contexts and fitted as a line. Each kernel is called
    from Python here, so a call's dispatch (microseconds) counts where the fused decode step has
    the rest of its layer's work (residual adds, RoPE, the KV write) and the engine's own step."""
    from cholla.kernels import cpu_kernels

    kernels = cpu_kernels()
    x, norm = torch.randn(1, shape.hidden), torch.ones(shape.hidden)
    gate, up = torch.randn(1, shape.intermediate), torch.randn(1, shape.intermediate)
    q = torch.randn(1, shape.heads, shape.head_dim)

    def layer_at(context: int):
        blocks = -(-context // 16)
        k_cache = torch.randn(blocks, 16, shape.kv_heads, shape.head_dim).to(torch.bfloat16)
        v_cache = torch.randn(blocks, 16, shape.kv_heads, shape.head_dim).to(torch.bfloat16)
        tables, lens = torch.arange(blocks).reshape(1, -1), torch.tensor([context])

        def layer():
            kernels.rms_norm(x, norm, 1e-6)
            kernels.paged_attention_decode(q, k_cache, v_cache, tables, lens, shape.head_dim**-0.5, 0, 0.0, [], [])
            kernels.rms_norm(x, norm, 1e-6)
            kernels.gated_activation(gate, up, 0)

        return layer

    times = [_sustained_seconds(layer_at(context), seconds) for context in contexts]
    per_key = max(0.0, (times[1] - times[0]) / (contexts[1] - contexts[0]))
    return max(0.0, times[0] - per_key * contexts[0]), per_key


def kernels_run_here() -> bool:
    """Whether this CPU has what cholla's C++ kernels need (``cholla/kernels``), without building them."""
    from cholla.kernels import CPU_FLAGS, cpu_flags

    return all(flag in cpu_flags() for flag in CPU_FLAGS)


def measure(weights: dict[str, list] | None = None, prompt_rows: int = 512, head: object = None,
            layer: LayerShape | None = None) -> Hardware:
    """This machine, with the thread count the engine's decode steps take (``$OMP_NUM_THREADS``,
    else one per physical core). ``weights`` (the 2-D weights a model's decode step multiplies, by
    GGUF type name) give the rates of the path that runs: where cholla's kernels run (and can be
    built), the one-row int8 GEMV's and a ``prompt_rows``-row prompt's (``head``, the output head,
    left out of that: a prompt multiplies it by its last row only), and with ``layer`` (the
    model's attention shape) a decode step's per-layer work besides the products; elsewhere the
    reference path's dequantization."""
    from cholla.heap import keep_buffers_mapped
    from cholla.kernels import cpu_kernels
    from cholla.threads import omp_num_threads, physical_cores

    keep_buffers_mapped()  # as the engine does: freed dequantization buffers stay mapped
    reference = not (kernels_run_here() and cpu_kernels() is not None)  # a failed build falls back too
    kernel = bool(weights) and not reference
    previous = torch.get_num_threads()
    threads = omp_num_threads() or physical_cores()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            readable = {name: w for name, w in (weights or {}).items() if kernel and _kernel_groups(w) is not None}
            dequant = {name: measure_dequant_rate(w) for name, w in (weights or {}).items()
                       if name not in readable}
            gemv = {name: measure_gemv_rate(w) for name, w in readable.items()}
            body = {name: [t for t in w if t is not head] for name, w in readable.items()}
            prompt = {name: measure_prompt_rate(w, prompt_rows) for name, w in body.items() if w}
            per_layer, per_key = measure_layer_seconds(layer) if kernel and layer else (0.0, 0.0)
            return Hardware("this machine (measured now)", measure_bandwidth(), measure_flops(), None,
                            "cholla.hardware.measure()", reference,
                            measure_flops(torch.float32) if reference else None, dequant, threads,
                            kernel, gemv, prompt, prompt_rows if kernel else None, per_layer, per_key)
    finally:
        torch.set_num_threads(previous)
