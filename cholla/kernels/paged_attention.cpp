// Decode attention straight from the paged KV cache, and the cache writes.
//
// Each decoding sequence has one new query token per head; its keys and values
// lie in fixed-size cache blocks listed by its block table. For every (sequence,
// KV head) pair this kernel walks the blocks once: scores of the pair's query
// heads against each key, a softmax over them, and the weighted sum of values,
// in fp32. A sequence verifying drafted tokens (speculative decoding) brings a
// short span of query rows instead, its last q_len positions, causal within the
// span: its row i sees the first context_len - q_len + i + 1 keys. Each row is
// then attended as a decode of its own (the span's keys are read once per row,
// from cache: spans are a few rows). PyTorch would instead gather every
// sequence's whole context into a contiguous copy and build a mask per layer, a
// dozen ops per layer per step.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "simd.h"
#include "ops.h"

namespace {

// The cache holds fp32 or bfloat16 (raw uint16); both load as 16 fp32 lanes.
inline __m512 load16(const float* p, __mmask16 live) { return _mm512_maskz_loadu_ps(live, p); }
inline __m512 load16(const uint16_t* p, __mmask16 live) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p)), 16));
}

// Query heads per KV head this kernel handles (grouped-query attention); more is refused.
constexpr int64_t MAX_GROUP = 16;

// Keys (and their values) are prefetched this many positions ahead.
constexpr int64_t AHEAD = 8;

// A sequence's positions, walked one by one through its block table: the
// cache slot of each without a division per position (a run-time block size
// made it two integer divisions per key, a third of a short context's time).
struct SlotCursor {
  const int64_t* table;
  int64_t block_size, block, offset;
  SlotCursor(const int64_t* table, int64_t block_size, int64_t position)
      : table(table), block_size(block_size), block(position / block_size), offset(position % block_size) {}
  int64_t slot() const { return table[block] * block_size + offset; }
  void next() {
    if (++offset == block_size) {
      offset = 0;
      ++block;
    }
  }
};

// row[0..n) <- softmax(row[0..n)), 16 lanes at a time (a masked tail).
inline void softmax(float* row, int64_t n) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 live = lanes(n - t);
    top = _mm512_mask_max_ps(top, live, top, _mm512_maskz_loadu_ps(live, row + t));
  }
  const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 live = lanes(n - t);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, row + t), max));
    sum = _mm512_mask_add_ps(sum, live, sum, e);
    _mm512_mask_storeu_ps(row + t, live, e);
  }
  const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 live = lanes(n - t);
    _mm512_mask_storeu_ps(row + t, live, _mm512_mul_ps(_mm512_maskz_loadu_ps(live, row + t), inverse));
  }
}

// One (sequence, KV head) pair: the scores of its `group` query heads against
// each key, a softmax over them, and the weighted sum of values. GROUP > 0 fixes
// the group size at compile time, so the per-head accumulators stay in
// registers (with a run-time count they spilled to the stack: 5x slower);
// GROUP == 0 serves any size up to MAX_GROUP.
template <typename T, int GROUP>
void attend_pair(const float* q, const T* ks, const T* vs, float* o, const int64_t* table, int64_t first, int64_t n,
                 int64_t run_time_group, int64_t kv_heads, int64_t kvh, int64_t dim, int64_t block_size, float scale,
                 float cap, std::vector<float>& scores) {
  const int64_t group = GROUP > 0 ? GROUP : run_time_group;
  constexpr int64_t SLOTS = GROUP > 0 ? GROUP : MAX_GROUP;
  scores.resize(group * n);
  auto row = [&](const SlotCursor& cursor) { return (cursor.slot() * kv_heads + kvh) * dim; };
  // Scores: each key is loaded (and widened from bf16) once, 16 lanes at a time,
  // for all the query heads that share it.
  SlotCursor key_at(table, block_size, first), ahead_at(table, block_size, first + AHEAD);
  for (int64_t t = 0; t < n; ++t, key_at.next(), ahead_at.next()) {
    const T* key = ks + row(key_at);
    if (t + AHEAD < n) {  // the cache rows are scattered over blocks: ask for them early
      const int64_t ahead = row(ahead_at);
      for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(T)); b += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(ks + ahead) + b, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(vs + ahead) + b, _MM_HINT_T1);
      }
    }
    __m512 acc[SLOTS];
    for (int64_t g = 0; g < group; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
      const __mmask16 live = lanes(dim - d);
      const __m512 k = load16(key + d, live);
      for (int64_t g = 0; g < group; ++g)
        acc[g] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, q + g * dim + d), k, acc[g]);
    }
    for (int64_t g = 0; g < group; ++g) {
      float score = _mm512_reduce_add_ps(acc[g]) * scale;
      if (cap > 0) score = cap * std::tanh(score / cap);
      scores[g * n + t] = score;
    }
  }
  for (int64_t g = 0; g < group; ++g) softmax(scores.data() + g * n, n);
  // Weighted values: a 64-wide slice of every head's output stays in registers
  // while the positions stream by, each value slice loaded once for all heads.
  for (int64_t d0 = 0; d0 < dim; d0 += 64) {
    __m512 out[SLOTS][4];
    for (int64_t g = 0; g < group; ++g)
      for (int j = 0; j < 4; ++j) out[g][j] = _mm512_setzero_ps();
    SlotCursor value_at(table, block_size, first);
    for (int64_t t = 0; t < n; ++t, value_at.next()) {
      const T* value = vs + row(value_at) + d0;
      __m512 v[4];
      for (int j = 0; j < 4; ++j) v[j] = load16(value + 16 * j, lanes(dim - d0 - 16 * j));
      for (int64_t g = 0; g < group; ++g) {
        const __m512 w = _mm512_set1_ps(scores[g * n + t]);
        for (int j = 0; j < 4; ++j) out[g][j] = _mm512_fmadd_ps(w, v[j], out[g][j]);
      }
    }
    for (int64_t g = 0; g < group; ++g)
      for (int j = 0; j < 4 && d0 + 16 * j < dim; ++j)
        _mm512_mask_storeu_ps(o + g * dim + d0 + 16 * j, lanes(dim - d0 - 16 * j), out[g][j]);
  }
}

// A step's work is cut into jobs of (query row, KV head, part of its query
// heads). With fewer pairs than two per thread each pair's heads are split in
// two, so that one sequence keeps both cores busy (Gemma 3 has one KV head:
// unsplit, its attention ran on one core); its keys are then read twice, from cache.
int64_t attention_parts(int64_t rows, int64_t kv_heads, int64_t group, int64_t threads) {
  return rows * kv_heads < 2 * threads && group > 1 ? 2 : 1;
}

// Query rows of a step: row r belongs to sequence seq[r], and sees the first
// visible(r) keys of it. Without query starts each sequence has one row.
struct QueryRows {
  std::vector<int64_t> seq, ends;  // empty: row r is sequence r
  int64_t sequence(int64_t r) const { return seq.empty() ? r : seq[r]; }
  // The span's last row sees the whole context; each row before it one key fewer.
  int64_t visible(int64_t r, const int64_t* lens) const {
    return seq.empty() ? lens[r] : lens[seq[r]] - (ends[seq[r]] - 1 - r);
  }
};

// Jobs [begin, end) of a decode step (parts per pair: attention_parts).
template <typename T>
void attend_decode(const float* qs, const T* ks, const T* vs, float* os, const int64_t* tables, const int64_t* lens,
                   const QueryRows& rows, int64_t begin, int64_t end, int64_t parts, int64_t heads, int64_t kv_heads,
                   int64_t dim, int64_t block_size, int64_t max_blocks, float scale, int64_t window, float cap) {
  const int64_t group = heads / kv_heads, per_part = (group + parts - 1) / parts;
  std::vector<float> scores;
  for (int64_t job = begin; job < end; ++job) {
    const int64_t pair = job / parts, r = pair / kv_heads, kvh = pair % kv_heads;
    const int64_t s = rows.sequence(r), ctx = rows.visible(r, lens);
    const int64_t head = kvh * group + job % parts * per_part, count = std::min(per_part, (kvh + 1) * group - head);
    if (count <= 0) continue;
    // Group sizes of real models (Gemma 3 270M: 4; SmolLM2: 3; Llama 3: 4; Qwen 3: 2, 4...) get their own copy.
    const auto attend = count == 1 ? attend_pair<T, 1> : count == 2 ? attend_pair<T, 2> : count == 3 ? attend_pair<T, 3>
                      : count == 4 ? attend_pair<T, 4> : attend_pair<T, 0>;
    const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
    attend(qs + (r * heads + head) * dim, ks, vs, os + (r * heads + head) * dim, tables + s * max_blocks, first,
           ctx - first, count, kv_heads, kvh, dim, block_size, scale, cap, scores);
  }
}

// Rounds fp32 to bfloat16, nearest even (as at::BFloat16 does; NaN stays NaN).
inline void store_row(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = lanes(n - i);
    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(live, src + i));
    _mm256_mask_storeu_epi16(dst + i, live, (__m256i)packed);
  }
}
inline void store_row(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

template <typename T>
void scatter_rows(const at::Tensor& src, T* cache, const int64_t* slots, int64_t tokens, int64_t row) {
  const float* data = src.data_ptr<float>();
  const int64_t stride = src.stride(0);
  at::parallel_for(0, tokens, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(row, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) store_row(cache + slots[t] * row, data + t * stride, row);
  });
}

void check_new_rows(const at::Tensor& x, int64_t tokens, int64_t kv_heads, int64_t dim) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(0) == tokens && x.size(1) == kv_heads &&
                  x.size(2) == dim && x.stride(2) == 1 && x.stride(1) == dim,
              "write_kv: k and v must be fp32 [tokens, kv_heads, dim] with contiguous heads");
}

// The step's query rows (query_starts: int64 [seqs + 1], each sequence's first row, then the row count).
QueryRows query_rows(const std::optional<at::Tensor>& query_starts, int64_t rows, const int64_t* lens, int64_t seqs) {
  QueryRows out;
  if (!query_starts) {
    TORCH_CHECK(rows == seqs, "paged_attention_decode: one block table and context length per sequence");
    return out;
  }
  const at::Tensor starts_tensor = query_starts->to(at::kLong).contiguous();
  TORCH_CHECK(starts_tensor.numel() == seqs + 1, "paged_attention_decode: query_starts needs one entry per sequence and one more");
  const int64_t* starts = starts_tensor.data_ptr<int64_t>();
  TORCH_CHECK(starts[0] == 0 && starts[seqs] == rows, "paged_attention_decode: query_starts must run from 0 to the row count");
  out.seq.resize(rows);
  out.ends.assign(starts + 1, starts + seqs + 1);
  for (int64_t s = 0; s < seqs; ++s) {
    TORCH_CHECK(starts[s] < starts[s + 1] && starts[s + 1] - starts[s] <= lens[s],
                "paged_attention_decode: each sequence needs 1 to context_len query rows");
    std::fill(out.seq.begin() + starts[s], out.seq.begin() + starts[s + 1], s);
  }
  return out;
}

// Jobs [begin, end) (see attention_parts), after checking the tables and lengths
// they read (plan_attention has checked q and the caches).
void attend_jobs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& block_tables_in, const at::Tensor& context_lens_in,
                 const std::optional<at::Tensor>& query_starts, double scale, int64_t window, double softcap,
                 at::Tensor& out, int64_t begin, int64_t end, int64_t parts) {
  const at::Tensor block_tables = block_tables_in.to(at::kLong).contiguous();
  const at::Tensor context_lens = context_lens_in.to(at::kLong).contiguous();
  const int64_t seqs = context_lens.numel(), heads = q.size(1), dim = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == seqs,
              "paged_attention_decode: one block table and context length per sequence");
  const int64_t max_blocks = block_tables.size(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < seqs; ++s)  // (query_rows compares the spans with them)
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= max_blocks * block_size, "paged_attention_decode: bad context length");
  const QueryRows rows = query_rows(query_starts, q.size(0), lens, seqs);
  for (int64_t r = begin / parts / kv_heads; begin < end && r <= (end - 1) / parts / kv_heads; ++r) {  // those it reads
    const int64_t s = rows.sequence(r);
    for (int64_t b = 0; b < (rows.visible(r, lens) + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tables[s * max_blocks + b] >= 0 && tables[s * max_blocks + b] < num_blocks,
                  "paged_attention_decode: block id out of range");
  }
  const float fscale = static_cast<float>(scale), cap = static_cast<float>(softcap);
  if (k_cache.scalar_type() == at::kFloat)
    attend_decode(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), out.data_ptr<float>(),
                  tables, lens, rows, begin, end, parts, heads, kv_heads, dim, block_size, max_blocks, fscale, window,
                  cap);
  else
    attend_decode(q.data_ptr<float>(), static_cast<const uint16_t*>(k_cache.data_ptr()),
                  static_cast<const uint16_t*>(v_cache.data_ptr()), out.data_ptr<float>(), tables, lens, rows, begin,
                  end, parts, heads, kv_heads, dim, block_size, max_blocks, fscale, window, cap);
}

// q and the caches checked; returns how many parts each (sequence, KV head) pair is cut into for `threads`.
int64_t plan_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t threads) {
  cholla::check_caches("paged_attention_decode", k_cache, v_cache);
  const int64_t heads = q.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == q.size(2) && heads % kv_heads == 0, "paged_attention_decode: head shapes disagree");
  TORCH_CHECK(heads / kv_heads <= MAX_GROUP, "paged_attention_decode: more than ", MAX_GROUP, " query heads per KV head");
  return attention_parts(q.size(0), kv_heads, heads / kv_heads, threads);
}

}  // namespace

namespace cholla {

// Both kernels' caches: contiguous fp32 or bfloat16 [blocks, block_size, kv_heads, dim], k and v alike.
void check_caches(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(k_cache.dim() == 4 && (cache_type == at::kFloat || cache_type == at::kBFloat16) &&
                  k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.scalar_type() == cache_type && v_cache.is_contiguous(),
              op, ": caches must be contiguous fp32 or bf16 [blocks, block_size, kv_heads, dim]");
}

// q: fp32 [rows, heads, dim]; k_cache, v_cache: fp32 or bfloat16 [blocks, block_size, kv_heads, dim];
// block_tables: int64 [seqs, max_blocks]; context_lens: int64 [seqs], the new tokens
// included (their keys and values already written). query_starts: int64 [seqs + 1],
// where each sequence's query rows start (its last q_len positions, causal among
// themselves), or None: one row per sequence. window > 0: a key is visible only
// if fewer than `window` positions back; softcap > 0: scores -> softcap * tanh(s / softcap).
at::Tensor paged_attention_decode(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window, double softcap, const std::optional<at::Tensor>& query_starts) {
  TORCH_CHECK(q_in.dim() == 3 && q_in.scalar_type() == at::kFloat, "paged_attention_decode: q must be fp32 [rows, heads, dim]");
  const at::Tensor q = q_in.contiguous();
  const int64_t parts = plan_attention(q, k_cache, v_cache, at::get_num_threads());
  at::Tensor out = at::zeros_like(q);
  at::parallel_for(0, q.size(0) * k_cache.size(2) * parts, 1, [&](int64_t begin, int64_t end) {
    attend_jobs(q, k_cache, v_cache, block_tables, context_lens, query_starts, scale, window, softcap, out, begin, end,
                parts);
  });
  return out;
}

// One thread's share of the jobs, into out (fp32, q's shape).
void paged_attention_part(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_tables, const at::Tensor& context_lens,
                          const std::optional<at::Tensor>& query_starts, double scale, int64_t window, double softcap,
                          at::Tensor& out, int64_t thread, int64_t threads) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous() && out.sizes() == q.sizes() &&
                  out.scalar_type() == at::kFloat && out.is_contiguous(),
              "paged_attention_part: q and out must be contiguous fp32 [rows, heads, dim]");
  const int64_t parts = plan_attention(q, k_cache, v_cache, threads);
  const auto [begin, end] = share(q.size(0) * k_cache.size(2) * parts, thread, threads);
  attend_jobs(q, k_cache, v_cache, block_tables, context_lens, query_starts, scale, window, softcap, out, begin, end,
              parts);
}

void write_kv_row(const float* k, const float* v, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t slot) {
  const int64_t row = k_cache.size(2) * k_cache.size(3);
  if (k_cache.scalar_type() == at::kFloat) {
    store_row(k_cache.data_ptr<float>() + slot * row, k, row);
    store_row(v_cache.data_ptr<float>() + slot * row, v, row);
  } else {
    store_row(static_cast<uint16_t*>(k_cache.data_ptr()) + slot * row, k, row);
    store_row(static_cast<uint16_t*>(v_cache.data_ptr()) + slot * row, v, row);
  }
}

// Writes this step's keys and values (fp32 [tokens, kv_heads, dim], token stride
// free: views into the fused q/k/v projection) into their cache slots, rounding
// to the cache's dtype on the way: one pass instead of a conversion and an
// index_copy_ per tensor.
void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
              const at::Tensor& slot_mapping_in) {
  check_caches("write_kv", k_cache, v_cache);
  const auto cache_type = k_cache.scalar_type();
  const at::Tensor slot_mapping = slot_mapping_in.to(at::kLong).contiguous();
  const int64_t tokens = slot_mapping.numel(), kv_heads = k_cache.size(2), dim = k_cache.size(3);
  const int64_t slot_count = k_cache.size(0) * k_cache.size(1), row = kv_heads * dim;
  check_new_rows(k, tokens, kv_heads, dim);
  check_new_rows(v, tokens, kv_heads, dim);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(slots[t] >= 0 && slots[t] < slot_count, "write_kv: slot out of range");
  if (cache_type == at::kFloat) {
    scatter_rows(k, k_cache.data_ptr<float>(), slots, tokens, row);
    scatter_rows(v, v_cache.data_ptr<float>(), slots, tokens, row);
  } else {
    scatter_rows(k, static_cast<uint16_t*>(k_cache.data_ptr()), slots, tokens, row);
    scatter_rows(v, static_cast<uint16_t*>(v_cache.data_ptr()), slots, tokens, row);
  }
}

}  // namespace cholla

TORCH_LIBRARY_FRAGMENT(cholla, m) {
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def("paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window, float softcap, Tensor? query_starts=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(cholla, CPU, m) {
  m.impl("write_kv", &cholla::write_kv);
  m.impl("paged_attention_decode", &cholla::paged_attention_decode);
}
