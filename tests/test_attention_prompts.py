"""Whole prompts of one length attend in one batched call (layers/attention.py's
_attend_prompt_runs): the same outputs as one call per prompt, and as a naive causal softmax.
Short prompts with wide heads take explicit scores (_attend_short_prompts): the same checks, and
SDPA's result within bf16's rounding."""

import pytest
import torch

from cholla.kernels import cpu_kernels
from cholla.layers import attention
from cholla.layers.attention import AttentionMetadata, paged_attention

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 32, 16


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
