"""Linear layers and embeddings over weights that stay quantized in memory.

A weight is either a plain tensor (SafeTensors, F32 GGUF tensors) or a
``GGUFTensor`` whose blocks are a view over the memory-mapped file. No layer
ever holds a dequantized copy of its weight. Where our kernels
(``cholla.kernels``) run, a matmul reads the blocks directly:

- in float32, steps of up to ``GEMV_MAX_ROWS`` rows use ``qgemv``: the weight
  is dequantized in registers and multiplied by fp32 FMAs, exactly;
- with ``compute_dtype`` bfloat16, steps of up to ``INT8_MAX_ROWS`` rows (a
  few sequences decoding) use ``qgemv_int8``: x is rounded to int8 per block
  of 32 and meets the weights' integers in VNNI dot products, as in llama.cpp
  (``INT8_TYPES``: Q4_0 to Q8_0 and Q4_K to Q6_K; other types take the exact path);
  larger steps whose weights are all of ``int8_batch_types``, that is
  ``INT8_TYPES`` in decode steps (``decode``, or within ``decode_step()``,
  which the engine enters for each step without prompt rows) and
  ``INT8_PROMPT_TYPES`` (Q4_0, Q8_0) in steps with a prompt's rows, take the
  same kernel's batched product (x's rows in the VNNI lanes, the weights read
  once as their own integers; ``qgemv_int8`` up to ``INT8_BATCH_MAX_ROWS``
  rows, ``qmatmul_int8`` beyond: the same sums), except on CPUs with AMX
  tiles, where it was never measured against them;
  other steps of up to ``AMX_MAX_ROWS`` rows use
  ``qmatmul`` (AMX tiles: weights and activations rounded to bf16, fp32
  sums; AVX512-BF16 without AMX), and larger steps (prefill) dequantize the
  weight to bf16 for one dense oneDNN matmul, which is faster per row there than ours.

So in bfloat16 a sequence's logits move slightly with the number of sequences
sharing its step (as in vLLM and llama.cpp); float32 stays batch-invariant up
to fp32 summation order. Within the batched int8 product each row's result
depends on that row alone (a prompt's rows as much as a decode step's).

Elsewhere, and for the float32 path's larger steps, the weight is dequantized
to the activations' dtype a slab of rows at a time (the reference path).
Projections that read the same input (q, k, v; gate, up) go through
``linear_group`` as one kernel call. Inputs and outputs are fp32 throughout.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from cholla.formats.gguf import GGUFTensor
from cholla.heap import fresh_empty, mapped_zeros
from cholla.kernels import amx_tiles, cpu_kernels
from cholla.quant import dequantize

Weight = torch.Tensor | GGUFTensor

# Dequantize at most this many weights at once (8M fp32 = 32 MiB of scratch).
DEQUANT_CHUNK_ELEMENTS = 8 * 1024 * 1024

# Row counts where each kernel stops paying off (SmolLM2 and Gemma 3 shapes, 2
# threads; docs/benchmarks.md): the GEMVs' cost grows with rows (the fp32 one
# loses to our AMX tiles from two rows, the int8 one from seven), the tiles'
# barely until they lose to oneDNN's dense bf16 matmul.
GEMV_MAX_ROWS = 8
INT8_MAX_ROWS = 6
AMX_MAX_ROWS = 64
# The batched int8 product beat qmatmul's AVX512-BF16 strips 1.4-2.3x at 7-64 rows
# on Zen 5 (benchmarks/batched_products.py, docs/benchmarks.md), for every type
# it reads; AMX tiles are faster than AVX512-BF16 and were not measured against it.
INT8_BATCH_MAX_ROWS = 64
INT8_TYPES = frozenset(
    GGMLQuantizationType[name] for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
)
# Prompt-sized products (128-512 rows) of these types take the same batched int8 product
# (``qmatmul_int8``: no row limit), as llama.cpp multiplies prompts: on Zen 5 it beat the bf16
# weights' oneDNN matmul 1.2-1.6x for Q4_0 and Q8_0 (benchmarks/batched_products.py,
# docs/benchmarks.md). Other types gained less (Q4_1, Q5_0 1.05-1.3x, Q4_K 0.99-1.2x, Q6_K 0.74x),
# too little for int8 activations' 3-5x larger distance of prompt logits from fp32 (SmolLM2
# 0.2 -> 1.07): their prompts keep bf16 activations.
INT8_PROMPT_TYPES = frozenset(GGMLQuantizationType[name] for name in ("Q4_0", "Q8_0"))

# Embedding rows our kernel looks up (its values bit-exact with gguf's dequantizer).
EMBEDDING_KERNEL_TYPES = frozenset(GGMLQuantizationType[name] for name in ("Q4_0", "Q8_0"))

# GGUF types (and plain tensor dtypes) the kernels read directly.
KERNEL_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
)
TENSOR_TYPES = {
    torch.float32: GGMLQuantizationType.F32,
    torch.float16: GGMLQuantizationType.F16,
    torch.bfloat16: GGMLQuantizationType.BF16,
}


def weight_shape(weight: Weight) -> tuple[int, ...]:
    return tuple(weight.shape)


def dequantize_rows(weight: Weight, rows: torch.Tensor | slice, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``rows`` of a 2-D weight as a dense ``[n, cols]`` tensor in ``dtype``."""
    if isinstance(weight, torch.Tensor):
        return weight[rows].to(dtype)
    blocks = weight.data[rows]
    return dequantize(blocks, weight.qtype, dtype).reshape(blocks.shape[0], weight.shape[-1])


def dense(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight dequantized; for small tensors (norms, biases) only."""
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype)
    return dequantize(weight.data, weight.qtype, dtype).reshape(weight.shape)


# Whether the products running now are a decode-only step's (see decode_step).
_decode_step = False


@contextlib.contextmanager
def decode_step(active: bool = True):
    """Within it, every product is a decode step's (``decode`` in ``linear_group``):
    the engine runs a step without prompt rows in it, so that models and steps the
    fused decode step does not serve take the same products as it does."""
    global _decode_step
    previous, _decode_step = _decode_step, active
    try:
        yield
    finally:
        _decode_step = previous


@functools.cache
def int8_batch_max_rows() -> int:
    """Rows up to which all-``INT8_TYPES`` products take the batched int8 kernel: 0 with AMX tiles."""
    return 0 if amx_tiles() else INT8_BATCH_MAX_ROWS


def int8_batch_types(decode: bool) -> frozenset:
    """The types whose products of more than ``INT8_MAX_ROWS`` rows take the batched int8 kernel
    in bfloat16 (a product's weights must all be of them): a decode step's (``decode``) or a
    prompt's; none with AMX tiles, where it was never measured against them."""
    if int8_batch_max_rows() == 0:
        return frozenset()
    return INT8_TYPES if decode else INT8_PROMPT_TYPES


def kernel_products(linear: Linear, rows: int, decode: bool = False) -> tuple[bool, int, int, int] | None:
    """How a fused C++ layer multiplies ``rows`` rows so that it takes the product ``linear_group``
    would (``integer``, ``gemv_max_rows``, ``int8_batch_max_rows``, ``int8_batch_types`` as a bit
    mask of GGML type ids, as ``decode_layers.cpp`` and ``hybrid_decode.cpp`` take them), or None
    where that product is not one of our kernels' (float32 steps over ``GEMV_MAX_ROWS`` rows, steps
    over ``AMX_MAX_ROWS``). ``linear``: one of the layer's products, whose ``compute_dtype`` they all
    share; ``decode``: as in ``linear_group``."""
    integer = linear.compute_dtype == torch.bfloat16
    if rows > (AMX_MAX_ROWS if integer else GEMV_MAX_ROWS):
        return None
    types = int8_batch_types(decode or _decode_step) if integer else frozenset()
    batched = int8_batch_max_rows() if types else 0
    return integer, INT8_MAX_ROWS if integer else GEMV_MAX_ROWS, batched, type_mask(types)


def type_mask(types: frozenset) -> int:
    """GGML type ids as the bits of one int (the kernels' argument)."""
    return sum(1 << int(t) for t in types)


def kernel_view(weight: Weight) -> tuple[torch.Tensor, int] | None:
    """The weight as (uint8 rows, GGML type id) for the kernels, or None where they cannot read it."""
    if cpu_kernels() is None or len(weight.shape) != 2 or weight.shape[1] % 32:
        return None
    if isinstance(weight, GGUFTensor):
        if weight.qtype not in KERNEL_TYPES:
            return None
        return weight.data, int(weight.qtype)
    if weight.dtype not in TENSOR_TYPES:
        return None
    return weight.contiguous().view(torch.uint8), int(TENSOR_TYPES[weight.dtype])


class Linear(nn.Module):
    """``y = x W^T + b`` with ``W: [out, in]`` kept as loaded (quantized or not)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: Weight | None = None
        self.bias: torch.Tensor | None = None
        self.has_bias = bias
        self.compute_dtype = torch.float32
        self.kernel_weight: tuple[torch.Tensor, int] | None = None
        self.reused_output: torch.Tensor | None = None  # kept for forward(..., reuse_output=True)

    def load(self, weight: Weight, bias: torch.Tensor | None = None) -> None:
        if weight_shape(weight) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {weight_shape(weight)} != {(self.out_features, self.in_features)}")
        self.weight = weight
        self.kernel_weight = kernel_view(weight)
        if bias is not None:
            self.bias = bias.float()

    def forward(self, x: torch.Tensor, reuse_output: bool = False) -> torch.Tensor:
        """x: [..., in] -> [..., out], fp32.

        ``reuse_output``: x is a decode step's rows (the engine's logits of a
        step without prompt rows: ``decode`` in ``linear_group``), and where a
        batched kernel runs (int8 or AMX), the product goes into a buffer this
        layer keeps, which its next such call overwrites (used up within each
        step). Fresh memory that large costs page faults and zeroing each time:
        ~5 ms a step for Gemma 3's 32 x 262k logits.
        """
        out = None
        if reuse_output and x.dim() == 2 and x.shape[0] <= AMX_MAX_ROWS:
            out = self.kept_output(x.shape[0])
        return linear_group((self,), x, out=out, decode=reuse_output)[0]

    def kept_output(self, rows: int) -> torch.Tensor:
        """fp32 ``[rows, out]`` (rows <= AMX_MAX_ROWS) of the buffer this layer keeps for a decode
        step's product (``forward``'s ``reuse_output``; the fused step's logits)."""
        if self.reused_output is None:  # rows are resident only once written
            self.reused_output = mapped_zeros((AMX_MAX_ROWS, self.out_features), torch.float32)
        return self.reused_output[:rows]

    def greedy_tokens(self, x: torch.Tensor, decode: bool = False) -> torch.Tensor | None:
        """Each row's argmax of ``forward(x)`` (int64 [rows]; the first on ties, as the sampler's
        ``argmax``) without writing the product, or None where no fused kernel serves: the batched
        int8 product's rows and types only, where ``forward`` takes it, so that the tokens are those
        of the logits it would give (its sums, bit for bit). ``decode``: as in ``linear_group``."""
        rows = x.shape[0]
        if (self.kernel_weight is None or self.bias is not None or self.compute_dtype != torch.bfloat16
                or x.dim() != 2 or not INT8_MAX_ROWS < rows <= INT8_BATCH_MAX_ROWS
                or self.kernel_weight[1] not in int8_batch_types(decode or _decode_step)):
            return None
        return cpu_kernels().qgemv_int8_argmax(x.float(), [self.kernel_weight[0]], [self.kernel_weight[1]])

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path: the weight dequantized to x's dtype a slab at a time; no bias."""
        w = self.weight
        if isinstance(w, torch.Tensor):
            return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))
        rows_per_chunk = max(1, DEQUANT_CHUNK_ELEMENTS // self.in_features)
        if rows_per_chunk >= self.out_features:
            return F.linear(x, dequantize_rows(w, slice(None), x.dtype))
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, rows_per_chunk):
            stop = min(start + rows_per_chunk, self.out_features)
            out[..., start:stop] = F.linear(x, dequantize_rows(w, slice(start, stop), x.dtype))
        return out


def _kernel_matmul(x: torch.Tensor, layers: Sequence[Linear], keep_bf16: bool,
                   out: torch.Tensor | None = None, decode: bool = False) -> torch.Tensor | None:
    """x: [rows, in] times every layer's weight, side by side; None where no kernel serves.
    fp32 out, or with ``keep_bf16`` a prompt's product in bf16 (the dense path's as it came,
    the int8 one's rounded once). The batched kernels (int8 or AMX) write into ``out`` where
    one is given."""
    weights, types = [], []
    for layer in layers:  # a plain loop: this runs ~120 times per decoded token
        if layer.kernel_weight is None:
            return None
        weights.append(layer.kernel_weight[0])
        types.append(layer.kernel_weight[1])
    kernels, rows = cpu_kernels(), x.shape[0]
    if layers[0].compute_dtype != torch.bfloat16:
        return kernels.qgemv(x.float(), weights, types) if rows <= GEMV_MAX_ROWS else None
    if rows <= INT8_MAX_ROWS:
        return kernels.qgemv_int8(x.float(), weights, types)
    batch_types = int8_batch_types(decode or _decode_step)
    if all(t in batch_types for t in types):  # a group of mixed types takes the bf16 product (as Products)
        width = sum(layer.out_features for layer in layers)
        if rows <= INT8_BATCH_MAX_ROWS:  # the decode steps' entry (the one Products runs)
            if out is None:
                out = fresh_empty((rows, width), torch.float32)
            kernels.qgemv_int8_out(x.float(), weights, types, out)
            return out
        # A prompt's: the same product, any number of rows, reading bf16 rows as they are, and
        # rounding its sums to bf16 once for a bf16 consumer (no fp32 copy of a 2048-row step's gate+up).
        if out is None:
            out = fresh_empty((rows, width), torch.bfloat16 if keep_bf16 else torch.float32)
        kernels.qmatmul_int8_out(x if x.dtype == torch.bfloat16 else x.float(), weights, types, out)
        return out
    if rows <= AMX_MAX_ROWS:
        if out is None:
            return kernels.qmatmul(x.float(), weights, types)
        kernels.qmatmul_out(x.float(), weights, types, out)
        return out
    out = F.linear(x.to(torch.bfloat16), kernels.dequantize_bf16(weights, types, x.shape[1]))
    return out if keep_bf16 else out.float()


def linear_group(layers: Sequence[Linear], x: torch.Tensor, keep_bf16: bool = False,
                 out: torch.Tensor | None = None, decode: bool = False) -> list[torch.Tensor]:
    """Every layer applied to the same x ([..., in] -> [..., out_i]), in one kernel call where possible.

    Outputs are fp32; with ``keep_bf16`` a prompt's product (a prefill's dense
    matmul, or its int8 product) comes in bf16, for a consumer that reads it as is (the MLP's
    activation: no fp32 copy of a 2048-token chunk's gate and up). ``out``
    (fp32 [rows, sum out_i]): where a batched kernel runs, the product is written there.
    ``decode``: x's rows are a decode step's (one per sequence), which the
    batched int8 product serves for every ``INT8_TYPES`` weight (a prompt's
    rows: ``INT8_PROMPT_TYPES``; see ``int8_batch_types``).
    """
    rows = x if x.dim() == 2 else x.reshape(-1, layers[0].in_features)
    fused = _kernel_matmul(rows, layers, keep_bf16, out, decode)
    if fused is not None:
        outs = fused.split([layer.out_features for layer in layers], dim=1) if len(layers) > 1 else [fused]
    else:
        outs = [layer.dense_forward(rows.to(layer.compute_dtype)) for layer in layers]
        outs = [out if keep_bf16 and out.dtype == torch.bfloat16 else out.float() for out in outs]
    outs = [out if layer.bias is None else out + layer.bias for layer, out in zip(layers, outs)]
    return outs if x.dim() == 2 else [out.reshape(*x.shape[:-1], out.shape[-1]) for out in outs]


class Embedding(nn.Module):
    """Token embedding that dequantizes only the rows it looks up."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.weight: Weight | None = None

    def load(self, weight: Weight) -> None:
        if weight_shape(weight) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"embedding shape {weight_shape(weight)} != {(self.vocab_size, self.hidden_size)}")
        self.weight = weight

    def forward(self, token_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """token_ids: int64 [n] -> [n, hidden]. Q4_0 and Q8_0 rows in one kernel call where it
        runs (the same values as gguf's dequantizer; a decode step's lookup was a dozen small ops)."""
        rows = self.kernel_rows()
        if (rows is not None and dtype == torch.float32 and token_ids.device.type == "cpu"
                and token_ids.dim() == 1):
            return cpu_kernels().embedding_rows(*rows, token_ids.long(), self.hidden_size)
        return dequantize_rows(self.weight, token_ids, dtype)

    def kernel_rows(self) -> tuple[torch.Tensor, int] | None:
        """The table as ``embedding.cpp`` reads it (uint8 rows, GGML type id), or None where it does not."""
        weight = self.weight
        if (cpu_kernels() is None or not isinstance(weight, GGUFTensor) or weight.qtype not in EMBEDDING_KERNEL_TYPES
                or self.hidden_size % 32):
            return None
        return weight.data, int(weight.qtype)

    def as_linear(self) -> Linear:
        """The same weight used as an output head (tied embeddings)."""
        head = Linear(self.hidden_size, self.vocab_size)
        head.load(self.weight)
        return head


class DenseTensor(nn.Module):
    """A small fp32 tensor a layer uses as is (attention sinks, a router's correction
    bias); checkpoints name it after the module itself, without ``.weight``."""

    def __init__(self, *shape: int):
        super().__init__()
        self.shape = shape
        self.value = torch.zeros(shape)

    def load(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"shape {tuple(weight.shape)} != {self.shape}")
        self.value = weight.float()
