// Every decoder layer of a decode step in one call.
//
// A decode step runs each layer on one row per sequence, and the work per
// layer is a few GEMVs plus small vector operations. Driven from Python, a
// SmolLM2 step spent more time between the kernels than in them: module calls,
// views, splits and dispatch, ~100 us per layer. The gaps cost the GEMVs too:
// run back to back they read the weights ~30% faster than with Python work
// between them. This file runs the same kernels' bodies (ops.h) for all
// layers, in the order the Python layers use them, so it computes what they
// compute.
//
// The threads stay together for the whole step: one OpenMP team runs every
// layer, five stages a layer (team.h): each product and the attention are
// cut into chunks that the members claim, each its own first, then the
// others' (so a member the OS has descheduled holds up at most the chunk in
// its hands), and the small steps between them (rope and cache writes, the
// residual adds and norms, the activation) run row by row, with no tensor ops,
// on whichever member finishes a stage's last chunk; from SHARED_STEP_MIN_ROWS
// rows (the batched steps) those rows are a stage of their own, shared by the
// team as a product's jobs are, nine stages a layer. A stage's end costs
// ~0.3 us, where a fork and join per kernel cost 1-2 us, five times a layer;
// the step's arguments are checked once, up front (the weights once per model:
// DecodeLayers; the attention's tables once per step). SmolLM2's layers: 2.9 ->
// 2.4 ms a step.
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

#include <torch/custom_class.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <cstring>
#include <memory>
#include <vector>

#include "ops.h"
#include "team.h"

namespace {

constexpr int64_t WEIGHTS_PER_LAYER = 7;  // q, k, v, o, gate, up, down
// From this many rows (the batched products' steps: the fused single-stream step has at most 6)
// the steps between the stages are shared by the team, a stage of rows each (decode_layers' `between`).
constexpr int64_t SHARED_STEP_MIN_ROWS = 7;

}  // namespace

namespace cholla {

// A model's layers as decode_layers reads them (flattened layer after layer, as
// fused_decode.DecodePlan lists them), handed over once: through the dispatcher
// every tensor of an op's lists is converted on every call, and SmolLM2's 210
// weights and 60 norms took ~40-70 us a step so.
// The weights' rows are checked here, once, for the GEMVs (ops.h's WeightRows).
struct DecodeLayers : torch::CustomClassHolder {
  std::vector<at::Tensor> weights;
  std::vector<int64_t> types;
  std::vector<at::Tensor> norms;
  std::vector<WeightRows> rows;  // weights[i]'s
  DecodeLayers(std::vector<at::Tensor> weights, std::vector<int64_t> types, std::vector<at::Tensor> norms)
      : weights(std::move(weights)), types(std::move(types)), norms(std::move(norms)) {
    TORCH_CHECK(this->types.size() == this->weights.size(), "DecodeLayers: one type per weight");
    for (size_t i = 0; i < this->weights.size(); ++i) rows.push_back(weight_rows(this->weights[i], this->types[i]));
  }
  // The model's final norm and output head, for steps that end with the logits (decode_layers'
  // `logits`): the head's product then runs in the same team, right after the last layer.
  at::Tensor final_norm, head;
  int64_t head_type = -1;
  WeightRows head_rows{};
  // decode_layers' buffers between its stages, kept from step to step while the row count stays
  // (seven allocations a step less; a model's steps run one at a time, as its head's kept logits).
  struct Scratch {
    at::Tensor qkv = at::empty({0, 0}), q = at::empty({0, 0, 0}), attended, o = at::empty({0, 0}), gate_up,
               activated = at::empty({0, 0}), down;
  } scratch;
  // The token embedding, for steps that start from token ids (Q4_0 / Q8_0 rows: embedding.cpp).
  at::Tensor embedding;
  int64_t embedding_type = -1;
  void bind_embedding(at::Tensor weight, int64_t type) {
    embedding = std::move(weight);
    embedding_type = type;
  }
  void bind_head(at::Tensor norm, at::Tensor weight, int64_t type) {
    TORCH_CHECK(norm.scalar_type() == at::kFloat && norm.is_contiguous() && norm.dim() == 1,
                "DecodeLayers.bind_head: the final norm must be a contiguous fp32 vector");
    head_rows = weight_rows(weight, type);
    final_norm = std::move(norm);
    head = std::move(weight);
    head_type = type;
  }
};

// A model's KV caches as decode_layers reads them (fused_decode._cache_args), bound once per
// cache: as lists, the dispatcher converted each layer's tensors on every step (60-120 for SmolLM2).
// k_quant, v_quant: each layer's scales (and shift, spread) of a quantized cache side, the same
// count per layer (paged_attention.cpp's kv_side), empty for float caches.
// Each layer's sides (the pointers and geometry the kernels read) are worked out and checked here,
// once: per step, the 60 kv_side calls of SmolLM2's 30 layers took ~11 us under load.
struct DecodeCaches : torch::CustomClassHolder {
  std::vector<at::Tensor> k_caches, v_caches, k_quant, v_quant;
  bool k_rotated, v_rotated;
  std::vector<KVSide> k_sides, v_sides;  // per layer
  DecodeCaches(std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches, std::vector<at::Tensor> k_quant,
               std::vector<at::Tensor> v_quant, bool k_rotated, bool v_rotated)
      : k_caches(std::move(k_caches)), v_caches(std::move(v_caches)), k_quant(std::move(k_quant)),
        v_quant(std::move(v_quant)), k_rotated(k_rotated), v_rotated(v_rotated) {
    const int64_t layers = static_cast<int64_t>(this->k_caches.size());
    TORCH_CHECK(static_cast<int64_t>(this->v_caches.size()) == layers && layers > 0,
                "DecodeCaches: one K and one V cache per layer");
    TORCH_CHECK(this->k_quant.size() % layers == 0 && this->v_quant.size() % layers == 0,
                "decode_layers: the same number of quantization tensors for every layer");
    const at::TensorList k_all = this->k_quant, v_all = this->v_quant;
    const int64_t k_parts = k_all.size() / layers, v_parts = v_all.size() / layers;
    for (int64_t l = 0; l < layers; ++l) {
      k_sides.push_back(kv_side("decode_layers", this->k_caches[l], k_all.slice(k_parts * l, k_parts), k_rotated));
      v_sides.push_back(kv_side("decode_layers", this->v_caches[l], v_all.slice(v_parts * l, v_parts), v_rotated));
      check_sides("decode_layers", k_sides[l], v_sides[l]);
      TORCH_CHECK(k_sides[l].heads == k_sides[0].heads && k_sides[l].dim == k_sides[0].dim &&
                      k_sides[l].blocks == k_sides[0].blocks && k_sides[l].block_size == k_sides[0].block_size,
                  "decode_layers: every layer's cache must have the same blocks and heads");
    }
  }
};

// x: fp32 [rows, hidden], one row per decoding sequence, or with query_starts
// (int64 [seqs + 1]) a short span of rows per sequence: its last few positions,
// as a speculating sequence verifies its drafts (paged_attention_decode); returns
// the residual stream after the last layer. Per layer l, of `model`'s lists:
//   weights[7l .. 7l+6] (GGUF rows, `types`): q, k, v, o, gate, up, down;
//   norms[norms_per_layer * l ..]: attention input, MLP input, then with
//     post_norms the attention and MLP outputs, then with qk_norm q and k;
//   caches' k_caches[l], v_caches[l] (and their quantization tensors); cos[rope_of_layer[l]],
//   sin[...]; windows[l] (0: none).
// positions, slot_mapping, block_tables, context_lens: as in the single ops.
// Products of up to gemv_max_rows rows run on the GEMV (int8 with `integer`),
// with `integer` those of up to int8_batch_max_rows rows whose weights are all of
// int8_batch_types (a bit per GGML type id) on the batched int8 product, larger ones
// on the AMX tiles (ops.h's Products).
// With `logits` (fp32 [rows, vocab]), the step goes on through the model's final norm and
// head (DecodeLayers.bind_head) in the same team, writes the head's product there and
// returns the final norm's output (and with `tokens`, int64 [rows], each row's argmax);
// without, it returns the residual stream. With `tokens`, where the head's product is the
// batched int8 one (more than INT8_GEMV_MAX_ROWS rows), its jobs give each row's argmax
// themselves (ops.h's gemv_rows_argmax_part) and the logits are not written. x may be int64 token ids [rows] instead,
// looked up in the bound embedding (DecodeLayers.bind_embedding).
at::Tensor decode_layers(const at::Tensor& x_or_ids, const at::Tensor& positions,
                         const c10::intrusive_ptr<DecodeLayers>& model,
                         const c10::intrusive_ptr<DecodeCaches>& caches, at::TensorList cos, at::TensorList sin,
                         at::IntArrayRef rope_of_layer, at::IntArrayRef windows, const at::Tensor& slot_mapping,
                         const at::Tensor& block_tables, const at::Tensor& context_lens,
                         const std::optional<at::Tensor>& query_starts, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim, double scale, double softcap, double eps,
                         bool interleaved, int64_t activation, bool post_norms, bool qk_norm, bool integer,
                         int64_t gemv_max_rows, int64_t int8_batch_max_rows, int64_t int8_batch_types,
                         const std::optional<at::Tensor>& logits, const std::optional<at::Tensor>& tokens) {
  const at::TensorList weights = model->weights, norms = model->norms;
  TORCH_CHECK(x_or_ids.scalar_type() != at::kLong || (model->embedding.defined() && !norms.empty()),
              "decode_layers: token ids given, but no embedding is bound (DecodeLayers.bind_embedding)");
  const at::Tensor x_in = x_or_ids.scalar_type() == at::kLong
                              ? embedding_rows(model->embedding, model->embedding_type, x_or_ids, norms[0].size(0))
                              : x_or_ids;
  const at::TensorList k_caches = caches->k_caches, v_caches = caches->v_caches;
  const at::IntArrayRef types = model->types;
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
  const int64_t rows = x_in.size(0), hidden = x_in.size(1);
  if (rows == 0 || layers == 0) return x_in.clone();
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim, qkv_size = q_size + 2 * kv_size;
  const int64_t inner = weights[4].size(0);  // the first gate's rows
  const float feps = static_cast<float>(eps);

  // The row-level bodies used below check nothing: everything is checked here, once.
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == rows &&
                  slots.numel() == rows, "decode_layers: one int64 position and cache slot per row");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (size_t r = 0; r < cos.size(); ++r) {
    TORCH_CHECK(cos[r].scalar_type() == at::kFloat && cos[r].is_contiguous() && cos[r].dim() == 2 &&
                    cos[r].size(1) == head_dim && sin[r].sizes() == cos[r].sizes() &&
                    sin[r].scalar_type() == at::kFloat && sin[r].is_contiguous() && head_dim % 2 == 0,
                "decode_layers: rope tables must be fp32 [length, head_dim]");
    for (int64_t i = 0; i < rows; ++i)
      TORCH_CHECK(pos[i] >= 0 && pos[i] < cos[r].size(0), "rope: position out of the table");
  }
  const std::vector<KVSide>&k_sides = caches->k_sides, &v_sides = caches->v_sides;  // (alike in every layer)
  TORCH_CHECK(k_sides[0].heads == num_kv_heads && k_sides[0].dim == head_dim,
              "decode_layers: cache heads disagree with the model");
  for (int64_t i = 0; i < rows; ++i)
    TORCH_CHECK(slot[i] >= 0 && slot[i] < k_sides[0].blocks * k_sides[0].block_size, "write_kv: slot out of range");
  const AttentionTables tables = attention_tables(block_tables, context_lens, query_starts, rows, k_sides[0]);
  for (int64_t i = 0; i < static_cast<int64_t>(norms.size()); ++i) {
    const bool per_head = qk_norm && i % norms_per_layer >= norms_per_layer - 2;
    TORCH_CHECK(norms[i].scalar_type() == at::kFloat && norms[i].is_contiguous() && norms[i].dim() == 1 &&
                    norms[i].size(0) == (per_head ? head_dim : hidden),
                "decode_layers: norm weight ", i, " has the wrong shape");
  }

  at::Tensor head_out;
  if (logits.has_value()) {
    TORCH_CHECK(model->head.defined(), "decode_layers: logits asked for, but no head is bound (DecodeLayers.bind_head)");
    head_out = *logits;
    TORCH_CHECK(model->final_norm.size(0) == hidden && model->head.size(0) > 0 &&
                    head_out.scalar_type() == at::kFloat && head_out.is_contiguous() && head_out.dim() == 2 &&
                    head_out.size(0) == rows && head_out.size(1) == model->head.size(0),
                "decode_layers: logits must be contiguous fp32 [rows, head rows], and the head as wide as x");
  }
  TORCH_CHECK(!tokens.has_value() || (head_out.defined() && tokens->scalar_type() == at::kLong &&
                                      tokens->is_contiguous() && tokens->numel() == rows),
              "decode_layers: tokens must be int64 [rows], with the logits");

  const auto options = x_in.options().memory_format(at::MemoryFormat::Contiguous);
  // The residual stream and what the stages write for each other. The steps
  // between the stages (`between`) write x, h, q, the caches and `activated`;
  // the products and the attention write their chunks' parts of the others.
  // (x and h are new: one of them is returned; the others are the model's, kept for this row count.)
  at::Tensor x = x_in.contiguous().clone(), h = at::empty({rows, hidden}, options);
  DecodeLayers::Scratch& kept = model->scratch;
  if (kept.qkv.size(0) != rows || kept.qkv.size(1) != qkv_size || kept.q.size(1) != num_heads ||
      kept.q.size(2) != head_dim || kept.o.size(1) != hidden || kept.activated.size(1) != inner)
    kept = {at::empty({rows, qkv_size}, options), at::empty({rows, num_heads, head_dim}, options),
            at::empty({rows, num_heads, head_dim}, options), at::empty({rows, hidden}, options),
            at::empty({rows, 2 * inner}, options), at::empty({rows, inner}, options), at::empty({rows, hidden}, options)};
  at::Tensor &qkv = kept.qkv, &q = kept.q, &attended = kept.attended, &o = kept.o, &gate_up = kept.gate_up;
  at::Tensor &activated = kept.activated, &down = kept.down;
  const at::Tensor attended_rows = attended.view({rows, q_size});  // (the o projection's x)
  float* xs = x.data_ptr<float>();
  float* hs = h.data_ptr<float>();
  // The steps between the stages, one row each (every path below runs these bodies, so a row
  // comes out the same whether one member runs the step for every row or the rows are shared).
  // x += (post_norm ? norm(y) : y) on row r (y: fp32 [rows, hidden])
  auto add_row = [&](const at::Tensor& y, const at::Tensor* post_norm, int64_t r) {
    const float* add_row = y.data_ptr<float>() + r * hidden;
    if (post_norm != nullptr) {
      rms_norm_row(add_row, post_norm->data_ptr<float>(), hs + r * hidden, hidden, feps);
      add_row = hs + r * hidden;
    }
    for (int64_t i = 0; i < hidden; ++i) xs[r * hidden + i] += add_row[i];
  };
  auto normalize_row = [&](const at::Tensor& weight, int64_t r) {  // h = norm(x) on row r
    rms_norm_row(xs + r * hidden, weight.data_ptr<float>(), hs + r * hidden, hidden, feps);
  };
  // row r's q (normed, rotated) for the attention; its k and v into the cache
  auto rope_and_cache_row = [&](int64_t l, const at::TensorList n, int64_t r) {
    const float* cos_table = cos[rope_of_layer[l]].data_ptr<float>();
    const float* sin_table = sin[rope_of_layer[l]].data_ptr<float>();
    float* qr = q.data_ptr<float>() + r * q_size;
    float* kr = qkv.data_ptr<float>() + r * qkv_size + q_size;
    const float* qkv_q = qkv.data_ptr<float>() + r * qkv_size;
    if (qk_norm) {
      const at::Tensor* qk_norms = &n[post_norms ? 4 : 2];
      for (int64_t hd = 0; hd < num_heads; ++hd)
        rms_norm_row(qkv_q + hd * head_dim, qk_norms[0].data_ptr<float>(), qr + hd * head_dim, head_dim, feps);
      for (int64_t hd = 0; hd < num_kv_heads; ++hd)
        rms_norm_row(kr + hd * head_dim, qk_norms[1].data_ptr<float>(), kr + hd * head_dim, head_dim, feps);
    } else {
      std::memcpy(qr, qkv_q, q_size * sizeof(float));
    }
    rope_row(qr, num_heads, kr, num_kv_heads, cos_table + pos[r] * head_dim, sin_table + pos[r] * head_dim,
             head_dim, interleaved);
    write_kv_row(kr, kr + kv_size, k_sides[l], v_sides[l], slot[r]);
  };
  auto finish_cache = [&](int64_t l) {  // after every row's write (quantized key blocks)
    finish_kv_rows(k_sides[l], qkv.data_ptr<float>() + q_size, qkv_size, slot, rows);
  };
  const Products products{integer, gemv_max_rows, int8_batch_max_rows, int8_batch_types};
  const bool shared_steps = rows >= SHARED_STEP_MIN_ROWS;
  // With shared steps, where the products that read h (q/k/v, gate/up) or `activated` (down) take
  // the batched int8 product in every layer, the row that a step computes is quantized there for
  // them (ops.h's QuantizedX), once, instead of by every member before its first job.
  bool h_ahead = shared_steps, activated_ahead = shared_steps && gated_activation_by_rows(activation);
  for (int64_t l = 0; l < layers; ++l) {
    const at::IntArrayRef t = types.slice(WEIGHTS_PER_LAYER * l, WEIGHTS_PER_LAYER);
    h_ahead = h_ahead && products.batched(rows, t.slice(0, 3)) && products.batched(rows, t.slice(4, 2));
    activated_ahead = activated_ahead && products.batched(rows, t.slice(6, 1));
  }
  const QuantizedX h_ready = h_ahead ? quantized_x(rows, hidden) : QuantizedX{};
  const QuantizedX activated_ready = activated_ahead ? quantized_x(rows, inner) : QuantizedX{};
  const QuantizedX* h_quantized = h_ahead ? &h_ready : nullptr;
  // Greedy rows' tokens from the head's own jobs: the batched int8 product's argmax (its x, the
  // final norm's rows, quantized ahead into h's buffers with the layers'); fewer rows write the
  // logits and take each row's argmax after them.
  const int64_t head_type[] = {model->head_type};
  const bool head_argmax = tokens.has_value() && products.batched(rows, head_type);
  std::vector<RowBest> head_best = head_argmax ? no_best(omp_get_max_threads(), rows) : std::vector<RowBest>{};
  const QuantizedX* activated_quantized = activated_ahead ? &activated_ready : nullptr;
  auto activate_row = [&](int64_t r) {
    const float* gu = gate_up.data_ptr<float>() + r * 2 * inner;
    float* out = activated.data_ptr<float>() + r * inner;
    gated_activation_row(gu, gu + inner, out, inner, activation);
    if (activated_ahead) quantize_x_row(out, r, activated_ready);
  };
  auto normalize_row_ahead = [&](const at::Tensor& weight, int64_t r) {  // the same, and h's row quantized
    normalize_row(weight, r);
    if (h_ahead) quantize_x_row(hs + r * hidden, r, h_ready);
  };
  for (int64_t r = 0; r < rows; ++r) normalize_row_ahead(norms[0], r);

  // A step between stages: `each_row(r)` on every row, then `last()`, which sees every row.
  // With many rows the rows are a stage of their own, shared as a product's jobs are (run by the
  // member that ended the stage before, they kept the others waiting: ~1.2 ms of Gemma 3's
  // 32-row step at one thread, docs/benchmarks.md); with a few, that member runs them, with no
  // stage end of their own. False: the team stopped.
  auto between = [&](Member& member, auto&& each_row, auto&& last) -> bool {
    if (!shared_steps)
      return member.finish([&] {
        for (int64_t r = 0; r < rows; ++r) each_row(r);
        last();
      });
    if (!member.finish()) return false;  // the stage before
    for (int64_t begin, end; member.next(rows, begin, end);)
      for (int64_t r = begin; r < end; ++r) each_row(r);
    return member.finish(last);
  };
  const auto nothing = [] {};

  run_team([&](Member& member) {
    const auto every_layer = [&]() -> bool {  // false: the team stopped
      for (int64_t l = 0; l < layers; ++l) {
        const at::TensorList w = weights.slice(WEIGHTS_PER_LAYER * l, WEIGHTS_PER_LAYER);
        const at::IntArrayRef t = types.slice(WEIGHTS_PER_LAYER * l, WEIGHTS_PER_LAYER);
        const WeightRows* r = model->rows.data() + WEIGHTS_PER_LAYER * l;
        const at::TensorList n = norms.slice(norms_per_layer * l, norms_per_layer);
        {
          RECORD_FUNCTION("cholla::decode_layers: attention", std::vector<c10::IValue>());
          products.run(h, w.slice(0, 3), t.slice(0, 3), r, qkv, member, h_quantized);
          if (!between(member, [&](int64_t row) { rope_and_cache_row(l, n, row); }, [&] { finish_cache(l); }))
            return false;
          if (!member.behind())
            paged_attention_part(q, k_sides[l], v_sides[l], tables, scale, windows[l], softcap, attended, member);
          if (!member.finish()) return false;
        }
        {
          RECORD_FUNCTION("cholla::decode_layers: o projection", std::vector<c10::IValue>());
          products.run(attended_rows, w.slice(3, 1), t.slice(3, 1), r + 3, o, member);
          if (!between(member,
                       [&](int64_t row) {
                         add_row(o, post_norms ? &n[2] : nullptr, row);
                         normalize_row_ahead(n[1], row);
                       },
                       nothing))
            return false;
        }
        {
          RECORD_FUNCTION("cholla::decode_layers: gate/up projection", std::vector<c10::IValue>());
          products.run(h, w.slice(4, 2), t.slice(4, 2), r + 4, gate_up, member, h_quantized);
          const bool ok = gated_activation_by_rows(activation)
                              ? between(member, activate_row, nothing)
                              : member.finish([&] {  // (PyTorch's exact GELU)
                                  gated_activation_out(gate_up.narrow(1, 0, inner), gate_up.narrow(1, inner, inner),
                                                       activation, activated);
                                });
          if (!ok) return false;
        }
        {
          RECORD_FUNCTION("cholla::decode_layers: down projection", std::vector<c10::IValue>());
          products.run(activated, w.slice(6, 1), t.slice(6, 1), r + 6, down, member, activated_quantized);
          const at::Tensor* next_norm = l + 1 < layers ? &norms[norms_per_layer * (l + 1)]
                                        : head_out.defined() ? &model->final_norm
                                                             : nullptr;
          if (!between(member,
                       [&](int64_t row) {
                         add_row(down, post_norms ? &n[3] : nullptr, row);
                         if (l + 1 < layers || head_argmax)
                           normalize_row_ahead(*next_norm, row);
                         else if (next_norm != nullptr)
                           normalize_row(*next_norm, row);
                       },
                       nothing))
            return false;
        }
      }
      return true;
    };
    if (every_layer() && head_out.defined()) {
      RECORD_FUNCTION("cholla::decode_layers: head", std::vector<c10::IValue>());
      if (head_argmax) {
        if (!member.behind())
          gemv_rows_argmax_part(h, &model->head_rows, 1, head_best.data() + member.index() * rows, member,
                                h_quantized);
        member.finish([&] { best_columns(head_best, rows, tokens->data_ptr<int64_t>()); });
        return;
      }
      const at::Tensor head_weight[] = {model->head};
      products.run(h, head_weight, head_type, &model->head_rows, head_out, member);
      member.finish([&] {  // greedy rows' tokens: each row's argmax, as argmax_rows gives it
        if (!tokens.has_value()) return;
        const int64_t vocab = head_out.size(1);
        for (int64_t r = 0; r < rows; ++r)
          tokens->data_ptr<int64_t>()[r] = argmax_row(head_out.data_ptr<float>() + r * vocab, vocab);
      });
    }
  });
  // With the head: the final norm's output (the step's hidden states, as the model's forward
  // returns them); else the residual stream after the last layer.
  return head_out.defined() ? h : x;
}

}  // namespace cholla

TORCH_LIBRARY_FRAGMENT(cholla, m) {
  m.class_<cholla::DecodeLayers>("DecodeLayers")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>>())
      .def("bind_head", &cholla::DecodeLayers::bind_head)
      .def("bind_embedding", &cholla::DecodeLayers::bind_embedding);
  m.class_<cholla::DecodeCaches>("DecodeCaches")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, bool, bool>());
  m.def("decode_layers(Tensor x, Tensor positions, __torch__.torch.classes.cholla.DecodeLayers layers, "
        "__torch__.torch.classes.cholla.DecodeCaches caches, Tensor[] cos, Tensor[] sin, int[] rope_of_layer, "
        "int[] windows, "
        "Tensor slot_mapping, Tensor block_tables, Tensor context_lens, Tensor? query_starts, int num_heads, "
        "int num_kv_heads, int head_dim, float scale, float softcap, float eps, bool interleaved, int activation, "
        "bool post_norms, bool qk_norm, bool integer, int gemv_max_rows, int int8_batch_max_rows, "
        "int int8_batch_types, Tensor? logits=None, Tensor? tokens=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(cholla, CPU, m) { m.impl("decode_layers", &cholla::decode_layers); }
