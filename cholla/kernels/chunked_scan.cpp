// Prefill of the recurrent layers: whole prompt chunks folded into their state slots.
//
// The decode kernels (state_update.cpp, ssd.cpp) take one token per sequence; a prefill
// step brings hundreds per sequence, packed one sequence after another (varlen, offsets
// `starts` [seqs + 1]), each continuing from its state-cache slot:
//
// - causal_conv_prefill: the short causal convolution over each sequence's tokens, its
//   window starting from the slot's last inputs, which it then replaces;
// - gated_delta_rule_chunked: Gated DeltaNet's chunked form (cholla/layers/gated_deltanet.py,
//   delta_rule_chunked), one job per (sequence, value head), CHUNK tokens at a time;
// - ssd_chunked: Mamba-2's chunked state-space-duality form (cholla/layers/mamba2.py,
//   ssd_chunked), one job per (sequence, head) after the C.B scores of each (sequence,
//   group, chunk) are taken once.
//
// Within a chunk both are small matrix products (64 x 64 x 128-ish) on fp32 buffers that stay
// in L1/L2; the state is fp32 and carried from chunk to chunk in place. The PyTorch forms
// spent most of their time on temporaries: [chunks, heads, 64, 64] decay matrices, padded
// copies and layout transposes, and a triangular solve through LAPACK per chunk.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace {

constexpr int64_t CHUNK = 64;          // tokens per chunk: the delta rule's and the SSD's
constexpr int64_t MAX_DIM = 512;       // the largest head / key / value / state dimension held in a job's buffers
constexpr int64_t MAX_CONV_KERNEL = 16;

// softplus as torch computes it (beta 1, threshold 20).
inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

// R rows of C [.., N] (+)= A [R, K] B [K, N], row-major fp32 with strides in floats; 64 columns
// (four vectors) at a time, so the R x 4 sums stay in registers while B's rows stream by.
template <int R>
void gemm_rows(int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
               bool accumulate) {
  for (int64_t j0 = 0; j0 < N; j0 += 64) {
    __mmask16 live[4];
    __m512 c[R][4];
    for (int u = 0; u < 4; ++u) live[u] = lanes(N - j0 - 16 * u);
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < 4; ++u)
        c[r][u] = accumulate ? load16(C + r * ldc + j0 + 16 * u, live[u]) : _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      __m512 b[4];
      for (int u = 0; u < 4; ++u) b[u] = load16(B + k * ldb + j0 + 16 * u, live[u]);
      for (int r = 0; r < R; ++r) {
        const __m512 a = _mm512_set1_ps(A[r * lda + k]);
        for (int u = 0; u < 4; ++u) c[r][u] = _mm512_fmadd_ps(a, b[u], c[r][u]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < 4; ++u) _mm512_mask_storeu_ps(C + r * ldc + j0 + 16 * u, live[u], c[r][u]);
  }
}

// C [M, N] (+)= A [M, K] B [K, N]. `lower`: A is lower triangular (zero above its diagonal,
// K == M), so rows i..i+R-1 only need B's first i + R rows.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate, bool lower = false) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6)
    gemm_rows<6>(N, lower ? std::min(K, i + 6) : K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  if (i + 4 <= M) {  // the rest in blocks of 4, 2, 1: a row alone is bound by its loads, not its FMAs
    gemm_rows<4>(N, lower ? std::min(K, i + 4) : K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
    i += 4;
  }
  if (i + 2 <= M) {
    gemm_rows<2>(N, lower ? std::min(K, i + 2) : K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
    i += 2;
  }
  if (i < M) gemm_rows<1>(N, lower ? std::min(K, i + 1) : K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
}

// dst [cols, rows] = src [rows, cols]^T (src row stride `lds`, dst row stride `ldd`).
void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// row[j] = exp(G_i - G[j]) * row[j] for j <= last, 0 beyond (up to `width`): the causal decay mask.
void decay_row(float* row, const float* G, float Gi, int64_t last, int64_t width) {
  for (int64_t j = 0; j < width; j += 16) {
    const __mmask16 live = lanes(last + 1 - j), all = lanes(width - j);
    const __m512 d = exp16(_mm512_sub_ps(_mm512_set1_ps(Gi), load16(G + j, live)));
    _mm512_mask_storeu_ps(row + j, all, _mm512_maskz_mul_ps(live, d, load16(row + j, live)));
  }
}

// row[j] *= factor for `n` floats.
void scale_row(float* row, int64_t n, float factor) {
  const __m512 f = _mm512_set1_ps(factor);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = lanes(n - j);
    _mm512_mask_storeu_ps(row + j, live, _mm512_mul_ps(f, load16(row + j, live)));
  }
}

// The sequences' offsets (int64 [seqs + 1], non-decreasing, within `tokens`) and slots (int64
// [seqs], distinct: two jobs on one slot would race), checked.
void check_sequences(const char* op, const at::Tensor& starts, const at::Tensor& slots, int64_t tokens,
                     int64_t num_slots) {
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.dim() == 1 && starts.is_contiguous() && starts.size(0) >= 1,
              op, ": starts must be contiguous int64 [seqs + 1]");
  const int64_t seqs = starts.size(0) - 1;
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == seqs && slots.is_contiguous(),
              op, ": slots must be contiguous int64 [seqs]");
  const int64_t *s = starts.data_ptr<int64_t>(), *ids = slots.data_ptr<int64_t>();
  TORCH_CHECK(s[0] == 0 && s[seqs] == tokens, op, ": starts must run from 0 to the ", tokens, " tokens");
  std::vector<bool> taken(num_slots, false);
  for (int64_t i = 0; i < seqs; ++i) {
    TORCH_CHECK(s[i] <= s[i + 1], op, ": starts must not decrease");
    TORCH_CHECK(ids[i] >= 0 && ids[i] < num_slots && !taken[ids[i]], op, ": slot ", ids[i],
                " is out of range [0, ", num_slots, ") or given twice");
    taken[ids[i]] = true;
  }
}

bool fp32_rows(const at::Tensor& t, int64_t rows, int64_t cols) {
  return t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.stride(1) == 1;
}

bool fp32_vector(const at::Tensor& t, int64_t n) {
  return t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == n && t.is_contiguous();
}

// Tokens per tile of the prefill convolution: every channel block of a job takes these rows
// before the next tile, so x is read a few whole rows at a time (one 16-channel block running
// down 512 rows of 24 KiB each missed the TLB on every load: 15x slower at Qwen 3.5's width).
constexpr int64_t CONV_TILE = 16;

// One sequence's channels [begin, end) over its tokens. Each 16-channel block keeps its window
// (the state's `width` inputs, then each token) in `history` between tiles; the state is
// rewritten with the last `width` inputs.
template <typename T>
void conv_prefill_channels(const T* x, int64_t stride, int64_t tokens, const float* weight, const float* bias,
                           float* state, float* out, int64_t channels, int64_t begin, int64_t end, int64_t kernel,
                           bool silu) {
  const int64_t width = kernel - 1, blocks = (end - begin + 15) / 16;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i state_index = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)width));
  const __m512i weight_index = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)kernel));
  std::vector<__m512> history(blocks * MAX_CONV_KERNEL), taps(blocks * MAX_CONV_KERNEL);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c = begin + 16 * blk;
    const __mmask16 live = lanes(end - c);
    for (int64_t t = 0; t < width; ++t)
      history[blk * MAX_CONV_KERNEL + t] =
          _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, state_index, state + c * width + t, 4);
    for (int64_t t = 0; t < kernel; ++t)
      taps[blk * MAX_CONV_KERNEL + t] =
          _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, weight_index, weight + c * kernel + t, 4);
  }
  for (int64_t i0 = 0; i0 < tokens; i0 += CONV_TILE) {
    const int64_t i1 = std::min(tokens, i0 + CONV_TILE);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t c = begin + 16 * blk;
      const __mmask16 live = lanes(end - c);
      __m512 window[MAX_CONV_KERNEL];
      const __m512* tap = taps.data() + blk * MAX_CONV_KERNEL;
      for (int64_t t = 0; t < width; ++t) window[t] = history[blk * MAX_CONV_KERNEL + t];
      const __m512 b = bias ? _mm512_maskz_loadu_ps(live, bias + c) : _mm512_setzero_ps();
      for (int64_t i = i0; i < i1; ++i) {
        window[width] = load16(x + i * stride + c, live);
        __m512 acc = b;
        for (int64_t t = 0; t < kernel; ++t) acc = _mm512_fmadd_ps(window[t], tap[t], acc);
        _mm512_mask_storeu_ps(out + i * channels + c, live, silu ? silu16(acc) : acc);
        for (int64_t t = 0; t < width; ++t) window[t] = window[t + 1];
      }
      for (int64_t t = 0; t < width; ++t) history[blk * MAX_CONV_KERNEL + t] = window[t];
    }
  }
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c = begin + 16 * blk;
    alignas(64) float last[MAX_CONV_KERNEL][16];
    for (int64_t t = 0; t < width; ++t) _mm512_store_ps(last[t], history[blk * MAX_CONV_KERNEL + t]);
    for (int64_t l = 0; l < std::min<int64_t>(16, end - c); ++l)
      for (int64_t t = 0; t < width; ++t) state[(c + l) * width + t] = last[t][l];
  }
}

// A job's buffers for one chunk of the delta rule (dk, dv <= MAX_DIM).
struct DeltaBuffers {
  std::vector<float> kq, kT, scores, solved, g, beta;
  DeltaBuffers(int64_t dk, int64_t dv)
      : kq(2 * CHUNK * dk), kT(dk * CHUNK), scores(2 * CHUNK * CHUNK), solved(CHUNK * (dv + dk)), g(CHUNK),
        beta(CHUNK) {}
};

// One chunk of `n` tokens of one value head, S [dk, dv] updated in place. q, k normalised (q
// scaled), v rows at stride `ldv`; G: the running sum of the log decays from the chunk's start;
// out rows at stride `ldo`. As delta_rule_chunked: with M[i, j] = beta_i k_i.k_j exp(G_i - G_j)
// (j < i), solve (I + M) U = beta v and (I + M) W = -beta k exp(G) (forward substitution), then
// new = U + W S, out = exp(G) q S + (q.k exp(G_i - G_j), j <= i) new, S = exp(G_n) S + k_dec^T new.
void delta_chunk(DeltaBuffers& buf, int64_t n, int64_t dk, int64_t dv, const float* v, int64_t ldv, float* S,
                 float* out, int64_t ldo) {
  float *k = buf.kq.data(), *q = k + CHUNK * dk, *kT = buf.kT.data(), *G = buf.g.data(), *beta = buf.beta.data();
  float *kk = buf.scores.data(), *qk = kk + CHUNK * CHUNK, *solved = buf.solved.data();
  const int64_t width = dv + dk;
  transpose(k, dk, kT, CHUNK, n, dk);
  // rows 0..n-1: k_i.k_j; rows CHUNK..CHUNK+n-1: q_i.k_j (k and q are CHUNK rows apart in kq)
  gemm(n, n, dk, k, dk, kT, CHUNK, kk, CHUNK, false);
  gemm(n, n, dk, q, dk, kT, CHUNK, qk, CHUNK, false);
  for (int64_t i = 0; i < n; ++i) {
    decay_row(kk + i * CHUNK, G, G[i], i - 1, n);  // strictly below the diagonal
    scale_row(kk + i * CHUNK, i, beta[i]);
    decay_row(qk + i * CHUNK, G, G[i], i, n);
  }
  // The right-hand sides, row i: beta_i v_i in the first dv columns, -beta_i exp(G_i) k_i in the next dk.
  for (int64_t i = 0; i < n; ++i) {
    float* row = solved + i * width;
    std::copy(v + i * ldv, v + i * ldv + dv, row);
    scale_row(row, dv, beta[i]);
    std::copy(k + i * dk, k + i * dk + dk, row + dv);
    scale_row(row + dv, dk, -beta[i] * std::exp(G[i]));
  }
  // Forward substitution, row by row: solved[i] -= sum_{j<i} M[i, j] solved[j].
  for (int64_t i = 1; i < n; ++i) {
    float* row = solved + i * width;
    const float* m_row = kk + i * CHUNK;
    for (int64_t j0 = 0; j0 < width; j0 += 64) {
      __m512 acc[4];
      __mmask16 live[4];
      for (int u = 0; u < 4; ++u) {
        live[u] = lanes(width - j0 - 16 * u);
        acc[u] = load16(row + j0 + 16 * u, live[u]);
      }
      for (int64_t j = 0; j < i; ++j) {
        const __m512 mij = _mm512_set1_ps(m_row[j]);
        const float* prev = solved + j * width + j0;
        for (int u = 0; u < 4; ++u) acc[u] = _mm512_fnmadd_ps(mij, load16(prev + 16 * u, live[u]), acc[u]);
      }
      for (int u = 0; u < 4; ++u) _mm512_mask_storeu_ps(row + j0 + 16 * u, live[u], acc[u]);
    }
  }
  float* U = solved;  // new = U + W S, in U's columns (rows `width` apart)
  gemm(n, dv, dk, solved + dv, width, S, dv, U, width, true);
  // out = exp(G) q S + (masked q.k) new
  for (int64_t i = 0; i < n; ++i) scale_row(q + i * dk, dk, std::exp(G[i]));
  gemm(n, dv, dk, q, dk, S, dv, out, ldo, false);
  gemm(n, dv, n, qk, CHUNK, U, width, out, ldo, true, true);
  // S = exp(G_n) S + (k exp(G_n - G))^T new
  const float end = G[n - 1];
  alignas(64) float to_end[CHUNK];
  for (int64_t j = 0; j < n; ++j) to_end[j] = std::exp(end - G[j]);
  for (int64_t d = 0; d < dk; ++d) {
    float* row = kT + d * CHUNK;
    for (int64_t j = 0; j < n; ++j) row[j] *= to_end[j];
  }
  scale_row(S, dk * dv, std::exp(end));
  gemm(dk, dv, n, kT, CHUNK, U, width, S, dv, true);
}

}  // namespace

namespace cholla {

// x: fp32 or bf16 [tokens, channels] (row stride free), the prompt chunks of `starts` (int64
// [seqs + 1]) packed; weight fp32 [channels, kernel]; bias fp32 [channels] or none; conv_state
// fp32 [num_slots, channels, kernel - 1], the sequences' `slots` (int64 [seqs]) read as the
// inputs before each chunk and replaced by its last ones. -> fp32 [tokens, channels], through
// SiLU when `silu`.
at::Tensor causal_conv_prefill(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               at::Tensor conv_state, const at::Tensor& starts, const at::Tensor& slots, bool silu) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.is_contiguous() &&
                  weight.size(1) >= 2 && weight.size(1) <= MAX_CONV_KERNEL,
              "causal_conv_prefill: weight must be contiguous fp32 [channels, kernel] with 2 <= kernel <= ",
              MAX_CONV_KERNEL);
  const int64_t channels = weight.size(0), kernel = weight.size(1);
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.dim() == 2 &&
                  x.size(1) == channels && x.stride(1) == 1,
              "causal_conv_prefill: x must be fp32 or bf16 [tokens, ", channels, "] with contiguous rows");
  TORCH_CHECK(conv_state.scalar_type() == at::kFloat && conv_state.dim() == 3 && conv_state.is_contiguous() &&
                  conv_state.size(1) == channels && conv_state.size(2) == kernel - 1,
              "causal_conv_prefill: conv_state must be contiguous fp32 [slots, ", channels, ", ", kernel - 1, "]");
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(fp32_vector(*bias, channels), "causal_conv_prefill: bias must be contiguous fp32 [", channels, "]");
    bias_data = bias->data_ptr<float>();
  }
  const int64_t tokens = x.size(0);
  check_sequences("causal_conv_prefill", starts, slots, tokens, conv_state.size(0));
  // a job: up to 1024 channels of one sequence (a multiple of 16, so blocks never straddle jobs)
  const int64_t seqs = slots.size(0), span = 1024, spans = (channels + span - 1) / span;
  const int64_t *s = starts.data_ptr<int64_t>(), *ids = slots.data_ptr<int64_t>();
  at::Tensor out = at::empty({tokens, channels}, x.options().dtype(at::kFloat));
  at::parallel_for(0, seqs * spans, 1, [&](int64_t first, int64_t last) {
    for (int64_t job = first; job < last; ++job) {
      const int64_t q = job / spans, begin = job % spans * span, end = std::min(channels, begin + span);
      const int64_t n = s[q + 1] - s[q];
      float* state = conv_state.data_ptr<float>() + ids[q] * channels * (kernel - 1);
      float* dst = out.data_ptr<float>() + s[q] * channels;
      if (x.scalar_type() == at::kFloat)
        conv_prefill_channels(x.data_ptr<float>() + s[q] * x.stride(0), x.stride(0), n, weight.data_ptr<float>(),
                              bias_data, state, dst, channels, begin, end, kernel, silu);
      else
        conv_prefill_channels(static_cast<const uint16_t*>(x.data_ptr()) + s[q] * x.stride(0), x.stride(0), n,
                              weight.data_ptr<float>(), bias_data, state, dst, channels, begin, end, kernel, silu);
    }
  });
  return out;
}

// qkv: fp32 [tokens, 2 * k_heads * dk + v_heads * dv] (row stride free), the convolved q, k,
// v of the prompt chunks of `starts` packed; a, b: fp32 [tokens, v_heads] (row strides free),
// the decay and beta projections; A (negative), dt_bias: fp32 [v_heads]; state: fp32
// [num_slots, v_heads, dk, dv], the sequences' `slots` carried through their chunks in place.
// Value head h reads key head h % k_heads (`tiled`) or h / (v_heads / k_heads). As the decode
// step: q, k l2-normalised (q scaled by dk^-1/2), g = A softplus(a + dt_bias), beta = sigmoid(b).
// -> fp32 [tokens, v_heads, dv].
at::Tensor gated_delta_rule_chunked(const at::Tensor& qkv, const at::Tensor& a, const at::Tensor& b,
                                    const at::Tensor& A, const at::Tensor& dt_bias, at::Tensor state,
                                    const at::Tensor& starts, const at::Tensor& slots, int64_t k_heads, bool tiled) {
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.dim() == 4 && state.is_contiguous(),
              "gated_delta_rule_chunked: state must be contiguous fp32 [slots, v_heads, k_dim, v_dim]");
  const int64_t v_heads = state.size(1), dk = state.size(2), dv = state.size(3);
  TORCH_CHECK(k_heads > 0 && v_heads % k_heads == 0, "gated_delta_rule_chunked: ", v_heads,
              " value heads are not a multiple of ", k_heads, " key heads");
  TORCH_CHECK(dk <= MAX_DIM && dv <= MAX_DIM, "gated_delta_rule_chunked: head dims over ", MAX_DIM);
  const int64_t key_dim = k_heads * dk, channels = 2 * key_dim + v_heads * dv, tokens = qkv.size(0);
  TORCH_CHECK(fp32_rows(qkv, tokens, channels),
              "gated_delta_rule_chunked: qkv must be fp32 [tokens, ", channels, "] with contiguous rows");
  TORCH_CHECK(fp32_rows(a, tokens, v_heads) && fp32_rows(b, tokens, v_heads),
              "gated_delta_rule_chunked: a and b must be fp32 [tokens, ", v_heads, "] with contiguous rows");
  TORCH_CHECK(fp32_vector(A, v_heads) && fp32_vector(dt_bias, v_heads),
              "gated_delta_rule_chunked: A and dt_bias must be contiguous fp32 [", v_heads, "]");
  check_sequences("gated_delta_rule_chunked", starts, slots, tokens, state.size(0));
  const int64_t seqs = slots.size(0), ratio = v_heads / k_heads;
  const int64_t *s = starts.data_ptr<int64_t>(), *ids = slots.data_ptr<int64_t>();
  const float scale = 1.0f / std::sqrt((float)dk);
  at::Tensor out = at::empty({tokens, v_heads, dv}, qkv.options());
  const float *rows = qkv.data_ptr<float>(), *as = a.data_ptr<float>(), *bs = b.data_ptr<float>(),
              *As = A.data_ptr<float>(), *bias = dt_bias.data_ptr<float>();
  at::parallel_for(0, seqs * v_heads, 1, [&](int64_t first, int64_t last) {
    DeltaBuffers buf(dk, dv);
    for (int64_t job = first; job < last; ++job) {
      const int64_t q_index = job / v_heads, h = job % v_heads, key_head = tiled ? h % k_heads : h / ratio;
      float* S = state.data_ptr<float>() + (ids[q_index] * v_heads + h) * dk * dv;
      for (int64_t c0 = s[q_index]; c0 < s[q_index + 1]; c0 += CHUNK) {
        const int64_t n = std::min(CHUNK, s[q_index + 1] - c0);
        float running = 0.0f;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t t = c0 + i;
          const float* row = rows + t * qkv.stride(0);
          l2_normalize_row(row + key_dim + key_head * dk, buf.kq.data() + i * dk, dk, 1.0f);
          l2_normalize_row(row + key_head * dk, buf.kq.data() + (CHUNK + i) * dk, dk, scale);
          running += As[h] * softplus(as[t * a.stride(0) + h] + bias[h]);
          buf.g[i] = running;
          buf.beta[i] = 1.0f / (1.0f + std::exp(-bs[t * b.stride(0) + h]));
        }
        delta_chunk(buf, n, dk, dv, rows + c0 * qkv.stride(0) + 2 * key_dim + h * dv, qkv.stride(0), S,
                    out.data_ptr<float>() + (c0 * v_heads + h) * dv, v_heads * dv);
      }
    }
  });
  return out;
}

// x: fp32 [tokens, heads * head_dim], B, C: fp32 [tokens, groups * state_size] (row strides
// free: views of the convolved xBC), dt: fp32 [tokens, heads] before softplus; dt_bias, A_log,
// D: fp32 [heads]; state: fp32 [num_slots, heads, head_dim, state_size], the sequences' `slots`
// carried through their chunks in place; `starts` int64 [seqs + 1]. As ssd_chunked in mamba2.py
// (group g serving heads g * heads / groups ...), with dt = clamp(softplus(dt + dt_bias), dt_min,
// dt_max) and A = -exp(A_log). -> y fp32 [tokens, heads * head_dim], the D skip included.
at::Tensor ssd_chunked(at::Tensor state, const at::Tensor& starts, const at::Tensor& slots, const at::Tensor& x,
                       const at::Tensor& dt, const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& B,
                       const at::Tensor& C, const at::Tensor& D, double dt_min, double dt_max) {
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.dim() == 4 && state.is_contiguous(),
              "ssd_chunked: state must be contiguous fp32 [slots, heads, head_dim, state_size]");
  const int64_t heads = state.size(1), head_dim = state.size(2), state_size = state.size(3), tokens = x.size(0);
  TORCH_CHECK(head_dim <= MAX_DIM && state_size <= MAX_DIM, "ssd_chunked: head_dim and state_size must be <= ", MAX_DIM);
  TORCH_CHECK(fp32_rows(x, tokens, heads * head_dim), "ssd_chunked: x must be fp32 [tokens, heads * head_dim], rows contiguous");
  TORCH_CHECK(fp32_rows(dt, tokens, heads), "ssd_chunked: dt must be fp32 [tokens, heads], rows contiguous");
  TORCH_CHECK(B.dim() == 2 && B.size(1) % state_size == 0, "ssd_chunked: B must be [tokens, groups * state_size]");
  const int64_t groups = B.size(1) / state_size;
  TORCH_CHECK(groups > 0 && heads % groups == 0, "ssd_chunked: ", groups, " groups do not divide ", heads, " heads");
  TORCH_CHECK(fp32_rows(B, tokens, groups * state_size) && fp32_rows(C, tokens, groups * state_size),
              "ssd_chunked: B and C must be fp32 [tokens, groups * state_size], rows contiguous");
  TORCH_CHECK(fp32_vector(dt_bias, heads) && fp32_vector(A_log, heads) && fp32_vector(D, heads),
              "ssd_chunked: dt_bias, A_log and D must be contiguous fp32 [heads]");
  check_sequences("ssd_chunked", starts, slots, tokens, state.size(0));
  const int64_t seqs = slots.size(0), per_group = heads / groups, N = state_size, P = head_dim;
  const int64_t *s = starts.data_ptr<int64_t>(), *ids = slots.data_ptr<int64_t>();
  std::vector<int64_t> chunk_base(seqs + 1, 0);  // each sequence's first chunk, counted over all
  for (int64_t i = 0; i < seqs; ++i) chunk_base[i + 1] = chunk_base[i] + (s[i + 1] - s[i] + CHUNK - 1) / CHUNK;
  const int64_t chunks = chunk_base[seqs];
  const float *xs = x.data_ptr<float>(), *dts = dt.data_ptr<float>(), *Bs = B.data_ptr<float>(),
              *Cs = C.data_ptr<float>(), *bias = dt_bias.data_ptr<float>(), *A_logs = A_log.data_ptr<float>(),
              *Ds = D.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldb = B.stride(0), ldcc = C.stride(0);
  // Per chunk and group, shared by the group's heads: B^T [N, CHUNK] and the scores C_l . B_s [CHUNK, CHUNK].
  std::vector<float> BTs(chunks * groups * N * CHUNK), scores(chunks * groups * CHUNK * CHUNK);
  at::parallel_for(0, chunks * groups, 1, [&](int64_t first, int64_t last) {
    for (int64_t job = first; job < last; ++job) {
      const int64_t chunk = job / groups, g = job % groups;
      const int64_t q = std::upper_bound(chunk_base.begin(), chunk_base.end(), chunk) - chunk_base.begin() - 1;
      const int64_t t0 = s[q] + (chunk - chunk_base[q]) * CHUNK, n = std::min(CHUNK, s[q + 1] - t0);
      float* BT = BTs.data() + job * N * CHUNK;
      transpose(Bs + t0 * ldb + g * N, ldb, BT, CHUNK, n, N);
      gemm(n, n, N, Cs + t0 * ldcc + g * N, ldcc, BT, CHUNK, scores.data() + job * CHUNK * CHUNK, CHUNK, false);
    }
  });
  at::Tensor y = at::empty({tokens, heads * head_dim}, x.options().memory_format(at::MemoryFormat::Contiguous));
  float* ys = y.data_ptr<float>();
  const float lo = static_cast<float>(dt_min), hi = static_cast<float>(dt_max);
  at::parallel_for(0, seqs * heads, 1, [&](int64_t first, int64_t last) {
    std::vector<float> ST(N * P), xdt(CHUNK * P), W(CHUNK * CHUNK), G(CHUNK), step(CHUNK);
    for (int64_t job = first; job < last; ++job) {
      const int64_t q = job / heads, h = job % heads, g = h / per_group;
      const float A = -std::exp(A_logs[h]);
      float* slot_state = state.data_ptr<float>() + (ids[q] * heads + h) * P * N;
      transpose(slot_state, N, ST.data(), P, P, N);  // [P, N] -> [N, P]: the products run along P
      for (int64_t t0 = s[q], chunk = chunk_base[q]; t0 < s[q + 1]; t0 += CHUNK, ++chunk) {
        const int64_t n = std::min(CHUNK, s[q + 1] - t0);
        float running = 0.0f;
        for (int64_t i = 0; i < n; ++i) {
          step[i] = std::min(std::max(softplus(dts[(t0 + i) * dt.stride(0) + h] + bias[h]), lo), hi);
          running += step[i] * A;
          G[i] = running;
          const float* xi = xs + (t0 + i) * ldx + h * P;
          for (int64_t p = 0; p < P; ++p) xdt[i * P + p] = xi[p] * step[i];
        }
        // y = exp(G_l) C_l S (the entering state's part) + (C.B exp(G_l - G_s), s <= l) (dt x), + D x
        float* out = ys + t0 * heads * P + h * P;
        const int64_t ldo = heads * P;
        gemm(n, P, N, Cs + t0 * ldcc + g * N, ldcc, ST.data(), P, out, ldo, false);
        const float* cb = scores.data() + (chunk * groups + g) * CHUNK * CHUNK;
        for (int64_t i = 0; i < n; ++i) {
          scale_row(out + i * ldo, P, std::exp(G[i]));
          std::copy(cb + i * CHUNK, cb + i * CHUNK + n, W.data() + i * CHUNK);
          decay_row(W.data() + i * CHUNK, G.data(), G[i], i, n);
        }
        gemm(n, P, n, W.data(), CHUNK, xdt.data(), P, out, ldo, true, true);
        const __m512 skip = _mm512_set1_ps(Ds[h]);
        for (int64_t i = 0; i < n; ++i) {
          const float* xi = xs + (t0 + i) * ldx + h * P;
          float* yi = out + i * ldo;
          for (int64_t p = 0; p < P; p += 16) {
            const __mmask16 live = lanes(P - p);
            _mm512_mask_storeu_ps(yi + p, live, _mm512_fmadd_ps(skip, load16(xi + p, live), load16(yi + p, live)));
          }
        }
        // S = exp(G_n) S + B^T (dt x exp(G_n - G_s))
        const float end = G[n - 1];
        for (int64_t i = 0; i < n; ++i) scale_row(xdt.data() + i * P, P, std::exp(end - G[i]));
        scale_row(ST.data(), N * P, std::exp(end));
        gemm(N, P, n, BTs.data() + (chunk * groups + g) * N * CHUNK, CHUNK, xdt.data(), P, ST.data(), P, true);
      }
      transpose(ST.data(), P, slot_state, N, N, P);
    }
  });
  return y;
}

}  // namespace cholla

TORCH_LIBRARY_FRAGMENT(cholla, m) {
  m.def("causal_conv_prefill(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) conv_state, Tensor starts, Tensor slots, "
        "bool silu) -> Tensor");
  m.def("gated_delta_rule_chunked(Tensor qkv, Tensor a, Tensor b, Tensor A, Tensor dt_bias, Tensor(a!) state, "
        "Tensor starts, Tensor slots, int k_heads, bool tiled) -> Tensor");
  m.def("ssd_chunked(Tensor(a!) state, Tensor starts, Tensor slots, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log, "
        "Tensor B, Tensor C, Tensor D, float dt_min, float dt_max) -> Tensor");
}

TORCH_LIBRARY_IMPL(cholla, CPU, m) {
  m.impl("causal_conv_prefill", &cholla::causal_conv_prefill);
  m.impl("gated_delta_rule_chunked", &cholla::gated_delta_rule_chunked);
  m.impl("ssd_chunked", &cholla::ssd_chunked);
}
