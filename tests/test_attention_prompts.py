"""Whole prompts of one length attend in one batched call (layers/attention.py's
_attend_prompt_runs): the same outputs as one call per prompt, and as a naive causal softmax.
Short prompts with wide heads take explicit scores (_attend_short_prompts): the same checks, and
SDPA's result within bf16's rounding."""

import pytest
import torch
from gguf import GGMLQuantizationType

from cholla.kernels import cpu_kernels
from cholla.layers import attention
from cholla.layers.attention import AttentionMetadata, paged_attention

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 32, 16
BF16 = int(GGMLQuantizationType.BF16)  # the kernels' type id of bf16 rows


def naive(q, k, v, scale, softcap=None, window=None):
    """q [L, heads, dim], k, v [L, kv_heads, dim]: fp32 causal attention, one head at a time."""
    length, out = q.shape[0], torch.empty_like(q)
    heads, kv_heads = q.shape[1], k.shape[1]
    pos = torch.arange(length)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[:, None] - pos[None, :] < window
    for h in range(heads):
        kvh = h // (heads // kv_heads)
        scores = q[:, h] @ k[:, kvh].T * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        out[:, h] = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v[:, kvh]
    return out


def step(lengths, q, k, v, dtype, softcap=None, window=None, split=False, keep_bf16=False):
    """One prefill step over whole prompts of these lengths (split: one call per prompt)."""
    blocks = -(-max(lengths) // BLOCK)
    caches = [torch.zeros(len(lengths) * blocks, BLOCK, *x.shape[1:]) for x in (k, v)]
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    tables = torch.arange(len(lengths) * blocks).view(len(lengths), blocks)
    slots = torch.cat([tables[i, t // BLOCK] * BLOCK + t % BLOCK for i, n in enumerate(lengths)
                       for t in [torch.arange(n)]])
    if split:
        return torch.cat([step([n], q[a:b], k[a:b], v[a:b], dtype, softcap, window)
                          for n, a, b in zip(lengths, starts, starts[1:])])
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=starts, context_lens=list(lengths),
                             block_tables=tables, num_prefills=len(lengths))
    return paged_attention(q, k, v, *caches, meta, 0.2, window, softcap, prefill_dtype=dtype, keep_bf16=keep_bf16)


def test_prompt_runs_match_one_call_each_and_a_naive_softmax():
    g = torch.Generator().manual_seed(0)
    lengths = [24, 24, 24, 9, 24, 24, 40]  # runs of 3 and 2 equal lengths, and singles
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS))
    for dtype, softcap, window in ((torch.float32, None, None), (torch.bfloat16, None, None),
                                   (torch.float32, 30.0, None), (torch.float32, None, 16)):
        ours = step(lengths, q, k, v, dtype, softcap, window)
        assert torch.equal(ours, step(lengths, q, k, v, dtype, softcap, window, split=True))
        start = 0
        for n in lengths:
            s = slice(start, start + n)
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(ours[s], naive(q[s], k[s], v[s], 0.2, softcap, window), rtol=tol, atol=tol)
            start += n


@pytest.mark.skipif(cpu_kernels() is None, reason="the short prompts' scores are our kernels' product")
def test_short_prompts_match_one_call_each_sdpa_and_a_naive_softmax(monkeypatch):
    monkeypatch.setattr(attention, "amx_tiles", lambda: False)  # the path runs there too, though not chosen
    g = torch.Generator().manual_seed(1)
    dim, lengths = 128, [24, 24, 9, 40, 40, 40, 300]  # 300 > 2 x dim: SDPA's flash kernel
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, dim, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS))
    assert attention._short_prompts(q, k, 40, None, torch.bfloat16, None)
    assert not attention._short_prompts(q, k, 300, None, torch.bfloat16, None)
    ours = step(lengths, q, k, v, torch.bfloat16)
    assert torch.equal(ours, step(lengths, q, k, v, torch.bfloat16, split=True))
    # bf16 out where every prompt is short (the values the fp32 out holds), fp32 where one is not
    short = step(lengths[:-1], q[:-300], k[:-300], v[:-300], torch.bfloat16, keep_bf16=True)
    assert short.dtype == torch.bfloat16 and torch.equal(short.float(), ours[:-300])
    assert step(lengths, q, k, v, torch.bfloat16, keep_bf16=True).dtype == torch.float32
    monkeypatch.setattr(attention, "SHORT_PROMPT_SCORE_BYTES", 1)  # one sequence's scores per pass
    assert torch.equal(ours, step(lengths, q, k, v, torch.bfloat16))
    monkeypatch.setattr(attention, "SHORT_PROMPT_MIN_HEAD_DIM", 1 << 20)  # every prompt through SDPA
    sdpa = step(lengths, q, k, v, torch.bfloat16)
    assert torch.equal(ours[-300:], sdpa[-300:])
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        reference = naive(q[s], k[s], v[s], 0.2)
        torch.testing.assert_close(ours[s], reference, rtol=2e-2, atol=2e-2)
        # about as far from the fp32 softmax as SDPA in bf16 (both round q, k, probabilities, v and
        # the output to bf16; SDPA rounds its probabilities before normalising them, we after)
        assert (ours[s] - reference).abs().mean() <= 1.25 * (sdpa[s] - reference).abs().mean()
        start += n


@pytest.mark.skipif(cpu_kernels() is None, reason="the short prompts' scores are our kernels' product")
def test_short_prompts_take_values_narrower_than_keys(monkeypatch):
    """Latent attention (layers/mla.py): one KV head whose values are a slice of its keys."""
    monkeypatch.setattr(attention, "amx_tiles", lambda: False)
    g = torch.Generator().manual_seed(2)
    lengths, dim, v_dim, heads = [20, 20], 160, 128, 8
    q = torch.randn(sum(lengths), heads, dim, generator=g)
    entry = torch.randn(sum(lengths), 1, dim, generator=g)
    ours = step(lengths, q, entry, entry[..., :v_dim], torch.bfloat16)
    assert ours.shape == (sum(lengths), heads, v_dim)
    for s in (slice(0, 20), slice(20, 40)):
        q_s, k_s, v_s = (x[s].transpose(0, 1)[None] for x in (q, entry, entry[..., :v_dim]))
        expected = torch.nn.functional.scaled_dot_product_attention(q_s, k_s, v_s, is_causal=True, scale=0.2,
                                                                    enable_gqa=True)
        torch.testing.assert_close(ours[s], expected[0].transpose(0, 1), rtol=2e-2, atol=2e-2)


def per_pair_reference(q, k, v, length, scale):
    """_attend_short_prompts as it was: one ``qmatmul_out`` call per (sequence, KV head), the mask built
    anew, each prompt's heads on their own; the result in bf16 [n L, heads, v's dim]."""
    heads, kv_heads, v_dim = q.shape[1], k.shape[1], v.shape[2]
    group = heads // kv_heads
    out = torch.empty(q.shape[0], heads, v_dim, dtype=torch.bfloat16)
    for start in range(0, q.shape[0], length):
        above = torch.full((length, length), float("-inf")).triu_(1).repeat_interleave(group, 0)
        for h in range(kv_heads):
            tokens, own = slice(start, start + length), slice(h * group, (h + 1) * group)
            scores = torch.empty(length * group, length)
            cpu_kernels().qmatmul_out(q[tokens, own].reshape(length * group, -1),
                                      [k[tokens, h].to(torch.bfloat16).view(torch.uint8)], [BF16], scores)
            probs = torch.softmax(scores.mul_(scale).add_(above), dim=-1).to(torch.bfloat16)
            out[tokens, own] = (probs @ v[tokens, h].to(torch.bfloat16)).view(length, group, v_dim)
    return out


@pytest.mark.skipif(cpu_kernels() is None, reason="the batched scores are our kernels' product")
@pytest.mark.parametrize("threads", [1, 2])
def test_batched_scores_equal_one_qmatmul_call_each(threads):
    """qmatmul_bf16_batched_out: every (sequence, KV head) product in one call, bit for bit the
    per-product qmatmul_out, also where m is no multiple of a tile (16) and n of a strip (32)."""
    kernels, before = cpu_kernels(), torch.get_num_threads()
    g = torch.Generator().manual_seed(3)
    torch.set_num_threads(threads)
    try:
        for products, m, n, k in ((5, 27, 40, 64), (16, 512, 128, 256), (1, 3, 7, 32), (3, 0, 8, 32)):
            x = torch.randn(products, m, k, generator=g)
            keys = torch.randn(products, n, k, generator=g).to(torch.bfloat16)
            out = torch.full((products, m, n), float("nan"))
            kernels.qmatmul_bf16_batched_out(x, keys, out)
            for p in range(products):
                expected = torch.empty(m, n)
                kernels.qmatmul_out(x[p], [keys[p].view(torch.uint8)], [BF16], expected)
                assert torch.equal(out[p], expected)
        # causal (queries of `group` rows each against their prompt's keys): every visible score the
        # same, bit for bit; the skipped tiles 0 (all under the mask), the others as computed
        for group, length in ((4, 128), (3, 40), (1, 100)):
            x = torch.randn(2, length * group, 64, generator=g)
            keys = torch.randn(2, length, 64, generator=g).to(torch.bfloat16)
            full, causal = torch.empty(2, length * group, length), torch.full((2, length * group, length), float("nan"))
            kernels.qmatmul_bf16_batched_out(x, keys, full)
            kernels.qmatmul_bf16_batched_out(x, keys, causal, group)
            visible = (torch.arange(length)[None, :] <= torch.arange(length * group)[:, None] // group).expand_as(full)
            assert torch.equal(causal[visible], full[visible])
            assert ((causal == full) | (causal == 0))[~visible].all() and (causal == 0).any()
        # fp32 keys, strided (one KV head of two), rounded to bf16 as they are read: the same bits
        x, keys = torch.randn(3, 20, 64, generator=g), torch.randn(3, 40, 2, 64, generator=g)[:, :, 1]
        out, expected = torch.empty(3, 20, 40), torch.empty(3, 20, 40)
        kernels.qmatmul_bf16_batched_out(x, keys, out)
        kernels.qmatmul_bf16_batched_out(x, keys.to(torch.bfloat16).contiguous(), expected)
        assert torch.equal(out, expected)
        with pytest.raises(RuntimeError, match="keys must be bf16 or fp32"):
            kernels.qmatmul_bf16_batched_out(torch.randn(2, 4, 32), torch.randn(2, 8, 32).half(), torch.empty(2, 4, 8))
        with pytest.raises(RuntimeError, match="out must be contiguous fp32"):
            kernels.qmatmul_bf16_batched_out(torch.randn(2, 4, 32), torch.randn(2, 8, 32).bfloat16(), torch.empty(2, 8, 4))
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(cpu_kernels() is None, reason="the short prompts' scores are our kernels' product")
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_short_prompts_equal_the_per_pair_path_into_any_out(kv_heads):
    """One scores call per pass, the kept mask and the values' product written straight into a bf16
    out (one KV head): bit for bit the per-(sequence, head) path, returned or written into bf16 or
    fp32 out."""
    g = torch.Generator().manual_seed(4)
    n, length, heads, dim = 3, 40, 4, 64
    q = torch.randn(n * length, heads, dim, generator=g)
    k, v = (torch.randn(n * length, kv_heads, dim, generator=g) for _ in range(2))
    expected = per_pair_reference(q, k, v, length, 0.125)
    assert torch.equal(attention._attend_short_prompts(q, k, v, length, 0.125), expected)
    for dtype in (torch.bfloat16, torch.float32):
        out = torch.full((n * length + 5, heads, dim), float("nan"), dtype=dtype)
        written = attention._attend_short_prompts(q, k, v, length, 0.125, out[2 : 2 + n * length])
        assert written.data_ptr() == out[2].data_ptr() and torch.equal(out[2 : 2 + n * length], expected.to(dtype))
        assert out[:2].isnan().all() and out[2 + n * length :].isnan().all()
