// Kernels with planted shared-memory bugs, each next to its fixed twin, for the emulator's own tests
// (tests/test_cuda_emulated.py, test_racecheck_*): under MPTK_EMU_RACECHECK the buggy ones must be
// reported and the fixed ones must not. Compiled into _C_emu only (tests/cuda_emu/build.py), called
// through _C_emu._emu_selftest(name, fixed).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/attention_cuda_mma.cuh"

namespace mptk_emu_selftest {
using mptk::attn_cuda::cp_async_16;
using mptk::attn_cuda::cp_async_commit;
using mptk::attn_cuda::cp_async_wait;
using mptk::attn_cuda::ldmatrix_x4;
using mptk::attn_cuda::smem_addr;

constexpr int kThreads = 64;  // two warps
constexpr int kBlocks = 2;    // every block's shared memory starts over

// Read-after-write: each thread reads the element a thread of the other warp wrote.
__global__ void exchange(float* out, bool fixed) {
  extern __shared__ __align__(16) float s[];
  const int t = threadIdx.x;
  s[t] = t + 1.0f;
  if (fixed) __syncthreads();
  out[blockIdx.x * kThreads + t] = s[t ^ 32];
}

// Write-after-read: a thread overwrites its element while the other warp may still be reading it.
__global__ void overwrite_read(float* out, bool fixed) {
  extern __shared__ __align__(16) float s[];
  const int t = threadIdx.x;
  s[t] = t + 1.0f;
  __syncthreads();
  const float v = s[t ^ 32];
  if (fixed) __syncthreads();
  s[t] = 0.0f;
  out[blockIdx.x * kThreads + t] = v;
}

// Write-after-write: lane 0 of both warps writes one slot (fixed: a slot per warp).
__global__ void same_slot(float* out, bool fixed) {
  extern __shared__ __align__(16) float s[];
  const int t = threadIdx.x;
  if (t % 32 == 0) s[fixed ? t / 32 : 0] = t + 1.0f;
  __syncthreads();
  out[blockIdx.x * kThreads + t] = s[0];
}

// Within one warp: a lane reads its neighbour's element; fixed, a warp collective lies between.
__global__ void within_warp(float* out, bool fixed) {
  extern __shared__ __align__(16) float s[];
  const int t = threadIdx.x;
  s[t] = t + 1.0f;
  float v = 1.0f;
  if (fixed) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[blockIdx.x * kThreads + t] = s[t ^ 1] * v;
}

// A static shared-memory array, read-after-write across warps.
__global__ void static_exchange(float* out, bool fixed) {
  __shared__ float st[kThreads];
  const int t = threadIdx.x;
  st[t] = t + 1.0f;
  if (fixed) __syncthreads();
  out[blockIdx.x * kThreads + t] = st[t ^ 32];
}

// cp.async: another thread's 16-byte chunk read after the copy is waited for but with no barrier
// (fixed: wait_group, then __syncthreads).
__global__ void async_read(const float* in, float* out, bool fixed) {
  extern __shared__ __align__(16) float s[];
  const int t = threadIdx.x;
  cp_async_16(smem_addr(s + 4 * t), in + 4 * t, true);
  cp_async_commit();
  cp_async_wait<0>();
  if (fixed) __syncthreads();
  out[blockIdx.x * kThreads + t] = s[4 * (t ^ 32)];
}

// cp.async: a thread reads another thread's chunk while that copy is still in flight (fixed: waited
// and a barrier first). The emulator's poisoning shows this one as NaN too; racecheck names it.
__global__ void async_in_flight(const float* in, float* out, bool fixed) {
  extern __shared__ __align__(16) float s[];
  const int t = threadIdx.x;
  cp_async_16(smem_addr(s + 4 * t), in + 4 * t, true);
  cp_async_commit();
  if (fixed) {
    cp_async_wait<0>();
    __syncthreads();
  }
  const float v = s[4 * (t ^ 32)];
  cp_async_wait<0>();
  out[blockIdx.x * kThreads + t] = v;
}

// cp.async into a chunk the other warp is still reading (the next stage's prefetch into a buffer
// before the barrier that ends its reads; fixed: the barrier).
__global__ void async_overwrite(const float* in, float* out, bool fixed) {
  extern __shared__ __align__(16) float s[];
  const int t = threadIdx.x;
  for (int i = 0; i < 4; ++i) s[4 * t + i] = t + 1.0f;
  __syncthreads();
  const float v = s[4 * (t ^ 32)];
  if (fixed) __syncthreads();
  cp_async_16(smem_addr(s + 4 * t), in + 4 * t, true);
  cp_async_commit();
  cp_async_wait<0>();
  out[blockIdx.x * kThreads + t] = v + s[4 * t];
}

// ldmatrix: warp 0 loads four 8x8 bf16 matrices that warp 1 stored (fixed: a barrier between).
__global__ void ldmatrix_other_warp(float* out, bool fixed) {
  extern __shared__ __align__(16) float s[];
  const int t = threadIdx.x, lane = t % 32;
  if (t >= 32) {  // warp 1: row `lane` of the 32 rows of 16 bytes
    const uint32_t x = 0x3F803F80u + static_cast<uint32_t>(lane);  // two bfloat16 near 1
    reinterpret_cast<uint4*>(s)[lane] = make_uint4(x, x, x, x);
  }
  if (fixed) __syncthreads();
  float v = 0.0f;
  if (t < 32) {
    uint32_t r[4];
    ldmatrix_x4(r, smem_addr(s) + 16 * lane);
    v = static_cast<float>(r[0] & 0xFFFFu);
  }
  out[blockIdx.x * kThreads + t] = v;
}

// Global memory, across blocks: both blocks write the same 64 outputs (fixed: a row per block).
__global__ void global_overlap(float* out, bool fixed) {
  const int t = threadIdx.x;
  out[(fixed ? blockIdx.x * kThreads : 0) + t] = t + 1.0f;
}

// Global memory: a block reads what the other block writes in the same launch (fixed: its own row,
// after a barrier; within a block __syncthreads orders global memory too).
__global__ void global_other_block(float* out, bool fixed) {
  const int t = threadIdx.x, b = blockIdx.x;
  out[b * kThreads + t] = t + 1.0f;
  __syncthreads();
  const float v = out[(fixed ? b : 1 - b) * kThreads + (t ^ 32)];
  __syncthreads();
  out[b * kThreads + t] = v;
}

// Atomics: every block adds into the same 64 sums (clean); buggy, each thread also reads its sum back
// while other blocks may still be adding.
__global__ void global_atomic(float* out, bool fixed) {
  const int t = threadIdx.x;
  atomicAdd(out + t, 1.0f);
  if (!fixed) out[kThreads + t] = out[t];
}

// Atomics again, the read back only in the last block: it follows its own add, but not the other
// block's (fixed: no read back).
__global__ void global_atomic_last_block(float* out, bool fixed) {
  const int t = threadIdx.x;
  atomicAdd(out + t, 1.0f);
  if (!fixed && blockIdx.x == gridDim.x - 1) out[kThreads + t] = out[t];
}

template <typename K, typename... A>
void launch(K kernel, A... args) {
  kernel<<<kBlocks, kThreads, 1024>>>(args...);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("selftest launch: ") + cudaGetErrorString(e));
}

}  // namespace mptk_emu_selftest

// Runs one planted case (its fixed twin when `fixed`); returns the kernel's output. An emulator finding
// (a racecheck report, a deadlock) propagates as the launch's exception.
std::vector<float> mptk_emu_selftest_run(const std::string& name, bool fixed) {
  using namespace mptk_emu_selftest;
  std::vector<float> in(4 * kThreads), out(kBlocks * kThreads, -1.0f);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i) * 0.5f;
  if (name == "exchange") launch(exchange, out.data(), fixed);
  else if (name == "overwrite_read") launch(overwrite_read, out.data(), fixed);
  else if (name == "same_slot") launch(same_slot, out.data(), fixed);
  else if (name == "within_warp") launch(within_warp, out.data(), fixed);
  else if (name == "static_exchange") launch(static_exchange, out.data(), fixed);
  else if (name == "async_read") launch(async_read, static_cast<const float*>(in.data()), out.data(), fixed);
  else if (name == "async_in_flight") launch(async_in_flight, static_cast<const float*>(in.data()), out.data(), fixed);
  else if (name == "async_overwrite") launch(async_overwrite, static_cast<const float*>(in.data()), out.data(), fixed);
  else if (name == "ldmatrix_other_warp") launch(ldmatrix_other_warp, out.data(), fixed);
  else if (name == "global_overlap") launch(global_overlap, out.data(), fixed);
  else if (name == "global_other_block") launch(global_other_block, out.data(), fixed);
  else if (name == "global_atomic") launch(global_atomic, out.data(), fixed);
  else if (name == "global_atomic_last_block") launch(global_atomic_last_block, out.data(), fixed);
  else throw std::invalid_argument("unknown selftest " + name);
  return out;
}
