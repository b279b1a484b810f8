// 16-lane AVX-512 helpers the kernels share: tail masks, e^x, fp32/bf16 loads, SiLU, an l2-normalised row.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace {

// The first `left` of 16 lanes (all of them from 16 on, none at 0 or below).
inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
}

// e^x for 16 floats: Cephes' expf (range reduction by ln 2, degree-6 polynomial,
// about 1 ulp), scaled by 2^n with scalef. A scalar expf per score cost more
// than the dot products themselves.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));  // below this e^x is 0 in fp32 anyway
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// 16 values of a row as fp32 lanes (bf16: its bits are the fp32's top half).
inline __m512 load16(const float* p, __mmask16 live) { return _mm512_maskz_loadu_ps(live, p); }
inline __m512 load16(const uint16_t* p, __mmask16 live) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p)), 16));
}

// silu(x) = x sigmoid(x), as PyTorch takes it.
inline __m512 silu16(__m512 x) {
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// x * scale / sqrt(|x|^2 + 1e-6) into `dst` (dim floats): l2_normalize in gated_deltanet.py.
inline void l2_normalize_row(const float* x, float* dst, int64_t dim, float scale) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < dim; i += 16) {
    const __m512 v = load16(x + i, lanes(dim - i));
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  const __m512 factor = _mm512_set1_ps(scale / std::sqrt(_mm512_reduce_add_ps(squares) + 1e-6f));
  for (int64_t i = 0; i < dim; i += 16) {
    const __mmask16 live = lanes(dim - i);
    _mm512_mask_storeu_ps(dst + i, live, _mm512_mul_ps(load16(x + i, live), factor));
  }
}

}  // namespace
