// The gated MLP's activation: act(gate) * up in one pass.
//
// PyTorch takes two passes and a slow tanh: tanh-GELU alone cost 60 us on
// Gemma 3's 32 x 2048 decode activations, and about 1 ms per layer of a
// 512-token prefill. SiLU is g sigmoid(g); tanh-GELU, 0.5 g (1 + tanh z) with
// z = sqrt(2 / pi) (g + 0.044715 g^3), is the same g sigmoid(2 z): one e^x per
// weight either way. Exact (erf) GELU stays with PyTorch.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

#include "simd.h"
#include "ops.h"

namespace {

// Activation ids, as cholla/layers/mlp.py numbers them.
enum Activation : int64_t { SILU = 0, GELU_TANH = 1, GELU = 2 };

void check_half(const at::Tensor& t, const at::Tensor& gate) {
  TORCH_CHECK((t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16) &&
                  t.scalar_type() == gate.scalar_type() && t.dim() == 2 && t.sizes() == gate.sizes() &&
                  t.stride(1) == 1,
              "gated_activation: gate and up must be fp32 or bf16 [rows, inner], alike, with contiguous rows");
}

// 16 fp32 lanes back to a row (simd.h's load16 reads one).
inline void store16(float* p, __mmask16 live, __m512 v) { _mm512_mask_storeu_ps(p, live, v); }
inline void store16(uint16_t* p, __mmask16 live, __m512 v) {  // round to nearest even, as PyTorch's .to(bfloat16)
  _mm256_mask_storeu_epi16(p, live, (__m256i)_mm512_cvtneps_pbh(v));
}

// One row: act(g) * u over `inner` values (the body of every path here, so that a row comes out
// the same whichever of them computes it).
template <typename T>
void activate_row(const T* g_row, const T* u_row, T* dst, int64_t inner, bool tanh_gelu) {
  const __m512 one = _mm512_set1_ps(1.0f), c1 = _mm512_set1_ps(2.0f * 0.7978845608028654f),
               c3 = _mm512_set1_ps(2.0f * 0.7978845608028654f * 0.044715f);
  for (int64_t i = 0; i < inner; i += 16) {
    const __mmask16 live = lanes(inner - i);
    const __m512 g = load16(g_row + i, live);
    const __m512 s = tanh_gelu ? _mm512_mul_ps(g, _mm512_fmadd_ps(_mm512_mul_ps(g, g), c3, c1)) : g;
    const __m512 act = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), s))));
    store16(dst + i, live, _mm512_mul_ps(act, load16(u_row + i, live)));
  }
}

template <typename T>
void activate(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out, bool tanh_gelu) {
  const int64_t rows = gate.size(0), inner = gate.size(1);
  const T* gs = static_cast<const T*>(gate.data_ptr());
  const T* us = static_cast<const T*>(up.data_ptr());
  T* dst = static_cast<T*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(inner, 1));  // rows per thread, at least
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      activate_row(gs + r * gate.stride(0), us + r * up.stride(0), dst + r * inner, inner, tanh_gelu);
  });
}

}  // namespace

namespace cholla {

// gate, up: fp32 or bf16 [rows, inner] (row strides free: halves of the
// gate/up product) -> act(gate) * up, in their dtype. In bf16 (a prefill's
// dense product) the result is what rounding the fp32 one for the down
// projection's bf16 matmul would give, without the two fp32 copies: 48 MiB
// less for Gemma 3's 2048-token chunks.
at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, int64_t activation) {
  at::Tensor out = at::empty({gate.size(0), gate.size(1)}, gate.options().memory_format(at::MemoryFormat::Contiguous));
  gated_activation_out(gate, up, activation, out);
  return out;
}

void gated_activation_out(const at::Tensor& gate, const at::Tensor& up, int64_t activation, at::Tensor& out) {
  check_half(gate, gate);
  check_half(up, gate);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == gate.sizes() && out.scalar_type() == gate.scalar_type(),
              "gated_activation: out must be contiguous, of gate's shape and dtype");
  if (activation == GELU) {
    out.copy_(at::gelu(gate.to(at::kFloat)).mul_(up));
    return;
  }
  TORCH_CHECK(activation == SILU || activation == GELU_TANH, "gated_activation: unknown activation ", activation);
  if (gate.scalar_type() == at::kFloat)
    activate<float>(gate, up, out, activation == GELU_TANH);
  else
    activate<uint16_t>(gate, up, out, activation == GELU_TANH);
}

bool gated_activation_by_rows(int64_t activation) { return activation == SILU || activation == GELU_TANH; }

void gated_activation_row(const float* gate, const float* up, float* out, int64_t inner, int64_t activation) {
  activate_row(gate, up, out, inner, activation == GELU_TANH);
}

}  // namespace cholla

TORCH_LIBRARY_FRAGMENT(cholla, m) { m.def("gated_activation(Tensor gate, Tensor up, int activation) -> Tensor"); }

TORCH_LIBRARY_IMPL(cholla, CPU, m) { m.impl("gated_activation", &cholla::gated_activation); }
