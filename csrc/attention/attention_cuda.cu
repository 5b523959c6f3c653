// ALiBi flash attention on CUDA tensor cores (sm_80, sm_90a): forward, split-K decode, backward.
// FlashAttention-2 structure written from the paper and the PTX ISA; primitives in
// attention_cuda_mma.cuh. Build/inspect one file:
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_80,code=sm_80 -Icsrc \
//        -DMPTK_WITH_CUDA -Xptxas -v -c csrc/attention/attention_cuda.cu -o /tmp/a80.o
//   (and -gencode=arch=compute_90a,code=sm_90a). CPU emulation of the index math: tests/test_attention_cuda.py.
// Kernels (each instantiated for {fp16, bf16} x padded head dim {64, 128}):
//   attention_fwd_kernel     16 query rows per warp (d=64: 4 warps, d=128: 8 warps) x 64-key tiles,
//                            K/V double-buffered.
//   attention_decode_kernel  seqlen_q <= 16 and seqlen_q * group <= 64: one CTA per (key chunk,
//                            kv head x 16-row block, batch) handles 16 (position, query head) rows of
//                            the group (K/V read once per 16 rows); the 4 warps split each 64-key tile
//                            4 x 16; float32 partials go to the workspace.
//   attention_decode_combine merges the partials of the chunks into out and lse.
//   attention_bwd_delta      delta = rowsum(dO * O) (float32, workspace).
//   attention_bwd_kernel     one CTA (8 warps) per (128-key block, kv head [x group split], batch)
//                            loops over (its share of) the group's heads and the query blocks: dK, dV
//                            in registers, dQ by float32 atomics.
//   attention_bwd_dq_convert dq = scale * dq_accum in dtype with dq's strides.
//   attention_bwd_dkv_convert with group splits only: dk, dv from their float32 accumulators.
// Head dims that are multiples of 8 up to 128 run the 64- or 128-wide instantiation with the extra
// columns zero-filled in shared memory (zeros change neither QK^T nor the written columns of PV).
//
// Bias in the log2 domain: the kernels add slope*log2(e) * (j - ref) with ref = the row's diagonal key
// under causal (bottom-right aligned), seqlen_k - 1 otherwise. That differs from MPT's
// -slope*(seqlen_k-1-j) by a per-row constant, which softmax ignores; the lse adds it back. Keeping
// |j - ref| small where the softmax mass is keeps the float32 bias exact at 65k tokens.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "attention/attention.h"
#include "attention/attention_cuda_mma.cuh"
#include "common/cuda_check.h"
#include "common/error.h"

namespace mptk {
namespace attn_cuda {

constexpr int kThreads = 128;  // 4 warps: decode, combine and the small row kernels
constexpr int kBlockN = 64;    // keys per tile

// Forward CTA shape: 16 query rows per warp. d=128 uses 8 warps (128 rows): each K/V tile fetched from
// L2 then feeds twice the rows (128 instead of 64 FLOP per byte), at the same 8 warps per SM (255
// registers x 256 threads fill the register file). d=64 keeps 4 warps: 168 registers allow 3 CTAs/SM.
template <int kD>
struct FwdShape {
  static constexpr int kWarps = kD > 64 ? 8 : 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;
};
constexpr int kDecodeRows = 16;  // one mma M tile of (query position, head-in-group) rows
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Shared-memory row pitch in elements: +8 (16 bytes) so the 8 row addresses of one ldmatrix land in
// 8 different 16-byte bank groups (rows are (kD+8)*2 bytes apart: 144 or 272, i.e. 16 mod 128).
template <int kD>
struct Pitch {
  static constexpr int value = kD + 8;
};

// Backward CTA shape: 8 warps x 16 keys = 128 keys per CTA (as FlashAttention-2's mma.sync
// backward), so each Q/dO block loaded and each dQ atomic serves 128 keys; query blocks of 64 rows
// (d=64) or 32 (d=128: fewer rows keep dK, dV, S^T and dP^T in registers).
template <int kD>
struct BwdShape {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kWarps;
  static constexpr int kBlockM = kD > 64 ? 32 : 64;
};

// Where sequence b lives and how long it is. Varlen lengths are clamped to the max_seqlen_* the
// caller passed, so a wrong max can give a wrong answer but never an out-of-bounds write.
struct SeqBounds {
  int64_t q_row0, k_row0;  // row of token 0 (varlen: in the packed tensor; batched: 0)
  int64_t ws_row0;         // row of token 0 in the (batch * seqlen_q)-row float32 workspaces
  int64_t k_ws_row0;       // row of key 0 in the (batch * seqlen_k)-row float32 workspaces
  int sq, sk;
};

__device__ __forceinline__ SeqBounds seq_bounds(const AttentionFwdParams& p, int b) {
  SeqBounds s;
  // The workspaces have batch * max_seqlen rows: sequence b owns rows b * max_seqlen onwards, batched
  // or varlen (packed offsets may start past 0 or leave gaps, and would index past the workspace's end).
  s.ws_row0 = static_cast<int64_t>(b) * p.seqlen_q;
  s.k_ws_row0 = static_cast<int64_t>(b) * p.seqlen_k;
  if (p.cu_seqlens_q != nullptr) {
    const int q0 = p.cu_seqlens_q[b], q1 = p.cu_seqlens_q[b + 1];
    const int k0 = p.cu_seqlens_k[b], k1 = p.cu_seqlens_k[b + 1];
    s.q_row0 = q0;
    s.k_row0 = k0;
    s.sq = min(max(q1 - q0, 0), p.seqlen_q);
    s.sk = min(max(k1 - k0, 0), p.seqlen_k);
  } else {
    s.q_row0 = 0;
    s.k_row0 = 0;
    s.sq = p.seqlen_q;
    s.sk = p.seqlen_k;
  }
  return s;
}

// One query row's bias and mask: score2(j) = qk * scale*log2(e) + slope2 * (j - ref), keys j > last_key
// are masked (causal limit and the end of the keys in one comparison).
struct RowRule {
  float slope2;
  int ref;
  int last_key;
};

__device__ __forceinline__ RowRule row_rule(int i, int sq, int sk, bool causal, float slope) {
  RowRule r;
  r.slope2 = slope * kLog2e;
  const int diag = i + sk - sq;
  r.ref = causal ? diag : sk - 1;
  r.last_key = causal ? min(sk - 1, diag) : sk - 1;
  return r;
}

// Natural-log lse of a row from its log2-domain running max and sum, bias constant restored. A row
// with nothing visible (l == 0) gives -inf; a NaN sum (a NaN score: fmaxf drops NaN from the max,
// exp2f keeps it in the sum) stays NaN, so the backward's P is NaN there too, not 0.
__device__ __forceinline__ float row_lse(float m2, float l, float slope, int ref, int sk) {
  if (l == 0.f) return -INFINITY;
  return (m2 + __log2f(l)) * kLn2 + slope * static_cast<float>(ref - (sk - 1));
}

// Copies a kRows x kD tile (row stride in elements) into shared memory with the padded pitch;
// rows >= valid_rows and 16-byte chunks at or past head_dim become zeros. `fallback` is any valid
// address, used as the (unread) source of zero-filled chunks.
template <int kRows, int kD, int kNThreads = kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int valid_rows,
                                                int head_dim, const T* fallback, int tid) {
  constexpr int kChunks = kD / 8;
  constexpr int kTotal = kRows * kChunks;
  static_assert(kTotal % kNThreads == 0, "tile must split evenly over the CTA");
#pragma unroll
  for (int c0 = 0; c0 < kTotal; c0 += kNThreads) {
    const int c = c0 + tid;
    const int r = c / kChunks, cc = c % kChunks;
    const bool ok = r < valid_rows && cc * 8 < head_dim;
    const T* src = ok ? gmem + r * row_stride + cc * 8 : fallback;
    cp_async_16(smem_addr(smem + r * Pitch<kD>::value + cc * 8), src, ok);
  }
}

// A 16-row A operand (rows row0.., all kD columns) from a row-major shared tile.
template <int kD, typename T>
__device__ __forceinline__ void load_a_rows(uint32_t (&f)[kD / 16][4], const T* smem, int row0, int lane) {
  const int row = row0 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks)
    ldmatrix_x4(f[ks], smem_addr(smem + row * Pitch<kD>::value + ks * 16 + ((lane >> 4) << 3)));
}

// Online-softmax attention of one warp's 16 query rows against kNT*8 keys held in shared memory
// (k_s, v_s point at the warp's first key row; key0 is that row's key index).
template <typename T, int kD, int kNT>
__device__ __forceinline__ void attend_keys(const uint32_t (&qf)[kD / 16][4], const T* k_s, const T* v_s, int key0,
                                            const RowRule (&rr)[2], bool need_mask, float scale2, float (&m)[2],
                                            float (&l)[2], float (&acc)[kD / 8][4], int lane) {
  constexpr int kP = Pitch<kD>::value;
  static_assert(kNT % 2 == 0, "keys come in pairs of 8-key n-tiles (one ldmatrix.x4)");
  const int t = lane & 3;
  float s[kNT][4];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;

  // S = Q K^T. B[k=d][n=key] = K[key][d]: K rows are B's columns, so a plain ldmatrix gives B.
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t b[4];
      const int key = np * 16 + (lane & 7) + ((lane >> 4) << 3);
      const int col = ks * 16 + (((lane >> 3) & 1) << 3);
      ldmatrix_x4(b, smem_addr(k_s + key * kP + col));
      mma_16816<T>(s[2 * np], qf[ks], b[0], b[1]);
      mma_16816<T>(s[2 * np + 1], qf[ks], b[2], b[3]);
    }
  }

  // Scale to the log2 domain, add the bias, mask. j - ref is formed in integers and converted once
  // per row: base + small constant stays exact in float32.
  float base[2], rowmax[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    base[r] = static_cast<float>(key0 + 2 * t - rr[r].ref);
    rowmax[r] = -INFINITY;
  }
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e >> 1, c = nt * 8 + (e & 1);
      float v = fmaf(s[nt][e], scale2, rr[r].slope2 * (base[r] + static_cast<float>(c)));
      if (need_mask && key0 + 2 * t + c > rr[r].last_key) v = -INFINITY;
      s[nt][e] = v;
      rowmax[r] = fmaxf(rowmax[r], v);
    }
  }
  float m_use[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // The 4 lanes of a quad hold one row between them.
    rowmax[r] = fmaxf(rowmax[r], __shfl_xor_sync(0xffffffffu, rowmax[r], 1));
    rowmax[r] = fmaxf(rowmax[r], __shfl_xor_sync(0xffffffffu, rowmax[r], 2));
    const float m_new = fmaxf(m[r], rowmax[r]);
    m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet stays at zero
    const float alpha = exp2f(m[r] - m_use[r]);
    m[r] = m_new;
    l[r] *= alpha;  // per-lane partial sums; the quad is reduced once at the end
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      acc[dt][2 * r] *= alpha;
      acc[dt][2 * r + 1] *= alpha;
    }
  }
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float pr = exp2f(s[nt][e] - m_use[e >> 1]);
      s[nt][e] = pr;
      l[e >> 1] += pr;
    }
  }

  // O += P V. The S accumulator of n-tiles (2kk, 2kk+1) is exactly the A fragment of k-step kk;
  // B[k=key][n=d] = V[key][d] is row-major in shared memory, so ldmatrix.trans gives B.
#pragma unroll
  for (int kk = 0; kk < kNT / 2; ++kk) {
    uint32_t a[4];
    a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    const int key = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
    for (int dp = 0; dp < kD / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, smem_addr(v_s + key * kP + dp * 16 + ((lane >> 4) << 3)));
      mma_16816<T>(acc[2 * dp], a, b[0], b[1]);
      mma_16816<T>(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

template <typename T, int kD>
__device__ __forceinline__ void init_state(float (&m)[2], float (&l)[2], float (&acc)[kD / 8][4]) {
  m[0] = m[1] = -INFINITY;
  l[0] = l[1] = 0.f;
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
}

// ------------------------------------------------------------------------------------------------
// Forward. Grid (ceil(seqlen_q / kBlockM), n_heads, batch); block FwdShape::kThreads.
// Shared memory: two stages of [K tile | V tile] (64 + 64 rows). Q is only read once, into registers,
// so it borrows stage 1 until the first prefetch into that stage (69.6 KB at d=128: fits the 99 KB
// per-block limit of sm_86/sm_89 too).
template <typename T, int kD>
__global__ void __launch_bounds__(FwdShape<kD>::kThreads) attention_fwd_kernel(const AttentionFwdParams p) {
  constexpr int kBM = FwdShape<kD>::kBlockM, kNT = FwdShape<kD>::kThreads, kP = Pitch<kD>::value;
  constexpr int kStage = 2 * kBlockN * kP;  // elements per stage
  static_assert(kBM <= 2 * kBlockN, "Q fits in one stage");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);  // stage st: K at k_s + st * kStage, V at k_s + st * kStage + kBlockN * kP
  T* v_s = k_s + kBlockN * kP;
  T* q_s = k_s + kStage;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // causal: the longest rows start first
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqBounds sb = seq_bounds(p, b);
  const int m0 = m_block * kBM;
  if (m0 >= sb.sq) return;  // varlen: this sequence is shorter than max_seqlen_q
  const int group = p.n_heads / p.n_kv_heads, kvh = h / group;

  const T* q_base = static_cast<const T*>(p.q);
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);
  const T* q_g = q_base + b * p.q_batch_stride + (sb.q_row0 + m0) * p.q_row_stride + h * p.q_head_stride;
  const T* k_g = k_base + b * p.k_batch_stride + sb.k_row0 * p.k_row_stride + kvh * p.k_head_stride;
  const T* v_g = v_base + b * p.v_batch_stride + sb.k_row0 * p.v_row_stride + kvh * p.v_head_stride;
  const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_slopes_batch_stride + h] : 0.f;

  // Keys this CTA can see: causal stops at the last row's diagonal (later tiles are never loaded);
  // only tiles past the first row's diagonal, or past the end of the keys, need the mask.
  const int last_row = min(m0 + kBM, sb.sq) - 1;
  const int max_key = p.causal ? min(sb.sk - 1, last_row + sb.sk - sb.sq) : sb.sk - 1;
  const int n_tiles = max_key >= 0 ? max_key / kBlockN + 1 : 0;
  const int first_row_last_key = p.causal ? min(sb.sk - 1, m0 + sb.sk - sb.sq) : sb.sk - 1;

  load_tile_async<kBM, kD, kNT>(q_s, q_g, p.q_row_stride, sb.sq - m0, p.head_dim, q_base, tid);
  cp_async_commit();
  if (n_tiles > 0) {
    load_tile_async<kBlockN, kD, kNT>(k_s, k_g, p.k_row_stride, sb.sk, p.head_dim, k_base, tid);
    load_tile_async<kBlockN, kD, kNT>(v_s, v_g, p.v_row_stride, sb.sk, p.head_dim, v_base, tid);
  }
  cp_async_commit();
  cp_async_wait<1>();  // Q has landed (the first K/V tile may still be in flight)
  __syncthreads();

  uint32_t qf[kD / 16][4];
  load_a_rows<kD>(qf, q_s, warp * 16, lane);
  __syncthreads();  // every warp holds its Q fragments before stage 1 (Q's storage) is refilled
  RowRule rr[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) rr[r] = row_rule(m0 + warp * 16 + (lane >> 2) + 8 * r, sb.sq, sb.sk, p.causal, slope);
  float m[2], l[2], acc[kD / 8][4];
  init_state<T, kD>(m, l, acc);
  const float scale2 = p.softmax_scale * kLog2e;

  for (int it = 0; it < n_tiles; ++it) {
    if (it + 1 < n_tiles) {  // prefetch the next tile into the other stage while this one computes
      const int n1 = (it + 1) * kBlockN, st = (it + 1) & 1;
      load_tile_async<kBlockN, kD, kNT>(k_s + st * kStage, k_g + n1 * p.k_row_stride, p.k_row_stride, sb.sk - n1,
                                   p.head_dim, k_base, tid);
      load_tile_async<kBlockN, kD, kNT>(v_s + st * kStage, v_g + n1 * p.v_row_stride, p.v_row_stride, sb.sk - n1,
                                   p.head_dim, v_base, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int n0 = it * kBlockN, st = it & 1;
    attend_keys<T, kD, kBlockN / 8>(qf, k_s + st * kStage, v_s + st * kStage, n0, rr,
                                    n0 + kBlockN - 1 > first_row_last_key, scale2, m, l, acc, lane);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // nothing may still be landing in shared memory when the CTA exits

  T* out_base = static_cast<T*>(p.out);
  const int t = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int i = m0 + warp * 16 + (lane >> 2) + 8 * r;
    if (i >= sb.sq) continue;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // no visible key: output 0 (and lse -inf)
    T* o = out_base + b * p.out_batch_stride + (sb.q_row0 + i) * p.out_row_stride + h * p.out_head_stride;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      const int d = dt * 8 + 2 * t;
      if (d < p.head_dim)
        *reinterpret_cast<uint32_t*>(o + d) = pack2<T>(acc[dt][2 * r] * inv, acc[dt][2 * r + 1] * inv);
    }
    if (p.lse != nullptr && t == 0)
      p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + sb.q_row0 + i] =
          row_lse(m[r], l[r], slope, rr[r].ref, sb.sk);
  }
}

// ------------------------------------------------------------------------------------------------
// Decode / short queries (seqlen_q <= 16, seqlen_q * group <= 64). The (position, head-in-group) rows
// of one kv head, row R = position * group + head-in-group, are cut into blocks of 16 (one mma M tile);
// a CTA handles one block against one chunk of keys, so K/V are read once per 16 rows, not once per
// query head. Grid (n_splits, n_kv_heads * n_row_blocks, batch).
// Workspace per (batch, kv head, row block, split) slot: acc[16][kD], then m[16] and l[16] (log2
// domain, unnormalised acc), regions laid out as [slots*16*kD | slots*16 | slots*16] floats.
struct DecodeWorkspace {
  float* acc;
  float* m;
  float* l;
};

__host__ __device__ inline DecodeWorkspace decode_workspace(void* ws, int64_t slots, int kd) {
  float* f = static_cast<float*>(ws);
  return {f, f + slots * kDecodeRows * kd, f + slots * kDecodeRows * kd + slots * kDecodeRows};
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads)
    attention_decode_kernel(const AttentionFwdParams p, int n_splits, int tiles_per_split, int n_row_blocks) {
  constexpr int kP = Pitch<kD>::value;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = q_s + kDecodeRows * kP;
  T* v_s = k_s + 2 * kBlockN * kP;
  // After the key loop the K/V stages hold the 4 warps' partial states for the in-CTA merge.
  float* comb_acc = reinterpret_cast<float*>(k_s);  // [4][16][kD]
  float* comb_m = comb_acc + 4 * kDecodeRows * kD;  // [4][16]
  float* comb_l = comb_m + 4 * kDecodeRows;         // [4][16]
  static_assert((4 * kDecodeRows * kD + 8 * kDecodeRows) * 4 <= 4 * kBlockN * kP * 2, "merge scratch fits");

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x, b = blockIdx.z;
  const int kvh = blockIdx.y / n_row_blocks, row0 = (blockIdx.y % n_row_blocks) * kDecodeRows;
  const SeqBounds sb = seq_bounds(p, b);
  const int group = p.n_heads / p.n_kv_heads;
  const int valid_rows = min(sb.sq * group - row0, kDecodeRows);
  if (valid_rows <= 0) return;  // varlen: a shorter sequence; the combine never reads this slot

  const T* q_base = static_cast<const T*>(p.q);
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);
  const T* k_g = k_base + b * p.k_batch_stride + sb.k_row0 * p.k_row_stride + kvh * p.k_head_stride;
  const T* v_g = v_base + b * p.v_batch_stride + sb.k_row0 * p.v_row_stride + kvh * p.v_head_stride;

  // Every query row sees up to the last key (bottom-right causal), so the chunks cover all tiles.
  const int n_tiles_all = sb.sk > 0 ? (sb.sk - 1) / kBlockN + 1 : 0;
  const int t_begin = split * tiles_per_split;
  const int n_tiles = max(0, min(t_begin + tiles_per_split, n_tiles_all) - t_begin);
  const int first_row_last_key = p.causal ? min(sb.sk - 1, sb.sk - sb.sq) : sb.sk - 1;

  {  // Q: 16 gathered rows, each (position, head) its own pointer
    constexpr int kChunks = kD / 8;
#pragma unroll
    for (int c0 = 0; c0 < kDecodeRows * kChunks; c0 += kThreads) {
      const int c = c0 + tid;
      const int r = c / kChunks, cc = c % kChunks;
      const bool ok = r < valid_rows && cc * 8 < p.head_dim;
      const int R = row0 + r;
      const T* src = q_base + b * p.q_batch_stride + (sb.q_row0 + R / group) * p.q_row_stride +
                     (kvh * group + R % group) * p.q_head_stride + cc * 8;
      cp_async_16(smem_addr(q_s + r * kP + cc * 8), ok ? src : q_base, ok);
    }
  }
  cp_async_commit();
  if (n_tiles > 0) {
    const int n0 = t_begin * kBlockN;
    load_tile_async<kBlockN, kD>(k_s, k_g + n0 * p.k_row_stride, p.k_row_stride, sb.sk - n0, p.head_dim, k_base, tid);
    load_tile_async<kBlockN, kD>(v_s, v_g + n0 * p.v_row_stride, p.v_row_stride, sb.sk - n0, p.head_dim, v_base, tid);
  }
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();

  uint32_t qf[kD / 16][4];
  load_a_rows<kD>(qf, q_s, 0, lane);  // every warp holds all 16 rows
  RowRule rr[2];
  float slope_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int R = row0 + (lane >> 2) + 8 * r;
    const int h = kvh * group + R % group;
    slope_row[r] = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_slopes_batch_stride + h] : 0.f;
    rr[r] = row_rule(R / group, sb.sq, sb.sk, p.causal, slope_row[r]);
  }
  float m[2], l[2], acc[kD / 8][4];
  init_state<T, kD>(m, l, acc);
  const float scale2 = p.softmax_scale * kLog2e;

  for (int it = 0; it < n_tiles; ++it) {
    if (it + 1 < n_tiles) {
      const int n1 = (t_begin + it + 1) * kBlockN, st = (it + 1) & 1;
      load_tile_async<kBlockN, kD>(k_s + st * kBlockN * kP, k_g + n1 * p.k_row_stride, p.k_row_stride, sb.sk - n1,
                                   p.head_dim, k_base, tid);
      load_tile_async<kBlockN, kD>(v_s + st * kBlockN * kP, v_g + n1 * p.v_row_stride, p.v_row_stride, sb.sk - n1,
                                   p.head_dim, v_base, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int n0 = (t_begin + it) * kBlockN, st = it & 1;
    // Warp w takes keys 16w..16w+15 of the tile: 4 independent partial states per CTA.
    attend_keys<T, kD, 2>(qf, k_s + (st * kBlockN + warp * 16) * kP, v_s + (st * kBlockN + warp * 16) * kP,
                          n0 + warp * 16, rr, n0 + kBlockN - 1 > first_row_last_key, scale2, m, l, acc, lane);
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();  // K/V stages are free: reuse them for the merge

  const int t = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int row = (lane >> 2) + 8 * r;
    if (t == 0) {
      comb_m[warp * kDecodeRows + row] = m[r];
      comb_l[warp * kDecodeRows + row] = l[r];
    }
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      float* dst = comb_acc + (warp * kDecodeRows + row) * kD + dt * 8 + 2 * t;
      dst[0] = acc[dt][2 * r];
      dst[1] = acc[dt][2 * r + 1];
    }
  }
  __syncthreads();

  const int64_t slots = static_cast<int64_t>(gridDim.z) * gridDim.y * n_splits;
  const int64_t slot = (static_cast<int64_t>(b) * gridDim.y + blockIdx.y) * n_splits + split;
  const DecodeWorkspace ws = decode_workspace(p.workspace, slots, kD);
  for (int idx = tid; idx < kDecodeRows * kD; idx += kThreads) {
    const int row = idx / kD, col = idx % kD;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < 4; ++w) mx = fmaxf(mx, comb_m[w * kDecodeRows + row]);
    const float mu = mx == -INFINITY ? 0.f : mx;
    float a = 0.f, ls = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const float e = exp2f(comb_m[w * kDecodeRows + row] - mu);
      a += e * comb_acc[(w * kDecodeRows + row) * kD + col];
      ls += e * comb_l[w * kDecodeRows + row];
    }
    ws.acc[(slot * kDecodeRows + row) * kD + col] = a;
    if (col == 0) {  // every slot writes m (-inf when empty): the zero-filled default would be wrong
      ws.m[slot * kDecodeRows + row] = mx;
      ws.l[slot * kDecodeRows + row] = ls;
    }
  }
}

// Grid (16 * n_row_blocks rows, n_kv_heads, batch); block 128 threads over the head dim.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads)
    attention_decode_combine_kernel(const AttentionFwdParams p, int n_splits, int n_row_blocks) {
  const int R = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const SeqBounds sb = seq_bounds(p, b);
  const int group = p.n_heads / p.n_kv_heads;
  const int i = R / group, h = kvh * group + R % group;
  if (i >= sb.sq) return;
  const int row = R % kDecodeRows;
  const int64_t slots = static_cast<int64_t>(gridDim.z) * gridDim.y * n_row_blocks * n_splits;
  const int64_t slot0 =
      ((static_cast<int64_t>(b) * gridDim.y + kvh) * n_row_blocks + R / kDecodeRows) * n_splits;
  const DecodeWorkspace ws = decode_workspace(p.workspace, slots, kD);
  float mx = -INFINITY;
  for (int s = 0; s < n_splits; ++s) mx = fmaxf(mx, ws.m[(slot0 + s) * kDecodeRows + row]);
  const float mu = mx == -INFINITY ? 0.f : mx;
  float ls = 0.f;
  for (int s = 0; s < n_splits; ++s) {
    const int64_t k = (slot0 + s) * kDecodeRows + row;
    ls += exp2f(ws.m[k] - mu) * ws.l[k];
  }
  const float inv = ls > 0.f ? 1.f / ls : 0.f;
  T* o = static_cast<T*>(p.out) + b * p.out_batch_stride + (sb.q_row0 + i) * p.out_row_stride + h * p.out_head_stride;
  for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    float a = 0.f;
    for (int s = 0; s < n_splits; ++s) {
      const int64_t k = (slot0 + s) * kDecodeRows + row;
      a += exp2f(ws.m[k] - mu) * ws.acc[k * kD + d];
    }
    o[d] = from_float<T>(a * inv);
  }
  if (p.lse != nullptr && threadIdx.x == 0) {
    const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_slopes_batch_stride + h] : 0.f;
    const RowRule rr = row_rule(i, sb.sq, sb.sk, p.causal, slope);
    p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + sb.q_row0 + i] = row_lse(mx, ls, slope, rr.ref, sb.sk);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward.
// Workspace: dq_accum [batch*seqlen_q rows][n_heads][head_dim] float32 (zeroed by the caller), then
// delta [rows][n_heads] float32 at a 256-byte aligned offset.
// With group_splits > 1 (the heads of a GQA/MQA group spread over several CTAs) two more regions
// follow: dk_accum and dv_accum [batch*seqlen_k rows][n_kv_heads][head_dim] float32.
struct BwdWorkspace {
  float* dq_acc;
  float* delta;
  float* dk_acc;
  float* dv_acc;
};

__host__ __device__ inline size_t align256(size_t x) { return (x + 255) / 256 * 256; }

__host__ __device__ inline BwdWorkspace bwd_workspace(void* ws, const AttentionFwdParams& p) {
  char* c = static_cast<char*>(ws);
  const size_t rows_q = static_cast<size_t>(p.batch) * p.seqlen_q, rows_k = static_cast<size_t>(p.batch) * p.seqlen_k;
  const size_t dq_bytes = align256(rows_q * p.n_heads * p.head_dim * sizeof(float));
  const size_t delta_bytes = align256(rows_q * p.n_heads * sizeof(float));
  const size_t dkv_bytes = align256(rows_k * p.n_kv_heads * p.head_dim * sizeof(float));
  return {reinterpret_cast<float*>(c), reinterpret_cast<float*>(c + dq_bytes),
          reinterpret_cast<float*>(c + dq_bytes + delta_bytes),
          reinterpret_cast<float*>(c + dq_bytes + delta_bytes + dkv_bytes)};
}

constexpr int kRowsPerCta = 32;  // delta / convert kernels: 4 warps x 8 rows

// delta[row, h] = sum_d dO * O. Grid (ceil(seqlen_q / 32), n_heads, batch); one warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_bwd_delta_kernel(const AttentionBwdParams p) {
  const int h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const SeqBounds sb = seq_bounds(p, b);
  const BwdWorkspace ws = bwd_workspace(p.workspace, p);
  for (int rr = warp; rr < kRowsPerCta; rr += 4) {
    const int i = blockIdx.x * kRowsPerCta + rr;
    if (i >= sb.sq) break;
    const T* o = static_cast<const T*>(p.out) + b * p.out_batch_stride + (sb.q_row0 + i) * p.out_row_stride +
                 h * p.out_head_stride;
    const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride + (sb.q_row0 + i) * p.dout_row_stride +
                    h * p.dout_head_stride;
    float s = 0.f;
    for (int d = lane; d < p.head_dim; d += 32) s += to_float<T>(o[d]) * to_float<T>(dout[d]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) ws.delta[(sb.ws_row0 + i) * p.n_heads + h] = s;
  }
}

// dq = softmax_scale * dq_accum in dtype. Same grid as the delta kernel.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_convert_kernel(const AttentionBwdParams p) {
  const int h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const SeqBounds sb = seq_bounds(p, b);
  const BwdWorkspace ws = bwd_workspace(p.workspace, p);
  for (int rr = warp; rr < kRowsPerCta; rr += 4) {
    const int i = blockIdx.x * kRowsPerCta + rr;
    if (i >= sb.sq) break;
    const float* src = ws.dq_acc + ((sb.ws_row0 + i) * p.n_heads + h) * p.head_dim;
    T* dst = static_cast<T*>(p.dq) + b * p.dq_batch_stride + (sb.q_row0 + i) * p.dq_row_stride + h * p.dq_head_stride;
    for (int d = 2 * lane; d < p.head_dim; d += 64)
      *reinterpret_cast<uint32_t*>(dst + d) = pack2<T>(src[d] * p.softmax_scale, src[d + 1] * p.softmax_scale);
  }
}

// Grid (ceil(seqlen_k / 32), n_kv_heads, batch): dk, dv in dtype from the float32 accumulators the
// group-split backward adds into (dk already scaled).
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkv_convert_kernel(const AttentionBwdParams p) {
  const int kvh = blockIdx.y, b = blockIdx.z, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const SeqBounds sb = seq_bounds(p, b);
  const BwdWorkspace ws = bwd_workspace(p.workspace, p);
  for (int rr = warp; rr < kRowsPerCta; rr += 4) {
    const int j = blockIdx.x * kRowsPerCta + rr;
    if (j >= sb.sk) break;
    const int64_t src = ((sb.k_ws_row0 + j) * p.n_kv_heads + kvh) * p.head_dim;
    T* dk = static_cast<T*>(p.dk) + b * p.dk_batch_stride + (sb.k_row0 + j) * p.dk_row_stride + kvh * p.dk_head_stride;
    T* dv = static_cast<T*>(p.dv) + b * p.dv_batch_stride + (sb.k_row0 + j) * p.dv_row_stride + kvh * p.dv_head_stride;
    for (int d = 2 * lane; d < p.head_dim; d += 64) {
      *reinterpret_cast<uint32_t*>(dk + d) = pack2<T>(ws.dk_acc[src + d], ws.dk_acc[src + d + 1]);
      *reinterpret_cast<uint32_t*>(dv + d) = pack2<T>(ws.dv_acc[src + d], ws.dv_acc[src + d + 1]);
    }
  }
}

// Grid (ceil(seqlen_k / 128), n_kv_heads * group_splits, batch). Warp w owns keys 16w..16w+15 of the
// block and works on the transposed scores S^T = K Q^T, so P^T and dS^T come out of the mma already in the A-operand
// layout that dV += P^T dO and dK += dS^T Q need. dS^T also goes through shared memory for
// dQ += dS K, whose 16-row x 32-column pieces are split over the warps and added to float32 with
// atomics (several key blocks contribute to the same dQ rows).
template <typename T, int kD>
__global__ void __launch_bounds__(BwdShape<kD>::kThreads)
    attention_bwd_kernel(const AttentionBwdParams p, int n_q_stages, int group_splits) {
  constexpr int kBM = BwdShape<kD>::kBlockM, kBN = BwdShape<kD>::kBlockN, kNT = BwdShape<kD>::kThreads;
  constexpr int kP = Pitch<kD>::value, kDsP = kBM + 8;
  constexpr int kWM = kBM / 16;                             // dQ: warps along the query rows
  constexpr int kDqCols = kD / (BwdShape<kD>::kWarps / kWM);  // dQ: head-dim columns per warp
  static_assert(kDqCols % 16 == 0 && kBM <= kNT, "dQ pieces are 16 x kDqCols per warp");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);  // [kBN][kP]
  T* v_s = k_s + kBN * kP;               // [kBN][kP]
  // Q/dO blocks: 2 stages (prefetch the next block during this one), or 1 on GPUs whose per-block
  // shared memory cannot hold 2 (sm_86/sm_89 at d=128): then each block is loaded before its use.
  const bool dbuf = n_q_stages == 2;
  T* q_s = v_s + kBN * kP;                   // [n_q_stages][kBM][kP]
  T* do_s = q_s + n_q_stages * kBM * kP;     // [n_q_stages][kBM][kP]
  T* ds_s = do_s + n_q_stages * kBM * kP;    // [kBN][kDsP]  dS^T in dtype
  float* lse2_s = reinterpret_cast<float*>(ds_s + kBN * kDsP);  // [kBM]
  float* delta_s = lse2_s + kBM;                                     // [kBM]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int n_block = blockIdx.x, b = blockIdx.z;
  const int kvh = blockIdx.y / group_splits, split = blockIdx.y % group_splits;
  const SeqBounds sb = seq_bounds(p, b);
  const int n0 = n_block * kBN;
  if (n0 >= sb.sk) return;
  const int group = p.n_heads / p.n_kv_heads;
  const int heads = group / group_splits;                   // query heads handled by this CTA
  const int h_first = kvh * group + split * heads;
  const BwdWorkspace ws = bwd_workspace(p.workspace, p);

  const T* q_base = static_cast<const T*>(p.q);
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);
  const T* do_base = static_cast<const T*>(p.dout);
  const T* k_g = k_base + b * p.k_batch_stride + (sb.k_row0 + n0) * p.k_row_stride + kvh * p.k_head_stride;
  const T* v_g = v_base + b * p.v_batch_stride + (sb.k_row0 + n0) * p.v_row_stride + kvh * p.v_head_stride;

  // Query blocks that see at least one of these keys (bottom-right causal: rows i >= n0 - (sk - sq)).
  const int m_begin = p.causal ? max(0, n0 - sb.sk + sb.sq) / kBM : 0;
  const int m_end = (sb.sq + kBM - 1) / kBM;
  const int n_m = max(0, m_end - m_begin);
  const int total = n_m * heads;  // (head, query block) flattened so the prefetch crosses heads

  load_tile_async<kBN, kD, kNT>(k_s, k_g, p.k_row_stride, sb.sk - n0, p.head_dim, k_base, tid);
  load_tile_async<kBN, kD, kNT>(v_s, v_g, p.v_row_stride, sb.sk - n0, p.head_dim, v_base, tid);
  cp_async_commit();

  auto issue_q_block = [&](int it) {
    const int h = h_first + it / n_m, i0 = (m_begin + it % n_m) * kBM, st = dbuf ? (it & 1) : 0;
    const T* q_g = q_base + b * p.q_batch_stride + (sb.q_row0 + i0) * p.q_row_stride + h * p.q_head_stride;
    const T* d_g = do_base + b * p.dout_batch_stride + (sb.q_row0 + i0) * p.dout_row_stride + h * p.dout_head_stride;
    load_tile_async<kBM, kD, kNT>(q_s + st * kBM * kP, q_g, p.q_row_stride, sb.sq - i0, p.head_dim, q_base, tid);
    load_tile_async<kBM, kD, kNT>(do_s + st * kBM * kP, d_g, p.dout_row_stride, sb.sq - i0, p.head_dim, do_base, tid);
    cp_async_commit();
  };
  if (total > 0 && dbuf) issue_q_block(0);

  float dk[kD / 8][4], dv[kD / 8][4];
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;

  const float scale2 = p.softmax_scale * kLog2e;
  const int diag_off = sb.sk - sb.sq;  // query i's diagonal key is i + diag_off
  int key_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) key_row[r] = n0 + warp * 16 + g + 8 * r;

  for (int it = 0; it < total; ++it) {
    const int h = h_first + it / n_m, i0 = (m_begin + it % n_m) * kBM, st = dbuf ? (it & 1) : 0;
    if (!dbuf) {
      // Single stage: every warp finished reading it (compute phase of it - 1) before the barrier
      // after that phase; the dQ phase still running in other warps reads only dS^T and K.
      issue_q_block(it);
      cp_async_wait<0>();
    } else if (it + 1 < total) {
      issue_q_block(it + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_slopes_batch_stride + h] : 0.f;
    const float slope2 = slope * kLog2e;
    if (tid < kBM) {
      // lse in the kernel's log2 frame: lse*log2(e) minus the row constant slope2*(ref - (sk-1)).
      // Rows past the end or with no visible key get +inf, which turns every P of the row into 0.
      const int i = i0 + tid;
      float l2 = INFINITY, dl = 0.f;
      if (i < sb.sq) {
        const float lse = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + sb.q_row0 + i];
        const int ref = p.causal ? i + diag_off : sb.sk - 1;
        // Subtract in the natural-log frame first: at 65k tokens lse and the ALiBi term are ~1e4-1e5
        // and nearly cancel; scaling each by log2(e) before the subtraction adds two roundings at
        // that magnitude (P off by up to ~1% at 65k, ~0.1% at 8k).
        if (lse != -INFINITY) l2 = (lse - slope * static_cast<float>(ref - (sb.sk - 1))) * kLog2e;
        dl = ws.delta[(sb.ws_row0 + i) * p.n_heads + h];
      }
      lse2_s[tid] = l2;
      delta_s[tid] = dl;
    }
    __syncthreads();
    const T* qs = q_s + st * kBM * kP;
    const T* dos = do_s + st * kBM * kP;

    // S^T (16 keys x kBM queries) = K_w Q^T; B[k=d][n=query] = Q[query][d]: plain ldmatrix.
    float s[kBM / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBM / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    {
      const int arow = warp * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        uint32_t a[4];
        ldmatrix_x4(a, smem_addr(k_s + arow * kP + ks * 16 + ((lane >> 4) << 3)));
#pragma unroll
        for (int np = 0; np < kBM / 16; ++np) {
          uint32_t bb[4];
          const int qrow = np * 16 + (lane & 7) + ((lane >> 4) << 3);
          ldmatrix_x4(bb, smem_addr(qs + qrow * kP + ks * 16 + (((lane >> 3) & 1) << 3)));
          mma_16816<T>(s[2 * np], a, bb[0], bb[1]);
          mma_16816<T>(s[2 * np + 1], a, bb[2], bb[3]);
        }
      }
    }
    // P^T = exp2(score2 - lse2): rows are keys (this warp's), columns are queries.
    const bool need_mask = (n0 + kBN - 1 > sb.sk - 1) || (p.causal && n0 + kBN - 1 - i0 > diag_off);
#pragma unroll
    for (int nt = 0; nt < kBM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = key_row[e >> 1];
        const int qc = nt * 8 + 2 * t + (e & 1);
        const int i = i0 + qc;
        const int ref = p.causal ? i + diag_off : sb.sk - 1;
        const float v = fmaf(s[nt][e], scale2, slope2 * static_cast<float>(j - ref)) - lse2_s[qc];
        const bool masked = need_mask && (j > sb.sk - 1 || (p.causal && j > i + diag_off));
        s[nt][e] = masked ? 0.f : exp2f(v);
      }
    }
    // dV += P^T dO; B[k=query][n=d] = dO[query][d]: ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      const int qrow = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, smem_addr(dos + qrow * kP + dp * 16 + ((lane >> 4) << 3)));
        mma_16816<T>(dv[2 * dp], a, bb[0], bb[1]);
        mma_16816<T>(dv[2 * dp + 1], a, bb[2], bb[3]);
      }
    }
    // dP^T = V_w dO^T, then dS^T = P^T * (dP^T - delta[query]) in place of P^T.
    {
      float dpt[kBM / 8][4];
#pragma unroll
      for (int nt = 0; nt < kBM / 8; ++nt) dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.f;
      const int arow = warp * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        uint32_t a[4];
        ldmatrix_x4(a, smem_addr(v_s + arow * kP + ks * 16 + ((lane >> 4) << 3)));
#pragma unroll
        for (int np = 0; np < kBM / 16; ++np) {
          uint32_t bb[4];
          const int qrow = np * 16 + (lane & 7) + ((lane >> 4) << 3);
          ldmatrix_x4(bb, smem_addr(dos + qrow * kP + ks * 16 + (((lane >> 3) & 1) << 3)));
          mma_16816<T>(dpt[2 * np], a, bb[0], bb[1]);
          mma_16816<T>(dpt[2 * np + 1], a, bb[2], bb[3]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < kBM / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] *= dpt[nt][e] - delta_s[nt * 8 + 2 * t + (e & 1)];
    }
    // dK += dS^T Q (scaled at the end); B[k=query][n=d] = Q[query][d]: ldmatrix.trans. dS^T also
    // goes to shared memory for dQ.
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      const int qrow = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, smem_addr(qs + qrow * kP + dp * 16 + ((lane >> 4) << 3)));
        mma_16816<T>(dk[2 * dp], a, bb[0], bb[1]);
        mma_16816<T>(dk[2 * dp + 1], a, bb[2], bb[3]);
      }
      T* d0 = ds_s + (warp * 16 + g) * kDsP + kk * 16 + 2 * t;
      *reinterpret_cast<uint32_t*>(d0) = a[0];
      *reinterpret_cast<uint32_t*>(d0 + 8 * kDsP) = a[1];
      *reinterpret_cast<uint32_t*>(d0 + 8) = a[2];
      *reinterpret_cast<uint32_t*>(d0 + 8 * kDsP + 8) = a[3];
    }
    __syncthreads();  // dS^T complete from all warps

    // dQ piece (queries wm*16.., head-dim columns wn*kDqCols..) += dS K over the block's keys.
    // A[m=query][k=key] = dS^T[key][query]: ldmatrix.trans; B[k=key][n=d] = K[key][d]: ldmatrix.trans.
    {
      const int wm = warp % kWM, wn = warp / kWM;
      float dq[kDqCols / 8][4];
#pragma unroll
      for (int nt = 0; nt < kDqCols / 8; ++nt) dq[nt][0] = dq[nt][1] = dq[nt][2] = dq[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4_trans(a, smem_addr(ds_s + (kk * 16 + (lane & 7) + ((lane >> 4) << 3)) * kDsP + wm * 16 +
                                       (((lane >> 3) & 1) << 3)));
        const int krow = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
        for (int np = 0; np < kDqCols / 16; ++np) {
          uint32_t bb[4];
          ldmatrix_x4_trans(bb, smem_addr(k_s + krow * kP + wn * kDqCols + np * 16 + ((lane >> 4) << 3)));
          mma_16816<T>(dq[2 * np], a, bb[0], bb[1]);
          mma_16816<T>(dq[2 * np + 1], a, bb[2], bb[3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = i0 + wm * 16 + g + 8 * r;
        if (i >= sb.sq) continue;
        float* dst = ws.dq_acc + ((sb.ws_row0 + i) * p.n_heads + h) * p.head_dim;
#pragma unroll
        for (int nt = 0; nt < kDqCols / 8; ++nt) {
          const int d = wn * kDqCols + nt * 8 + 2 * t;
          if (d < p.head_dim) {
            atomicAdd(dst + d, dq[nt][2 * r]);
            atomicAdd(dst + d + 1, dq[nt][2 * r + 1]);
          }
        }
      }
    }
    // The next iteration's first __syncthreads orders these dS^T reads before its dS^T writes.
  }

  cp_async_wait<0>();  // a CTA with no query block never waited for its K/V copies: drain before exit
  // dK = scale * sum over the group's heads of dS^T Q; dV = sum of P^T dO. Keys with no visible
  // query (none under bottom-right causal) get zeros.
  T* dk_base = static_cast<T*>(p.dk);
  T* dv_base = static_cast<T*>(p.dv);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = key_row[r];
    if (j >= sb.sk) continue;
    if (group_splits > 1) {  // partial sums over this CTA's heads: add into the float32 accumulators
      float* dka = ws.dk_acc + ((sb.k_ws_row0 + j) * p.n_kv_heads + kvh) * p.head_dim;
      float* dva = ws.dv_acc + ((sb.k_ws_row0 + j) * p.n_kv_heads + kvh) * p.head_dim;
#pragma unroll
      for (int dt = 0; dt < kD / 8; ++dt) {
        const int d = dt * 8 + 2 * t;
        if (d < p.head_dim) {
          atomicAdd(dka + d, dk[dt][2 * r] * p.softmax_scale);
          atomicAdd(dka + d + 1, dk[dt][2 * r + 1] * p.softmax_scale);
          atomicAdd(dva + d, dv[dt][2 * r]);
          atomicAdd(dva + d + 1, dv[dt][2 * r + 1]);
        }
      }
      continue;
    }
    T* dkp = dk_base + b * p.dk_batch_stride + (sb.k_row0 + j) * p.dk_row_stride + kvh * p.dk_head_stride;
    T* dvp = dv_base + b * p.dv_batch_stride + (sb.k_row0 + j) * p.dv_row_stride + kvh * p.dv_head_stride;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      const int d = dt * 8 + 2 * t;
      if (d < p.head_dim) {
        *reinterpret_cast<uint32_t*>(dkp + d) =
            pack2<T>(dk[dt][2 * r] * p.softmax_scale, dk[dt][2 * r + 1] * p.softmax_scale);
        *reinterpret_cast<uint32_t*>(dvp + d) = pack2<T>(dv[dt][2 * r], dv[dt][2 * r + 1]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

template <int kD>
constexpr size_t fwd_smem_bytes() {
  return static_cast<size_t>(4 * kBlockN) * Pitch<kD>::value * 2;  // Q shares stage 1
}
template <int kD>
constexpr size_t decode_smem_bytes() {
  return static_cast<size_t>(kDecodeRows + 4 * kBlockN) * Pitch<kD>::value * 2;
}
template <int kD>
constexpr size_t bwd_smem_bytes(int n_q_stages) {
  constexpr int kBM = BwdShape<kD>::kBlockM, kBN = BwdShape<kD>::kBlockN;
  return static_cast<size_t>(2 * kBN + 2 * n_q_stages * kBM) * Pitch<kD>::value * 2 + kBN * (kBM + 8) * 2 +
         2 * kBM * sizeof(float);
}

inline int padded_head_dim(int head_dim) { return head_dim <= 64 ? 64 : 128; }

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

constexpr int kDecodeMaxRowBlocks = 4;

inline int decode_row_blocks(const AttentionFwdParams& p) {
  const int64_t rows = static_cast<int64_t>(p.seqlen_q) * (p.n_heads / p.n_kv_heads);
  return static_cast<int>((rows + kDecodeRows - 1) / kDecodeRows);
}

// The split-K decode path: short queries whose (position, head) rows per kv head fit a few 16-row
// mma tiles (a decode step, speculative tokens, GQA/MQA groups up to 64 heads). Must agree between
// the workspace-size query and the launch.
inline bool use_decode_path(const AttentionFwdParams& p) {
  if (p.seqlen_q < 1 || p.seqlen_q > kDecodeRows) return false;
  const int nrb = decode_row_blocks(p);
  return nrb <= kDecodeMaxRowBlocks && static_cast<int64_t>(p.n_kv_heads) * nrb <= 65535;
}

// Key chunks per (batch, kv head): aim at ~256 CTAs in total (2 waves on 108-132 SMs), never more
// chunks than 64-key tiles. Depends only on the shapes, so the size query needs no device.
inline int decode_splits(const AttentionFwdParams& p) {
  const int64_t tiles = std::max<int64_t>(1, ceil_div(std::max(p.seqlen_k, 0), kBlockN));
  const int64_t bh = std::max<int64_t>(1, static_cast<int64_t>(p.batch) * p.n_kv_heads * decode_row_blocks(p));
  const int64_t want = std::max<int64_t>(1, (256 + bh - 1) / bh);
  return static_cast<int>(std::min(tiles, want));
}

inline size_t decode_workspace_bytes(const AttentionFwdParams& p) {
  const int64_t slots = static_cast<int64_t>(p.batch) * p.n_kv_heads * decode_row_blocks(p) * decode_splits(p);
  return static_cast<size_t>(slots) * kDecodeRows * (padded_head_dim(p.head_dim) + 2) * sizeof(float);
}

// Backward CTAs per (key block, kv head) for a GQA/MQA group: 1 (one CTA loops over all the group's
// heads and writes dK, dV directly) unless the grid would leave the GPU mostly idle (fewer than ~256
// CTAs, e.g. MQA at batch 1); then the smallest divisor of the group that reaches 256, with dK, dV
// summed in float32 workspace. Depends only on the shapes (the size query needs no device).
inline int bwd_group_splits(const AttentionFwdParams& p) {
  const int group = p.n_heads / p.n_kv_heads;
  // No queries: the direct path writes the zero dK, dV (the workspace is empty then).
  if (group <= 1 || p.seqlen_q <= 0) return 1;
  const int64_t ctas = static_cast<int64_t>(ceil_div(std::max(p.seqlen_k, 0), BwdShape<64>::kBlockN)) *
                       p.n_kv_heads * std::max(p.batch, 1);
  for (int d = 1; d <= group; ++d)
    if (group % d == 0 && ctas * d >= 256) return d;
  return group;
}

inline size_t bwd_workspace_bytes(const AttentionBwdParams& p) {
  const size_t rows_q = static_cast<size_t>(p.batch) * p.seqlen_q, rows_k = static_cast<size_t>(p.batch) * p.seqlen_k;
  size_t bytes = align256(rows_q * p.n_heads * p.head_dim * sizeof(float)) + align256(rows_q * p.n_heads * sizeof(float));
  if (bwd_group_splits(p) > 1) bytes += 2 * align256(rows_k * p.n_kv_heads * p.head_dim * sizeof(float));
  return bytes;
}

// empty: the tensor has no elements (torch gives those a null data pointer on CUDA); nothing of it
// is read or written, so it needs no pointer, alignment or strides.
void check_tensor(const void* ptr, const char* name, std::initializer_list<int64_t> strides, bool empty) {
  if (empty && ptr == nullptr) return;
  MPTK_CHECK_ARG(ptr != nullptr, name, "must not be null");
  MPTK_CHECK_ARG(reinterpret_cast<uintptr_t>(ptr) % 16 == 0, name,
                 "CUDA kernel needs a 16-byte aligned data pointer (tensor storage offset a multiple of 8 "
                 "elements)");
  for (int64_t s : strides)
    MPTK_CHECK_ARG(s % 8 == 0, name,
                   "CUDA kernel needs batch/row/head strides that are multiples of 8 elements, got stride ", s);
}

// Whether the query-side / key-side tensors may be empty: no sequence has a query (key) row.
bool no_queries(const AttentionFwdParams& p) { return p.batch == 0 || p.seqlen_q == 0 || p.n_heads == 0; }
bool no_keys(const AttentionFwdParams& p) { return p.batch == 0 || p.seqlen_k == 0 || p.n_kv_heads == 0; }

void check_common(const AttentionFwdParams& p) {
  MPTK_CHECK_ARG(p.dtype == DType::Float16 || p.dtype == DType::BFloat16, "q",
                 "CUDA kernel supports float16 and bfloat16, got ", dtype_name(p.dtype));
  MPTK_CHECK_ARG(alibi_attention_cuda_supports_head_dim(p.head_dim), "q",
                 "CUDA kernel supports head_dim that is a multiple of 8 in [8, 128], got ", p.head_dim);
  MPTK_CHECK_ARG(p.n_heads > 0 && p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0, "k",
                 "n_heads (", p.n_heads, ") must be a positive multiple of n_kv_heads (", p.n_kv_heads, ")");
  MPTK_CHECK_ARG(p.batch >= 0 && p.seqlen_q >= 0 && p.seqlen_k >= 0, "q", "negative size");
  MPTK_CHECK_ARG(p.batch <= 65535, "q", "CUDA kernel supports at most 65535 sequences, got ", p.batch);
  MPTK_CHECK_ARG(p.n_heads <= 65535, "q", "CUDA kernel supports at most 65535 heads, got ", p.n_heads);
  MPTK_CHECK_ARG((p.cu_seqlens_q == nullptr) == (p.cu_seqlens_k == nullptr), "cu_seqlens_k",
                 "cu_seqlens_q and cu_seqlens_k must be given together");
  check_tensor(p.q, "q", {p.q_batch_stride, p.q_row_stride, p.q_head_stride}, no_queries(p));
  check_tensor(p.k, "k", {p.k_batch_stride, p.k_row_stride, p.k_head_stride}, no_keys(p));
  check_tensor(p.v, "v", {p.v_batch_stride, p.v_row_stride, p.v_head_stride}, no_keys(p));
  check_tensor(p.out, "out", {p.out_batch_stride, p.out_row_stride, p.out_head_stride}, no_queries(p));
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  MPTK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename T, int kD>
void launch_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  if (use_decode_path(p)) {
    const int splits = decode_splits(p);
    const int64_t tiles = ceil_div(std::max(p.seqlen_k, 0), kBlockN);
    const int tiles_per_split = static_cast<int>(std::max<int64_t>(1, (tiles + splits - 1) / splits));
    const int nrb = decode_row_blocks(p);
    auto kernel = attention_decode_kernel<T, kD>;
    set_smem(kernel, decode_smem_bytes<kD>());
    kernel<<<dim3(splits, p.n_kv_heads * nrb, p.batch), kThreads, decode_smem_bytes<kD>(), stream>>>(
        p, splits, tiles_per_split, nrb);
    MPTK_CUDA_CHECK_LAUNCH();
    attention_decode_combine_kernel<T, kD><<<dim3(kDecodeRows * nrb, p.n_kv_heads, p.batch), kThreads, 0, stream>>>(
        p, splits, nrb);
    MPTK_CUDA_CHECK_LAUNCH();
    return;
  }
  auto kernel = attention_fwd_kernel<T, kD>;
  set_smem(kernel, fwd_smem_bytes<kD>());
  kernel<<<dim3(ceil_div(p.seqlen_q, FwdShape<kD>::kBlockM), p.n_heads, p.batch), FwdShape<kD>::kThreads,
           fwd_smem_bytes<kD>(), stream>>>(p);
  MPTK_CUDA_CHECK_LAUNCH();
}

template <typename T, int kD>
void launch_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  // With no queries only the main kernel runs (it writes zero dK, dV); with no keys dq = 0 comes
  // from the zeroed accumulator.
  const dim3 row_grid(ceil_div(p.seqlen_q, kRowsPerCta), p.n_heads, p.batch);
  if (p.seqlen_q > 0) {
    attention_bwd_delta_kernel<T><<<row_grid, kThreads, 0, stream>>>(p);
    MPTK_CUDA_CHECK_LAUNCH();
  }
  if (p.seqlen_k > 0) {
    int device = 0, optin = 0;
    MPTK_CUDA_CHECK(cudaGetDevice(&device));
    MPTK_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const int stages = static_cast<size_t>(optin) >= bwd_smem_bytes<kD>(2) ? 2 : 1;
    MPTK_CHECK_ARG(static_cast<size_t>(optin) >= bwd_smem_bytes<kD>(1), "q",
                   "the CUDA backward needs ", bwd_smem_bytes<kD>(1), " bytes of shared memory per block at head_dim ",
                   p.head_dim, "; this GPU allows ", optin);
    const int gsplits = bwd_group_splits(p);
    auto kernel = attention_bwd_kernel<T, kD>;
    set_smem(kernel, bwd_smem_bytes<kD>(stages));
    kernel<<<dim3(ceil_div(p.seqlen_k, BwdShape<kD>::kBlockN), p.n_kv_heads * gsplits, p.batch),
             BwdShape<kD>::kThreads, bwd_smem_bytes<kD>(stages), stream>>>(p, stages, gsplits);
    MPTK_CUDA_CHECK_LAUNCH();
    if (gsplits > 1) {
      attention_bwd_dkv_convert_kernel<T>
          <<<dim3(ceil_div(p.seqlen_k, kRowsPerCta), p.n_kv_heads, p.batch), kThreads, 0, stream>>>(p);
      MPTK_CUDA_CHECK_LAUNCH();
    }
  }
  if (p.seqlen_q > 0) {
    attention_bwd_dq_convert_kernel<T><<<row_grid, kThreads, 0, stream>>>(p);
    MPTK_CUDA_CHECK_LAUNCH();
  }
}

template <typename T>
void dispatch_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  if (padded_head_dim(p.head_dim) == 64)
    launch_fwd<T, 64>(p, stream);
  else
    launch_fwd<T, 128>(p, stream);
}

template <typename T>
void dispatch_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  if (padded_head_dim(p.head_dim) == 64)
    launch_bwd<T, 64>(p, stream);
  else
    launch_bwd<T, 128>(p, stream);
}

}  // namespace attn_cuda

bool alibi_attention_cuda_supports_head_dim(int head_dim) {
  return head_dim >= 8 && head_dim <= 128 && head_dim % 8 == 0;
}

size_t alibi_attention_fwd_workspace_size_cuda(const AttentionFwdParams& p) {
  if (p.batch <= 0 || p.n_heads <= 0 || p.n_kv_heads <= 0 || p.seqlen_q <= 0) return 0;
  return attn_cuda::use_decode_path(p) ? attn_cuda::decode_workspace_bytes(p) : 0;
}

void alibi_attention_fwd_cuda(const AttentionFwdParams& p, cudaStream_t stream) {
  attn_cuda::check_common(p);
  if (p.batch == 0 || p.seqlen_q == 0) return;
  const size_t need = alibi_attention_fwd_workspace_size_cuda(p);
  MPTK_CHECK_ARG(p.workspace_bytes >= need && (need == 0 || p.workspace != nullptr), "workspace",
                 "needs ", need, " bytes (alibi_attention_fwd_workspace_size_cuda), got ", p.workspace_bytes);
  if (p.dtype == DType::BFloat16)
    attn_cuda::dispatch_fwd<__nv_bfloat16>(p, stream);
  else
    attn_cuda::dispatch_fwd<__half>(p, stream);
}

size_t alibi_attention_bwd_workspace_size_cuda(const AttentionBwdParams& p) {
  // n_kv_heads <= 0: bwd_group_splits divides by it (the launcher refuses such params by name).
  if (p.batch <= 0 || p.n_heads <= 0 || p.n_kv_heads <= 0 || p.seqlen_q <= 0 || p.head_dim <= 0) return 0;
  return attn_cuda::bwd_workspace_bytes(p);
}

void alibi_attention_bwd_cuda(const AttentionBwdParams& p, cudaStream_t stream) {
  attn_cuda::check_common(p);
  if (p.batch == 0 || p.n_heads == 0) return;
  MPTK_CHECK_ARG(p.n_kv_heads <= 65535, "k", "CUDA kernel supports at most 65535 kv heads");
  const bool nq = attn_cuda::no_queries(p), nk = attn_cuda::no_keys(p);
  attn_cuda::check_tensor(p.dout, "dout", {p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride}, nq);
  attn_cuda::check_tensor(p.dq, "dq", {p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride}, nq);
  attn_cuda::check_tensor(p.dk, "dk", {p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride}, nk);
  attn_cuda::check_tensor(p.dv, "dv", {p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride}, nk);
  if (p.seqlen_q == 0 && p.seqlen_k == 0) return;
  MPTK_CHECK_ARG(p.seqlen_q == 0 || p.lse != nullptr, "lse", "the forward's logsumexp is required");
  const size_t need = alibi_attention_bwd_workspace_size_cuda(p);
  MPTK_CHECK_ARG(p.workspace_bytes >= need && (need == 0 || p.workspace != nullptr), "workspace",
                 "needs ", need, " bytes (alibi_attention_bwd_workspace_size_cuda), got ", p.workspace_bytes);
  if (p.dtype == DType::BFloat16)
    attn_cuda::dispatch_bwd<__nv_bfloat16>(p, stream);
  else
    attn_cuda::dispatch_bwd<__half>(p, stream);
}

}  // namespace mptk
