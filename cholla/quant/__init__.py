"""Dequantize GGUF tensors into float tensors, one module per family of types.

Weights stay in memory as GGUF blocks (a uint8 view over the file) and are
dequantized just before use, so every function here is vectorised over all
blocks at once and bit-exact against ``gguf.quants.dequantize``: the float32
arithmetic happens in the same order as the reference.
"""

from __future__ import annotations

from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from cholla.errors import UnsupportedQuantError
from cholla.quant import floats, iquants, kquants, legacy, mxfp4

T = GGMLQuantizationType

# Each takes uint8 blocks ``[N, bytes_per_block]`` -> float32 ``[N, elements_per_block]``.
DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    T.F32: floats.dequantize_f32,
    T.F16: floats.dequantize_f16,
    T.BF16: floats.dequantize_bf16,
    T.Q4_0: legacy.dequantize_q4_0,
    T.Q4_1: legacy.dequantize_q4_1,
    T.Q5_0: legacy.dequantize_q5_0,
    T.Q5_1: legacy.dequantize_q5_1,
    T.Q8_0: legacy.dequantize_q8_0,
    T.Q2_K: kquants.dequantize_q2_k,
    T.Q3_K: kquants.dequantize_q3_k,
    T.Q4_K: kquants.dequantize_q4_k,
    T.Q5_K: kquants.dequantize_q5_k,
    T.Q6_K: kquants.dequantize_q6_k,
    T.Q8_K: kquants.dequantize_q8_k,
    T.IQ4_NL: iquants.dequantize_iq4_nl,
    T.IQ4_XS: iquants.dequantize_iq4_xs,
    T.MXFP4: mxfp4.dequantize_mxfp4,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(DEQUANTIZERS)

FLOAT_TYPES: frozenset[GGMLQuantizationType] = frozenset({T.F32, T.F16, T.BF16})


def _unsupported(qtype: GGMLQuantizationType, what: str) -> UnsupportedQuantError:
    name = getattr(qtype, "name", str(qtype))
    supported = ", ".join(t.name for t in sorted(SUPPORTED_TYPES, key=lambda t: t.value))
    return UnsupportedQuantError(
        f"{what} uses quantization type {name}, which cholla cannot dequantize "
        f"(supported: {supported}); use a GGUF file quantized with one of those"
    )


def check_supported(qtype: GGMLQuantizationType, tensor_name: str) -> None:
    """Raise ``UnsupportedQuantError`` unless ``qtype`` can be dequantized."""
    if qtype not in SUPPORTED_TYPES:
        raise _unsupported(qtype, f"tensor {tensor_name!r}")


def elements_per_block(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def bytes_per_block(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][1]


def dequantize(
    data: torch.Tensor, qtype: GGMLQuantizationType, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """GGUF tensor bytes ``[..., nbytes]`` (uint8, whole blocks) -> ``[..., n_elements]`` in ``dtype``.

    ``data`` is only read, never written, so it may be a read-only view of a
    memory map. Float types may also come already typed (the gguf reader gives
    F16 as float16): then this is a cast. Compute is float32, cast at the end;
    when no conversion is needed the result may share memory with ``data``.
    """
    if data.is_floating_point() and qtype in FLOAT_TYPES:
        return data.to(dtype)
    if qtype not in SUPPORTED_TYPES:
        raise _unsupported(qtype, "this tensor")
    if data.dtype != torch.uint8:
        raise TypeError(f"{qtype.name} data must be uint8 bytes, got {data.dtype}")
    block_elements, block_bytes = GGML_QUANT_SIZES[qtype]
    *leading, nbytes = data.shape
    if nbytes % block_bytes:
        raise ValueError(
            f"{qtype.name} data has {nbytes} bytes per row, not a multiple of its {block_bytes}-byte block"
        )
    blocks = data.reshape(-1, block_bytes)
    values = DEQUANTIZERS[qtype](blocks)
    return values.reshape(*leading, nbytes // block_bytes * block_elements).to(dtype)
