// Token embedding rows straight from GGUF blocks.
//
// A decode step looks up one row per sequence of the embedding table. In
// PyTorch ops (cholla/quant) a Q4_0 row is a dozen small ops (unpacking nibbles,
// scaling, reshaping): ~0.3 ms of a ~5 ms Mamba-2 130M decode step, more than
// the row's bytes take to read. Here each row is dequantized in registers
// (blocks.h) and stored. Only the types whose dequantization here is bit-exact
// with gguf's (one product per weight: Q4_0, Q8_0) are taken; the Python
// side keeps the others.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <immintrin.h>

#include "blocks.h"

namespace cholla {

// weight: uint8 [rows, row bytes] of `type` (Q4_0 or Q8_0) holding `cols` values a row;
// ids: int64 [n] -> fp32 [n, cols].
at::Tensor embedding_rows(const at::Tensor& weight, int64_t type, const at::Tensor& ids, int64_t cols) {
  TORCH_CHECK(type == Q4_0 || type == Q8_0, "embedding_rows: type ", type, " is not Q4_0 or Q8_0");
  const int64_t bytes = cols / 32 * block_format(type).bytes;
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 2 && weight.stride(1) == 1 && cols % 32 == 0 &&
                  weight.size(1) == bytes,
              "embedding_rows: weight must be uint8 [rows, ", bytes, "] with contiguous rows");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1, "embedding_rows: ids must be int64 [n]");
  const at::Tensor index = ids.contiguous();
  const int64_t n = index.size(0), rows = weight.size(0);
  const int64_t* id = index.data_ptr<int64_t>();
  at::Tensor out = at::empty({n, cols}, weight.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < rows, "embedding_rows: id ", id[i], " is outside the table's ", rows, " rows");
    const uint8_t* row = weight.data_ptr<uint8_t>() + id[i] * weight.stride(0);
    float* y = dst + i * cols;
    for_each_group(type, row, cols, [&](int64_t at, __m512 lo, __m512 hi) {
      _mm512_storeu_ps(y + at, lo);
      _mm512_storeu_ps(y + at + 16, hi);
    });
  }
  return out;
}

}  // namespace cholla

TORCH_LIBRARY_FRAGMENT(cholla, m) { m.def("embedding_rows(Tensor weight, int type, Tensor ids, int cols) -> Tensor"); }

TORCH_LIBRARY_IMPL(cholla, CPU, m) { m.impl("embedding_rows", &cholla::embedding_rows); }
