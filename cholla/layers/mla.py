"""Multi-head latent attention (DeepSeek-V2/V3, GLM-4 MoE Lite) over a paged latent cache.

Keys and values come from one small latent per token: ``c = norm(x W_a)``
(``kv_lora_rank`` wide) and a rope key ``k_pe`` (``qk_rope_head_dim``) shared by
every head. Head h's key is ``[W_UK[h] c, k_pe]`` and its value ``W_UV[h] c``.
The cache stores only ``[c, k_pe]`` per token, ``kv_lora_rank + rope_dim`` numbers
instead of ``heads * (key + value dims)``.

Attention runs on the latent directly ("absorbed", as in the MLA papers and
llama.cpp): ``q_nope . (W_UK c) = (W_UK^T q_nope) . c``, so each head's query is
moved into latent space, all heads attend to the one cached ``[c, k_pe]`` per token
as multi-query attention, and the latent output is mapped up by ``W_UV`` per head
before the output projection. The V cache is a view of the first
``kv_lora_rank`` columns of the same tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from cholla.kv.kv_types import store
from cholla.layers.attention import AttentionMetadata, paged_attention
from cholla.layers.linear import DenseTensor, Linear
from cholla.layers.norm import RMSNorm
from cholla.layers.rotary import RotaryEmbedding


# The latent norms use 1e-6 whatever the model's rms_norm_eps, as DeepSeek's and
# transformers' code do (it matters for GLM-4 MoE Lite, whose rms_norm_eps is 1e-5).
LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    """HF's module names: ``q_proj`` or ``q_a_proj``/``q_a_layernorm``/``q_b_proj``,
    ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``o_proj``; ``k_b`` ``[heads, latent,
    nope]`` and ``v_b`` ``[heads, v_dim, latent]`` are ``kv_b_proj`` split per head
    (GGUF's ``attn_k_b``, ``attn_v_b``), kept dense for the per-head products."""

    def __init__(self, hidden_size: int, num_heads: int, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, q_lora_rank: int | None, rotary: RotaryEmbedding,
                 scale: float):
        super().__init__()
        self.num_heads, self.kv_lora_rank = num_heads, kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        q_dim = num_heads * (qk_nope_head_dim + qk_rope_head_dim)
        if q_lora_rank:
            self.q_a_proj = Linear(hidden_size, q_lora_rank)
            self.q_a_layernorm = RMSNorm(q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(q_lora_rank, q_dim)
        else:
            self.q_proj = Linear(hidden_size, q_dim)
        self.q_lora = bool(q_lora_rank)
        self.kv_a_proj_with_mqa = Linear(hidden_size, kv_lora_rank + qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, LATENT_NORM_EPS)
        self.k_b = DenseTensor(num_heads, kv_lora_rank, qk_nope_head_dim)
        self.v_b = DenseTensor(num_heads, v_head_dim, kv_lora_rank)
        self.o_proj = Linear(num_heads * v_head_dim, hidden_size)
        self.rotary, self.scale = rotary, scale
        self.compute_dtype = torch.float32  # of prefill attention, as in Attention

    def forward(self, x, positions, kv_cache: tuple[torch.Tensor, ...], meta: AttentionMetadata) -> torch.Tensor:
        """x: [tokens, hidden] -> [tokens, hidden]; kv_cache: ([blocks, block_size, 1, latent + rope],)."""
        tokens, latent_dim = x.shape[0], self.kv_lora_rank
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_pe = q.view(tokens, self.num_heads, -1).split((self.nope_dim, self.rope_dim), dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split((latent_dim, self.rope_dim), dim=-1)
        q_pe, k_pe = self.rotary(positions, q_pe.contiguous(), k_pe.reshape(tokens, 1, self.rope_dim))
        entry = torch.cat((self.kv_a_layernorm(latent.contiguous()).unsqueeze(1), k_pe), dim=-1)  # [tokens, 1, L + R]
        cache = kv_cache[0]
        store(cache, entry.float(), meta.slot_mapping)  # in the cache's type (a float one: paged_cache.check_kv_types)
        query = torch.cat((torch.einsum("thn,hln->thl", q_nope, self.k_b.value), q_pe), dim=-1)
        out = paged_attention(query, entry, entry[..., :latent_dim], cache, cache[..., :latent_dim], meta,
                              self.scale, prefill_dtype=self.compute_dtype, write=False)  # [tokens, heads, L]
        out = torch.einsum("thl,hvl->thv", out, self.v_b.value)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.v_dim))
