// Fused cross-entropy of a language model's logits: parameter structs and launchers shared by the
// CPU kernel (cross_entropy_cpu.cpp) and its CUDA twin (cross_entropy_cuda.cu). Framework-free.
//
// Layout: `rows` rows of `vocab` logits; element v of row r at logits + r * row_stride + v
// (strides in elements, the vocab axis contiguous). targets: (rows,) int64. Per row, in float32:
//   forward   lse = log(sum_v exp(x_v))          (max-shifted; one pass over the row)
//             loss[r] = lse - x[target]          0 where target == ignore_index (the row is not read)
//   backward  dlogits[r, v] = (exp(x_v - lse) - [v == target]) * drow[r]
//             0 for the whole row where target == ignore_index (not read)
// drow is the gradient of loss[r] (rows,) float32: a mean over the counted rows hands each of them
// 1 / count, so no host-side scalar is needed. A target outside [0, vocab) that is not ignore_index
// gives loss NaN and a NaN gradient row (the CPU launcher also returns how many there were, so its
// caller can raise). The logits are read once per pass, the gradient written once: what the
// log-softmax + NLL pair does in several passes and float32 buffers the size of the logits.
#pragma once

#include <cstdint>

#include "common/tensor.h"

#ifdef MPTK_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace mptk {

struct CrossEntropyFwdParams {
  const void* logits = nullptr;  // (rows, vocab) of dtype
  int64_t row_stride = 0;
  const int64_t* targets = nullptr;  // (rows,)
  float* loss = nullptr;             // (rows,)
  float* lse = nullptr;              // (rows,) saved for the backward (0 for ignored rows)
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t ignore_index = -100;
  DType dtype = DType::Float32;  // float32, bfloat16, float16
};

struct CrossEntropyBwdParams {
  const void* logits = nullptr;
  int64_t row_stride = 0;
  const int64_t* targets = nullptr;
  const float* lse = nullptr;   // from the forward
  const float* drow = nullptr;  // (rows,) gradient of loss[r]
  void* dlogits = nullptr;      // (rows, vocab) of dtype
  int64_t dlogits_row_stride = 0;
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t ignore_index = -100;
  DType dtype = DType::Float32;
};

// Host kernels (OpenMP over rows). The forward returns the number of rows whose target is out of
// range (their loss is NaN).
int64_t cross_entropy_fwd_cpu(const CrossEntropyFwdParams& p);
void cross_entropy_bwd_cpu(const CrossEntropyBwdParams& p);

#ifdef MPTK_WITH_CUDA
// CUDA kernels: one block per row. Asynchronous on `stream`; the current device must be the
// tensors' device (the bindings set it).
void cross_entropy_fwd_cuda(const CrossEntropyFwdParams& p, cudaStream_t stream);
void cross_entropy_bwd_cuda(const CrossEntropyBwdParams& p, cudaStream_t stream);
#endif

}  // namespace mptk
