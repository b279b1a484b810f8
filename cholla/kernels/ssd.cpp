// Mamba-2's decode kernels: the state-space step on the sequences' state slots
// in place, and the gated RMSNorm after it.
//
// Each sequence's head h keeps a state S [head_dim, state_size] (fp32, in its
// slot of the state cache). One token advances it by
//
//     dt = clamp(softplus(dt_raw + dt_bias[h]), dt_min, dt_max)      A = -exp(A_log[h])
//     S  = exp(dt A) S + dt x B^T          y = S C + D[h] x
//
// with B, C [state_size] shared by the heads of a group. PyTorch's form
// (cholla/layers/mamba2.py ssd_step) gathers the batch's states by slot, takes
// three passes over them (decay, rank-1 update, product with C) and scatters them
// back: five passes over 1.5 MB per sequence and layer at Mamba-2 780M's shape.
// Here each (sequence, head) reads and writes its state once, row by row: the
// decay, the update and the dot product with C on the same 16-lane registers.
//
// The gated RMSNorm (y * silu(z), normalised over each group's channels, or
// normalised first and gated after) was nine PyTorch ops per layer and step.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace {

// PyTorch's softplus (beta 1, threshold 20): the input itself above 20.
inline float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }

bool fp32_rows(const at::Tensor& t, int64_t rows, int64_t width) {
  return t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == rows && t.size(1) == width && t.stride(1) == 1;
}

bool fp32_vector(const at::Tensor& t, int64_t size) {
  return t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == size && t.is_contiguous();
}

// One group of one row: out = norm(y * silu(z)) * w, or norm(y) * w * silu(z) with norm_before_gate.
void gated_norm_group(const float* y, const float* z, const float* w, float* out, int64_t width, float eps,
                      bool norm_before_gate) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < width; i += 16) {
    const __mmask16 live = lanes(width - i);
    __m512 v = _mm512_maskz_loadu_ps(live, y + i);
    if (!norm_before_gate) v = _mm512_mul_ps(v, silu16(_mm512_maskz_loadu_ps(live, z + i)));
    _mm512_mask_storeu_ps(out + i, live, v);
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(squares) / width + eps));
  for (int64_t i = 0; i < width; i += 16) {
    const __mmask16 live = lanes(width - i);
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(live, out + i), scale), _mm512_maskz_loadu_ps(live, w + i));
    if (norm_before_gate) v = _mm512_mul_ps(v, silu16(_mm512_maskz_loadu_ps(live, z + i)));
    _mm512_mask_storeu_ps(out + i, live, v);
  }
}

// One head's step: state [head_dim, state_size] rows updated in place, y [head_dim] written.
void head_step(float* state, const float* x, const float* B, const float* C, float* y, int64_t head_dim,
               int64_t state_size, float dt, float decay, float skip) {
  const __m512 decay16 = _mm512_set1_ps(decay);
  for (int64_t p = 0; p < head_dim; ++p, state += state_size) {
    const __m512 dx = _mm512_set1_ps(dt * x[p]);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();  // two chains: the FMAs' latency
    int64_t n = 0;
    for (; n + 32 <= state_size; n += 32) {
      const __m512 s0 = _mm512_fmadd_ps(_mm512_loadu_ps(state + n), decay16, _mm512_mul_ps(dx, _mm512_loadu_ps(B + n)));
      const __m512 s1 =
          _mm512_fmadd_ps(_mm512_loadu_ps(state + n + 16), decay16, _mm512_mul_ps(dx, _mm512_loadu_ps(B + n + 16)));
      _mm512_storeu_ps(state + n, s0);
      _mm512_storeu_ps(state + n + 16, s1);
      acc0 = _mm512_fmadd_ps(s0, _mm512_loadu_ps(C + n), acc0);
      acc1 = _mm512_fmadd_ps(s1, _mm512_loadu_ps(C + n + 16), acc1);
    }
    for (; n < state_size; n += 16) {
      const __mmask16 live = lanes(state_size - n);
      const __m512 s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, state + n), decay16,
                                       _mm512_mul_ps(dx, _mm512_maskz_loadu_ps(live, B + n)));
      _mm512_mask_storeu_ps(state + n, live, s);
      acc0 = _mm512_fmadd_ps(s, _mm512_maskz_loadu_ps(live, C + n), acc0);
    }
    y[p] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + skip * x[p];
  }
}

}  // namespace

namespace cholla {

// state: fp32 [slots, heads, head_dim, state_size], contiguous, updated in place
// for the rows of `slots` (int64 [batch], distinct) and no others. x: [batch,
// heads * head_dim]; dt: [batch, heads] before softplus; B, C: [batch, groups *
// state_size]; each fp32 with contiguous rows (row strides free: views of the
// in_proj / conv output). dt_bias, A_log, D: fp32 [heads].
// Returns y [batch, heads * head_dim] fp32, the D skip included.
at::Tensor ssd_step(at::Tensor& state, const at::Tensor& slots, const at::Tensor& x, const at::Tensor& dt,
                    const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& B, const at::Tensor& C,
                    const at::Tensor& D, double dt_min, double dt_max) {
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.dim() == 4 && state.is_contiguous(),
              "ssd_step: state must be a contiguous fp32 [slots, heads, head_dim, state_size] tensor");
  const int64_t num_slots = state.size(0), heads = state.size(1), head_dim = state.size(2),
                state_size = state.size(3);
  const int64_t batch = x.size(0);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == batch && slots.is_contiguous(),
              "ssd_step: slots must be int64 [batch], one per row of x");
  TORCH_CHECK(fp32_rows(x, batch, heads * head_dim) && fp32_rows(dt, batch, heads),
              "ssd_step: x must be fp32 [batch, heads * head_dim] and dt fp32 [batch, heads], rows contiguous");
  TORCH_CHECK(B.dim() == 2 && B.size(1) % state_size == 0 && B.size(1) > 0,
              "ssd_step: B must be [batch, groups * state_size]");
  const int64_t groups = B.size(1) / state_size;
  TORCH_CHECK(heads % groups == 0, "ssd_step: ", groups, " groups do not divide ", heads, " heads");
  TORCH_CHECK(fp32_rows(B, batch, groups * state_size) && fp32_rows(C, batch, groups * state_size),
              "ssd_step: B and C must be fp32 [batch, groups * state_size], rows contiguous");
  TORCH_CHECK(fp32_vector(dt_bias, heads) && fp32_vector(A_log, heads) && fp32_vector(D, heads),
              "ssd_step: dt_bias, A_log and D must be contiguous fp32 [heads]");
  const int64_t* slot = slots.data_ptr<int64_t>();
  std::vector<bool> taken(num_slots, false);
  for (int64_t b = 0; b < batch; ++b) {  // two rows on one slot would race, one outside the cache would corrupt memory
    TORCH_CHECK(slot[b] >= 0 && slot[b] < num_slots && !taken[slot[b]], "ssd_step: slot ", slot[b],
                " is out of range [0, ", num_slots, ") or given twice");
    taken[slot[b]] = true;
  }

  at::Tensor y = at::empty({batch, heads * head_dim}, x.options().memory_format(at::MemoryFormat::Contiguous));
  float* states = state.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  const float *xs = x.data_ptr<float>(), *dts = dt.data_ptr<float>(), *Bs = B.data_ptr<float>(),
              *Cs = C.data_ptr<float>(), *bias = dt_bias.data_ptr<float>(), *A_logs = A_log.data_ptr<float>(),
              *Ds = D.data_ptr<float>();
  const int64_t per_group = heads / groups, head_state = head_dim * state_size;
  const float lo = static_cast<float>(dt_min), hi = static_cast<float>(dt_max);
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(head_state, 1));  // heads per thread, at least
  at::parallel_for(0, batch * heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / heads, h = i % heads, g = h / per_group;
      const float step = std::min(std::max(softplus(dts[b * dt.stride(0) + h] + bias[h]), lo), hi);
      const float decay = std::exp(-step * std::exp(A_logs[h]));
      head_step(states + (slot[b] * heads + h) * head_state, xs + b * x.stride(0) + h * head_dim,
                Bs + b * B.stride(0) + g * state_size, Cs + b * C.stride(0) + g * state_size,
                ys + b * heads * head_dim + h * head_dim, head_dim, state_size, step, decay, Ds[h]);
    }
  });
  return y;
}

// y: fp32 [rows, inner], contiguous; z: fp32 [rows, inner] (row stride free: a
// view of in_proj's output); weight: fp32 [inner]. The norm is taken over each
// of `groups` runs of inner / groups channels. Returns fp32 [rows, inner].
at::Tensor gated_rms_norm(const at::Tensor& y, const at::Tensor& z, const at::Tensor& weight, int64_t groups,
                          double eps, bool norm_before_gate) {
  const int64_t rows = y.size(0), inner = y.dim() == 2 ? y.size(1) : 0;
  TORCH_CHECK(fp32_rows(y, rows, inner) && y.is_contiguous() && fp32_rows(z, rows, inner),
              "gated_rms_norm: y must be contiguous fp32 [rows, inner], z fp32 [rows, inner] with contiguous rows");
  TORCH_CHECK(fp32_vector(weight, inner), "gated_rms_norm: weight must be contiguous fp32 [", inner, "]");
  TORCH_CHECK(groups > 0 && inner % groups == 0, "gated_rms_norm: ", groups, " groups do not divide ", inner, " channels");
  at::Tensor out = at::empty_like(y);
  const int64_t width = inner / groups;
  const float *ys = y.data_ptr<float>(), *zs = z.data_ptr<float>(), *w = weight.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows * groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / groups, offset = (i % groups) * width;
      gated_norm_group(ys + r * inner + offset, zs + r * z.stride(0) + offset, w + offset, dst + r * inner + offset,
                       width, static_cast<float>(eps), norm_before_gate);
    }
  });
  return out;
}

// The bodies above for one (sequence, head) and one (row, group), for the fused decode
// layers (ops.h): dt_raw before softplus, clamped to [dt_min, dt_max] as ssd_step does.
void ssd_head_row(float* state, const float* x, const float* B, const float* C, float* y, int64_t head_dim,
                  int64_t state_size, float dt_raw, float dt_bias, float A_log, float D, float dt_min, float dt_max) {
  const float step = std::min(std::max(softplus(dt_raw + dt_bias), dt_min), dt_max);
  head_step(state, x, B, C, y, head_dim, state_size, step, std::exp(-step * std::exp(A_log)), D);
}

void gated_norm_row(const float* y, const float* z, const float* weight, float* out, int64_t width, float eps,
                    bool norm_before_gate) {
  gated_norm_group(y, z, weight, out, width, eps, norm_before_gate);
}

}  // namespace cholla

TORCH_LIBRARY_FRAGMENT(cholla, m) {
  m.def("ssd_step(Tensor(a!) state, Tensor slots, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log, Tensor B, Tensor C, "
        "Tensor D, float dt_min, float dt_max) -> Tensor");
  m.def("gated_rms_norm(Tensor y, Tensor z, Tensor weight, int groups, float eps, bool norm_before_gate) -> Tensor");
}

TORCH_LIBRARY_IMPL(cholla, CPU, m) {
  m.impl("ssd_step", &cholla::ssd_step);
  m.impl("gated_rms_norm", &cholla::gated_rms_norm);
}
