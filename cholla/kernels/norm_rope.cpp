// The small per-token operations of a layer, each fused into one pass.
//
// In a decode step every layer runs two RMSNorms and a rotary embedding on
// vectors of a few hundred floats. As chains of PyTorch ops (square, mean,
// rsqrt, multiplies; gathers of cos and sin, a rotate-half, multiplies and
// adds) they cost about twenty dispatches of a few microseconds each per
// layer, more than the arithmetic. Here each is one call. Both compute in
// fp32 the way the PyTorch versions in cholla/layers do, up to summation order.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "ops.h"
#include "simd.h"

namespace {

// Rows of at most this many floats in total run on one thread: waking the
// other costs more than it saves.
constexpr int64_t SERIAL_ELEMENTS = 1 << 15;

// Rotates one head vector in place by the angles of one position (rows of the
// cos and sin tables). Interleaved: dimensions (2i, 2i+1) form a pair, as in
// llama.cpp's permuted Llama weights; otherwise i pairs with i + dim/2 (HF).
inline void rotate(float* x, const float* cos, const float* sin, int64_t dim, bool interleaved) {
  if (interleaved) {
    for (int64_t i = 0; i < dim; i += 2) {
      const float a = x[i], b = x[i + 1];
      x[i] = a * cos[i] - b * sin[i];
      x[i + 1] = b * cos[i + 1] + a * sin[i + 1];
    }
  } else {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      x[i] = a * cos[i] - b * sin[i];
      x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

void check_heads(const at::Tensor& x, int64_t tokens, int64_t dim) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(0) == tokens && x.size(2) == dim &&
                  x.stride(2) == 1 && x.stride(1) == dim,
              "rope: q and k must be fp32 [tokens, heads, ", dim, "] with contiguous heads");
}

}  // namespace

namespace cholla {

void rms_norm_row(const float* x, const float* weight, float* y, int64_t dim, float eps) {
  const __mmask16 tail = lanes(dim % 16);
  const int64_t full = dim - dim % 16;
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < full; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    sum = _mm512_fmadd_ps(v, v, sum);
  }
  if (tail) {
    const __m512 v = _mm512_maskz_loadu_ps(tail, x + full);
    sum = _mm512_fmadd_ps(v, v, sum);
  }
  const float mean = _mm512_reduce_add_ps(sum) / static_cast<float>(dim);
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(mean + eps));
  for (int64_t i = 0; i < full; i += 16)
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(weight + i), _mm512_mul_ps(_mm512_loadu_ps(x + i), scale)));
  if (tail)
    _mm512_mask_storeu_ps(y + full, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, weight + full),
                                                       _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, x + full), scale)));
}

// x: fp32 [..., dim] -> x / sqrt(mean(x^2) + eps) * weight, contiguous. Heads [tokens, heads, dim]
// with contiguous heads but a free token stride (q and k as views into a prompt's fused q/k/v
// product) are read in place: no contiguous copy of them first.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm: fp32 only");
  const int64_t dim = x_in.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == dim && weight.is_contiguous(), "rms_norm: weight must be [", dim, "]");
  const bool heads = x_in.dim() == 3 && x_in.stride(2) == 1 && (x_in.stride(1) == dim || x_in.size(1) == 1);
  const at::Tensor x = heads ? x_in : x_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t rows = dim ? x.numel() / dim : 0;
  const int64_t per_token = heads ? x.size(1) : 1, token_stride = heads ? x.stride(0) : dim;
  const float* src = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, SERIAL_ELEMENTS / std::max<int64_t>(dim, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      rms_norm_row(src + r / per_token * token_stride + r % per_token * dim, w, dst + r * dim, dim,
                   static_cast<float>(eps));
  });
  return y;
}

// x + rms_norm(a, weight), and that sum's rms_norm(., next_weight) where next_weight is given
// (Gemma's residual adds: the sublayer's post-norm, the add, the next sublayer's pre-norm), one
// pass and one parallel region over the rows instead of three: x, a fp32 [rows, dim] contiguous.
// Without next_weight the second result is empty. Each value as the three ops give it (the
// norms' rows are rms_norm's, the add is one fp32 add).
std::tuple<at::Tensor, at::Tensor> residual_rms_norm(const at::Tensor& x, const at::Tensor& a,
                                                     const at::Tensor& weight, double eps,
                                                     const std::optional<at::Tensor>& next_weight) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() &&
                  a.is_contiguous() && a.sizes() == x.sizes(),
              "residual_rms_norm: x and a must be contiguous fp32 [rows, dim], alike");
  const int64_t rows = x.size(0), dim = x.size(1);
  for (const at::Tensor* w : {&weight, next_weight ? &*next_weight : &weight})
    TORCH_CHECK(w->scalar_type() == at::kFloat && w->dim() == 1 && w->size(0) == dim && w->is_contiguous(),
                "residual_rms_norm: weights must be fp32 [", dim, "]");
  at::Tensor sum = at::empty_like(x);
  at::Tensor normed = next_weight ? at::empty_like(x) : at::empty({0}, x.options());
  const float* xs = x.data_ptr<float>();
  const float* as = a.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* w_next = next_weight ? next_weight->data_ptr<float>() : nullptr;
  float* dst = sum.data_ptr<float>();
  float* dst_normed = next_weight ? normed.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, std::max<int64_t>(1, SERIAL_ELEMENTS / std::max<int64_t>(dim, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = dst + r * dim;
      rms_norm_row(as + r * dim, w, row, dim, static_cast<float>(eps));
      for (int64_t i = 0; i < dim; ++i) row[i] = xs[r * dim + i] + row[i];
      if (w_next) rms_norm_row(row, w_next, dst_normed + r * dim, dim, static_cast<float>(eps));
    }
  });
  return {sum, normed};
}

void rope_row(float* q, int64_t q_heads, float* k, int64_t k_heads, const float* cos, const float* sin, int64_t dim,
              bool interleaved) {
  for (int64_t h = 0; h < q_heads; ++h) rotate(q + h * dim, cos, sin, dim, interleaved);
  for (int64_t h = 0; h < k_heads; ++h) rotate(k + h * dim, cos, sin, dim, interleaved);
}

// q: [tokens, heads, dim], k: [tokens, kv_heads, dim] (token stride free),
// rotated in place by positions [tokens] (int64) through tables cos, sin: [length, dim].
void rope_(at::Tensor q, at::Tensor k, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
           bool interleaved) {
  const int64_t tokens = positions.numel(), dim = cos.size(1), length = cos.size(0);
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "rope: positions must be int64");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.sizes() == cos.sizes() &&
                  sin.scalar_type() == at::kFloat && sin.is_contiguous() && dim % 2 == 0,
              "rope: cos and sin must be fp32 [length, even dim]");
  check_heads(q, tokens, dim);
  check_heads(k, tokens, dim);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(pos[t] >= 0 && pos[t] < length, "rope: position out of the table");
  float* qd = q.data_ptr<float>();
  float* kd = k.data_ptr<float>();
  const int64_t q_heads = q.size(1), k_heads = k.size(1);
  const int64_t grain = std::max<int64_t>(1, SERIAL_ELEMENTS / ((q_heads + k_heads) * dim));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      rope_row(qd + t * q.stride(0), q_heads, kd + t * k.stride(0), k_heads, cos.data_ptr<float>() + pos[t] * dim,
               sin.data_ptr<float>() + pos[t] * dim, dim, interleaved);
  });
}

}  // namespace cholla

TORCH_LIBRARY_FRAGMENT(cholla, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("residual_rms_norm(Tensor x, Tensor a, Tensor weight, float eps, Tensor? next_weight) -> (Tensor, Tensor)");
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos, Tensor sin, bool interleaved) -> ()");
}

TORCH_LIBRARY_IMPL(cholla, CPU, m) {
  m.impl("rms_norm", &cholla::rms_norm);
  m.impl("residual_rms_norm", &cholla::residual_rms_norm);
  m.impl("rope_", &cholla::rope_);
}
