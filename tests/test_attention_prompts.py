"""Whole prompts of one length attend in one batched call (layers/attention.py's
_attend_prompt_runs): the same outputs as one call per prompt, and as a naive causal softmax."""

import torch

from cholla.layers.attention import AttentionMetadata, paged_attention

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 32, 16


def naive(q, k, v, scale, softcap=None, window=None):
    """q [L, heads, dim], k, v [L, kv_heads, dim]: fp32 causal attention, one head at a time."""
    length, out = q.shape[0], torch.empty_like(q)
    pos = torch.arange(length)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[:, None] - pos[None, :] < window
    for h in range(HEADS):
        kvh = h // (HEADS // KV_HEADS)
        scores = q[:, h] @ k[:, kvh].T * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        out[:, h] = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v[:, kvh]
    return out


def step(lengths, q, k, v, dtype, softcap=None, window=None, split=False):
    """One prefill step over whole prompts of these lengths (split: one call per prompt)."""
    caches = [torch.zeros(64, BLOCK, KV_HEADS, DIM) for _ in range(2)]
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    blocks = -(-max(lengths) // BLOCK)
    tables = torch.arange(len(lengths) * blocks).view(len(lengths), blocks)
    slots = torch.cat([tables[i, t // BLOCK] * BLOCK + t % BLOCK for i, n in enumerate(lengths)
                       for t in [torch.arange(n)]])
    if split:
        return torch.cat([step([n], q[a:b], k[a:b], v[a:b], dtype, softcap, window)
                          for n, a, b in zip(lengths, starts, starts[1:])])
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=starts, context_lens=list(lengths),
                             block_tables=tables, num_prefills=len(lengths))
    return paged_attention(q, k, v, *caches, meta, 0.2, window, softcap, prefill_dtype=dtype)


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
