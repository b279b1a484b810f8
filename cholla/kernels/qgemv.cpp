// Matrix-vector products for decode steps, straight from GGUF blocks.
//
// A decode step multiplies one activation row (or a few) by every weight of
// the model, so it is bound by reading the weights: the kernels here aim to
// consume blocks as fast as memory delivers them.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "blocks.h"
#include "ops.h"
#include "simd.h"

namespace {

// The few-rows path (decode): each weight row is dequantized into registers
// and multiplied with the M rows of x by fp32 FMAs, exactly. Cost grows with M
// (two FMAs per 32 weights per row of x), so it serves steps of at most
// GEMV_MAX_ROWS rows.
constexpr int64_t GEMV_MAX_ROWS = 8;
constexpr int64_t GEMV_JOB_ROWS = 16;

template <int M>
void gemv_rows(const Segment& seg, int64_t first, int64_t last, const float* x, int64_t k, float* y,
               int64_t n_total) {
  for (int64_t n = first; n < last; ++n) {
    prefetch(seg.data + (n + PREFETCH_ROWS) * seg.row_bytes, seg.row_bytes);
    __m512 acc_lo[M], acc_hi[M];  // two chains per row of x: FMA latency, not throughput, would bound one
    for (int r = 0; r < M; ++r) acc_lo[r] = acc_hi[r] = _mm512_setzero_ps();
    for_each_group(seg.type, seg.data + n * seg.row_bytes, k, [&](int64_t at, __m512 lo, __m512 hi) {
      for (int r = 0; r < M; ++r) {
        acc_lo[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + r * k + at), acc_lo[r]);
        acc_hi[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + r * k + at + 16), acc_hi[r]);
      }
    });
    for (int r = 0; r < M; ++r)
      y[r * n_total + seg.out_offset + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc_lo[r], acc_hi[r]));
  }
}

using GemvRows = void (*)(const Segment&, int64_t, int64_t, const float*, int64_t, float*, int64_t);

constexpr GemvRows GEMV_BY_ROWS[GEMV_MAX_ROWS] = {gemv_rows<1>, gemv_rows<2>, gemv_rows<3>, gemv_rows<4>,
                                                  gemv_rows<5>, gemv_rows<6>, gemv_rows<7>, gemv_rows<8>};

// ---- The integer path (bfloat16 mode): int8 activations, VNNI dot products ----
//
// Dequantizing to fp32 costs a widening shuffle, conversions and FMAs per 32
// weights, and bounds the exact GEMV at about half of memory speed. Here, as in
// llama.cpp, x is quantized per block of 32 to int8 (dx = max|x| / 127) and the
// weights' own small integers meet it in VPDPBUSD (64 byte products per
// instruction), with no conversion at all. Scales are applied once per block:
// each block's integer sum is reduced to one lane, sixteen blocks at a time, and
// the sixteen weight scales arrive in one gather.
//
// Σ_i w_i x_i over a block, with w = d (q + bias) + m' and x ≈ dx xq:
//   d (dx Σ q xq + bias dx Σ xq) + m' Σ x.
// The bias centres q (Q4: -8, Q5: -16) so that x's rounding error meets small
// factors; formats with a min m take m' = m - bias d, whose term uses x's exact
// sum. (Leaving Q4_1 uncentred, as q8_1 dot products do, made its error 4x
// larger.) Q8_0's signed weights are offset by 128 to fit VPDPBUSD's unsigned
// operand (bias -128). Q4_K's and Q5_K's sub-blocks of 32 are blocks here, each
// with its own d = d_super * scale and m = -dmin * min.
//
// Q6_K (w = d_super * scale * (q - 32), an int8 scale per 16 weights) has no
// min, but its scale changes within a block: each 16 weights' integer sums are
// multiplied by their scale before the block is reduced, and start from
// -32 Σ xq of their x (precomputed per 4 bytes of x), so that they are sums of
// (q - 32) xq. Its blocks' d is d_super and its bias 0.

constexpr int64_t GROUP_BLOCKS = 16;  // blocks reduced together

// The int8 product's row limits: the GEMV serves up to INT8_GEMV_MAX_ROWS rows
// (ops.h), the batched product below up to INT8_BATCH_MAX_ROWS where every weight has
// an integer kernel (on Zen 5, one thread, its cost stays flat up to 16 rows and
// it beat the GEMV from 7: benchmarks/batched_products.py).
using cholla::INT8_GEMV_MAX_ROWS;
constexpr int64_t INT8_BATCH_MAX_ROWS = 64;

// How far ahead of its group the walk asks for weights. In bytes, not rows:
// eight of SmolLM2's short rows (2.9 KB) left its 576-wide GEMVs waiting on
// memory; 4-16 KB all did better (its decode layers 3.0 -> 2.8 ms).
constexpr int64_t PREFETCH_AHEAD = 8192;
// Q8_0_PREFETCH: Q8_0 weights (the output heads of SmolLM2 and Gemma 3) are asked for
// non-temporally (NTA), the others into L2 (blocks.h's prefetch). SmolLM2's 30 MB head, read
// from L3, went 645-656 -> 602-608 us on one thread; single-stream decode at two threads
// 1.00-1.06x for SmolLM2 and 1.05x for Gemma 3 (its 168 MB head from memory), on a busy machine
// (docs/benchmarks.md, "SmolLM2's single stream: the Q4_1 scales without a gather").

// Position p of a group's reduced vector holds block group_block(p) (see sum_blocks); an involution.
constexpr int group_block(int p) { return 4 * (p % 4) + p / 4; }

// One row of x, quantized, laid out for the flat walk of int_dot: the walk
// reads x at block f mod `period`, so the row is written out as many times as
// make whole groups of 16 blocks (period = lcm(blocks, 16): SmolLM2's rows of 18
// blocks take 8 copies, Gemma's of 20 take 4, rows of 48 one).
//
// Four blocks at a time take 128 bytes in each layout: `natural` (Q8_0 reads 32
// weights of a block in order), `nibbles` (Q4_0 to Q5_1 hold weights 0-15 of a
// block in the low nibbles of 16 bytes and 16-31 in the high ones: first the
// four blocks' first halves, then their second) and `k_quant` (Q4_K's 32 bytes
// hold block 2j in their low nibbles and 2j+1 in the high ones: blocks 0 and 2,
// then 1 and 3; Q5_K alike). Q6_K reads `natural` and beside it `q6_k_start`:
// for each 4 bytes of `natural`, -32 times their sum (int32), where its
// VPDPBUSD sums start. Per block, in group_block order within each group: dx,
// qsum = dx Σ xq and the exact sum Σ x.
struct QuantizedRow {
  int64_t period;
  const int8_t* bytes;    // natural, nibbles, k_quant, q6_k_start: period * 32 each
  const float* numbers;   // dx, qsum, sum: period each

  const int8_t* natural() const { return bytes; }
  const int8_t* nibbles() const { return bytes + period * 32; }
  const int8_t* k_quant() const { return bytes + 2 * period * 32; }
  const int8_t* q6_k_start() const { return bytes + 3 * period * 32; }
  const float* dx() const { return numbers; }
  const float* qsum() const { return numbers + period; }
  const float* sum() const { return numbers + 2 * period; }
};

// The layouts the int8 path reads for a type (a bit each): natural (Q8_0, Q6_K),
// nibbles (Q4_0 to Q5_1), k_quant (Q4_K, Q5_K), q6_k_start (Q6_K).
enum Layout : unsigned { NATURAL = 1, NIBBLES = 2, K_QUANT = 4, Q6_K_START = 8 };

inline unsigned layout_of(int64_t type) {
  switch (type) {
    case Q8_0: return NATURAL;
    case Q4_K:
    case Q5_K: return K_QUANT;
    case Q6_K: return NATURAL | Q6_K_START;
    default: return NIBBLES;
  }
}

// x's row in the `layouts` asked for (natural always: the others are cut from
// its copies; the rest are left as they were), into `bytes` (4 * period * 32)
// and `numbers` (3 * period + 3 * k / 32, the tail scratch).
//
// Every member quantizes x for every product of a decode step (a copy another
// core had just written cost ~1 us to read), so the copies are made in
// vectors: the row's natural copies whole, each four blocks' other layouts by
// two 128-bit-lane shuffles of their natural 128 bytes, and each group's
// numbers by gathers. (Block by block, a 576-wide row's 144 copies took most
// of the call.)
QuantizedRow quantize_row(const float* x, int64_t k, unsigned layouts, int8_t* bytes, float* numbers) {
  const int64_t blocks = k / 32, period = std::lcm(blocks, GROUP_BLOCKS);
  int8_t* natural = bytes;
  float* first = numbers + 3 * period;  // dx, qsum, sum of the row's blocks
  for (int64_t b = 0; b < blocks; ++b) {  // the first copy, in natural order
    const __m512 lo = _mm512_loadu_ps(x + 32 * b), hi = _mm512_loadu_ps(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float d = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));  // round to nearest
    const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(natural + 32 * b), _mm512_cvtepi32_epi8(qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(natural + 32 * b + 16), _mm512_cvtepi32_epi8(qhi));
    first[b] = d;
    first[blocks + b] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)));
    first[2 * blocks + b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
  }
  for (int64_t copy = blocks; copy < period; copy += blocks) std::memcpy(natural + 32 * copy, natural, 32 * blocks);
  // Four blocks' natural 128 bytes are 128-bit lanes (lo, hi halves) b0 b0 b1 b1 | b2 b2 b3 b3.
  for (int64_t f = 0; f < period; f += 4) {
    const __m512i v0 = _mm512_loadu_si512(natural + 32 * f), v1 = _mm512_loadu_si512(natural + 32 * f + 64);
    if (layouts & NIBBLES) {  // the four first halves, then the four second ones
      int8_t* four = bytes + period * 32 + 32 * f;
      _mm512_storeu_si512(four, _mm512_shuffle_i64x2(v0, v1, _MM_SHUFFLE(2, 0, 2, 0)));
      _mm512_storeu_si512(four + 64, _mm512_shuffle_i64x2(v0, v1, _MM_SHUFFLE(3, 1, 3, 1)));
    }
    if (layouts & K_QUANT) {  // blocks 0 and 2, then 1 and 3
      int8_t* four = bytes + 2 * period * 32 + 32 * f;
      _mm512_storeu_si512(four, _mm512_shuffle_i64x2(v0, v1, _MM_SHUFFLE(1, 0, 1, 0)));
      _mm512_storeu_si512(four + 64, _mm512_shuffle_i64x2(v0, v1, _MM_SHUFFLE(3, 2, 3, 2)));
    }
  }
  // Position p of group g holds block 16 g + group_block(p), i.e. the row's block of that number mod `blocks`.
  const __m512i in_group = _mm512_set_epi32(group_block(15), group_block(14), group_block(13), group_block(12),
                                            group_block(11), group_block(10), group_block(9), group_block(8),
                                            group_block(7), group_block(6), group_block(5), group_block(4),
                                            group_block(3), group_block(2), group_block(1), group_block(0));
  const __m512i row_blocks = _mm512_set1_epi32(static_cast<int32_t>(blocks));
  for (int64_t g = 0; g < period; g += GROUP_BLOCKS) {
    __m512i index = _mm512_add_epi32(in_group, _mm512_set1_epi32(static_cast<int32_t>(g % blocks)));
    for (__mmask16 over; (over = _mm512_cmpge_epi32_mask(index, row_blocks)) != 0;)
      index = _mm512_mask_sub_epi32(index, over, index, row_blocks);
    for (int i = 0; i < 3; ++i)
      _mm512_storeu_ps(numbers + i * period + g, _mm512_i32gather_ps(index, first + i * blocks, 4));
  }
  if (layouts & Q6_K_START) {  // period is a multiple of 16 blocks: whole vectors of 64 bytes
    const __m512i minus_32 = _mm512_set1_epi32(-32), ones = _mm512_set1_epi8(1);
    for (int64_t at = 0; at < period * 32; at += 64) {
      const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(natural + at));
      _mm512_storeu_si512(bytes + 3 * period * 32 + at, _mm512_mullo_epi32(sums, minus_32));
    }
  }
  return {period, bytes, numbers};
}

struct IntFormat {
  int64_t bytes, qs, qh;  // block size, offsets of the quants and of the high bits (-1: none)
  bool has_min;           // the block has a min m
  float bias;             // q + bias is the weight over d, less the min
  int64_t blocks = 1;     // blocks of 32 per unit of `bytes` (K-quants: 8 sub-blocks in a super-block)
  int64_t scales = 1;     // scales d per block of 32 (Q6_K: one per 16 weights)
};

constexpr IntFormat int_format(int64_t type) {
  switch (type) {
    case Q4_0: return {18, 2, -1, false, -8.0f};
    case Q4_1: return {20, 4, -1, true, -8.0f};
    case Q5_0: return {22, 6, 2, false, -16.0f};
    case Q5_1: return {24, 8, 4, true, -16.0f};
    case Q8_0: return {34, 2, -1, false, -128.0f};
    case Q4_K: return {144, 16, -1, true, -8.0f, 8};
    case Q5_K: return {176, 48, 16, true, -16.0f, 8};
    case Q6_K: return {210, 0, 128, false, 0.0f, 8, 2};  // bias 0: the sums start at -32 Σ xq
    default: return {0, 0, -1, false, 0.0f};
  }
}

// Loads 16 bytes, or zeros for a block past the row's end (TAIL: masked, never faults).
template <bool TAIL>
inline __m128i load16(const uint8_t* p, bool present) {
  if (TAIL) return _mm_maskz_loadu_epi8(present ? 0xFFFF : 0, p);
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// The weights of four blocks (`count` of them real; TAIL: the rest read as
// zeros) as VPDPBUSD's unsigned operands: two vectors, each meeting 64 bytes of
// x; for Q6_K also each vector's four scales, one per 128-bit lane (int32).
struct FourBlocks {
  __m512i first, second;
  __m512i first_scales = _mm512_setzero_si512(), second_scales = _mm512_setzero_si512();  // Q6_K only
};

// Shift counts per 16-bit word: 0 in the low 256 bits, 2 in the high ones.
inline __m512i shift_0_2() { return _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1); }

// Blocks 4i .. 4i+3 of a group (K-quants: of 2 super-blocks, half i % 2 of super-block i / 2).
template <int64_t TYPE, bool TAIL>
inline FourBlocks load_four_blocks(const uint8_t* group, int i, int count) {
  constexpr IntFormat f = int_format(TYPE);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  if constexpr (TYPE == Q4_K || TYPE == Q5_K) {  // 64 bytes of quants, sub-blocks 0 and 2 low, 1 and 3 high
    const uint8_t* super = group + (i / 2) * f.bytes;
    const int half = i % 2;
    const __m512i v = _mm512_loadu_si512(super + f.qs + 64 * half);
    __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    if constexpr (TYPE == Q5_K) {  // the 5th bit of sub-block j's weight l is bit j of qh[l]
      const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(super + f.qh)));
      // bit 0 of each byte: sub-block 4 half (low 32 bytes) or 4 half + 2 (high); bit 1: the next ones
      const __m512i bits = _mm512_srlv_epi16(qh, _mm512_add_epi16(shift_0_2(), _mm512_set1_epi16(4 * half)));
      const __m512i fifth = _mm512_set1_epi8(0x10);
      lo = _mm512_or_si512(lo, _mm512_and_si512(_mm512_slli_epi16(bits, 4), fifth));
      hi = _mm512_or_si512(hi, _mm512_and_si512(_mm512_slli_epi16(bits, 3), fifth));
    }
    return {lo, hi};
  } else if constexpr (TYPE == Q6_K) {
    // Half h of a super-block: 64 bytes ql, 32 bytes qh, 8 scales. Weight l of
    // block 0 (1) is ql[l] (ql[32 + l]) & 15 with bits 0-1 (2-3) of qh[l] on
    // top; blocks 2 and 3 take the high nibbles and bits 4-5, 6-7.
    const uint8_t* super = group + (i / 2) * f.bytes;
    const int half = i % 2;
    const __m512i ql = _mm512_loadu_si512(super + f.qs + 64 * half);
    const __m512i qh = _mm512_broadcast_i64x4(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(super + f.qh + 32 * half)));
    const __m512i bits = _mm512_srlv_epi16(qh, shift_0_2()), high2 = _mm512_set1_epi8(0x30);
    const __m512i first = _mm512_or_si512(_mm512_and_si512(ql, low4),
                                          _mm512_and_si512(_mm512_slli_epi16(bits, 4), high2));
    const __m512i second = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low4),
                                           _mm512_and_si512(bits, high2));
    // the half's 8 int8 scales, one per 16 weights
    const __m512i scales = _mm512_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(super + 192 + 8 * half)));
    const __m512i first_at = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    return {first, second, _mm512_permutexvar_epi32(first_at, scales),
            _mm512_permutexvar_epi32(_mm512_add_epi32(first_at, _mm512_set1_epi32(4)), scales)};
  } else if constexpr (TYPE == Q8_0) {  // two blocks of 32 signed bytes per vector, offset to unsigned
    __m512i w[2];
    for (int h = 0; h < 2; ++h) {
      const uint8_t* p = group + (4 * i + 2 * h) * f.bytes + f.qs;
      __m256i a, b;
      if (TAIL) {
        a = _mm256_maskz_loadu_epi8(2 * h < count ? ~0u : 0u, p);
        b = _mm256_maskz_loadu_epi8(2 * h + 1 < count ? ~0u : 0u, p + f.bytes);
      } else {
        a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + f.bytes));
      }
      w[h] = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1), _mm512_set1_epi8(-128));
    }
    return {w[0], w[1]};
  } else {  // 16 bytes of nibbles per block: the low nibbles of all four, then the high ones
    const uint8_t* blocks = group + 4 * i * f.bytes;
    const uint8_t* p = blocks + f.qs;
    __m512i v = _mm512_castsi128_si512(load16<TAIL>(p, true));
    v = _mm512_inserti32x4(v, load16<TAIL>(p + f.bytes, 1 < count), 1);
    v = _mm512_inserti32x4(v, load16<TAIL>(p + 2 * f.bytes, 2 < count), 2);
    v = _mm512_inserti32x4(v, load16<TAIL>(p + 3 * f.bytes, 3 < count), 3);
    __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    if constexpr (f.qh >= 0) {  // the 5th bit of weight j is bit j of the block's qh
      uint64_t lo_bits = 0, hi_bits = 0;
      for (int b = 0; b < 4; ++b) {
        if (TAIL && b >= count) break;
        uint32_t qh;
        std::memcpy(&qh, blocks + b * f.bytes + f.qh, 4);
        lo_bits |= static_cast<uint64_t>(qh & 0xFFFF) << (16 * b);
        hi_bits |= static_cast<uint64_t>(qh >> 16) << (16 * b);
      }
      const __m512i sixteen = _mm512_set1_epi8(16);
      lo = _mm512_mask_add_epi8(lo, lo_bits, lo, sixteen);
      hi = _mm512_mask_add_epi8(hi, hi_bits, hi, sixteen);
    }
    return {lo, hi};
  }
}

// Four blocks of weights against 128 bytes of one row of x (in the layout the
// type reads; Q6_K: `start`, its sums' start, at the same offset in
// q6_k_start): lane L (128 bits) of the result holds four partial sums of block L.
template <int64_t TYPE>
inline __m512i four_block_sums(const FourBlocks& w, const int8_t* x, const int8_t* start) {
  if constexpr (TYPE == Q6_K) {  // sums of (q - 32) xq, each 16 weights' times their scale
    const __m512i s0 = _mm512_mullo_epi32(
        _mm512_dpbusd_epi32(_mm512_loadu_si512(start), w.first, _mm512_loadu_si512(x)), w.first_scales);
    const __m512i s1 = _mm512_mullo_epi32(
        _mm512_dpbusd_epi32(_mm512_loadu_si512(start + 64), w.second, _mm512_loadu_si512(x + 64)), w.second_scales);
    return _mm512_add_epi32(_mm512_shuffle_i32x4(s0, s1, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(s0, s1, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  const __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.first, _mm512_loadu_si512(x));
  if constexpr (TYPE == Q8_0 || TYPE == Q4_K || TYPE == Q5_K) {
    const __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.second, _mm512_loadu_si512(x + 64));
    // s0: lanes 0-1 block 0, 2-3 block 1; s1 likewise for blocks 2, 3 (Q4_K, Q5_K: blocks 0, 2, 1, 3).
    return _mm512_add_epi32(_mm512_shuffle_i32x4(s0, s1, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(s0, s1, _MM_SHUFFLE(3, 1, 3, 1)));
  } else {
    return _mm512_dpbusd_epi32(s0, w.second, _mm512_loadu_si512(x + 64));
  }
}

// Four vectors of four_block_sums (blocks 4i + L in lane L of s[i]) -> one
// vector of sixteen block totals, block group_block(p) at position p.
inline __m512i sum_blocks(const __m512i s[4]) {
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(s[0], s[1]), _mm512_unpackhi_epi32(s[0], s[1]));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(s[2], s[3]), _mm512_unpackhi_epi32(s[2], s[3]));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
}

// Per count: the positions p of a group that hold its first `count` blocks (group_block(p) < count).
struct PresentBlocks {
  __mmask16 mask[GROUP_BLOCKS + 1];
  constexpr PresentBlocks() : mask() {
    for (int count = 0; count <= GROUP_BLOCKS; ++count)
      for (int p = 0; p < GROUP_BLOCKS; ++p)
        if (group_block(p) < count) mask[count] |= static_cast<__mmask16>(1u << p);
  }
};
constexpr PresentBlocks PRESENT_BLOCKS{};

// The first 32 bits (d, m) of a whole group's 16 blocks, in group_block order, for the block
// formats whose blocks start on 32-bit words (Q4_1's 20 bytes, Q5_1's 24: WORDS words a block): the
// group's 5 or 6 vectors loaded whole (the lines the quants' loads read), their words picked
// by three permutes. The same bits as the gather in block_scales, which cost a quarter of a
// Q4_1 GEMV's time (one thread, from L2: 6.0 -> 4.6 us for SmolLM2's o projection).
template <int WORDS>
struct GroupWords {
  static constexpr int VECTORS = WORDS;  // 16 blocks of 4 WORDS bytes: WORDS vectors of 64 bytes
  static_assert(WORDS == 5 || WORDS == 6, "GroupWords: 20- or 24-byte blocks");
  // Per position p, block group_block(p)'s word w = WORDS * group_block(p): its index in the
  // permute that reads it (vectors 2j and 2j + 1 for pair j = w / 32), and the positions of each pair.
  int32_t index[16] = {};
  __mmask16 pair[3] = {};
  constexpr GroupWords() {
    for (int p = 0; p < 16; ++p) {
      const int w = WORDS * group_block(p);
      index[p] = w % 32;
      pair[w / 32] |= static_cast<__mmask16>(1u << p);
    }
  }
  static __m512i load(const uint8_t* group) {
    static constexpr GroupWords words{};
    const __m512i index = _mm512_loadu_si512(words.index);
    const auto v = [&](int i) { return _mm512_loadu_si512(group + 64 * i); };
    __m512i raw = _mm512_permutex2var_epi32(v(0), index, v(1));
    raw = _mm512_mask_mov_epi32(raw, words.pair[1], _mm512_permutex2var_epi32(v(2), index, v(3)));
    if constexpr (VECTORS == 5)  // words 64-79: the fifth vector alone (indices past 16 read it again)
      return _mm512_mask_permutexvar_epi32(raw, words.pair[2], index, v(4));
    else
      return _mm512_mask_mov_epi32(raw, words.pair[2], _mm512_permutex2var_epi32(v(4), index, v(5)));
  }
};

// The scale d and the shifted min m' = m - bias d of the group's `count` blocks,
// in group_block order (zero past the row's end).
template <int64_t TYPE>
inline void block_scales(const uint8_t* group, int64_t count, __m512i index, __m512 bias, __m512& d, __m512& m_shifted) {
  constexpr IntFormat f = int_format(TYPE);
  if constexpr (TYPE == Q6_K) {  // d_super per block (the int8 scales are applied to the sums)
    alignas(64) float scale[16] = {};
    for (int64_t p = 0; p < count; ++p) scale[group_block(static_cast<int>(p))] = f16(group + p / 8 * f.bytes + 208);
    d = _mm512_load_ps(scale);
  } else if constexpr (TYPE == Q4_K || TYPE == Q5_K) {  // per sub-block j: d * scale_j and -dmin * min_j, 6-bit packed
    alignas(64) float scale[16] = {}, min[16] = {};
    for (int64_t unit = 0; unit < count / 8; ++unit) {
      const uint8_t* super = group + unit * f.bytes;
      const float d_super = f16(super), dmin = f16(super + 2);
      for (int j = 0; j < 8; ++j) {
        int sc, mn;
        scale_min_k4(j, super + 4, sc, mn);
        const int p = group_block(static_cast<int>(8 * unit + j));
        scale[p] = d_super * static_cast<float>(sc);
        min[p] = -dmin * static_cast<float>(mn);
      }
    }
    d = _mm512_load_ps(scale);
    m_shifted = _mm512_fnmadd_ps(bias, d, _mm512_load_ps(min));
  } else {  // 32 bits at each block's start: d, then m for formats with a min
    __m512i raw;
    if (count < GROUP_BLOCKS)
      raw = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), PRESENT_BLOCKS.mask[count], index, group, 1);
    else if constexpr (f.bytes == 20 || f.bytes == 24)  // Q4_1, Q5_1: blocks on 32-bit words
      raw = GroupWords<static_cast<int>(f.bytes / 4)>::load(group);
    else
      raw = _mm512_i32gather_epi32(index, group, 1);
    d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(raw));
    if (f.has_min)
      m_shifted = _mm512_fnmadd_ps(bias, d, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(raw, 16))));
  }
}

// Σ w x of `rows` consecutive weight rows of `row_blocks` blocks each with the
// M rows of x: per weight row, M vectors whose lanes sum to it (the caller
// reduces 16 weight rows at once). Each block's weights are unpacked once for
// all M rows.
//
// The rows lie back to back, so the walk takes their blocks as one flat run, 16
// at a time, and hands each group's sums to the rows they belong to. Walked row
// by row, a row of 18 blocks (SmolLM2's 576 wide) cost a full group and a
// nearly empty one: a 576-wide GEMV from cache took 24 us, flat 19 us.
template <int64_t TYPE, int M>
void int_dot(const uint8_t* data, int64_t row_blocks, int64_t rows, int64_t ahead, const QuantizedRow* x,
             __m512 (*sums)[GEMV_MAX_ROWS]) {
  constexpr IntFormat f = int_format(TYPE);
  alignas(64) static constexpr int32_t offsets[16] = {
      group_block(0) * f.bytes,  group_block(1) * f.bytes,  group_block(2) * f.bytes,  group_block(3) * f.bytes,
      group_block(4) * f.bytes,  group_block(5) * f.bytes,  group_block(6) * f.bytes,  group_block(7) * f.bytes,
      group_block(8) * f.bytes,  group_block(9) * f.bytes,  group_block(10) * f.bytes, group_block(11) * f.bytes,
      group_block(12) * f.bytes, group_block(13) * f.bytes, group_block(14) * f.bytes, group_block(15) * f.bytes};
  const __m512i index = _mm512_load_si512(offsets);
  const __m512 bias = _mm512_set1_ps(f.bias);
  const int64_t total = rows * row_blocks, period = x[0].period;
  __m512 acc[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
  int64_t row = 0, row_end = row_blocks;  // the flat block where the current row ends
  for (int64_t first = 0; first < total; first += GROUP_BLOCKS) {
    const uint8_t* base = data + first / f.blocks * f.bytes;
    if constexpr (TYPE == Q8_0)  // (the output heads': see Q8_0_PREFETCH)
      for (int64_t b = 0; b < GROUP_BLOCKS * f.bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(base + ahead) + b, _MM_HINT_NTA);
    else
      prefetch(base + ahead, GROUP_BLOCKS / f.blocks * f.bytes);
    const int64_t count = std::min<int64_t>(GROUP_BLOCKS, total - first), at = first % period;
    __m512i s[M][4];
    for (int i = 0; i < 4; ++i) {
      FourBlocks w;
      if (count == GROUP_BLOCKS) {
        w = load_four_blocks<TYPE, false>(base, i, 4);
      } else if (4 * i < count) {
        w = load_four_blocks<TYPE, true>(base, i, static_cast<int>(count - 4 * i));
      } else {
        for (int r = 0; r < M; ++r) s[r][i] = _mm512_setzero_si512();
        continue;
      }
      for (int r = 0; r < M; ++r) {
        const int64_t offset = 32 * (at + 4 * i);
        const int8_t* xs = (TYPE == Q8_0 || TYPE == Q6_K   ? x[r].natural()
                            : TYPE == Q4_K || TYPE == Q5_K ? x[r].k_quant()
                                                           : x[r].nibbles()) + offset;
        s[r][i] = four_block_sums<TYPE>(w, xs, x[r].q6_k_start() + offset);
      }
    }
    __m512 d, m_shifted = _mm512_setzero_ps();  // m' = m - bias d
    block_scales<TYPE>(base, count, index, bias, d, m_shifted);
    __m512 group[M];  // each block's Σ w x, in group_block order (zero past the end)
    for (int r = 0; r < M; ++r) {
      __m512i totals = sum_blocks(s[r]);
      if constexpr (TYPE == Q4_K || TYPE == Q5_K)  // blocks 4i + (0, 2, 1, 3) came out in lanes 0-3: swap the middle lanes
        totals = _mm512_shuffle_i32x4(totals, totals, _MM_SHUFFLE(3, 1, 2, 0));
      const __m512 dots = _mm512_cvtepi32_ps(totals);
      const __m512 dx = _mm512_loadu_ps(x[r].dx() + at), qsum = _mm512_loadu_ps(x[r].qsum() + at);
      group[r] = _mm512_mul_ps(_mm512_fmadd_ps(qsum, bias, _mm512_mul_ps(dots, dx)), d);
      if (f.has_min) group[r] = _mm512_fmadd_ps(m_shifted, _mm512_loadu_ps(x[r].sum() + at), group[r]);
    }
    for (int64_t end = row_end - first; end <= count; end += row_blocks) {  // rows that end in this group
      const __mmask16 theirs = PRESENT_BLOCKS.mask[end];  // blocks before `end`
      for (int r = 0; r < M; ++r) {
        sums[row][r] = _mm512_mask_add_ps(acc[r], theirs, acc[r], group[r]);
        group[r] = _mm512_maskz_mov_ps(static_cast<__mmask16>(~theirs), group[r]);
        acc[r] = _mm512_setzero_ps();
      }
      ++row;
      row_end += row_blocks;
    }
    for (int r = 0; r < M; ++r) acc[r] = _mm512_add_ps(acc[r], group[r]);
  }
}

using IntDot = void (*)(const uint8_t*, int64_t, int64_t, int64_t, const QuantizedRow*, __m512 (*)[GEMV_MAX_ROWS]);

template <int64_t TYPE>
constexpr IntDot INT_DOT_BY_ROWS[GEMV_MAX_ROWS] = {int_dot<TYPE, 1>, int_dot<TYPE, 2>, int_dot<TYPE, 3>,
                                                   int_dot<TYPE, 4>, int_dot<TYPE, 5>, int_dot<TYPE, 6>,
                                                   int_dot<TYPE, 7>, int_dot<TYPE, 8>};

// Sixteen vectors -> one: lane i holds the sum of v[i]'s lanes. A tree of
// in-lane unpacks, then 128-bit shuffles: ~45 instructions, where reducing each
// vector by itself took ~10 apiece and was a quarter of a decode GEMV's time.
static_assert(GEMV_JOB_ROWS == 16, "sum_lanes reduces one job's 16 rows");
inline __m512 sum_lanes(const __m512 v[16]) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: v2i and v2i+1, two partial sums each
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane: the lane's sum of v4j .. v4j+3
    const __m512d a = _mm512_castps_pd(pairs[2 * j]), b = _mm512_castps_pd(pairs[2 * j + 1]);
    quads[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // Across the four 128-bit lanes: lane pairs (0, 1) and (2, 3), then the two halves.
  // (0x88 takes lanes 0 and 2 of each source, 0xDD lanes 1 and 3.)
  auto fold = [](__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  };
  return fold(fold(quads[0], quads[1]), fold(quads[2], quads[3]));
}

// The integer kernel for `rows` (1 to GEMV_MAX_ROWS) rows of x, or nullptr for types without one.
IntDot int_dot_for(int64_t type, int64_t rows) {
  switch (type) {
    case Q4_0: return INT_DOT_BY_ROWS<Q4_0>[rows - 1];
    case Q4_1: return INT_DOT_BY_ROWS<Q4_1>[rows - 1];
    case Q5_0: return INT_DOT_BY_ROWS<Q5_0>[rows - 1];
    case Q5_1: return INT_DOT_BY_ROWS<Q5_1>[rows - 1];
    case Q8_0: return INT_DOT_BY_ROWS<Q8_0>[rows - 1];
    case Q4_K: return INT_DOT_BY_ROWS<Q4_K>[rows - 1];
    case Q5_K: return INT_DOT_BY_ROWS<Q5_K>[rows - 1];
    case Q6_K: return INT_DOT_BY_ROWS<Q6_K>[rows - 1];
    default: return nullptr;
  }
}

// Whether every segment's weights have an integer kernel (the batched int8 product's types).
bool all_integer(const std::vector<Segment>& segments) {
  return std::all_of(segments.begin(), segments.end(),
                     [](const Segment& seg) { return int_dot_for(seg.type, 1) != nullptr; });
}

// ---- Batched steps (a few dozen sequences): x's rows in the lanes ----
//
// The GEMV above reduces each block's products across lanes, which costs about
// as much as the products themselves and grows with x's rows. For more rows the
// roles turn: a tile of 16 rows of x, quantized per block of 32 as above, lies
// in VPDPBUSD's layout ([8 quads][16 rows][4 bytes] per block), and each weight
// row meets it four of its bytes at a time, broadcast, so that one instruction
// makes four products for each of 16 rows and no lane is ever reduced. A job's 16
// weight rows are first unpacked from their blocks into unsigned bytes (16 rows
// x k: L1/L2 resident) with their scales d and shifted mins m' (the sum above,
// per block: d (dx Σ q xq + bias dx Σ xq) + m' Σ x), then meet every tile.
// The weights are read from memory once per call, as their own integers.

constexpr int64_t LANES = 16;     // rows of x per tile

// x's rows in tiles of LANES (rows past m are zero): per tile and block, 512
// bytes of int8 in VPDPBUSD's layout, then dx, bias-free qsum = dx Σ xq, and Σ x
// for each lane (3 x 16 floats). After all tiles' bytes, per tile and block
// Q6_K's starts: -32 Σ xq over the block's first and second 16 weights, for each
// lane (2 x 16 int32).
struct XTiles {
  int64_t tiles, blocks;
  const int8_t* q;
  const float* numbers;
  const int8_t* quads(int64_t t, int64_t b) const { return q + (t * blocks + b) * 512; }
  const int8_t* q6_k_starts(int64_t t, int64_t b) const { return q + (tiles * blocks) * 512 + (t * blocks + b) * 128; }
  const float* dx(int64_t t, int64_t b) const { return numbers + (t * blocks + b) * 3 * LANES; }
  const float* qsum(int64_t t, int64_t b) const { return dx(t, b) + LANES; }
  const float* sum(int64_t t, int64_t b) const { return dx(t, b) + 2 * LANES; }
};

// 32 values of x as fp32 (bf16: its bits are the fp32's top half).
inline void load32(const float* p, __m512& lo, __m512& hi) {
  lo = _mm512_loadu_ps(p);
  hi = _mm512_loadu_ps(p + 16);
}
inline void load32(const uint16_t* p, __m512& lo, __m512& hi) {
  const __m512i v = _mm512_loadu_si512(p);
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
  hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
}

// Row r (lane r % 16 of tile r / 16) of x into `tiles`' buffers: `row` its k values, or null
// for a row past x's (zeros: what the arithmetic below gives them, without it). `sums`: Σ x per
// block (types with a min), else 0; `starts`: Q6_K's starts (where the buffer has them).
template <typename T>
void quantize_lane(const T* row, int64_t k, int64_t r, bool sums, bool starts, const XTiles& tiles) {
  const int64_t blocks = k / 32, t = r / LANES, lane = r % LANES;
  for (int64_t b = 0; b < blocks; ++b) {
    int32_t* dst = reinterpret_cast<int32_t*>(const_cast<int8_t*>(tiles.quads(t, b)));
    float* n = const_cast<float*>(tiles.dx(t, b));
    int32_t* s = starts ? reinterpret_cast<int32_t*>(const_cast<int8_t*>(tiles.q6_k_starts(t, b))) : nullptr;
    if (row == nullptr) {
      for (int j = 0; j < 8; ++j) dst[j * LANES + lane] = 0;
      n[lane] = n[LANES + lane] = n[2 * LANES + lane] = 0.0f;
      if (starts) s[lane] = s[LANES + lane] = 0;
      continue;
    }
    __m512 lo, hi;
    load32(row + 32 * b, lo, hi);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float d = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));  // round to nearest
    const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
    alignas(16) int32_t quad[8];  // four int8 each: weights 4j .. 4j+3 of the block
    _mm_store_si128(reinterpret_cast<__m128i*>(quad), _mm512_cvtepi32_epi8(qlo));
    _mm_store_si128(reinterpret_cast<__m128i*>(quad + 4), _mm512_cvtepi32_epi8(qhi));
    for (int j = 0; j < 8; ++j) dst[j * LANES + lane] = quad[j];
    const int32_t sum_lo = _mm512_reduce_add_epi32(qlo), sum_hi = _mm512_reduce_add_epi32(qhi);
    n[lane] = d;
    n[LANES + lane] = d * static_cast<float>(sum_lo + sum_hi);
    n[2 * LANES + lane] = sums ? _mm512_reduce_add_ps(_mm512_add_ps(lo, hi)) : 0.0f;
    if (starts) {
      s[lane] = -32 * sum_lo;
      s[LANES + lane] = -32 * sum_hi;
    }
  }
}

// Tile t of x (rows past m as zeros) into `tiles`' buffers (a row's products do
// not depend on which entry or tile quantized it).
template <typename T>
void quantize_tile(const T* x, int64_t m, int64_t k, int64_t t, bool sums, bool starts, const XTiles& tiles) {
  for (int64_t r = t * LANES; r < (t + 1) * LANES; ++r) quantize_lane(r < m ? x + r * k : nullptr, k, r, sums, starts, tiles);
}

// x quantized ahead (cholla::quantized_x), as quantize_tiles gives it.
XTiles ready_tiles(const cholla::QuantizedX& x) {
  return {(x.rows + LANES - 1) / LANES, x.k / 32, x.bytes.data_ptr<int8_t>(), x.numbers.data_ptr<float>()};
}

// Every tile of x, with Σ x and Q6_K's starts (a decode step's products take every type).
XTiles quantize_tiles(const float* x, int64_t m, int64_t k, std::vector<int8_t>& bytes, std::vector<float>& numbers) {
  const int64_t blocks = k / 32, tiles = (m + LANES - 1) / LANES;
  bytes.resize(tiles * blocks * (512 + 128));
  numbers.resize(tiles * blocks * 3 * LANES);
  const XTiles xt{tiles, blocks, bytes.data(), numbers.data()};
  for (int64_t t = 0; t < tiles; ++t) quantize_tile(x, m, k, t, true, true, xt);
  return xt;
}

// One block of 32 weights of a type with its own scale (Q4_0 to Q8_0) -> 32 unsigned bytes q
// (w = d (q + bias) + m'), its d and m'. unpack_row's blocks, and BlockRows' as they are used.
template <int64_t TYPE>
[[gnu::always_inline]] inline void unpack_block(const uint8_t* block, uint8_t* q, float& d, float& m_shifted) {
  constexpr IntFormat f = int_format(TYPE);
  static_assert(f.blocks == 1, "a block of 32 with its own scale");
  d = f16(block);
  m_shifted = f.has_min ? f16(block + 2) - f.bias * d : 0.0f;
  if constexpr (TYPE == Q8_0) {  // signed bytes, offset to unsigned (bias -128)
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + f.qs));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_xor_si256(v, _mm256_set1_epi8(-128)));
  } else {  // weights 0-15 in the low nibbles, 16-31 in the high; Q5: the 5th bit j of qh
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + f.qs));
    __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
    if constexpr (f.qh >= 0) {
      uint32_t qh;
      std::memcpy(&qh, block + f.qh, 4);
      const __m128i sixteen = _mm_set1_epi8(16);
      lo = _mm_mask_add_epi8(lo, static_cast<__mmask16>(qh & 0xFFFF), lo, sixteen);
      hi = _mm_mask_add_epi8(hi, static_cast<__mmask16>(qh >> 16), hi, sixteen);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), hi);
  }
}

// One weight row's blocks -> k unsigned bytes q (w = d (q + bias) + m' per block),
// d (f.scales per block of 32) and m' per block of 32. Q6_K: w = d (q - 32) per
// 16 weights (tile_rows_q6_k), no m'.
template <int64_t TYPE>
void unpack_row(const uint8_t* row, int64_t blocks, uint8_t* q, float* d, float* m_shifted) {
  constexpr IntFormat f = int_format(TYPE);
  const __m256i low = _mm256_set1_epi8(0x0F);
  if constexpr (TYPE == Q6_K) {
    const __m256i high2 = _mm256_set1_epi8(0x30);
    for (int64_t s = 0; s < blocks / 8; ++s, row += f.bytes) {
      for (int half = 0; half < 2; ++half) {  // as load_four_blocks<Q6_K>
        const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + f.qs + 64 * half));
        const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + f.qs + 64 * half + 32));
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + f.qh + 32 * half));
        __m256i* out = reinterpret_cast<__m256i*>(q + 256 * s + 128 * half);
        _mm256_storeu_si256(out, _mm256_or_si256(_mm256_and_si256(ql0, low),
                                                 _mm256_and_si256(_mm256_slli_epi16(qh, 4), high2)));
        _mm256_storeu_si256(out + 1, _mm256_or_si256(_mm256_and_si256(ql1, low),
                                                     _mm256_and_si256(_mm256_slli_epi16(qh, 2), high2)));
        _mm256_storeu_si256(out + 2, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low),
                                                     _mm256_and_si256(qh, high2)));
        _mm256_storeu_si256(out + 3, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low),
                                                     _mm256_and_si256(_mm256_srli_epi16(qh, 2), high2)));
      }
      const float d_super = f16(row + 208);
      const int8_t* scales = reinterpret_cast<const int8_t*>(row + 192);
      for (int j = 0; j < 16; ++j) d[16 * s + j] = d_super * static_cast<float>(scales[j]);
    }
  } else if constexpr (TYPE == Q4_K || TYPE == Q5_K) {
    for (int64_t s = 0; s < blocks / 8; ++s, row += f.bytes) {
      const float d_super = f16(row), dmin = f16(row + 2);
      for (int j = 0; j < 4; ++j) {  // 32 bytes: sub-block 2j in the low nibbles, 2j+1 in the high
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + f.qs + 32 * j));
        __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        if constexpr (TYPE == Q5_K) {  // bit 2j (2j+1) of qh[l]: the 5th bit of weight l of sub-block 2j (2j+1)
          const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + f.qh));
          const __m256i bits = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j)), fifth = _mm256_set1_epi8(0x10);
          lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(bits, 4), fifth));
          hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(bits, 3), fifth));
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 256 * s + 64 * j), lo);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 256 * s + 64 * j + 32), hi);
      }
      for (int j = 0; j < 8; ++j) {
        int sc, mn;
        scale_min_k4(j, row + 4, sc, mn);
        d[8 * s + j] = d_super * static_cast<float>(sc);
        m_shifted[8 * s + j] = -dmin * static_cast<float>(mn) - f.bias * d[8 * s + j];
      }
    }
  } else {
    for (int64_t b = 0; b < blocks; ++b, row += f.bytes) unpack_block<TYPE>(row, q + 32 * b, d[b], m_shifted[b]);
  }
}

using UnpackRow = void (*)(const uint8_t*, int64_t, uint8_t*, float*, float*);

UnpackRow unpack_row_for(int64_t type) {
  switch (type) {
    case Q4_0: return unpack_row<Q4_0>;
    case Q4_1: return unpack_row<Q4_1>;
    case Q5_0: return unpack_row<Q5_0>;
    case Q5_1: return unpack_row<Q5_1>;
    case Q8_0: return unpack_row<Q8_0>;
    case Q4_K: return unpack_row<Q4_K>;
    case Q5_K: return unpack_row<Q5_K>;
    case Q6_K: return unpack_row<Q6_K>;
    default: return nullptr;
  }
}

// A later job's weights, asked for a few cache lines at every block of the
// current job's products, so that memory works while the products run. (All
// of a job's lines asked for at once, before its products, stalled the core on
// the full miss queue: a third of the head's time. Non-temporal: the lines
// are read once, and into L2 (T2) they did 10-15% worse on Gemma's head.)
struct Ahead {
  const char* next = nullptr;
  const char* end = nullptr;
  int64_t per_step = 0;

  // `bytes` at p, spread over `steps` calls of step().
  void start(const uint8_t* p, int64_t bytes, int64_t steps) {
    next = reinterpret_cast<const char*>(p);
    end = next + bytes;
    per_step = (bytes / 64 + steps) / std::max<int64_t>(steps, 1);
  }
  // A job's weight rows (none: nullptr), spread over `steps` calls of step().
  void start_job(const std::vector<Segment>& segments, const Job* job, int64_t steps) {
    if (job == nullptr) return start(nullptr, 0, 1);
    const Segment& seg = segments[job->segment];
    start(seg.data + job->first_row * seg.row_bytes, std::min(seg.rows - job->first_row, GEMV_JOB_ROWS) * seg.row_bytes,
          steps);
  }
  void step() {
    for (int64_t i = 0; i < per_step && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_NTA);
  }
};

// c: [16 weight rows][16 lanes] -> col[lane]: the lane's 16 weight rows (a 16 x 16 transpose).
inline void transpose16(const float* c, __m512 col[16]) {
  __m512 u[16];
  for (int g = 0; g < 4; ++g) {  // rows 4g .. 4g+3
    const __m512 r0 = _mm512_loadu_ps(c + (4 * g) * 16), r1 = _mm512_loadu_ps(c + (4 * g + 1) * 16);
    const __m512 r2 = _mm512_loadu_ps(c + (4 * g + 2) * 16), r3 = _mm512_loadu_ps(c + (4 * g + 3) * 16);
    const __m512d t0 = _mm512_castps_pd(_mm512_unpacklo_ps(r0, r1)), t1 = _mm512_castps_pd(_mm512_unpackhi_ps(r0, r1));
    const __m512d t2 = _mm512_castps_pd(_mm512_unpacklo_ps(r2, r3)), t3 = _mm512_castps_pd(_mm512_unpackhi_ps(r2, r3));
    // u[4g + j], per 128-bit lane l: lane 4l + j of rows 4g .. 4g+3
    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int j = 0; j < 4; ++j) {  // (0x88 takes 128-bit lanes 0 and 2 of each source, 0xDD lanes 1 and 3)
    const __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88), v1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88), v3 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
    col[j] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    col[j + 8] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    col[j + 4] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    col[j + 12] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

constexpr int64_t ROW_GROUP = 8;  // weight rows sharing each load of x: 8 chains of VPDPBUSD, accumulators in registers

// Where a tile product's weight rows come from: `w.block(b)` is block b of every row, whose
// `quad(i, j)` broadcasts weights 4j .. 4j+3 of row i, `scale(i)` is its d and `min(i)` its m'.
// Unpacked: unpack_job's strip (q: k bytes a row, back to back; d and m' per block).
template <bool HAS_MIN>
struct UnpackedRows {
  static constexpr bool has_min = HAS_MIN;
  const uint8_t* q;
  const float* d;
  const float* m_shifted;
  int64_t k, blocks;
  float bias;
  struct Block {
    const uint8_t* q;
    const float* d;
    const float* m_shifted;
    int64_t k, blocks;
    __m512i quad(int i, int j) const {
      int32_t w;
      std::memcpy(&w, q + i * k + 4 * j, 4);
      return _mm512_set1_epi32(w);
    }
    float scale(int i) const { return d[i * blocks]; }
    float min(int i) const { return m_shifted[i * blocks]; }
  };
  Block block(int64_t b) const { return {q + 32 * b, d + b, m_shifted + b, k, blocks}; }
};

// Q8_0 rows where they lie (`row_bytes` apart), not unpacked into a strip: each 4 weights
// offset to unsigned (xor 0x80 per byte) as they are broadcast, each block's d converted
// from its fp16 as it is used. The same operations on the same numbers as unpack_row<Q8_0>
// then UnpackedRows<false> (bias -128): bitwise equal. The unpack (a load, xor and store
// per 32 weights, a conversion and two stores per block) cost ~4.5 ms of Gemma's 32-row
// head of ~19 (one thread), more than the products saved by it.
struct Q8_0Rows {
  static constexpr bool has_min = false;
  static constexpr IntFormat f = int_format(Q8_0);
  const uint8_t* rows;
  int64_t row_bytes;
  float bias = f.bias;
  struct Block {
    const uint8_t* at;
    int64_t row_bytes;
    __m512i quad(int i, int j) const {
      int32_t w;
      std::memcpy(&w, at + i * row_bytes + f.qs + 4 * j, 4);
      return _mm512_xor_si512(_mm512_set1_epi32(w), _mm512_set1_epi8(-128));
    }
    float scale(int i) const { return f16(at + i * row_bytes); }
    float min(int) const { return 0.0f; }
  };
  Block block(int64_t b) const { return {rows + b * f.bytes, row_bytes}; }
};

// ROWS rows of a nibble type (Q4_0, Q4_1, Q5_0, Q5_1) where they lie (`row_bytes` apart): each
// block of the ROWS rows unpacked (unpack_block, as unpack_row) into 32 bytes a row on the stack
// just before its products, rather than a job's 16 rows into a strip first. The same numbers
// as UnpackedRows over unpack_row's strip: bitwise equal. A job unpacked into its strip first
// did no products meanwhile (Gemma's 32-row gate+up: 0.33 ms a layer, 0.23 with a stale strip);
// a block at a time, the unpack's integer ops and stores overlap the products' VPDPBUSD.
template <int64_t TYPE, int ROWS>
struct BlockRows {
  static constexpr IntFormat f = int_format(TYPE);
  static constexpr bool has_min = f.has_min;
  const uint8_t* rows;
  int64_t row_bytes;
  float bias = f.bias;
  struct Block {
    alignas(64) uint8_t q[ROWS * 32];
    float d[ROWS], m_shifted[ROWS];
    // Broadcast from memory (a load): GCC kept the unpacked bytes in registers and took each
    // quad out with a shift and a register broadcast, two shuffles per VPDPBUSD on its ports.
    __m512i quad(int i, int j) const {
      __m512i v;
      asm("vpbroadcastd %1, %0" : "=v"(v) : "m"(*reinterpret_cast<const int32_t*>(q + 32 * i + 4 * j)));
      return v;
    }
    float scale(int i) const { return d[i]; }
    float min(int i) const { return m_shifted[i]; }
  };
  Block block(int64_t b) const {
    Block out;
    for (int i = 0; i < ROWS; ++i)
      unpack_block<TYPE>(rows + i * row_bytes + b * f.bytes, out.q + 32 * i, out.d[i], out.m_shifted[i]);
    return out;
  }
};

// ROW_GROUP weight rows (from `w`, see UnpackedRows) against tile t of x: c[i][lane] = Σ w_i x_lane.
template <class Rows>
void tile_rows(const Rows w, int64_t k, const XTiles& x, int64_t t, float* c, Ahead& ahead) {
  const int64_t blocks = k / 32;
  __m512 acc[ROW_GROUP];
  for (int i = 0; i < ROW_GROUP; ++i) acc[i] = _mm512_setzero_ps();
  const __m512 bias_v = _mm512_set1_ps(w.bias);
  for (int64_t b = 0; b < blocks; ++b) {
    ahead.step();
    const auto wb = w.block(b);
    const int8_t* xq = x.quads(t, b);
    __m512i s[ROW_GROUP];
    for (int i = 0; i < ROW_GROUP; ++i) s[i] = _mm512_setzero_si512();
    // Unrolled: as a loop GCC copied the 8 accumulators twice per pass (16 moves per 8 VPDPBUSD);
    // the 13-row heads ran ~20% slower.
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m512i xv = _mm512_loadu_si512(xq + 64 * j);
      for (int i = 0; i < ROW_GROUP; ++i) s[i] = _mm512_dpbusd_epi32(s[i], wb.quad(i, j), xv);
    }
    const __m512 dx = _mm512_loadu_ps(x.dx(t, b));
    const __m512 bq = _mm512_mul_ps(_mm512_loadu_ps(x.qsum(t, b)), bias_v);
    const __m512 sum = Rows::has_min ? _mm512_loadu_ps(x.sum(t, b)) : _mm512_setzero_ps();
    for (int i = 0; i < ROW_GROUP; ++i) {
      const __m512 block = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i]), dx, bq);
      acc[i] = _mm512_fmadd_ps(block, _mm512_set1_ps(wb.scale(i)), acc[i]);
      if (Rows::has_min) acc[i] = _mm512_fmadd_ps(sum, _mm512_set1_ps(wb.min(i)), acc[i]);
    }
  }
  for (int i = 0; i < ROW_GROUP; ++i) _mm512_storeu_ps(c + i * LANES, acc[i]);
}

// tile_rows for two tiles at once: 4 weight rows x 2 tiles, each weight
// broadcast meeting both tiles (half the broadcasts per product; still 8
// chains, and the 8 accumulators in registers). Gemma's 32-row head: 4-11%
// faster than tile_rows twice. (16 chains, 8 rows x 2 tiles with the sums in
// L1, were 7% slower.) Each block and row takes tile_rows' operations in the
// same order: the results are bitwise equal. c: tile t's rows at c, tile t + 1's
// at c + tile_stride.
template <class Rows>
void tile_rows_pair(const Rows w, int64_t k, const XTiles& x, int64_t t, float* c, int64_t tile_stride,
                    Ahead& ahead) {
  constexpr int ROWS = 4;
  const int64_t blocks = k / 32;
  __m512 acc[2][ROWS];
  for (int tt = 0; tt < 2; ++tt)
    for (int i = 0; i < ROWS; ++i) acc[tt][i] = _mm512_setzero_ps();
  const __m512 bias_v = _mm512_set1_ps(w.bias);
  for (int64_t b = 0; b < blocks; ++b) {
    ahead.step();
    const auto wb = w.block(b);
    __m512i s[2][ROWS];
    for (int tt = 0; tt < 2; ++tt)
      for (int i = 0; i < ROWS; ++i) s[tt][i] = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j) {
      const __m512i x0 = _mm512_loadu_si512(x.quads(t, b) + 64 * j), x1 = _mm512_loadu_si512(x.quads(t + 1, b) + 64 * j);
      for (int i = 0; i < ROWS; ++i) {
        const __m512i wv = wb.quad(i, j);
        s[0][i] = _mm512_dpbusd_epi32(s[0][i], wv, x0);
        s[1][i] = _mm512_dpbusd_epi32(s[1][i], wv, x1);
      }
    }
    __m512 d[ROWS];
    for (int i = 0; i < ROWS; ++i) d[i] = _mm512_set1_ps(wb.scale(i));
    for (int tt = 0; tt < 2; ++tt) {
      const __m512 dx = _mm512_loadu_ps(x.dx(t + tt, b));
      const __m512 bq = _mm512_mul_ps(_mm512_loadu_ps(x.qsum(t + tt, b)), bias_v);
      const __m512 sum = Rows::has_min ? _mm512_loadu_ps(x.sum(t + tt, b)) : _mm512_setzero_ps();
      for (int i = 0; i < ROWS; ++i) {
        const __m512 block = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[tt][i]), dx, bq);
        acc[tt][i] = _mm512_fmadd_ps(block, d[i], acc[tt][i]);
        if (Rows::has_min) acc[tt][i] = _mm512_fmadd_ps(sum, _mm512_set1_ps(wb.min(i)), acc[tt][i]);
      }
    }
  }
  for (int tt = 0; tt < 2; ++tt)
    for (int i = 0; i < ROWS; ++i) _mm512_storeu_ps(c + tt * tile_stride + i * LANES, acc[tt][i]);
}

// tile_rows for Q6_K (d: a scale per 16 weights, w = d (q - 32)): each half
// block's sums start from -32 Σ xq of their x, so that they are sums of
// (q - 32) xq, and meet their own scale.
void tile_rows_q6_k(const uint8_t* q, const float* d, int64_t k, const XTiles& x, int64_t t, float* c, Ahead& ahead) {
  const int64_t blocks = k / 32;
  __m512 acc[ROW_GROUP];
  for (int i = 0; i < ROW_GROUP; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    ahead.step();
    const int8_t* xq = x.quads(t, b);
    const int8_t* starts = x.q6_k_starts(t, b);
    __m512 halves[ROW_GROUP];
    for (int i = 0; i < ROW_GROUP; ++i) halves[i] = _mm512_setzero_ps();
    // Unrolled, as tile_rows' passes (Gemma's Q6_K down 1.16-1.22x at 13-48 rows).
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      __m512i s[ROW_GROUP];
      const __m512i start = _mm512_loadu_si512(starts + 64 * half);
      for (int i = 0; i < ROW_GROUP; ++i) s[i] = start;
#pragma GCC unroll 4
      for (int j = 4 * half; j < 4 * half + 4; ++j) {
        const __m512i xv = _mm512_loadu_si512(xq + 64 * j);
        for (int i = 0; i < ROW_GROUP; ++i) {
          int32_t w;
          std::memcpy(&w, q + i * k + 32 * b + 4 * j, 4);
          s[i] = _mm512_dpbusd_epi32(s[i], _mm512_set1_epi32(w), xv);
        }
      }
      for (int i = 0; i < ROW_GROUP; ++i)
        halves[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i]), _mm512_set1_ps(d[2 * (i * blocks + b) + half]), halves[i]);
    }
    const __m512 dx = _mm512_loadu_ps(x.dx(t, b));
    for (int i = 0; i < ROW_GROUP; ++i) acc[i] = _mm512_fmadd_ps(halves[i], dx, acc[i]);
  }
  for (int i = 0; i < ROW_GROUP; ++i) _mm512_storeu_ps(c + i * LANES, acc[i]);
}

constexpr int64_t STREAM_OUTPUT_BYTES = 4 << 20;

// One job's 16 weight rows from `first` unpacked into `strip` ([16][k] bytes), their
// scales into d and m_shifted; rows past the weight's end (`rows` of them are real)
// as zeros, whose products are not written. (Inlined, as the products below: called
// out of line, tile_rows ran ~12% slower.)
[[gnu::always_inline]] inline void unpack_job(const Segment& seg, int64_t first, int64_t rows, int64_t k,
                                              uint8_t* strip, float* d, float* m_shifted) {
  const int64_t blocks = k / 32, row_scales = int_format(seg.type).scales * blocks;
  const UnpackRow unpack = unpack_row_for(seg.type);
  for (int64_t i = 0; i < GEMV_JOB_ROWS; ++i) {
    if (i < rows) {
      unpack(seg.data + (first + i) * seg.row_bytes, blocks, strip + i * k, d + i * row_scales, m_shifted + i * blocks);
    } else {
      std::memset(strip + i * k, 0, k);
      std::fill(d + i * row_scales, d + (i + 1) * row_scales, 0.0f);
      std::fill(m_shifted + i * blocks, m_shifted + (i + 1) * blocks, 0.0f);
    }
  }
}

// One unpacked job's products with tiles [t0, t1) of x into c ([tile - t0][16 weight
// rows][16 lanes]): two tiles at a time where there are two (tile_rows_pair), then
// any last one alone; Q6_K a tile at a time.
[[gnu::always_inline]] inline void job_products(const Segment& seg, const uint8_t* strip, const float* d,
                                                const float* m_shifted, int64_t k, const XTiles& x, int64_t t0,
                                                int64_t t1, float* c, Ahead& ahead) {
  const IntFormat f = int_format(seg.type);
  const int64_t blocks = k / 32, row_scales = f.scales * blocks, tile = GEMV_JOB_ROWS * LANES;
  int64_t t = t0;
  for (; seg.type != Q6_K && t + 1 < t1; t += 2) {
    for (int64_t i = 0; i < GEMV_JOB_ROWS; i += 4) {
      float* ct = c + (t - t0) * tile + i * LANES;
      if (f.has_min)
        tile_rows_pair(UnpackedRows<true>{strip + i * k, d + i * blocks, m_shifted + i * blocks, k, blocks, f.bias}, k,
                       x, t, ct, tile, ahead);
      else
        tile_rows_pair(UnpackedRows<false>{strip + i * k, d + i * blocks, m_shifted + i * blocks, k, blocks, f.bias},
                       k, x, t, ct, tile, ahead);
    }
  }
  for (; t < t1; ++t) {
    for (int64_t i = 0; i < GEMV_JOB_ROWS; i += ROW_GROUP) {
      const uint8_t* q = strip + i * k;
      float* ct = c + (t - t0) * tile + i * LANES;
      if (seg.type == Q6_K)
        tile_rows_q6_k(q, d + i * row_scales, k, x, t, ct, ahead);
      else if (f.has_min)
        tile_rows(UnpackedRows<true>{q, d + i * blocks, m_shifted + i * blocks, k, blocks, f.bias}, k, x, t, ct, ahead);
      else
        tile_rows(UnpackedRows<false>{q, d + i * blocks, m_shifted + i * blocks, k, blocks, f.bias}, k, x, t, ct, ahead);
    }
  }
}

// A whole job's products with x's one or two tiles, its weight rows read where they lie by
// `Pair` (4 rows, tile_rows_pair) or `Single` (ROW_GROUP rows, tile_rows). c as job_products'.
template <class Pair, class Single>
[[gnu::always_inline]] inline void job_in_place(const Segment& seg, int64_t first, int64_t k, const XTiles& x, float* c,
                                                Ahead& ahead) {
  const int64_t tile = GEMV_JOB_ROWS * LANES;
  if (x.tiles == 2)
    for (int64_t i = 0; i < GEMV_JOB_ROWS; i += 4)
      tile_rows_pair(Pair{seg.data + (first + i) * seg.row_bytes, seg.row_bytes}, k, x, 0, c + i * LANES, tile, ahead);
  else
    for (int64_t i = 0; i < GEMV_JOB_ROWS; i += ROW_GROUP)
      tile_rows(Single{seg.data + (first + i) * seg.row_bytes, seg.row_bytes}, k, x, 0, c + i * LANES, ahead);
}

// job_in_place for the types read in place (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1); false for the others.
[[gnu::always_inline]] inline bool in_place_job(const Segment& seg, int64_t first, int64_t k, const XTiles& x, float* c,
                                                Ahead& ahead) {
  switch (seg.type) {
    case Q8_0: job_in_place<Q8_0Rows, Q8_0Rows>(seg, first, k, x, c, ahead); return true;
    case Q4_0: job_in_place<BlockRows<Q4_0, 4>, BlockRows<Q4_0, ROW_GROUP>>(seg, first, k, x, c, ahead); return true;
    case Q4_1: job_in_place<BlockRows<Q4_1, 4>, BlockRows<Q4_1, ROW_GROUP>>(seg, first, k, x, c, ahead); return true;
    case Q5_0: job_in_place<BlockRows<Q5_0, 4>, BlockRows<Q5_0, ROW_GROUP>>(seg, first, k, x, c, ahead); return true;
    case Q5_1: job_in_place<BlockRows<Q5_1, 4>, BlockRows<Q5_1, ROW_GROUP>>(seg, first, k, x, c, ahead); return true;
    default: return false;
  }
}

// c: one job's sums for a tile ([16 weight rows][16 lanes]) -> out's rows of the tile's lanes (fp32 or bf16).
inline void store_tile(const float* c, int64_t t, int64_t m, int64_t rows, float* out, int64_t n_total, bool stream) {
  __m512 col[LANES];
  transpose16(c, col);
  for (int64_t lane = 0; lane < std::min(LANES, m - t * LANES); ++lane) {
    float* y = out + (t * LANES + lane) * n_total;
    if (stream && rows == GEMV_JOB_ROWS && (reinterpret_cast<uintptr_t>(y) & 63) == 0)
      _mm512_stream_ps(y, col[lane]);
    else if (rows == GEMV_JOB_ROWS)  // (masked stores are slower on Zen)
      _mm512_storeu_ps(y, col[lane]);
    else
      _mm512_mask_storeu_ps(y, lanes(rows), col[lane]);
  }
}
inline void store_tile(const float* c, int64_t t, int64_t m, int64_t rows, uint16_t* out, int64_t n_total, bool) {
  __m512 col[LANES];
  transpose16(c, col);
  for (int64_t lane = 0; lane < std::min(LANES, m - t * LANES); ++lane) {
    const __m256i y = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(col[lane]));
    if (rows == GEMV_JOB_ROWS)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (t * LANES + lane) * n_total), y);
    else
      _mm256_mask_storeu_epi16(out + (t * LANES + lane) * n_total, lanes(rows), y);
  }
}

using cholla::RowBest;

// The order RowBest keeps: is (v, i) better than (best, at)?
inline bool better(float v, int32_t i, float best, int32_t at) {
  if (std::isnan(best)) return std::isnan(v) && i < at;
  return std::isnan(v) || v > best || (v == best && i < at);
}

// One job's sums for a tile (c: [16 weight rows][16 lanes], the first `rows` real, row i
// being column col + i) folded into each lane's best (value, index): better() lane-wise.
// A whole job without NaN takes its lanes' maxima by a tree, the first row holding each
// by compares against it, and meets the best once (row by row, better()'s chain of
// compares and masks cost 1.4 ms of Gemma's 32-row head; the logits' stores cost less).
inline void fold_best(const float* c, int64_t rows, int32_t col, __m512& value, __m512i& index) {
  if (rows == GEMV_JOB_ROWS) {
    __m512 v[GEMV_JOB_ROWS], top[GEMV_JOB_ROWS / 2], sum[GEMV_JOB_ROWS / 2];
    for (int i = 0; i < GEMV_JOB_ROWS; ++i) v[i] = _mm512_loadu_ps(c + i * LANES);
    for (int i = 0; i < GEMV_JOB_ROWS / 2; ++i) {
      top[i] = _mm512_max_ps(v[2 * i], v[2 * i + 1]);
      sum[i] = _mm512_add_ps(v[2 * i], v[2 * i + 1]);
    }
    for (int width = GEMV_JOB_ROWS / 4; width > 0; width /= 2)
      for (int i = 0; i < width; ++i) {
        top[i] = _mm512_max_ps(top[2 * i], top[2 * i + 1]);
        sum[i] = _mm512_add_ps(sum[2 * i], sum[2 * i + 1]);
      }
    // A NaN among the sixteen makes their sum NaN (as does inf - inf: those take the exact way too).
    if (_mm512_cmp_ps_mask(sum[0], sum[0], _CMP_UNORD_Q) == 0) {
      __m512i at = _mm512_set1_epi32(GEMV_JOB_ROWS - 1);
      for (int i = GEMV_JOB_ROWS - 2; i >= 0; --i)
        at = _mm512_mask_mov_epi32(at, _mm512_cmp_ps_mask(v[i], top[0], _CMP_EQ_OQ), _mm512_set1_epi32(i));
      at = _mm512_add_epi32(at, _mm512_set1_epi32(col));
      // top holds no NaN: above a NaN best it is never (better()'s order)
      const __mmask16 take = _mm512_cmp_ps_mask(top[0], value, _CMP_GT_OQ) |
                             (_mm512_cmp_ps_mask(top[0], value, _CMP_EQ_OQ) & _mm512_cmplt_epi32_mask(at, index));
      value = _mm512_mask_mov_ps(value, take, top[0]);
      index = _mm512_mask_mov_epi32(index, take, at);
      return;
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 v = _mm512_loadu_ps(c + i * LANES);
    const __m512i at = _mm512_set1_epi32(col + static_cast<int32_t>(i));
    const __mmask16 v_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __mmask16 best_nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
    const __mmask16 earlier = _mm512_cmplt_epi32_mask(at, index);
    const __mmask16 above = _mm512_cmp_ps_mask(v, value, _CMP_GT_OQ) | (v_nan & ~best_nan);
    const __mmask16 level = _mm512_cmp_ps_mask(v, value, _CMP_EQ_OQ) | (v_nan & best_nan);
    const __mmask16 take = above | (level & earlier);
    value = _mm512_mask_mov_ps(value, take, v);
    index = _mm512_mask_mov_epi32(index, take, at);
  }
}

// A member's jobs of a batched int8 product (m > INT8_GEMV_MAX_ROWS rows of x;
// every segment's type has an integer kernel): [begin, end), its first chunk,
// already claimed, then the next ones (team.h). With `best` (the member's [m]),
// nothing is written to out: each row's best column over the member's jobs goes
// there instead (the products are the same, bit for bit). ARGMAX: whether `best` is
// given (an instance each: the one writing out keeps to its own code). Flattened, as
// run_prompt_jobs: with the tile kernels' callers grown, GCC called them out of line
// (48 rows of Gemma's head 5-13% slower).
template <bool ARGMAX>
[[gnu::flatten]] void run_batched_jobs(const std::vector<Segment>& segments, const std::vector<Job>& jobs, int64_t begin, int64_t end,
                      cholla::Member& member, const float* xs, int64_t m, int64_t k, float* out, int64_t n_total,
                      RowBest* best = nullptr, const cholla::QuantizedX* ready = nullptr) {
  static_assert(GEMV_JOB_ROWS == LANES, "transpose16: a job of 16 weight rows meets tiles of 16 lanes");
  thread_local std::vector<int8_t> x_bytes;
  thread_local std::vector<float> x_numbers;
  thread_local std::vector<uint8_t> strip;
  thread_local std::vector<float> scales;
  thread_local std::vector<float> sums;
  const int64_t n_jobs = static_cast<int64_t>(jobs.size()), blocks = k / 32;
  const XTiles x = ready != nullptr ? ready_tiles(*ready) : quantize_tiles(xs, m, k, x_bytes, x_numbers);
  strip.resize(GEMV_JOB_ROWS * k);
  scales.resize(3 * GEMV_JOB_ROWS * blocks);
  sums.resize(x.tiles * GEMV_JOB_ROWS * LANES);
  float* d = scales.data();  // up to 2 per block (f.scales)
  float* m_shifted = d + 2 * GEMV_JOB_ROWS * blocks;
  float* c = sums.data();  // the products, [tile][16 weight rows][16 lanes]
  // A large output (the head's logits) goes straight to memory: its rows lie
  // n_total apart (1 MiB for Gemma's), so each job's lines for m rows of x
  // crowd the same cache sets, and writing them through the caches cost as
  // much as reading the weights.
  const bool stream = !ARGMAX && m * n_total * 4 >= STREAM_OUTPUT_BYTES;
  constexpr int64_t MAX_TILES = INT8_BATCH_MAX_ROWS / LANES;
  __m512 best_value[MAX_TILES];
  __m512i best_index[MAX_TILES];
  for (int64_t t = 0; t < MAX_TILES; ++t) {
    best_value[t] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    best_index[t] = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());
  }
  Ahead ahead;
  do {
    for (int64_t j = begin; j < end; ++j) {
      const Segment& seg = segments[jobs[j].segment];
      const int64_t first = jobs[j].first_row, rows = std::min(seg.rows - first, GEMV_JOB_ROWS);
      // The next job, over this one's products (two ahead, or into L1, did no better): a step per
      // block of each tile_rows.
      ahead.start_job(segments, j + 1 < n_jobs ? &jobs[j + 1] : nullptr,
                      x.tiles * (GEMV_JOB_ROWS / ROW_GROUP) * blocks);
      // Whole jobs of Q8_0 (the heads') and of the nibble types read in place where x has one or
      // two tiles: one pass over the weights. (Over three tiles, two passes, the second pass missed
      // the lines the NTA prefetch had brought for the first: Q8_0's 48 rows 4% slower than unpacked.)
      if (rows < GEMV_JOB_ROWS || x.tiles > 2 || !in_place_job(seg, first, k, x, c, ahead)) {
        unpack_job(seg, first, rows, k, strip.data(), d, m_shifted);
        job_products(seg, strip.data(), d, m_shifted, k, x, 0, x.tiles, c, ahead);
      }
      for (int64_t t = 0; t < x.tiles; ++t) {
        if constexpr (ARGMAX)
          fold_best(c + t * GEMV_JOB_ROWS * LANES, rows, static_cast<int32_t>(seg.out_offset + first), best_value[t],
                    best_index[t]);
        else
          store_tile(c + t * GEMV_JOB_ROWS * LANES, t, m, rows, out + seg.out_offset + first, n_total, stream);
      }
    }
    // The best so far, before next() reports the chunk done: in a stage of decode_layers' team,
    // the member that reports the stage's last chunk reads every member's best right then.
    if constexpr (ARGMAX) {
      for (int64_t t = 0; t < x.tiles; ++t) {
        alignas(64) float value[LANES];
        alignas(64) int32_t index[LANES];
        _mm512_store_ps(value, best_value[t]);
        _mm512_store_si512(index, best_index[t]);
        for (int64_t lane = 0; lane < std::min(LANES, m - t * LANES); ++lane)
          best[t * LANES + lane] = {value[lane], index[lane]};
      }
    }
  } while (member.next(n_jobs, begin, end));
  if (stream) _mm_sfence();  // the streamed lines are out before the team's barrier says so
}

// A member's jobs of a GEMV (team.h): the exact fp32 products, or with
// `integer` the int8 ones for the types that have them (the batched product's
// where every weight has one and x has more than INT8_GEMV_MAX_ROWS rows).
void run_gemv_jobs(const std::vector<Segment>& segments, const std::vector<Job>& jobs, cholla::Member& member,
                   const float* xs, int64_t m, int64_t k, bool integer, float* out, int64_t n_total,
                   const cholla::QuantizedX* ready = nullptr) {
  const int64_t n_jobs = static_cast<int64_t>(jobs.size());
  int64_t begin = 0, end = 0;
  if (m == 0 || !member.next(n_jobs, begin, end)) return;
  // The walk asks for weights PREFETCH_AHEAD bytes ahead within a weight (past
  // a chunk's end, into the next, which is usually the member's own next one);
  // the first ones of the member's first chunk, of a chunk that does not follow
  // the last, and of each weight it moves on to, are asked for here: now (they
  // arrive while x is quantized), and one job early.
  auto prefetch_job = [&](int64_t j) {
    const Segment& seg = segments[jobs[j].segment];
    prefetch(seg.data + jobs[j].first_row * seg.row_bytes, PREFETCH_AHEAD);
  };
  if (integer && m > INT8_GEMV_MAX_ROWS && all_integer(segments))
    return run_batched_jobs<false>(segments, jobs, begin, end, member, xs, m, k, out, n_total, nullptr, ready);
  prefetch_job(begin);
  // Each thread quantizes x itself (reading a copy another core had just written
  // cost ~1 us a call), into scratch it keeps from call to call (allocating and
  // zeroing it each time cost about as much), in the layouts of every weight
  // (which chunks it will run is not known yet; a layout's copy does not
  // depend on which others are made).
  thread_local std::vector<int8_t> byte_scratch;
  thread_local std::vector<float> number_scratch;
  QuantizedRow rows[GEMV_MAX_ROWS];
  if (integer) {
    unsigned layouts = 0;
    for (const Segment& seg : segments) layouts |= layout_of(seg.type);
    const int64_t period = std::lcm(k / 32, GROUP_BLOCKS), row_bytes = 4 * period * 32, row_numbers = 3 * period + 3 * k / 32;
    if (static_cast<int64_t>(byte_scratch.size()) < m * row_bytes) byte_scratch.resize(m * row_bytes);
    if (static_cast<int64_t>(number_scratch.size()) < m * row_numbers) number_scratch.resize(m * row_numbers);
    for (int64_t r = 0; r < m; ++r)
      rows[r] = quantize_row(xs + r * k, k, layouts, byte_scratch.data() + r * row_bytes,
                             number_scratch.data() + r * row_numbers);
  }
  int64_t last_end = begin;
  do {
    if (begin != last_end) prefetch_job(begin);
    for (int64_t j = begin; j < end; ++j) {
      if (j + 1 < n_jobs && jobs[j + 1].segment != jobs[j].segment) prefetch_job(j + 1);
      const Segment& seg = segments[jobs[j].segment];
      const int64_t first = jobs[j].first_row, last = std::min(seg.rows, first + GEMV_JOB_ROWS);
      const IntDot dot = integer ? int_dot_for(seg.type, m) : nullptr;
      if (dot == nullptr) {
        GEMV_BY_ROWS[m - 1](seg, first, last, xs, k, out, n_total);
        continue;
      }
      __m512 sums[GEMV_JOB_ROWS][GEMV_MAX_ROWS];
      dot(seg.data + first * seg.row_bytes, k / 32, last - first, PREFETCH_AHEAD, rows, sums);
      for (int64_t r = 0; r < m; ++r) {
        __m512 v[GEMV_JOB_ROWS];
        for (int64_t i = 0; i < GEMV_JOB_ROWS; ++i) v[i] = i < last - first ? sums[i][r] : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(out + r * n_total + seg.out_offset + first, lanes(last - first), sum_lanes(v));
      }
    }
    last_end = end;
  } while (member.next(n_jobs, begin, end));
}

// ---- Prompts: the batched int8 product over any number of rows ----
//
// run_batched_jobs serves decode steps (up to 64 rows), where every member
// quantizes x itself. A prompt's x (2048 rows of 3584: 29 MB fp32) is
// quantized once, the tiles shared out among the team, and the rows are taken
// a slab at a time: each job (16 weight rows) meets the slab's tiles, which
// stay in L2, then the next job; the weights are unpacked again for each slab
// (~1-2% of the products at 16+ tiles) and read from memory once a slab.

// Where x's quantized slabs should stay: about half of Zen 5's 1-2 MiB L2 (with
// the unpacked weights and the output lines beside them).
constexpr int64_t PROMPT_SLAB_BYTES = 1 << 20;
// Fewer tiles a slab and re-unpacking the weights costs more than L2 saves.
constexpr int64_t PROMPT_SLAB_MIN_TILES = 16;

// A member's part of a prompt's product: jobs (slab, job) in slab order, x quantized.
// (x by value: a local the products' loop need not reload after every store. Flattened:
// tile_rows inlined here as in run_batched_jobs; called out of line, from a second caller,
// it ran ~12% slower, and run_batched_jobs lost its inlined copy too.)
template <typename Out>
[[gnu::flatten]] void run_prompt_jobs(const std::vector<Segment>& segments, const std::vector<Job>& jobs, const XTiles x,
                     int64_t slab_tiles, int64_t m, int64_t k, Out* out, int64_t n_total, cholla::Member& member) {
  thread_local std::vector<uint8_t> strip;
  thread_local std::vector<float> scales;
  thread_local std::vector<float> sums;
  const int64_t n_jobs = static_cast<int64_t>(jobs.size()), blocks = k / 32;
  const int64_t slabs = (x.tiles + slab_tiles - 1) / slab_tiles, n = slabs * n_jobs;
  strip.resize(GEMV_JOB_ROWS * k);
  scales.resize(3 * GEMV_JOB_ROWS * blocks);
  sums.resize(slab_tiles * GEMV_JOB_ROWS * LANES);
  float* d = scales.data();  // up to 2 per block (f.scales)
  float* m_shifted = d + 2 * GEMV_JOB_ROWS * blocks;
  // fp32 outputs of 4 MiB and more go straight to memory (as run_batched_jobs': a prompt's are read by the next op)
  const bool stream = m * n_total * static_cast<int64_t>(sizeof(Out)) >= STREAM_OUTPUT_BYTES;
  Ahead ahead;
  for (int64_t begin, end; member.next(n, begin, end);) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t slab = i / n_jobs, j = i % n_jobs;
      const int64_t t0 = slab * slab_tiles, t1 = std::min(x.tiles, t0 + slab_tiles);
      const Segment& seg = segments[jobs[j].segment];
      const int64_t first = jobs[j].first_row, rows = std::min(seg.rows - first, GEMV_JOB_ROWS);
      // the next job's weights, over this one's products
      ahead.start_job(segments, i + 1 < n ? &jobs[(i + 1) % n_jobs] : nullptr,
                      (t1 - t0) * (GEMV_JOB_ROWS / ROW_GROUP) * blocks);
      unpack_job(seg, first, rows, k, strip.data(), d, m_shifted);
      job_products(seg, strip.data(), d, m_shifted, k, x, t0, t1, sums.data(), ahead);
      for (int64_t t = t0; t < t1; ++t)
        store_tile(sums.data() + (t - t0) * GEMV_JOB_ROWS * LANES, t, m, rows, out + seg.out_offset + first, n_total,
                   stream);
    }
  }
  if (stream) _mm_sfence();  // the streamed lines are out before the team's end says so
}

// The rows `m` a product of `segments` may take (`op` names it in errors): with `integer`,
// up to `max_rows` in the batched int8 product (a `prompt`'s, or a GEMV's past GEMV_MAX_ROWS),
// where every segment's type has an int8 kernel; otherwise the GEMV's GEMV_MAX_ROWS.
void check_rows(const char* op, int64_t m, bool integer, bool prompt, int64_t max_rows,
                const std::vector<Segment>& segments) {
  if (integer && (prompt || m > GEMV_MAX_ROWS)) {
    TORCH_CHECK(m <= max_rows, op, ": at most ", max_rows, " rows, got ", m);
    TORCH_CHECK(all_integer(segments), op, prompt ? ": every weight must be of" : ": more than 8 rows need every weight in",
                " a type with an int8 kernel (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)");
  } else {
    TORCH_CHECK(m <= GEMV_MAX_ROWS, op, ": at most ", GEMV_MAX_ROWS, " rows, got ", m);
  }
}

// x's checks and the jobs, as every entry point needs them; returns the output width.
// `max_rows`: the most rows the batched int8 product takes here (INT8_BATCH_MAX_ROWS for
// the GEMVs; a prompt's product takes any number, from bf16 rows too, and only int8 types).
int64_t plan_gemv(const at::Tensor& x, at::TensorList weights, at::IntArrayRef types, bool integer,
                  int64_t max_rows, std::vector<Segment>& segments, std::vector<Job>& jobs) {
  const bool prompt = max_rows > INT8_BATCH_MAX_ROWS;
  const char* op = prompt ? "qmatmul_int8" : integer ? "qgemv_int8" : "qgemv";
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || (prompt && x.scalar_type() == at::kBFloat16)), op,
              ": x must be ", prompt ? "fp32 or bf16" : "fp32", " [m, k]");
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  const int64_t n_total = plan_segments(x.size(1), weights, types, segments);
  check_rows(op, x.size(0), integer, prompt, max_rows, segments);
  split_jobs(segments, GEMV_JOB_ROWS, jobs);  // (in place: gemv_part's lists keep their room)
  return n_total;
}

}  // namespace

namespace cholla {

bool int8_kernel_types(at::IntArrayRef types) {
  return std::all_of(types.begin(), types.end(), [](int64_t type) { return int_dot_for(type, 1) != nullptr; });
}

// Both GEMVs' body (x: fp32 [m <= 8, k]; the contract of qmatmul): the exact
// fp32 GEMV for every weight, or, with `integer`, the int8 one for the types
// that have it.
// `out`: fp32 [m, n_total] to write into, or undefined for a fresh one.
at::Tensor gemv(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef types, bool integer,
                at::Tensor out = {}) {
  const at::Tensor x = x_in.contiguous();
  std::vector<Segment> segments;
  std::vector<Job> jobs;
  const int64_t n_total = plan_gemv(x, weights, types, integer, INT8_BATCH_MAX_ROWS, segments, jobs);
  const int64_t m = x.size(0);
  at::Tensor y = out.defined() ? out : at::empty({m, n_total}, x.options());
  if (out.defined()) check_output("qgemv_int8_out", y, m, n_total);
  if (m == 0) return y;
  run_as_team([&](Member& member) {
    run_gemv_jobs(segments, jobs, member, x.data_ptr<float>(), m, x.size(1), integer, y.data_ptr<float>(), n_total);
  });
  return y;
}

void gemv_part(const at::Tensor& x, at::TensorList weights, at::IntArrayRef types, bool integer, at::Tensor& y,
               Member& member) {
  // Each member plans every product of a decode step (120 a SmolLM2 token) before its first
  // chunk: lists that keep their room, rather than a fresh allocation and a dozen regrowths each.
  thread_local std::vector<Segment> segments;
  thread_local std::vector<Job> jobs;
  const int64_t n_total = plan_gemv(x, weights, types, integer, INT8_BATCH_MAX_ROWS, segments, jobs);
  check_output("gemv_part", y, x.size(0), n_total);
  run_gemv_jobs(segments, jobs, member, x.data_ptr<float>(), x.size(0), x.size(1), integer, y.data_ptr<float>(),
                n_total);
}

WeightRows weight_rows(const at::Tensor& w, int64_t type) {
  const BlockFormat format = block_format(type);
  TORCH_CHECK(format.elements > 0, "qmatmul: unsupported GGML type ", type);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) * w.element_size() % format.bytes == 0,
              "qmatmul: a weight of type ", type, " must be contiguous [rows, whole blocks]");
  const int64_t row_bytes = w.size(1) * w.element_size();
  return {static_cast<const uint8_t*>(w.data_ptr()), type, w.size(0), row_bytes,
          row_bytes / format.bytes * format.elements};
}

// plan_gemv's checks and lists from checked rows: no tensor's metadata is read (by the
// time a decode step comes back to a weight, its tensor is cold in cache: ~0.2-0.4 us a
// product on every member went to planning).
int64_t plan_rows(const at::Tensor& x, const WeightRows* weights, int64_t count, bool integer,
                  std::vector<Segment>& segments, std::vector<Job>& jobs) {
  const char* op = integer ? "qgemv_int8" : "qgemv";
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), op, ": x must be contiguous fp32 [m, k]");
  const int64_t k = x.size(1), m = x.size(0);
  TORCH_CHECK(count > 0 && k % 32 == 0, "qmatmul: k must be a multiple of 32");
  segments.clear();
  int64_t n_total = 0;
  for (int64_t i = 0; i < count; ++i) {
    const WeightRows& w = weights[i];
    TORCH_CHECK(w.k == k, "qmatmul: weight ", i, " does not hold rows of ", k, " weights of type ", w.type);
    segments.push_back({w.data, w.type, w.rows, w.row_bytes, n_total});
    n_total += w.rows;
  }
  check_rows(op, m, integer, false, INT8_BATCH_MAX_ROWS, segments);
  split_jobs(segments, GEMV_JOB_ROWS, jobs);
  return n_total;
}

void gemv_rows_part(const at::Tensor& x, const WeightRows* weights, int64_t count, bool integer, at::Tensor& y,
                    Member& member, const QuantizedX* ready) {
  thread_local std::vector<Segment> segments;  // (as gemv_part's)
  thread_local std::vector<Job> jobs;
  const int64_t n_total = plan_rows(x, weights, count, integer, segments, jobs);
  check_output("gemv_part", y, x.size(0), n_total);
  TORCH_CHECK(ready == nullptr || (ready->rows == x.size(0) && ready->k == x.size(1)),
              "gemv_part: x quantized ahead has another shape than x");
  run_gemv_jobs(segments, jobs, member, x.data_ptr<float>(), x.size(0), x.size(1), integer, y.data_ptr<float>(),
                n_total, ready);
}

QuantizedX quantized_x(int64_t rows, int64_t k) {
  TORCH_CHECK(rows > 0 && k > 0 && k % 32 == 0, "quantized_x: rows and a k of whole blocks");
  const int64_t tiles = (rows + LANES - 1) / LANES, blocks = k / 32;
  // (zeros: the last tile's rows past `rows`, as quantize_tile leaves them)
  return {at::zeros({tiles * blocks * (512 + 128)}, at::kChar), at::zeros({tiles * blocks * 3 * LANES}, at::kFloat),
          rows, k};
}

void quantize_x_row(const float* row, int64_t r, const QuantizedX& x) {
  quantize_lane(row, x.k, r, true, true, ready_tiles(x));
}

// fp32 products, exact: each block dequantized as gguf does, then fp32 FMAs.
at::Tensor qgemv(const at::Tensor& x, at::TensorList weights, at::IntArrayRef types) {
  return gemv(x, weights, types, false);
}

// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K weights take the integer path (x rounded
// to int8 per block: not exact, as in llama.cpp); other types the exact one.
// x: up to 8 rows, or up to 64 where every weight has an integer kernel.
at::Tensor qgemv_int8(const at::Tensor& x, at::TensorList weights, at::IntArrayRef types) {
  return gemv(x, weights, types, true);
}

// The same into `out` (fp32 [m, sum n_i], contiguous), as qmatmul_out: the engine's logits.
void qgemv_int8_out(const at::Tensor& x, at::TensorList weights, at::IntArrayRef types, at::Tensor out) {
  gemv(x, weights, types, true, out);
}

// A prompt's product (any number of rows; every weight of a type with an int8
// kernel): the batched int8 product, x (fp32 or bf16) quantized once in tiles of
// 16 rows, taken a slab at a time (run_prompt_jobs), into `out` (fp32 or bf16
// [m, sum n_i], contiguous: a bf16 consumer's product is rounded once, not
// written in fp32 and converted). Each row's result depends on that row alone.
void qmatmul_int8_out(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef types, at::Tensor out) {
  const at::Tensor x = x_in.contiguous();
  std::vector<Segment> segments;
  std::vector<Job> jobs;
  const int64_t n_total = plan_gemv(x, weights, types, true, INT64_MAX, segments, jobs);
  const int64_t m = x.size(0), k = x.size(1), blocks = k / 32;
  TORCH_CHECK((out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16) && out.is_contiguous() &&
                  out.dim() == 2 && out.size(0) == m && out.size(1) == n_total,
              "qmatmul_int8_out: out must be contiguous fp32 or bf16 [", m, ", ", n_total, "]");
  if (m == 0) return;
  bool sums = false, starts = false;  // what of x's quantized blocks the weights' types read
  for (const Segment& seg : segments) sums |= int_format(seg.type).has_min, starts |= seg.type == Q6_K;
  const int64_t tiles = (m + LANES - 1) / LANES;
  thread_local std::vector<int8_t> bytes;  // the caller's: every member reads it
  thread_local std::vector<float> numbers;
  bytes.resize(tiles * blocks * (512 + (starts ? 128 : 0)));
  numbers.resize(tiles * blocks * 3 * LANES);
  const XTiles xt{tiles, blocks, bytes.data(), numbers.data()};
  const int64_t tile_bytes = blocks * (512 + 3 * LANES * 4 + (starts ? 128 : 0));
  const int64_t slab_tiles = std::max(PROMPT_SLAB_MIN_TILES, PROMPT_SLAB_BYTES / tile_bytes);
  run_as_team([&](Member& member) {
    for (int64_t begin, end; member.next(tiles, begin, end);) {
      for (int64_t t = begin; t < end; ++t) {
        if (x.scalar_type() == at::kFloat)
          quantize_tile(x.data_ptr<float>(), m, k, t, sums, starts, xt);
        else
          quantize_tile(reinterpret_cast<const uint16_t*>(x.data_ptr()), m, k, t, sums, starts, xt);
      }
    }
    if (!member.finish()) return;
    if (out.scalar_type() == at::kFloat)
      run_prompt_jobs(segments, jobs, xt, slab_tiles, m, k, out.data_ptr<float>(), n_total, member);
    else
      run_prompt_jobs(segments, jobs, xt, slab_tiles, m, k, reinterpret_cast<uint16_t*>(out.data_ptr()), n_total,
                      member);
  });
}

std::vector<RowBest> no_best(int64_t members, int64_t rows) {
  return std::vector<RowBest>(members * rows, RowBest{-std::numeric_limits<float>::infinity(),
                                                      std::numeric_limits<int32_t>::max()});
}

void gemv_rows_argmax_part(const at::Tensor& x, const WeightRows* weights, int64_t count, RowBest* best,
                           Member& member, const QuantizedX* ready) {
  thread_local std::vector<Segment> segments;  // (as gemv_part's)
  thread_local std::vector<Job> jobs;
  const int64_t n_total = plan_rows(x, weights, count, true, segments, jobs);
  const int64_t m = x.size(0), n_jobs = static_cast<int64_t>(jobs.size());
  TORCH_CHECK(m > INT8_GEMV_MAX_ROWS, "qgemv_int8_argmax: more than ", INT8_GEMV_MAX_ROWS,
              " rows (fewer take qgemv_int8 and an argmax), got ", m);
  TORCH_CHECK(all_integer(segments), "qgemv_int8_argmax: every weight must be of a type with an int8 kernel");
  TORCH_CHECK(n_total > 0 && n_total <= std::numeric_limits<int32_t>::max(),
              "qgemv_int8_argmax: the weights must have 1 to 2^31 - 1 rows in all, got ", n_total);
  TORCH_CHECK(ready == nullptr || (ready->rows == m && ready->k == x.size(1)),
              "gemv_rows_argmax_part: x quantized ahead has another shape than x");
  int64_t begin = 0, end = 0;
  if (member.next(n_jobs, begin, end))
    run_batched_jobs<true>(segments, jobs, begin, end, member, x.data_ptr<float>(), m, x.size(1), nullptr, n_total,
                           best, ready);
}

void best_columns(const std::vector<RowBest>& best, int64_t rows, int64_t* tokens) {
  const int64_t members = static_cast<int64_t>(best.size()) / rows;
  for (int64_t r = 0; r < rows; ++r) {
    RowBest top = best[r];
    for (int64_t i = 1; i < members; ++i) {
      const RowBest& b = best[i * rows + r];
      if (better(b.value, b.index, top.value, top.index)) top = b;
    }
    tokens[r] = top.index;
  }
}

// Greedy decoding's tokens straight from the head: each row of x's argmax over
// its product with the weights side by side (the first column on ties, a NaN
// above every number: as argmax_rows over qgemv_int8_out's logits, which are
// the same sums), without writing the logits (Gemma 3's 32 x 262k: 33.5 MB a
// step, then read again by the argmax). x: fp32 [m, k], INT8_GEMV_MAX_ROWS < m
// <= INT8_BATCH_MAX_ROWS, the rows the batched int8 product takes; int64 [m] out.
at::Tensor qgemv_int8_argmax(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef types) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(weights.size() == types.size(), "qgemv_int8_argmax: one type per weight");
  std::vector<WeightRows> rows;
  for (size_t i = 0; i < weights.size(); ++i) rows.push_back(weight_rows(weights[i], types[i]));
  const int64_t m = x.size(0);
  // Each member's rows' best over its jobs; a member with no jobs leaves its (-inf, max) as no candidate.
  std::vector<RowBest> best = no_best(at::get_num_threads(), m);
  run_as_team([&](Member& member) {
    gemv_rows_argmax_part(x, rows.data(), static_cast<int64_t>(rows.size()), best.data() + member.index() * m,
                          member);
  });
  at::Tensor tokens = at::empty({m}, x.options().dtype(at::kLong));
  best_columns(best, m, tokens.data_ptr<int64_t>());
  return tokens;
}

at::Tensor qmatmul_int8(const at::Tensor& x, at::TensorList weights, at::IntArrayRef types) {
  int64_t n_total = 0;
  for (const at::Tensor& w : weights) n_total += w.size(0);
  at::Tensor out = at::empty({x.size(0), n_total}, x.options().dtype(at::kFloat));
  qmatmul_int8_out(x, weights, types, out);
  return out;
}

}  // namespace cholla

TORCH_LIBRARY_FRAGMENT(cholla, m) {
  m.def("qgemv(Tensor x, Tensor[] weights, int[] types) -> Tensor");
  m.def("qgemv_int8(Tensor x, Tensor[] weights, int[] types) -> Tensor");
  m.def("qgemv_int8_out(Tensor x, Tensor[] weights, int[] types, Tensor(a!) out) -> ()");
  m.def("qmatmul_int8(Tensor x, Tensor[] weights, int[] types) -> Tensor");
  m.def("qgemv_int8_argmax(Tensor x, Tensor[] weights, int[] types) -> Tensor");
  m.def("qmatmul_int8_out(Tensor x, Tensor[] weights, int[] types, Tensor(a!) out) -> ()");
  m.def("int8_kernel_types(int[] types) -> bool", &cholla::int8_kernel_types);
}

TORCH_LIBRARY_IMPL(cholla, CPU, m) {
  m.impl("qgemv", &cholla::qgemv);
  m.impl("qgemv_int8", &cholla::qgemv_int8);
  m.impl("qgemv_int8_out", &cholla::qgemv_int8_out);
  m.impl("qmatmul_int8", &cholla::qmatmul_int8);
  m.impl("qgemv_int8_argmax", &cholla::qgemv_int8_argmax);
  m.impl("qmatmul_int8_out", &cholla::qmatmul_int8_out);
}
