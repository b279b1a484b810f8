// What decode_layers.cpp calls of the other kernel files, without a trip
// through Python: their ops' work split for a team of threads, and their
// bodies for one row. (The ops themselves are registered in each file.)
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <optional>
#include <vector>

#include "team.h"

namespace cholla {

// The *_part functions do a team member's part of an op for a team of threads
// already running (team.h): every member calls them with the same arguments,
// takes chunks of the op's jobs from `member` until none is left, and writes
// their part of the preallocated output. Each leaves the stage open: the
// caller ends it with member.finish().

// An op run on its own (not inside decode_layers' team): a team of torch's
// threads for this one stage, `part(member)` on each. (Inside another
// parallel region at::parallel_for runs inline: member 0 takes every chunk.)
template <typename Part>
void run_as_team(Part&& part) {
  Team team(at::get_num_threads());
  at::parallel_for(0, team.members(), 1, [&](int64_t begin, int64_t) {
    Member member(team, begin);
    part(member);
  });
}

// qgemv.cpp: x fp32 [m <= 8, k] times each weight's GGUF rows, side by side;
// `integer`: the int8 path for the types that have it, which takes up to 64
// rows where every weight's type has one (int8_kernel_types).
bool int8_kernel_types(at::IntArrayRef types);
void gemv_part(const at::Tensor& x, at::TensorList weights, at::IntArrayRef types, bool integer, at::Tensor& y,
               Member& member);

// qgemv.cpp: a weight's GGUF rows as the GEMVs read them (data, GGML type, rows, bytes and
// weights a row), checked once: a caller that keeps them (decode_layers' DecodeLayers) spares
// every product of every step the tensors' metadata.
struct WeightRows {
  const uint8_t* data;
  int64_t type, rows, row_bytes, k;
};
WeightRows weight_rows(const at::Tensor& w, int64_t type);
// The int8 GEMV's most rows of x (qgemv.cpp); past them, where every weight has an integer
// kernel, the batched int8 product.
constexpr int64_t INT8_GEMV_MAX_ROWS = 6;
// x [rows, k] of a batched int8 product (more than INT8_GEMV_MAX_ROWS rows, every weight of an
// int8 type), quantized ahead a row at a time (quantize_x_row, by whichever member computed the
// row) into buffers that every member's jobs then read, where each member quantized all of x for
// itself before its first job: 0.3 ms of Gemma 3's 32-row step at two threads. The same numbers
// either way.
struct QuantizedX {
  at::Tensor bytes, numbers;
  int64_t rows = 0, k = 0;
};
QuantizedX quantized_x(int64_t rows, int64_t k);
void quantize_x_row(const float* row, int64_t r, const QuantizedX& x);
// gemv_part over `count` such weights, side by side; `ready`: x quantized ahead, for the
// batched int8 product (the other products ignore it).
void gemv_rows_part(const at::Tensor& x, const WeightRows* weights, int64_t count, bool integer, at::Tensor& y,
                    Member& member, const QuantizedX* ready = nullptr);

// Greedy tokens straight from a batched int8 product (x of more than INT8_GEMV_MAX_ROWS rows,
// every weight of a type with an int8 kernel), the product not written: each row's best
// (value, column) over a member's jobs, the first column on ties, a NaN above every number (as
// argmax_rows over the product's sums). Columns fit int32 (a vocabulary).
struct RowBest {
  float value;
  int32_t index;
};
// [members][rows] of no candidate yet (what a member with no jobs leaves).
std::vector<RowBest> no_best(int64_t members, int64_t rows);
// A member's part: its rows' best over its jobs into best ([rows], the member's own).
void gemv_rows_argmax_part(const at::Tensor& x, const WeightRows* weights, int64_t count, RowBest* best,
                           Member& member, const QuantizedX* ready = nullptr);
// tokens[r]: row r's best column over every member's best ([members][rows]).
void best_columns(const std::vector<RowBest>& best, int64_t rows, int64_t* tokens);

// qmatmul.cpp: the same products on the AMX tiles (weights and x rounded to bf16).
void qmatmul_part(const at::Tensor& x, at::TensorList weights, at::IntArrayRef types, at::Tensor& y, Member& member);

// Which kernel multiplies `rows` rows: the rule of cholla/layers/linear.py's _kernel_matmul for
// steps our kernels serve (the Python side declines the others: fp32 steps over gemv_max_rows).
// int8_batch_types: the GGML type ids (bit t for type t) whose products take the batched int8
// product (linear.py's int8_batch_types: a decode step's or a prompt's).
// A product is a stage of its own (its jobs are the stage's); the caller ends it.
struct Products {
  bool integer;
  int64_t gemv_max_rows, int8_batch_max_rows, int8_batch_types;

  bool batched_int8(at::IntArrayRef t) const {
    for (int64_t type : t)
      if (type < 0 || type >= 63 || !((int8_batch_types >> type) & 1)) return false;
    return int8_kernel_types(t);
  }
  // Whether `rows` rows of weights of types t take the GEMVs (gemv_part), not the AMX tiles.
  bool on_gemv(int64_t rows, at::IntArrayRef t) const {
    return rows <= gemv_max_rows || (integer && rows <= int8_batch_max_rows && batched_int8(t));
  }

  void run(const at::Tensor& x, at::TensorList w, at::IntArrayRef t, at::Tensor& out, Member& member) const {
    if (member.behind()) return;  // the stage closed while this member was away
    const int64_t rows = x.size(0);
    if (rows == 0) {  // no jobs: the stage's one empty chunk, so that it closes
      for (int64_t begin, end; member.next(0, begin, end);) {
      }
      return;
    }
    if (on_gemv(rows, t))
      gemv_part(x, w, t, integer, out, member);
    else
      qmatmul_part(x, w, t, out, member);
  }
  // The same, where the GEMVs take the weights' checked rows (w_rows: one per weight), and
  // the batched int8 product x quantized ahead where `ready` is given.
  void run(const at::Tensor& x, at::TensorList w, at::IntArrayRef t, const WeightRows* w_rows, at::Tensor& out,
           Member& member, const QuantizedX* ready = nullptr) const {
    const int64_t rows = x.size(0);
    if (rows > 0 && !member.behind() && on_gemv(rows, t))
      gemv_rows_part(x, w_rows, static_cast<int64_t>(w.size()), integer, out, member, ready);
    else
      run(x, w, t, out, member);
  }
  // Whether `rows` rows of weights of types t take the batched int8 product (and so can take x
  // quantized ahead): past the int8 GEMV's rows (INT8_GEMV_MAX_ROWS) on the GEMVs.
  bool batched(int64_t rows, at::IntArrayRef t) const {
    return integer && rows > std::max(gemv_max_rows, INT8_GEMV_MAX_ROWS) && on_gemv(rows, t);
  }
};

// A member found the team failed at a stage's end: stop (another member's error is rethrown).
struct TeamStopped {};

// `body(member)` on one OpenMP team; the first member's error is rethrown.
template <typename Body>
void run_team(Body&& body) {
  // The team is sized before it starts (a member OpenMP does not provide has its chunks taken by the others).
  Team team(omp_get_max_threads());
  std::exception_ptr error;
  std::atomic_flag error_set = ATOMIC_FLAG_INIT;
#pragma omp parallel num_threads(team.members())
  {
    Member member(team, omp_get_thread_num());
    c10::ParallelGuard in_team(true);  // ops called in here run on the calling member alone
    try {
      body(member);
    } catch (const TeamStopped&) {
    } catch (...) {
      if (!error_set.test_and_set()) error = std::current_exception();
      team.fail();
    }
  }
  if (error) std::rethrow_exception(error);
}

// activation.cpp: act(gate) * up; activation ids as in cholla/layers/mlp.py.
at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, int64_t activation);
// The same into `out` (contiguous, gate's shape and dtype).
void gated_activation_out(const at::Tensor& gate, const at::Tensor& up, int64_t activation, at::Tensor& out);
// Whether `activation` has a row body (SiLU, tanh-GELU: the exact GELU is PyTorch's), and that
// body: one fp32 row of gated_activation_out, as it computes it.
bool gated_activation_by_rows(int64_t activation);
void gated_activation_row(const float* gate, const float* up, float* out, int64_t inner, int64_t activation);

// paged_attention.cpp
// A KV cache's element types (cholla/kv/kv_types.py): floats, fp8, int8 with a
// scale per head, llama.cpp's Q8_0 and Q4_0 blocks (values and scales in two planes),
// fp8 e4m3 and 4-bit with one scale per head (fp8_e4m3_scaled; q4_kivi's values), and
// two key layouts with statistics per block (open blocks in bf16 until full): q4_kivi's
// (4-bit per channel) and fp8_e4m3_centered's (each channel's block mean taken out).
enum class KVKind { F32, BF16, F16, E4M3, E5M2, INT8, Q8_0, Q4_0, E4M3_SCALED, Q4_HEAD, Q4_CHANNEL, E4M3_CENTERED };

// One side (K or V) of a layer's cache as the kernels read and write it. Row r
// (slot * heads + head) holds `row_bytes` of values and `groups` fp16 scales;
// rotated: each head stored Hadamard-rotated, calibrated (shift, spread: fp32
// [heads, dim]) after x -> (x - shift) / spread. Q4_CHANNEL and E4M3_CENTERED (keys
// with statistics per block) have no scales but `params` (uint8 [blocks, heads,
// params_width]: kv_types.channel_params) and their open blocks' bf16 rows (`open_rows`
// [open_slots, block_size, heads, dim], `open_slot_of` [blocks]: a block's slot or -1).
struct KVSide {
  KVKind kind;
  const uint8_t* values;
  int64_t row_bytes;
  uint16_t* scales;
  int64_t groups;
  const float* shift;
  const float* spread;
  bool rotated;
  int64_t blocks, block_size, heads, dim;
  uint8_t* params;
  int64_t params_width;
  uint16_t* open_rows;
  const int64_t* open_slot_of;
  int64_t open_slots;
};

// values: the side's (contiguous) values; quant: [], [scales] or [scales, shift, spread].
KVSide kv_side(const char* op, const at::Tensor& values, at::TensorList quant, bool rotated);
// K and V of one geometry (their types may differ).
void check_sides(const char* op, const KVSide& k, const KVSide& v);
// Query rows of a step: row r belongs to sequence seq[r], and sees the first
// visible(r) keys of it. Without query starts each sequence has one row.
struct QueryRows {
  int64_t count = 0;               // rows
  std::vector<int64_t> seq, ends;  // empty: row r is sequence r
  int64_t sequence(int64_t r) const { return seq.empty() ? r : seq[r]; }
  // The span's last row sees the whole context; each row before it one key fewer.
  int64_t visible(int64_t r, const int64_t* lens) const {
    return seq.empty() ? lens[r] : lens[seq[r]] - (ends[seq[r]] - 1 - r);
  }
};
// A step's block tables (int64 [seqs, max_blocks]), context lengths (int64 [seqs]) and query rows,
// converted and checked once: a fused decode step's layers all read the same ones.
struct AttentionTables {
  at::Tensor block_tables, context_lens;  // (what the pointers read)
  const int64_t* tables;
  const int64_t* lens;
  int64_t max_blocks;
  QueryRows rows;
};
// `rows` query rows (query_starts as in paged_attention_decode) over caches of side's blocks.
AttentionTables attention_tables(const at::Tensor& block_tables, const at::Tensor& context_lens,
                                 const std::optional<at::Tensor>& query_starts, int64_t rows, const KVSide& side);
void paged_attention_part(const at::Tensor& q, const KVSide& k_cache, const KVSide& v_cache,
                          const AttentionTables& tables, double scale, int64_t window, double softcap,
                          at::Tensor& out, Member& member);

// The ops' bodies for one row, for a caller that checks a step's arguments
// once, up front: no checks, no allocation, no threads.
void rms_norm_row(const float* x, const float* weight, float* y, int64_t dim, float eps);
// argmax.cpp: the first index of x[0..n)'s largest value (a NaN counts as largest), as argmax_rows.
int64_t argmax_row(const float* x, int64_t n);
// embedding.cpp: Q4_0 / Q8_0 rows of an embedding table, fp32 [ids, cols].
at::Tensor embedding_rows(const at::Tensor& weight, int64_t type, const at::Tensor& ids, int64_t cols);
// One token's heads, each `dim` floats, back to back; cos, sin: its position's table rows.
void rope_row(float* q, int64_t q_heads, float* k, int64_t k_heads, const float* cos, const float* sin, int64_t dim,
              bool interleaved);
// One token's keys and values (kv_heads * dim floats each) into cache slot `slot`.
void write_kv_row(const float* k, const float* v, const KVSide& k_cache, const KVSide& v_cache, int64_t slot);
// After a step's rows are written (write_kv_row): keys with statistics per block of each block the
// step filled are quantized, the others marked open; k: the step's keys, row t at k + t * k_stride,
// slots[t] its slot. Nothing to do for other kinds.
void finish_kv_rows(const KVSide& k_cache, const float* k, int64_t k_stride, const int64_t* slots, int64_t tokens);

// ssd.cpp: one Mamba-2 head's decode step on its state [head_dim, state_size] in place (y: head_dim
// floats, the D skip included), and the gated RMSNorm of one row's group of `width` channels.
void ssd_head_row(float* state, const float* x, const float* B, const float* C, float* y, int64_t head_dim,
                  int64_t state_size, float dt_raw, float dt_bias, float A_log, float D, float dt_min, float dt_max);
void gated_norm_row(const float* y, const float* z, const float* weight, float* out, int64_t width, float eps,
                    bool norm_before_gate);
// state_update.cpp: the short causal convolution's step for one row's channels [begin, end)
// (state: that sequence's [channels, kernel - 1]), through SiLU when `silu`.
void conv_step_row(const float* x, const float* weight, const float* bias, float* state, float* out, int64_t begin,
                   int64_t end, int64_t kernel, bool silu);
// ... and Gated DeltaNet's step for one (sequence, value head h): row: its convolved q, k, v; a, b:
// its raw decay and beta projections; state: that head's [dk, dv], in place; out: dv floats;
// next: the state the caller steps next (fetched into L2 meanwhile) or null. dk <= 1024.
void delta_rule_head_row(const float* row, float a, float b, float A, float dt_bias, float* state, float* out,
                         int64_t k_heads, int64_t v_heads, int64_t dk, int64_t dv, int64_t h, bool tiled,
                         const float* next);

}  // namespace cholla
