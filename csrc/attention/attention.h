// ALiBi flash attention: parameter structs and launchers shared by the CPU kernel
// (attention_cpu.cpp) and the CUDA kernels (attention_cuda.cu). Framework-free.
//
// Layout (strides in elements; only the head_dim axis must be contiguous):
//   batched: q[b, s, h, d] = q + b*q_batch_stride + s*q_row_stride + h*q_head_stride + d
//   varlen (cu_seqlens_q != nullptr): batch = number of sequences, tensors are (total, heads, dim),
//            token s of sequence b is row cu_seqlens_q[b] + s; the *_batch_stride fields are 0.
//   lse / delta (float32): lse[b, h, s] = lse + b*lse_batch_stride + h*lse_head_stride + row,
//            row = s (batched) or cu_seqlens_q[b] + s (varlen, lse_batch_stride = 0).
// Bias (MPT's key-position ALiBi): score(i, j) += -slope[b, h] * (seqlen_k - 1 - j), where seqlen_k
// is the length of that sequence's keys. Causal: query i (0-based within seqlen_q) sees keys
// j <= i + seqlen_k - seqlen_q (bottom-right aligned). Softmax statistics are float32.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/tensor.h"

#ifdef MPTK_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace mptk {

struct AttentionFwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // may be null when the caller does not need it (inference)
  DType dtype = DType::BFloat16;

  int batch = 0;       // number of sequences
  int seqlen_q = 0;    // batched: per-sequence length; varlen: max_seqlen_q
  int seqlen_k = 0;    // batched: per-sequence length; varlen: max_seqlen_k
  int n_heads = 0;
  int n_kv_heads = 0;  // n_heads % n_kv_heads == 0
  int head_dim = 0;

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;

  const float* alibi_slopes = nullptr;  // null: no bias; else slopes[b * slopes_batch_stride + h]
  int64_t alibi_slopes_batch_stride = 0;  // 0 when the slopes are (n_heads,)

  float softmax_scale = 1.0f;
  bool causal = true;

  const int32_t* cu_seqlens_q = nullptr;  // (batch + 1,) int32, increasing; varlen when both set
  const int32_t* cu_seqlens_k = nullptr;

  // Scratch owned by the caller; size from alibi_attention_fwd_workspace_size (may be 0).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;

  bool is_varlen() const { return cu_seqlens_q != nullptr; }
};

struct AttentionBwdParams : AttentionFwdParams {
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;  // (.., n_kv_heads, head_dim): summed over the query heads of each group
  void* dv = nullptr;
  int64_t dout_batch_stride = 0, dout_row_stride = 0, dout_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
  // lse (from the forward) must be set. Workspace from alibi_attention_bwd_workspace_size.
};

// Host kernels (float32 and bfloat16).
size_t alibi_attention_fwd_workspace_size_cpu(const AttentionFwdParams& p);
void alibi_attention_fwd_cpu(const AttentionFwdParams& p);
size_t alibi_attention_bwd_workspace_size_cpu(const AttentionBwdParams& p);
void alibi_attention_bwd_cpu(const AttentionBwdParams& p);

#ifdef MPTK_WITH_CUDA
// CUDA kernels (float16 and bfloat16). Launched on `stream`, asynchronous. Workspaces (CPU and
// CUDA alike) are always zero-filled by the caller before the call.
size_t alibi_attention_fwd_workspace_size_cuda(const AttentionFwdParams& p);
void alibi_attention_fwd_cuda(const AttentionFwdParams& p, cudaStream_t stream);
size_t alibi_attention_bwd_workspace_size_cuda(const AttentionBwdParams& p);
void alibi_attention_bwd_cuda(const AttentionBwdParams& p, cudaStream_t stream);
// Which head dims have a compiled fast path (others raise ValueError from the launcher).
bool alibi_attention_cuda_supports_head_dim(int head_dim);
#endif

}  // namespace mptk
