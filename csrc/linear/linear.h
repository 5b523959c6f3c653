// Few-row linear layer on the CPU: y = x W^T (+ bias) for at most kFewRowsMax rows of x, the product
// of a decode step (one row per sequence). Framework-free.
//
// Layout: x (rows, in) with element (m, k) at x + m * x_row_stride + k; W (out, in) with row n at
// w + n * w_row_stride (the nn.Linear weight); bias (out,) contiguous or null; y (rows, out) with row
// stride y_row_stride. One dtype for all of them (float32, bfloat16, float16); products and sums in
// float32, each output rounded once.
//
// Why a kernel: at a few rows the product is a read of W (2 bytes per weight in bfloat16) and nothing
// else. torch's CPU bfloat16 GEMM reads it at ~16-18 GB/s here against the ~25-30 GB/s a plain read
// reaches, and its cost grows with the rows (4 rows ~3.5x one). This reads W once for all the rows.
// On CUDA, cuBLAS's GEMV is already bandwidth-bound: no twin.
#pragma once

#include <cstdint>

#include "common/tensor.h"

namespace mptk {

constexpr int kFewRowsMax = 8;

struct FewRowsLinearParams {
  const void* x = nullptr;
  int64_t x_row_stride = 0;
  const void* w = nullptr;
  int64_t w_row_stride = 0;
  const void* bias = nullptr;  // (out,) or null
  void* y = nullptr;
  int64_t y_row_stride = 0;
  int rows = 0;  // <= kFewRowsMax
  int64_t in_features = 0;
  int64_t out_features = 0;
  DType dtype = DType::Float32;  // float32, bfloat16, float16
};

// OpenMP over blocks of output features (W rows); the bindings check every argument first.
void few_rows_linear_cpu(const FewRowsLinearParams& p);

}  // namespace mptk
