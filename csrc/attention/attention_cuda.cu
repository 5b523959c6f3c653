// Placeholder until the CUDA ALiBi flash attention lands: every entry point raises a clear error.
#include "attention/attention.h"
#include "common/error.h"

namespace mptk {
size_t alibi_attention_fwd_workspace_size_cuda(const AttentionFwdParams&) { return 0; }
void alibi_attention_fwd_cuda(const AttentionFwdParams&, cudaStream_t) {
  throw std::runtime_error("alibi_attention: CUDA kernel not implemented yet");
}
size_t alibi_attention_bwd_workspace_size_cuda(const AttentionBwdParams&) { return 0; }
void alibi_attention_bwd_cuda(const AttentionBwdParams&, cudaStream_t) {
  throw std::runtime_error("alibi_attention backward: CUDA kernel not implemented yet");
}
bool alibi_attention_cuda_supports_head_dim(int) { return false; }
}  // namespace mptk
