// Matrix products straight from GGUF blocks with Intel AMX (bfloat16 tiles), or
// where the CPU has no AMX (AMD Zen 4/5, Intel before Sapphire Rapids) the same
// tile products with AVX512-BF16 dot products.
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

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "blocks.h"
#include "ops.h"

namespace {

// 32 dequantized weights (two vectors of 16) -> 32 bfloat16 at out.
inline void store_bf16(uint16_t* out, __m512 lo, __m512 hi) {
  __m512bh packed = _mm512_cvtne2ps_pbh(hi, lo);  // b (lo) fills the lower half
  _mm512_storeu_si512(out, (__m512i)packed);
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

// Set once by request_amx(): whether this process may use the tiles.
bool amx_granted = false;

constexpr int64_t TILE = 16;          // rows of one tile
constexpr int64_t KCHUNK = 32;        // bfloat16 per tile row
constexpr int64_t BLOCK_ROWS = 32;    // output rows per job (two A tiles)
constexpr int64_t TILE_ELEMS = TILE * KCHUNK;

// x: fp32 [m, k] -> bfloat16 tiles [m_tiles][k / 32][16 pairs][16 rows][2], zero padded.
// `group_rows` (a divisor of m): x is m / group_rows products' activations stacked, each packed
// as it would be alone (its own tiles, its own zero padding), one after another.
at::Tensor pack_activations(const at::Tensor& x, int64_t group_rows = 0) {
  const int64_t m = x.size(0), k = x.size(1), chunks = k / KCHUNK;
  const int64_t group = group_rows > 0 ? group_rows : m, groups = group > 0 ? m / group : 0;
  const int64_t group_tiles = (group + TILE - 1) / TILE, m_tiles = groups * group_tiles;
  at::Tensor packed = (group % TILE) ? at::zeros({m_tiles * chunks * TILE_ELEMS}, x.options().dtype(at::kBFloat16))
                                     : at::empty({m_tiles * chunks * TILE_ELEMS}, x.options().dtype(at::kBFloat16));
  const float* src = x.data_ptr<float>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(packed.data_ptr());  // one bfloat16 pair per uint32
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t pairs[16];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t tile = row / group * group_tiles + row % group / TILE, r = row % group % TILE;
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

// Writes C tiles (fp32 [16 n][16 m]) of one output block into y [m, n_total].
inline void write_tile(const float* c, float* y, int64_t n_total, int64_t m0, int64_t m_count, int64_t n0,
                       int64_t n_count) {
  for (int64_t j = 0; j < m_count; ++j)
    for (int64_t i = 0; i < n_count; ++i) y[(m0 + j) * n_total + n0 + i] = c[i * TILE + j];
}

// What _tile_dpbf16ps(c, a, b) computes, over `chunks` consecutive A and B tiles,
// with AVX512-BF16: c[i][j] = sum_k a[i][k] * x[j][k]. A: 16 rows of bfloat16
// at `stride` elements; B: packed activations ([16 pairs][16 rows][2] per chunk);
// c: fp32 [16 n][16 m], as _tile_stored writes it.
void tile_product_avx512(const uint16_t* a, int64_t stride, const uint16_t* b, int64_t chunks, float* c) {
  __m512 acc[TILE];
  for (int i = 0; i < TILE; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const uint16_t* a_chunk = a + ch * KCHUNK;
    const uint16_t* b_chunk = b + ch * TILE_ELEMS;
    for (int p = 0; p < KCHUNK / 2; ++p) {
      const __m512bh x_pairs = (__m512bh)_mm512_loadu_si512(b_chunk + p * 2 * TILE);
      for (int i = 0; i < TILE; ++i) {
        int32_t w_pair;
        std::memcpy(&w_pair, a_chunk + i * stride + 2 * p, 4);
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(w_pair), x_pairs);
      }
    }
  }
  for (int i = 0; i < TILE; ++i) _mm512_store_ps(c + i * TILE, acc[i]);
}

// The products of one 32-row strip with every tile of x, without AMX.
void strip_products_avx512(const uint16_t* strip, const uint16_t* xp, int64_t m, int64_t k, float* y,
                           int64_t n_total, int64_t n0, int64_t rows) {
  const int64_t chunks = k / KCHUNK, m_tiles = (m + TILE - 1) / TILE;
  alignas(64) float c[TILE * TILE];
  for (int64_t mt = 0; mt < m_tiles; ++mt) {
    const uint16_t* b = xp + mt * chunks * TILE_ELEMS;
    const int64_t m0 = mt * TILE, m_count = std::min<int64_t>(TILE, m - m0);
    for (int64_t half = 0; half * TILE < rows; ++half) {
      tile_product_avx512(strip + half * TILE * k, k, b, chunks, c);
      write_tile(c, y, n_total, m0, m_count, n0 + half * TILE, std::min<int64_t>(TILE, rows - half * TILE));
    }
  }
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
  const int64_t n0 = seg.out_offset + first_row;
  if (!amx_granted) return strip_products_avx512(strip, xp, m, k, y, n_total, n0, rows);
  const int64_t chunks = k / KCHUNK, m_tiles = (m + TILE - 1) / TILE, stride = k * 2;
  const uint16_t* a0 = strip;
  const uint16_t* a1 = strip + TILE * k;
  alignas(64) float c[4][TILE * TILE];
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

// Dequantize whole weights to bfloat16, stacked: [sum n_i, k]. Serves prefill-sized
// steps (one dense oneDNN matmul over the stack) and tests of the dequantizers.
at::Tensor dequantize_bf16(at::TensorList weights, at::IntArrayRef types, int64_t k) {
  std::vector<Segment> segments;
  const int64_t n_total = plan_segments(k, weights, types, segments);
  at::Tensor out = at::empty({n_total, k}, at::TensorOptions().dtype(at::kBFloat16));
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  // One parallel region over the stack's rows (q, k and v, or gate and up, together): waking the
  // team costs tens of microseconds a region at two threads.
  at::parallel_for(0, n_total, 64, [&](int64_t begin, int64_t end) {
    size_t s = 0;
    while (segments[s].out_offset + segments[s].rows <= begin) ++s;
    for (int64_t row = begin; row < end; ++row) {
      while (row == segments[s].out_offset + segments[s].rows) ++s;
      const Segment& seg = segments[s];
      const int64_t r = row - seg.out_offset;
      prefetch(seg.data + (r + PREFETCH_ROWS) * seg.row_bytes, seg.row_bytes);
      dequantize_row(seg.type, seg.data + r * seg.row_bytes, k, dst + row * k);
    }
  });
  return out;
}

// Linux hands out AMX tile state only to processes that ask for it; without it
// (or on a CPU without AMX) the products run on AVX512-BF16 instead.
bool request_amx() {
  constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  amx_granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return amx_granted;
}

// A member's share of `n_jobs` jobs (team.h) on this thread's tiles: `first()` once it has a
// job, then `job(j, strip)` for each, with a strip of BLOCK_ROWS weight rows of k to unpack into.
template <typename First, typename Job>
void tile_jobs(cholla::Member& member, int64_t n_jobs, int64_t k, First&& first, Job&& job) {
  int64_t begin = 0, end = 0;
  if (!member.next(n_jobs, begin, end)) return;
  first();
  if (amx_granted) configure_tiles();
  std::unique_ptr<uint16_t[]> strip(new uint16_t[BLOCK_ROWS * k]);
  do {
    for (int64_t j = begin; j < end; ++j) job(j, strip.get());
  } while (member.next(n_jobs, begin, end));
  if (amx_granted) _tile_release();
}

// A member's jobs of one product; x packed by `pack` (shared, or each member packs it itself:
// a few rows, sparing the team a wait), once the member has a job.
template <typename Pack>
void run_jobs(const std::vector<Segment>& segments, const std::vector<Job>& jobs, cholla::Member& member,
              Pack&& pack, int64_t m, int64_t k, float* out, int64_t n_total) {
  if (m == 0) return;
  at::Tensor packed;
  const uint16_t* xp = nullptr;
  tile_jobs(
      member, static_cast<int64_t>(jobs.size()), k,
      [&] {
        packed = pack();
        xp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
      },
      [&](int64_t j, uint16_t* strip) {
        run_job(segments[jobs[j].segment], jobs[j].first_row, xp, m, k, out, n_total, strip);
      });
}

// x's checks and the jobs, as every entry point needs them; returns the output width.
int64_t plan_qmatmul(const at::Tensor& x, at::TensorList weights, at::IntArrayRef types,
                     std::vector<Segment>& segments, std::vector<Job>& jobs) {
  check_activations(x);
  TORCH_CHECK(x.is_contiguous(), "qmatmul: x must be contiguous");
  const int64_t n_total = plan_segments(x.size(1), weights, types, segments);
  split_jobs(segments, BLOCK_ROWS, jobs);
  return n_total;
}

// The whole product into out, both threads sharing the jobs.
void run_qmatmul(const at::Tensor& x, const std::vector<Segment>& segments, const std::vector<Job>& jobs,
                 at::Tensor& out, int64_t n_total) {
  if (x.size(0) == 0) return;
  const at::Tensor packed = pack_activations(x);
  cholla::run_as_team([&](cholla::Member& member) {
    run_jobs(segments, jobs, member, [&] { return packed; }, x.size(0), x.size(1), out.data_ptr<float>(), n_total);
  });
}

// Many small products in one team: x fp32 [P, m, k] (contiguous) packed by group, keys bf16 or
// fp32 [P, n, k] (rows of k contiguous, strides free), out fp32 [P, m, n]; job j is a 32-key strip
// of product j / strips. `causal` > 0: x's
// row r is query r / causal of a prompt whose keys are its tokens, and a strip's tiles of queries
// that see none of its keys (all before the strip's first) are written as 0, not computed.
void run_batched_bf16(const at::Tensor& x, const at::Tensor& keys, at::Tensor& out, int64_t causal) {
  const int64_t products = x.size(0), m = x.size(1), k = x.size(2), n = keys.size(1);
  const int64_t type = keys.scalar_type() == at::kFloat ? F32 : BF16, size = keys.element_size();
  const int64_t product_bytes = keys.stride(0) * size, row_bytes = keys.stride(1) * size;
  if (products == 0 || m == 0 || n == 0) return;
  const at::Tensor packed = pack_activations(x.view({products * m, k}), m);
  const int64_t pair_elems = (m + TILE - 1) / TILE * (k / KCHUNK) * TILE_ELEMS;
  const int64_t strips = (n + BLOCK_ROWS - 1) / BLOCK_ROWS, n_jobs = products * strips;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  const uint8_t* key_rows = static_cast<const uint8_t*>(keys.data_ptr());
  float* y = out.data_ptr<float>();
  cholla::run_as_team([&](cholla::Member& member) {
    tile_jobs(member, n_jobs, k, [] {}, [&](int64_t j, uint16_t* strip) {
      const int64_t p = j / strips, n0 = j % strips * BLOCK_ROWS;
      const Segment seg{key_rows + p * product_bytes, type, n, row_bytes, 0};
      // The rows before tile `skip` are queries before key n0: masked for the whole strip.
      const int64_t skip = causal > 0 ? std::min(n0 * causal, m) / TILE : 0, m0 = skip * TILE;
      float* y_p = y + p * m * n;
      for (int64_t r = 0; r < m0; ++r) std::fill_n(y_p + r * n + n0, std::min<int64_t>(BLOCK_ROWS, n - n0), 0.0f);
      if (m0 < m)
        run_job(seg, n0, xp + p * pair_elems + skip * (k / KCHUNK) * TILE_ELEMS, m - m0, k, y_p + m0 * n, n, strip);
    });
  });
}

}  // namespace

namespace cholla {

// Attention scores of many (sequence, KV head) pairs in one call: x fp32 [P, m, k] (queries),
// keys bf16 or fp32 [P, n, k] (each row's k contiguous; fp32 rounded to bf16 as they are read, as
// .to(bfloat16) rounds them), out fp32 [P, m, n] (contiguous): out[p] = x[p] keys[p]^T with
// x rounded to bf16 and fp32 sums, the same as qmatmul_out(x[p], [keys[p]], [BF16], out[p]) for each
// p, bit for bit, but with one team for all of them (a short prompt's layer has one such product
// per sequence and KV head: 16 wake-ups of the team a layer for 16 prompts on one KV head).
// `causal` > 0 (a KV head's query heads, each query's `causal` rows one after another): the 32-key
// strips' tiles of 16 query rows that come wholly before the strip's first key are 0, not
// computed (a causal mask's -inf covers them): 37.5% of the products for 128 tokens of 4 heads.
void qmatmul_bf16_batched_out(const at::Tensor& x_in, const at::Tensor& keys, at::Tensor out, int64_t causal) {
  TORCH_CHECK(x_in.dim() == 3 && x_in.scalar_type() == at::kFloat, "qmatmul_bf16_batched_out: x must be fp32 [P, m, k]");
  const at::Tensor x = x_in.contiguous();
  const int64_t products = x.size(0), m = x.size(1), k = x.size(2);
  TORCH_CHECK(k % KCHUNK == 0, "qmatmul_bf16_batched_out: k must be a multiple of 32");
  TORCH_CHECK(keys.dim() == 3 && (keys.scalar_type() == at::kBFloat16 || keys.scalar_type() == at::kFloat) &&
                  keys.stride(2) == 1 && keys.size(0) == products && keys.size(2) == k,
              "qmatmul_bf16_batched_out: keys must be bf16 or fp32 [P, n, k] with x's P and k, rows contiguous");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 3 && out.size(0) == products &&
                  out.size(1) == m && out.size(2) == keys.size(1),
              "qmatmul_bf16_batched_out: out must be contiguous fp32 [P, m, n]");
  run_batched_bf16(x, keys, out, causal);
}

// x: fp32 [m, k]; weights[i]: uint8 [n_i, bytes per row] of GGML type types[i].
// Returns fp32 [m, sum n_i]: the products with each weight side by side, so that
// projections reading the same input (q, k, v; gate, up) run as one call.
at::Tensor qmatmul(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef types) {
  const at::Tensor x = x_in.contiguous();
  std::vector<Segment> segments;
  std::vector<Job> jobs;
  const int64_t n_total = plan_qmatmul(x, weights, types, segments, jobs);
  at::Tensor y = at::empty({x.size(0), n_total}, x.options());
  run_qmatmul(x, segments, jobs, y, n_total);
  return y;
}

// The same product into `out` (fp32 [m, sum n_i], contiguous): a caller that
// keeps its output buffer from step to step (the engine's logits) spares fresh
// memory's page faults and zeroing, ~5 ms a step for Gemma 3's logits at 32
// sequences (32 MiB).
void qmatmul_out(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef types, at::Tensor out) {
  const at::Tensor x = x_in.contiguous();
  std::vector<Segment> segments;
  std::vector<Job> jobs;
  const int64_t n_total = plan_qmatmul(x, weights, types, segments, jobs);
  check_output("qmatmul_out", out, x.size(0), n_total);
  run_qmatmul(x, segments, jobs, out, n_total);
}

// A member's part; each packs x itself (a few rows), sparing the team a wait.
void qmatmul_part(const at::Tensor& x, at::TensorList weights, at::IntArrayRef types, at::Tensor& y, Member& member) {
  std::vector<Segment> segments;
  std::vector<Job> jobs;
  const int64_t n_total = plan_qmatmul(x, weights, types, segments, jobs);
  check_output("qmatmul_part", y, x.size(0), n_total);
  run_jobs(segments, jobs, member, [&] { return pack_activations(x); }, x.size(0), x.size(1), y.data_ptr<float>(),
           n_total);
}

}  // namespace cholla

TORCH_LIBRARY(cholla, m) {
  m.def("qmatmul(Tensor x, Tensor[] weights, int[] types) -> Tensor");
  m.def("qmatmul_out(Tensor x, Tensor[] weights, int[] types, Tensor(a!) out) -> ()");
  m.def("qmatmul_bf16_batched_out(Tensor x, Tensor keys, Tensor(a!) out, int causal=0) -> ()");
  m.def("dequantize_bf16(Tensor[] weights, int[] types, int k) -> Tensor");
  m.def("request_amx() -> bool", &request_amx);
}

TORCH_LIBRARY_IMPL(cholla, CPU, m) {
  m.impl("qmatmul", &cholla::qmatmul);
  m.impl("qmatmul_out", &cholla::qmatmul_out);
  m.impl("qmatmul_bf16_batched_out", &cholla::qmatmul_bf16_batched_out);
  m.impl("dequantize_bf16", &dequantize_bf16);
}
