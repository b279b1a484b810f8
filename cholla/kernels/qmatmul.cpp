// Matrix products straight from GGUF blocks with Intel AMX (bfloat16 tiles).
//
// y[m, n] = sum_k x[m, k] * W[n, k], where W stays in the GGUF file's blocks.
// For every 32 output rows the kernel dequantizes the rows' blocks once into a
// small bfloat16 strip (L1/L2 resident), then multiplies the strip with every
// row of x on the AMX tiles, accumulating in fp32. Weights are read from memory
// once per call whatever the number of rows of x, so the same kernel serves a
// one-token decode step (memory bound) and a 512-token prefill (compute bound).
//
// Tile roles: A = 16 weight rows x 32 k (row-major, as dequantized), B = 16 rows
// of x in the VNNI pair layout AMX wants ([k/2][m][2]), C = fp32 [16 n][16 m].
// Tiles 0-1 hold A, 2-3 hold B, 4-7 the four C blocks of a 32 x 32 output block.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>
#include <memory>
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

BlockFormat block_format(int64_t type) {
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

// 32 dequantized weights (two vectors of 16) -> 32 bfloat16 at out.
inline void store_bf16(uint16_t* out, __m512 lo, __m512 hi) {
  __m512bh packed = _mm512_cvtne2ps_pbh(hi, lo);  // b (lo) fills the lower half
  _mm512_storeu_si512(out, (__m512i)packed);
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
constexpr int64_t PREFETCH_ROWS = 4;

// Asks for the cache lines of `bytes` bytes at p (a prefetch never faults, so p may run past the end).
inline void prefetch(const uint8_t* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
}

// One row of k weights -> k bfloat16 (round to nearest even).
void dequantize_row(int64_t type, const uint8_t* row, int64_t k, uint16_t* out) {
  for_each_group(type, row, k, [out](int64_t at, __m512 lo, __m512 hi) { store_bf16(out + at, lo, hi); });
}

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows x 64 bytes. The tile configuration is per thread.
void configure_tiles() {
  alignas(64) TileConfig config;
  std::memset(&config, 0, sizeof(config));
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  // GCC 12 does not see that _tile_loadconfig reads `config` and drops the stores.
  asm volatile("" ::: "memory");
  _tile_loadconfig(&config);
}

constexpr int64_t TILE = 16;          // rows of one tile
constexpr int64_t KCHUNK = 32;        // bfloat16 per tile row
constexpr int64_t BLOCK_ROWS = 32;    // output rows per job (two A tiles)
constexpr int64_t TILE_ELEMS = TILE * KCHUNK;

// x: fp32 [m, k] -> bfloat16 tiles [m_tiles][k / 32][16 pairs][16 rows][2], zero padded.
at::Tensor pack_activations(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1), m_tiles = (m + TILE - 1) / TILE, chunks = k / KCHUNK;
  at::Tensor packed = (m % TILE) ? at::zeros({m_tiles * chunks * TILE_ELEMS}, x.options().dtype(at::kBFloat16))
                                 : at::empty({m_tiles * chunks * TILE_ELEMS}, x.options().dtype(at::kBFloat16));
  const float* src = x.data_ptr<float>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(packed.data_ptr());  // one bfloat16 pair per uint32
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t pairs[16];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t tile = row / TILE, r = row % TILE;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* s = src + row * k + c * KCHUNK;
        __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + 16), _mm512_loadu_ps(s));
        _mm512_store_si512(pairs, (__m512i)v);
        uint32_t* tile_base = dst + (tile * chunks + c) * (TILE_ELEMS / 2);
        for (int p = 0; p < 16; ++p) tile_base[p * TILE + r] = pairs[p];
      }
    }
  });
  return packed;
}

struct Segment {
  const uint8_t* data;
  int64_t type, rows, row_bytes, out_offset;
};

struct Job {
  int segment;
  int64_t first_row;
};

// Writes C tiles (fp32 [16 n][16 m]) of one output block into y [m, n_total].
inline void write_tile(const float* c, float* y, int64_t n_total, int64_t m0, int64_t m_count, int64_t n0,
                       int64_t n_count) {
  for (int64_t j = 0; j < m_count; ++j)
    for (int64_t i = 0; i < n_count; ++i) y[(m0 + j) * n_total + n0 + i] = c[i * TILE + j];
}

void run_job(const Segment& seg, int64_t first_row, const uint16_t* xp, int64_t m, int64_t k, float* y,
             int64_t n_total, uint16_t* strip) {
  const int64_t rows = std::min<int64_t>(BLOCK_ROWS, seg.rows - first_row);
  for (int64_t r = 0; r < BLOCK_ROWS; ++r) {
    prefetch(seg.data + (first_row + r + PREFETCH_ROWS) * seg.row_bytes, seg.row_bytes);
    if (r < rows)
      dequantize_row(seg.type, seg.data + (first_row + r) * seg.row_bytes, k, strip + r * k);
    else
      std::memset(strip + r * k, 0, k * 2);
  }
  const int64_t chunks = k / KCHUNK, m_tiles = (m + TILE - 1) / TILE, stride = k * 2;
  const uint16_t* a0 = strip;
  const uint16_t* a1 = strip + TILE * k;
  alignas(64) float c[4][TILE * TILE];
  const int64_t n0 = seg.out_offset + first_row;
  for (int64_t mt = 0; mt < m_tiles; mt += 2) {
    const uint16_t* b0 = xp + mt * chunks * TILE_ELEMS;
    const bool two = mt + 1 < m_tiles;
    _tile_zero(4);
    _tile_zero(6);
    if (two) {
      const uint16_t* b1 = b0 + chunks * TILE_ELEMS;
      _tile_zero(5);
      _tile_zero(7);
      for (int64_t ch = 0; ch < chunks; ++ch) {
        _tile_loadd(0, a0 + ch * KCHUNK, stride);
        _tile_loadd(1, a1 + ch * KCHUNK, stride);
        _tile_loadd(2, b0 + ch * TILE_ELEMS, 64);
        _tile_loadd(3, b1 + ch * TILE_ELEMS, 64);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(5, 0, 3);
        _tile_dpbf16ps(6, 1, 2);
        _tile_dpbf16ps(7, 1, 3);
      }
      _tile_stored(5, c[1], 64);
      _tile_stored(7, c[3], 64);
    } else {
      for (int64_t ch = 0; ch < chunks; ++ch) {
        _tile_loadd(0, a0 + ch * KCHUNK, stride);
        _tile_loadd(1, a1 + ch * KCHUNK, stride);
        _tile_loadd(2, b0 + ch * TILE_ELEMS, 64);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(6, 1, 2);
      }
    }
    _tile_stored(4, c[0], 64);
    _tile_stored(6, c[2], 64);
    const int64_t m0 = mt * TILE;
    const int64_t m_first = std::min<int64_t>(TILE, m - m0);
    write_tile(c[0], y, n_total, m0, m_first, n0, std::min<int64_t>(TILE, rows));
    if (rows > TILE) write_tile(c[2], y, n_total, m0, m_first, n0 + TILE, rows - TILE);
    if (two) {
      const int64_t m_second = std::min<int64_t>(TILE, m - m0 - TILE);
      write_tile(c[1], y, n_total, m0 + TILE, m_second, n0, std::min<int64_t>(TILE, rows));
      if (rows > TILE) write_tile(c[3], y, n_total, m0 + TILE, m_second, n0 + TILE, rows - TILE);
    }
  }
}

// x: fp32 [m, k]; weights[i]: uint8 [n_i, bytes per row] of GGML type types[i].
// Returns fp32 [m, sum n_i]: the products with each weight side by side, so that
// projections reading the same input (q, k, v; gate, up) run as one call.
void check_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "qmatmul: x must be fp32 [m, k]");
}

// Checks the weights hold rows of k weights, fills one Segment per weight; returns
// the total output width.
int64_t plan_segments(int64_t k, at::TensorList weights, at::IntArrayRef types, std::vector<Segment>& segments) {
  TORCH_CHECK(weights.size() == types.size() && !weights.empty(), "qmatmul: one type per weight");
  TORCH_CHECK(k % KCHUNK == 0, "qmatmul: k must be a multiple of 32");
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

// Every segment cut into jobs of rows_per_job output rows, the unit threads share.
std::vector<Job> split_jobs(const std::vector<Segment>& segments, int64_t rows_per_job) {
  std::vector<Job> jobs;
  for (size_t i = 0; i < segments.size(); ++i)
    for (int64_t row = 0; row < segments[i].rows; row += rows_per_job) jobs.push_back({static_cast<int>(i), row});
  return jobs;
}

// x: fp32 [m, k]; weights[i]: uint8 [n_i, bytes per row] of GGML type types[i].
// Returns fp32 [m, sum n_i]: the products with each weight side by side, so that
// projections reading the same input (q, k, v; gate, up) run as one call.
at::Tensor qmatmul(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef types) {
  const at::Tensor x = x_in.contiguous();
  std::vector<Segment> segments;
  check_activations(x);
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t n_total = plan_segments(k, weights, types, segments);
  const std::vector<Job> jobs = split_jobs(segments, BLOCK_ROWS);
  at::Tensor y = at::empty({m, n_total}, x.options());
  if (m == 0) return y;
  const at::Tensor packed = pack_activations(x);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  float* out = y.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(jobs.size()), 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    std::unique_ptr<uint16_t[]> strip(new uint16_t[BLOCK_ROWS * k]);
    for (int64_t j = begin; j < end; ++j)
      run_job(segments[jobs[j].segment], jobs[j].first_row, xp, m, k, out, n_total, strip.get());
    _tile_release();
  });
  return y;
}

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

// Same contract as qmatmul, fp32 products, x: [m <= 8, k].
at::Tensor qgemv(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef types) {
  const at::Tensor x = x_in.contiguous();
  std::vector<Segment> segments;
  check_activations(x);
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t n_total = plan_segments(k, weights, types, segments);
  TORCH_CHECK(m <= GEMV_MAX_ROWS, "qgemv: at most ", GEMV_MAX_ROWS, " rows, got ", m);
  at::Tensor y = at::empty({m, n_total}, x.options());
  if (m == 0) return y;
  const std::vector<Job> jobs = split_jobs(segments, GEMV_JOB_ROWS);
  const GemvRows gemv = GEMV_BY_ROWS[m - 1];
  const float* xs = x.data_ptr<float>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(jobs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const Segment& seg = segments[jobs[j].segment];
      gemv(seg, jobs[j].first_row, std::min(seg.rows, jobs[j].first_row + GEMV_JOB_ROWS), xs, k, out, n_total);
    }
  });
  return y;
}

// Dequantize whole weights to bfloat16, stacked: [sum n_i, k]. Serves prefill-sized
// steps (one dense oneDNN matmul over the stack) and tests of the dequantizers.
at::Tensor dequantize_bf16(at::TensorList weights, at::IntArrayRef types, int64_t k) {
  std::vector<Segment> segments;
  const int64_t n_total = plan_segments(k, weights, types, segments);
  at::Tensor out = at::empty({n_total, k}, at::TensorOptions().dtype(at::kBFloat16));
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  for (const Segment& seg : segments) {
    at::parallel_for(0, seg.rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        prefetch(seg.data + (r + PREFETCH_ROWS) * seg.row_bytes, seg.row_bytes);
        dequantize_row(seg.type, seg.data + r * seg.row_bytes, k, dst + (seg.out_offset + r) * k);
      }
    });
  }
  return out;
}

// Linux hands out AMX tile state only to processes that ask for it.
bool request_amx() {
  constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

}  // namespace

TORCH_LIBRARY(cholla, m) {
  m.def("qmatmul(Tensor x, Tensor[] weights, int[] types) -> Tensor");
  m.def("qgemv(Tensor x, Tensor[] weights, int[] types) -> Tensor");
  m.def("dequantize_bf16(Tensor[] weights, int[] types, int k) -> Tensor");
  m.def("request_amx() -> bool", &request_amx);
}

TORCH_LIBRARY_IMPL(cholla, CPU, m) {
  m.impl("qmatmul", &qmatmul);
  m.impl("qgemv", &qgemv);
  m.impl("dequantize_bf16", &dequantize_bf16);
}
