// CUDA cross-entropy: the twin of cross_entropy_cpu.cpp (same per-row formulas, base-2 domain,
// float32 arithmetic; cross_entropy.h).
//
// Build/check one file:  nvcc -std=c++17 -O3 --expt-relaxed-constexpr -arch=sm_90a -Icsrc
//                        -DMPTK_WITH_CUDA -Xptxas -v -c csrc/loss/cross_entropy_cuda.cu
// Kernels (one 256-thread block per row; 16-byte packs when pointers, stride and vocab allow):
//   cross_entropy_fwd_kernel  each thread keeps an online (max, sum of 2^((x - max) * log2e)) pair
//                             over its packs (the row is read once from DRAM), the block merges the
//                             pairs; thread 0 writes lse and lse - x[target].
//   cross_entropy_bwd_kernel  dlogits = (2^((x - lse) * log2e) - [v == target]) * drow[row], one
//                             read of the row and one write.
// The shift is subtracted before the log2e scaling: x * log2e overflows float32 for |x| > ~2.36e38.
// Ignored rows are not read: the forward writes 0, the backward a zero row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "common/cuda_check.h"
#include "common/cuda_convert.cuh"
#include "common/error.h"
#include "loss/cross_entropy.h"

namespace mptk {
namespace {

constexpr int kThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;


template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// (m, s) pairs stand for s * e^m. m starts at -FLT_MAX, not -inf, so that a -inf logit adds
// 2^(-inf) = 0 instead of 2^(-inf - -inf) = NaN; a row of -inf ends at s = 0, lse = -inf.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float M = fmaxf(m, m2);
  s = s * exp2f((m - M) * kLog2e) + s2 * exp2f((m2 - M) * kLog2e);
  m = M;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) cross_entropy_fwd_kernel(CrossEntropyFwdParams p) {
  __shared__ float sm[kThreads / 32], ss[kThreads / 32];
  const int64_t row = blockIdx.x;
  const int64_t t = p.targets[row];
  if (t == p.ignore_index) {
    if (threadIdx.x == 0) p.loss[row] = 0.f, p.lse[row] = 0.f;
    return;
  }
  const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
  const int64_t npack = p.vocab / VEC;
  float m = -FLT_MAX, s = 0.f;
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < npack; j += kThreads) {
    const Pack<T, VEC> v = reinterpret_cast<const Pack<T, VEC>*>(x)[j];
    float xf[VEC], pm = -FLT_MAX;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      xf[e] = to_f(v.v[e]);
      pm = fmaxf(pm, xf[e]);  // a NaN is skipped here but reaches s below
    }
    if (pm > m) {
      s *= exp2f((m - pm) * kLog2e);
      m = pm;
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) s += exp2f((xf[e] - m) * kLog2e);
  }
  // Merge the pairs: the warp by shuffles, then the warps through shared memory.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) sm[warp] = m, ss[warp] = s;
  __syncthreads();
  if (warp == 0) {
    m = lane < kThreads / 32 ? sm[lane] : -FLT_MAX;
    s = lane < kThreads / 32 ? ss[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    if (lane == 0) {
      // A +inf logit made s NaN (2^(inf - inf)): lse NaN, as torch.
      const float lse = m + log2f(s) * kLn2;
      p.lse[row] = lse;
      p.loss[row] = (t < 0 || t >= p.vocab) ? __int_as_float(0x7fc00000) : lse - to_f(x[t]);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) cross_entropy_bwd_kernel(CrossEntropyBwdParams p) {
  const int64_t row = blockIdx.x;
  const int64_t t = p.targets[row];
  T* d = static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride;
  const int64_t npack = p.vocab / VEC;
  Pack<T, VEC> out;
  if (t == p.ignore_index || t < 0 || t >= p.vocab) {
    const float fill = t == p.ignore_index ? 0.f : __int_as_float(0x7fc00000);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out.v[e] = from_f<T>(fill);
    for (int64_t j = threadIdx.x; j < npack; j += kThreads) reinterpret_cast<Pack<T, VEC>*>(d)[j] = out;
    return;
  }
  const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
  const float g = p.drow[row], lse = p.lse[row];
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < npack; j += kThreads) {
    const Pack<T, VEC> v = reinterpret_cast<const Pack<T, VEC>*>(x)[j];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float prob = exp2f((to_f(v.v[e]) - lse) * kLog2e);
      out.v[e] = from_f<T>((j * VEC + e == t ? prob - 1.f : prob) * g);
    }
    reinterpret_cast<Pack<T, VEC>*>(d)[j] = out;
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
void launch_fwd(const CrossEntropyFwdParams& p, cudaStream_t stream) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const bool vec = p.vocab % V == 0 && p.row_stride % V == 0 && aligned16(p.logits);
  if (vec)
    cross_entropy_fwd_kernel<T, V><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  else
    cross_entropy_fwd_kernel<T, 1><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  MPTK_CUDA_CHECK_LAUNCH();
}

template <typename T>
void launch_bwd(const CrossEntropyBwdParams& p, cudaStream_t stream) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const bool vec = p.vocab % V == 0 && p.row_stride % V == 0 && p.dlogits_row_stride % V == 0 &&
                   aligned16(p.logits) && aligned16(p.dlogits);
  if (vec)
    cross_entropy_bwd_kernel<T, V><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  else
    cross_entropy_bwd_kernel<T, 1><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  MPTK_CUDA_CHECK_LAUNCH();
}

template <typename F>
void dispatch(DType dtype, F&& f) {
  if (dtype == DType::Float32) return f(float{});
  if (dtype == DType::BFloat16) return f(__nv_bfloat16{});
  if (dtype == DType::Float16) return f(__half{});
  MPTK_CHECK(false, "cross_entropy: unsupported dtype ", dtype_name(dtype));
}

}  // namespace

void cross_entropy_fwd_cuda(const CrossEntropyFwdParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  MPTK_CHECK(p.vocab > 0, "cross_entropy_fwd_cuda: vocab must be positive");
  MPTK_CHECK(p.rows < (int64_t{1} << 31), "cross_entropy_fwd_cuda: too many rows for one grid");
  dispatch(p.dtype, [&](auto t) { launch_fwd<decltype(t)>(p, stream); });
}

void cross_entropy_bwd_cuda(const CrossEntropyBwdParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  MPTK_CHECK(p.vocab > 0, "cross_entropy_bwd_cuda: vocab must be positive");
  MPTK_CHECK(p.rows < (int64_t{1} << 31), "cross_entropy_bwd_cuda: too many rows for one grid");
  dispatch(p.dtype, [&](auto t) { launch_bwd<decltype(t)>(p, stream); });
}

}  // namespace mptk
