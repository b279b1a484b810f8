// Every decoder layer of a decode step in one call.
//
// A decode step runs each layer on one row per sequence, and the work per
// layer is a few GEMVs plus small vector operations. Driven from Python, a
// SmolLM2 step spent more time between the kernels than in them: module calls,
// views, splits and dispatch, ~100 us per layer. The gaps cost the GEMVs too:
// run back to back they read the weights ~30% faster than with Python work
// between them. This file chains the same kernels (ops.h) for all layers, in
// the order the Python layers use them, so it computes what they compute.
//
// Under torch.profiler (cholla bench --profile) each layer's four stages
// appear as ranges named "cholla::decode_layers: ...".
//
// It covers the pre-norm decoder layer of the Llama family and Gemma 3:
//   h = norm(x); q, k, v = h Wq, h Wk, h Wv; [q, k = q_norm(q), k_norm(k)];
//   q, k = rope(q, k); cache <- k, v; o = attention(q, cache) Wo; [o = norm(o)];
//   x = x + o; h = norm(x); a = act(h Wgate) * (h Wup); d = a Wdown; [d = norm(d)];
//   x = x + d
// with the bracketed steps switched on by `qk_norm` and `post_norms`. Layers
// with biases, or any other shape, stay on the Python path.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <vector>

#include "ops.h"

namespace {

constexpr int64_t WEIGHTS_PER_LAYER = 7;  // q, k, v, o, gate, up, down

// The product cholla/layers/linear.py picks for this many rows: a GEMV up to
// gemv_max_rows, the AMX tiles above.
at::Tensor project(const at::Tensor& x, at::TensorList w, at::IntArrayRef t, bool integer, int64_t gemv_max_rows) {
  return x.size(0) <= gemv_max_rows ? cholla::gemv(x, w, t, integer) : cholla::qmatmul(x, w, t);
}

}  // namespace

namespace cholla {

// x: fp32 [rows, hidden], one row per decoding sequence; returns the residual
// stream after the last layer. Per layer l:
//   weights[7l .. 7l+6] (GGUF rows, `types`): q, k, v, o, gate, up, down;
//   norms[norms_per_layer * l ..]: attention input, MLP input, then with
//     post_norms the attention and MLP outputs, then with qk_norm q and k;
//   k_caches[l], v_caches[l]; cos[rope_of_layer[l]], sin[...]; windows[l] (0: none).
// positions, slot_mapping, block_tables, context_lens: as in the single ops.
// Products of up to gemv_max_rows rows run on the GEMV (int8 with `integer`),
// larger ones on the AMX tiles.
at::Tensor decode_layers(const at::Tensor& x_in, const at::Tensor& positions, at::TensorList weights,
                         at::IntArrayRef types, at::TensorList norms, at::TensorList k_caches,
                         at::TensorList v_caches, at::TensorList cos, at::TensorList sin,
                         at::IntArrayRef rope_of_layer, at::IntArrayRef windows, const at::Tensor& slot_mapping,
                         const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim, double scale, double softcap, double eps,
                         bool interleaved, int64_t activation, bool post_norms, bool qk_norm, bool integer,
                         int64_t gemv_max_rows) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  const int64_t norms_per_layer = 2 + (post_norms ? 2 : 0) + (qk_norm ? 2 : 0);
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "decode_layers: x must be fp32 [rows, hidden]");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == WEIGHTS_PER_LAYER * layers && types.size() == weights.size() &&
                  static_cast<int64_t>(norms.size()) == norms_per_layer * layers &&
                  static_cast<int64_t>(v_caches.size()) == layers &&
                  static_cast<int64_t>(rope_of_layer.size()) == layers &&
                  static_cast<int64_t>(windows.size()) == layers && cos.size() == sin.size(),
              "decode_layers: per-layer lists disagree in length");
  for (int64_t r : rope_of_layer)
    TORCH_CHECK(r >= 0 && r < static_cast<int64_t>(cos.size()), "decode_layers: rope index out of range");
  const int64_t rows = x_in.size(0), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  at::Tensor x = x_in.clone();
  for (int64_t l = 0; l < layers; ++l) {
    const at::TensorList w = weights.slice(WEIGHTS_PER_LAYER * l, WEIGHTS_PER_LAYER);
    const at::IntArrayRef t = types.slice(WEIGHTS_PER_LAYER * l, WEIGHTS_PER_LAYER);
    const at::TensorList n = norms.slice(norms_per_layer * l, norms_per_layer);
    const at::Tensor* qk_norms = qk_norm ? &n[post_norms ? 4 : 2] : nullptr;

    at::Tensor attended;
    {
      RECORD_FUNCTION("cholla::decode_layers: attention", std::vector<c10::IValue>());
      const at::Tensor qkv = project(rms_norm(x, n[0], eps), w.slice(0, 3), t.slice(0, 3), integer, gemv_max_rows);
      at::Tensor q = qkv.narrow(1, 0, q_size).view({rows, num_heads, head_dim});
      at::Tensor k = qkv.narrow(1, q_size, kv_size).view({rows, num_kv_heads, head_dim});
      const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({rows, num_kv_heads, head_dim});
      if (qk_norm) {
        q = rms_norm(q, qk_norms[0], eps);
        k = rms_norm(k, qk_norms[1], eps);
      }
      rope_(q, k, positions, cos[rope_of_layer[l]], sin[rope_of_layer[l]], interleaved);
      write_kv(k, v, k_caches[l], v_caches[l], slot_mapping);
      attended = paged_attention_decode(q, k_caches[l], v_caches[l], block_tables, context_lens, scale, windows[l],
                                        softcap);
    }
    {
      RECORD_FUNCTION("cholla::decode_layers: o projection", std::vector<c10::IValue>());
      at::Tensor o = project(attended.view({rows, q_size}), w.slice(3, 1), t.slice(3, 1), integer, gemv_max_rows);
      if (post_norms) o = rms_norm(o, n[2], eps);
      x.add_(o);
    }
    at::Tensor a;
    {
      RECORD_FUNCTION("cholla::decode_layers: gate/up projection", std::vector<c10::IValue>());
      const at::Tensor gate_up = project(rms_norm(x, n[1], eps), w.slice(4, 2), t.slice(4, 2), integer, gemv_max_rows);
      const int64_t inner = gate_up.size(1) / 2;
      a = gated_activation(gate_up.narrow(1, 0, inner), gate_up.narrow(1, inner, inner), activation);
    }
    {
      RECORD_FUNCTION("cholla::decode_layers: down projection", std::vector<c10::IValue>());
      at::Tensor d = project(a, w.slice(6, 1), t.slice(6, 1), integer, gemv_max_rows);
      if (post_norms) d = rms_norm(d, n[3], eps);
      x.add_(d);
    }
  }
  return x;
}

}  // namespace cholla

TORCH_LIBRARY_FRAGMENT(cholla, m) {
  m.def("decode_layers(Tensor x, Tensor positions, Tensor[] weights, int[] types, Tensor[] norms, "
        "Tensor[] k_caches, Tensor[] v_caches, Tensor[] cos, Tensor[] sin, int[] rope_of_layer, int[] windows, "
        "Tensor slot_mapping, Tensor block_tables, Tensor context_lens, int num_heads, int num_kv_heads, "
        "int head_dim, float scale, float softcap, float eps, bool interleaved, int activation, bool post_norms, "
        "bool qk_norm, bool integer, int gemv_max_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(cholla, CPU, m) { m.impl("decode_layers", &cholla::decode_layers); }
