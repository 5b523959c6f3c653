// Low-precision LayerNorm (MPT's LPLayerNorm) with an optional fused residual add: parameter
// structs and launchers shared by the CPU kernel (layernorm_cpu.cpp) and its CUDA twin
// (layernorm_cuda.cu). Framework-free.
//
// Layout: `rows` rows of `hidden` elements. Element i of row r of tensor t lives at
//   t + r * t_row_stride + i            (strides in elements; the hidden axis is contiguous)
// Activations (x, residual, y, residual_out, dy, dresidual_out, h, dh) share one dtype `dtype`;
// weight, bias, dweight and dbias share `weight_dtype`, which is `dtype` or float32.
//
// Mixed precision (an autocast model: float32 residual stream and weights, 16-bit branches): the
// forward may take a float32 residual (residual_dtype, also residual_out's) with x float32 or
// 16-bit, and write y in a 16-bit y_dtype; without a residual, x float32 and y 16-bit. Weights are
// float32 then. The backward's mirror: h, dresidual_out and dh float32, dy 16-bit (dy_dtype), and
// optionally dx, dh rounded to dy_dtype (the gradient of a 16-bit x, written in the same pass
// instead of a separate cast). In every mode the arithmetic is the same float32 arithmetic; only
// the loads and stores differ. On the CPU (same loop structure) the mixed forward's y is bit for bit
// the float32 forward's y rounded to y_dtype, and dx the float32 dh rounded; the CUDA mixed kernels
// group a row's elements into threads differently (8-element packs), so their float32 sums, and so
// the last bits, may differ from the CUDA float32 kernels'.
//
// Forward, per row (all arithmetic in float32):
//   h     = x                       or  round_to_dtype(x + residual)  (stored to residual_out)
//   mean  = sum(h) / hidden;  rstd = 1 / sqrt(sum((h - mean)^2) / hidden + eps)   (two passes)
//   y     = round_to_dtype((h - mean) * rstd * weight + bias)
// Backward, per row, with xhat = (h - mean) * rstd and g = dy * weight:
//   dh    = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dresidual_out
//   dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy
// dh is the gradient of both x and residual (h = x + residual; rounding passes the gradient).
//
// Weight/bias gradients are deterministic: rows are dealt to `num_partials` groups (group g takes
// rows g, g + num_partials, g + 2 * num_partials, ...), each group sums its rows into its own
// float32 row of the workspace, and a second pass adds the groups' rows in index order. The number
// of groups depends only on the shape (and, on CUDA, the device), never on thread timing.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/tensor.h"

#ifdef MPTK_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace mptk {

struct LayerNormFwdParams {
  const void* x = nullptr;
  int64_t x_row_stride = 0;
  const void* residual = nullptr;  // optional; when set, residual_out must be set too
  int64_t residual_row_stride = 0;
  const void* weight = nullptr;  // (hidden,) contiguous
  const void* bias = nullptr;    // optional (hidden,) contiguous
  void* y = nullptr;
  int64_t y_row_stride = 0;
  void* residual_out = nullptr;  // x + residual rounded to dtype
  int64_t residual_out_row_stride = 0;
  float* mean = nullptr;  // optional (rows,) float32, contiguous
  float* rstd = nullptr;  // optional (rows,) float32, contiguous
  int64_t rows = 0;
  int64_t hidden = 0;
  float eps = 1e-5f;
  DType dtype = DType::BFloat16;           // x
  DType weight_dtype = DType::BFloat16;    // weight, bias
  DType residual_dtype = DType::BFloat16;  // residual, residual_out: dtype, or float32 (mixed)
  DType y_dtype = DType::BFloat16;         // y: dtype, or 16-bit with a float32 h (mixed)
};

struct LayerNormBwdParams {
  const void* dy = nullptr;  // gradient of y
  int64_t dy_row_stride = 0;
  const void* dresidual_out = nullptr;  // optional gradient of residual_out (fused residual only)
  int64_t dresidual_out_row_stride = 0;
  const void* h = nullptr;  // the forward's normalised input: x, or residual_out when fused
  int64_t h_row_stride = 0;
  const void* weight = nullptr;
  const float* mean = nullptr;  // (rows,) from the forward
  const float* rstd = nullptr;
  void* dh = nullptr;  // gradient of x (and of residual when fused)
  int64_t dh_row_stride = 0;
  void* dx = nullptr;  // optional, mixed only: dh rounded to dy_dtype (the gradient of a 16-bit x)
  int64_t dx_row_stride = 0;
  void* dweight = nullptr;  // (hidden,) weight_dtype
  void* dbias = nullptr;    // optional (hidden,) weight_dtype
  // float32 scratch of layer_norm_bwd_workspace_numel() elements: dweight partials
  // (num_partials, hidden), then dbias partials (num_partials, hidden) when dbias is set.
  float* workspace = nullptr;
  int64_t num_partials = 0;
  int64_t rows = 0;
  int64_t hidden = 0;
  DType dtype = DType::BFloat16;  // h, dresidual_out, dh
  DType weight_dtype = DType::BFloat16;
  DType dy_dtype = DType::BFloat16;  // dy (and dx): dtype, or 16-bit with a float32 h (mixed)
};

// The dtype combinations the kernels take (the bindings check them; the kernels check again).
inline bool layer_norm_fwd_dtypes_ok(DType x, DType residual, bool has_residual, DType y, DType weight) {
  const bool low = y == DType::BFloat16 || y == DType::Float16;
  if (x == y && (!has_residual || residual == x)) return weight == x || weight == DType::Float32;
  // mixed: float32 h (the residual stream, or x itself), 16-bit y, float32 weights
  const bool h_f32 = has_residual ? residual == DType::Float32 : x == DType::Float32;
  return low && h_f32 && (x == DType::Float32 || x == y) && weight == DType::Float32;
}
inline bool layer_norm_bwd_dtypes_ok(DType h, DType dy, DType weight) {
  if (h == dy) return weight == h || weight == DType::Float32;
  return h == DType::Float32 && (dy == DType::BFloat16 || dy == DType::Float16) && weight == DType::Float32;
}

inline int64_t layer_norm_bwd_workspace_numel(int64_t num_partials, int64_t hidden, bool has_bias) {
  return num_partials * hidden * (has_bias ? 2 : 1);
}

// Host kernels: dtype float32 or bfloat16 (float16 also works; not a tested configuration).
void layer_norm_fwd_cpu(const LayerNormFwdParams& p);
int64_t layer_norm_bwd_num_partials_cpu(int64_t rows, int64_t hidden);
void layer_norm_bwd_cpu(const LayerNormBwdParams& p);

#ifdef MPTK_WITH_CUDA
// CUDA kernels: dtype float32, bfloat16 or float16. Asynchronous on `stream`; the current device
// must be the tensors' device (the bindings set it).
void layer_norm_fwd_cuda(const LayerNormFwdParams& p, cudaStream_t stream);
int64_t layer_norm_bwd_num_partials_cuda(int64_t rows, int64_t hidden, DType dtype, DType weight_dtype, DType dy_dtype);
void layer_norm_bwd_cuda(const LayerNormBwdParams& p, cudaStream_t stream);
#endif

}  // namespace mptk
