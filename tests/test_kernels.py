"""Our kernels (cholla/kernels/) against gguf's own dequantizers.

Weights are random GGUF blocks (random quants, finite random scales, see
tests/test_quant.py). The reference rounds gguf's fp32 weights and the fp32
activations to bfloat16, as the kernel does, and multiplies in float64, so the
only difference left is the kernel's fp32 accumulation order.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from cholla.kernels import cpu_kernels
from cholla.quant import bytes_per_block, elements_per_block
from tests.test_quant import random_blocks

T = GGMLQuantizationType
KERNEL_TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="needs a CPU with AVX512-BF16 and a C++ compiler")


def random_weight(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0):
    """uint8 blocks [rows, bytes per row] and gguf's fp32 dequantization [rows, cols]."""
    per_row = cols // elements_per_block(qtype)
    blocks = random_blocks(qtype, rows * per_row, seed).reshape(rows, per_row * bytes_per_block(qtype))
    reference = torch.from_numpy(gguf_dequantize(blocks.reshape(-1), qtype).reshape(rows, cols).astype("float32"))
    return torch.from_numpy(blocks), reference


def bf16_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Products of bf16-rounded inputs, summed exactly."""
    return (x.bfloat16().double() @ w.bfloat16().double().T).float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 accumulation of bf16 products: error a few ulp of the largest partial sums."""
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=float(scale) * 2e-5)


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 products and sums: error a few fp32 ulp of the largest partial sums."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=float(expected.abs().max().clamp_min(1.0)) * 1e-6)


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf(qtype):
    blocks, reference = random_weight(qtype, 40, 512)
    got = kernels.dequantize_bf16([blocks], [int(qtype)], 512)
    # Round-to-nearest-even of the fp32 value; fused multiply-adds may land one bf16 ulp off on a tie.
    torch.testing.assert_close(got.float(), reference.bfloat16().float(), rtol=2**-8, atol=1e-30)
    assert (got == reference.bfloat16()).float().mean() > 0.999


def test_dequantize_stacks_weights_as_each_alone():
    """Several weights (q, k, v) in one call, one parallel region over the stack's rows: each
    weight's rows where its own call puts them, bit for bit, at two threads and one; empty ones too."""
    weights = [random_weight(T.Q4_K, 130, 256, seed=1)[0], random_weight(T.Q8_0, 4, 256, seed=2)[0][:0],
               random_weight(T.Q5_0, 67, 256, seed=3)[0], random_weight(T.Q6_K, 5, 256, seed=4)[0]]
    types = [int(T.Q4_K), int(T.Q8_0), int(T.Q5_0), int(T.Q6_K)]
    alone = torch.cat([kernels.dequantize_bf16([w], [t], 256) for w, t in zip(weights, types)])
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            assert torch.equal(kernels.dequantize_bf16(weights, types, 256), alone)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 33, 100])
def test_qmatmul_matches_reference(qtype, rows):
    blocks, w = random_weight(qtype, 72, 768, seed=rows)  # 72 rows: two full 32-row jobs and a partial one
    x = torch.randn(rows, 768, generator=torch.Generator().manual_seed(rows))
    assert_close(kernels.qmatmul(x, [blocks], [int(qtype)]), bf16_reference(x, w))


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_qgemv_is_exact_fp32(qtype, rows):
    """The decode path matches gguf's fp32 weights to fp32 accuracy."""
    blocks, w = random_weight(qtype, 40, 768, seed=rows)
    x = torch.randn(rows, 768, generator=torch.Generator().manual_seed(rows))
    expected = (x.double() @ w.double().T).float()
    assert_exact(kernels.qgemv(x, [blocks], [int(qtype)]), expected)


INT8_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
INT8_CENTRE = {T.Q4_1: 8.0, T.Q5_1: 16.0, T.Q4_K: 8.0, T.Q5_K: 16.0}  # the kernel's m' = m + centre d (see qgemv.cpp)
K_QUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]  # super-blocks of 256; Q6_K: no min, a scale per 16 weights


def _scales_and_mins(blocks: torch.Tensor, qtype: GGMLQuantizationType, k: int):
    """Per block of 32 weights, float64 [n, k / 32]: w = d q + m."""
    n = blocks.shape[0]
    if qtype not in (T.Q4_K, T.Q5_K):
        header = blocks.reshape(n, k // 32, -1)[..., :4].contiguous().view(torch.float16).double()
        return header[..., 0], header[..., 1]
    supers = blocks.reshape(n, k // 256, bytes_per_block(qtype))  # d, dmin and 12 bytes of scales lead both
    d_super, dmin = supers[..., :4].contiguous().view(torch.float16).double().unbind(-1)
    q = supers[..., 4:16].long()  # ggml's get_scale_min_k4, for sub-blocks 0-3 and 4-7
    scales = torch.cat([q[..., 0:4] & 63, (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)], dim=-1)
    mins = torch.cat([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], dim=-1)
    return (d_super[..., None] * scales).reshape(n, -1), (-dmin[..., None] * mins).reshape(n, -1)


def int8_reference(x: torch.Tensor, blocks: torch.Tensor, qtype: GGMLQuantizationType, w: torch.Tensor):
    """What qgemv_int8 computes, in float64: x rounded per block of 32 to int8
    (dx = max|x| / 127, round half to even), times gguf's weights; formats with a
    min add m' (Σx - Σx̂) per block, since the kernel takes their min term from
    x's exact sum. Returns the products and a bound on their partial sums."""
    rows, k = x.shape
    xb = x.reshape(rows, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    x_hat = (torch.round(xb * inv).double() * (amax / 127.0).double()).reshape(rows, k)
    y = x_hat @ w.double().T
    if qtype in INT8_CENTRE:
        d, m = _scales_and_mins(blocks, qtype, k)  # [n, blocks of 32]
        exact_minus_rounded = xb.double().sum(-1) - x_hat.reshape(rows, k // 32, 32).sum(-1)  # [rows, blocks]
        y += exact_minus_rounded @ (m + INT8_CENTRE[qtype] * d).T
    return y.float(), float((x_hat.abs() @ w.double().abs().T).max())


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("k", [96, 512, 576, 640, 768])  # 3, 16, 18, 20 and 24 blocks a row
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_qgemv_int8_matches_its_int8_reference(qtype, k, rows):
    # 37 weight rows: the last job's 5 rows end inside a group of 16 blocks for every k but 512
    blocks, w = random_weight(qtype, 37, k, seed=k + rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k))
    x[:, :32] = 0.0  # an all-zero block quantizes with dx = 0
    expected, scale = int8_reference(x, blocks, qtype, w)
    got = kernels.qgemv_int8(x, [blocks], [int(qtype)])
    torch.testing.assert_close(got, expected, rtol=0, atol=scale * 1e-6)
    # ... and within int8 rounding of the exact products.
    exact = (x.double() @ w.double().T).float()
    assert (got - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("k", [256, 512, 768])  # 1, 2 and 3 super-blocks: a group of 16 sub-blocks, half of one
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_qgemv_int8_k_quants_match_their_int8_reference(qtype, k, rows):
    blocks, w = random_weight(qtype, 37, k, seed=k + rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k))
    x[:, 32:48] = 0.0  # a zero half block (Q6_K: one scale's 16 weights), quantized with its other half
    x[:, 64:96] = 0.0  # an all-zero block quantizes with dx = 0
    expected, scale = int8_reference(x, blocks, qtype, w)
    got = kernels.qgemv_int8(x, [blocks], [int(qtype)])
    torch.testing.assert_close(got, expected, rtol=0, atol=scale * 1e-6)
    exact = (x.double() @ w.double().T).float()
    assert (got - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize("qtype", INT8_TYPES + K_QUANTS, ids=lambda t: t.name)
# The batched product's edges: one partial tile (taken with all 16 weight rows of a job), a full one, a pair of
# tiles and a partial third (taken alone), two pairs; 37 weight rows: a job of 16 ends 5 rows in.
@pytest.mark.parametrize("rows", [7, 13, 16, 17, 32, 33, 64])
def test_batched_qgemv_int8_matches_its_int8_reference(qtype, rows):
    """More than six rows of x take the batched product (x's rows in the VNNI lanes): the same int8 sums."""
    blocks, w = random_weight(qtype, 37, 768, seed=rows)  # 37 weight rows: a job of 16 ends 5 rows in
    x = torch.randn(rows, 768, generator=torch.Generator().manual_seed(rows))
    x[:, 32:64] = 0.0  # an all-zero block quantizes with dx = 0
    expected, scale = int8_reference(x, blocks, qtype, w)
    got = kernels.qgemv_int8(x, [blocks], [int(qtype)])
    torch.testing.assert_close(got, expected, rtol=0, atol=scale * 1e-6)
    exact = (x.double() @ w.double().T).float()
    assert (got - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize("qtype", INT8_TYPES + K_QUANTS, ids=lambda t: t.name)
def test_batched_qgemv_int8_rows_equal_bit_for_bit_alone_or_paired(qtype):
    """Two tiles of x's rows are taken together (each weight meeting both), one alone; a row's
    result must not depend on which: 16 rows alone, the same rows as the first tile of 40."""
    blocks, _ = random_weight(qtype, 37, 512, seed=5)
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(5))
    together = kernels.qgemv_int8(x, [blocks], [int(qtype)])
    assert torch.equal(together[:16], kernels.qgemv_int8(x[:16].clone(), [blocks], [int(qtype)]))
    assert torch.equal(together[16:32], kernels.qgemv_int8(x[16:32].clone(), [blocks], [int(qtype)]))


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [7, 16, 32, 40])  # one tile, two; three: all unpacked
def test_batched_qgemv_int8_read_in_place_equals_unpacked(qtype, rows):
    """Whole jobs of 16 weight rows of Q8_0 (the heads') and of the nibble types are read where they
    lie at one or two tiles of x (Q8_0Rows, BlockRows), a last partial job unpacked into a strip
    first: the same rows in both give the same sums, bit for bit."""
    blocks, _ = random_weight(qtype, 37, 640, seed=7)
    blocks[32:37] = blocks[3:8]  # the partial third job repeats rows of the first
    x = torch.randn(rows, 640, generator=torch.Generator().manual_seed(7))
    got = kernels.qgemv_int8(x, [blocks], [int(qtype)])
    assert torch.equal(got[:, 32:37], got[:, 3:8])


def test_batched_qgemv_int8_side_by_side_and_into_out():
    """Weights of several types in one batched call equal separate calls; _out writes the same."""
    qtypes = [T.Q5_0, T.Q8_0, T.Q4_K, T.Q6_K, T.Q4_1, T.Q5_K]
    parts = [random_weight(qtype, 20 + 8 * i, 512, seed=i) for i, qtype in enumerate(qtypes)]
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(1))
    got = kernels.qgemv_int8(x, [b for b, _ in parts], [int(t) for t in qtypes])
    alone = torch.cat([kernels.qgemv_int8(x, [b], [int(t)]) for (b, _), t in zip(parts, qtypes)], dim=1)
    torch.testing.assert_close(got, alone, rtol=0, atol=0)
    out = torch.full_like(got, float("nan"))
    kernels.qgemv_int8_out(x, [b for b, _ in parts], [int(t) for t in qtypes], out)
    torch.testing.assert_close(out, got, rtol=0, atol=0)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_prompt_qmatmul_int8_matches_its_int8_reference(qtype):
    """A prompt's product (qmatmul_int8: any number of rows, here 150, a partial tenth tile) has
    the int8 sums of the batched product, and each row's result is the one it gets in a step of
    other rows (the decode steps' qgemv_int8), bit for bit."""
    blocks, w = random_weight(qtype, 37, 512, seed=3)
    x = torch.randn(150, 512, generator=torch.Generator().manual_seed(2))
    x[:, 32:64] = 0.0
    expected, scale = int8_reference(x, blocks, qtype, w)
    got = kernels.qmatmul_int8(x, [blocks], [int(qtype)])
    torch.testing.assert_close(got, expected, rtol=0, atol=scale * 1e-6)
    assert torch.equal(got[100:133], kernels.qgemv_int8(x[100:133].clone(), [blocks], [int(qtype)]))
    out = torch.full_like(got, float("nan"))
    kernels.qmatmul_int8_out(x, [blocks], [int(qtype)], out)
    assert torch.equal(out, got)


def test_prompt_qmatmul_int8_reads_bf16_rows_and_writes_bf16():
    """A prompt's product reads bf16 x as its fp32 values and, into a bf16 out, rounds its fp32
    sums once; over slabs of tiles (4000 rows of 1024: several) and weights of two types."""
    parts = [random_weight(qtype, 40, 1024, seed=i) for i, qtype in enumerate((T.Q4_0, T.Q8_0))]
    weights, types = [b for b, _ in parts], [int(T.Q4_0), int(T.Q8_0)]
    x = torch.randn(4000, 1024, generator=torch.Generator().manual_seed(4)).bfloat16()
    exact = kernels.qmatmul_int8(x.float(), weights, types)
    assert torch.equal(exact[3900:3950], kernels.qgemv_int8(x[3900:3950].float(), weights, types))  # row by row
    out = torch.empty(4000, 80)
    kernels.qmatmul_int8_out(x, weights, types, out)
    assert torch.equal(out, exact)
    out_bf16 = torch.empty(4000, 80, dtype=torch.bfloat16)
    kernels.qmatmul_int8_out(x, weights, types, out_bf16)
    assert torch.equal(out_bf16, exact.bfloat16())


def test_prompt_qmatmul_int8_refuses_types_without_an_int8_kernel():
    blocks, _ = random_weight(T.F16, 16, 64, seed=0)
    with pytest.raises(RuntimeError, match="int8 kernel"):
        kernels.qmatmul_int8(torch.randn(70, 64), [blocks], [int(T.F16)])


@pytest.mark.parametrize("rows", [13, 32])
def test_batched_qgemv_int8_streams_a_large_output(rows):
    """An output of 4 MiB or more (the head's logits) is written past the caches, in whole aligned lines where
    it can: x's rows 1 and 9 start aligned in the second weight (after 38 rows of the first), the others not, and
    both weights end in a partial job; with one thread and two."""
    small, w_small = random_weight(T.Q4_0, 38, 32, seed=2)
    large, w_large = random_weight(T.Q8_0, 2**17 + 5, 32, seed=3)
    x = torch.randn(rows, 32, generator=torch.Generator().manual_seed(rows))
    expected = torch.cat([int8_reference(x, small, T.Q4_0, w_small)[0], int8_reference(x, large, T.Q8_0, w_large)[0]], 1)
    scale = float((x.abs() @ torch.cat([w_small, w_large]).abs().T).max())
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = torch.full(expected.shape, float("nan"))
            kernels.qgemv_int8_out(x, [small, large], [int(T.Q4_0), int(T.Q8_0)], out)
            torch.testing.assert_close(out, expected, rtol=0, atol=scale * 1e-6)
    finally:
        torch.set_num_threads(threads)


def _head_weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 "head" of n rows with one strong row repeated at rows 17, n // 2 and n - 3 (bit-equal
    products: ties across jobs and the team's members), and a small Q4_0 weight beside it."""
    from gguf.quants import quantize

    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=generator)
    w[[17, n // 2, n - 3]] = 8 * torch.randn(k, generator=generator)
    head = torch.from_numpy(quantize(w.numpy(), T.Q8_0))
    small, _ = random_weight(T.Q4_0, 21, k, seed=seed)
    return head, small


@pytest.mark.parametrize("rows", [7, 16, 32, 33, 64])  # the batched product's: one tile, two, a partial third, four
def test_batched_qgemv_int8_argmax_is_the_argmax_of_its_logits(rows):
    """Greedy sampling fused into the head: the same token as argmax_rows over qgemv_int8's logits,
    ties to the first column (a repeated weight row, spread over jobs and members), one thread and two."""
    k = 64
    head, small = _head_weights(3000, k, seed=rows)
    strong = gguf_dequantize(head[17].numpy(), T.Q8_0).reshape(-1)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    x[1] = torch.from_numpy(strong)  # its best columns: 17, 1500, 2997 (tied) in the head
    x[2] = 0.0  # every product 0: the first column
    x[3] = -x[1]
    weights, types = [small, head], [int(T.Q4_0), int(T.Q8_0)]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            logits = kernels.qgemv_int8(x, weights, types)
            tokens = kernels.qgemv_int8_argmax(x, weights, types)
            assert torch.equal(tokens, kernels.argmax_rows(logits)), n
            assert torch.equal(tokens, logits.max(dim=-1).indices), n
            assert tokens[1] == 21 + 17 and tokens[2] == 0
    finally:
        torch.set_num_threads(threads)


def test_batched_qgemv_int8_argmax_takes_the_first_nan():
    """A NaN product counts above every number, the first one winning (torch.max's rule)."""
    head, small = _head_weights(300, 64, seed=1)
    for row in (250, 40):  # a NaN scale (fp16 0x7E00) in the row's first block
        head[row, :2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(0))
    tokens = kernels.qgemv_int8_argmax(x, [small, head], [int(T.Q4_0), int(T.Q8_0)])
    assert torch.equal(tokens, torch.full((9,), 21 + 40))
    with pytest.raises(RuntimeError, match="more than 6 rows"):
        kernels.qgemv_int8_argmax(x[:6].clone(), [head], [int(T.Q8_0)])


def test_int8_kernel_types_agree_with_the_routing():
    """linear.py routes batched steps by INT8_TYPES; the kernel has its own list."""
    from cholla.layers.linear import INT8_TYPES as ROUTED

    for qtype in KERNEL_TYPES:
        assert kernels.int8_kernel_types([int(qtype)]) == (qtype in ROUTED), qtype.name


def test_qgemv_int8_takes_the_exact_path_for_other_types():
    parts = [random_weight(qtype, 48, 512, seed=i) for i, qtype in enumerate([T.BF16, T.Q8_0, T.F32, T.F16])]
    types = [int(t) for t in (T.BF16, T.Q8_0, T.F32, T.F16)]
    x = torch.randn(1, 512)
    got = kernels.qgemv_int8(x, [b for b, _ in parts], types)
    exact = kernels.qgemv(x, [b for b, _ in parts], types)
    torch.testing.assert_close(got[:, :48], exact[:, :48], rtol=0, atol=0)
    torch.testing.assert_close(got[:, 96:], exact[:, 96:], rtol=0, atol=0)
    expected, scale = int8_reference(x, parts[1][0], T.Q8_0, parts[1][1])
    torch.testing.assert_close(got[:, 48:96], expected, rtol=0, atol=scale * 1e-6)


def test_fused_weights_side_by_side():
    """q, k and v of different types in one call equal three calls."""
    parts = [random_weight(qtype, rows, 512, seed=i) for i, (qtype, rows) in enumerate([(T.Q5_0, 96), (T.Q5_0, 48), (T.Q8_0, 48)])]
    x = torch.randn(7, 512)
    got = kernels.qmatmul(x, [b for b, _ in parts], [int(T.Q5_0), int(T.Q5_0), int(T.Q8_0)])
    assert got.shape == (7, 192)
    assert_close(got, bf16_reference(x, torch.cat([w for _, w in parts])))
    exact = kernels.qgemv(x, [b for b, _ in parts], [int(T.Q5_0), int(T.Q5_0), int(T.Q8_0)])
    assert_exact(exact, (x.double() @ torch.cat([w for _, w in parts]).double().T).float())


def test_large_batch_and_threads():
    blocks, w = random_weight(T.Q4_K, 256, 1024)
    x = torch.randn(300, 1024)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert_close(kernels.qmatmul(x, [blocks], [int(T.Q4_K)]), bf16_reference(x, w))
    finally:
        torch.set_num_threads(threads)


def test_bad_input_is_an_error_not_a_crash():
    blocks, _ = random_weight(T.Q4_0, 32, 256)
    with pytest.raises(RuntimeError, match="does not hold rows"):
        kernels.qmatmul(torch.randn(2, 512), [blocks], [int(T.Q4_0)])
    with pytest.raises(RuntimeError, match="unsupported GGML type"):
        kernels.qmatmul(torch.randn(2, 256), [blocks], [int(T.IQ4_NL)])
    with pytest.raises(RuntimeError, match="fp32"):
        kernels.qmatmul(torch.randn(2, 256).bfloat16(), [blocks], [int(T.Q4_0)])
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        kernels.qgemv(torch.randn(9, 256), [blocks], [int(T.Q4_0)])
    with pytest.raises(RuntimeError, match="at most 64 rows"):
        kernels.qgemv_int8(torch.randn(65, 256), [blocks], [int(T.Q4_0)])
    f16, _ = random_weight(T.F16, 32, 256)
    with pytest.raises(RuntimeError, match="need every weight in a type with an int8 kernel"):
        kernels.qgemv_int8(torch.randn(9, 256), [blocks, f16], [int(T.Q4_0), int(T.F16)])
    with pytest.raises(RuntimeError, match="out must be contiguous fp32"):
        kernels.qgemv_int8_out(torch.randn(9, 256), [blocks], [int(T.Q4_0)], torch.empty(9, 33))
    with pytest.raises(RuntimeError, match="does not hold rows"):
        kernels.qgemv_int8(torch.randn(1, 512), [blocks], [int(T.Q4_0)])


def test_qmatmul_out_writes_the_same_product_into_out():
    blocks, _ = random_weight(T.Q8_0, 70, 256, seed=4)
    x = torch.randn(20, 256, generator=torch.Generator().manual_seed(4))
    out = torch.full((20, 70), float("nan"))
    kernels.qmatmul_out(x, [blocks], [int(T.Q8_0)], out)
    torch.testing.assert_close(out, kernels.qmatmul(x, [blocks], [int(T.Q8_0)]), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="out must be contiguous fp32"):
        kernels.qmatmul_out(x, [blocks], [int(T.Q8_0)], torch.empty(20, 71))


# Query heads per KV head: 3, 4, 1 and 2 have a compiled copy each; 6 takes the general one.
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 1, 256), (2, 2, 40), (8, 4, 64), (6, 1, 32)])
@pytest.mark.parametrize("window, softcap", [(None, None), (5, None), (None, 30.0), (20, 50.0)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seqs", [5, 1])  # 1: few (sequence, KV head) pairs, so each pair's heads are split in two
def test_paged_attention_decode_matches_the_torch_path(heads, kv_heads, dim, window, softcap, cache_dtype, seqs):
    """Scattered blocks, ragged contexts (1 token to several blocks), windows, softcaps, GQA, both cache dtypes."""
    from cholla.layers.attention import decode_attention

    generator = torch.Generator().manual_seed(heads * dim)
    num_blocks, block_size = 40, 16
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(cache_dtype)
    context_lens = torch.tensor([1, 16, 17, 100, 33])[-seqs:]
    block_tables = torch.randperm(num_blocks, generator=generator)[: 5 * 7].reshape(5, 7)[-seqs:]
    q = torch.randn(seqs, heads, dim, generator=generator)
    scale = dim**-0.5
    expected = decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, window, softcap)
    got = kernels.paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, window or 0, softcap or 0.0,
                                         [], [])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# Groups of 1, 2, 3 and 4 query heads per job take 16, 8, 4 and 4 keys per pass of their scores, the rest
# one at a time; 5 per KV head takes the general copy. Context lengths around those counts and the blocks.
@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 1, 256), (9, 3, 64), (4, 2, 48), (2, 2, 32), (10, 2, 64)])
@pytest.mark.parametrize("window", [None, 21])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_attention_decode_rows_equal_alone_or_batched(heads, kv_heads, dim, window, cache_dtype):
    """A sequence's row in a batch of 7 (its KV heads' query heads in one job), alone at two threads
    (its heads split in two: another group size, another number of keys per pass) and alone at one
    thread: bit for bit the same, and within fp32 rounding of the torch path."""
    from cholla.layers.attention import decode_attention

    generator = torch.Generator().manual_seed(heads * dim + kv_heads)
    num_blocks, block_size = 80, 16
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(cache_dtype)
    context_lens = torch.tensor([3, 4, 17, 33, 64, 131, 150])
    block_tables = torch.randperm(num_blocks, generator=generator)[: 7 * 10].reshape(7, 10)
    q = torch.randn(7, heads, dim, generator=generator)
    scale = dim**-0.5

    def attend(rows, threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return kernels.paged_attention_decode(q[rows], k_cache, v_cache, block_tables[rows], context_lens[rows], scale,
                                                  window or 0, 0.0, [], [])
        finally:
            torch.set_num_threads(previous)

    batched = attend(slice(None), 2)
    torch.testing.assert_close(batched, decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, window),
                               rtol=1e-5, atol=1e-5)
    for s in range(7):
        for threads in (2, 1):
            torch.testing.assert_close(attend(slice(s, s + 1), threads), batched[s : s + 1], rtol=0, atol=0)


@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 1, 256)])
@pytest.mark.parametrize("window, softcap", [(None, None), (20, 50.0)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_attention_query_spans_match_the_torch_paths(heads, kv_heads, dim, window, softcap, cache_dtype):
    """Sequences with 1 or several query rows (speculative verification): causal within each span,
    against span_attention and against the prefill path's own masked attention (SDPA)."""
    from cholla.layers.attention import AttentionMetadata, paged_attention, span_attention

    generator = torch.Generator().manual_seed(heads + dim)
    num_blocks, block_size = 40, 16
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(cache_dtype)
    context_lens = torch.tensor([5, 1, 17, 100, 40])
    q_lens = [5, 1, 3, 17, 1]
    starts = torch.tensor([0, *itertools.accumulate(q_lens)])
    block_tables = torch.randperm(num_blocks, generator=generator)[: 5 * 7].reshape(5, 7)
    q = torch.randn(int(starts[-1]), heads, dim, generator=generator)
    scale = dim**-0.5
    got = kernels.paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, window or 0,
                                         softcap or 0.0, [], [], query_starts=starts)
    torch.testing.assert_close(got, span_attention(q, k_cache, v_cache, block_tables, context_lens, starts, scale,
                                                   window, softcap), rtol=1e-5, atol=1e-5)
    # The prefill path (one masked SDPA call per sequence) on the same rows, the caches left as they are
    # (a whole prompt's span reads its new keys and values, the rows' own in the cache).
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), starts.tolist(), context_lens.tolist(), block_tables,
                             num_prefills=5, decode_context_lens=torch.zeros(0, dtype=torch.long))
    positions = [int(ctx) - n + i for ctx, n in zip(context_lens, q_lens) for i in range(n)]
    rows = [(int(block_tables[s, p // block_size]), p % block_size)
            for s, p in zip(itertools.chain(*([s] * n for s, n in enumerate(q_lens))), positions)]
    keys, values = (torch.stack([cache[b, o] for b, o in rows]).float() for cache in (k_cache, v_cache))
    expected = paged_attention(q, keys, values, k_cache, v_cache, meta, scale, window, softcap, write=False)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="1 to context_len query rows"):
        kernels.paged_attention_decode(q[:6], k_cache, v_cache, block_tables[:2], context_lens[:2], scale, 0, 0.0,
                                       [], [], query_starts=torch.tensor([0, 0, 6]))


def test_paged_attention_rejects_bad_tables():
    k_cache = torch.zeros(4, 16, 1, 64)
    q = torch.zeros(1, 2, 64)
    with pytest.raises(RuntimeError, match="block id out of range"):
        kernels.paged_attention_decode(q, k_cache, k_cache, torch.tensor([[7]]), torch.tensor([3]), 1.0, 0, 0.0, [], [])
    with pytest.raises(RuntimeError, match="bad context length"):
        kernels.paged_attention_decode(q, k_cache, k_cache, torch.tensor([[0]]), torch.tensor([17]), 1.0, 0, 0.0, [], [])


@pytest.mark.parametrize("dim", [64, 576, 650])  # 650: a partial vector at the end of each row
def test_rms_norm_matches_the_torch_ops(dim):
    from cholla.layers.norm import rms_norm_ops

    generator = torch.Generator().manual_seed(dim)
    x = torch.randn(3, 5, dim, generator=generator) * 3
    weight = torch.randn(dim, generator=generator)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-6), rms_norm_ops(x, weight, 1e-6), rtol=1e-6, atol=1e-6)
    big = torch.randn(700, dim, generator=generator)  # enough rows to run on both threads
    torch.testing.assert_close(kernels.rms_norm(big, weight, 1e-5), rms_norm_ops(big, weight, 1e-5), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="weight must be"):
        kernels.rms_norm(x, weight[:-1], 1e-6)


def test_residual_rms_norm_equals_the_add_and_the_norms():
    """x + rms_norm(a), then that sum's rms_norm (Gemma's post-norm, residual add, next pre-norm)
    in one pass: bit for bit the three ops, with and without the next norm, at two threads."""
    from cholla.layers.norm import RMSNorm, residual_rms_norm

    generator = torch.Generator().manual_seed(6)
    x, a = (torch.randn(700, 650, generator=generator) * 3 for _ in range(2))  # 650: a partial vector
    norm, next_norm = RMSNorm(650, 1e-6), RMSNorm(650, 1e-6)
    norm.load(torch.randn(650, generator=generator))
    next_norm.load(torch.randn(650, generator=generator))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        total, normed = residual_rms_norm(x, a, norm, next_norm)
        expected = x + kernels.rms_norm(a, norm.weight, 1e-6)
        assert torch.equal(total, expected) and torch.equal(normed, kernels.rms_norm(expected, next_norm.weight, 1e-6))
        total, normed = residual_rms_norm(x, a, norm)
        assert torch.equal(total, expected) and normed is None
        assert torch.equal(residual_rms_norm(x[:, :64].contiguous(), a[:, :64].t().contiguous().t(),
                                             RMSNorm(64, 1e-6))[0],
                           x[:, :64] + kernels.rms_norm(a[:, :64], torch.ones(64), 1e-6))  # not contiguous: the ops
    finally:
        torch.set_num_threads(before)
    with pytest.raises(RuntimeError, match="weights must be fp32"):
        kernels.residual_rms_norm(x, a, norm.weight[:-1], 1e-6, None)
    with pytest.raises(RuntimeError, match="x and a must be contiguous"):
        kernels.residual_rms_norm(x, a[:, :64], norm.weight, 1e-6, None)


def test_rms_norm_reads_heads_in_place():
    """q and k as [tokens, heads, dim] views into a fused q/k/v product (a free token stride): the
    same result, bit for bit, as their contiguous copies, and contiguous; other layouts are copied."""
    generator = torch.Generator().manual_seed(5)
    fused = torch.randn(300, 4 * 64 + 64 + 64, generator=generator)
    q, k, _ = fused.split([256, 64, 64], dim=1)
    weight = torch.randn(64, generator=generator)
    for heads in (q.view(300, 4, 64), k.view(300, 1, 64), fused.view(300, 6, 64)[:, ::2]):
        ours = kernels.rms_norm(heads, weight, 1e-6)
        assert ours.is_contiguous() and torch.equal(ours, kernels.rms_norm(heads.contiguous(), weight, 1e-6))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("tokens", [1, 300])
def test_rope_matches_the_torch_ops(interleaved, tokens):
    """In place on q and k that are views into one fused projection output, as the model passes them."""
    from cholla.layers.rotary import RotaryEmbedding
    from cholla.models.config import RopeConfig

    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), 64, interleaved)
    generator = torch.Generator().manual_seed(tokens)
    positions = torch.randint(0, 2000, (tokens,), generator=generator)
    fused = torch.randn(tokens, 9 * 64 + 3 * 64 + 3 * 64, generator=generator)
    q = fused[:, : 9 * 64].view(tokens, 9, 64)
    k = fused[:, 9 * 64 : 12 * 64].view(tokens, 3, 64)
    rotary._grow(2000)
    expected_q, expected_k = rotary.rotate_ops(positions, q.clone(), k.clone())
    kernels.rope_(q, k, positions, rotary.cos, rotary.sin, interleaved)
    torch.testing.assert_close(q, expected_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, expected_k, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="position out of the table"):
        kernels.rope_(q, k, positions + 10**6, rotary.cos, rotary.sin, interleaved)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_write_kv_matches_index_copy(cache_dtype):
    """Strided k and v (views into a fused projection), rounded as ``Tensor.to`` rounds, into scattered slots."""
    generator = torch.Generator().manual_seed(0)
    fused = torch.randn(50, 4 * 64 + 2 * 2 * 64, generator=generator) * 100
    fused[0, 256] = float("nan")
    k = fused[:, 256:384].view(50, 2, 64)
    v = fused[:, 384:].view(50, 2, 64)
    slots = torch.randperm(20 * 16, generator=generator)[:50]
    expected_k = torch.zeros(20, 16, 2, 64, dtype=cache_dtype)
    expected_v = torch.zeros(20, 16, 2, 64, dtype=cache_dtype)
    expected_k.view(-1, 2, 64).index_copy_(0, slots, k.to(cache_dtype))
    expected_v.view(-1, 2, 64).index_copy_(0, slots, v.to(cache_dtype))
    k_cache, v_cache = torch.zeros_like(expected_k), torch.zeros_like(expected_v)
    kernels.write_kv(k, v, k_cache, v_cache, slots, [], [])
    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0, equal_nan=True)  # NaN stays NaN
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="slot out of range"):
        kernels.write_kv(k, v, k_cache, v_cache, slots + 10**4, [], [])


@pytest.mark.parametrize("cols", [1, 17, 65536, 200_000])  # a partial vector; one chunk exactly; several chunks
def test_argmax_rows_matches_torch_max(cols):
    generator = torch.Generator().manual_seed(cols)
    x = torch.randn(5, cols, generator=generator)
    x[1] = 0.0  # all tied: the first index
    if cols > 70_000:
        x[2, [65_535, 65_536, 199_999]] = 50.0  # ties across chunk boundaries
        x[3, [70_000, 3]] = float("nan")  # a NaN wins, the first one
        x[4, 150_000] = float("inf")
    torch.testing.assert_close(kernels.argmax_rows(x), x.max(dim=-1).indices)
    half = x[:, : max(1, cols // 2)]  # a row stride longer than the row
    torch.testing.assert_close(kernels.argmax_rows(half), half.max(-1).indices)


@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh", "gelu"])
@pytest.mark.parametrize("rows, inner", [(1, 2048), (5, 1536), (3, 40)])  # 40: a partial vector per row
def test_gated_activation_matches_torch(activation, rows, inner):
    from cholla.layers.mlp import ACTIVATION_IDS, ACTIVATIONS

    generator = torch.Generator().manual_seed(inner)
    gate_up = torch.randn(rows, 2 * inner, generator=generator) * 4
    gate_up[:, :8] = torch.tensor([0.0, -0.0, 1e-7, -1e-7, 30.0, -30.0, 100.0, -100.0])  # tiny and saturated
    gate, up = gate_up[:, :inner], gate_up[:, inner:]  # halves of one product, as the MLP has them
    got = kernels.gated_activation(gate, up, ACTIVATION_IDS[activation])
    if activation == "gelu":  # exact GELU is PyTorch's own fp32 erf
        torch.testing.assert_close(got, ACTIVATIONS[activation](gate) * up, rtol=0, atol=0)
        return
    # Ours: within a few fp32 ulp of the float64 truth.
    expected = (ACTIVATIONS[activation](gate.double()) * up.double()).float()
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh", "gelu"])
def test_gated_activation_in_bf16_is_the_fp32_result_rounded(activation):
    """A prefill's bf16 gate/up product goes through as bf16: the result must be
    exactly what the fp32 path gives rounded to bf16, as the down projection's
    matmul would have rounded it."""
    from cholla.layers.mlp import ACTIVATION_IDS

    gate_up = (torch.randn(70, 2 * 83, generator=torch.Generator().manual_seed(3)) * 4).to(torch.bfloat16)
    gate, up = gate_up[:, :83], gate_up[:, 83:]
    got = kernels.gated_activation(gate, up, ACTIVATION_IDS[activation])
    assert got.dtype == torch.bfloat16
    expected = kernels.gated_activation(gate.float(), up.float(), ACTIVATION_IDS[activation]).to(torch.bfloat16)
    assert torch.equal(got, expected)


# -- every KV cache type (cholla/kv/kv_types.py), read and written in place -----------------

def _kv_side(type_name: str, num_blocks: int, block_size: int, kv_heads: int, dim: int, generator, key: bool = False):
    """A side of the type, every slot written by kv_types' own (PyTorch) writer from random rows;
    a calibrated one gets random statistics first. q4_kivi's keys: blocks 1 and 2 are left open
    (still filling, read from their bf16 rows), the last slots of block 2 never written."""
    from cholla.kv.kv_types import allocate, kv_cache_type, store

    side = allocate(kv_cache_type(type_name), num_blocks, block_size, kv_heads, dim,
                    lambda shape, dtype: torch.zeros(shape, dtype=dtype), key=key, open_slots=num_blocks)
    if getattr(side, "shift", None) is not None:
        side.shift.copy_(torch.randn(kv_heads, dim, generator=generator))
        side.spread.copy_(torch.rand(kv_heads, dim, generator=generator) * 2 + 0.1)
    rows = torch.randn(num_blocks * block_size, kv_heads, dim, generator=generator) * 2
    rows[:, :, 3] += 4  # an outlier channel shared by every token, as keys have
    slots = torch.arange(num_blocks * block_size)
    if getattr(side, "open_blocks", None) is not None:
        slots = slots[(slots < block_size) | (slots >= block_size + block_size // 2)]  # block 1 written in two parts
        slots = slots[(slots < 3 * block_size - 5) | (slots >= 3 * block_size)]  # block 2 part-way
        store(side, rows[block_size: block_size + block_size // 2], torch.arange(block_size, block_size + block_size // 2))
    store(side, rows[slots], slots)
    return side


KV_TYPE_PAIRS = [(name, name) for name in ("f32", "bf16", "f16", "fp8_e4m3_plain", "fp8_e5m2", "int8", "q8_0", "q4_0",
                                           "q4_0_rot", "q4_0_cal", "q4_kivi", "fp8_e4m3_scaled",
                                           "fp8_e4m3_centered")]
KV_TYPE_PAIRS += [("q8_0", "q4_0"), ("q4_0_cal", "bf16"), ("fp8_e4m3_plain", "int8"),  # K and V may differ
                  ("q4_kivi", "fp8_e4m3_scaled"), ("fp8_e4m3_centered", "q4_kivi")]


@pytest.mark.parametrize("k_type, v_type", KV_TYPE_PAIRS, ids=lambda name: name)
@pytest.mark.parametrize("heads, kv_heads, dim, window, softcap", [(6, 2, 64, None, None), (4, 1, 256, 20, 30.0)])
def test_paged_attention_reads_every_kv_type_as_the_torch_path(k_type, v_type, heads, kv_heads, dim, window, softcap):
    """The kernel reading each type in place equals the PyTorch path's gather (dequantize) and attend:
    per-group scales, nibbles, fp8 codes, and the rotation and statistics folded into q and the output."""
    from cholla.layers.attention import attend_decodes, decode_attention, kernel_reads

    generator = torch.Generator().manual_seed(dim)
    num_blocks, block_size = 12, 16
    k_cache = _kv_side(k_type, num_blocks, block_size, kv_heads, dim, generator, key=True)
    v_cache = _kv_side(v_type, num_blocks, block_size, kv_heads, dim, generator)
    context_lens = torch.tensor([1, 17, 100, 40])
    block_tables = torch.stack([torch.randperm(num_blocks, generator=generator)[:7] for _ in range(4)])
    block_tables[:, 1:3] = torch.tensor([1, 2])  # q4_kivi keys: open blocks among the quantized ones
    q = torch.randn(4, heads, dim, generator=generator)
    scale = dim**-0.5
    assert kernel_reads(k_cache, v_cache)
    expected = decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, window, softcap)
    got = attend_decodes(q, k_cache, v_cache, block_tables, context_lens, scale, window, softcap)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_int8_of_a_head_dim_without_a_hadamard_matrix_is_read_and_written_unrotated():
    """int8 of a 48-value head (not a power of two: kept unrotated) in the kernels: written as
    kv_types.store writes it, read as the PyTorch path reads it."""
    from cholla.layers.attention import attend_decodes, decode_attention, kernel_reads, write_kv
    from cholla.kv.kv_types import store

    generator = torch.Generator().manual_seed(48)
    k_cache, v_cache = (_kv_side("int8", 6, 16, 2, 48, generator) for _ in range(2))
    assert not k_cache.rotated and kernel_reads(k_cache, v_cache)
    theirs = [_kv_side("int8", 6, 16, 2, 48, torch.Generator()) for _ in range(2)]
    k, v = torch.randn(2, 20, 2, 48, generator=generator) * 3
    slots = torch.randperm(96, generator=generator)[:20]
    write_kv(k, v, k_cache, v_cache, slots)
    store(theirs[0], k, slots)
    store(theirs[1], v, slots)
    for mine, reference in zip((k_cache, v_cache), theirs):
        assert torch.equal(mine.values.flatten(0, 1)[slots], reference.values.flatten(0, 1)[slots])
        assert torch.equal(mine.scales.flatten(0, 1)[slots], reference.scales.flatten(0, 1)[slots])
    q = torch.randn(3, 4, 48, generator=generator)
    tables, lens = torch.tensor([[0, 1, 2], [3, 4, 5], [5, 0, 1]]), torch.tensor([40, 7, 48])
    expected = decode_attention(q, k_cache, v_cache, tables, lens, 48**-0.5, None, None)
    torch.testing.assert_close(attend_decodes(q, k_cache, v_cache, tables, lens, 48**-0.5, None, None), expected,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("type_name", ["f32", "bf16", "f16", "fp8_e4m3_plain", "fp8_e5m2", "int8", "q8_0", "q4_0",
                                       "q4_0_rot", "q4_0_cal", "q4_kivi", "fp8_e4m3_scaled",
                                       "fp8_e4m3_centered"])
def test_write_kv_writes_every_kv_type_as_kv_types_store(type_name):
    """The kernel's writer against kv_types.store on strided rows with zero groups, huge values
    (fp8 saturates) and ties: the same bytes; the rotated types rotate by a fast transform instead
    of a matrix product, so a code may move by one step where a value lies on a rounding edge.
    q4_kivi's keys: blocks written part-way (into open slots, quantized where their last slot is
    written), one block written whole, and the open rows and slots alike."""
    from cholla.kv.kv_types import ScaledKV, store
    from cholla.layers.attention import kernel_reads, write_kv

    generator = torch.Generator().manual_seed(1)
    kv_heads, dim, tokens = 2, 64, 60
    fused = torch.randn(tokens, 3 * kv_heads * dim, generator=generator) * 3
    fused[0, :] = 0  # all-zero groups: scale 0
    fused[1, 5] = 1e6  # beyond fp8's range: saturates
    fused[2, :32] = torch.tensor([1.0, -1.0] * 16)  # |max| ties of both signs: the first wins (q4_0)
    k = fused[:, kv_heads * dim: 2 * kv_heads * dim].view(tokens, kv_heads, dim)
    v = fused[:, 2 * kv_heads * dim:].view(tokens, kv_heads, dim)
    slots = torch.cat([torch.randperm(7 * 16, generator=generator)[: tokens - 16], torch.arange(7 * 16, 8 * 16)])
    slots = slots[torch.randperm(tokens, generator=generator)]  # block 7 written whole, in shuffled order
    ours = [_kv_side(type_name, 8, 16, kv_heads, dim, torch.Generator().manual_seed(2), key=i == 0) for i in range(2)]
    theirs = [_kv_side(type_name, 8, 16, kv_heads, dim, torch.Generator().manual_seed(2), key=i == 0) for i in range(2)]
    assert kernel_reads(*ours)
    write_kv(k, v, ours[0], ours[1], slots)
    store(theirs[0], k.contiguous(), slots)
    store(theirs[1], v.contiguous(), slots)
    for mine, reference in zip(ours, theirs):
        mine_parts = mine if isinstance(mine, ScaledKV) else (mine,)
        reference_parts = reference if isinstance(reference, ScaledKV) else (reference,)
        if getattr(mine, "open_blocks", None) is not None:
            assert torch.equal(mine.open_blocks.rows, reference.open_blocks.rows)
            assert torch.equal(mine.open_blocks.slot_of, reference.open_blocks.slot_of)
        for a, b in zip(mine_parts[:2], reference_parts[:2]):
            if a.dtype.itemsize == 1 and a.dtype.is_floating_point:
                a, b = a.view(torch.uint8), b.view(torch.uint8)
            if not (isinstance(mine, ScaledKV) and mine.rotated):
                assert torch.equal(a, b)
            elif a.dtype == torch.float16:  # scales: set by the largest rotated value, rounded alike
                torch.testing.assert_close(a, b, rtol=1e-3, atol=0)
            else:
                assert (a != b).float().mean() < 0.01  # codes on a rounding edge
