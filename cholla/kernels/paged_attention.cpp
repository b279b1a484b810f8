// Decode attention straight from the paged KV cache.
//
// Each decoding sequence has one new query token per head; its keys and values
// lie in fixed-size cache blocks listed by its block table. For every (sequence,
// KV head) pair this kernel walks the blocks once: scores of the pair's query
// heads against each key, a softmax over them, and the weighted sum of values,
// in fp32. PyTorch would instead gather every sequence's whole context into a
// contiguous copy and build a mask per layer, a dozen ops per layer per step.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float sum = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {  // y += w * x
  const __m512 wv = _mm512_set1_ps(w);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += w * x[i];
}

// q: fp32 [seqs, heads, dim]; k_cache, v_cache: fp32 [blocks, block_size, kv_heads, dim];
// block_tables: int64 [seqs, max_blocks]; context_lens: int64 [seqs], the new token
// included (its key and value already written). window > 0: a key is visible only
// if fewer than `window` positions back; softcap > 0: scores -> softcap * tanh(s / softcap).
at::Tensor paged_attention_decode(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables_in, const at::Tensor& context_lens_in, double scale,
                                  int64_t window, double softcap) {
  TORCH_CHECK(q_in.dim() == 3 && q_in.scalar_type() == at::kFloat, "paged_attention_decode: q must be fp32 [seqs, heads, dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kFloat && v_cache.is_contiguous(),
              "paged_attention_decode: caches must be contiguous fp32 [blocks, block_size, kv_heads, dim]");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor block_tables = block_tables_in.to(at::kLong).contiguous();
  const at::Tensor context_lens = context_lens_in.to(at::kLong).contiguous();
  const int64_t seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && heads % kv_heads == 0, "paged_attention_decode: head shapes disagree");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == seqs && context_lens.numel() == seqs,
              "paged_attention_decode: one block table and context length per sequence");
  const int64_t group = heads / kv_heads, max_blocks = block_tables.size(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < seqs; ++s) {
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= max_blocks * block_size, "paged_attention_decode: bad context length");
    for (int64_t b = 0; b < (lens[s] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tables[s * max_blocks + b] >= 0 && tables[s * max_blocks + b] < num_blocks,
                  "paged_attention_decode: block id out of range");
  }
  at::Tensor out = at::zeros_like(q);
  const float* qs = q.data_ptr<float>();
  const float* ks = k_cache.data_ptr<float>();
  const float* vs = v_cache.data_ptr<float>();
  float* os = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale), cap = static_cast<float>(softcap);
  at::parallel_for(0, seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t s = job / kv_heads, kvh = job % kv_heads, ctx = lens[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0, n = ctx - first;
      scores.resize(group * n);
      const int64_t* table = tables + s * max_blocks;
      auto slot = [&](int64_t pos) { return (table[pos / block_size] * block_size + pos % block_size) * kv_heads + kvh; };
      for (int64_t t = 0; t < n; ++t) {
        const float* key = ks + slot(first + t) * dim;
        for (int64_t g = 0; g < group; ++g) {
          float score = dot(qs + (s * heads + kvh * group + g) * dim, key, dim) * fscale;
          if (cap > 0) score = cap * std::tanh(score / cap);
          scores[g * n + t] = score;
        }
      }
      for (int64_t g = 0; g < group; ++g) {  // softmax over this head's n scores
        float* row = scores.data() + g * n;
        float top = row[0], sum = 0;
        for (int64_t t = 1; t < n; ++t) top = std::max(top, row[t]);
        for (int64_t t = 0; t < n; ++t) sum += (row[t] = std::exp(row[t] - top));
        for (int64_t t = 0; t < n; ++t) row[t] /= sum;
      }
      for (int64_t t = 0; t < n; ++t) {
        const float* value = vs + slot(first + t) * dim;
        for (int64_t g = 0; g < group; ++g) axpy(scores[g * n + t], value, os + (s * heads + kvh * group + g) * dim, dim);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cholla, m) {
  m.def("paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(cholla, CPU, m) { m.impl("paged_attention_decode", &paged_attention_decode); }
