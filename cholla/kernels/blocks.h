// GGUF weight blocks as the kernels read them: the block formats, a dequantizer
// that hands 32 weights at a time to whatever consumes them, and the bookkeeping
// shared by every kernel that multiplies by weights (segments, jobs, prefetch).
//
// Kernels take a list of weights read with the same input, side by side (q, k,
// v; gate, up): each weight is a Segment of the output, cut into Jobs of rows
// that threads share.

#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstring>
#include <vector>

namespace {

// GGML type ids (gguf.GGMLQuantizationType).
enum GgmlType : int64_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
  Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
};

struct BlockFormat {
  int64_t elements;  // weights per block along k
  int64_t bytes;     // bytes per block
};

inline BlockFormat block_format(int64_t type) {
  switch (type) {
    case F32: return {1, 4};
    case F16: return {1, 2};
    case BF16: return {1, 2};
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
    default: return {0, 0};
  }
}

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m512 to_float(__m512i q) { return _mm512_cvtepi32_ps(q); }

// The 16 low nibbles and 16 high nibbles of 16 bytes, as int32 vectors.
// (One widening shuffle for both: shuffles share a single port, the bottleneck here.)
inline void nibbles(const uint8_t* qs, __m512i& lo, __m512i& hi) {
  __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  lo = _mm512_and_si512(bytes, _mm512_set1_epi32(0x0F));
  hi = _mm512_srli_epi32(bytes, 4);
}

// K-quant 6-bit scale and min of sub-block j (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, int& scale, int& min) {
  if (j < 4) {
    scale = q[j] & 63;
    min = q[j + 4] & 63;
  } else {
    scale = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Dequantizes one row of k weights in GGUF blocks, 32 at a time: calls
// sink(at, lo, hi) with weights at..at+15 in lo and at+16..at+31 in hi, in fp32,
// computed the way ggml's dequantizer computes them. The sink is inlined, so
// the weights go straight from registers into whatever the caller does.
template <typename Sink>
inline void for_each_group(int64_t type, const uint8_t* row, int64_t k, Sink&& sink) {
  const __m512i sixteen = _mm512_set1_epi32(16);
  int64_t at = 0;
  switch (type) {
    case Q4_0:
      for (int64_t b = 0; b < k / 32; ++b, row += 18, at += 32) {
        __m512 d = _mm512_set1_ps(f16(row));
        __m512i lo, hi;
        nibbles(row + 2, lo, hi);
        __m512i eight = _mm512_set1_epi32(8);
        sink(at, _mm512_mul_ps(to_float(_mm512_sub_epi32(lo, eight)), d),
                   _mm512_mul_ps(to_float(_mm512_sub_epi32(hi, eight)), d));
      }
      break;
    case Q4_1:
      for (int64_t b = 0; b < k / 32; ++b, row += 20, at += 32) {
        __m512 d = _mm512_set1_ps(f16(row)), m = _mm512_set1_ps(f16(row + 2));
        __m512i lo, hi;
        nibbles(row + 4, lo, hi);
        sink(at, _mm512_fmadd_ps(to_float(lo), d, m), _mm512_fmadd_ps(to_float(hi), d, m));
      }
      break;
    case Q5_0:
    case Q5_1: {
      const bool has_min = type == Q5_1;
      const int64_t size = has_min ? 24 : 22, qh_at = has_min ? 4 : 2;
      for (int64_t b = 0; b < k / 32; ++b, row += size, at += 32) {
        __m512 d = _mm512_set1_ps(f16(row));
        uint32_t qh;
        std::memcpy(&qh, row + qh_at, 4);
        __m512i lo, hi;
        nibbles(row + qh_at + 4, lo, hi);
        lo = _mm512_mask_add_epi32(lo, (__mmask16)(qh & 0xFFFF), lo, sixteen);  // 5th bit
        hi = _mm512_mask_add_epi32(hi, (__mmask16)(qh >> 16), hi, sixteen);
        if (has_min) {
          __m512 m = _mm512_set1_ps(f16(row + 2));
          sink(at, _mm512_fmadd_ps(to_float(lo), d, m), _mm512_fmadd_ps(to_float(hi), d, m));
        } else {
          sink(at, _mm512_mul_ps(to_float(_mm512_sub_epi32(lo, sixteen)), d),
                     _mm512_mul_ps(to_float(_mm512_sub_epi32(hi, sixteen)), d));
        }
      }
      break;
    }
    case Q8_0:
      for (int64_t b = 0; b < k / 32; ++b, row += 34, at += 32) {
        __m512 d = _mm512_set1_ps(f16(row));
        __m512i lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2)));
        __m512i hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 18)));
        sink(at, _mm512_mul_ps(to_float(lo), d), _mm512_mul_ps(to_float(hi), d));
      }
      break;
    case Q4_K:
    case Q5_K: {
      // 256 weights in 8 sub-blocks of 32: w = (d * scale) * q - dmin * min.
      const bool five = type == Q5_K;
      const int64_t size = five ? 176 : 144;
      for (int64_t b = 0; b < k / 256; ++b, row += size, at += 256) {
        const float d = f16(row), dmin = f16(row + 2);
        const uint8_t* scales = row + 4;
        const uint8_t* qh = row + 16;  // Q5_K only: bit j of byte l is the 5th bit of sub-block j
        const uint8_t* qs = row + (five ? 48 : 16);
        for (int j = 0; j < 4; ++j) {  // 32 bytes hold sub-blocks 2j (low nibbles) and 2j+1 (high)
          int sc_lo, mn_lo, sc_hi, mn_hi;
          scale_min_k4(2 * j, scales, sc_lo, mn_lo);
          scale_min_k4(2 * j + 1, scales, sc_hi, mn_hi);
          __m512 d_lo = _mm512_set1_ps(d * sc_lo), m_lo = _mm512_set1_ps(dmin * mn_lo);
          __m512 d_hi = _mm512_set1_ps(d * sc_hi), m_hi = _mm512_set1_ps(dmin * mn_hi);
          __m512i q_lo[2], q_hi[2];
          for (int half = 0; half < 2; ++half) {
            nibbles(qs + 32 * j + 16 * half, q_lo[half], q_hi[half]);
            if (five) {
              __m512i bits = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qh + 16 * half)));
              __mmask16 lo5 = _mm512_test_epi32_mask(bits, _mm512_set1_epi32(1 << (2 * j)));
              __mmask16 hi5 = _mm512_test_epi32_mask(bits, _mm512_set1_epi32(2 << (2 * j)));
              q_lo[half] = _mm512_mask_add_epi32(q_lo[half], lo5, q_lo[half], sixteen);
              q_hi[half] = _mm512_mask_add_epi32(q_hi[half], hi5, q_hi[half], sixteen);
            }
          }
          sink(at + 64 * j, _mm512_fmsub_ps(to_float(q_lo[0]), d_lo, m_lo),
                     _mm512_fmsub_ps(to_float(q_lo[1]), d_lo, m_lo));
          sink(at + 64 * j + 32, _mm512_fmsub_ps(to_float(q_hi[0]), d_hi, m_hi),
                     _mm512_fmsub_ps(to_float(q_hi[1]), d_hi, m_hi));
        }
      }
      break;
    }
    case Q6_K:
      // 256 weights: two halves of 128, each from 64 bytes of low 4 bits (ql) and
      // 32 bytes of high 2 bits (qh); one int8 scale per 16 weights.
      for (int64_t b = 0; b < k / 256; ++b, row += 210, at += 256) {
        const float d = f16(row + 208);
        const int8_t* scales = reinterpret_cast<const int8_t*>(row + 192);
        for (int half = 0; half < 2; ++half) {
          const uint8_t* ql = row + 64 * half;
          const uint8_t* qh = row + 128 + 32 * half;
          const int8_t* sc = scales + 8 * half;
          __m512 w[4][2];
          for (int g = 0; g < 2; ++g) {  // l = 16 g .. 16 g + 15
            __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ql + 16 * g)));
            __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ql + 32 + 16 * g)));
            __m512i h = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qh + 16 * g)));
            const __m512i low4 = _mm512_set1_epi32(0xF), three = _mm512_set1_epi32(3), bias = _mm512_set1_epi32(32);
            __m512i q[4] = {
                _mm512_or_si512(_mm512_and_si512(a, low4), _mm512_slli_epi32(_mm512_and_si512(h, three), 4)),
                _mm512_or_si512(_mm512_and_si512(c, low4),
                                _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 2), three), 4)),
                _mm512_or_si512(_mm512_srli_epi32(a, 4),
                                _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 4), three), 4)),
                _mm512_or_si512(_mm512_srli_epi32(c, 4),
                                _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 6), three), 4)),
            };
            for (int i = 0; i < 4; ++i) {
              __m512 scale = _mm512_set1_ps(d * sc[g + 2 * i]);
              w[i][g] = _mm512_mul_ps(scale, to_float(_mm512_sub_epi32(q[i], bias)));
            }
          }
          for (int i = 0; i < 4; ++i) sink(at + 128 * half + 32 * i, w[i][0], w[i][1]);
        }
      }
      break;
    case F32: {
      const float* src = reinterpret_cast<const float*>(row);
      for (int64_t i = 0; i < k; i += 32) sink(i, _mm512_loadu_ps(src + i), _mm512_loadu_ps(src + i + 16));
      break;
    }
    case F16: {
      const __m256i* src = reinterpret_cast<const __m256i*>(row);
      for (int64_t i = 0; i < k; i += 32, src += 2)
        sink(i, _mm512_cvtph_ps(_mm256_loadu_si256(src)), _mm512_cvtph_ps(_mm256_loadu_si256(src + 1)));
      break;
    }
    case BF16: {
      const __m256i* src = reinterpret_cast<const __m256i*>(row);
      for (int64_t i = 0; i < k; i += 32, src += 2)
        sink(i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(src)), 16)),
             _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(src + 1)), 16)));
      break;
    }
  }
}

// Weights stream from memory once per call: the hardware prefetcher alone, which
// stops at every 4 KiB page, left the decode GEMV waiting on memory (4.4 GB/s on
// SmolLM2's layers, 9.6 GB/s with this). Rows this far ahead are requested early.
constexpr int64_t PREFETCH_ROWS = 8;

// Asks for the cache lines of `bytes` bytes at p (a prefetch never faults, so p may run past the end).
// Into L2 (T2), not L1: every GEMV of a decode step ran 15-20% faster than with
// T0 (SmolLM2's all together 7.0 -> 5.8 ms, Gemma 3's 16.2 -> 13.6 ms), and
// 8 rows ahead beat 4 once the lines no longer crowd L1.
inline void prefetch(const uint8_t* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T2);
}

struct Segment {
  const uint8_t* data;
  int64_t type, rows, row_bytes, out_offset;
};

struct Job {
  int segment;
  int64_t first_row;
};

// Activations: fp32 [m, k].
inline void check_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "qmatmul: x must be fp32 [m, k]");
}

// An output the caller provides: contiguous fp32 [m, n_total].
inline void check_output(const char* op, const at::Tensor& out, int64_t m, int64_t n_total) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == m &&
                  out.size(1) == n_total, op, ": out must be contiguous fp32 [", m, ", ", n_total, "]");
}

// Checks the weights hold rows of k weights, fills `segments` with one Segment per
// weight (in place: a caller's list keeps its room); returns the total output width.
inline int64_t plan_segments(int64_t k, at::TensorList weights, at::IntArrayRef types, std::vector<Segment>& segments) {
  TORCH_CHECK(weights.size() == types.size() && !weights.empty(), "qmatmul: one type per weight");
  TORCH_CHECK(k % 32 == 0, "qmatmul: k must be a multiple of 32");
  segments.clear();
  int64_t n_total = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    const BlockFormat format = block_format(types[i]);
    TORCH_CHECK(format.elements > 0, "qmatmul: unsupported GGML type ", types[i]);
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && k % format.elements == 0 &&
                    w.size(1) * w.element_size() == k / format.elements * format.bytes,
                "qmatmul: weight ", i, " does not hold rows of ", k, " weights of type ", types[i]);
    segments.push_back({static_cast<const uint8_t*>(w.data_ptr()), types[i], w.size(0),
                        w.size(1) * w.element_size(), n_total});
    n_total += w.size(0);
  }
  return n_total;
}

// Every segment cut into jobs of rows_per_job output rows, the unit threads share
// (into `jobs`, in place: a caller's list keeps its room).
inline void split_jobs(const std::vector<Segment>& segments, int64_t rows_per_job, std::vector<Job>& jobs) {
  jobs.clear();
  for (size_t i = 0; i < segments.size(); ++i)
    for (int64_t row = 0; row < segments[i].rows; row += rows_per_job) jobs.push_back({static_cast<int>(i), row});
}

}  // namespace
