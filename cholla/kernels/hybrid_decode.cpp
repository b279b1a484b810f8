// Decode steps of the hybrid families' layers, one call per layer.
//
// Driven from Python, a Mamba-2 layer's decode step is a dozen small ops (the
// in_proj product and its split, the conv step, the SSD step, the gated norm,
// out_proj, the residual) and a mixture of experts' is dozens more (router,
// top-k, a sort of the token-expert pairs, a gather, two products and an
// index_add per routed expert): at batch 1 more time went between the kernels
// than into them (docs/benchmarks.md, "Hybrid and MoE decode"). Here each layer
// is one call that runs the same kernels' bodies (ops.h) in the same order on
// one OpenMP team, in stages whose jobs its members claim in chunks, each
// stage's serial step run by the member that ends it (team.h), as
// decode_layers.cpp does for attention layers:
//
// - mamba2_decode: x + out_proj(gate(ssd(conv(in_proj(norm(x)))))) for one
//   decode row per sequence, the conv and SSD states updated in their slots;
// - deltanet_decode: the same for a Gated DeltaNet layer (Qwen 3.5, Qwen3-Next): the four
//   input products as one, the conv step, the delta rule, the per-head gated norm, out_proj;
// - moe_decode: a mixture of experts on [rows, hidden]: router logits, the
//   routing (softmax then top-k, top-k then softmax, or sigmoid scores with a
//   correction bias and grouped top-k: cholla/layers/moe.py's flavours), then
//   each routed expert's product on the rows routed to it (its weights read
//   once per step), the weighted sum, and the shared expert.
//
// Products take the kernel linear.py picks for their row count (`Products`), so
// both compute what the Python layers compute, up to fp32 summation order.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "ops.h"
#include "simd.h"
#include "team.h"

namespace {

using cholla::Member;
using cholla::Products;
using cholla::run_team;
using cholla::TeamStopped;

// Ends the member's part in the stage; the member that ends the stage runs `last` first (team.h).
template <typename Last>
inline void sync(Member& member, Last&& last) {
  if (!member.finish(std::forward<Last>(last))) throw TeamStopped{};
}
inline void sync(Member& member) {
  sync(member, [] {});
}

// `chunk(begin, end)` for each chunk of the open stage's n jobs this member claims (team.h).
template <typename Chunk>
void each_chunk(Member& member, int64_t n, Chunk&& chunk) {
  int64_t begin = 0, end = 0;
  while (member.next(n, begin, end)) chunk(begin, end);
}

// `job(j, end)` for each job j of those chunks (`end`: its chunk's).
template <typename Job>
void each_job(Member& member, int64_t n, Job&& job) {
  each_chunk(member, n, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) job(j, end);
  });
}


// A recurrent layer's last stages: out_proj of `gated` into `o`, then result = x + o row by row.
void out_proj_residual(const Products& products, const at::Tensor& gated, at::TensorList w, at::IntArrayRef t,
                       at::Tensor& o, const at::Tensor& x, at::Tensor& result, Member& member) {
  sync(member);
  products.run(gated, w, t, o, member);
  sync(member);
  const int64_t hidden = x.size(1);
  each_job(member, x.size(0), [&](int64_t r, int64_t) {
    for (int64_t i = 0; i < hidden; ++i)
      result.data_ptr<float>()[r * hidden + i] = x.data_ptr<float>()[r * hidden + i] + o.data_ptr<float>()[r * hidden + i];
  });  // (the team's join waits for the last chunks)
}

void check_fp32_vector(const char* op, const at::Tensor& t, int64_t size, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == size && t.is_contiguous(), op, ": ", name,
              " must be contiguous fp32 [", size, "]");
}

// The slots as int64 [batch], distinct (two rows on one slot would race), each within the cache.
const int64_t* checked_slots(const char* op, const at::Tensor& slots, int64_t batch, int64_t num_slots) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == batch && slots.is_contiguous(),
              op, ": slots must be contiguous int64 [batch]");
  const int64_t* ids = slots.data_ptr<int64_t>();
  std::vector<bool> taken(num_slots, false);
  for (int64_t i = 0; i < batch; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < num_slots && !taken[ids[i]], op, ": slot ", ids[i],
                " is out of range [0, ", num_slots, ") or given twice");
    taken[ids[i]] = true;
  }
  return ids;
}

// Router flavours, as cholla/layers/moe.py names them.
enum RouterKind : int64_t { SOFTMAX_TOPK = 0, TOPK_SOFTMAX = 1, SIGMOID_GROUP_TOPK = 2 };
// Expert activations: cholla/layers/mlp.py's ACTIVATION_IDS for gated experts, and squared ReLU (ungated).
constexpr int64_t RELU2 = 3;

struct Routing {
  int64_t kind, top_k, groups, groups_used;
  bool normalize;
  float scale;
  const float* correction_bias;  // [experts] or null
};

// The indices of the k largest of `values` (n of them), largest first; the lower index wins a tie.
void top_k(const float* values, int64_t n, int64_t k, int64_t* ids) {
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < n; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken = taken || ids[i] == e;
      if (!taken && (best < 0 || values[e] > values[best])) best = e;
    }
    ids[j] = best;
  }
}

// One token's router logits [experts] -> its k expert ids and weights (moe.py's Router functions).
void route(const float* logits, int64_t experts, const Routing& r, int64_t* ids, float* weights) {
  std::vector<float> scores(logits, logits + experts);
  if (r.kind == SOFTMAX_TOPK) {
    const float top = *std::max_element(scores.begin(), scores.end());
    float sum = 0.0f;
    for (float& s : scores) sum += (s = std::exp(s - top));
    for (float& s : scores) s /= sum;
    top_k(scores.data(), experts, r.top_k, ids);
    for (int64_t j = 0; j < r.top_k; ++j) weights[j] = scores[ids[j]];
    if (r.normalize) {
      float total = 0.0f;
      for (int64_t j = 0; j < r.top_k; ++j) total += weights[j];
      for (int64_t j = 0; j < r.top_k; ++j) weights[j] /= total;
    }
  } else if (r.kind == TOPK_SOFTMAX) {
    top_k(scores.data(), experts, r.top_k, ids);
    float sum = 0.0f;
    const float top = scores[ids[0]];
    for (int64_t j = 0; j < r.top_k; ++j) sum += (weights[j] = std::exp(scores[ids[j]] - top));
    for (int64_t j = 0; j < r.top_k; ++j) weights[j] /= sum;
  } else {
    for (float& s : scores) s = 1.0f / (1.0f + std::exp(-s));
    std::vector<float> biased(scores);
    if (r.correction_bias != nullptr)
      for (int64_t e = 0; e < experts; ++e) biased[e] += r.correction_bias[e];
    if (r.groups > 1) {  // keep the groups_used groups whose two best biased scores sum highest
      const int64_t per_group = experts / r.groups;
      std::vector<float> group_scores(r.groups);
      for (int64_t g = 0; g < r.groups; ++g) {
        int64_t best[2];
        top_k(biased.data() + g * per_group, per_group, 2, best);
        group_scores[g] = biased[g * per_group + best[0]] + biased[g * per_group + best[1]];
      }
      std::vector<int64_t> kept(r.groups_used);
      top_k(group_scores.data(), r.groups, r.groups_used, kept.data());
      for (int64_t g = 0; g < r.groups; ++g)
        if (std::find(kept.begin(), kept.end(), g) == kept.end())
          std::fill(biased.begin() + g * per_group, biased.begin() + (g + 1) * per_group, -INFINITY);
    }
    top_k(biased.data(), experts, r.top_k, ids);
    float total = 0.0f;
    for (int64_t j = 0; j < r.top_k; ++j) total += (weights[j] = scores[ids[j]]);
    for (int64_t j = 0; j < r.top_k; ++j) weights[j] = (r.normalize ? weights[j] / (total + 1e-20f) : weights[j]) * r.scale;
  }
}

// Expert e's rows of a stack [experts, rows, row bytes], a view made without the dispatcher
// (select() through it cost ~3 us a call, a dozen calls a layer).
at::Tensor expert(const at::Tensor& stack, int64_t e) {
  return at::from_blob(stack.data_ptr<uint8_t>() + e * stack.stride(0), {stack.size(1), stack.size(2)},
                       {stack.stride(1), stack.stride(2)}, stack.options());
}

// Squared ReLU in place over `n` floats.
void relu2(float* v, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = lanes(n - i);
    const __m512 r = _mm512_max_ps(_mm512_maskz_loadu_ps(live, v + i), _mm512_setzero_ps());
    _mm512_mask_storeu_ps(v + i, live, _mm512_mul_ps(r, r));
  }
}

// act(gate) * up (gated: `in` [rows, 2 * inner], gate then up) or act(in) (ungated, in place).
at::Tensor activate(at::Tensor in, int64_t inner, bool gated, int64_t activation) {
  if (gated) return cholla::gated_activation(in.narrow(1, 0, inner), in.narrow(1, inner, inner), activation);
  relu2(in.data_ptr<float>(), in.numel());
  return in;
}

}  // namespace

namespace cholla {

// x: fp32 [batch, hidden], one decode row per sequence (a Mamba-2 layer's input); returns
// x + mixer(norm(x)) (cholla/models/mamba2.py MixerLayer with cholla/layers/mamba2.py's mixer).
// in_proj: GGUF rows [inner + conv_channels + heads, hidden] (z, xBC, dt); conv_weight fp32
// [conv_channels, kernel], conv_bias fp32 [conv_channels] or none; dt_bias, A_log, D fp32 [heads];
// gate_norm fp32 [inner] (groups of inner / groups channels) or none (y * silu(z)); out_proj GGUF
// rows [hidden, inner]; conv_state fp32 [slots, conv_channels, kernel - 1], ssm_state fp32 [slots,
// heads, head_dim, state_size], the rows of `slots` updated in place.
at::Tensor mamba2_decode(const at::Tensor& x_in, const at::Tensor& norm, double norm_eps, const at::Tensor& in_proj,
                         int64_t in_type, const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                         const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& D,
                         const std::optional<at::Tensor>& gate_norm, int64_t groups, double gate_eps,
                         bool norm_before_gate, const at::Tensor& out_proj, int64_t out_type, at::Tensor conv_state,
                         at::Tensor ssm_state, const at::Tensor& slots, double dt_min, double dt_max, bool integer,
                         int64_t gemv_max_rows, int64_t int8_batch_max_rows, int64_t int8_batch_types) {
  const char* op = "mamba2_decode";
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, op, ": x must be fp32 [rows, hidden]");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(ssm_state.scalar_type() == at::kFloat && ssm_state.dim() == 4 && ssm_state.is_contiguous(), op,
              ": ssm_state must be contiguous fp32 [slots, heads, head_dim, state_size]");
  const int64_t heads = ssm_state.size(1), head_dim = ssm_state.size(2), state_size = ssm_state.size(3);
  const int64_t inner = heads * head_dim, conv_channels = inner + 2 * groups * state_size;
  TORCH_CHECK(groups > 0 && heads % groups == 0, op, ": ", groups, " groups do not divide ", heads, " heads");
  TORCH_CHECK(conv_weight.scalar_type() == at::kFloat && conv_weight.dim() == 2 && conv_weight.is_contiguous() &&
                  conv_weight.size(0) == conv_channels && conv_weight.size(1) >= 2 && conv_weight.size(1) <= 16,
              op, ": conv_weight must be contiguous fp32 [", conv_channels, ", kernel <= 16]");
  const int64_t kernel = conv_weight.size(1);
  TORCH_CHECK(conv_state.scalar_type() == at::kFloat && conv_state.dim() == 3 && conv_state.is_contiguous() &&
                  conv_state.size(0) == ssm_state.size(0) && conv_state.size(1) == conv_channels &&
                  conv_state.size(2) == kernel - 1,
              op, ": conv_state must be contiguous fp32 [slots, ", conv_channels, ", ", kernel - 1, "]");
  if (conv_bias) check_fp32_vector(op, *conv_bias, conv_channels, "conv_bias");
  check_fp32_vector(op, norm, hidden, "norm");
  for (const at::Tensor* t : {&dt_bias, &A_log, &D}) check_fp32_vector(op, *t, heads, "dt_bias, A_log and D");
  if (gate_norm) check_fp32_vector(op, *gate_norm, inner, "gate_norm");
  const int64_t* slot = checked_slots(op, slots, rows, ssm_state.size(0));
  const int64_t projected = inner + conv_channels + heads;
  if (rows == 0) return x.clone();

  const auto options = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor zxbcdt = at::empty({rows, projected}, options), xbc = at::empty({rows, conv_channels}, options);
  at::Tensor y = at::empty({rows, inner}, options), gated = at::empty({rows, inner}, options);
  at::Tensor o = at::empty({rows, hidden}, options), result = at::empty({rows, hidden}, options);
  const Products products{integer, gemv_max_rows, int8_batch_max_rows, int8_batch_types};
  const std::vector<at::Tensor> in_w{in_proj}, out_w{out_proj};
  const std::vector<int64_t> in_t{in_type}, out_t{out_type};
  const float *zs = zxbcdt.data_ptr<float>(), *cw = conv_weight.data_ptr<float>(),
              *cb = conv_bias ? conv_bias->data_ptr<float>() : nullptr;
  float *xbcs = xbc.data_ptr<float>(), *ys = y.data_ptr<float>(), *gs = gated.data_ptr<float>();
  const int64_t conv_blocks = (conv_channels + 255) / 256, per_group = heads / groups, width = inner / groups;
  const float lo = static_cast<float>(dt_min), hi = static_cast<float>(dt_max);

  run_team([&](Member& member) {
    at::Tensor h = at::empty({rows, hidden}, options);  // each member's own norm(x): it quantizes its copy anyway
    for (int64_t r = 0; r < rows; ++r)
      rms_norm_row(x.data_ptr<float>() + r * hidden, norm.data_ptr<float>(), h.data_ptr<float>() + r * hidden, hidden,
                   static_cast<float>(norm_eps));
    products.run(h, in_w, in_t, zxbcdt, member);
    sync(member);
    each_job(member, rows * conv_blocks, [&](int64_t job, int64_t) {  // (row, 256 channels)
      const int64_t r = job / conv_blocks, first = job % conv_blocks * 256;
      conv_step_row(zs + r * projected + inner, cw, cb, conv_state.data_ptr<float>() + slot[r] * conv_channels * (kernel - 1),
                    xbcs + r * conv_channels, first, std::min(conv_channels, first + 256), kernel, true);
    });
    sync(member);
    each_job(member, rows * heads, [&](int64_t job, int64_t) {  // (row, head)
      const int64_t r = job / heads, hd = job % heads, g = hd / per_group;
      const float* row = xbcs + r * conv_channels;
      ssd_head_row(ssm_state.data_ptr<float>() + (slot[r] * heads + hd) * head_dim * state_size, row + hd * head_dim,
                   row + inner + g * state_size, row + inner + (groups + g) * state_size, ys + r * inner + hd * head_dim,
                   head_dim, state_size, zs[r * projected + inner + conv_channels + hd], dt_bias.data_ptr<float>()[hd],
                   A_log.data_ptr<float>()[hd], D.data_ptr<float>()[hd], lo, hi);
    });
    sync(member);
    each_job(member, rows * groups, [&](int64_t job, int64_t) {  // (row, group): the gate and its norm
      const int64_t r = job / groups, at = job % groups * width;
      const float *yr = ys + r * inner + at, *zr = zs + r * projected + at;
      float* out = gs + r * inner + at;
      if (gate_norm) {
        gated_norm_row(yr, zr, gate_norm->data_ptr<float>() + at, out, width, static_cast<float>(gate_eps),
                       norm_before_gate);
      } else {
        for (int64_t i = 0; i < width; i += 16) {
          const __mmask16 live = lanes(width - i);
          _mm512_mask_storeu_ps(out + i, live, _mm512_mul_ps(_mm512_maskz_loadu_ps(live, yr + i),
                                                             silu16(_mm512_maskz_loadu_ps(live, zr + i))));
        }
      }
    });
    out_proj_residual(products, gated, out_w, out_t, o, x, result, member);
  });
  return result;
}

// x: fp32 [batch, hidden], one decode row per sequence (a Gated DeltaNet layer's input); returns
// x + mixer(norm(x)) (cholla/models/qwen3_next.py HybridLayer's first half, cholla/layers/
// gated_deltanet.py's mixer). in_proj: qkv [2 key_dim + value_dim], z [value_dim], b, a [v_heads]
// GGUF rows, one product; conv_weight fp32 [2 key_dim + value_dim, kernel]; A, dt_bias fp32
// [v_heads]; head_norm fp32 [dv], every head's; out_proj GGUF rows [hidden, value_dim];
// conv_state fp32 [slots, channels, kernel - 1], recurrent fp32 [slots, v_heads, dk, dv], the
// rows of `slots` updated in place. Value head h reads key head h % k_heads (`tiled`) or h / ratio.
at::Tensor deltanet_decode(const at::Tensor& x_in, const at::Tensor& norm, double norm_eps, at::TensorList in_proj,
                           at::IntArrayRef in_types, const at::Tensor& conv_weight, const at::Tensor& A,
                           const at::Tensor& dt_bias, const at::Tensor& head_norm, double head_eps,
                           const at::Tensor& out_proj, int64_t out_type, at::Tensor conv_state, at::Tensor recurrent,
                           const at::Tensor& slots, int64_t k_heads, bool tiled, bool integer, int64_t gemv_max_rows,
                           int64_t int8_batch_max_rows, int64_t int8_batch_types) {
  const char* op = "deltanet_decode";
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, op, ": x must be fp32 [rows, hidden]");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(recurrent.scalar_type() == at::kFloat && recurrent.dim() == 4 && recurrent.is_contiguous(), op,
              ": recurrent must be contiguous fp32 [slots, v_heads, dk, dv]");
  const int64_t v_heads = recurrent.size(1), dk = recurrent.size(2), dv = recurrent.size(3);
  TORCH_CHECK(k_heads > 0 && v_heads % k_heads == 0 && dk <= 1024, op, ": ", v_heads, " value heads over ", k_heads,
              " key heads of ", dk, " (at most 1024)");
  const int64_t key_dim = k_heads * dk, value_dim = v_heads * dv, channels = 2 * key_dim + value_dim;
  TORCH_CHECK(in_proj.size() == 4 && in_types.size() == 4 && in_proj[0].size(0) == channels &&
                  in_proj[1].size(0) == value_dim && in_proj[2].size(0) == v_heads && in_proj[3].size(0) == v_heads,
              op, ": in_proj must be qkv [", channels, "], z [", value_dim, "], b and a [", v_heads, "]");
  TORCH_CHECK(conv_weight.scalar_type() == at::kFloat && conv_weight.dim() == 2 && conv_weight.is_contiguous() &&
                  conv_weight.size(0) == channels && conv_weight.size(1) >= 2 && conv_weight.size(1) <= 16,
              op, ": conv_weight must be contiguous fp32 [", channels, ", kernel <= 16]");
  const int64_t kernel = conv_weight.size(1);
  TORCH_CHECK(conv_state.scalar_type() == at::kFloat && conv_state.dim() == 3 && conv_state.is_contiguous() &&
                  conv_state.size(0) == recurrent.size(0) && conv_state.size(1) == channels &&
                  conv_state.size(2) == kernel - 1,
              op, ": conv_state must be contiguous fp32 [slots, ", channels, ", ", kernel - 1, "]");
  check_fp32_vector(op, norm, hidden, "norm");
  check_fp32_vector(op, A, v_heads, "A");
  check_fp32_vector(op, dt_bias, v_heads, "dt_bias");
  check_fp32_vector(op, head_norm, dv, "head_norm");
  const int64_t* slot = checked_slots(op, slots, rows, recurrent.size(0));
  if (rows == 0) return x.clone();

  const int64_t projected = channels + value_dim + 2 * v_heads;  // qkv, z, b, a
  const auto options = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor proj = at::empty({rows, projected}, options), conv = at::empty({rows, channels}, options);
  at::Tensor heads_out = at::empty({rows, value_dim}, options), gated = at::empty({rows, value_dim}, options);
  at::Tensor o = at::empty({rows, hidden}, options), result = at::empty({rows, hidden}, options);
  const Products products{integer, gemv_max_rows, int8_batch_max_rows, int8_batch_types};
  const std::vector<at::Tensor> out_w{out_proj};
  const std::vector<int64_t> out_t{out_type};
  const float* ps = proj.data_ptr<float>();
  float *cs = conv.data_ptr<float>(), *hs = heads_out.data_ptr<float>(), *gs = gated.data_ptr<float>();
  float* states = recurrent.data_ptr<float>();
  const int64_t conv_blocks = (channels + 255) / 256;

  run_team([&](Member& member) {
    at::Tensor h = at::empty({rows, hidden}, options);  // each member's own norm(x)
    for (int64_t r = 0; r < rows; ++r)
      rms_norm_row(x.data_ptr<float>() + r * hidden, norm.data_ptr<float>(), h.data_ptr<float>() + r * hidden, hidden,
                   static_cast<float>(norm_eps));
    products.run(h, in_proj, in_types, proj, member);
    sync(member);
    each_job(member, rows * conv_blocks, [&](int64_t job, int64_t) {  // (row, 256 channels)
      const int64_t r = job / conv_blocks, first = job % conv_blocks * 256;
      conv_step_row(ps + r * projected, conv_weight.data_ptr<float>(), nullptr,
                    conv_state.data_ptr<float>() + slot[r] * channels * (kernel - 1), cs + r * channels, first,
                    std::min(channels, first + 256), kernel, true);
    });
    sync(member);
    each_job(member, rows * v_heads, [&](int64_t job, int64_t end) {  // (row, value head)
      const int64_t r = job / v_heads, hd = job % v_heads;
      const float* ab = ps + r * projected + channels + value_dim;  // b, then a
      const float* next = job + 1 < end
          ? states + (slot[(job + 1) / v_heads] * v_heads + (job + 1) % v_heads) * dk * dv : nullptr;
      delta_rule_head_row(cs + r * channels, ab[v_heads + hd], ab[hd], A.data_ptr<float>()[hd],
                          dt_bias.data_ptr<float>()[hd], states + (slot[r] * v_heads + hd) * dk * dv,
                          hs + r * value_dim + hd * dv, k_heads, v_heads, dk, dv, hd, tiled, next);
      // Qwen's gated norm: the head's output normalised, then gated by silu(z)
      gated_norm_row(hs + r * value_dim + hd * dv, ps + r * projected + channels + hd * dv, head_norm.data_ptr<float>(),
                     gs + r * value_dim + hd * dv, dv, static_cast<float>(head_eps), true);
    });
    out_proj_residual(products, gated, out_w, out_t, o, x, result, member);
  });
  return result;
}

// h: fp32 [rows, hidden], the experts' (normed) input; returns the layer's output fp32 [rows,
// hidden] (cholla/layers/moe.py SparseMoE.forward). router: GGUF rows [experts, hidden];
// routing as moe.py's flavours (router_kind: 0 softmax_topk, 1 topk_softmax, 2
// sigmoid_group_topk with correction_bias [experts] or none); gate_exps (gated experts only),
// up_exps: [experts, inner, row bytes], down_exps: [experts, hidden, row bytes], GGUF rows of each
// expert stacked; activation: mlp.py's ACTIVATION_IDS (gated) or 3, squared ReLU (ungated);
// shared: the shared expert's (gate,) up, down, or nothing.
at::Tensor moe_decode(const at::Tensor& h_in, const at::Tensor& router, int64_t router_type, int64_t router_kind,
                      int64_t top_k, bool normalize, int64_t num_groups, int64_t groups_used, double scale,
                      const std::optional<at::Tensor>& correction_bias, const std::optional<at::Tensor>& gate_exps,
                      const at::Tensor& up_exps, const at::Tensor& down_exps, at::IntArrayRef expert_types,
                      int64_t activation, at::TensorList shared, at::IntArrayRef shared_types, bool integer,
                      int64_t gemv_max_rows, int64_t int8_batch_max_rows, int64_t int8_batch_types) {
  const char* op = "moe_decode";
  TORCH_CHECK(h_in.dim() == 2 && h_in.scalar_type() == at::kFloat, op, ": h must be fp32 [rows, hidden]");
  const at::Tensor h = h_in.contiguous();
  const int64_t rows = h.size(0), hidden = h.size(1), experts = router.size(0);
  const bool gated = gate_exps.has_value();
  TORCH_CHECK(router_kind >= SOFTMAX_TOPK && router_kind <= SIGMOID_GROUP_TOPK, op, ": unknown router kind ", router_kind);
  TORCH_CHECK(gated ? activation >= 0 && activation < RELU2 : activation == RELU2, op, ": activation ", activation,
              gated ? " is not a gated one" : " is not squared ReLU (the ungated experts' one)");
  TORCH_CHECK(top_k >= 1 && top_k <= experts, op, ": top_k ", top_k, " of ", experts, " experts");
  TORCH_CHECK(num_groups >= 1 && experts % num_groups == 0 && groups_used >= 1 && groups_used <= num_groups &&
                  (num_groups == 1 || experts / num_groups >= 2),
              op, ": ", num_groups, " groups (", groups_used, " used) do not fit ", experts, " experts");
  TORCH_CHECK(expert_types.size() == 3, op, ": one type each for the gate, up and down experts");
  const int64_t inner = up_exps.size(1);
  for (const at::Tensor* t : {&up_exps, &down_exps})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == experts && t->scalar_type() == at::kByte, op,
                ": expert stacks must be uint8 [", experts, ", rows, row bytes]");
  TORCH_CHECK(down_exps.size(1) == hidden, op, ": down experts have ", down_exps.size(1), " rows, not ", hidden);
  if (gated)
    TORCH_CHECK(gate_exps->dim() == 3 && gate_exps->sizes() == up_exps.sizes() && gate_exps->scalar_type() == at::kByte,
                op, ": gate experts must be shaped as the up ones");
  if (correction_bias) check_fp32_vector(op, *correction_bias, experts, "correction_bias");
  TORCH_CHECK(shared.size() == shared_types.size() && (shared.empty() || shared.size() == (gated ? 3u : 2u)), op,
              ": the shared expert is (gate,) up, down");
  if (rows == 0) return at::zeros({0, hidden}, h.options());

  const auto options = h.options().memory_format(at::MemoryFormat::Contiguous);
  const Products products{integer, gemv_max_rows, int8_batch_max_rows, int8_batch_types};
  const Routing routing{router_kind, top_k, num_groups, groups_used, normalize, static_cast<float>(scale),
                        correction_bias ? correction_bias->data_ptr<float>() : nullptr};
  const int64_t pairs = rows * top_k, width = gated ? 2 * inner : inner;
  at::Tensor logits = at::empty({rows, experts}, options), gathered = at::empty({pairs, hidden}, options);
  const int64_t shared_inner = shared.empty() ? 0 : shared[shared.size() - 2].size(0);
  const int64_t shared_width = (gated ? 2 : 1) * shared_inner;
  // The routed experts' (gate and) up products, then the shared expert's, back to back: for one
  // row all of them take x itself, and are one product (one pass of quantizing x, one job list).
  at::Tensor up_out = at::empty({pairs * width + rows * shared_width}, options);
  at::Tensor projected = at::from_blob(up_out.data_ptr<float>(), {pairs, width}, options);
  at::Tensor down = at::empty({pairs, hidden}, options), out = at::zeros({rows, hidden}, options);
  at::Tensor shared_projected, shared_down;
  if (!shared.empty()) {
    shared_projected = at::from_blob(up_out.data_ptr<float>() + pairs * width, {rows, shared_width}, options);
    shared_down = at::empty({rows, hidden}, options);
  }
  std::vector<int64_t> ids(pairs), token_of(pairs);
  std::vector<float> weights(pairs), weight_of(pairs);
  std::vector<int64_t> active, first_pair(experts + 1, 0);  // experts with tokens; their pairs [first, next)
  std::vector<at::Tensor> activated;  // per active expert (then the shared one): act(...) [count, inner]
  const std::vector<at::Tensor> router_w{router};
  const std::vector<int64_t> router_t{router_type};
  std::vector<int64_t> up_types{expert_types[1]}, down_types{expert_types[2]};
  if (gated) up_types.insert(up_types.begin(), expert_types[0]);
  const std::vector<at::Tensor> shared_up(shared.begin(), shared.end() - (shared.empty() ? 0 : 1));
  const std::vector<int64_t> shared_up_types(shared_types.begin(), shared_types.end() - (shared.empty() ? 0 : 1));

  run_team([&](Member& member) {
    products.run(h, router_w, router_t, logits, member);
    sync(member, [&] {  // route, then group the token-expert pairs by expert (tokens in order), as moe.py
      for (int64_t r = 0; r < rows; ++r)
        route(logits.data_ptr<float>() + r * experts, experts, routing, ids.data() + r * top_k, weights.data() + r * top_k);
      for (int64_t p = 0; p < pairs; ++p) ++first_pair[ids[p] + 1];
      for (int64_t e = 0; e < experts; ++e) {
        if (first_pair[e + 1] > 0) active.push_back(e);
        first_pair[e + 1] += first_pair[e];
      }
      std::vector<int64_t> next(first_pair.begin(), first_pair.end() - 1);
      for (int64_t p = 0; p < pairs; ++p) {
        const int64_t at = next[ids[p]]++;
        token_of[at] = p / top_k;
        weight_of[at] = weights[p];
        std::copy_n(h.data_ptr<float>() + token_of[at] * hidden, hidden, gathered.data_ptr<float>() + at * hidden);
      }
    });
    auto pairs_of = [&](const at::Tensor& t, int64_t e) {  // expert e's rows of t (contiguous fp32 [pairs, width])
      return at::from_blob(t.data_ptr<float>() + first_pair[e] * t.size(1), {first_pair[e + 1] - first_pair[e], t.size(1)},
                           t.options());
    };
    auto activate_all = [&] {
      for (int64_t e : active) activated.push_back(activate(pairs_of(projected, e), inner, gated, activation));
      if (!shared.empty()) activated.push_back(activate(shared_projected, shared_inner, gated, activation));
    };
    // Each product is a stage; the last (gate and) up product's ends with the activations.
    if (rows == 1) {  // one product: each routed expert's (gate,) up in expert order, then the shared one's
      std::vector<at::Tensor> w;
      std::vector<int64_t> t;
      for (int64_t e : active) {
        if (gated) w.push_back(expert(*gate_exps, e));
        w.push_back(expert(up_exps, e));
        t.insert(t.end(), up_types.begin(), up_types.end());
      }
      w.insert(w.end(), shared_up.begin(), shared_up.end());
      t.insert(t.end(), shared_up_types.begin(), shared_up_types.end());
      at::Tensor dst = at::from_blob(up_out.data_ptr<float>(), {1, up_out.numel()}, options);
      products.run(h, w, t, dst, member);
      sync(member, activate_all);
    } else {
      for (size_t i = 0; i < active.size(); ++i) {  // each routed expert's gate and up on its rows
        const int64_t e = active[i];
        std::vector<at::Tensor> w{expert(up_exps, e)};
        if (gated) w.insert(w.begin(), expert(*gate_exps, e));
        at::Tensor dst = pairs_of(projected, e);
        products.run(pairs_of(gathered, e), w, up_types, dst, member);
        if (i + 1 < active.size() || !shared.empty())
          sync(member);
        else
          sync(member, activate_all);
      }
      if (!shared.empty()) {
        products.run(h, shared_up, shared_up_types, shared_projected, member);
        sync(member, activate_all);
      }
    }
    for (size_t i = 0; i < active.size(); ++i) {
      at::Tensor dst = pairs_of(down, active[i]);
      products.run(activated[i], {expert(down_exps, active[i])}, down_types, dst, member);
      sync(member);
    }
    if (!shared.empty()) {
      products.run(activated.back(), {shared.back()}, {shared_types.back()}, shared_down, member);
      sync(member);
    }
    // out = sum over experts (ascending) of weight * down, then + shared, in chunks of columns
    // (the team's join waits for the last chunks)
    float* o = out.data_ptr<float>();
    const float* d = down.data_ptr<float>();
    each_chunk(member, hidden / 16 + (hidden % 16 != 0), [&](int64_t begin, int64_t end) {
      for (int64_t p = 0; p < pairs; ++p) {
        const __m512 w = _mm512_set1_ps(weight_of[p]);
        float* dst = o + token_of[p] * hidden;
        for (int64_t c = begin * 16; c < std::min(hidden, end * 16); c += 16) {
          const __mmask16 live = lanes(hidden - c);
          const __m512 product = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, d + p * hidden + c), w);
          _mm512_mask_storeu_ps(dst + c, live, _mm512_add_ps(_mm512_maskz_loadu_ps(live, dst + c), product));
        }
      }
      if (!shared.empty()) {
        const float* s = shared_down.data_ptr<float>();
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = begin * 16; c < std::min(hidden, end * 16); ++c) o[r * hidden + c] += s[r * hidden + c];
      }
    });
  });
  return out;
}

}  // namespace cholla

TORCH_LIBRARY_FRAGMENT(cholla, m) {
  m.def("mamba2_decode(Tensor x, Tensor norm, float norm_eps, Tensor in_proj, int in_type, Tensor conv_weight, "
        "Tensor? conv_bias, Tensor dt_bias, Tensor A_log, Tensor D, Tensor? gate_norm, int groups, float gate_eps, "
        "bool norm_before_gate, Tensor out_proj, int out_type, Tensor(a!) conv_state, Tensor(b!) ssm_state, "
        "Tensor slots, float dt_min, float dt_max, bool integer, int gemv_max_rows, int int8_batch_max_rows, int int8_batch_types) -> Tensor");
  m.def("deltanet_decode(Tensor x, Tensor norm, float norm_eps, Tensor[] in_proj, int[] in_types, Tensor conv_weight, "
        "Tensor A, Tensor dt_bias, Tensor head_norm, float head_eps, Tensor out_proj, int out_type, "
        "Tensor(a!) conv_state, Tensor(b!) recurrent, Tensor slots, int k_heads, bool tiled, bool integer, "
        "int gemv_max_rows, int int8_batch_max_rows, int int8_batch_types) -> Tensor");
  m.def("moe_decode(Tensor h, Tensor router, int router_type, int router_kind, int top_k, bool normalize, "
        "int num_groups, int groups_used, float scale, Tensor? correction_bias, Tensor? gate_exps, Tensor up_exps, "
        "Tensor down_exps, int[] expert_types, int activation, Tensor[] shared, int[] shared_types, bool integer, "
        "int gemv_max_rows, int int8_batch_max_rows, int int8_batch_types) -> Tensor");
}

TORCH_LIBRARY_IMPL(cholla, CPU, m) {
  m.impl("mamba2_decode", &cholla::mamba2_decode);
  m.impl("deltanet_decode", &cholla::deltanet_decode);
  m.impl("moe_decode", &cholla::moe_decode);
}
