// Matrix-vector products for decode steps, straight from GGUF blocks.
//
// A decode step multiplies one activation row (or a few) by every weight of
// the model, so it is bound by reading the weights: the kernels here aim to
// consume blocks as fast as memory delivers them.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

#include "blocks.h"

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(cholla, m) { m.def("qgemv(Tensor x, Tensor[] weights, int[] types) -> Tensor"); }

TORCH_LIBRARY_IMPL(cholla, CPU, m) { m.impl("qgemv", &qgemv); }
