// Decode steps of the recurrent layers, on their state in place.
//
// A decode step gives each sequence one new token; its recurrent layers fold
// that token into fixed-size float32 states kept per sequence in the state
// cache's slots (cholla/kv/state_cache.py). In PyTorch ops each update
// gathers the batch's slots into a copy, updates the copy and scatters it
// back, and the delta rule alone is a dozen small ops per layer. Here each
// sequence's slot is read and rewritten where it lies, in one call:
//
// - causal_conv_step: the short causal convolution (cholla/layers/causal_conv.py),
//   conv_state [slots, channels, kernel - 1] holding each channel's last inputs, oldest first;
// - gated_delta_rule_step: Gated DeltaNet's recurrence (cholla/layers/gated_deltanet.py),
//   state [slots, v_heads, k_dim, v_dim] per value head, from the convolved q, k, v and the
//   raw decay and beta projections.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "simd.h"

namespace {

// The largest kernel and key dimension the kernels hold on the stack (real models: 4 and 128-256).
constexpr int64_t MAX_KERNEL = 16;
constexpr int64_t MAX_KEY_DIM = 1024;

inline float sum16(__m512 x) { return _mm512_reduce_add_ps(x); }

// The slots as int64 [batch], each within the cache's `num_slots`.
const int64_t* checked_slots(const char* op, const at::Tensor& slots, int64_t batch, int64_t num_slots) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == batch && slots.is_contiguous(),
              op, ": slots must be contiguous int64 [batch]");
  const int64_t* ids = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch; ++i)
    TORCH_CHECK(ids[i] >= 0 && ids[i] < num_slots, op, ": slot ", ids[i], " is outside the cache's ", num_slots);
  return ids;
}

// One sequence's channels [begin, end): out = sum_t window[t] w[t] (+ bias), the window being
// the state's `width` inputs then x; the state moves one input on. 16 channels per pass: their
// states and weights are `width` and `kernel` floats apart, so the taps are gathered.
template <typename T>
void conv_channels(const T* x, const float* weight, const float* bias, float* state, float* out, int64_t begin,
                   int64_t end, int64_t kernel, bool silu) {
  const int64_t width = kernel - 1;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i state_index = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)width));
  const __m512i weight_index = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)kernel));
  __m512 window[MAX_KERNEL];
  for (int64_t c = begin; c < end; c += 16) {
    const __mmask16 live = lanes(end - c);
    float* s = state + c * width;
    const float* w = weight + c * kernel;
    for (int64_t t = 0; t < width; ++t)
      window[t] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, state_index, s + t, 4);
    window[width] = load16(x + c, live);
    __m512 acc = bias ? _mm512_maskz_loadu_ps(live, bias + c) : _mm512_setzero_ps();
    for (int64_t t = 0; t < kernel; ++t)
      acc = _mm512_fmadd_ps(window[t], _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, weight_index, w + t, 4), acc);
    _mm512_mask_storeu_ps(out + c, live, silu ? silu16(acc) : acc);
    alignas(64) float shifted[MAX_KERNEL][16];
    for (int64_t t = 0; t < width; ++t) _mm512_store_ps(shifted[t], window[t + 1]);
    for (int64_t lane_index = 0; lane_index < std::min<int64_t>(16, end - c); ++lane_index)
      for (int64_t t = 0; t < width; ++t) s[lane_index * width + t] = shifted[t][lane_index];
  }
}

// Columns per pass of the delta rule: 4 vectors, so a [k_dim, 64] strip of S (32 KiB at
// k_dim 128) is still in L1 when the second sweep rewrites it.
constexpr int64_t STRIP = 4;

// One value head of one sequence: S [dk, dv] row-major (key index, value index), q and k
// normalised (q scaled). With d = exp(g): delta = beta (v - d k S), out = d q S + (q.k) delta,
// S <- d S + k delta^T. A column j of S needs only column j's reads, so each strip of columns
// is read once for q S and k S, then rewritten while it is in L1. `next`: the state the
// thread steps next (or null), fetched into L2 while this one is rewritten (at 32 sequences
// the states no longer fit in cache, and the hardware's prefetcher alone left the sweeps
// waiting on memory: ~13% slower).
void delta_rule_head(const float* q, const float* k, const float* v, float g, float beta, float* S, float* out,
                     int64_t dk, int64_t dv, const float* next) {
  __m512 qk_lanes = _mm512_setzero_ps();
  for (int64_t i = 0; i < dk; i += 16) {
    const __mmask16 live = lanes(dk - i);
    qk_lanes = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, q + i), _mm512_maskz_loadu_ps(live, k + i), qk_lanes);
  }
  const __m512 qk = _mm512_set1_ps(sum16(qk_lanes)), decay = _mm512_set1_ps(std::exp(g)),
               beta_lanes = _mm512_set1_ps(beta);
  for (int64_t j0 = 0; j0 < dv; j0 += 16 * STRIP) {
    __mmask16 live[STRIP];
    __m512 q_reads[STRIP], k_reads[STRIP], delta[STRIP];
    for (int u = 0; u < STRIP; ++u) {
      live[u] = lanes(dv - j0 - 16 * u);
      q_reads[u] = k_reads[u] = _mm512_setzero_ps();
    }
    for (int64_t i = 0; i < dk; ++i) {
      const float* row = S + i * dv + j0;
      const __m512 qi = _mm512_set1_ps(q[i]), ki = _mm512_set1_ps(k[i]);
#pragma GCC unroll 4
      for (int u = 0; u < STRIP; ++u) {
        const __m512 s = _mm512_maskz_loadu_ps(live[u], row + 16 * u);
        q_reads[u] = _mm512_fmadd_ps(qi, s, q_reads[u]);
        k_reads[u] = _mm512_fmadd_ps(ki, s, k_reads[u]);
      }
    }
    for (int u = 0; u < STRIP; ++u) {
      const __m512 vu = _mm512_maskz_loadu_ps(live[u], v + j0 + 16 * u);
      delta[u] = _mm512_mul_ps(beta_lanes, _mm512_fnmadd_ps(decay, k_reads[u], vu));
      _mm512_mask_storeu_ps(out + j0 + 16 * u, live[u],
                            _mm512_fmadd_ps(decay, q_reads[u], _mm512_mul_ps(qk, delta[u])));
    }
    for (int64_t i = 0; i < dk; ++i) {
      float* row = S + i * dv + j0;
      const __m512 ki = _mm512_set1_ps(k[i]);
#pragma GCC unroll 4
      for (int u = 0; u < STRIP; ++u) {
        if (next && live[u]) _mm_prefetch(reinterpret_cast<const char*>(next + i * dv + j0 + 16 * u), _MM_HINT_T1);
        const __m512 s = _mm512_maskz_loadu_ps(live[u], row + 16 * u);
        _mm512_mask_storeu_ps(row + 16 * u, live[u], _mm512_fmadd_ps(ki, delta[u], _mm512_mul_ps(decay, s)));
      }
    }
  }
}

// softplus as torch computes it (beta 1, threshold 20).
inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

}  // namespace

namespace cholla {

// x: fp32 or bf16 [batch, channels] (row stride free), one new input per sequence; weight: fp32
// [channels, kernel]; bias: fp32 [channels] or none; conv_state: fp32 [num_slots, channels,
// kernel - 1], the slots of `slots` (int64 [batch]) updated in place. -> fp32 [batch, channels],
// through SiLU when `silu`.
at::Tensor causal_conv_step(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            at::Tensor conv_state, const at::Tensor& slots, bool silu) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.is_contiguous() &&
                  weight.size(1) >= 2 && weight.size(1) <= MAX_KERNEL,
              "causal_conv_step: weight must be contiguous fp32 [channels, kernel] with 2 <= kernel <= ", MAX_KERNEL);
  const int64_t channels = weight.size(0), kernel = weight.size(1);
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.dim() == 2 &&
                  x.size(1) == channels && x.stride(1) == 1,
              "causal_conv_step: x must be fp32 or bf16 [batch, ", channels, "] with contiguous rows");
  TORCH_CHECK(conv_state.scalar_type() == at::kFloat && conv_state.dim() == 3 && conv_state.is_contiguous() &&
                  conv_state.size(1) == channels && conv_state.size(2) == kernel - 1,
              "causal_conv_step: conv_state must be contiguous fp32 [slots, ", channels, ", ", kernel - 1, "]");
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == channels &&
                    bias->is_contiguous(),
                "causal_conv_step: bias must be contiguous fp32 [", channels, "]");
    bias_data = bias->data_ptr<float>();
  }
  const int64_t batch = x.size(0);
  const int64_t* ids = checked_slots("causal_conv_step", slots, batch, conv_state.size(0));
  at::Tensor out = at::empty({batch, channels}, x.options().dtype(at::kFloat));
  const int64_t blocks = (channels + 255) / 256;  // a job: 256 channels of one sequence
  at::parallel_for(0, batch * blocks, 4, [&](int64_t first, int64_t last) {
    for (int64_t job = first; job < last; ++job) {
      const int64_t b = job / blocks, begin = job % blocks * 256, end = std::min(channels, begin + 256);
      float* state = conv_state.data_ptr<float>() + ids[b] * channels * (kernel - 1);
      float* dst = out.data_ptr<float>() + b * channels;
      if (x.scalar_type() == at::kFloat)
        conv_channels(x.data_ptr<float>() + b * x.stride(0), weight.data_ptr<float>(), bias_data, state, dst, begin,
                      end, kernel, silu);
      else
        conv_channels(static_cast<const uint16_t*>(x.data_ptr()) + b * x.stride(0), weight.data_ptr<float>(),
                      bias_data, state, dst, begin, end, kernel, silu);
    }
  });
  return out;
}

// qkv: fp32 [batch, 2 * k_heads * dk + v_heads * dv] (row stride free), the convolved (and
// activated) q, k, v of one token per sequence; a, b: fp32 [batch, v_heads] (row strides
// free), the decay and beta projections; A: fp32 [v_heads] (negative), dt_bias: fp32
// [v_heads]; state: fp32 [num_slots, v_heads, dk, dv], the slots of `slots` updated in place.
// Value head h reads key head h % k_heads (`tiled`) or h / (v_heads / k_heads).
// Per head: q, k l2-normalised (q also scaled by dk^-1/2), g = A softplus(a + dt_bias),
// beta = sigmoid(b), then the delta rule (delta_rule_head). -> fp32 [batch, v_heads, dv].
at::Tensor gated_delta_rule_step(const at::Tensor& qkv, const at::Tensor& a, const at::Tensor& b, const at::Tensor& A,
                                 const at::Tensor& dt_bias, at::Tensor state, const at::Tensor& slots, int64_t k_heads,
                                 bool tiled) {
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.dim() == 4 && state.is_contiguous(),
              "gated_delta_rule_step: state must be contiguous fp32 [slots, v_heads, k_dim, v_dim]");
  const int64_t v_heads = state.size(1), dk = state.size(2), dv = state.size(3);
  TORCH_CHECK(k_heads > 0 && v_heads % k_heads == 0, "gated_delta_rule_step: ", v_heads,
              " value heads are not a multiple of ", k_heads, " key heads");
  TORCH_CHECK(dk <= MAX_KEY_DIM, "gated_delta_rule_step: key dim ", dk, " is over ", MAX_KEY_DIM);
  const int64_t key_dim = k_heads * dk, channels = 2 * key_dim + v_heads * dv;
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.dim() == 2 && qkv.size(1) == channels && qkv.stride(1) == 1,
              "gated_delta_rule_step: qkv must be fp32 [batch, ", channels, "] with contiguous rows");
  const int64_t batch = qkv.size(0);
  for (const at::Tensor* t : {&a, &b})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == batch && t->size(1) == v_heads &&
                    t->stride(1) == 1,
                "gated_delta_rule_step: a and b must be fp32 [batch, ", v_heads, "] with contiguous rows");
  for (const at::Tensor* t : {&A, &dt_bias})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == v_heads && t->is_contiguous(),
                "gated_delta_rule_step: A and dt_bias must be contiguous fp32 [", v_heads, "]");
  const int64_t* ids = checked_slots("gated_delta_rule_step", slots, batch, state.size(0));
  at::Tensor out = at::empty({batch, v_heads, dv}, qkv.options());
  const float* rows = qkv.data_ptr<float>();
  const int64_t ratio = v_heads / k_heads;
  const float scale = 1.0f / std::sqrt((float)dk);
  at::parallel_for(0, batch * v_heads, 1, [&](int64_t first, int64_t last) {
    alignas(64) float q[MAX_KEY_DIM], k[MAX_KEY_DIM];
    for (int64_t job = first; job < last; ++job) {
      const int64_t s = job / v_heads, h = job % v_heads, key_head = tiled ? h % k_heads : h / ratio;
      const float* row = rows + s * qkv.stride(0);
      l2_normalize_row(row + key_head * dk, q, dk, scale);
      l2_normalize_row(row + key_dim + key_head * dk, k, dk, 1.0f);
      const float g = A.data_ptr<float>()[h] * softplus(a.data_ptr<float>()[s * a.stride(0) + h] + dt_bias.data_ptr<float>()[h]);
      const float beta = 1.0f / (1.0f + std::exp(-b.data_ptr<float>()[s * b.stride(0) + h]));
      const float* next = job + 1 < last
          ? state.data_ptr<float>() + (ids[(job + 1) / v_heads] * v_heads + (job + 1) % v_heads) * dk * dv : nullptr;
      delta_rule_head(q, k, row + 2 * key_dim + h * dv, g, beta, state.data_ptr<float>() + (ids[s] * v_heads + h) * dk * dv,
                      out.data_ptr<float>() + job * dv, dk, dv, next);
    }
  });
  return out;
}

// gated_delta_rule_step's body for one (sequence, value head), for a fused caller (ops.h): `row`
// the sequence's convolved q, k, v; a, b its raw decay and beta projections for head h.
void delta_rule_head_row(const float* row, float a, float b, float A, float dt_bias, float* state, float* out,
                         int64_t k_heads, int64_t v_heads, int64_t dk, int64_t dv, int64_t h, bool tiled,
                         const float* next) {
  alignas(64) float q[MAX_KEY_DIM], k[MAX_KEY_DIM];
  const int64_t key_dim = k_heads * dk, key_head = tiled ? h % k_heads : h / (v_heads / k_heads);
  l2_normalize_row(row + key_head * dk, q, dk, 1.0f / std::sqrt((float)dk));
  l2_normalize_row(row + key_dim + key_head * dk, k, dk, 1.0f);
  const float g = A * softplus(a + dt_bias), beta = 1.0f / (1.0f + std::exp(-b));
  delta_rule_head(q, k, row + 2 * key_dim + h * dv, g, beta, state, out, dk, dv, next);
}

// conv_channels for a fused caller (ops.h): one fp32 row's channels [begin, end).
void conv_step_row(const float* x, const float* weight, const float* bias, float* state, float* out, int64_t begin,
                   int64_t end, int64_t kernel, bool silu) {
  conv_channels(x, weight, bias, state, out, begin, end, kernel, silu);
}

}  // namespace cholla

TORCH_LIBRARY_FRAGMENT(cholla, m) {
  m.def("causal_conv_step(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) conv_state, Tensor slots, bool silu) -> Tensor");
  m.def("gated_delta_rule_step(Tensor qkv, Tensor a, Tensor b, Tensor A, Tensor dt_bias, Tensor(a!) state, Tensor slots, "
        "int k_heads, bool tiled) -> Tensor");
}

TORCH_LIBRARY_IMPL(cholla, CPU, m) {
  m.impl("causal_conv_step", &cholla::causal_conv_step);
  m.impl("gated_delta_rule_step", &cholla::gated_delta_rule_step);
}
