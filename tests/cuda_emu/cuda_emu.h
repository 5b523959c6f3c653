// A host emulator for the project's CUDA kernels: the real .cu sources, compiled by g++ and run on
// the CPU, one fiber per CUDA thread (tests/cuda_emu/README.md). Included first into every
// translation unit of the emulated build (tests/cuda_emu/build.py), and through the stub headers
// cuda_runtime.h / cuda_fp16.h / cuda_bf16.h of tests/cuda_emu/include.
//
// What it models: blocks run one after another; the threads of a block are cooperative fibers that
// switch only at __syncthreads and at warp-collective operations (shuffles, ldmatrix, mma), in an
// order set by MPTK_EMU_SCHEDULE (0: lockstep; 1: warp at a time, one warp running ahead to its next
// barrier; others seeded shuffles of either: cuda_emu.cpp, run_block), so a missing barrier changes
// results between schedules. Shared memory is poisoned (0xFF bytes: NaN
// in float32, float16 and bfloat16) at every block start; cp.async copies land only at the
// cp.async.wait_group that retires them, their destinations poisoned until then. Warp collectives
// check that all 32 lanes take part in the same operation; a barrier nobody can pass, a launch the
// hardware refuses (block size, grid limits, dynamic shared memory above 48 KiB without the
// attribute) and misaligned or out-of-range ldmatrix/cp.async addresses are reported as errors.
// The racecheck build (MPTK_EMU_RACECHECK, cuda_emu.cpp's race::) also checks every shared-memory
// access for hazards between threads not ordered by a barrier or, within a warp, a warp collective.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <typeinfo>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
#define MPTK_CUDA_EMU 1

// ---- vector types ----
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ---- 16-bit floating types (storage only; conversions round to nearest even) ----
struct __half { uint16_t __x; };
struct __nv_bfloat16 { uint16_t __x; };
struct alignas(4) __half2 { __half x, y; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };

namespace mptk_emu {
template <typename To, typename From>
inline To bitcast(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bitcast size");
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}
// Inline: the emulated mma converts two operands per product, so this is on the hot path.
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) return bitcast<float>(sign | bitcast<uint32_t>(static_cast<float>(m) * 5.9604644775390625e-08f));  // m 2^-24, exact
  if (e == 31) return bitcast<float>(sign | 0x7F800000u | (m << 13));
  return bitcast<float>(sign | ((e + 112) << 23) | (m << 13));
}
uint16_t float_to_half_bits(float f);
}  // namespace mptk_emu

inline float __half2float(__half h) { return mptk_emu::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half{mptk_emu::float_to_half_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return mptk_emu::bitcast<float>(static_cast<uint32_t>(b.__x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = mptk_emu::bitcast<uint32_t>(f);
  if (std::isnan(f)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet NaN, sign kept
  u += 0x7FFFu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

// ---- math intrinsics ----
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;  // never contracted into an fma, as on the device
  return r;
}
inline float __log2f(float x) { return std::log2(x); }
inline float __uint_as_float(unsigned u) { return mptk_emu::bitcast<float>(u); }
inline float __int_as_float(int i) { return mptk_emu::bitcast<float>(i); }
inline unsigned __float_as_uint(float f) { return mptk_emu::bitcast<unsigned>(f); }
inline int __float_as_int(float f) { return mptk_emu::bitcast<int>(f); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// CUDA's integer min/max overloads (device code calls them unqualified)
#define MPTK_EMU_MINMAX(T)                           \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
MPTK_EMU_MINMAX(int)
MPTK_EMU_MINMAX(unsigned)
MPTK_EMU_MINMAX(long)
MPTK_EMU_MINMAX(unsigned long)
MPTK_EMU_MINMAX(long long)
MPTK_EMU_MINMAX(unsigned long long)
#undef MPTK_EMU_MINMAX

// ---- runtime API (what the project's host code calls) ----
typedef int cudaError_t;
enum : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace mptk_emu {
const char* error_string(cudaError_t e);
cudaError_t take_last_error();
cudaError_t device_attribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value);
int occupancy(const void* func, int block_size, size_t dynamic_smem);
}  // namespace mptk_emu

inline const char* cudaGetErrorString(cudaError_t e) { return mptk_emu::error_string(e); }
inline cudaError_t cudaGetLastError() { return mptk_emu::take_last_error(); }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int dev) {
  return mptk_emu::device_attribute(v, a, dev);
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return mptk_emu::func_set_attribute(reinterpret_cast<const void*>(func), attr, value);
}
template <typename F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F* func, int block_size, size_t smem) {
  *n = mptk_emu::occupancy(reinterpret_cast<const void*>(func), block_size, smem);
  return cudaSuccess;
}

// ---- execution model ----
namespace mptk_emu {

struct ThreadState;  // one fiber
extern thread_local ThreadState* g_thread;  // the running fiber
extern thread_local dim3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;

// Runs `body` once per thread of every block of the grid (the launch's configuration checked first;
// a refused launch sets the error cudaGetLastError returns, as the runtime does).
void run_grid(const void* func, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body);

template <typename K>
struct Launcher {
  K kernel;
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A... args) const {  // arguments by value, as a kernel launch copies them
    K k = kernel;
    run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { k(args...); });
  }
};
template <typename K>
inline Launcher<K> launcher(K kernel, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launcher<K>{kernel, grid, block, smem};
}

void syncthreads();
unsigned char* dynamic_smem();
size_t dynamic_smem_size();
void* static_smem(int site, size_t bytes, size_t align, const std::type_info& type);
template <typename T>
inline T& static_smem_var(int site) {
  return *static_cast<T*>(static_smem(site, sizeof(T), alignof(T), typeid(T)));
}

// Warp collectives: every lane of the warp deposits `bytes` of input, all wait, then `out` gets
// the whole warp's deposits (32 x slot bytes, lane-major). `op` names the operation: lanes of one
// warp calling different ones (or fewer than 32 lanes) is an error.
void warp_exchange(const char* op, const void* in, size_t bytes, void* all_out);
int lane_id();

void fail(const char* fmt, ...);

// cp.async model
void cp_async_16(uint32_t smem_offset, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int newest_pending_allowed);

void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_offset, bool trans);
void mma_16816_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void mma_16816_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <typename T>
inline T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  uint64_t all[32];
  uint64_t mine = 0;
  std::memcpy(&mine, &v, sizeof(T));
  warp_exchange("shfl_xor", &mine, sizeof(mine), all);
  T out;
  std::memcpy(&out, &all[(lane_id() ^ lane_mask) & 31], sizeof(T));
  return out;
}
}  // namespace mptk_emu

#define threadIdx (::mptk_emu::g_thread_idx)
#define blockIdx (::mptk_emu::g_block_idx)
#define blockDim (::mptk_emu::g_block_dim)
#define gridDim (::mptk_emu::g_grid_dim)

inline void __syncthreads() { mptk_emu::syncthreads(); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  if (mask != 0xffffffffu) mptk_emu::fail("__shfl_xor_sync: partial mask %08x is not modelled", mask);
  return mptk_emu::shfl_xor(v, lane_mask);
}
#if MPTK_EMU_RACECHECK
namespace mptk_emu {
float atomic_add_f32(float* p, float v);  // the add, recorded as atomic for racecheck
}
inline float atomicAdd(float* p, float v) { return mptk_emu::atomic_add_f32(p, v); }
#else
inline float atomicAdd(float* p, float v) {  // fibers switch only at barriers: a plain add is atomic
  const float old = *p;
  *p = old + v;
  return old;
}
#endif
inline size_t __cvta_generic_to_shared(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = mptk_emu::dynamic_smem();
  if (c < base || c > base + mptk_emu::dynamic_smem_size())
    mptk_emu::fail("__cvta_generic_to_shared: pointer outside the block's dynamic shared memory");
  return static_cast<size_t>(c - base);
}
