// Fused multi-tensor Lion step, multi-tensor sum of squares (for gradient clipping) and the small
// "finalize" step that turns the squared-norm partials into a gradient multiplier and a skip flag.
// Shared by the CPU kernels (lion_cpu.cpp) and the CUDA kernels (lion_cuda.cu). Framework-free.
//
// Update, per element, in float32 (g already multiplied by *grad_multiplier when given):
//   c = beta1*m + (1-beta1)*g;   p = p*(1-decay) - lr*sign(c);   m = beta2*m + (1-beta2)*g
// sign(0) = 0 and sign(NaN) = NaN (torch.sign gives 0 for NaN, which would silently freeze the element
// while its momentum holds the NaN; here a non-finite step that is not skipped shows in the parameter).
// The whole step is a no-op when *skip != 0.
//
// Work decomposition (identical on CPU and CUDA): every tensor is cut into chunks of kLionChunk
// elements; chunk k of the flattened list (tensor 0's chunks, then tensor 1's, ...) is found from a
// prefix sum of chunk counts by binary search. CUDA runs one block per chunk, the CPU one OpenMP
// iteration per chunk. The sum-of-squares kernels write one float partial per chunk, in that order,
// so the reduction order is fixed (deterministic) on each side. It is not the same on both: inside a
// chunk the CPU sums in AVX lanes and CUDA in per-thread strides, and the partials are summed
// sequentially (CPU) or as a tree (CUDA), so with clipping or a grad scale the multiplier, and then
// the update, can differ in the last bits between CPU and CUDA.
//
// bfloat16 storage is handled as raw uint16 bits on both sides with the same integer rounding code,
// so CPU and CUDA produce identical bits. Stochastic rounding adds 16 random bits below the bf16
// mantissa before truncating: a value between two bf16 neighbours rounds up with probability equal
// to its distance from the lower one, so tiny updates survive on average. The random bits are a
// counter-based hash of (seed, step, tensor rng index, stream, element index): reproducible, the
// same on CPU and CUDA, independent of thread count and launch splitting.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/tensor.h"

#ifdef MPTK_WITH_CUDA
#include <cuda_runtime.h>
#endif

#if defined(__CUDACC__)
#define MPTK_HD __host__ __device__ __forceinline__
#else
#define MPTK_HD inline
#endif

namespace mptk {

// Elements per (tensor, chunk) work item. A power of two that divides 2^32, so the upper 32 bits of
// an element index are constant within a chunk (the RNG folds them into the per-chunk key).
constexpr int64_t kLionChunk = 16384;

// One parameter group's hyperparameters as the kernels see them. The "one minus" terms are
// computed on the host in double so 1-0.99 is not rounded twice.
struct LionHyper {
  float lr = 0.f;
  float beta1 = 0.f, one_minus_beta1 = 1.f;
  float beta2 = 0.f, one_minus_beta2 = 1.f;
  float decay = 0.f;               // p *= (1 - decay) before the signed update
  int32_t stochastic_rounding = 0;  // bf16 params / bf16 state: round stochastically
};

struct LionTensor {
  void* param = nullptr;
  const void* grad = nullptr;
  void* exp_avg = nullptr;
  int64_t numel = 0;
  uint32_t rng_index = 0;  // stable per-parameter index (its position in the optimizer)
  int32_t hyper = 0;       // index into LionStepParams::hyper
};

struct LionStepParams {
  DType param_dtype = DType::Float32;  // float32 | bfloat16
  DType grad_dtype = DType::Float32;   // float32 | bfloat16
  DType state_dtype = DType::Float32;  // float32 | bfloat16
  std::vector<LionTensor> tensors;     // all contiguous, on one device
  std::vector<LionHyper> hyper;
  const float* grad_multiplier = nullptr;  // optional scalar on the tensors' device
  const float* skip = nullptr;             // optional scalar on the tensors' device
  uint64_t seed = 0;
  uint64_t step = 0;
};

struct SumSquaresParams {
  DType dtype = DType::Float32;  // float32 | bfloat16
  std::vector<const void*> data;
  std::vector<int64_t> numel;
  float* partials = nullptr;  // one per chunk: lion_num_chunks(numel) floats
};

struct LionFinalizeParams {
  const float* partials = nullptr;  // squared-norm partials (n_partials may be 0: no norm)
  int64_t n_partials = 0;
  float max_norm = 0.f;             // > 0: clip coefficient min(1, max_norm / (norm + 1e-6))
  const float* grad_scale = nullptr;  // optional: gradients are scaled by this (GradScaler)
  const float* found_inf = nullptr;   // optional: nonzero -> skip
  bool skip_nonfinite = false;        // skip when the norm is inf/NaN (needs n_partials > 0)
  float* aux = nullptr;               // out: [norm of the unscaled grads, grad multiplier, skip flag]
  int64_t* skipped_count = nullptr;   // optional: incremented when the step is skipped
};

inline int64_t lion_num_chunks(int64_t numel) { return (numel + kLionChunk - 1) / kLionChunk; }
inline int64_t lion_num_chunks(const std::vector<int64_t>& numel) {
  int64_t n = 0;
  for (int64_t x : numel) n += lion_num_chunks(x);
  return n;
}

// ---- shared scalar math (host and device) ----

// A bijective 32-bit integer mix with good avalanche (the "lowbias32" constants).
MPTK_HD uint32_t lion_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Per-chunk keys for the element hash. Two keys so that streams of different tensors/steps are
// not shifted copies of each other (a single xor key would make stream A's element i equal to
// stream B's element i ^ (kA ^ kB)).
struct LionRngKey {
  uint32_t k1, k2;
};
// stream: 0 for the parameter, 1 for the state.
MPTK_HD LionRngKey lion_rng_key(uint64_t seed, uint64_t step, uint32_t tensor, uint32_t stream, uint32_t elem_hi) {
  uint32_t k = lion_mix32(static_cast<uint32_t>(seed) ^ 0x9e3779b9U);
  k = lion_mix32(k ^ static_cast<uint32_t>(seed >> 32));
  k = lion_mix32(k ^ static_cast<uint32_t>(step));
  k = lion_mix32(k ^ static_cast<uint32_t>(step >> 32));
  k = lion_mix32(k ^ tensor);
  k = lion_mix32(k ^ (stream * 0x85ebca6bU));
  k = lion_mix32(k ^ elem_hi);
  return LionRngKey{k, lion_mix32(k ^ 0x27d4eb2fU)};
}
// One hash serves two neighbouring elements (half the integer work): element i takes the low 16
// bits (even i) or the high 16 bits (odd i) of the hash of its pair index i >> 1.
MPTK_HD uint32_t lion_rng_pair(LionRngKey key, uint32_t pair) {
  return lion_mix32(lion_mix32(pair ^ key.k1) ^ key.k2);
}
// 16 random bits for element `elem` (the full index; its upper half is already in the key).
MPTK_HD uint32_t lion_rng_bits(LionRngKey key, uint64_t elem) {
  const uint32_t h = lion_rng_pair(key, static_cast<uint32_t>(elem >> 1));
  return (elem & 1u) ? (h >> 16) : (h & 0xffffU);
}

MPTK_HD float lion_bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}
MPTK_HD uint32_t lion_float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}
MPTK_HD float lion_bf16_to_float(uint16_t h) { return lion_bits_to_float(static_cast<uint32_t>(h) << 16); }
// Round to nearest even; NaN stays a (quiet) NaN.
MPTK_HD uint16_t lion_float_to_bf16_rne(float f) {
  uint32_t u = lion_float_to_bits(f);
  if ((u & 0x7fffffffU) > 0x7f800000U) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffU + ((u >> 16) & 1U);
  return static_cast<uint16_t>(u >> 16);
}
// Stochastic rounding with 16 random bits; inf/NaN go through the deterministic path.
MPTK_HD uint16_t lion_float_to_bf16_sr(float f, uint32_t rnd) {
  uint32_t u = lion_float_to_bits(f);
  if ((u & 0x7f800000U) == 0x7f800000U) return lion_float_to_bf16_rne(f);
  return static_cast<uint16_t>((u + (rnd & 0xffffU)) >> 16);
}

// sign(c) with sign(+-0) = +-0 and sign(NaN) = NaN (unlike torch.sign's 0; see the top of this file).
MPTK_HD float lion_sign(float c) { return c > 0.f ? 1.f : (c < 0.f ? -1.f : c); }

// The update of one element, in this exact operation order on CPU (scalar and AVX2) and CUDA so
// all paths give identical bits. The decay term and the signed step are combined before they are
// added to p: both are tiny next to p, and one rounding of their sum loses less than two.
MPTK_HD void lion_update(float& p, float& m, float g, const LionHyper& h) {
  const float c = fmaf(h.beta1, m, h.one_minus_beta1 * g);
  const float s = lion_sign(c);
  p = p + fmaf(-h.decay, p, -h.lr * s);
  m = fmaf(h.beta2, m, h.one_minus_beta2 * g);
}

// The finalize arithmetic shared by both sides, given the squared norm (summed in double).
// torch.amp.GradScaler's inverse scale is float(1/double(scale)); torch.nn.utils.clip_grad_norm_'s
// coefficient is float32 max_norm / (norm + 1e-6) clamped to 1.
MPTK_HD void lion_finalize_math(double sumsq, const LionFinalizeParams& fp) {
  float norm = static_cast<float>(::sqrt(sumsq));
  float mult = 1.f;
  if (fp.grad_scale != nullptr) {
    const float inv_scale = static_cast<float>(1.0 / static_cast<double>(*fp.grad_scale));
    norm *= inv_scale;
    mult = inv_scale;
  }
  if (fp.n_partials > 0 && fp.max_norm > 0.f) {
    const float coef = fp.max_norm / (norm + 1e-6f);
    // torch's clamp(coef, max=1) keeps a NaN: a NaN norm makes every gradient NaN, as
    // clip_grad_norm_ leaves them (skip_nonfinite, the default with clipping, skips that step instead).
    mult *= (coef < 1.f || coef != coef) ? coef : 1.f;
  }
  bool skip = fp.found_inf != nullptr && *fp.found_inf != 0.f;
#if defined(__CUDA_ARCH__)
  const bool finite = isfinite(norm);
#else
  const bool finite = std::isfinite(norm);
#endif
  if (fp.skip_nonfinite && fp.n_partials > 0 && !finite) skip = true;
  fp.aux[0] = norm;
  fp.aux[1] = mult;
  fp.aux[2] = skip ? 1.f : 0.f;
  if (skip && fp.skipped_count != nullptr) *fp.skipped_count += 1;
}

// ---- entry points ----
// Host kernels (one OpenMP pass over all tensors).
void lion_step_cpu(const LionStepParams& p);
void sum_squares_cpu(const SumSquaresParams& p);
void lion_finalize_cpu(const LionFinalizeParams& p);

#ifdef MPTK_WITH_CUDA
// CUDA kernels on `stream`, asynchronous, no host synchronisation (the multiplier and skip flag
// are read on the device). lion_step_cuda issues one launch per kLionMaxTensorsPerLaunch tensors
// (and per kLionMaxHyperPerLaunch distinct parameter groups): the kernel-argument block is <= 4 KiB.
void lion_step_cuda(const LionStepParams& p, cudaStream_t stream);
void sum_squares_cuda(const SumSquaresParams& p, cudaStream_t stream);
void lion_finalize_cuda(const LionFinalizeParams& p, cudaStream_t stream);
int lion_cuda_max_tensors_per_launch();
int sum_squares_cuda_max_tensors_per_launch();
#endif

}  // namespace mptk
