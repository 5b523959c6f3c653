// ALiBi flash attention on the CPU (float32, bfloat16, float16 storage; float32 compute), the twin
// of attention_cuda.cu: same tiling, same index math, same float32 softmax statistics.
//
//   forward   OpenMP over (batch, head, query block). For each query block, loop over key blocks:
//             S = Q K^T * scale + bias (bias from the slope, never stored), causal mask aligned to the
//             bottom-right, online softmax (running max m and sum l in float32, base 2), O += P V.
//             Key blocks wholly above the causal diagonal are never visited.
//   decode    When there are fewer work items than threads (seqlen_q = 1 against a long cache), the
//             key range is split: each split writes its partial (m, l, O) to the workspace and a
//             second loop combines them (split-K, as flash-decoding does on a GPU).
//   backward  (FA2) delta = rowsum(dO * O); P recomputed from the saved lse. No atomics: when there
//             are at least as many (batch, kv head) items as threads, one item walks its key blocks
//             once and keeps the group's dQ in a per-thread float32 buffer (like the CUDA kernel's
//             float32 dQ accumulator, without the atomics); otherwise two passes: (batch, kv head,
//             key block) items own dK and dV rows, (batch, head, query block) items own dQ rows and
//             recompute P and dS. Both schedules give bitwise the same gradients.
//
// Tiles are converted to float32 once per tile into per-thread scratch so the inner loops are plain
// float32 FMAs (attention_cpu_math.h: gemm). Head dims are padded to a multiple of 8 with zeros.
// Memory: per-thread scratch of O(block * head_dim), plus the workspace (split partials, delta), so
// O(seqlen) overall.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/attention.h"
#include "attention/attention_cpu_math.h"
#include "common/aligned_vector.h"
#include "common/error.h"

namespace mptk {
namespace {

using attn_cpu::kNegInf;

constexpr int kBlockQ = 192;
constexpr int kBlockK = 64;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxSplits = 64;

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }
inline int pad8(int x) { return (x + 7) & ~7; }

// Where sequence b lives and how long it is (batched and varlen alike).
struct SeqInfo {
  int sq = 0, sk = 0;
  int64_t q_row0 = 0, k_row0 = 0;  // first row (varlen) of this sequence
  int64_t q_off = 0, k_off = 0, v_off = 0, o_off = 0;  // element offsets of row 0, head 0
  int64_t lse_off = 0;  // lse offset of row 0 (head 0)
};

inline SeqInfo seq_info(const AttentionFwdParams& p, int b) {
  SeqInfo s;
  if (p.is_varlen()) {
    s.q_row0 = p.cu_seqlens_q[b];
    s.k_row0 = p.cu_seqlens_k[b];
    s.sq = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    s.sk = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
    s.q_off = s.q_row0 * p.q_row_stride;
    s.k_off = s.k_row0 * p.k_row_stride;
    s.v_off = s.k_row0 * p.v_row_stride;
    s.o_off = s.q_row0 * p.out_row_stride;
    s.lse_off = s.q_row0;
  } else {
    s.sq = p.seqlen_q;
    s.sk = p.seqlen_k;
    s.q_off = b * p.q_batch_stride;
    s.k_off = b * p.k_batch_stride;
    s.v_off = b * p.v_batch_stride;
    s.o_off = b * p.out_batch_stride;
    s.lse_off = b * p.lse_batch_stride;
  }
  return s;
}

inline float slope_of(const AttentionFwdParams& p, int b, int h) {
  return p.alibi_slopes ? p.alibi_slopes[b * p.alibi_slopes_batch_stride + h] : 0.f;
}

// Last key index (absolute, in [-1, sk-1]) that query row i may see.
inline int last_visible_key(const AttentionFwdParams& p, int i, int sq, int sk) {
  int lim = p.causal ? i + sk - sq : sk - 1;
  return std::min(lim, sk - 1);
}

// Number of key blocks query rows [q0, q1) need (causal blocks past the diagonal skipped).
inline int key_blocks_for(const AttentionFwdParams& p, int q0, int q1, int sq, int sk) {
  int lim = last_visible_key(p, q1 - 1, sq, sk);
  return lim < 0 ? 0 : lim / kBlockK + 1;
}

#ifdef MPTK_AVX2
inline void transpose8x8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5, __m256& r6,
                         __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r0 = _mm256_permute2f128_ps(u0, u4, 0x20);
  r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
  r2 = _mm256_permute2f128_ps(u2, u6, 0x20);
  r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
  r4 = _mm256_permute2f128_ps(u0, u4, 0x31);
  r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
  r6 = _mm256_permute2f128_ps(u2, u6, 0x31);
  r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

// Rows k0..k0+nk of one head of K (or V) -> float32 tile, zero padded to kBlockK rows.
//   transposed: dst[d * kBlockK + j]  (Dp x kBlockK, for S = Q K^T and dP = dO V^T)
//   row-major:  dst[j * Dp + d]       (kBlockK x Dp, for O += P V and dQ += dS K)
template <typename T>
void load_kv_tile(float* dst, bool transposed, const T* base, int64_t row_stride, int nk, int D, int Dp) {
  if (!transposed) {
    for (int j = 0; j < nk; ++j) attn_cpu::load_row(dst + j * Dp, base + j * row_stride, D, Dp);
    std::fill(dst + static_cast<size_t>(nk) * Dp, dst + static_cast<size_t>(kBlockK) * Dp, 0.f);
    return;
  }
#ifdef MPTK_AVX2
  // 8 key rows x 8 dims at a time, transposed in registers: the conversion costs a few percent of
  // the tile's GEMMs instead of a scalar strided scatter.
  alignas(32) float pad[8 * 8];
  for (int j0 = 0; j0 < kBlockK; j0 += 8) {
    const int rows = std::min(8, nk - j0);
    for (int d0 = 0; d0 < Dp; d0 += 8) {
      __m256 r[8];
      if (rows == 8 && d0 + 8 <= D) {
        for (int i = 0; i < 8; ++i) r[i] = load8(base + (j0 + i) * row_stride + d0);
      } else {  // key tail or head-dim tail: go through a zero-padded 8x8 block
        for (int i = 0; i < 8; ++i)
          for (int c = 0; c < 8; ++c)
            pad[i * 8 + c] = (i < rows && d0 + c < D) ? to_float(base[(j0 + i) * row_stride + d0 + c]) : 0.f;
        for (int i = 0; i < 8; ++i) r[i] = _mm256_load_ps(pad + i * 8);
      }
      transpose8x8(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (d0 + i) * kBlockK + j0, r[i]);
    }
  }
#else
  std::fill(dst, dst + static_cast<size_t>(Dp) * kBlockK, 0.f);
  for (int j = 0; j < nk; ++j) {
    const T* src = base + j * row_stride;
    for (int d = 0; d < D; ++d) dst[d * kBlockK + j] = to_float(src[d]);
  }
#endif
}

template <typename T>
void load_q_tile(float* dst, const T* base, int64_t row_stride, int nq, int D, int Dp) {
  for (int i = 0; i < nq; ++i) attn_cpu::load_row(dst + i * Dp, base + i * row_stride, D, Dp);
}

// ALiBi in the row frame. MPT's bias -slope * (sk - 1 - j) equals -slope * (last_i - j) minus the row
// constant slope * (sk - 1 - last_i), last_i the row's last visible key; softmax ignores row constants,
// so the kernels score against the row frame, where the bias is exact and small near the keys that
// carry the probability, and convert lse to MPT's frame (the header's contract) only at the boundary.
// Without a causal mask last_i = sk - 1 and the two frames coincide.
inline float lse_row_shift(const AttentionFwdParams& p, int i, int sq, int sk, float slope) {
  return slope * static_cast<float>(sk - 1 - last_visible_key(p, i, sq, sk));
}

// Scores of a (nq x kBlockK) tile in base 2: S = (Q K^T) * scale * log2(e) + row-frame bias * log2(e),
// masked (-inf) past each row's last visible key and past the end of the keys. Row maxima into row_max.
void finish_scores(const AttentionFwdParams& p, float* S, int nq, int q0, int k0, int sq, int sk, float slope,
                   float* row_max) {
  const float scale2 = p.softmax_scale * kLog2e, slope2 = slope * kLog2e;
  for (int r = 0; r < nq; ++r) {
    const int offset = k0 - last_visible_key(p, q0 + r, sq, sk);
    row_max[r] = attn_cpu::scale_alibi_mask_max(S + r * kBlockK, scale2, slope2, offset, kBlockK);
  }
}

// ---------------------------------------------------------------- forward

struct FwdScratch {
  float* q;   // kBlockQ x Dp
  float* kt;  // Dp x kBlockK
  float* v;   // kBlockK x Dp
  float* s;   // kBlockQ x kBlockK
  float* o;   // kBlockQ x Dp
  float* m;   // kBlockQ
  float* l;   // kBlockQ
  float* bmax;   // kBlockQ: this key block's row maxima, then the new running maxima
  float* alpha;  // kBlockQ: rescale factors of the accumulator rows
  FwdScratch(float* base, int Dp) {
    q = base;
    o = q + kBlockQ * Dp;
    kt = o + kBlockQ * Dp;
    v = kt + kBlockK * Dp;
    s = v + kBlockK * Dp;
    m = s + kBlockQ * kBlockK;
    l = m + kBlockQ;
    bmax = l + kBlockQ;
    alpha = bmax + kBlockQ;
  }
};

inline size_t fwd_scratch_floats(int Dp) {
  return 2ull * kBlockQ * Dp + 2ull * kBlockK * Dp + 1ull * kBlockQ * kBlockK + 4 * kBlockQ;
}

#ifdef MPTK_AVX2
constexpr int kDirectRows = 4;  // query rows per head up to which K and V are read in place (below)
#endif

// Query heads per work item: a decode step or a short chunk (seqlen_q x group <= kBlockQ) stacks all
// query heads of a KV group into one tile, so each K/V tile is converted once for the whole group
// (GQA/MQA decode would otherwise convert and read it once per query head). The direct path (few
// rows per head, K and V read in place) stacks every head of the sequence: its key loop then walks
// whole cache rows (all KV heads, contiguous) instead of one head's 64-256 bytes of each row, a
// stride the hardware prefetchers follow poorly (decode from a cold cache read at ~11 GB/s against
// the ~25-30 GB/s of a sequential read here). Splitting the keys keeps every thread busy instead.
inline int fwd_heads_per_item(const AttentionFwdParams& p) {
#ifdef MPTK_AVX2
  if (p.seqlen_q <= kDirectRows && static_cast<long>(p.seqlen_q) * p.n_heads <= kBlockQ) return p.n_heads;
#endif
  const int group = p.n_heads / p.n_kv_heads;
  return (group > 1 && static_cast<long>(p.seqlen_q) * group <= kBlockQ) ? group : 1;
}

#ifdef MPTK_AVX2
// ---------------------------------------------------------------- few-row tiles (decode)
//
// A decode step has one query row per head (or one per head of a GQA group): there the tile path's
// K transpose and V conversion into scratch cost more than the two 1-row GEMMs, and the kernel ran at
// a fifth of the machine's read bandwidth. With at most kDirectRows query rows per head, S = Q K^T and
// O += P V read K and V straight from their storage instead, converting 8 elements in registers on the
// way. O += P V keeps the tile GEMM's order (per element, keys in sequence), so it rounds the same;
// S sums each dot product in 8 lanes and then across them, which rounds differently from the tile path.
// The key block is walked in chunks of kDirectChunk keys, every KV head of the tile per chunk, so the
// reads move through the cache rows in order; a dot product or an output element does not depend on
// the chunking or on which heads share the tile.
constexpr int kDirectChunk = 16;
// Software prefetch distance of the direct path, in keys (the next block's rows too). Decode over
// 12-layer caches at 2k-16k keys here: ~10% faster than none or 32 (medians; the machine is noisy).
constexpr int kPrefetchKeys = 64;

// Prefetches rows [j0, j1) of n_kv KV heads (head c at base + c * head_stride): one span per row when
// the heads are adjacent (a KV cache row), else one per head.
template <typename T>
inline void prefetch_rows(const T* base, int64_t row_stride, int64_t head_stride, int n_kv, int j0, int j1, int D) {
  const bool adjacent = head_stride == D;
  const int64_t bytes = static_cast<int64_t>(adjacent ? n_kv * D : D) * sizeof(T);
  for (int j = j0; j < j1; ++j)
    for (int c = 0; c < (adjacent ? 1 : n_kv); ++c) {
      const char* row = reinterpret_cast<const char*>(base + j * row_stride + c * head_stride);
      for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(row + off, _MM_HINT_T0);
    }
}

// S[r * kBlockK + j + t] = q_r . k_{j+t} over the first D8 dims (t < KJ), R query rows of stride Dp.
// KJ keys at a time: R * KJ independent FMA chains instead of one per key.
template <typename T, int R, int KJ>
inline void qk_direct_keys(float* S, const float* q, int Dp, const T* k, int64_t ks, int j, int D8) {
  __m256 acc[R][KJ];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < KJ; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int d = 0; d < D8; d += 8) {
    // R query vectors, then one key vector at a time: R * KJ accumulators + R + 1 live registers
    // (holding all KJ key vectors as well spilled at R = 1, KJ = 8: 17 of AVX2's 16)
    __m256 qv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) qv[r] = _mm256_loadu_ps(q + r * Dp + d);
#pragma GCC unroll 8
    for (int t = 0; t < KJ; ++t) {
      const __m256 kv = load8(k + (j + t) * ks + d);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(qv[r], kv, acc[r][t]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < KJ; ++t) S[r * kBlockK + j + t] = hsum8(acc[r][t]);
}

// S[r * kBlockK + j] for keys j in [j0, j1) (K row j at k + j * ks), R query rows of stride Dp.
template <typename T, int R>
void qk_direct(float* S, const float* q, int Dp, const T* k, int64_t ks, int j0, int j1, int D) {
  const int D8 = D & ~7;
  // R * KJ independent FMA chains: 8 cover the FMA latency (4 cycles, 2 per cycle). One query row per
  // KV head (MHA decode) at 4 keys was latency-bound. (qk_direct_keys keeps R + 1 vector registers
  // besides the accumulators: holding all 8 key vectors spilled to the stack.)
  constexpr int KJ = R == 1 ? 8 : (R <= 2 ? 4 : 2);
  int j = j0;
  for (; j + KJ <= j1; j += KJ) qk_direct_keys<T, R, KJ>(S, q, Dp, k, ks, j, D8);
  for (; j < j1; ++j) qk_direct_keys<T, R, 1>(S, q, Dp, k, ks, j, D8);
  if (D8 < D)
    for (int r = 0; r < R; ++r)
      for (int jj = j0; jj < j1; ++jj)
        for (int d = D8; d < D; ++d) S[r * kBlockK + jj] += q[r * Dp + d] * to_float(k[jj * ks + d]);
}

// o[0 .. 8*NC) += sum_j P[j] * v_j[0 .. 8*NC), the accumulator in registers across the key loop.
template <typename T, int NC>
inline void pv_direct_chunk(float* o, const float* P, const T* v, int64_t vs, int nk) {
  __m256 acc[NC];
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) acc[c] = _mm256_loadu_ps(o + 8 * c);
  for (int j = 0; j < nk; ++j) {
    const __m256 pj = _mm256_set1_ps(P[j]);
    const T* vj = v + j * vs;
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) acc[c] = _mm256_fmadd_ps(pj, load8(vj + 8 * c), acc[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) _mm256_storeu_ps(o + 8 * c, acc[c]);
}

#ifdef MPTK_AVX512_PATH
// The direct path's 512-bit twin (cpu_avx512()). S = q K^T sums each dot product in 16 lanes over the
// head dim (the last, partial 16 by masked loads), then reduces 16 keys' accumulators at once with a
// transposing tree (reduce16: 45 shuffles and adds for the 16 sums, where a horizontal sum costs ~8
// per key); every key's lanes are added in the same tree whichever slot it has, so a score does not
// depend on the chunking. It rounds differently from the 256-bit path (8 lanes, then across them).
// O += P V is per output element the 256-bit path's chain (same keys, same order): bitwise equal.
MPTK_AVX512_FN inline __m512 reduce16(const __m512 (&a)[16]) {
  __m512 x[8], y[4];
#pragma GCC unroll 8
  for (int t = 0; t < 8; ++t)  // keys 2t, 2t+1: [a.lo256 + a.hi256, b.lo256 + b.hi256]
    x[t] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * t], a[2 * t + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * t], a[2 * t + 1], 0xEE));
#pragma GCC unroll 4
  for (int t = 0; t < 4; ++t)  // 128-bit block i: key 4t + i, 4 partial sums
    y[t] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * t], x[2 * t + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * t], x[2 * t + 1], 0xDD));
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x44), _mm512_shuffle_ps(y[0], y[1], 0xEE));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_ps(y[2], y[3], 0x44), _mm512_shuffle_ps(y[2], y[3], 0xEE));
  const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(z0, z1, 0x88), _mm512_shuffle_ps(z0, z1, 0xDD));
  // w's lane 4i + c holds key 4c + i
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), w);
}

// S[j .. j + n) = q . k_{j+t} (t < n <= 16) for one query row q (float32, Dp >= D).
template <typename T, bool kFull>
MPTK_AVX512_FN inline void qk_direct16_512(float* S, const float* q, const T* k, int64_t ks, int j, int n, int D) {
  __m512 a[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) a[t] = _mm512_setzero_ps();
  int d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m512 qv = _mm512_loadu_ps(q + d);
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t)
      if (kFull || t < n) a[t] = _mm512_fmadd_ps(qv, load16(k + (j + t) * ks + d), a[t]);
  }
  if (d < D) {
    const __mmask16 m = static_cast<__mmask16>((1u << (D - d)) - 1);
    const __m512 qv = _mm512_maskz_loadu_ps(m, q + d);
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t)
      if (kFull || t < n) a[t] = _mm512_fmadd_ps(qv, load16_first(k + (j + t) * ks + d, m), a[t]);
  }
  const __m512 s = reduce16(a);
  if (kFull)
    _mm512_storeu_ps(S + j, s);
  else
    _mm512_mask_storeu_ps(S + j, static_cast<__mmask16>((1u << n) - 1), s);
}

// S[r * kBlockK + j] for keys j in [j0, j1), rows r < R (query row r at q + r * Dp).
template <typename T>
MPTK_AVX512_FN void qk_direct512(float* S, const float* q, int R, int Dp, const T* k, int64_t ks, int j0, int j1,
                                 int D) {
  for (int r = 0; r < R; ++r) {
    int j = j0;
    for (; j + 16 <= j1; j += 16) qk_direct16_512<T, true>(S + r * kBlockK, q + r * Dp, k, ks, j, 16, D);
    if (j < j1) qk_direct16_512<T, false>(S + r * kBlockK, q + r * Dp, k, ks, j, j1 - j, D);
  }
}

template <typename T, int NC>
MPTK_AVX512_FN inline void pv_direct_chunk512(float* o, const float* P, const T* v, int64_t vs, int nk) {
  __m512 acc[NC];
#pragma GCC unroll 4
  for (int c = 0; c < NC; ++c) acc[c] = _mm512_loadu_ps(o + 16 * c);
  for (int j = 0; j < nk; ++j) {
    const __m512 pj = _mm512_set1_ps(P[j]);
    const T* vj = v + j * vs;
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) acc[c] = _mm512_fmadd_ps(pj, load16(vj + 16 * c), acc[c]);
  }
#pragma GCC unroll 4
  for (int c = 0; c < NC; ++c) _mm512_storeu_ps(o + 16 * c, acc[c]);
}

template <typename T>
void pv_direct(float* O, const float* P, int rows, int Dp, const T* v, int64_t vs, int nk, int D);

template <typename T>
MPTK_AVX512_FN void pv_direct512(float* O, const float* P, int rows, int Dp, const T* v, int64_t vs, int nk, int D) {
  const int D16 = D & ~15;
  for (int r = 0; r < rows; ++r) {
    float* o = O + static_cast<size_t>(r) * Dp;
    const float* p = P + r * kBlockK;
    int d = 0;
    for (; d + 64 <= D16; d += 64) pv_direct_chunk512<T, 4>(o + d, p, v + d, vs, nk);
    for (; d + 32 <= D16; d += 32) pv_direct_chunk512<T, 2>(o + d, p, v + d, vs, nk);
    for (; d < D16; d += 16) pv_direct_chunk512<T, 1>(o + d, p, v + d, vs, nk);
  }
  if (D16 < D)  // the last 1-15 elements of each row: the 256-bit code (same chains)
    pv_direct<T>(O + D16, P, rows, Dp, v + D16, vs, nk, D - D16);
}
#endif

// O[r] += P[r] V over nk keys for `rows` rows (row r of O at r * Dp, of P at r * kBlockK).
template <typename T>
void pv_direct(float* O, const float* P, int rows, int Dp, const T* v, int64_t vs, int nk, int D) {
  const int D8 = D & ~7;
  for (int r = 0; r < rows; ++r) {
    float* o = O + static_cast<size_t>(r) * Dp;
    const float* p = P + r * kBlockK;
    int d = 0;
    for (; d + 64 <= D8; d += 64) pv_direct_chunk<T, 8>(o + d, p, v + d, vs, nk);
    for (; d + 32 <= D8; d += 32) pv_direct_chunk<T, 4>(o + d, p, v + d, vs, nk);
    for (; d < D8; d += 8) pv_direct_chunk<T, 1>(o + d, p, v + d, vs, nk);
    for (; d < D; ++d) {
      float a = o[d];
      for (int j = 0; j < nk; ++j) a += p[j] * to_float(v[j * vs + d]);
      o[d] = a;
    }
  }
}
#endif

// Processes query rows [q0, q0+nq) of heads h .. h+heads-1 (one KV group) in sequence b against key
// blocks [kb_begin, kb_end); tile row g*nq + r is head h+g, row q0+r. Leaves the unnormalised
// accumulator in w.o and the base-2 running max / sum in w.m, w.l.
template <typename T>
void fwd_tile(const AttentionFwdParams& p, const SeqInfo& si, int b, int h, int heads, int q0, int nq,
              int kb_begin, int kb_end, FwdScratch& w) {
  const int D = p.head_dim, Dp = pad8(D);
  const int hk = h / (p.n_heads / p.n_kv_heads);
  const int rows = heads * nq;
  const T* kbase = static_cast<const T*>(p.k) + si.k_off + hk * p.k_head_stride;
  const T* vbase = static_cast<const T*>(p.v) + si.v_off + hk * p.v_head_stride;

  for (int g = 0; g < heads; ++g) {
    const T* q = static_cast<const T*>(p.q) + si.q_off + (h + g) * p.q_head_stride + q0 * p.q_row_stride;
    load_q_tile(w.q + static_cast<size_t>(g) * nq * Dp, q, p.q_row_stride, nq, D, Dp);
  }
  std::fill(w.o, w.o + static_cast<size_t>(rows) * Dp, 0.f);
  std::fill(w.m, w.m + rows, kNegInf);
  std::fill(w.l, w.l + rows, 0.f);

#ifdef MPTK_AVX2
  // Decode and short chunks: K and V read in place, no tiles. Chosen by the query rows per head, not
  // by the tile's rows, so a head's arithmetic is the same whether or not its GQA group shares the tile.
  const bool direct = nq <= kDirectRows;
#else
  const bool direct = false;
#endif
#ifdef MPTK_AVX512_PATH
  const bool wide = direct && cpu_avx512();  // the direct path's 512-bit twin
#endif
  // KV heads in the tile and tile rows per KV head (a tile holds one KV head's rows, or, on the direct
  // path, possibly every head's; its heads start at a KV group's first head).
  const int group = p.n_heads / p.n_kv_heads;
  const int n_kv = heads > group ? heads / group : 1;
  [[maybe_unused]] const int per_kv = rows / n_kv;  // read by the direct path (AVX2 builds)
  for (int kb = kb_begin; kb < kb_end; ++kb) {
    const int k0 = kb * kBlockK, nk = std::min(kBlockK, si.sk - k0);
    // Causal: tile rows above r0 see no key of this block (their scores would all be -inf, P = 0,
    // O += 0): skipped. Tiles only, one head per tile (stacked GQA heads repeat the rows per head).
    // r0 is rounded down to a multiple of 8: that kept exp2_diff's 8-row vectors on the same rows
    // while its tail rounded differently; the tail now goes through the same vector code, and the
    // other passes over rows are per row, so the rounding only costs a few skipped rows. Either way
    // bitwise the results of computing every row. The CUDA kernel computes them all.
    const int r0 = (p.causal && heads == 1 && !direct) ? std::clamp(k0 - (si.sk - si.sq) - q0, 0, nq) & ~7 : 0;
    const int live = rows - r0;
    if (direct) {
#ifdef MPTK_AVX2
      // Rows of KV head hk + c: [c * per_kv, (c + 1) * per_kv), in runs of at most kDirectRows.
      const T* kp = kbase + k0 * p.k_row_stride;
      for (int j0 = 0; j0 < nk; j0 += kDirectChunk) {
        const int j1 = std::min(nk, j0 + kDirectChunk);
        {  // keys kPrefetchKeys ahead (into the next block too): in flight while these compute
          const int pf0 = j0 + kPrefetchKeys, pf1 = std::min(j1 + kPrefetchKeys, std::min(kb_end * kBlockK, si.sk) - k0);
          if (pf0 < pf1) {
            prefetch_rows(kp, p.k_row_stride, p.k_head_stride, n_kv, pf0, pf1, D);
            prefetch_rows(vbase + k0 * p.v_row_stride, p.v_row_stride, p.v_head_stride, n_kv, pf0, pf1, D);
          }
        }
        for (int c = 0; c < n_kv; ++c) {
          const T* kc = kp + c * p.k_head_stride;
#ifdef MPTK_AVX512_PATH
          if (wide) {
            qk_direct512<T>(w.s + c * per_kv * kBlockK, w.q + static_cast<size_t>(c) * per_kv * Dp, per_kv, Dp, kc,
                            p.k_row_stride, j0, j1, D);
            continue;
          }
#endif
          for (int r = c * per_kv; r < (c + 1) * per_kv; r += kDirectRows) {
            float* S = w.s + r * kBlockK;
            const float* q = w.q + static_cast<size_t>(r) * Dp;
            switch (std::min(kDirectRows, (c + 1) * per_kv - r)) {
              case 1: qk_direct<T, 1>(S, q, Dp, kc, p.k_row_stride, j0, j1, D); break;
              case 2: qk_direct<T, 2>(S, q, Dp, kc, p.k_row_stride, j0, j1, D); break;
              case 3: qk_direct<T, 3>(S, q, Dp, kc, p.k_row_stride, j0, j1, D); break;
              default: qk_direct<T, 4>(S, q, Dp, kc, p.k_row_stride, j0, j1, D); break;
            }
          }
        }
      }
      for (int r = 0; r < rows; ++r) std::fill(w.s + r * kBlockK + nk, w.s + (r + 1) * kBlockK, 0.f);  // masked
#endif
    } else {
      load_kv_tile(w.kt, true, kbase + k0 * p.k_row_stride, p.k_row_stride, nk, D, Dp);
      load_kv_tile(w.v, false, vbase + k0 * p.v_row_stride, p.v_row_stride, nk, D, Dp);
      attn_cpu::gemm(live, kBlockK, Dp, w.q + static_cast<size_t>(r0) * Dp, Dp, w.kt, kBlockK,
                     w.s + static_cast<size_t>(r0) * kBlockK, kBlockK, false);
    }
    for (int g = 0; g < heads; ++g)  // rows r0.. of each head's nq (r0 > 0 only with one head)
      finish_scores(p, w.s + (static_cast<size_t>(g) * nq + r0) * kBlockK, nq - r0, q0 + r0, k0, si.sq, si.sk,
                    slope_of(p, b, h + g), w.bmax + g * nq + r0);
    // New running max per row, then every row's rescale factor 2^(m_old - m_new) in one vector pass
    // (0 on a row's first visible block).
    for (int r = r0; r < rows; ++r) w.bmax[r] = attn_cpu::nan_max(w.m[r], w.bmax[r]);
    attn_cpu::exp2_diff(w.alpha + r0, w.m + r0, w.bmax + r0, live);
    for (int r = r0; r < rows; ++r) {
      float* s = w.s + r * kBlockK;
      const float m_new = w.bmax[r];
      const float rowsum = attn_cpu::exp2_sub_sum(s, kBlockK, m_new);
      if (m_new == kNegInf) continue;  // nothing visible yet in this row: O, l stay 0
      const float alpha = w.alpha[r];
      if (alpha != 1.f) attn_cpu::scale_row(w.o + r * Dp, Dp, alpha);
      w.l[r] = w.l[r] * alpha + rowsum;
      w.m[r] = m_new;
    }
#ifdef MPTK_AVX2
    if (direct) {
      const T* vp = vbase + k0 * p.v_row_stride;
      for (int j0 = 0; j0 < nk; j0 += kDirectChunk) {
        const int n = std::min(nk, j0 + kDirectChunk) - j0;
        for (int c = 0; c < n_kv; ++c) {
#ifdef MPTK_AVX512_PATH
          if (wide) {
            pv_direct512<T>(w.o + static_cast<size_t>(c) * per_kv * Dp, w.s + c * per_kv * kBlockK + j0, per_kv, Dp,
                            vp + c * p.v_head_stride + j0 * p.v_row_stride, p.v_row_stride, n, D);
            continue;
          }
#endif
          pv_direct<T>(w.o + static_cast<size_t>(c) * per_kv * Dp, w.s + c * per_kv * kBlockK + j0, per_kv, Dp,
                       vp + c * p.v_head_stride + j0 * p.v_row_stride, p.v_row_stride, n, D);
        }
      }
      continue;
    }
#endif
    attn_cpu::gemm(live, Dp, kBlockK, w.s + static_cast<size_t>(r0) * kBlockK, kBlockK, w.v, Dp,
                   w.o + static_cast<size_t>(r0) * Dp, Dp, true);
  }
}

// Normalises w.o and writes out rows and lse. Rows that saw no key (only possible with an empty key
// sequence) get zeros and lse = -inf, like a softmax over nothing whose terms are all dropped.
// Tile rows row0 .. row0+nq-1 hold head h, rows q0 .. q0+nq-1.
template <typename T>
void fwd_store(const AttentionFwdParams& p, const SeqInfo& si, int h, int q0, int nq, int row0, float slope,
               const FwdScratch& w) {
  const int D = p.head_dim, Dp = pad8(D);
  T* out = static_cast<T*>(p.out) + si.o_off + h * p.out_head_stride + q0 * p.out_row_stride;
  for (int r = 0; r < nq; ++r) {
    const float l = w.l[row0 + r];
    attn_cpu::store_row(out + r * p.out_row_stride, w.o + static_cast<size_t>(row0 + r) * Dp, D,
                        l != 0.f ? 1.f / l : 0.f);
    if (p.lse)
      p.lse[si.lse_off + h * p.lse_head_stride + q0 + r] =
          l != 0.f ? (w.m[row0 + r] + std::log2(l)) * kLn2 - lse_row_shift(p, q0 + r, si.sq, si.sk, slope) : kNegInf;
  }
}

// Split-K decode: the number of key splits for these params, or 1. Shared by the workspace query and
// the launcher, so the caller's workspace is exactly what the launcher will use.
int fwd_num_splits(const AttentionFwdParams& p) {
  if (p.seqlen_q > kBlockQ || p.batch <= 0 || p.n_heads <= 0) return 1;
  const int threads = omp_get_max_threads();
  const long items = static_cast<long>(p.batch) * (p.n_heads / fwd_heads_per_item(p));  // one query block each
  const int nkb = ceil_div(std::max(p.seqlen_k, 0), kBlockK);
  if (threads < 2 || items >= threads || nkb < 4) return 1;
  // Enough splits to give every thread about two pieces, each of at least two key blocks.
  long want = (2L * threads + items - 1) / items;
  int splits = static_cast<int>(std::min<long>({want, nkb / 2, kMaxSplits}));
  return std::max(splits, 1);
}

inline size_t split_row_floats(const AttentionFwdParams& p) { return static_cast<size_t>(p.head_dim) + 2; }

size_t fwd_split_workspace_bytes(const AttentionFwdParams& p, int splits) {
  if (splits <= 1) return 0;
  return static_cast<size_t>(splits) * p.batch * p.n_heads * p.seqlen_q * split_row_floats(p) * sizeof(float);
}

// This thread's forward scratch: kept from call to call (grown as needed) and never cleared, since
// every tile writes what it reads (fwd_tile fills q, o, m, l and the scores it uses; the tile loads pad
// with zeros). A decode call over a short cache spent ~6% of its time zeroing a fresh 2 x 180 KB.
// Sanitizer builds fill it with NaN on every call, so a read before a write shows in the outputs.
float* fwd_thread_scratch(size_t floats) {
  thread_local aligned_vector<float> buf;
  if (buf.size() < floats) buf.resize(floats);
#if defined(__SANITIZE_ADDRESS__)
  std::fill(buf.begin(), buf.begin() + floats, std::numeric_limits<float>::quiet_NaN());
#endif
  return buf.data();
}

template <typename T>
void fwd_run(const AttentionFwdParams& p) {
  const int Dp = pad8(p.head_dim);
  int splits = fwd_num_splits(p);
  if (fwd_split_workspace_bytes(p, splits) > p.workspace_bytes || (splits > 1 && !p.workspace)) splits = 1;
  const int nthreads = omp_get_max_threads();
  const int nqb = ceil_div(std::max(p.seqlen_q, 0), kBlockQ);
  const int hpi = fwd_heads_per_item(p);  // query heads per item (1, or a whole KV group)
  const int head_items = p.n_heads / hpi;
  const long items = static_cast<long>(p.batch) * head_items * nqb * splits;

  // Item order: query block descending (causal blocks near the bottom cost the most) so dynamic
  // scheduling hands out the long items first.
#pragma omp parallel num_threads(nthreads)
  {
    const ScopedFlushDenormals ftz;
    FwdScratch w(fwd_thread_scratch(fwd_scratch_floats(Dp)), Dp);
#pragma omp for schedule(dynamic, 1)
    for (long it = 0; it < items; ++it) {
      long rest = it;
      const int split = static_cast<int>(rest % splits);
      rest /= splits;
      const int h = static_cast<int>(rest % head_items) * hpi;
      rest /= head_items;
      const int b = static_cast<int>(rest % p.batch);
      const int qb = nqb - 1 - static_cast<int>(rest / p.batch);
      const SeqInfo si = seq_info(p, b);
      const int q0 = qb * kBlockQ;
      if (q0 >= si.sq) continue;
      const int nq = std::min(kBlockQ, si.sq - q0);
      const int nkb = key_blocks_for(p, q0, q0 + nq, si.sq, si.sk);
      if (splits == 1) {
        fwd_tile<T>(p, si, b, h, hpi, q0, nq, 0, nkb, w);
        for (int g = 0; g < hpi; ++g) fwd_store<T>(p, si, h + g, q0, nq, g * nq, slope_of(p, b, h + g), w);
      } else {
        const int per = ceil_div(nkb, splits);
        const int kb0 = std::min(nkb, split * per), kb1 = std::min(nkb, kb0 + per);
        fwd_tile<T>(p, si, b, h, hpi, q0, nq, kb0, kb1, w);
        for (int g = 0; g < hpi; ++g) {
          float* part = static_cast<float*>(p.workspace) + ((static_cast<size_t>(split) * p.batch + b) * p.n_heads + h + g) *
                                                               p.seqlen_q * split_row_floats(p);
          for (int r = 0; r < nq; ++r) {
            const int row = g * nq + r;
            float* dst = part + (q0 + r) * split_row_floats(p);
            std::copy(w.o + static_cast<size_t>(row) * Dp, w.o + static_cast<size_t>(row) * Dp + p.head_dim, dst);
            dst[p.head_dim] = w.m[row];
            dst[p.head_dim + 1] = w.l[row];
          }
        }
      }
    }
  }
  if (splits == 1) return;

  // Combine: with M = max_s m_s, l = sum_s l_s 2^(m_s - M) and O = sum_s O_s 2^(m_s - M) / l.
  const size_t rowf = split_row_floats(p);
  const long rows = static_cast<long>(p.batch) * p.n_heads * p.seqlen_q;
#pragma omp parallel num_threads(nthreads)
  {
    const ScopedFlushDenormals ftz;
    aligned_vector<float> acc(Dp);
#pragma omp for schedule(static)
    for (long it = 0; it < rows; ++it) {
      const int i = static_cast<int>(it % p.seqlen_q);
      const int h = static_cast<int>((it / p.seqlen_q) % p.n_heads);
      const int b = static_cast<int>(it / (static_cast<long>(p.seqlen_q) * p.n_heads));
      const SeqInfo si = seq_info(p, b);
      if (i >= si.sq) continue;
      auto part = [&](int s) {
        return static_cast<const float*>(p.workspace) +
               (((static_cast<size_t>(s) * p.batch + b) * p.n_heads + h) * p.seqlen_q + i) * rowf;
      };
      float M = kNegInf;
      for (int s = 0; s < splits; ++s) M = attn_cpu::nan_max(M, part(s)[p.head_dim]);
      std::fill(acc.begin(), acc.end(), 0.f);
      float l = 0.f;
      if (M != kNegInf) {
        for (int s = 0; s < splits; ++s) {
          const float* ps = part(s);
          if (ps[p.head_dim] == kNegInf) continue;
          const float c = std::exp2(ps[p.head_dim] - M);
          l += ps[p.head_dim + 1] * c;
          for (int d = 0; d < p.head_dim; ++d) acc[d] += ps[d] * c;
        }
      }
      T* out = static_cast<T*>(p.out) + si.o_off + h * p.out_head_stride + i * p.out_row_stride;
      attn_cpu::store_row(out, acc.data(), p.head_dim, l != 0.f ? 1.f / l : 0.f);
      if (p.lse)
        p.lse[si.lse_off + h * p.lse_head_stride + i] =
            l != 0.f ? (M + std::log2(l)) * kLn2 - lse_row_shift(p, i, si.sq, si.sk, slope_of(p, b, h)) : kNegInf;
    }
  }
}

// ---------------------------------------------------------------- backward

// delta[(b * H + h) * seqlen_q + i] lives at the start of the backward workspace.
inline size_t delta_floats(const AttentionFwdParams& p) {
  return static_cast<size_t>(p.batch) * p.n_heads * std::max(p.seqlen_q, 0);
}

// Per-thread scratch for both backward passes.
struct BwdScratch {
  float *q, *dout, *kt, *vt, *k, *p, *ds, *acc0, *acc1, *lse2, *delta, *bmax;
  static size_t floats(int Dp) {
    return 2ull * kBlockQ * Dp      // q, dout
           + 3ull * kBlockK * Dp    // kt, vt, k
           + 2ull * kBlockQ * kBlockK  // p, ds (P^T dO and dS^T Q read them transposed in place)
           + 2ull * std::max(kBlockQ, kBlockK) * Dp  // two float32 accumulators
           + 3ull * kBlockQ;
  }
  BwdScratch(float* base, int Dp) {
    q = base;
    dout = q + kBlockQ * Dp;
    kt = dout + kBlockQ * Dp;
    vt = kt + kBlockK * Dp;
    k = vt + kBlockK * Dp;
    p = k + kBlockK * Dp;
    ds = p + kBlockQ * kBlockK;
    acc0 = ds + kBlockQ * kBlockK;
    acc1 = acc0 + std::max(kBlockQ, kBlockK) * Dp;
    lse2 = acc1 + std::max(kBlockQ, kBlockK) * Dp;
    delta = lse2 + kBlockQ;
    bmax = delta + kBlockQ;
  }
};

// For query rows [q0, q0+nq) (already in w.q, w.dout, w.lse2, w.delta) and the key tile in w.kt,
// w.vt: P = 2^(S - lse) into w.p and dS = P * (dO V^T - delta) into w.ds.
void bwd_probs_and_dscores(const AttentionFwdParams& p, BwdScratch& w, int nq, int q0, int k0, int sq, int sk,
                           float slope, int Dp) {
  attn_cpu::gemm(nq, kBlockK, Dp, w.q, Dp, w.kt, kBlockK, w.p, kBlockK, false);
  finish_scores(p, w.p, nq, q0, k0, sq, sk, slope, w.bmax);
  for (int r = 0; r < nq; ++r) attn_cpu::exp2_sub_sum(w.p + r * kBlockK, kBlockK, w.lse2[r]);
  attn_cpu::gemm(nq, kBlockK, Dp, w.dout, Dp, w.vt, kBlockK, w.ds, kBlockK, false);
  for (int r = 0; r < nq; ++r)
    attn_cpu::softmax_grad_row(w.ds + r * kBlockK, w.p + r * kBlockK, w.delta[r], kBlockK);
}

// Loads query rows [q0, q0+nq) of head h: q, dO as float32 tiles, lse (base 2) and delta.
template <typename T>
void bwd_load_query_side(const AttentionBwdParams& p, const SeqInfo& si, const float* delta_ws, int b, int h, int q0,
                         int nq, BwdScratch& w) {
  const int D = p.head_dim, Dp = pad8(D);
  load_q_tile(w.q, static_cast<const T*>(p.q) + si.q_off + h * p.q_head_stride + q0 * p.q_row_stride,
              p.q_row_stride, nq, D, Dp);
  const int64_t do_off = p.is_varlen() ? si.q_row0 * p.dout_row_stride : b * p.dout_batch_stride;
  load_q_tile(w.dout, static_cast<const T*>(p.dout) + do_off + h * p.dout_head_stride + q0 * p.dout_row_stride,
              p.dout_row_stride, nq, D, Dp);
  for (int r = 0; r < nq; ++r) {
    // A row that saw nothing has lse = -inf; +inf here makes every P of that row exactly 0.
    const float lse = p.lse[si.lse_off + h * p.lse_head_stride + q0 + r];
    const float shift = lse_row_shift(p, q0 + r, si.sq, si.sk, slope_of(p, b, h));
    w.lse2[r] = lse == kNegInf ? std::numeric_limits<float>::infinity() : (lse + shift) * kLog2e;
    w.delta[r] = delta_ws[(static_cast<size_t>(b) * p.n_heads + h) * p.seqlen_q + q0 + r];
  }
}

// dK and dV of key block kb of KV head hk in sequence b: sums over the group's query heads and every
// query block that sees the block. With dq_acc (float32, group x si.sq rows of Dp, zero-initialised)
// the same P and dS also give dQ += dS K for each visited query block, so the single-pass schedule
// needs no second pass; without it, pass 2 recomputes P and dS per query block.
template <typename T>
void bwd_key_block(const AttentionBwdParams& p, const SeqInfo& si, const float* delta_ws, int b, int hk, int kb,
                   BwdScratch& w, float* dq_acc) {
  const int D = p.head_dim, Dp = pad8(D);
  const int group = p.n_heads / p.n_kv_heads;
  const int k0 = kb * kBlockK;
  if (k0 >= si.sk) return;
  const int nk = std::min(kBlockK, si.sk - k0);
  const T* kbase = static_cast<const T*>(p.k) + si.k_off + hk * p.k_head_stride + k0 * p.k_row_stride;
  const T* vbase = static_cast<const T*>(p.v) + si.v_off + hk * p.v_head_stride + k0 * p.v_row_stride;
  load_kv_tile(w.kt, true, kbase, p.k_row_stride, nk, D, Dp);
  load_kv_tile(w.vt, true, vbase, p.v_row_stride, nk, D, Dp);
  if (dq_acc != nullptr) load_kv_tile(w.k, false, kbase, p.k_row_stride, nk, D, Dp);
  float* dk = w.acc0;
  float* dv = w.acc1;
  std::fill(dk, dk + static_cast<size_t>(kBlockK) * Dp, 0.f);
  std::fill(dv, dv + static_cast<size_t>(kBlockK) * Dp, 0.f);
  // First query row that sees key k0: i + sk - sq >= k0.
  const int i_first = p.causal ? std::max(0, k0 - (si.sk - si.sq)) : 0;
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const float slope = slope_of(p, b, h);
    for (int qb0 = (i_first / kBlockQ) * kBlockQ; qb0 < si.sq; qb0 += kBlockQ) {
      // The query block's rows from the first that sees this key block: the rows above it would add
      // P = dS = 0 terms (exact zeros: skipping them leaves every sum bitwise the same).
      const int q0 = std::max(qb0, i_first), nq = std::min(kBlockQ, si.sq - qb0) - (q0 - qb0);
      if (nq <= 0) continue;
      bwd_load_query_side<T>(p, si, delta_ws, b, h, q0, nq, w);
      bwd_probs_and_dscores(p, w, nq, q0, k0, si.sq, si.sk, slope, Dp);
      attn_cpu::gemm_at(nk, Dp, nq, w.p, kBlockK, w.dout, Dp, dv, Dp, true);  // dV += P^T dO
      attn_cpu::gemm_at(nk, Dp, nq, w.ds, kBlockK, w.q, Dp, dk, Dp, true);  // dK += dS^T Q
      if (dq_acc != nullptr) {  // dQ += dS K, the same product pass 2 forms (same order over key blocks)
        float* dq = dq_acc + (static_cast<size_t>(h - hk * group) * si.sq + q0) * Dp;
        attn_cpu::gemm(nq, Dp, kBlockK, w.ds, kBlockK, w.k, Dp, dq, Dp, true);
      }
    }
  }
  const int64_t dk_off = p.is_varlen() ? si.k_row0 * p.dk_row_stride : b * p.dk_batch_stride;
  const int64_t dv_off = p.is_varlen() ? si.k_row0 * p.dv_row_stride : b * p.dv_batch_stride;
  T* dkp = static_cast<T*>(p.dk) + dk_off + hk * p.dk_head_stride + k0 * p.dk_row_stride;
  T* dvp = static_cast<T*>(p.dv) + dv_off + hk * p.dv_head_stride + k0 * p.dv_row_stride;
  for (int j = 0; j < nk; ++j) {
    attn_cpu::store_row(dkp + j * p.dk_row_stride, dk + j * Dp, D, p.softmax_scale);
    attn_cpu::store_row(dvp + j * p.dv_row_stride, dv + j * Dp, D, 1.f);
  }
}

// Backward schedule. Single pass: one item per (batch, KV head) walks every key block once and keeps
// the group's dQ in a per-thread float32 buffer, so P and dS are formed once (5 tile products per
// block pair instead of the two-pass schedule's 7). It needs items for every thread and a dQ buffer of
// group x seqlen_q x head_dim floats per thread, so long MQA/GQA groups, batch-1 single-head shapes
// and other low-parallelism cases keep the two passes over (batch, KV head, key block) and
// (batch, head, query block). Both give bitwise the same dQ, dK, dV (same products, same order).
// MPT_KERNELS_ATTN_BWD=single|two forces one (tests); anything else picks.
inline bool bwd_single_pass(const AttentionBwdParams& p, int nthreads) {
  const char* env = std::getenv("MPT_KERNELS_ATTN_BWD");
  const size_t dq_floats = static_cast<size_t>(p.n_heads / p.n_kv_heads) * std::max(p.seqlen_q, 0) * pad8(p.head_dim);
  if (env != nullptr && std::strcmp(env, "single") == 0) return true;
  if (env != nullptr && std::strcmp(env, "two") == 0) return false;
  const long items = static_cast<long>(p.batch) * p.n_kv_heads;
  return items >= static_cast<long>(nthreads) * (p.is_varlen() ? 4 : 1) && dq_floats <= (size_t{16} << 20);
}

template <typename T>
void bwd_run(const AttentionBwdParams& p) {
  const int D = p.head_dim, Dp = pad8(D);
  const int group = p.n_heads / p.n_kv_heads;
  const int nthreads = omp_get_max_threads();
  float* delta_ws = static_cast<float*>(p.workspace);
  aligned_vector<float> scratch(BwdScratch::floats(Dp) * nthreads);
  const int nqb = ceil_div(std::max(p.seqlen_q, 0), kBlockQ);
  const int nkb = ceil_div(std::max(p.seqlen_k, 0), kBlockK);

  // Pass 0: delta = rowsum(dO * O) in float32, the same for every key block.
  const long rows = static_cast<long>(p.batch) * p.n_heads * p.seqlen_q;
#pragma omp parallel num_threads(nthreads)
  {
    const ScopedFlushDenormals ftz;
    aligned_vector<float> a(Dp), c(Dp);
#pragma omp for schedule(static)
    for (long it = 0; it < rows; ++it) {
      const int i = static_cast<int>(it % p.seqlen_q);
      const int h = static_cast<int>((it / p.seqlen_q) % p.n_heads);
      const int b = static_cast<int>(it / (static_cast<long>(p.seqlen_q) * p.n_heads));
      const SeqInfo si = seq_info(p, b);
      if (i >= si.sq) continue;
      const int64_t do_off = p.is_varlen() ? si.q_row0 * p.dout_row_stride : b * p.dout_batch_stride;
      attn_cpu::load_row(a.data(), static_cast<const T*>(p.dout) + do_off + h * p.dout_head_stride + i * p.dout_row_stride, D, Dp);
      attn_cpu::load_row(c.data(), static_cast<const T*>(p.out) + si.o_off + h * p.out_head_stride + i * p.out_row_stride, D, Dp);
      delta_ws[it] = attn_cpu::dot_row(a.data(), c.data(), Dp);
    }
  }

  if (bwd_single_pass(p, nthreads)) {
    // Item (b, kv head): every key block in order, dQ of the group's heads accumulated in float32.
    const long items = static_cast<long>(p.batch) * p.n_kv_heads;
#pragma omp parallel num_threads(nthreads)
    {
      const ScopedFlushDenormals ftz;
      BwdScratch w(scratch.data() + BwdScratch::floats(Dp) * omp_get_thread_num(), Dp);
      aligned_vector<float> dq_acc;
#pragma omp for schedule(dynamic, 1)
      for (long it = 0; it < items; ++it) {
        const int hk = static_cast<int>(it % p.n_kv_heads);
        const int b = static_cast<int>(it / p.n_kv_heads);
        const SeqInfo si = seq_info(p, b);
        // No early exit for a sequence without queries: its keys still get dK = dV = 0 written.
        dq_acc.assign(static_cast<size_t>(group) * std::max(si.sq, 0) * Dp, 0.f);
        for (int kb = 0; kb < ceil_div(std::max(si.sk, 0), kBlockK); ++kb)
          bwd_key_block<T>(p, si, delta_ws, b, hk, kb, w, dq_acc.data());
        const int64_t dq_off = p.is_varlen() ? si.q_row0 * p.dq_row_stride : b * p.dq_batch_stride;
        for (int g = 0; g < group; ++g) {
          T* dqp = static_cast<T*>(p.dq) + dq_off + (hk * group + g) * p.dq_head_stride;
          const float* src = dq_acc.data() + static_cast<size_t>(g) * si.sq * Dp;
          for (int r = 0; r < si.sq; ++r)
            attn_cpu::store_row(dqp + r * p.dq_row_stride, src + static_cast<size_t>(r) * Dp, D, p.softmax_scale);
        }
      }
    }
    return;
  }

  // Pass 1: dK, dV. Item (b, kv head, key block) sums over the group's query heads and every query
  // block that sees this key block, so each dK/dV row has one owner.
  const long kv_items = static_cast<long>(p.batch) * p.n_kv_heads * nkb;
#pragma omp parallel num_threads(nthreads)
  {
    const ScopedFlushDenormals ftz;
    BwdScratch w(scratch.data() + BwdScratch::floats(Dp) * omp_get_thread_num(), Dp);
#pragma omp for schedule(dynamic, 1)
    for (long it = 0; it < kv_items; ++it) {
      // Key block ascending in the item order: under causal masking the first key blocks are seen by
      // the most query blocks, so the longest items go out first.
      const int kb = static_cast<int>(it / (static_cast<long>(p.batch) * p.n_kv_heads));
      const int hk = static_cast<int>(it % p.n_kv_heads);
      const int b = static_cast<int>((it / p.n_kv_heads) % p.batch);
      bwd_key_block<T>(p, seq_info(p, b), delta_ws, b, hk, kb, w, nullptr);
    }
  }

  // Pass 2: dQ. Item (b, head, query block) owns its dQ rows: dQ = scale * sum_kb dS K.
  const long q_items = static_cast<long>(p.batch) * p.n_heads * nqb;
#pragma omp parallel num_threads(nthreads)
  {
    const ScopedFlushDenormals ftz;
    BwdScratch w(scratch.data() + BwdScratch::floats(Dp) * omp_get_thread_num(), Dp);
#pragma omp for schedule(dynamic, 1)
    for (long it = 0; it < q_items; ++it) {
      const int qb = nqb - 1 - static_cast<int>(it / (static_cast<long>(p.batch) * p.n_heads));
      const int h = static_cast<int>(it % p.n_heads);
      const int b = static_cast<int>((it / p.n_heads) % p.batch);
      const SeqInfo si = seq_info(p, b);
      const int q0 = qb * kBlockQ;
      if (q0 >= si.sq) continue;
      const int nq = std::min(kBlockQ, si.sq - q0);
      const int hk = h / group;
      const float slope = slope_of(p, b, h);
      bwd_load_query_side<T>(p, si, delta_ws, b, h, q0, nq, w);
      float* dq = w.acc0;
      std::fill(dq, dq + static_cast<size_t>(kBlockQ) * Dp, 0.f);
      const int nkb_row = key_blocks_for(p, q0, q0 + nq, si.sq, si.sk);
      for (int kb = 0; kb < nkb_row; ++kb) {
        const int k0 = kb * kBlockK, nk = std::min(kBlockK, si.sk - k0);
        const T* kbase = static_cast<const T*>(p.k) + si.k_off + hk * p.k_head_stride + k0 * p.k_row_stride;
        const T* vbase = static_cast<const T*>(p.v) + si.v_off + hk * p.v_head_stride + k0 * p.v_row_stride;
        load_kv_tile(w.kt, true, kbase, p.k_row_stride, nk, D, Dp);
        load_kv_tile(w.vt, true, vbase, p.v_row_stride, nk, D, Dp);
        load_kv_tile(w.k, false, kbase, p.k_row_stride, nk, D, Dp);
        bwd_probs_and_dscores(p, w, nq, q0, k0, si.sq, si.sk, slope, Dp);
        attn_cpu::gemm(nq, Dp, kBlockK, w.ds, kBlockK, w.k, Dp, dq, Dp, true);  // dQ += dS K
      }
      const int64_t dq_off = p.is_varlen() ? si.q_row0 * p.dq_row_stride : b * p.dq_batch_stride;
      T* dqp = static_cast<T*>(p.dq) + dq_off + h * p.dq_head_stride + q0 * p.dq_row_stride;
      for (int r = 0; r < nq; ++r) attn_cpu::store_row(dqp + r * p.dq_row_stride, dq + r * Dp, D, p.softmax_scale);
    }
  }
}

void check_common(const AttentionFwdParams& p, const char* who) {
  MPTK_CHECK(p.head_dim > 0 && p.head_dim <= 256, who, ": head_dim must be in [1, 256], got ", p.head_dim);
  MPTK_CHECK(p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0, who, ": n_heads % n_kv_heads != 0");
  MPTK_CHECK(p.batch >= 0 && p.seqlen_q >= 0 && p.seqlen_k >= 0, who, ": negative sizes");
  MPTK_CHECK((p.cu_seqlens_q == nullptr) == (p.cu_seqlens_k == nullptr), who,
             ": cu_seqlens_q and cu_seqlens_k must be given together");
}

template <typename Fn>
void dispatch_dtype(DType t, const char* who, Fn&& fn) {
  switch (t) {
    case DType::Float32: fn(float{}); break;
    case DType::BFloat16: fn(bf16{}); break;
    case DType::Float16: fn(fp16{}); break;
    default: throw ValueError(str_cat(who, ": unsupported dtype ", dtype_name(t), " on the CPU"));
  }
}

}  // namespace

size_t alibi_attention_fwd_workspace_size_cpu(const AttentionFwdParams& p) {
  return fwd_split_workspace_bytes(p, fwd_num_splits(p));
}

void alibi_attention_fwd_cpu(const AttentionFwdParams& p) {
  check_common(p, "alibi_attention_fwd_cpu");
  if (p.batch == 0 || p.seqlen_q == 0 || p.n_heads == 0) return;
  dispatch_dtype(p.dtype, "q", [&](auto tag) { fwd_run<decltype(tag)>(p); });
}

size_t alibi_attention_bwd_workspace_size_cpu(const AttentionBwdParams& p) {
  return delta_floats(p) * sizeof(float);
}

void alibi_attention_bwd_cpu(const AttentionBwdParams& p) {
  check_common(p, "alibi_attention_bwd_cpu");
  if (p.batch == 0 || p.n_heads == 0) return;
  // No queries: no forward lse exists (the op passes none); the run writes zero dK, dV.
  MPTK_CHECK(p.lse != nullptr || p.seqlen_q == 0, "alibi_attention_bwd_cpu: lse from the forward is required");
  MPTK_CHECK(p.workspace_bytes >= alibi_attention_bwd_workspace_size_cpu(p),
             "alibi_attention_bwd_cpu: workspace too small");
  dispatch_dtype(p.dtype, "q", [&](auto tag) { bwd_run<decltype(tag)>(p); });
}

}  // namespace mptk
