"""cholla.quant against gguf's own numpy dequantizers, bit for bit.

Blocks are random bytes, so every bit pattern of every field is exercised;
only the fp16/fp32 scale fields are overwritten with finite values so that
NaN/inf scales don't make the comparison vacuous.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from cholla.errors import UnsupportedQuantError
from cholla.quant import SUPPORTED_TYPES, bytes_per_block, check_supported, dequantize, elements_per_block

T = GGMLQuantizationType

SMOLLM2_Q4_1 = Path("/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf")

# Byte offsets of the fp16 scale fields in each block layout.
FP16_FIELDS = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.IQ4_NL: (0,),
    T.IQ4_XS: (0,),
}
FLOAT_NUMPY = {T.F32: np.float32, T.F16: np.float16}
SAME_SIZE_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

ALL_TYPES = sorted(SUPPORTED_TYPES, key=lambda t: t.value)
N_BLOCKS = 300


def random_blocks(qtype: GGMLQuantizationType, n_blocks: int, seed: int = 0) -> np.ndarray:
    """uint8 ``[n_blocks, bytes_per_block]``: random quants, finite random scales."""
    rng = np.random.default_rng(seed + qtype.value)
    size = bytes_per_block(qtype)
    if qtype in (T.F32, T.F16):
        return rng.standard_normal((n_blocks, 1)).astype(FLOAT_NUMPY[qtype]).view(np.uint8)
    if qtype == T.BF16:
        values = rng.standard_normal((n_blocks, 1)).astype(np.float32)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for offset in FP16_FIELDS.get(qtype, ()):
        blocks[:, offset : offset + 2] = rng.standard_normal((n_blocks, 1)).astype(np.float16).view(np.uint8)
    if qtype == T.Q8_K:
        blocks[:, 0:4] = rng.standard_normal((n_blocks, 1)).astype(np.float32).view(np.uint8)
    return blocks


def reference(blocks: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    if qtype == T.Q8_K:
        # gguf has no Q8_K dequantizer: float32 d, int8 qs[256], int16 bsums[16]; y = d * q.
        d = blocks[..., 0:4].copy().view(np.float32)
        qs = blocks[..., 4:260].view(np.int8).astype(np.float32)
        return torch.from_numpy(d * qs)
    with np.errstate(all="ignore"):  # large MXFP4 scales overflow to inf, as they should
        values = gguf_dequantize(blocks, qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    bits = SAME_SIZE_INT[actual.dtype]  # compare bit patterns: tells -0.0 from 0.0
    assert torch.equal(actual.contiguous().view(bits)[~nan], expected.contiguous().view(bits)[~nan])


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matches_gguf(qtype):
    blocks = random_blocks(qtype, N_BLOCKS)
    expected = reference(blocks, qtype).reshape(N_BLOCKS, elements_per_block(qtype))
    original = torch.from_numpy(blocks.copy())
    data = torch.from_numpy(blocks)
    assert_bit_exact(dequantize(data, qtype), expected)
    assert torch.equal(data, original), "dequantize wrote into its input"


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_keeps_leading_shape_and_casts(qtype):
    rows, blocks_per_row = 6, 8
    blocks = random_blocks(qtype, rows * blocks_per_row, seed=1)
    data = blocks.reshape(rows, blocks_per_row * bytes_per_block(qtype))
    expected = reference(blocks, qtype).reshape(rows, blocks_per_row * elements_per_block(qtype))

    assert_bit_exact(dequantize(torch.from_numpy(data), qtype), expected)
    bf16 = dequantize(torch.from_numpy(data), qtype, torch.bfloat16)
    assert_bit_exact(bf16, expected.to(torch.bfloat16))
    stacked = torch.from_numpy(data).reshape(2, 3, -1)
    assert_bit_exact(dequantize(stacked, qtype), expected.reshape(2, 3, -1))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_odd_layouts(qtype):
    """Blocks at an odd address, and a strided column slice, as views of a file can be."""
    blocks = random_blocks(qtype, 64, seed=2)
    expected = reference(blocks, qtype).reshape(64, elements_per_block(qtype))
    shifted = torch.zeros(blocks.size + 1, dtype=torch.uint8)
    shifted[1:] = torch.from_numpy(blocks.reshape(-1))
    misaligned = shifted[1:].reshape(blocks.shape)
    assert_bit_exact(dequantize(misaligned, qtype), expected)

    wide = torch.from_numpy(blocks).reshape(8, -1)  # 8 rows of 8 blocks
    per_row = elements_per_block(qtype)
    columns = wide[:, 2 * bytes_per_block(qtype) : 5 * bytes_per_block(qtype)]
    assert_bit_exact(dequantize(columns, qtype), expected.reshape(8, -1)[:, 2 * per_row : 5 * per_row])


@pytest.mark.parametrize("qtype, qh_offset", [(T.Q5_0, 2), (T.Q5_1, 4)], ids=["Q5_0", "Q5_1"])
def test_every_fifth_bit_mask_byte(qtype, qh_offset):
    blocks = random_blocks(qtype, 64, seed=3)
    blocks[:, qh_offset : qh_offset + 4] = np.arange(256, dtype=np.uint8).reshape(64, 4)
    assert_bit_exact(dequantize(torch.from_numpy(blocks), qtype), reference(blocks, qtype))


def test_read_only_input():
    blocks = random_blocks(T.Q4_K, 16)
    blocks.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about non-writable arrays
        data = torch.from_numpy(blocks)
    assert_bit_exact(dequantize(data, T.Q4_K), reference(blocks, T.Q4_K))


@pytest.mark.parametrize(
    "qtype, dtype", [(T.F32, torch.float32), (T.F16, torch.float16), (T.BF16, torch.bfloat16)], ids=str
)
def test_typed_float_input_is_cast(qtype, dtype):
    values = torch.randn(4, 10).to(dtype)
    assert_bit_exact(dequantize(values, qtype), values.to(torch.float32))
    assert_bit_exact(dequantize(values, qtype, torch.bfloat16), values.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.TQ1_0], ids=lambda t: t.name)
def test_unsupported_type(qtype):
    data = torch.zeros(2, GGML_QUANT_SIZES[qtype][1], dtype=torch.uint8)
    with pytest.raises(UnsupportedQuantError, match=qtype.name):
        dequantize(data, qtype)
    with pytest.raises(UnsupportedQuantError) as error:
        check_supported(qtype, "blk.3.ffn_up.weight")
    message = str(error.value)
    assert qtype.name in message and "blk.3.ffn_up.weight" in message and "Q4_K" in message
    check_supported(T.Q4_K, "blk.3.ffn_up.weight")


def test_bad_input():
    with pytest.raises(ValueError, match="multiple"):
        dequantize(torch.zeros(2, 19, dtype=torch.uint8), T.Q4_0)
    with pytest.raises(TypeError):
        dequantize(torch.zeros(2, 18, dtype=torch.int32), T.Q4_0)


@pytest.mark.skipif(not SMOLLM2_Q4_1.exists(), reason=f"{SMOLLM2_Q4_1} not present")
def test_real_file():
    reader = GGUFReader(SMOLLM2_Q4_1)
    tensors = {t.name: t for t in reader.tensors}
    checked = set()
    for name in ("blk.0.ffn_down.weight", "blk.5.attn_q.weight", "token_embd.weight"):
        tensor = tensors[name]
        qtype = T(int(tensor.tensor_type))
        rows = tensor.data[:16]  # read-only memmap view
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(rows)
        assert_bit_exact(dequantize(data, qtype), reference(rows, qtype))
        checked.add(qtype)
    assert checked == {T.Q4_1, T.Q8_0}
