"""Self-attention over a paged KV cache.

Every step, the new tokens' keys and values are written into their cache
slots (``slot_mapping``), then each query attends to its sequence's keys read
back through the sequence's ``block_table``. Sequences that decode one token
share one batched call; prefill chunks (which may follow a cached prefix) run
one call each, with a causal mask offset by the tokens already cached (whole
prompts of one length side by side in one call; short ones with wide heads
through explicit scores, ``_attend_short_prompts``). A step
whose sequences are decodes and speculating decodes verifying their drafts
(``MAX_QUERY_SPAN`` tokens at most) runs every row through the decode kernel
instead, each row seeing the keys up to its own position as written in the cache
(a prompt chunk's rows keep attending to each other as computed: the runner sets
spans only for drafts); a speculative token tree (``speculative/tree.py``) takes
the prefill path, with a mask that lets each drafted node see the context and its own
ancestors only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cholla.kernels import amx_tiles, cpu_kernels
from cholla.kv.kv_types import (
    ScaledKV,
    gather,
    gather_stored,
    hadamard,
    head_dim,
    kernel_parts,
    open_for_write,
    store,
)
from cholla.layers.linear import DenseTensor, Linear, linear_group
from cholla.layers.norm import RMSNorm
from cholla.layers.rotary import RotaryEmbedding


# Rows of one sequence a decode-kernel step takes: a speculating sequence's last token
# and up to 16 drafts (cholla/speculative/config.py's MAX_SPECULATIVE_TOKENS).
MAX_QUERY_SPAN = 17


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the batch and in the cache.

    Tokens are packed sequence after sequence: prefill chunks first, then
    decodes (one token each).
    """

    slot_mapping: torch.Tensor  # [tokens] flat cache slot of each new token
    query_start_loc: list[int]  # [seqs + 1] offsets of each sequence's tokens
    context_lens: list[int]  # [seqs] cached tokens after this step, per sequence
    block_tables: torch.Tensor  # [seqs, max_blocks] block ids, padded with 0
    num_prefills: int  # the first num_prefills sequences are prefill chunks
    decode_context_lens: torch.Tensor | None = None  # [decodes] as a tensor, for masking
    # Models with recurrent layers: [seqs] the state-cache slot of each sequence (kv/state_cache.py).
    state_slots: torch.Tensor | None = None
    # Steps with prefill chunks where every sequence has at most MAX_QUERY_SPAN tokens: int64
    # [seqs + 1] query_start_loc and [seqs] context_lens as tensors, for the decode kernels.
    span_starts: torch.Tensor | None = None
    span_context_lens: torch.Tensor | None = None
    # Prefill-style sequences verifying a token tree, by place in the batch.
    trees: dict[int, TreeRows] | None = None


@dataclass
class TreeRows:
    """A sequence's rows that verify a token tree: its last token and the drafted nodes, written
    to consecutive cache slots after the context but placed at ``positions`` (the root's plus
    the node's depth), each seeing the context and the rows ``ancestors`` allows."""

    positions: torch.Tensor  # [rows]
    ancestors: torch.Tensor  # [rows, rows] bool: row i may see row j

    def mask(self, context_len: int, window: int | None) -> torch.Tensor:
        """``[rows, context_len]`` bool over the sequence's cache slots (the rows' own are last)."""
        rows = self.positions.shape[0]
        key_positions = torch.cat((torch.arange(context_len - rows), self.positions))
        mask = _allowed(self.positions[:, None], key_positions[None, :], window)
        mask[:, context_len - rows :] &= self.ancestors
        return mask


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask: key at k_pos is visible from query at q_pos (causal, optional window)."""
    mask = k_pos <= q_pos
    if window is not None:
        mask &= q_pos - k_pos < window
    return mask


def _attend(q, k, v, mask, scale: float, softcap: float | None, dtype: torch.dtype = torch.float32,
            sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q: [b, heads, q_len, dim]; k, v: [b, kv_heads, k_len, dim]; mask: bool, broadcastable,
    or None for plain causal attention over a whole prompt (q_len == k_len), which
    SDPA's flash kernel runs without a mask, skipping the blocks above the diagonal.

    ``dtype``: what SDPA computes in (bfloat16 is 3-4x faster for a 512-token
    prefill here); the result comes back in q's dtype. Soft-capped scores stay fp32.
    Inputs must be 4-D: with 3-D ones SDPA drops to its unfused path (every
    score materialized in fp32, then ``where`` and ``softmax``), 7x slower.

    ``sinks`` ([heads], GPT-OSS): one more logit per head in the softmax's
    denominator, attached to no value, so a head can attend to nothing.
    """
    if softcap is None and sinks is None:
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, scale=scale,
                                             is_causal=mask is None, enable_gqa=True)
        return out.to(q.dtype)
    if mask is None:
        positions = torch.arange(q.shape[2])
        mask = _allowed(positions[:, None], positions[None, :], None)
    k, v = k.to(q.dtype), v.to(q.dtype)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    prefill_dtype: torch.dtype = torch.float32,
    sinks: torch.Tensor | None = None,
    write: bool = True,
    keep_bf16: bool = False,
) -> torch.Tensor:
    """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]; caches: [blocks, block_size, kv_heads, dim]
    (any ``cholla/kv/kv_types.py`` type: read back as fp32).

    Returns [tokens, heads, v's dim]. Prefill chunks attend in ``prefill_dtype``.
    ``write=False``: the caller has written k and v into the caches already
    (latent attention, whose V cache is a view into its K cache). ``keep_bf16``: where every
    sequence is a whole prompt that ``_attend_short_prompts`` serves, the result stays in bf16
    as that path computes it, for a consumer that would round it to bf16 anyway (the output
    projection's bf16 product).
    """
    block_size = k_cache.shape[1]
    if write:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    if meta.num_prefills == 0:  # a decode-only step: no output to assemble
        return attend_decodes(q, k_cache, v_cache, meta.block_tables, meta.decode_context_lens, scale, window, softcap,
                              sinks)
    if meta.span_starts is not None and _kernel_attends(q, k_cache, v_cache, sinks):  # short spans only
        (k_values, v_values), quant = _kernel_caches(k_cache, v_cache)
        return cpu_kernels().paged_attention_decode(q, k_values, v_values, meta.block_tables, meta.span_context_lens,
                                                    scale, window or 0, softcap or 0.0, **quant,
                                                    query_starts=meta.span_starts)
    bf16 = keep_bf16 and len(meta.context_lens) == meta.num_prefills and all(
        _short_prompts(q, k, _whole_prompt(meta, i, window), softcap, prefill_dtype, sinks)
        for i in range(meta.num_prefills))
    out = q.new_empty(*q.shape[:-1], v.shape[-1], dtype=torch.bfloat16 if bf16 else q.dtype)
    starts = meta.query_start_loc
    done = _attend_prompt_runs(q, k, v, out, meta, scale, window, softcap, prefill_dtype, sinks)

    for i in range(meta.num_prefills):
        start, stop, ctx = starts[i], starts[i + 1], meta.context_lens[i]
        q_len = stop - start
        if i in done:
            continue
        queries = q[start:stop].transpose(0, 1)[None]
        fold_v = False
        if q_len == ctx:  # a whole prompt in one chunk: its keys are the new ones, no cache reads
            keys, values = k[start:stop].transpose(0, 1), v[start:stop].transpose(0, 1)
        else:
            blocks = meta.block_tables[i, : (ctx + block_size - 1) // block_size]
            # Rotated sides are read as stored and their rotation folded into the queries and
            # outputs (_fold_queries, _unfold_outputs): once per chunk token, not per cached one;
            # folding keys drops a constant per query from its scores, values assume weights that
            # sum to 1: only where that is exact (sinks take some of the weight).
            fold_k = _rotated(k_cache) and softcap is None and sinks is None
            fold_v = _rotated(v_cache) and sinks is None
            keys = (gather_stored if fold_k else gather)(k_cache, blocks).flatten(0, 1)[:ctx].transpose(0, 1)
            values = (gather_stored if fold_v else gather)(v_cache, blocks).flatten(0, 1)[:ctx].transpose(0, 1)
            if fold_k:
                queries = _fold_queries(queries, k_cache)
        if meta.trees and i in meta.trees:
            mask = meta.trees[i].mask(ctx, window)
        elif q_len == ctx and (window is None or window >= ctx):
            mask = None  # causal over the whole prompt
        else:
            mask = _allowed(torch.arange(ctx - q_len, ctx)[:, None], torch.arange(ctx)[None, :], window)
        attended = _attend(queries, keys[None], values[None], mask, scale, softcap, prefill_dtype, sinks)
        if fold_v:
            attended = _unfold_outputs(attended, v_cache)
        out[start:stop] = attended[0].transpose(0, 1)

    if len(meta.context_lens) > meta.num_prefills:
        first = starts[meta.num_prefills]
        tables = meta.block_tables[meta.num_prefills :]
        out[first:] = attend_decodes(q[first:], k_cache, v_cache, tables, meta.decode_context_lens, scale, window, softcap,
                                     sinks)
    return out


def _whole_prompt(meta: AttentionMetadata, i: int, window: int | None) -> int:
    """Prefill i's length when it is a whole prompt in one chunk under a plain causal mask, else 0."""
    q_len, ctx = int(meta.query_start_loc[i + 1] - meta.query_start_loc[i]), int(meta.context_lens[i])
    plain = q_len == ctx and (window is None or window >= ctx) and not (meta.trees and i in meta.trees)
    return q_len if plain else 0


def _attend_prompt_runs(q, k, v, out, meta: AttentionMetadata, scale: float, window: int | None,
                        softcap: float | None, dtype: torch.dtype, sinks: torch.Tensor | None) -> set[int]:
    """Attend runs of adjacent whole prompts of one length in one call (a batch of [n, heads, L, dim]
    views of q, k, v), writing ``out``; returns the prefills done. The same sums per sequence as one
    call each (bitwise, SDPA's batch entries are independent), without a call per sequence:
    32 prompts of 128 tokens on Gemma 3 attend ~15% faster. Short prompts with wide heads
    (``_short_prompts``) take explicit scores instead, a run of one prompt too, so that a
    prompt's result does not depend on its neighbours."""
    starts, done, i = meta.query_start_loc, set(), 0
    while i < meta.num_prefills:
        length, j = _whole_prompt(meta, i, window), i + 1
        while length and j < meta.num_prefills and _whole_prompt(meta, j, window) == length:
            j += 1
        short = length and _short_prompts(q, k, length, softcap, dtype, sinks)
        if j - i > 1 or short:
            start, stop = int(starts[i]), int(starts[j])
            if short:
                _attend_short_prompts(q[start:stop], k[start:stop], v[start:stop], length, scale, out[start:stop])
            else:
                rows = lambda x: x[start:stop].unflatten(0, (j - i, length)).transpose(1, 2)  # [n, heads, L, dim]
                attended = _attend(rows(q), rows(k), rows(v), None, scale, softcap, dtype, sinks)
                out[start:stop] = attended.transpose(1, 2).flatten(0, 1)
            done.update(range(i, j))
        i = j
    return done


# Whole prompts of at most SHORT_PROMPT_HEAD_DIMS x head_dim tokens, with heads of at least
# SHORT_PROMPT_MIN_HEAD_DIM, attend through explicit scores (_attend_short_prompts): on Zen 5
# without AMX, one thread, SDPA's bf16 flash kernel took 2.7-3.0x as long for Gemma 3's heads
# (dim 256, 4 per KV head) at 128-512 tokens, 1.7-2.4x for dim 128 at 128-256 tokens, 1.5-1.7x for
# SmolLM2's (dim 64, 3 per KV head) at 128 (benchmarks/prompt_attention.py); past these lengths
# (all scores computed, none skipped above the diagonal) it was sometimes as fast or faster.
# With AMX tiles (SDPA's flash kernel runs on them) it was never measured: SDPA stays there.
SHORT_PROMPT_MIN_HEAD_DIM = 64
SHORT_PROMPT_HEAD_DIMS = 2
# Sequences whose scores one pass holds (fp32, [heads x L, L] each): at most ~8 MiB of them.
SHORT_PROMPT_SCORE_BYTES = 8 << 20


def _short_prompts(q, k, length: int, softcap: float | None, dtype: torch.dtype, sinks) -> bool:
    """Whether whole prompts of ``length`` tokens (0: not a whole prompt) take ``_attend_short_prompts``."""
    dim = q.shape[-1]
    return (length > 0 and dtype == torch.bfloat16 and softcap is None and sinks is None and q.dtype == torch.float32
            and k.shape[-1] == dim and dim % 32 == 0 and dim >= SHORT_PROMPT_MIN_HEAD_DIM
            and length <= SHORT_PROMPT_HEAD_DIMS * dim and cpu_kernels() is not None and not amx_tiles())


def _attend_short_prompts(q, k, v, length: int, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention within each of n whole prompts of ``length`` tokens: q [n L, heads, dim],
    k, v [n L, kv_heads, dim] (fp32) -> [n L, heads, v's dim] in bf16, as SDPA gives it in bf16,
    or written into ``out`` (bf16 or fp32, that shape) and returned.

    As SDPA computes in bf16: scores of bf16 q and k summed in fp32 (``qmatmul``'s bf16 product
    with the keys as its weight rows, all of a KV head's queries at once, every sequence and KV
    head in one kernel call, which skips the query tiles that see none of a 32-key strip and writes
    0 there, under the mask's -inf), an fp32 softmax, then the probabilities and values in bf16
    (oneDNN's batched matmul, straight into a bf16 ``out`` where there is one KV head: its layout
    is the result's). Every score is computed, the ones above the diagonal too, which is what
    limits it to short prompts."""
    kernels = cpu_kernels()
    n, heads, dim = q.shape[0] // length, q.shape[1], q.shape[2]
    kv_heads, v_dim = k.shape[1], v.shape[2]
    group = heads // kv_heads
    # A KV head's queries as [L x group, dim] rows (views when there is one KV head).
    queries = q.reshape(n, length, kv_heads, group, dim).transpose(1, 2).reshape(n, kv_heads, length * group, dim)
    keys = k.reshape(n, length, kv_heads, dim).transpose(1, 2)  # fp32, rounded to bf16 as the kernel reads them
    values = v.reshape(n, length, kv_heads, v_dim).transpose(1, 2).to(torch.bfloat16).contiguous()
    above = _above_diagonal(length, group)
    direct = out is not None and kv_heads == 1 and out.dtype == torch.bfloat16 and out.is_contiguous()
    result = out.view(n, kv_heads, length * group, v_dim) if direct else \
        torch.empty(n, kv_heads, length * group, v_dim, dtype=torch.bfloat16)
    step = max(1, SHORT_PROMPT_SCORE_BYTES // (kv_heads * length * group * length * 4))
    for first in range(0, n, step):
        last = min(first + step, n)
        scores = torch.empty(last - first, kv_heads, length * group, length)
        kernels.qmatmul_bf16_batched_out(queries[first:last].flatten(0, 1), keys[first:last].flatten(0, 1),
                                         scores.flatten(0, 1), group)  # tiles above the diagonal: 0, masked
        # above + scale * scores in one pass: where above is 0, the product rounded once, as a
        # multiply then an add of 0 gives it (a zero's sign aside); -inf where it is -inf
        probs = torch.softmax(torch.add(above, scores, alpha=scale, out=scores), dim=-1).to(torch.bfloat16)
        torch.bmm(probs.flatten(0, 1), values[first:last].flatten(0, 1), out=result[first:last].flatten(0, 1))
    if direct:
        return out
    attended = result.view(n, kv_heads, length, group, v_dim).transpose(1, 2).reshape(n * length, heads, v_dim)
    return attended if out is None else out.copy_(attended)


@functools.lru_cache(maxsize=8)
def _above_diagonal(length: int, group: int) -> torch.Tensor:
    """-inf above the diagonal, [L x group, L] (each query row ``group`` times), added to a prompt's
    scores (``masked_fill_`` took twice as long); read only, kept for the next layer's prompts."""
    return torch.full((length, length), float("-inf")).triu_(1).repeat_interleave(group, 0)


def _rotated(cache) -> bool:
    return isinstance(cache, ScaledKV) and cache.rotated


def _per_head(stat: torch.Tensor, heads: int) -> torch.Tensor:
    """[kv_heads, dim] statistics -> [1, heads, 1, dim], each KV head's for its query heads."""
    return stat.repeat_interleave(heads // stat.shape[0], dim=0)[None, :, None]


def _fold_queries(queries: torch.Tensor, k_cache: ScaledKV) -> torch.Tensor:
    """queries [1, heads, q_len, dim] against stored keys k' (k = spread * (H k') + shift):
    q . k = (H (spread * q)) . k' + q . shift, the last term the same for every key (dropped)."""
    if k_cache.spread is not None:
        queries = queries * _per_head(k_cache.spread, queries.shape[1])
    return queries @ hadamard(queries.shape[-1])


def _unfold_outputs(attended: torch.Tensor, v_cache: ScaledKV) -> torch.Tensor:
    """Weighted sums of stored values v' back to values' space: the weights sum to 1, so
    sum p (spread * (H v') + shift) = spread * (H sum p v') + shift."""
    attended = attended @ hadamard(attended.shape[-1])
    if v_cache.spread is not None:
        heads = attended.shape[1]
        attended = attended * _per_head(v_cache.spread, heads) + _per_head(v_cache.shift, heads)
    return attended


def kernel_reads(k_cache, v_cache) -> bool:
    """Whether our C++ kernels read (and write) these caches: any ``kv_types`` type, contiguous,
    K and V (their types may differ) alike in blocks, heads and head_dim (a latent cache's V, a
    narrower view of its K, is not)."""
    return (kernel_parts(k_cache) is not None and kernel_parts(v_cache) is not None
            and k_cache.shape[:-1] == v_cache.shape[:-1] and head_dim(k_cache) == head_dim(v_cache))


def _kernel_caches(k_cache, v_cache) -> tuple:
    """(k values, v values) and, as keywords, the sides' quantization for the kernels."""
    k_values, k_quant, k_rotated = kernel_parts(k_cache)
    v_values, v_quant, v_rotated = kernel_parts(v_cache)
    return (k_values, v_values), {"k_quant": k_quant, "v_quant": v_quant, "k_rotated": k_rotated, "v_rotated": v_rotated}


def _kernel_attends(q, k_cache, v_cache, sinks) -> bool:
    return cpu_kernels() is not None and sinks is None and q.dtype == torch.float32 and kernel_reads(k_cache, v_cache)


def attend_decodes(q, k_cache, v_cache, block_tables, context_lens, scale, window=None, softcap=None,
                   sinks=None) -> torch.Tensor:
    """One new token per sequence (q: [decodes, heads, dim]), by our kernel where it runs (it has no sinks)."""
    if _kernel_attends(q, k_cache, v_cache, sinks):
        (k_values, v_values), quant = _kernel_caches(k_cache, v_cache)
        return cpu_kernels().paged_attention_decode(q, k_values, v_values, block_tables, context_lens, scale, window or 0,
                                                    softcap or 0.0, **quant)
    return decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, window, softcap, sinks)


def span_attention(q, k_cache, v_cache, block_tables, context_lens, query_starts, scale, window=None, softcap=None,
                   sinks=None) -> torch.Tensor:
    """Each sequence's last ``q_len`` positions (q: [rows, heads, dim], ``query_starts`` [seqs + 1]),
    causal among themselves, in PyTorch ops: row i of a span is a decode with the first
    ``context_len - q_len + i + 1`` keys. The reference for the kernel's ``query_starts``."""
    q_lens = query_starts[1:] - query_starts[:-1]
    seq = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens)
    rank = torch.arange(q.shape[0]) - query_starts[:-1][seq]
    visible = context_lens[seq] - q_lens[seq] + rank + 1
    return decode_attention(q, k_cache, v_cache, block_tables[seq], visible, scale, window, softcap, sinks)


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """This step's keys and values (fp32 [tokens, kv_heads, dim]) into their cache slots, in the cache's type."""
    kernels = cpu_kernels()
    if kernels is not None and k.dtype == v.dtype == torch.float32 and kernel_reads(k_cache, v_cache):
        (k_values, v_values), quant = _kernel_caches(k_cache, v_cache)
        open_for_write(k_cache, slot_mapping)  # q4_kivi keys: the blocks' open slots, as store takes them
        kernels.write_kv(k, v, k_values, v_values, slot_mapping, **quant)
        return
    store(k_cache, k.float(), slot_mapping)
    store(v_cache, v.float(), slot_mapping)


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, window=None, softcap=None,
                     sinks=None) -> torch.Tensor:
    """One new token per sequence, in PyTorch ops: q [decodes, heads, dim] -> [decodes, heads, dim].

    Gathers each sequence's blocks into one padded tensor and masks the padding;
    ``cholla.kernels`` does the same without the copies where it runs.
    """
    block_size = k_cache.shape[1]
    max_ctx = int(context_lens.max())
    tables = block_tables[:, : (max_ctx + block_size - 1) // block_size]
    keys = gather(k_cache, tables, q.dtype).flatten(1, 2)[:, :max_ctx].transpose(1, 2)
    values = gather(v_cache, tables, q.dtype).flatten(1, 2)[:, :max_ctx].transpose(1, 2)
    k_pos = torch.arange(max_ctx)[None, :]
    q_pos = (context_lens - 1)[:, None]
    mask = _allowed(q_pos, k_pos, window)[:, None, None, :]  # [decodes, 1, 1, max_ctx]
    return _attend(q.unsqueeze(2), keys, values, mask, scale, softcap, sinks=sinks).squeeze(2)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, optional QKV bias and QK-norm.

    Variants: ``qk_norm="head"`` normalises each head (Qwen 3, Gemma 3), ``"full"``
    the whole q and k projections (OLMoE); ``sinks`` adds GPT-OSS's learned
    per-head softmax logit; ``output_bias`` a bias on the output projection;
    ``output_gate`` (Qwen3-Next, Qwen 3.5) makes ``q_proj`` give each head its query
    and then a gate, and scales the head's output by ``sigmoid(gate)``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        scale: float,
        bias: bool = False,
        qk_norm_eps: float | None = None,
        window: int | None = None,
        softcap: float | None = None,
        qk_norm: str = "head",
        sinks: bool = False,
        output_bias: bool = False,
        output_gate: bool = False,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.output_gate = output_gate
        self.q_proj = Linear(hidden_size, num_heads * head_dim * (2 if output_gate else 1), bias)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, bias)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, bias)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, output_bias)
        self.qk_norm_full = qk_norm == "full"
        q_dim, k_dim = (num_heads * head_dim, num_kv_heads * head_dim) if self.qk_norm_full else (head_dim, head_dim)
        self.q_norm = RMSNorm(q_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(k_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.sinks = DenseTensor(num_heads) if sinks else None
        self.rotary, self.scale, self.window, self.softcap = rotary, scale, window, softcap
        self.compute_dtype = torch.float32  # of prefill attention; the loader sets bfloat16 with the matmuls

    def forward(self, x, positions, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        """x: [tokens, hidden] -> [tokens, hidden]."""
        tokens = x.shape[0]
        q, k, v = linear_group((self.q_proj, self.k_proj, self.v_proj), x)
        if self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        gate = None
        if self.output_gate:  # per head: head_dim of query, then head_dim of gate
            q, gate = q.view(tokens, self.num_heads, 2 * self.head_dim).split(self.head_dim, dim=-1)
            q = q.contiguous()
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and not self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window, self.softcap,
                              self.compute_dtype, None if self.sinks is None else self.sinks.value, keep_bf16=True)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))
