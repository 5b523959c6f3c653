// CUDA LayerNorm: the twin of layernorm_cpu.cpp (same per-row math, same partial-row scheme for
// the weight/bias gradients; see layernorm.h).
//
// Build/check one file:  nvcc -std=c++17 -O3 --expt-relaxed-constexpr -arch=sm_90a -Icsrc
//                        -DMPTK_WITH_CUDA -Xptxas -v -c csrc/layernorm/layernorm_cuda.cu
// Kernels:
//   layer_norm_fwd_kernel   a "row group" of threads per row: one warp (4 rows per 128-thread block)
//                           when the row fits in 32 threads' registers, else the whole block (up to
//                           512 threads). The row is held in registers as 16-byte packs between the
//                           mean, variance and output passes; rows too wide for that re-read global
//                           memory (L2) instead. Scalar (VEC = 1) variant when pointers, strides or
//                           the hidden size do not allow 16-byte accesses.
//   layer_norm_bwd_kernel   same row groups; group g takes rows g, g + G, ...; per-thread float32
//                           accumulators of dy * xhat and dy for the columns the thread owns (kept in
//                           registers across rows, written once to the group's partial rows of the
//                           workspace; rows too wide for that accumulate there in place instead).
//   layer_norm_reduce_partials_kernel   sums the partial rows in index order (deterministic).
// The backward's g = dy * w is rounded (__fmul_rn, never fused) the same way wherever it is used, so
// mean(g) cancels g exactly on constant rows (hidden 1) instead of leaving rstd times a rounding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/cuda_check.h"
#include "common/cuda_convert.cuh"
#include "common/error.h"
#include "layernorm/layernorm.h"

namespace mptk {
namespace {

constexpr int kMaxThreads = 512;  // per block; with __launch_bounds__ this caps registers at 128
// Backward: float32 accumulators of dweight and dbias for each owned column stay in registers
// across rows: 32 columns per thread (2 x 32 registers) covers rows of up to 512 x 32 = 16384
// elements. Fewer where ptxas would otherwise spill under the 128-register cap: 24 when a 16-bit
// row meets float32 weights or a float32 h (mixed: twice the registers per loaded pack), 8 for the
// scalar fallback (its unrolled per-element address arithmetic).
template <typename TH, typename TY, typename WT, int VEC>
constexpr int bwd_max_vecs() {
  return VEC == 1 ? 8 : (sizeof(WT) > sizeof(TY) || sizeof(TH) > sizeof(TY) ? 24 / VEC : 32 / VEC);
}
constexpr int kWarpRowsPerBlock = 4;


// v as To: a no-op for To == From (the uniform modes keep their instructions), else via float32.
template <typename To, typename From>
__device__ __forceinline__ To cvt(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else {
    return from_f<To>(to_f(v));
  }
}

// N elements moved as one (or, for 32-byte float packs of a 16-bit row, two) 16-byte accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N <= 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* base, int64_t j) {
  return reinterpret_cast<const Pack<T, N>*>(base)[j];
}
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* base, int64_t j, const Pack<T, N>& v) {
  reinterpret_cast<Pack<T, N>*>(base)[j] = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // butterfly: every lane adds the same pairs, so every lane holds the same total
}

// Sum over the row group (tpr = 32: the warp; tpr = blockDim.x: the block). Same result in every
// thread of the group, in a fixed order.
__device__ __forceinline__ float group_sum(float v, int tpr, float* red) {
  v = warp_sum(v);
  if (tpr == 32) return v;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();  // the previous reduction's readers are done with red
  if (lane == 0) red[warp] = v;
  __syncthreads();
  return warp_sum(lane < nw ? red[lane] : 0.f);
}

__device__ __forceinline__ float2 group_sum2(float a, float b, int tpr, float2* red) {
  a = warp_sum(a);
  b = warp_sum(b);
  if (tpr == 32) return make_float2(a, b);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = make_float2(a, b);
  __syncthreads();
  float2 t = lane < nw ? red[lane] : make_float2(0.f, 0.f);
  return make_float2(warp_sum(t.x), warp_sum(t.y));
}

// TX, TH, TY: x, h (residual and residual_out), y. All equal, or TH float with a 16-bit TY and TX
// float or TY (mixed, layernorm.h). Without a residual h is x itself (TX == TH).
template <typename TX, typename TH, typename TY, typename WT, int VEC, int MAX_VECS>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_fwd_kernel(LayerNormFwdParams p, int tpr) {
  __shared__ float red[32];
  const int lane = threadIdx.x % tpr, group = threadIdx.x / tpr, groups = blockDim.x / tpr;
  const int64_t H = p.hidden, nvec = H / VEC;
  const float inv_h = 1.f / static_cast<float>(H);
  const bool cached = nvec <= static_cast<int64_t>(tpr) * MAX_VECS;
  const WT* w = static_cast<const WT*>(p.weight);
  const WT* b = static_cast<const WT*>(p.bias);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * groups + group; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * groups) {
    const TX* x = static_cast<const TX*>(p.x) + row * p.x_row_stride;
    const TH* res = p.residual ? static_cast<const TH*>(p.residual) + row * p.residual_row_stride : nullptr;
    TH* hout = p.residual_out ? static_cast<TH*>(p.residual_out) + row * p.residual_out_row_stride : nullptr;
    TY* y = static_cast<TY*>(p.y) + row * p.y_row_stride;
    float mean, rstd;
    if (cached) {
      Pack<TH, VEC> v[MAX_VECS];
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < MAX_VECS; ++k) {
        const int64_t j = lane + static_cast<int64_t>(k) * tpr;
        if (j < nvec) {
          const Pack<TX, VEC> xv = load_pack<TX, VEC>(x, j);
          if (res) {
            Pack<TH, VEC> r = load_pack<TH, VEC>(res, j);
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[k].v[e] = from_f<TH>(to_f(xv.v[e]) + to_f(r.v[e]));
            store_pack<TH, VEC>(hout, j, v[k]);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[k].v[e] = cvt<TH>(xv.v[e]);  // TX == TH here
          }
#pragma unroll
          for (int e = 0; e < VEC; ++e) sum += to_f(v[k].v[e]);
        }
      }
      mean = group_sum(sum, tpr, red) * inv_h;
      float sq = 0.f;
#pragma unroll
      for (int k = 0; k < MAX_VECS; ++k) {
        if (lane + static_cast<int64_t>(k) * tpr < nvec) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float d = to_f(v[k].v[e]) - mean;
            sq += d * d;
          }
        }
      }
      rstd = 1.f / sqrtf(group_sum(sq, tpr, red) * inv_h + p.eps);
#pragma unroll
      for (int k = 0; k < MAX_VECS; ++k) {
        const int64_t j = lane + static_cast<int64_t>(k) * tpr;
        if (j < nvec) {
          Pack<WT, VEC> wv = load_pack<WT, VEC>(w, j), bv;
          if (b) bv = load_pack<WT, VEC>(b, j);
          Pack<TY, VEC> out;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float xhat = (to_f(v[k].v[e]) - mean) * rstd;
            out.v[e] = from_f<TY>(fmaf(xhat, to_f(wv.v[e]), b ? to_f(bv.v[e]) : 0.f));
          }
          store_pack<TY, VEC>(y, j, out);
        }
      }
    } else {
      // Row too wide for registers: three passes, the later two re-reading it from L2.
      float sum = 0.f;
      for (int64_t j = lane; j < nvec; j += tpr) {
        const Pack<TX, VEC> xv = load_pack<TX, VEC>(x, j);
        if (res) {
          Pack<TH, VEC> r = load_pack<TH, VEC>(res, j), v;
#pragma unroll
          for (int e = 0; e < VEC; ++e) v.v[e] = from_f<TH>(to_f(xv.v[e]) + to_f(r.v[e]));
          store_pack<TH, VEC>(hout, j, v);  // read back below by this same thread
#pragma unroll
          for (int e = 0; e < VEC; ++e) sum += to_f(v.v[e]);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) sum += to_f(xv.v[e]);
        }
      }
      const TH* h = res ? hout : reinterpret_cast<const TH*>(x);  // no residual: TX == TH
      mean = group_sum(sum, tpr, red) * inv_h;
      float sq = 0.f;
      for (int64_t j = lane; j < nvec; j += tpr) {
        Pack<TH, VEC> v = load_pack<TH, VEC>(h, j);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float d = to_f(v.v[e]) - mean;
          sq += d * d;
        }
      }
      rstd = 1.f / sqrtf(group_sum(sq, tpr, red) * inv_h + p.eps);
      for (int64_t j = lane; j < nvec; j += tpr) {
        Pack<TH, VEC> v = load_pack<TH, VEC>(h, j);
        Pack<TY, VEC> out;
        Pack<WT, VEC> wv = load_pack<WT, VEC>(w, j), bv;
        if (b) bv = load_pack<WT, VEC>(b, j);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float xhat = (to_f(v.v[e]) - mean) * rstd;
          out.v[e] = from_f<TY>(fmaf(xhat, to_f(wv.v[e]), b ? to_f(bv.v[e]) : 0.f));
        }
        store_pack<TY, VEC>(y, j, out);
      }
    }
    if (lane == 0) {
      if (p.mean) p.mean[row] = mean;
      if (p.rstd) p.rstd[row] = rstd;
    }
  }
}

// TH: h, dresidual_out, dh; TY: dy and the optional dx (TY == TH, or TH float and TY 16-bit).
template <typename TH, typename TY, typename WT, int VEC, int MAX_VECS>
__global__ void __launch_bounds__(kMaxThreads, 1) layer_norm_bwd_kernel(LayerNormBwdParams p, int tpr) {
  constexpr bool kMixed = !std::is_same_v<TH, TY>;  // only then may dx be set
  __shared__ float2 red[32];
  const int lane = threadIdx.x % tpr, group = threadIdx.x / tpr, groups = blockDim.x / tpr;
  const int64_t H = p.hidden, nvec = H / VEC, P = p.num_partials;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * groups + group;  // gridDim.x * groups == P
  const float inv_h = 1.f / static_cast<float>(H);
  const bool cached = nvec <= static_cast<int64_t>(tpr) * MAX_VECS;
  const bool has_bias = p.dbias != nullptr;
  const WT* w = static_cast<const WT*>(p.weight);
  float* dwp = p.workspace + g * H;
  float* dbp = has_bias ? p.workspace + (P + g) * H : nullptr;

  if (cached) {
    float dw[MAX_VECS][VEC], db[MAX_VECS][VEC];
#pragma unroll
    for (int k = 0; k < MAX_VECS; ++k)
#pragma unroll
      for (int e = 0; e < VEC; ++e) dw[k][e] = db[k][e] = 0.f;
    for (int64_t row = g; row < p.rows; row += P) {
      const TH* h = static_cast<const TH*>(p.h) + row * p.h_row_stride;
      const TY* dy = static_cast<const TY*>(p.dy) + row * p.dy_row_stride;
      const float mean = p.mean[row], rstd = p.rstd[row];
      float s1 = 0.f, s2 = 0.f;
#pragma unroll
      for (int k = 0; k < MAX_VECS; ++k) {
        const int64_t j = lane + static_cast<int64_t>(k) * tpr;
        if (j < nvec) {
          const Pack<TH, VEC> hv = load_pack<TH, VEC>(h, j);
          const Pack<TY, VEC> dyv = load_pack<TY, VEC>(dy, j);
          const Pack<WT, VEC> wv = load_pack<WT, VEC>(w, j);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float xhat = (to_f(hv.v[e]) - mean) * rstd, d = to_f(dyv.v[e]), gg = __fmul_rn(d, to_f(wv.v[e]));
            s1 += gg;
            s2 += gg * xhat;
            dw[k][e] += d * xhat;
            db[k][e] += d;
          }
        }
      }
      const float2 s = group_sum2(s1, s2, tpr, red);
      const float c1 = s.x * inv_h, c2 = s.y * inv_h;
      const TH* dres =
          p.dresidual_out ? static_cast<const TH*>(p.dresidual_out) + row * p.dresidual_out_row_stride : nullptr;
      TH* dh = static_cast<TH*>(p.dh) + row * p.dh_row_stride;
      TY* dx = p.dx ? static_cast<TY*>(p.dx) + row * p.dx_row_stride : nullptr;
      // Second pass re-reads h and dy (just loaded by this thread: L1/L2 hits, no DRAM traffic);
      // the registers go to the accumulators instead, which must live across rows.
#pragma unroll
      for (int k = 0; k < MAX_VECS; ++k) {
        const int64_t j = lane + static_cast<int64_t>(k) * tpr;
        if (j < nvec) {
          const Pack<TH, VEC> hv = load_pack<TH, VEC>(h, j);
          const Pack<TY, VEC> dyv = load_pack<TY, VEC>(dy, j);
          const Pack<WT, VEC> wv = load_pack<WT, VEC>(w, j);
          Pack<TH, VEC> rv, out;
          Pack<TY, VEC> xo;
          if (dres) rv = load_pack<TH, VEC>(dres, j);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float xhat = (to_f(hv.v[e]) - mean) * rstd, gg = __fmul_rn(to_f(dyv.v[e]), to_f(wv.v[e]));
            float d = rstd * (gg - c1 - xhat * c2);
            if (dres) d += to_f(rv.v[e]);
            out.v[e] = from_f<TH>(d);
            if constexpr (kMixed) xo.v[e] = from_f<TY>(d);
          }
          store_pack<TH, VEC>(dh, j, out);
          if (kMixed && dx) store_pack<TY, VEC>(dx, j, xo);
        }
      }
    }
    // Every owned column of the group's partial rows is written, also when the group had no rows.
#pragma unroll
    for (int k = 0; k < MAX_VECS; ++k) {
      const int64_t j = lane + static_cast<int64_t>(k) * tpr;
      if (j < nvec) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          dwp[j * VEC + e] = dw[k][e];
          if (has_bias) dbp[j * VEC + e] = db[k][e];
        }
      }
    }
  } else {
    // Row too wide for registers: the partial rows accumulate in global memory. Each thread owns
    // the same columns for every row, so its read-modify-writes need no synchronisation.
    for (int64_t j = lane; j < nvec; j += tpr) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        dwp[j * VEC + e] = 0.f;
        if (has_bias) dbp[j * VEC + e] = 0.f;
      }
    }
    for (int64_t row = g; row < p.rows; row += P) {
      const TH* h = static_cast<const TH*>(p.h) + row * p.h_row_stride;
      const TY* dy = static_cast<const TY*>(p.dy) + row * p.dy_row_stride;
      const float mean = p.mean[row], rstd = p.rstd[row];
      float s1 = 0.f, s2 = 0.f;
      for (int64_t j = lane; j < nvec; j += tpr) {
        const Pack<TH, VEC> hv = load_pack<TH, VEC>(h, j);
        const Pack<TY, VEC> dyv = load_pack<TY, VEC>(dy, j);
        const Pack<WT, VEC> wv = load_pack<WT, VEC>(w, j);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float xhat = (to_f(hv.v[e]) - mean) * rstd, d = to_f(dyv.v[e]), gg = __fmul_rn(d, to_f(wv.v[e]));
          s1 += gg;
          s2 += gg * xhat;
          dwp[j * VEC + e] += d * xhat;
          if (has_bias) dbp[j * VEC + e] += d;
        }
      }
      const float2 s = group_sum2(s1, s2, tpr, red);
      const float c1 = s.x * inv_h, c2 = s.y * inv_h;
      const TH* dres =
          p.dresidual_out ? static_cast<const TH*>(p.dresidual_out) + row * p.dresidual_out_row_stride : nullptr;
      TH* dh = static_cast<TH*>(p.dh) + row * p.dh_row_stride;
      TY* dx = p.dx ? static_cast<TY*>(p.dx) + row * p.dx_row_stride : nullptr;
      for (int64_t j = lane; j < nvec; j += tpr) {
        const Pack<TH, VEC> hv = load_pack<TH, VEC>(h, j);
        const Pack<TY, VEC> dyv = load_pack<TY, VEC>(dy, j);
        const Pack<WT, VEC> wv = load_pack<WT, VEC>(w, j);
        Pack<TH, VEC> rv, out;
        Pack<TY, VEC> xo;
        if (dres) rv = load_pack<TH, VEC>(dres, j);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float xhat = (to_f(hv.v[e]) - mean) * rstd, gg = __fmul_rn(to_f(dyv.v[e]), to_f(wv.v[e]));
          float d = rstd * (gg - c1 - xhat * c2);
          if (dres) d += to_f(rv.v[e]);
          out.v[e] = from_f<TH>(d);
          if constexpr (kMixed) xo.v[e] = from_f<TY>(d);
        }
        store_pack<TH, VEC>(dh, j, out);
        if (kMixed && dx) store_pack<TY, VEC>(dx, j, xo);
      }
    }
  }
}

// dst[c] = sum over g = 0..P-1 of partials[g * H + c]: 8 threads per column each sum a fixed
// stride-8 subset in order, then thread 0 adds the 8 subtotals in order. blockIdx.y picks the
// dweight (0) or dbias (1) partials.
template <typename WT>
__global__ void __launch_bounds__(256) layer_norm_reduce_partials_kernel(const float* partials, int64_t P, int64_t H,
                                                                         WT* dweight, WT* dbias) {
  __shared__ float tile[8][33];
  const float* src = partials + static_cast<int64_t>(blockIdx.y) * P * H;
  WT* dst = blockIdx.y ? dbias : dweight;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.f;
  if (c < H)
    for (int64_t g = threadIdx.y; g < P; g += 8) acc += src[g * H + c];
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < H) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s += tile[i][threadIdx.x];
    dst[c] = from_f<WT>(s);
  }
}

// How rows map to threads for a row of nvec packs (shared by the forward, backward and the
// workspace-size query, so the backward's number of partial rows is known before the launch).
struct RowGroupConfig {
  int tpr;     // threads per row: 32 (a warp) or the whole block
  int groups;  // rows per block
  int threads() const { return tpr * groups; }
};

RowGroupConfig row_group_config(int64_t nvec, int max_vecs) {
  if (nvec <= 32 * static_cast<int64_t>(max_vecs)) return {32, kWarpRowsPerBlock};
  int64_t t = (nvec + max_vecs - 1) / max_vecs;
  t = std::min<int64_t>((t + 31) / 32 * 32, kMaxThreads);
  return {static_cast<int>(t), 1};
}

int current_sm_count() {
  int dev = 0, sms = 0;
  MPTK_CUDA_CHECK(cudaGetDevice(&dev));
  MPTK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Elements per 16-byte pack of the narrowest of the types (a float32 pack of a mixed row is two).
template <typename... Ts>
constexpr int vec_of() {
  return static_cast<int>(16 / std::min({sizeof(Ts)...}));
}

// Forward: the packs of its row a thread keeps in registers, 32 registers' worth of h (8 for the
// scalar fallback).
template <typename TH, int VEC>
constexpr int fwd_max_vecs() {
  return VEC == 1 ? 8 : static_cast<int>(128 / (VEC * sizeof(TH)));
}

// The forward kernel used for these types: 16-byte packs when everything allows it, else scalars.
template <typename TX, typename TH, typename TY, typename WT>
void launch_fwd(const LayerNormFwdParams& p, cudaStream_t stream) {
  constexpr int V = vec_of<TX, TH, TY>();
  constexpr int MV = fwd_max_vecs<TH, V>();
  const bool vec_ok = p.hidden % V == 0 && aligned16(p.x) && aligned16(p.y) && aligned16(p.weight) &&
                      (!p.bias || aligned16(p.bias)) && (!p.residual || aligned16(p.residual)) &&
                      (!p.residual_out || aligned16(p.residual_out)) && p.x_row_stride % V == 0 &&
                      p.y_row_stride % V == 0 && p.residual_row_stride % V == 0 && p.residual_out_row_stride % V == 0;
  const int64_t nvec = vec_ok ? p.hidden / V : p.hidden;
  const RowGroupConfig cfg = row_group_config(nvec, vec_ok ? MV : fwd_max_vecs<TH, 1>());
  const int64_t blocks = std::min<int64_t>((p.rows + cfg.groups - 1) / cfg.groups, int64_t{1} << 20);
  if (vec_ok)
    layer_norm_fwd_kernel<TX, TH, TY, WT, V, MV><<<static_cast<unsigned>(blocks), cfg.threads(), 0, stream>>>(p, cfg.tpr);
  else
    layer_norm_fwd_kernel<TX, TH, TY, WT, 1, fwd_max_vecs<TH, 1>()>
        <<<static_cast<unsigned>(blocks), cfg.threads(), 0, stream>>>(p, cfg.tpr);
  MPTK_CUDA_CHECK_LAUNCH();
}

// Grid of the backward: enough resident blocks to fill the device once, no more (each block
// costs a partial row), and never more groups than rows.
template <typename TH, typename TY, typename WT>
void bwd_grid(int64_t rows, int64_t hidden, RowGroupConfig* cfg_out, int64_t* blocks_out) {
  constexpr int V = vec_of<TH, TY>();
  const bool vec_shape = hidden % V == 0;
  const RowGroupConfig cfg = vec_shape ? row_group_config(hidden / V, bwd_max_vecs<TH, TY, WT, V>())
                                        : row_group_config(hidden, bwd_max_vecs<TH, TY, WT, 1>());
  int per_sm = 0;
  if (vec_shape)
    MPTK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, layer_norm_bwd_kernel<TH, TY, WT, V, bwd_max_vecs<TH, TY, WT, V>()>, cfg.threads(), 0));
  else
    MPTK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, layer_norm_bwd_kernel<TH, TY, WT, 1, bwd_max_vecs<TH, TY, WT, 1>()>, cfg.threads(), 0));
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * current_sm_count();
  *cfg_out = cfg;
  *blocks_out = std::min<int64_t>((rows + cfg.groups - 1) / cfg.groups, resident);
}

template <typename TH, typename TY, typename WT>
void launch_bwd(const LayerNormBwdParams& p, cudaStream_t stream) {
  constexpr int V = vec_of<TH, TY>();
  if (p.rows > 0) {
    RowGroupConfig cfg;
    int64_t blocks = 0;
    bwd_grid<TH, TY, WT>(p.rows, p.hidden, &cfg, &blocks);
    MPTK_CHECK(blocks * cfg.groups == p.num_partials, "layer_norm_bwd_cuda: num_partials mismatch");
    const bool vec_ok = p.hidden % V == 0 && aligned16(p.h) && aligned16(p.dy) && aligned16(p.dh) &&
                        aligned16(p.weight) && (!p.dresidual_out || aligned16(p.dresidual_out)) &&
                        (!p.dx || aligned16(p.dx)) && aligned16(p.workspace) && p.h_row_stride % V == 0 &&
                        p.dy_row_stride % V == 0 && p.dh_row_stride % V == 0 &&
                        p.dresidual_out_row_stride % V == 0 && p.dx_row_stride % V == 0;
    if (vec_ok)
      layer_norm_bwd_kernel<TH, TY, WT, V, bwd_max_vecs<TH, TY, WT, V>()>
          <<<static_cast<unsigned>(blocks), cfg.threads(), 0, stream>>>(p, cfg.tpr);
    else
      layer_norm_bwd_kernel<TH, TY, WT, 1, bwd_max_vecs<TH, TY, WT, 1>()>
          <<<static_cast<unsigned>(blocks), cfg.threads(), 0, stream>>>(p, cfg.tpr);
    MPTK_CUDA_CHECK_LAUNCH();
  }
  const dim3 grid(static_cast<unsigned>((p.hidden + 31) / 32), p.dbias ? 2 : 1);
  layer_norm_reduce_partials_kernel<WT><<<grid, dim3(32, 8), 0, stream>>>(
      p.workspace, p.num_partials, p.hidden, static_cast<WT*>(p.dweight), static_cast<WT*>(p.dbias));
  MPTK_CUDA_CHECK_LAUNCH();
}

// Calls f(T{}, WT{}) for the uniform (activation, weight) dtype pairs.
template <typename F>
void dispatch_dtypes(DType dtype, DType weight_dtype, F&& f) {
  if (dtype == DType::Float32 && weight_dtype == DType::Float32) return f(float{}, float{});
  if (dtype == DType::BFloat16 && weight_dtype == DType::BFloat16) return f(__nv_bfloat16{}, __nv_bfloat16{});
  if (dtype == DType::BFloat16 && weight_dtype == DType::Float32) return f(__nv_bfloat16{}, float{});
  if (dtype == DType::Float16 && weight_dtype == DType::Float16) return f(__half{}, __half{});
  if (dtype == DType::Float16 && weight_dtype == DType::Float32) return f(__half{}, float{});
  MPTK_CHECK(false, "layer_norm: unsupported dtype pair (", dtype_name(dtype), ", ", dtype_name(weight_dtype), ")");
}

// The mixed combinations (float32 h and weights, 16-bit y / dy): calls f(TY{}).
template <typename F>
void dispatch_low(DType t, F&& f) {
  if (t == DType::BFloat16) return f(__nv_bfloat16{});
  if (t == DType::Float16) return f(__half{});
  MPTK_CHECK(false, "layer_norm: unsupported mixed output dtype ", dtype_name(t));
}

// Calls f(TH{}, TY{}, WT{}) for the backward's (h, dy, weight) dtypes.
template <typename F>
void dispatch_bwd(DType dtype, DType dy_dtype, DType weight_dtype, F&& f) {
  MPTK_CHECK(layer_norm_bwd_dtypes_ok(dtype, dy_dtype, weight_dtype), "layer_norm_bwd_cuda: unsupported dtypes (h ",
             dtype_name(dtype), ", dy ", dtype_name(dy_dtype), ", weight ", dtype_name(weight_dtype), ")");
  if (dy_dtype == dtype)
    dispatch_dtypes(dtype, weight_dtype, [&](auto t, auto wt) { f(t, t, wt); });
  else
    dispatch_low(dy_dtype, [&](auto ty) { f(float{}, ty, float{}); });
}

}  // namespace

void layer_norm_fwd_cuda(const LayerNormFwdParams& p, cudaStream_t stream) {
  MPTK_CHECK(!p.residual == !p.residual_out, "layer_norm_fwd_cuda: residual and residual_out go together");
  MPTK_CHECK(layer_norm_fwd_dtypes_ok(p.dtype, p.residual_dtype, p.residual != nullptr, p.y_dtype, p.weight_dtype),
             "layer_norm_fwd_cuda: unsupported dtypes (x ", dtype_name(p.dtype), ", residual ",
             dtype_name(p.residual_dtype), ", y ", dtype_name(p.y_dtype), ", weight ", dtype_name(p.weight_dtype), ")");
  if (p.rows == 0) return;
  MPTK_CHECK(p.hidden > 0, "layer_norm_fwd_cuda: hidden must be positive");
  const bool uniform = p.y_dtype == p.dtype && (!p.residual || p.residual_dtype == p.dtype);
  if (uniform) {
    dispatch_dtypes(p.dtype, p.weight_dtype, [&](auto t, auto wt) {
      using T = decltype(t);
      launch_fwd<T, T, T, decltype(wt)>(p, stream);
    });
  } else {
    dispatch_low(p.y_dtype, [&](auto ty) {
      using TY = decltype(ty);
      if (p.dtype == DType::Float32)
        launch_fwd<float, float, TY, float>(p, stream);
      else
        launch_fwd<TY, float, TY, float>(p, stream);
    });
  }
}

int64_t layer_norm_bwd_num_partials_cuda(int64_t rows, int64_t hidden, DType dtype, DType weight_dtype,
                                         DType dy_dtype) {
  if (rows <= 0 || hidden <= 0) return 0;
  int64_t n = 0;
  dispatch_bwd(dtype, dy_dtype, weight_dtype, [&](auto th, auto ty, auto wt) {
    RowGroupConfig cfg;
    int64_t blocks = 0;
    bwd_grid<decltype(th), decltype(ty), decltype(wt)>(rows, hidden, &cfg, &blocks);
    n = blocks * cfg.groups;
  });
  return n;
}

void layer_norm_bwd_cuda(const LayerNormBwdParams& p, cudaStream_t stream) {
  if (p.hidden == 0) return;
  MPTK_CHECK(!p.dx || p.dy_dtype != p.dtype, "layer_norm_bwd_cuda: dx is for the mixed mode only");
  dispatch_bwd(p.dtype, p.dy_dtype, p.weight_dtype, [&](auto th, auto ty, auto wt) {
    launch_bwd<decltype(th), decltype(ty), decltype(wt)>(p, stream);
  });
}

}  // namespace mptk
