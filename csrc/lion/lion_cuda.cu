// Fused multi-tensor Lion step, multi-tensor sum of squares and the clip/skip finalize, CUDA.
//
// Build one file alone (both architectures; read registers and spills):
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -arch=sm_80  -Icsrc -DMPTK_WITH_CUDA -Xptxas -v -c csrc/lion/lion_cuda.cu -o /tmp/l80.o
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -arch=sm_90a -Icsrc -DMPTK_WITH_CUDA -Xptxas -v -c csrc/lion/lion_cuda.cu -o /tmp/l90.o
// Kernels:
//   lion_step_kernel<P, G, M>   one block per (tensor, chunk) of kLionChunk elements; the tensor
//                               table (pointers, sizes, chunk prefix) travels in the kernel-argument
//                               block (<= 4 KiB, __grid_constant__, read through the constant cache);
//                               the block finds its tensor by binary search over the chunk prefix.
//                               16-byte vector loads/stores when p, g and m are 16-byte aligned.
//   sum_squares_kernel<T>       same mapping; one float partial per chunk (block tree reduction in a
//                               fixed order, so the result is deterministic).
//   lion_finalize_kernel        one block: sums the partials in double in a fixed order, then the
//                               clip coefficient / unscale multiplier / skip flag (lion_finalize_math).
// The per-element arithmetic (lion_update), the bf16 rounding and the RNG are the functions in
// lion.h that the CPU kernels use, so both produce the same bits.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/cuda_check.h"
#include "common/error.h"
#include "lion/lion.h"

namespace mptk {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxHyper = 8;
constexpr int kMaxTensors = 93;       // sizeof(LionLaunchArgs) <= 4096 (asserted below)
constexpr int kMaxNormTensors = 200;  // sizeof(SumSquaresLaunchArgs) <= 4096

struct LionLaunchArgs {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  void* exp_avg[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_start[kMaxTensors + 1];  // first chunk (block) of each tensor in this launch
  uint32_t rng_index[kMaxTensors];
  uint8_t hyper[kMaxTensors];
  LionHyper hyper_table[kMaxHyper];
  const float* grad_multiplier;
  const float* skip;
  uint64_t seed;
  uint64_t step;
  int32_t n_tensors;
};
static_assert(sizeof(LionLaunchArgs) <= 4096, "the Lion kernel-argument block must stay within 4 KiB");

struct SumSquaresLaunchArgs {
  const void* data[kMaxNormTensors];
  int64_t numel[kMaxNormTensors];
  int32_t chunk_start[kMaxNormTensors + 1];
  float* partials;  // this launch's first partial
  int32_t n_tensors;
};
static_assert(sizeof(SumSquaresLaunchArgs) <= 4096, "the sum-of-squares kernel-argument block must stay within 4 KiB");

using bf16_bits = uint16_t;

// Largest t with chunk_start[t] <= chunk (empty tensors are never put in a launch, so the prefix
// is strictly increasing). Every thread computes it: the loads are uniform constant-cache hits.
__device__ __forceinline__ int find_tensor(const int32_t* chunk_start, int n_tensors, int chunk) {
  int lo = 0, hi = n_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (chunk_start[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ float ld1(const float* p) { return *p; }
__device__ __forceinline__ float ld1(const bf16_bits* p) { return lion_bf16_to_float(*p); }
__device__ __forceinline__ void st1(float* p, float v, bool, LionRngKey, uint64_t) { *p = v; }
__device__ __forceinline__ void st1(bf16_bits* p, float v, bool sr, LionRngKey key, uint64_t elem) {
  *p = sr ? lion_float_to_bf16_sr(v, lion_rng_bits(key, elem)) : lion_float_to_bf16_rne(v);
}

// 8 consecutive elements: two 16-byte loads for float32, one for bfloat16.
__device__ __forceinline__ void ld8(const float* p, float (&x)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
  x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
}
__device__ __forceinline__ void ld8(const bf16_bits* p, float (&x)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    x[2 * k] = __uint_as_float(w[k] << 16);          // little endian: the low half is the first element
    x[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
  }
}
__device__ __forceinline__ void st8(float* p, const float (&x)[8], bool, LionRngKey, uint64_t) {
  reinterpret_cast<float4*>(p)[0] = make_float4(x[0], x[1], x[2], x[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(x[4], x[5], x[6], x[7]);
}
// elem is even (8-element groups from a chunk start), so elements 2k, 2k+1 share pair hash k.
__device__ __forceinline__ void st8(bf16_bits* p, const float (&x)[8], bool sr, LionRngKey key, uint64_t elem) {
  uint32_t w[4];
  const uint32_t pair0 = static_cast<uint32_t>(elem >> 1);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    uint32_t lo, hi;
    if (sr) {
      const uint32_t h = lion_rng_pair(key, pair0 + k);
      lo = lion_float_to_bf16_sr(x[2 * k], h & 0xffffu);
      hi = lion_float_to_bf16_sr(x[2 * k + 1], h >> 16);
    } else {
      lo = lion_float_to_bf16_rne(x[2 * k]);
      hi = lion_float_to_bf16_rne(x[2 * k + 1]);
    }
    w[k] = lo | (hi << 16);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename P, typename G, typename M>
__global__ void __launch_bounds__(kThreads) lion_step_kernel(const __grid_constant__ LionLaunchArgs a) {
  if (a.skip != nullptr && *a.skip != 0.f) return;  // non-finite gradients or GradScaler's found_inf
  const int t = find_tensor(a.chunk_start, a.n_tensors, blockIdx.x);
  const int64_t begin = static_cast<int64_t>(blockIdx.x - a.chunk_start[t]) * kLionChunk;
  const int64_t rest = a.numel[t] - begin;
  const int n = static_cast<int>(rest < kLionChunk ? rest : kLionChunk);
  const LionHyper h = a.hyper_table[a.hyper[t]];
  const float gmul = a.grad_multiplier != nullptr ? *a.grad_multiplier : 1.f;
  P* __restrict__ p = static_cast<P*>(a.param[t]) + begin;
  const G* __restrict__ g = static_cast<const G*>(a.grad[t]) + begin;
  M* __restrict__ m = static_cast<M*>(a.exp_avg[t]) + begin;
  const bool sr_p = sizeof(P) == 2 && h.stochastic_rounding;
  const bool sr_m = sizeof(M) == 2 && h.stochastic_rounding;
  const uint32_t elem_hi = static_cast<uint32_t>(static_cast<uint64_t>(begin) >> 32);
  const uint64_t elem0 = static_cast<uint64_t>(begin);
  LionRngKey key_p{0u, 0u}, key_m{0u, 0u};
  if (sr_p) key_p = lion_rng_key(a.seed, a.step, a.rng_index[t], 0, elem_hi);
  if (sr_m) key_m = lion_rng_key(a.seed, a.step, a.rng_index[t], 1, elem_hi);

  int tail_start = 0;
  const bool aligned = ((reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g) |
                         reinterpret_cast<uintptr_t>(m)) & 15u) == 0;
  if (aligned) {
    const int n8 = n >> 3;
    for (int v = threadIdx.x; v < n8; v += kThreads) {
      const int i = v << 3;
      float pv[8], gv[8], mv[8];
      ld8(g + i, gv);
      ld8(m + i, mv);
      ld8(p + i, pv);
#pragma unroll
      for (int k = 0; k < 8; ++k) lion_update(pv[k], mv[k], gv[k] * gmul, h);
      st8(p + i, pv, sr_p, key_p, elem0 + i);
      st8(m + i, mv, sr_m, key_m, elem0 + i);
    }
    tail_start = n8 << 3;
  }
  for (int i = tail_start + threadIdx.x; i < n; i += kThreads) {
    float pv = ld1(p + i), mv = ld1(m + i);
    lion_update(pv, mv, ld1(g + i) * gmul, h);
    st1(p + i, pv, sr_p, key_p, elem0 + i);
    st1(m + i, mv, sr_m, key_m, elem0 + i);
  }
}

// Deterministic block sum: fixed shuffle pattern, then warp 0 adds the warp totals in order.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += smem[w];
  return total;  // valid in thread 0 only
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sum_squares_kernel(const __grid_constant__ SumSquaresLaunchArgs a) {
  __shared__ float smem[kThreads / 32];
  const int t = find_tensor(a.chunk_start, a.n_tensors, blockIdx.x);
  const int64_t begin = static_cast<int64_t>(blockIdx.x - a.chunk_start[t]) * kLionChunk;
  const int64_t rest = a.numel[t] - begin;
  const int n = static_cast<int>(rest < kLionChunk ? rest : kLionChunk);
  const T* x = static_cast<const T*>(a.data[t]) + begin;
  float acc = 0.f;
  int tail_start = 0;
  if ((reinterpret_cast<uintptr_t>(x) & 15u) == 0) {
    const int n8 = n >> 3;
    for (int v = threadIdx.x; v < n8; v += kThreads) {
      float xv[8];
      ld8(x + (v << 3), xv);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc = fmaf(xv[k], xv[k], acc);
    }
    tail_start = n8 << 3;
  }
  for (int i = tail_start + threadIdx.x; i < n; i += kThreads) {
    const float v = ld1(x + i);
    acc = fmaf(v, v, acc);
  }
  const float total = block_sum(acc, smem);
  if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
}

__global__ void __launch_bounds__(kThreads) lion_finalize_kernel(const LionFinalizeParams fp) {
  __shared__ double smem[kThreads / 32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < fp.n_partials; i += kThreads) s += static_cast<double>(fp.partials[i]);
  const double total = block_sum(s, smem);
  if (threadIdx.x == 0) lion_finalize_math(total, fp);
}

template <typename P, typename G, typename M>
void launch_lion(const LionLaunchArgs& a, int blocks, cudaStream_t stream) {
  lion_step_kernel<P, G, M><<<blocks, kThreads, 0, stream>>>(a);
  MPTK_CUDA_CHECK_LAUNCH();
}

void launch_lion_dispatch(const LionStepParams& sp, const LionLaunchArgs& a, int blocks, cudaStream_t stream) {
  const bool pf = sp.param_dtype == DType::Float32, gf = sp.grad_dtype == DType::Float32,
             mf = sp.state_dtype == DType::Float32;
  if (pf && gf && mf) return launch_lion<float, float, float>(a, blocks, stream);
  if (pf && gf && !mf) return launch_lion<float, float, bf16_bits>(a, blocks, stream);
  if (pf && !gf && mf) return launch_lion<float, bf16_bits, float>(a, blocks, stream);
  if (pf && !gf && !mf) return launch_lion<float, bf16_bits, bf16_bits>(a, blocks, stream);
  if (!pf && gf && mf) return launch_lion<bf16_bits, float, float>(a, blocks, stream);
  if (!pf && gf && !mf) return launch_lion<bf16_bits, float, bf16_bits>(a, blocks, stream);
  if (!pf && !gf && mf) return launch_lion<bf16_bits, bf16_bits, float>(a, blocks, stream);
  return launch_lion<bf16_bits, bf16_bits, bf16_bits>(a, blocks, stream);
}

constexpr int64_t kMaxBlocksPerLaunch = 0x7fffffff;

}  // namespace

int lion_cuda_max_tensors_per_launch() { return kMaxTensors; }
int sum_squares_cuda_max_tensors_per_launch() { return kMaxNormTensors; }

void lion_step_cuda(const LionStepParams& sp, cudaStream_t stream) {
  if (sp.tensors.empty()) return;
  LionLaunchArgs a{};
  std::vector<int> slot_of(sp.hyper.size(), -1);  // global hyper index -> slot in this launch
  int n_slots = 0;
  int64_t blocks = 0;
  auto flush = [&]() {
    if (a.n_tensors == 0) return;
    a.chunk_start[a.n_tensors] = static_cast<int32_t>(blocks);
    launch_lion_dispatch(sp, a, static_cast<int>(blocks), stream);
    a.n_tensors = 0;
    blocks = 0;
    n_slots = 0;
    std::fill(slot_of.begin(), slot_of.end(), -1);
  };
  a.grad_multiplier = sp.grad_multiplier;
  a.skip = sp.skip;
  a.seed = sp.seed;
  a.step = sp.step;
  for (const LionTensor& t : sp.tensors) {
    MPTK_CHECK(t.numel > 0, "empty tensors must be filtered out before the launch");
    const int64_t chunks = lion_num_chunks(t.numel);
    const bool new_slot = slot_of[t.hyper] < 0;
    if (a.n_tensors == kMaxTensors || (new_slot && n_slots == kMaxHyper) || blocks + chunks > kMaxBlocksPerLaunch)
      flush();
    if (slot_of[t.hyper] < 0) {
      slot_of[t.hyper] = n_slots;
      a.hyper_table[n_slots++] = sp.hyper[t.hyper];
    }
    const int i = a.n_tensors++;
    a.param[i] = t.param;
    a.grad[i] = t.grad;
    a.exp_avg[i] = t.exp_avg;
    a.numel[i] = t.numel;
    a.chunk_start[i] = static_cast<int32_t>(blocks);
    a.rng_index[i] = t.rng_index;
    a.hyper[i] = static_cast<uint8_t>(slot_of[t.hyper]);
    blocks += chunks;
  }
  flush();
}

void sum_squares_cuda(const SumSquaresParams& sp, cudaStream_t stream) {
  SumSquaresLaunchArgs a{};
  int64_t blocks = 0, done = 0;  // done: partials written by earlier launches
  auto flush = [&]() {
    if (a.n_tensors == 0) return;
    a.chunk_start[a.n_tensors] = static_cast<int32_t>(blocks);
    a.partials = sp.partials + done;
    if (sp.dtype == DType::Float32)
      sum_squares_kernel<float><<<static_cast<int>(blocks), kThreads, 0, stream>>>(a);
    else
      sum_squares_kernel<bf16_bits><<<static_cast<int>(blocks), kThreads, 0, stream>>>(a);
    MPTK_CUDA_CHECK_LAUNCH();
    done += blocks;
    a.n_tensors = 0;
    blocks = 0;
  };
  for (size_t k = 0; k < sp.data.size(); ++k) {
    MPTK_CHECK(sp.numel[k] > 0, "empty tensors must be filtered out before the launch");
    const int64_t chunks = lion_num_chunks(sp.numel[k]);
    if (a.n_tensors == kMaxNormTensors || blocks + chunks > kMaxBlocksPerLaunch) flush();
    const int i = a.n_tensors++;
    a.data[i] = sp.data[k];
    a.numel[i] = sp.numel[k];
    a.chunk_start[i] = static_cast<int32_t>(blocks);
    blocks += chunks;
  }
  flush();
}

void lion_finalize_cuda(const LionFinalizeParams& fp, cudaStream_t stream) {
  lion_finalize_kernel<<<1, kThreads, 0, stream>>>(fp);
  MPTK_CUDA_CHECK_LAUNCH();
}

}  // namespace mptk
