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
//
// Every KV cache type (cholla/kv/kv_types.py) is read and written in place: a
// row loader per type widens 16 values at a time into registers as they are
// consumed (never a dequantized copy), and K and V may differ in type. Rotated
// types are read without rotating each key back (attend_pair). q4_kivi's keys
// (Q4_CHANNEL) and fp8_e4m3_centered's (E4M3_CENTERED) are read block by block: a
// quantized block through its statistics, a block still filling from its bf16 rows
// (kv_types.OpenBlocks).

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>

#include "simd.h"
#include "ops.h"

namespace {

using Kind = cholla::KVKind;
// The kinds either side may hold; Q4_CHANNEL and E4M3_CENTERED are a key side's only (check_sides).
#define CHOLLA_KV_KINDS(X) X(F32) X(BF16) X(F16) X(E4M3) X(E5M2) X(INT8) X(Q8_0) X(Q4_0) X(E4M3_SCALED) X(Q4_HEAD)

// The per-(block, head) statistics of keys with statistics per block (kv_types.channel_params):
// q4_kivi's a code byte per channel, then fp16 base, step and unit; fp8_e4m3_centered's fp16
// means per channel, then fp16 scales per token; both then a tail of PARAMS_TAIL bytes, the
// open flag its byte OPEN_FLAG_AT.
constexpr int64_t PARAMS_TAIL = 16;
constexpr int64_t OPEN_FLAG_AT = 6;
constexpr uint8_t OPEN = 1;

inline bool block_keys(Kind kind) { return kind == Kind::Q4_CHANNEL || kind == Kind::E4M3_CENTERED; }

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// 16 values of a row (p: its values, scales: its scales) from position d, as fp32: the
// floats widened, the integer types times their group's scale (q8_0, q4_0). A
// scale per row (int8, fp8 e4m3's 2^8 and a scaled fp8's or 4-bit head's scale) is left
// to row_scale, so it multiplies a score or a weight once instead of every value.
// Q4_HEAD and Q4_CHANNEL pack value i with value half + i (half: dim / 2, a multiple of
// 16), and Q4_CHANNEL's `scales` are its block's statistics for the head (uint8 bytes).
template <Kind K>
inline __m512 load16(const uint8_t* p, const uint16_t* scales, int64_t d, __mmask16 live, int64_t half) {
  if constexpr (K == Kind::F32) {
    return _mm512_maskz_loadu_ps(live, reinterpret_cast<const float*>(p) + d);
  } else if constexpr (K == Kind::BF16) {
    const __m256i raw = _mm256_maskz_loadu_epi16(live, reinterpret_cast<const uint16_t*>(p) + d);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else if constexpr (K == Kind::F16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, reinterpret_cast<const uint16_t*>(p) + d));
  } else if constexpr (K == Kind::E5M2) {  // the top byte of an fp16
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(live, p + d));
    return _mm512_cvtph_ps(_mm256_slli_epi16(bytes, 8));
  } else if constexpr (K == Kind::E4M3 || K == Kind::E4M3_SCALED) {
    // Sign to fp16's sign bit, exponent and mantissa 3 bits down into fp16's: the fp16
    // 2^-8 times the fp8 value (bias 15 against 7), subnormals included; row_scale has the 2^8.
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(live, p + d));
    const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(bytes, _mm256_set1_epi16(0x80)), 8);
    const __m256i magnitude = _mm256_slli_epi16(_mm256_and_si256(bytes, _mm256_set1_epi16(0x7F)), 7);
    return _mm512_cvtph_ps(_mm256_or_si256(sign, magnitude));
  } else if constexpr (K == Kind::INT8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(live, p + d)));
  } else if constexpr (K == Kind::Q8_0) {
    if (live == 0) return _mm512_setzero_ps();  // past the row: no scale to read
    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(live, p + d)));
    return _mm512_mul_ps(q, _mm512_set1_ps(half_to_float(scales[d >> 5])));
  } else if constexpr (K == Kind::Q4_HEAD) {
    const __m128i bytes = _mm_maskz_loadu_epi8(live, p + (d < half ? d : d - half));
    const __m128i q = _mm_and_si128(d < half ? bytes : _mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(q), _mm512_set1_epi32(8)));
  } else if constexpr (K == Kind::Q4_CHANNEL) {
    // q (s + 1) unit + base + l step, code byte l | s << 4 per channel (kv_types._dequantize_channel)
    const uint8_t* params = reinterpret_cast<const uint8_t*>(scales);
    const __m128i bytes = _mm_maskz_loadu_epi8(live, p + (d < half ? d : d - half));
    const __m128i q = _mm_and_si128(d < half ? bytes : _mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
    const __m512i codes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, params + d));
    const uint16_t* stats = reinterpret_cast<const uint16_t*>(params + 2 * half);
    const __m512 base = _mm512_set1_ps(half_to_float(stats[0])), step = _mm512_set1_ps(half_to_float(stats[1]));
    const __m512 unit = _mm512_set1_ps(half_to_float(stats[2]));
    const __m512 low = _mm512_cvtepi32_ps(_mm512_and_si512(codes, _mm512_set1_epi32(0x0F)));
    const __m512 spans = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_srli_epi32(codes, 4), _mm512_set1_epi32(1)));
    const __m512 floor = _mm512_add_ps(base, _mm512_mul_ps(low, step));
    const __m512 scale = _mm512_mul_ps(spans, unit);
    return _mm512_maskz_mov_ps(live, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)), scale, floor));
  } else {  // Q4_0: a block's 16 bytes hold its values 0-15 in the low nibbles, 16-31 in the high ones
    if (live == 0) return _mm512_setzero_ps();
    __m128i bytes = _mm_maskz_loadu_epi8(live, p + (d >> 5) * 16);
    if (d & 16) bytes = _mm_srli_epi16(bytes, 4);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_and_si128(bytes, _mm_set1_epi8(0x0F)));
    const __m512 centred = _mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(8)));
    return _mm512_mul_ps(centred, _mm512_set1_ps(half_to_float(scales[d >> 5])));
  }
}

template <Kind K>
inline float row_scale(const uint16_t* scales) {
  if constexpr (K == Kind::INT8) return half_to_float(scales[0]);
  if constexpr (K == Kind::E4M3) return 256.0f;
  if constexpr (K == Kind::E4M3_SCALED) return 256.0f * half_to_float(scales[0]);
  if constexpr (K == Kind::Q4_HEAD) return half_to_float(scales[0]);
  return 1.0f;
}

// Asks for row `row`'s values (and scales) ahead of their use: the rows are scattered over blocks.
inline void prefetch_row(const cholla::KVSide& s, int64_t row, int hint) {
  const char* p = reinterpret_cast<const char*>(s.values + row * s.row_bytes);
  for (int64_t b = 0; b < s.row_bytes; b += 64)
    hint == 0 ? _mm_prefetch(p + b, _MM_HINT_T0) : _mm_prefetch(p + b, _MM_HINT_T1);
  if (s.scales != nullptr) _mm_prefetch(reinterpret_cast<const char*>(s.scales + row * s.groups), _MM_HINT_T1);
}

// x[0..n) <- H x, H the normalized Sylvester Hadamard matrix (n a power of two;
// kv_types.hadamard): the fast Walsh-Hadamard transform, n log n additions.
inline void hadamard_(float* x, int64_t n) {
  for (int64_t h = 1; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
  const float norm = 1.0f / std::sqrt(static_cast<float>(n));
  for (int64_t i = 0; i < n; ++i) x[i] *= norm;
}

// Query heads per KV head this kernel handles (grouped-query attention); more is refused.
constexpr int64_t MAX_GROUP = 16;

// Keys (and their values) are prefetched this many positions ahead.
constexpr int64_t AHEAD = 8;
// Lines of the next pair's keys asked for per value row of a slice (NextKeys): Gemma 3's
// (dim 256) values take 4 slices, so its next pair's first half of keys arrives meanwhile.
constexpr int NEXT_KEY_LINES = 2;

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

// The next pair's key rows, asked for a line at a time (step()) while this pair's values are
// weighed: those read what the scores brought in, so few lines are in flight then. All inline (a
// call in the values' loop would spill its sums around it).
struct NextKeys {
  SlotCursor at;
  const char* values;
  int64_t heads, kvh, row_bytes, left, line = 0;
  const char* row = nullptr;
  NextKeys(const cholla::KVSide& ks, const int64_t* table, int64_t first, int64_t n, int64_t kvh)
      : at(table, ks.block_size, first), values(reinterpret_cast<const char*>(ks.values)), heads(ks.heads), kvh(kvh),
        row_bytes(ks.row_bytes), left(n) {
    if (left > 0) row = values + (at.slot() * heads + kvh) * row_bytes;
  }
  NextKeys() : at(nullptr, 1, 0), values(nullptr), heads(0), kvh(0), row_bytes(0), left(0) {}
  __attribute__((always_inline)) void step() {
    for (int i = 0; i < NEXT_KEY_LINES && left > 0; ++i) {
      _mm_prefetch(row + line, _MM_HINT_T0);
      if ((line += 64) >= row_bytes) {
        line = 0;
        if (--left > 0) {
          at.next();
          row = values + (at.slot() * heads + kvh) * row_bytes;
        }
      }
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

// acc[g] += the lanes of q's head g times one key's values (K), 16 at a time: each key
// value is loaded (and widened) once for all the query heads that share it.
template <Kind K, int GROUP>
__attribute__((always_inline)) inline void dot_key(const float* q, const uint8_t* key, const uint16_t* scales,
                                                   int64_t dim, int64_t group, __m512* acc) {
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 live = lanes(dim - d);
    const __m512 k = load16<K>(key, scales, d, live, dim / 2);
    for (int64_t g = 0; g < (GROUP > 0 ? GROUP : group); ++g)
      acc[g] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, q + g * dim + d), k, acc[g]);
  }
}

// The sums of 16 vectors' lanes: lane 4 c + k of the result is v[4 k + c]'s sum. Each
// sum is taken in _mm512_reduce_add_ps's order (lanes i + i+8, then + i+4, i + i+2,
// i + i+1), so it is bitwise that reduction's, for 45 instructions instead of 16 x 8.
inline __m512 reduce16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int m = 0; m < 8; ++m)  // lanes i + i+8: v[2m]'s in lanes 0-7, v[2m+1]'s in 8-15
    w[m] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * m], v[2 * m + 1], 0b01000100),
                         _mm512_shuffle_f32x4(v[2 * m], v[2 * m + 1], 0b11101110));
  for (int m = 0; m < 4; ++m)  // + i+4: one vector's four partial sums per 128-bit chunk
    x[m] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * m], w[2 * m + 1], 0b10001000),
                         _mm512_shuffle_f32x4(w[2 * m], w[2 * m + 1], 0b11011101));
  for (int m = 0; m < 2; ++m)  // i + i+2: chunk c holds vectors 8m + c's two, then 8m + 4 + c's
    y[m] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * m], x[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x[2 * m], x[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),  // i + i+1
                       _mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Keys a multi-key pass of scores_of takes at once: GROUP x KEYS accumulators, at most 16.
template <int GROUP>
constexpr int64_t keys_per_pass() { return GROUP == 1 ? 16 : GROUP == 2 ? 8 : GROUP <= 4 ? 4 : 0; }

// scores_of's multi-key passes over the first keys of a pair (a multiple of keys_per_pass); returns
// how many it took, the cursors moved past them. FULL: dim is a multiple of 16 (every load whole).
template <Kind K, int GROUP, bool FULL>
__attribute__((always_inline)) inline int64_t scores_by_keys(const float* q, const cholla::KVSide& ks,
                                                             const cholla::KVSide& vs, SlotCursor& key_at,
                                                             SlotCursor& ahead_at, int64_t n, int64_t kvh, float scale,
                                                             float cap, const float* bias, float* scores) {
  constexpr int64_t KEYS = keys_per_pass<GROUP>();
  const int64_t dim = ks.dim;
  int64_t t = 0;
  for (; t + KEYS <= n; t += KEYS) {
    const uint8_t* key[KEYS];
    const uint16_t* key_scales[KEYS];
    // The rows AHEAD positions on (past the end: the key's own, in cache already) are asked for a
    // line of key (into L1) and value (into L2) per step of the sums, as one key at a time paced
    // them: asked for all at once at the top of a pass (4 keys' 64 lines), most were not there
    // when read (out of cache, 32 sequences of Gemma 3 took 0.9-1.0 ms a layer instead of 0.5;
    // so did a call per line, which spilled the sums around it).
    const char* ahead_k[KEYS];
    const char* ahead_v[KEYS];
#pragma GCC unroll 16
    for (int64_t j = 0; j < KEYS; ++j, key_at.next(), ahead_at.next()) {
      const int64_t row = key_at.slot() * ks.heads + kvh;
      key[j] = ks.values + row * ks.row_bytes;
      key_scales[j] = ks.scales == nullptr ? nullptr : ks.scales + row * ks.groups;
      const int64_t ahead = t + j + AHEAD < n ? ahead_at.slot() * ks.heads + kvh : row;
      ahead_k[j] = reinterpret_cast<const char*>(ks.values + ahead * ks.row_bytes);
      ahead_v[j] = reinterpret_cast<const char*>(vs.values + ahead * vs.row_bytes);
      if (ks.scales != nullptr) _mm_prefetch(reinterpret_cast<const char*>(ks.scales + ahead * ks.groups), _MM_HINT_T1);
      if (vs.scales != nullptr) _mm_prefetch(reinterpret_cast<const char*>(vs.scales + ahead * vs.groups), _MM_HINT_T1);
    }
    const int64_t k_lines = ks.row_bytes / 64, v_lines = vs.row_bytes / 64;
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0, line = 0; d < dim; d += 16, ++line) {
      const __mmask16 live = FULL ? 0xFFFF : lanes(dim - d);
#pragma GCC unroll 16
      for (int64_t j = 0; j < KEYS; ++j) {
        if (line < k_lines) _mm_prefetch(ahead_k[j] + 64 * line, _MM_HINT_T0);
        if (line < v_lines) _mm_prefetch(ahead_v[j] + 64 * line, _MM_HINT_T1);
      }
      __m512 k[KEYS];
#pragma GCC unroll 16
      for (int64_t j = 0; j < KEYS; ++j) k[j] = load16<K>(key[j], key_scales[j], d, live, dim / 2);
#pragma GCC unroll 16
      for (int64_t g = 0; g < GROUP; ++g) {
        const __m512 qg = _mm512_maskz_loadu_ps(live, q + g * dim + d);
#pragma GCC unroll 16
        for (int64_t j = 0; j < KEYS; ++j) acc[g * KEYS + j] = _mm512_fmadd_ps(qg, k[j], acc[g * KEYS + j]);
      }
    }
    alignas(64) float sums[16];
    _mm512_store_ps(sums, reduce16(acc));
    for (int64_t g = 0; g < GROUP; ++g)
      for (int64_t j = 0; j < KEYS; ++j) {
        const int64_t i = g * KEYS + j;
        float score = sums[i % 4 * 4 + i / 4] * row_scale<K>(key_scales[j]);
        if (bias != nullptr) score += bias[g];
        score *= scale;
        if (cap > 0) score = cap * std::tanh(score / cap);
        scores[g * n + t + j] = score;
      }
  }
  return t;
}

// One (sequence, KV head) pair's scores: its `group` query heads against each
// key, scaled and soft-capped, into scores[g * n + t]. GROUP > 0 fixes the group
// size at compile time, so the per-head accumulators stay in registers (with a
// run-time count they spilled to the stack: 5x slower); GROUP == 0 serves any
// size up to MAX_GROUP. `bias` (calibrated keys): a per-head term added to each
// raw score. Each key is loaded (and widened) once, 16 lanes at a time, for all
// the query heads that share it.
//
// Groups of at most 4 over keys with a row loader take keys_per_pass keys at a time:
// one key at a time, each score was a chain of dim / 16 dependent FMAs and its own
// reduction, and a query vector load per FMA; a pass keeps up to 16 independent
// chains, loads each query vector once for all its keys and reduces all the sums
// together (reduce16). Each score is the same sums in the same order (bitwise).
template <Kind K, int GROUP>
void scores_of(const float* q, const cholla::KVSide& ks, const cholla::KVSide& vs, const int64_t* table,
               int64_t first, int64_t n, int64_t run_time_group, int64_t kvh, float scale, float cap,
               const float* bias, float* scores) {
  const int64_t group = GROUP > 0 ? GROUP : run_time_group, dim = ks.dim;
  constexpr int64_t SLOTS = GROUP > 0 ? GROUP : MAX_GROUP;
  SlotCursor key_at(table, ks.block_size, first), ahead_at(table, ks.block_size, first + AHEAD);
  int64_t t = 0;
  if constexpr (GROUP > 0 && keys_per_pass<GROUP>() > 0 && K != Kind::Q4_CHANNEL && K != Kind::E4M3_CENTERED) {
    t = dim % 16 == 0 ? scores_by_keys<K, GROUP, true>(q, ks, vs, key_at, ahead_at, n, kvh, scale, cap, bias, scores)
                      : scores_by_keys<K, GROUP, false>(q, ks, vs, key_at, ahead_at, n, kvh, scale, cap, bias, scores);
  }
  int64_t mean_block = -1;  // E4M3_CENTERED: the block whose mean terms q . m are in mean_terms
  float mean_terms[SLOTS];
  for (; t < n; ++t, key_at.next(), ahead_at.next()) {
    const int64_t row = key_at.slot() * ks.heads + kvh;
    const uint8_t* key = ks.values + row * ks.row_bytes;
    const uint16_t* key_scales = ks.scales == nullptr ? nullptr : ks.scales + row * ks.groups;
    if (t + AHEAD < n) {
      const int64_t ahead = ahead_at.slot() * ks.heads + kvh;
      prefetch_row(ks, ahead, 0);
      prefetch_row(vs, ahead, 1);
    }
    __m512 acc[SLOTS];
    for (int64_t g = 0; g < group; ++g) acc[g] = _mm512_setzero_ps();
    float key_scale = row_scale<K>(key_scales);
    const float* key_bias = bias;
    if constexpr (K == Kind::Q4_CHANNEL || K == Kind::E4M3_CENTERED) {  // its block's statistics, or its bf16 row
      const int64_t block = key_at.table[key_at.block];
      const uint8_t* params = ks.params + (block * ks.heads + kvh) * ks.params_width;
      if (params[ks.params_width - PARAMS_TAIL + OPEN_FLAG_AT] == OPEN) {
        const int64_t open_slot = ks.open_slot_of[block];
        TORCH_CHECK(open_slot >= 0 && open_slot < ks.open_slots, "paged_attention_decode: an open key block without its rows");
        const uint16_t* open_key = ks.open_rows + ((open_slot * ks.block_size + key_at.offset) * ks.heads + kvh) * dim;
        dot_key<Kind::BF16, GROUP>(q, reinterpret_cast<const uint8_t*>(open_key), nullptr, dim, group, acc);
        key_scale = 1.0f;
      } else if constexpr (K == Kind::Q4_CHANNEL) {
        dot_key<K, GROUP>(q, key, reinterpret_cast<const uint16_t*>(params), dim, group, acc);
      } else {  // q . (s c + m) = s (q . c) + q . m: the mean's term once per block and query head
        const uint16_t* stats = reinterpret_cast<const uint16_t*>(params);
        dot_key<Kind::E4M3, GROUP>(q, key, nullptr, dim, group, acc);
        key_scale = 256.0f * half_to_float(stats[dim + key_at.offset]);
        if (block != mean_block) {
          for (int64_t g = 0; g < group; ++g) {
            __m512 sum = _mm512_setzero_ps();
            for (int64_t d = 0; d < dim; d += 16) {
              const __mmask16 live = lanes(dim - d);
              sum = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, q + g * dim + d),
                                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, stats + d)), sum);
            }
            mean_terms[g] = _mm512_reduce_add_ps(sum);
          }
          mean_block = block;
        }
        key_bias = mean_terms;
      }
    } else {
      dot_key<K, GROUP>(q, key, key_scales, dim, group, acc);
    }
    for (int64_t g = 0; g < group; ++g) {
      float score = _mm512_reduce_add_ps(acc[g]) * key_scale;
      if (key_bias != nullptr) score += key_bias[g];
      score *= scale;
      if (cap > 0) score = cap * std::tanh(score / cap);
      scores[g * n + t] = score;
    }
  }
}

// One 64-wide slice of the group's outputs, o[g][d0:d0+64] = sum over t of scores[g][t] value_t.
// WHOLE (GROUP fixed, dim a multiple of 64): every loop unrolled and every load and store whole,
// so the 4 x GROUP sums never leave their registers (as loops, GCC stored all of them every key).
template <Kind K, int GROUP, bool WHOLE>
[[gnu::always_inline]] inline void weigh_slice(const cholla::KVSide& vs, const int64_t* table, int64_t first, int64_t n,
                                               int64_t group, int64_t kvh, const float* scores, float* o, int64_t d0,
                                               NextKeys& next) {
  constexpr int64_t SLOTS = GROUP > 0 ? GROUP : MAX_GROUP;
  const int64_t dim = vs.dim, row_bytes = vs.row_bytes, groups = vs.groups;
  const auto live = [&](int j) -> __mmask16 { return WHOLE ? 0xFFFF : lanes(dim - d0 - 16 * j); };
  __m512 out[SLOTS][4];
#pragma GCC unroll 16
  for (int64_t g = 0; g < group; ++g)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) out[g][j] = _mm512_setzero_ps();
  SlotCursor value_at(table, vs.block_size, first);
  for (int64_t t = 0; t < n; ++t, value_at.next()) {
    const int64_t row = value_at.slot() * vs.heads + kvh;
    const uint8_t* value = vs.values + row * row_bytes;
    const uint16_t* value_scales = vs.scales == nullptr ? nullptr : vs.scales + row * groups;
    next.step();
    __m512 v[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) v[j] = load16<K>(value, value_scales, d0 + 16 * j, live(j), dim / 2);
    const float value_scale = row_scale<K>(value_scales);
#pragma GCC unroll 16
    for (int64_t g = 0; g < group; ++g) {
      const __m512 w = _mm512_set1_ps(scores[g * n + t] * value_scale);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) out[g][j] = _mm512_fmadd_ps(w, v[j], out[g][j]);
    }
  }
#pragma GCC unroll 16
  for (int64_t g = 0; g < group; ++g)
#pragma GCC unroll 4
    for (int j = 0; j < 4 && (WHOLE || d0 + 16 * j < dim); ++j)
      _mm512_mask_storeu_ps(o + g * dim + d0 + 16 * j, live(j), out[g][j]);
}

// The same pair's weighted sum of values (weights: the softmaxed scores) into o[g * dim ..].
// A 64-wide slice of every head's output stays in registers while the positions
// stream by, each value slice loaded once for all heads.
template <Kind K, int GROUP>
void weigh_values(const cholla::KVSide& vs, const int64_t* table, int64_t first, int64_t n, int64_t run_time_group,
                  int64_t kvh, const float* scores, float* o, NextKeys& next) {
  const int64_t dim = vs.dim;
  if constexpr (GROUP > 0) {
    if (dim % 64 == 0) {
      for (int64_t d0 = 0; d0 < dim; d0 += 64) weigh_slice<K, GROUP, true>(vs, table, first, n, GROUP, kvh, scores, o, d0, next);
      return;
    }
  }
  const int64_t group = GROUP > 0 ? GROUP : run_time_group;
  for (int64_t d0 = 0; d0 < dim; d0 += 64) weigh_slice<K, GROUP, false>(vs, table, first, n, group, kvh, scores, o, d0, next);
}

using ScoresFn = decltype(&scores_of<Kind::F32, 1>);
using ValuesFn = decltype(&weigh_values<Kind::F32, 1>);

template <int GROUP>
std::pair<ScoresFn, ValuesFn> pair_fns(Kind k, Kind v) {
  ScoresFn scores = nullptr;
  ValuesFn values = nullptr;
  switch (k) {
#define CHOLLA_CASE(name) case Kind::name: scores = scores_of<Kind::name, GROUP>; break;
    CHOLLA_KV_KINDS(CHOLLA_CASE)
    CHOLLA_CASE(Q4_CHANNEL)
    CHOLLA_CASE(E4M3_CENTERED)
#undef CHOLLA_CASE
  }
  switch (v) {
#define CHOLLA_CASE(name) case Kind::name: values = weigh_values<Kind::name, GROUP>; break;
    CHOLLA_KV_KINDS(CHOLLA_CASE)
#undef CHOLLA_CASE
    case Kind::Q4_CHANNEL:
    case Kind::E4M3_CENTERED: break;  // keys only (check_sides)
  }
  return {scores, values};
}

// The loops for `count` query heads per job over these cache types: group sizes of real
// models (Gemma 3 270M: 4; SmolLM2: 3; Llama 3: 4; Qwen 3: 2, 4...) get their own copy.
std::pair<ScoresFn, ValuesFn> pair_fns(Kind k, Kind v, int64_t count) {
  return count == 1 ? pair_fns<1>(k, v) : count == 2 ? pair_fns<2>(k, v) : count == 3 ? pair_fns<3>(k, v)
       : count == 4 ? pair_fns<4>(k, v) : pair_fns<0>(k, v);
}

// One (sequence, KV head) pair's `count` query heads: q [count, dim] -> o [count, dim].
// Rotated keys (H k stored, H symmetric and orthogonal): q . (H k) = (H q) . k, so q is
// rotated once instead of every key; calibrated ones (k = s * (H k') + m, per channel):
// q . k = (H (s * q)) . k' + q . m. Values the same way on the output, once per head:
// sum_t p_t (s * (H v'_t) + m) = s * (H sum_t p_t v'_t) + m, the weights summing to 1.
// The same sums as rotating each key back, in another order (fp32 rounding differs).
void attend_pair(const float* q, const cholla::KVSide& ks, const cholla::KVSide& vs, float* o, const int64_t* table,
                 int64_t first, int64_t n, int64_t count, int64_t kvh, float scale, float cap,
                 std::vector<float>& scores, std::vector<float>& rotated_q, NextKeys& next) {
  const int64_t dim = ks.dim;
  const auto [scores_fn, values_fn] = pair_fns(ks.kind, vs.kind, count);
  float bias[MAX_GROUP];
  const float* queries = q;
  if (ks.rotated) {
    rotated_q.resize(count * dim);
    for (int64_t g = 0; g < count; ++g) {
      float* r = rotated_q.data() + g * dim;
      const float* qg = q + g * dim;
      if (ks.spread != nullptr) {
        const float* spread = ks.spread + kvh * dim;
        const float* shift = ks.shift + kvh * dim;
        float dot = 0.0f;
        for (int64_t i = 0; i < dim; ++i) {
          r[i] = qg[i] * spread[i];
          dot += qg[i] * shift[i];
        }
        bias[g] = dot;
      } else {
        std::memcpy(r, qg, dim * sizeof(float));
      }
      hadamard_(r, dim);
    }
    queries = rotated_q.data();
  }
  scores.resize(count * n);
  scores_fn(queries, ks, vs, table, first, n, count, kvh, scale, cap, ks.spread != nullptr ? bias : nullptr,
            scores.data());
  for (int64_t g = 0; g < count; ++g) softmax(scores.data() + g * n, n);
  values_fn(vs, table, first, n, count, kvh, scores.data(), o, next);
  if (vs.rotated)
    for (int64_t g = 0; g < count; ++g) {
      float* og = o + g * dim;
      hadamard_(og, dim);
      if (vs.spread != nullptr)
        for (int64_t i = 0; i < dim; ++i) og[i] = og[i] * vs.spread[kvh * dim + i] + vs.shift[kvh * dim + i];
    }
}

// A step's work is cut into jobs of (query row, KV head, part of its query
// heads). With fewer pairs than two per thread each pair's heads are split in
// two, so that one sequence keeps both cores busy (Gemma 3 has one KV head:
// unsplit, its attention ran on one core); its keys are then read twice, from cache.
int64_t attention_parts(int64_t rows, int64_t kv_heads, int64_t group, int64_t threads) {
  return rows * kv_heads < 2 * threads && group > 1 ? 2 : 1;
}

using cholla::QueryRows;

// Jobs [begin, end) of a decode step (parts per pair: attention_parts).
void attend_decode(const float* qs, const cholla::KVSide& ks, const cholla::KVSide& vs, float* os,
                   const int64_t* tables, const int64_t* lens, const QueryRows& rows, int64_t begin, int64_t end,
                   int64_t parts, int64_t heads, int64_t max_blocks, float scale, int64_t window, float cap) {
  const int64_t kv_heads = ks.heads, dim = ks.dim, group = heads / kv_heads, per_part = (group + parts - 1) / parts;
  thread_local std::vector<float> scores, rotated_q;  // (kept from call to call: a decode step calls this per chunk)
  const int64_t n_jobs = rows.count * kv_heads * parts;
  // A job's KV head, row, sequence, and its first visible key and context length.
  struct Pair {
    int64_t kvh, r, s, first, ctx;
  };
  const auto pair_of = [&](int64_t job) {
    const int64_t r = job / parts / kv_heads, ctx = rows.visible(r, lens);
    return Pair{job / parts % kv_heads, r, rows.sequence(r), window > 0 ? std::max<int64_t>(0, ctx - window) : 0, ctx};
  };
  for (int64_t job = begin; job < end; ++job) {
    const auto [kvh, r, s, first, ctx] = pair_of(job);
    const int64_t head = kvh * group + job % parts * per_part, count = std::min(per_part, (kvh + 1) * group - head);
    if (count <= 0) continue;
    // The next job's keys (usually this member's next: its own chunks come in order) are asked for
    // during this pair's values, unless they are this pair's (its heads split in parts).
    NextKeys next;
    if (job + 1 < n_jobs) {
      const Pair after = pair_of(job + 1);
      if (after.s != s || after.kvh != kvh)
        next = NextKeys(ks, tables + after.s * max_blocks, after.first, after.ctx - after.first, after.kvh);
    }
    attend_pair(qs + (r * heads + head) * dim, ks, vs, os + (r * heads + head) * dim, tables + s * max_blocks, first,
                ctx - first, count, kvh, scale, cap, scores, rotated_q, next);
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

// Keeps the compiler from fusing a product with the addition after it (an FMA
// rounds once, PyTorch's separate ops twice): the writers must give its bytes.
inline float rounded(float x) {
  asm volatile("" : "+x"(x));
  return x;
}

// kv_types.quantize_int8 for one group of n values: Q8_0's arithmetic.
inline void quantize_int8_group(const float* x, int64_t n, int8_t* q, uint16_t* scale_out) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = amax / 127.0f, inverse = scale == 0.0f ? 0.0f : 1.0f / scale;
  for (int64_t i = 0; i < n; ++i) {
    const float y = rounded(x[i] * inverse);
    const float r = std::floor(std::fabs(y) + 0.5f);  // halves away from zero
    q[i] = static_cast<int8_t>(std::clamp(y < 0 ? -r : r, -127.0f, 127.0f));
  }
  *scale_out = c10::Half(scale).x;
}

// Largest head_dim of a rotated type, a 4-bit head or q4_kivi's keys (the writers' stack buffers).
constexpr int64_t MAX_ROTATED_DIM = 1024;

// kv_types.quantize_q4_0 for one group of n values (Q4_0: blocks of 32; q4_kivi's values:
// the head): Q4_0's arithmetic, values i and n / 2 + i in the low and high nibbles of byte i.
inline void quantize_q4_0_group(const float* x, int64_t n, uint8_t* packed, uint16_t* scale_out) {
  int64_t extreme = 0;  // the first value of largest magnitude, as torch's argmax picks it
  for (int64_t i = 1; i < n; ++i)
    if (std::fabs(x[i]) > std::fabs(x[extreme])) extreme = i;
  const float scale = x[extreme] / -8.0f, inverse = scale == 0.0f ? 0.0f : 1.0f / scale;
  uint8_t q[MAX_ROTATED_DIM];
  for (int64_t i = 0; i < n; ++i)
    q[i] = static_cast<uint8_t>(std::clamp(std::trunc(rounded(x[i] * inverse) + 8.5f), 0.0f, 15.0f));
  for (int64_t i = 0; i < n / 2; ++i) packed[i] = q[i] | (q[i + n / 2] << 4);
  *scale_out = c10::Half(scale).x;
}

// kv_types.quantize_fp8 for one head: scaled so its largest magnitude is e4m3's 448
// (the fp16 scale's rounding saturated), the nearest e4m3 code of each value.
inline void quantize_fp8_head(const float* x, int64_t n, uint8_t* codes, uint16_t* scale_out) {
  const float limit = 448.0f;
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const c10::Half scale(amax / limit);
  const float inverse = static_cast<float>(scale) == 0.0f ? 0.0f : 1.0f / static_cast<float>(scale);
  for (int64_t i = 0; i < n; ++i) {
    const float y = rounded(x[i] * inverse);
    codes[i] = c10::Float8_e4m3fn(std::isnan(y) ? y : std::clamp(y, -limit, limit)).x;
  }
  *scale_out = scale.x;
}

// kv_types.quantize_channel (or quantize_centered: E4M3_CENTERED) for one full block of keys, rows fp32 [block_size, heads, dim]
// (bf16 values): per (head, channel) a minimum and range over the block's tokens, coded against
// the head's base, step and unit (kv_types' docstring), then 4-bit codes per token and channel.
// Clears the block's open flag (the tail is rewritten whole).
void quantize_channel_block(const cholla::KVSide& s, int64_t block, const float* rows) {
  const int64_t block_size = s.block_size, heads = s.heads, dim = s.dim, half = dim / 2;
  float floor_of[MAX_ROTATED_DIM], scale_of[MAX_ROTATED_DIM], low[MAX_ROTATED_DIM], high[MAX_ROTATED_DIM];
  if (s.kind == Kind::E4M3_CENTERED) {  // kv_types.quantize_centered
    for (int64_t h = 0; h < heads; ++h) {
      uint8_t* params = s.params + (block * heads + h) * s.params_width;
      uint16_t* means = reinterpret_cast<uint16_t*>(params);
      for (int64_t c = 0; c < dim; ++c) {
        float sum = 0.0f;
        for (int64_t t = 0; t < block_size; ++t) sum += rows[(t * heads + h) * dim + c];
        means[c] = c10::Half(sum / static_cast<float>(block_size)).x;
        floor_of[c] = c10::Half(means[c], c10::Half::from_bits());
      }
      std::memset(params + s.params_width - PARAMS_TAIL, 0, PARAMS_TAIL);
      for (int64_t t = 0; t < block_size; ++t) {
        for (int64_t c = 0; c < dim; ++c) scale_of[c] = rows[(t * heads + h) * dim + c] - floor_of[c];
        uint8_t* codes = const_cast<uint8_t*>(s.values) + ((block * block_size + t) * heads + h) * s.row_bytes;
        quantize_fp8_head(scale_of, dim, codes, means + dim + t);
      }
    }
    return;
  }
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t c = 0; c < dim; ++c) {
      low[c] = INFINITY, high[c] = -INFINITY;
      for (int64_t t = 0; t < block_size; ++t) {
        const float v = rows[(t * heads + h) * dim + c];
        low[c] = std::min(low[c], v), high[c] = std::max(high[c], v);
      }
    }
    const float low_min = *std::min_element(low, low + dim), low_max = *std::max_element(low, low + dim);
    const c10::Half base_h(low_min);
    const float base = base_h;
    const c10::Half step_h((low_max - base) / 15.0f);
    const float step = step_h;
    uint8_t* params = s.params + (block * heads + h) * s.params_width;
    float span_max = -INFINITY;
    for (int64_t c = 0; c < dim; ++c) {
      const float low_code = std::clamp(std::floor((low[c] - base) / (step == 0.0f ? 1.0f : step)), 0.0f, 15.0f);
      params[c] = static_cast<uint8_t>(low_code);
      floor_of[c] = base + rounded(low_code * step);
      scale_of[c] = (high[c] - floor_of[c]) / 15.0f;  // the span, until unit is known
      span_max = std::max(span_max, scale_of[c]);
    }
    const c10::Half unit_h(span_max / 16.0f);
    const float unit = unit_h;
    for (int64_t c = 0; c < dim; ++c) {
      const float span_code = std::clamp(std::ceil(scale_of[c] / (unit == 0.0f ? 1.0f : unit)), 1.0f, 16.0f);
      params[c] |= static_cast<uint8_t>(span_code - 1) << 4;
      scale_of[c] = span_code * unit;
    }
    std::memset(params + dim, 0, PARAMS_TAIL);
    const uint16_t stats[3] = {base_h.x, step_h.x, unit_h.x};
    std::memcpy(params + dim, stats, sizeof(stats));
    for (int64_t t = 0; t < block_size; ++t) {
      const float* x = rows + (t * heads + h) * dim;
      uint8_t* codes = const_cast<uint8_t*>(s.values) + ((block * block_size + t) * heads + h) * s.row_bytes;
      auto code = [&](int64_t c) {  // torch.round: halves to even, as nearbyint in the default mode
        const float scale = scale_of[c] == 0.0f ? 1.0f : scale_of[c];
        return static_cast<uint8_t>(std::clamp(std::nearbyint((x[c] - floor_of[c]) / scale), 0.0f, 15.0f));
      };
      for (int64_t c = 0; c < half; ++c) codes[c] = code(c) | (code(c + half) << 4);
    }
  }
}

// One head's `dim` values x into row `row` (slot * heads + head) of a cache side, in its type
// (kv_types.store's arithmetic: fp8 saturated, never NaN from a finite value).
void write_head(const cholla::KVSide& s, const float* x, int64_t row, int64_t head) {
  const int64_t dim = s.dim;
  uint8_t* dst = const_cast<uint8_t*>(s.values) + row * s.row_bytes;
  if (block_keys(s.kind)) {  // into its block's open slot; finish_kv_rows quantizes full blocks
    const int64_t slot = row / s.heads, open_slot = s.open_slot_of[slot / s.block_size];
    if (open_slot >= 0)  // (none: the step writes the block whole, from its rows)
      store_row(s.open_rows + ((open_slot * s.block_size + slot % s.block_size) * s.heads + head) * dim, x, dim);
    return;
  }
  float buffer[MAX_ROTATED_DIM];
  if (s.rotated) {  // (x - shift) / spread, then H: the values quantized are those of the rotated head
    for (int64_t i = 0; i < dim; ++i)
      buffer[i] = s.spread != nullptr ? (x[i] - s.shift[head * dim + i]) / s.spread[head * dim + i] : x[i];
    hadamard_(buffer, dim);
    x = buffer;
  }
  switch (s.kind) {
    case Kind::F32: std::memcpy(dst, x, dim * sizeof(float)); break;
    case Kind::BF16: store_row(reinterpret_cast<uint16_t*>(dst), x, dim); break;
    case Kind::F16:
      for (int64_t i = 0; i < dim; ++i) reinterpret_cast<uint16_t*>(dst)[i] = c10::Half(x[i]).x;
      break;
    case Kind::E4M3: {
      const float limit = 448.0f;
      for (int64_t i = 0; i < dim; ++i) dst[i] = c10::Float8_e4m3fn(std::isnan(x[i]) ? x[i] : std::clamp(x[i], -limit, limit)).x;
      break;
    }
    case Kind::E5M2: {
      const float limit = 57344.0f;
      for (int64_t i = 0; i < dim; ++i) dst[i] = c10::Float8_e5m2(std::isnan(x[i]) ? x[i] : std::clamp(x[i], -limit, limit)).x;
      break;
    }
    case Kind::INT8:
    case Kind::Q8_0: {
      const int64_t size = dim / s.groups;
      for (int64_t g = 0; g < s.groups; ++g)
        quantize_int8_group(x + g * size, size, reinterpret_cast<int8_t*>(dst) + g * size, s.scales + row * s.groups + g);
      break;
    }
    case Kind::Q4_0:
      for (int64_t g = 0; g < s.groups; ++g) quantize_q4_0_group(x + 32 * g, 32, dst + 16 * g, s.scales + row * s.groups + g);
      break;
    case Kind::E4M3_SCALED: quantize_fp8_head(x, dim, dst, s.scales + row); break;
    case Kind::Q4_HEAD: quantize_q4_0_group(x, dim, dst, s.scales + row); break;
    case Kind::Q4_CHANNEL:
    case Kind::E4M3_CENTERED: break;  // (above)
  }
}

// One token's kv_heads * dim values into cache slot `slot` of a side.
inline void write_row(const cholla::KVSide& s, const float* x, int64_t slot) {
  for (int64_t h = 0; h < s.heads; ++h) write_head(s, x + h * s.dim, slot * s.heads + h, h);
}

void check_new_rows(const at::Tensor& x, int64_t tokens, int64_t kv_heads, int64_t dim) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(0) == tokens && x.size(1) == kv_heads &&
                  x.size(2) == dim && x.stride(2) == 1 && x.stride(1) == dim,
              "write_kv: k and v must be fp32 [tokens, kv_heads, dim] with contiguous heads");
}

// The step's query rows (query_starts: int64 [seqs + 1], each sequence's first row, then the row count).
QueryRows query_rows(const std::optional<at::Tensor>& query_starts, int64_t rows, const int64_t* lens, int64_t seqs) {
  QueryRows out;
  out.count = rows;
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

// A member's jobs (see attention_parts; team.h) over a step's checked tables.
void attend_jobs(const at::Tensor& q, const cholla::KVSide& ks, const cholla::KVSide& vs,
                 const cholla::AttentionTables& t, double scale, int64_t window, double softcap, at::Tensor& out,
                 cholla::Member& member, int64_t parts) {
  const int64_t heads = q.size(1), n_jobs = q.size(0) * ks.heads * parts;
  for (int64_t begin, end; member.next(n_jobs, begin, end);)
    attend_decode(q.data_ptr<float>(), ks, vs, out.data_ptr<float>(), t.tables, t.lens, t.rows, begin, end, parts,
                  heads, t.max_blocks, static_cast<float>(scale), window, static_cast<float>(softcap));
}

// q and the caches checked; returns how many parts each (sequence, KV head) pair is cut into for `threads`.
int64_t plan_attention(const at::Tensor& q, const cholla::KVSide& ks, const cholla::KVSide& vs, int64_t threads) {
  const int64_t heads = q.size(1), kv_heads = ks.heads;
  TORCH_CHECK(ks.dim == q.size(2) && heads % kv_heads == 0, "paged_attention_decode: head shapes disagree");
  TORCH_CHECK(heads / kv_heads <= MAX_GROUP, "paged_attention_decode: more than ", MAX_GROUP, " query heads per KV head");
  return attention_parts(q.size(0), kv_heads, heads / kv_heads, threads);
}

// The kind of a cache side from its values' dtype and, for the integer types, its scales' shape.
Kind side_kind(const char* op, const at::Tensor& values, const at::Tensor* scales, int64_t& dim) {
  const auto type = values.scalar_type();
  dim = values.size(3);
  if (scales == nullptr) {
    TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf || type == at::kFloat8_e4m3fn ||
                    type == at::kFloat8_e5m2,
                op, ": a cache without scales must be fp32, bf16, fp16 or fp8");
    return type == at::kFloat ? Kind::F32 : type == at::kBFloat16 ? Kind::BF16 : type == at::kHalf ? Kind::F16
         : type == at::kFloat8_e4m3fn ? Kind::E4M3 : Kind::E5M2;
  }
  const int64_t groups = scales->size(3);
  if (type == at::kByte) {
    dim *= 2;
    TORCH_CHECK(groups * 32 == dim || (groups == 1 && dim % 32 == 0 && dim <= MAX_ROTATED_DIM), op,
                ": a 4-bit cache has one scale per 32 values (q4_0) or per head of a multiple of 32 values, "
                "at most ", MAX_ROTATED_DIM);
    return groups * 32 == dim ? Kind::Q4_0 : Kind::Q4_HEAD;
  }
  if (type == at::kFloat8_e4m3fn) {
    TORCH_CHECK(groups == 1, op, ": a scaled fp8 cache has one scale per head");
    return Kind::E4M3_SCALED;
  }
  TORCH_CHECK(type == at::kChar && (groups == 1 || groups * 32 == dim),
              op, ": an int8 cache has one scale per head (int8) or per 32 values (q8_0)");
  return groups == 1 ? Kind::INT8 : Kind::Q8_0;
}

// q4_kivi's key side (kv_types.ScaledKV with open_blocks): codes uint8 [blocks, block_size,
// heads, dim / 2], quant [params uint8 [blocks, heads, dim + 16], the open blocks' rows bf16
// [open_slots, block_size, heads, dim], their slots int64 [blocks]].
cholla::KVSide channel_side(const char* op, const at::Tensor& values, at::TensorList quant, bool rotated) {
  const at::Tensor &params = quant[0], &rows = quant[1], &slot_of = quant[2];
  cholla::KVSide side{};
  const bool centered = values.scalar_type() == at::kFloat8_e4m3fn;
  side.kind = centered ? Kind::E4M3_CENTERED : Kind::Q4_CHANNEL;
  side.blocks = values.size(0), side.block_size = values.size(1), side.heads = values.size(2);
  side.dim = centered ? values.size(3) : 2 * values.size(3);
  side.params_width = centered ? 2 * side.dim + 2 * side.block_size + PARAMS_TAIL : side.dim + PARAMS_TAIL;
  TORCH_CHECK((centered || (values.scalar_type() == at::kByte && side.dim % 32 == 0)) && !rotated &&
                  side.dim <= MAX_ROTATED_DIM, op,
              ": keys with statistics per block are unrotated e4m3 (fp8_e4m3_centered) or uint8 codes of a "
              "head_dim that is a multiple of 32 (q4_kivi), at most ", MAX_ROTATED_DIM, " values");
  TORCH_CHECK(params.scalar_type() == at::kByte && params.is_contiguous() &&
                  params.sizes() == at::IntArrayRef({side.blocks, side.heads, side.params_width}),
              op, ": key statistics per block must be contiguous uint8 [blocks, kv_heads, ", side.params_width, "]");
  TORCH_CHECK(rows.scalar_type() == at::kBFloat16 && rows.is_contiguous() && rows.dim() == 4 &&
                  rows.sizes().slice(1) == at::IntArrayRef({side.block_size, side.heads, side.dim}),
              op, ": q4_kivi open rows must be contiguous bf16 [slots, block_size, kv_heads, dim]");
  TORCH_CHECK(slot_of.scalar_type() == at::kLong && slot_of.is_contiguous() && slot_of.numel() == side.blocks,
              op, ": q4_kivi's open slot of each block must be contiguous int64 [blocks]");
  side.values = static_cast<const uint8_t*>(values.data_ptr());
  side.row_bytes = values.size(3);
  side.params = params.data_ptr<uint8_t>();
  side.open_rows = static_cast<uint16_t*>(rows.data_ptr());
  side.open_slot_of = slot_of.data_ptr<int64_t>();
  side.open_slots = rows.size(0);
  return side;
}

}  // namespace

namespace cholla {

// values: contiguous [blocks, block_size, kv_heads, width] in the side's type; quant: [] (float
// types), [scales] or [scales, shift, spread] (kv_types.ScaledKV: fp16 scales
// [blocks, block_size, kv_heads, groups], fp32 shift and spread [kv_heads, dim]), or
// q4_kivi's keys' [params, open rows, open slots] (channel_side).
KVSide kv_side(const char* op, const at::Tensor& values, at::TensorList quant, bool rotated) {
  TORCH_CHECK(values.dim() == 4 && values.is_contiguous(), op,
              ": caches must be contiguous [blocks, block_size, kv_heads, dim]");
  TORCH_CHECK(quant.size() == 0 || quant.size() == 1 || quant.size() == 3, op,
              ": a cache side's quantization is [], [scales], [scales, shift, spread] or [params, open rows, open slots]");
  if (quant.size() == 3 && quant[0].scalar_type() == at::kByte) return channel_side(op, values, quant, rotated);
  const at::Tensor* scales = quant.empty() ? nullptr : &quant[0];
  KVSide side{};
  int64_t dim = 0;
  side.kind = side_kind(op, values, scales, dim);
  side.values = static_cast<const uint8_t*>(values.data_ptr());
  side.row_bytes = values.size(3) * values.element_size();
  side.blocks = values.size(0), side.block_size = values.size(1), side.heads = values.size(2), side.dim = dim;
  if (scales != nullptr) {
    TORCH_CHECK(scales->scalar_type() == at::kHalf && scales->is_contiguous() && scales->dim() == 4 &&
                    scales->sizes().slice(0, 3) == values.sizes().slice(0, 3),
                op, ": scales must be contiguous fp16 [blocks, block_size, kv_heads, groups]");
    side.scales = static_cast<uint16_t*>(scales->data_ptr());
    side.groups = scales->size(3);
  }
  side.rotated = rotated;
  if (rotated)
    TORCH_CHECK(dim > 0 && (dim & (dim - 1)) == 0 && dim <= MAX_ROTATED_DIM, op,
                ": a rotated cache needs a power-of-two head_dim up to ", MAX_ROTATED_DIM);
  if (quant.size() == 3) {
    TORCH_CHECK(rotated, op, ": a calibrated cache is a rotated one");
    for (int i = 1; i < 3; ++i)
      TORCH_CHECK(quant[i].scalar_type() == at::kFloat && quant[i].is_contiguous() &&
                      quant[i].sizes() == at::IntArrayRef({side.heads, dim}),
                  op, ": shift and spread must be contiguous fp32 [kv_heads, dim]");
    side.shift = quant[1].data_ptr<float>();
    side.spread = quant[2].data_ptr<float>();
  }
  return side;
}

// Both kernels' caches: K and V of one geometry (their types may differ).
void check_sides(const char* op, const KVSide& k, const KVSide& v) {
  TORCH_CHECK(k.blocks == v.blocks && k.block_size == v.block_size && k.heads == v.heads && k.dim == v.dim, op,
              ": the K and V caches must have the same blocks, heads and head_dim");
  TORCH_CHECK(!block_keys(v.kind), op, ": statistics per block (q4_kivi, fp8_e4m3_centered) are a key side's");
}

// q: fp32 [rows, heads, dim]; k_cache, v_cache: [blocks, block_size, kv_heads, dim] in any
// kv_types type (k_quant, v_quant, *_rotated: see kv_side); block_tables: int64 [seqs, max_blocks];
// context_lens: int64 [seqs], the new tokens included (their keys and values already written).
// query_starts: int64 [seqs + 1], where each sequence's query rows start (its last q_len
// positions, causal among themselves), or None: one row per sequence. window > 0: a key is
// visible only if fewer than `window` positions back; softcap > 0: scores -> softcap * tanh(s / softcap).
at::Tensor paged_attention_decode(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window, double softcap, at::TensorList k_quant, at::TensorList v_quant,
                                  bool k_rotated, bool v_rotated, const std::optional<at::Tensor>& query_starts) {
  TORCH_CHECK(q_in.dim() == 3 && q_in.scalar_type() == at::kFloat, "paged_attention_decode: q must be fp32 [rows, heads, dim]");
  const at::Tensor q = q_in.contiguous();
  const KVSide ks = kv_side("paged_attention_decode", k_cache, k_quant, k_rotated);
  const KVSide vs = kv_side("paged_attention_decode", v_cache, v_quant, v_rotated);
  check_sides("paged_attention_decode", ks, vs);
  const int64_t parts = plan_attention(q, ks, vs, at::get_num_threads());
  const AttentionTables tables = attention_tables(block_tables, context_lens, query_starts, q.size(0), ks);
  at::Tensor out = at::zeros_like(q);
  run_as_team([&](Member& member) { attend_jobs(q, ks, vs, tables, scale, window, softcap, out, member, parts); });
  return out;
}

AttentionTables attention_tables(const at::Tensor& block_tables, const at::Tensor& context_lens,
                                 const std::optional<at::Tensor>& query_starts, int64_t rows, const KVSide& side) {
  AttentionTables t;
  t.block_tables = block_tables.to(at::kLong).contiguous();
  t.context_lens = context_lens.to(at::kLong).contiguous();
  const int64_t seqs = t.context_lens.numel(), block_size = side.block_size;
  TORCH_CHECK(t.block_tables.dim() == 2 && t.block_tables.size(0) == seqs,
              "paged_attention_decode: one block table and context length per sequence");
  t.max_blocks = t.block_tables.size(1);
  t.tables = t.block_tables.data_ptr<int64_t>();
  t.lens = t.context_lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < seqs; ++s)  // (query_rows compares the spans with them)
    TORCH_CHECK(t.lens[s] >= 1 && t.lens[s] <= t.max_blocks * block_size, "paged_attention_decode: bad context length");
  t.rows = query_rows(query_starts, rows, t.lens, seqs);
  for (int64_t r = 0; r < rows; ++r) {  // the blocks each row reads
    const int64_t s = t.rows.sequence(r);
    for (int64_t b = 0; b < (t.rows.visible(r, t.lens) + block_size - 1) / block_size; ++b)
      TORCH_CHECK(t.tables[s * t.max_blocks + b] >= 0 && t.tables[s * t.max_blocks + b] < side.blocks,
                  "paged_attention_decode: block id out of range");
  }
  return t;
}

// A member's part of the jobs, into out (fp32, q's shape).
void paged_attention_part(const at::Tensor& q, const KVSide& ks, const KVSide& vs, const AttentionTables& tables,
                          double scale, int64_t window, double softcap, at::Tensor& out, Member& member) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous() && out.sizes() == q.sizes() &&
                  out.scalar_type() == at::kFloat && out.is_contiguous() && q.size(0) == tables.rows.count,
              "paged_attention_part: q and out must be contiguous fp32 [rows, heads, dim], a row per table row");
  const int64_t parts = plan_attention(q, ks, vs, member.members());
  attend_jobs(q, ks, vs, tables, scale, window, softcap, out, member, parts);
}

void write_kv_row(const float* k, const float* v, const KVSide& k_cache, const KVSide& v_cache, int64_t slot) {
  write_row(k_cache, k, slot);
  write_row(v_cache, v, slot);
}

// kv_types._store_channel's arithmetic, once kv_types.open_for_write has given every block the
// step writes part-way an open slot (and none to a block it writes whole): a block whose last
// slot is written is quantized from its open rows, a block written whole from the step's rows
// (rounded to bf16, as kept in a slot), the others are marked open.
void finish_kv_rows(const KVSide& s, const float* k, int64_t k_stride, const int64_t* slots, int64_t tokens) {
  if (!block_keys(s.kind)) return;
  const int64_t block_size = s.block_size, heads = s.heads, dim = s.dim, width = heads * dim;
  std::vector<std::pair<int64_t, int64_t>> by_block(tokens);  // (block, token)
  for (int64_t t = 0; t < tokens; ++t) by_block[t] = {slots[t] / block_size, t};
  std::sort(by_block.begin(), by_block.end());
  std::vector<float> rows(block_size * width);
  for (size_t i = 0, j; i < by_block.size(); i = j) {
    const int64_t block = by_block[i].first, open_slot = s.open_slot_of[block];
    bool last = false;
    for (j = i; j < by_block.size() && by_block[j].first == block; ++j)
      last = last || slots[by_block[j].second] % block_size == block_size - 1;
    if (open_slot < 0) {  // written whole by this step
      std::vector<bool> seen(block_size, false);
      for (size_t r = i; r < j; ++r) {
        const int64_t t = by_block[r].second, offset = slots[t] % block_size;
        TORCH_CHECK(j - i == static_cast<size_t>(block_size) && !seen[offset],
                    "write_kv: a q4_kivi key block written part-way needs an open slot (kv_types.open_for_write)");
        seen[offset] = true;
        for (int64_t e = 0; e < width; ++e) rows[offset * width + e] = static_cast<float>(c10::BFloat16(k[t * k_stride + e]));
      }
      quantize_channel_block(s, block, rows.data());
    } else if (last) {
      const uint16_t* open = s.open_rows + open_slot * block_size * width;
      for (int64_t e = 0; e < block_size * width; ++e) {
        const uint32_t bits = static_cast<uint32_t>(open[e]) << 16;
        std::memcpy(&rows[e], &bits, sizeof(float));
      }
      quantize_channel_block(s, block, rows.data());
    } else {
      for (int64_t h = 0; h < heads; ++h)
        s.params[(block * heads + h) * s.params_width + s.params_width - PARAMS_TAIL + OPEN_FLAG_AT] = OPEN;
    }
  }
}

// Writes this step's keys and values (fp32 [tokens, kv_heads, dim], token stride
// free: views into the fused q/k/v projection) into their cache slots, in the
// cache's type on the way (kv_types.store's arithmetic): one pass instead of a
// conversion (or quantization) and an index_copy_ per tensor.
void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
              const at::Tensor& slot_mapping_in, at::TensorList k_quant, at::TensorList v_quant, bool k_rotated,
              bool v_rotated) {
  const KVSide ks = kv_side("write_kv", k_cache, k_quant, k_rotated);
  const KVSide vs = kv_side("write_kv", v_cache, v_quant, v_rotated);
  check_sides("write_kv", ks, vs);
  const at::Tensor slot_mapping = slot_mapping_in.to(at::kLong).contiguous();
  const int64_t tokens = slot_mapping.numel(), slot_count = ks.blocks * ks.block_size;
  check_new_rows(k, tokens, ks.heads, ks.dim);
  check_new_rows(v, tokens, vs.heads, vs.dim);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(slots[t] >= 0 && slots[t] < slot_count, "write_kv: slot out of range");
  const float* ks_data = k.data_ptr<float>();
  const float* vs_data = v.data_ptr<float>();
  const int64_t row = ks.heads * ks.dim;
  at::parallel_for(0, tokens, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(row, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      write_kv_row(ks_data + t * k.stride(0), vs_data + t * v.stride(0), ks, vs, slots[t]);
  });
  finish_kv_rows(ks, ks_data, k.stride(0), slots, tokens);
}

}  // namespace cholla

TORCH_LIBRARY_FRAGMENT(cholla, m) {
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
        "Tensor[] k_quant, Tensor[] v_quant, bool k_rotated=False, bool v_rotated=False) -> ()");
  m.def("paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window, float softcap, Tensor[] k_quant, Tensor[] v_quant, "
        "bool k_rotated=False, bool v_rotated=False, Tensor? query_starts=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(cholla, CPU, m) {
  m.impl("write_kv", &cholla::write_kv);
  m.impl("paged_attention_decode", &cholla::paged_attention_decode);
}
