// Few-row linear layer (linear.h): OpenMP over contiguous ranges of output features, W read once in
// order for all the rows. Per output feature n and row m, the dot product x_m . w_n is summed in 8
// float32 lanes over k (two interleaved chains of 8 for one row, so the FMA latency stays hidden),
// then across the lanes, then the k tail; bias added last and the result rounded once.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/aligned_vector.h"
#include "common/cpu_math.h"
#include "common/error.h"
#include "linear/linear.h"

namespace mptk {
namespace {

// Output features per thread range: enough that one range streams a few hundred KB of W.
constexpr int64_t kMinFeaturesPerThread = 64;

// Floats between the rows of x's float32 copy (64-byte aligned storage): K rounded up to whole cache
// lines plus one more, so the rows of a long K do not all sit in the same L1 cache set. With a row
// stride a multiple of 4 KiB (K = 4096: 16 KiB), a block's 8 x rows, its W rows and their prefetches
// (4 KiB ahead) all mapped to one 12-way set (8 rows of a cache-resident 4096 x 4096 bfloat16 product:
// 1.12x faster padded, with the aligned copy; see benchmarks/NOTES.md).
inline int64_t x_row_stride(int64_t K) { return ((K + 15) & ~int64_t{15}) + 16; }

#ifdef MPTK_AVX2
// Software prefetch distance along each W row, in bytes: with 16-bit rows of 1.5-8 KB this reaches
// into the next block's rows, which the hardware prefetchers, each stream only a row long, start on
// late. Passes over MPT-125M's weights here: bf16/fp16 4 rows ~25% faster than none, 1 row ~5-15%.
constexpr int kPrefetchBytes = 4096;

template <typename T>
inline void prefetch_ahead(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

// The end of a block's dot products: whole groups of 8 from k0 on into chain 0, then per (row, W row)
// the chains added, summed across the lanes, plus the k tail (x in natural order from k0 on).
template <typename T, int M, int NR, int CH>
inline void finish_dots(__m256 (&acc)[M][NR][2], const float* xs, int64_t xst, int64_t K, const T* w, int64_t ws,
                        int64_t k0, float* out) {
  const int64_t K8 = K & ~int64_t{7};
  for (int64_t k = k0; k < K8; k += 8) {
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m256 wv = load8(w + r * ws + k);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m][r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xs + m * xst + k), wv, acc[m][r][0]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      float sum = hsum8(CH == 2 ? _mm256_add_ps(acc[m][r][0], acc[m][r][1]) : acc[m][r][0]);
      for (int64_t k = K8; k < K; ++k) sum += xs[m * xst + k] * to_float(w[r * ws + k]);
      out[m * NR + r] = sum;
    }
}

// y[m * ys + n + r] for r < NR, m < M: NR W rows (at w + r * ws) against M float32 rows of x
// (at xs + m * xst). M * NR * CH accumulators; CH chains of 8 lanes each over k.
template <typename T, int M, int NR, int CH>
inline void dot_block(const float* xs, int64_t xst, int64_t K, const T* w, int64_t ws, float* out /* M x NR */) {
  __m256 acc[M][NR][2];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[m][r][0] = acc[m][r][1] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t{8 * CH - 1};
  for (int64_t k = 0; k < K8; k += 8 * CH) {
    // once per 64 bytes of each row; not for one float32 row, whose 3 KB+ rows the hardware streams
    // well (at ~85% of the read roof here) and which the extra instructions slowed by ~15%
    if ((sizeof(T) == 2 || M > 1) && (k * sizeof(T)) % 64 == 0)
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) prefetch_ahead(w + r * ws + k);
#pragma GCC unroll 2
    for (int c = 0; c < CH; ++c) {
      __m256 wv[NR];
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) wv[r] = load8(w + r * ws + k + 8 * c);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const __m256 xv = _mm256_loadu_ps(xs + m * xst + k + 8 * c);
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) acc[m][r][c] = _mm256_fmadd_ps(xv, wv[r], acc[m][r][c]);
      }
    }
  }
  finish_dots<T, M, NR, CH>(acc, xs, xst, K, w, ws, K8, out);
}

// bfloat16 without shuffles: one 32-byte load holds 16 weights, two per 32-bit lane; the lane shifted
// left by 16 is the even-indexed weight as a float32, the lane masked to its high half the odd one.
// x is stored for it with each 16-chunk de-interleaved (its 8 even elements, then its 8 odd ones;
// x_layout below), so the products pair up; the even and odd sums are the two chains. The
// conversion costs two integer ops per 16 weights instead of a widening shuffle per 8, which left
// the one-row product compute-bound at ~15 GB/s here. CH = 1 sums even and odd in one chain (more
// rows: the rows' chains hide the FMA latency, and fewer accumulators stay in registers).
template <int M, int NR, int CH>
inline void dot_block_bf16(const float* xs, int64_t xst, int64_t K, const bf16* w, int64_t ws, float* out) {
  static_assert(CH == 1 || CH == 2, "chains");
  __m256 acc[M][NR][2];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[m][r][0] = acc[m][r][1] = _mm256_setzero_ps();
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t K16 = K & ~int64_t{15};
  for (int64_t k = 0; k < K16; k += 16) {
    if ((k & 31) == 0)  // once per 64 bytes of each row
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) prefetch_ahead(w + r * ws + k);
    __m256 we[NR], wo[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ws + k));
      we[r] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      wo[r] = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256 xe = _mm256_loadu_ps(xs + m * xst + k), xo = _mm256_loadu_ps(xs + m * xst + k + 8);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        acc[m][r][0] = _mm256_fmadd_ps(xe, we[r], acc[m][r][0]);
        acc[m][r][CH - 1] = _mm256_fmadd_ps(xo, wo[r], acc[m][r][CH - 1]);
      }
    }
  }
  finish_dots<bf16, M, NR, CH>(acc, xs, xst, K, w, ws, K16, out);  // (x in natural order past K16)
}
#endif

#ifdef MPTK_AVX512_PATH
// The 512-bit path (where the CPU has AVX-512: cpu_avx512()): the same scheme 16 lanes wide,
// with the 32 zmm registers holding more accumulators (more W rows per block for 2-8 rows, where the
// 256-bit kernel runs out of registers and turns compute-bound). A dot product sums in 16 lanes
// (bfloat16: the even and odd weights of each 32-chunk), so it rounds differently from the 256-bit
// path; within this path an output feature's value still does not depend on its block or thread.
// Whole 16-groups from k0 on into chain 0 (x in natural order there), then per (row, W row) the
// chains added, summed across the lanes, plus the k tail.
template <typename T, int M, int NR, int CH>
MPTK_AVX512_FN inline void finish_dots512(__m512 (&acc)[M][NR][2], const float* xs, int64_t xst, int64_t K, const T* w,
                                          int64_t ws, int64_t k0, float* out) {
  const int64_t K16 = k0 + ((K - k0) & ~int64_t{15});
  for (int64_t k = k0; k < K16; k += 16) {
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m512 wv = load16(w + r * ws + k);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m][r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xs + m * xst + k), wv, acc[m][r][0]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      float sum = _mm512_reduce_add_ps(CH == 2 ? _mm512_add_ps(acc[m][r][0], acc[m][r][1]) : acc[m][r][0]);
      for (int64_t k = K16; k < K; ++k) sum += xs[m * xst + k] * to_float(w[r * ws + k]);
      out[m * NR + r] = sum;
    }
}

// The main loop of a block, whole 16 * CH steps of k in [k_begin, k_end), on the caller's
// accumulators; prefetches pf elements past each W row's current position (every 64 bytes; not for
// one float32 row, whose rows the hardware streams well).
template <typename T, int M, int NR, int CH>
MPTK_AVX512_FN inline void steps512(__m512 (&acc)[M][NR][2], const float* xs, int64_t xst, const T* w, int64_t ws,
                                    int64_t k_begin, int64_t k_end, int64_t pf) {
  for (int64_t k = k_begin; k < k_end; k += 16 * CH) {
    if ((sizeof(T) == 2 || M > 1) && (k * sizeof(T)) % 64 == 0)
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * ws + k + pf), _MM_HINT_T0);
#pragma GCC unroll 2
    for (int c = 0; c < CH; ++c) {
      __m512 wv[NR];
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) wv[r] = load16(w + r * ws + k + 16 * c);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(xs + m * xst + k + 16 * c);
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) acc[m][r][c] = _mm512_fmadd_ps(xv, wv[r], acc[m][r][c]);
      }
    }
  }
}

// bfloat16: one 64-byte load holds 32 weights; shifted and masked lanes give the even and the odd
// ones (dot_block_bf16's scheme), against x de-interleaved per whole 32-chunk (x_layout). Whole
// 32-steps of k in [k_begin, k_end), prefetching pf elements ahead in each W row.
template <int M, int NR, int CH>
MPTK_AVX512_FN inline void steps512_bf16(__m512 (&acc)[M][NR][2], const float* xs, int64_t xst, const bf16* w,
                                         int64_t ws, int64_t k_begin, int64_t k_end, int64_t pf) {
  static_assert(CH == 1 || CH == 2, "chains");
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = k_begin; k < k_end; k += 32) {
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * ws + k + pf), _MM_HINT_T0);
    __m512 we[NR], wo[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m512i v = _mm512_loadu_si512(w + r * ws + k);
      we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      wo[r] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512 xe = _mm512_loadu_ps(xs + m * xst + k), xo = _mm512_loadu_ps(xs + m * xst + k + 16);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        acc[m][r][0] = _mm512_fmadd_ps(xe, we[r], acc[m][r][0]);
        acc[m][r][CH - 1] = _mm512_fmadd_ps(xo, wo[r], acc[m][r][CH - 1]);
      }
    }
  }
}

// The k steps of the 512-bit path for T: 32 for bfloat16 (a 64-byte load), 16 * CH otherwise.
template <typename T, int CH>
constexpr int64_t kStep512 = std::is_same_v<T, bf16> ? 32 : 16 * CH;

template <typename T, int M, int NR, int CH>
MPTK_AVX512_FN inline void steps512_any(__m512 (&acc)[M][NR][2], const float* xs, int64_t xst, const T* w,
                                        int64_t ws, int64_t k_begin, int64_t k_end, int64_t pf) {
  if constexpr (std::is_same_v<T, bf16>)
    steps512_bf16<M, NR, CH>(acc, xs, xst, w, ws, k_begin, k_end, pf);
  else
    steps512<T, M, NR, CH>(acc, xs, xst, w, ws, k_begin, k_end, pf);
}

// y[m * ys + n + r] for r < NR, m < M: NR W rows against M float32 rows of x, whole steps over k in
// one pass, then finish_dots512 (x in natural order past the whole steps).
template <typename T, int M, int NR, int CH>
MPTK_AVX512_FN inline void dot_block512(const float* xs, int64_t xst, int64_t K, const T* w, int64_t ws, float* out) {
  __m512 acc[M][NR][2];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[m][r][0] = acc[m][r][1] = _mm512_setzero_ps();
  const int64_t Kc = K & ~(kStep512<T, CH> - 1);
  steps512_any<T, M, NR, CH>(acc, xs, xst, w, ws, 0, Kc, kPrefetchBytes / static_cast<int64_t>(sizeof(T)));
  finish_dots512<T, M, NR, CH>(acc, xs, xst, K, w, ws, Kc, out);
}

// Many x rows over a long K: the x copy (M rows of K floats) outgrows L1, and a block re-read every
// x row from L2 for each of its W rows (8 rows of a 4096-long K ran at ~45% of the read roof). Here
// up to kSuperBlocks blocks of NR W rows walk k in chunks of kChunk, all blocks per chunk, so a
// chunk of x stays in L1; each block's accumulators wait in memory between chunks. Each accumulator
// lane sees the same FMAs in the same order as in dot_block512: the results are bitwise the same.
// W is still read once, a chunk of each row at a time; the prefetches reach the rows two blocks on.
constexpr int kSuperBlocks = 8;
constexpr int64_t kChunk = 512;  // floats of x per row: 8 rows x 2 KiB in L1

template <typename T, int M, int NR, int CH>
MPTK_AVX512_FN void dot_superblock512(const float* xs, int64_t xst, int64_t K, const T* w, int64_t ws, int nb,
                                      float* out /* nb x M x NR */) {
  static_assert(kChunk % 32 == 0, "whole steps per chunk");
  alignas(64) __m512 buf[kSuperBlocks][M][NR][2];
  const int64_t Kc = K & ~(kStep512<T, CH> - 1);
  for (int b = 0; b < nb; ++b)
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < NR; ++r) buf[b][m][r][0] = buf[b][m][r][1] = _mm512_setzero_ps();
  for (int64_t kc = 0; kc < Kc; kc += kChunk) {
    const int64_t kend = std::min(Kc, kc + kChunk);
    for (int b = 0; b < nb; ++b) {
      __m512 acc[M][NR][2];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) {
          acc[m][r][0] = buf[b][m][r][0];
          if constexpr (CH == 2) acc[m][r][1] = buf[b][m][r][1];
        }
      steps512_any<T, M, NR, CH>(acc, xs, xst, w + b * NR * ws, ws, kc, kend, 2 * NR * ws);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) {
          buf[b][m][r][0] = acc[m][r][0];
          if constexpr (CH == 2) buf[b][m][r][1] = acc[m][r][1];
        }
    }
  }
  for (int b = 0; b < nb; ++b)
    finish_dots512<T, M, NR, CH>(buf[b], xs, xst, K, w + b * NR * ws, ws, Kc, out + b * M * NR);
}

// features() on the 512-bit path: NR W rows per block, CH chains; M * NR * CH accumulators, the W
// vectors (two per row for bfloat16) and an x vector within the 32 registers. With more than 40 KiB of
// x (5-8 rows of a K past ~1-2k), blocks go through dot_superblock512 (bitwise the same sums).
// Streaming ~200 MB of weights, 8 rows: K = 1536-11008 1.2-1.5x (float32) and 1.3-2.1x (bfloat16)
// faster chunked; at K = 768-1024 (25-33 KiB of x, still in L1) 0.7-0.96x, so those stay unchunked.
constexpr int64_t kChunkedXBytes = 40 * 1024;

template <typename T, int M>
MPTK_AVX512_FN void features512(const FewRowsLinearParams& p, const float* xs, int64_t n0, int64_t n1) {
  const int64_t K = p.in_features, xst = x_row_stride(K), ws = p.w_row_stride;
  const T* w = static_cast<const T*>(p.w);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  constexpr int NR = M <= 4 ? 4 : 2;
  constexpr int CH = M <= 2 ? 2 : 1;
  float out[kSuperBlocks * kFewRowsMax * 4];
  auto store = [&](int64_t n, int nr, const float* o) {  // o: M x nr
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < nr; ++r) {
        const float b = bias ? to_float(bias[n + r]) : 0.f;
        y[m * p.y_row_stride + n + r] = from_float<T>(o[m * nr + r] + b);
      }
  };
  int64_t n = n0;
  if (M >= 5 && M * xst * static_cast<int64_t>(sizeof(float)) > kChunkedXBytes) {
    while (n + NR <= n1) {
      const int nb = static_cast<int>(std::min<int64_t>(kSuperBlocks, (n1 - n) / NR));
      dot_superblock512<T, M, NR, CH>(xs, xst, K, w + n * ws, ws, nb, out);
      for (int b = 0; b < nb; ++b) store(n + b * NR, NR, out + b * M * NR);
      n += static_cast<int64_t>(nb) * NR;
    }
  }
  for (; n + NR <= n1; n += NR) {
    dot_block512<T, M, NR, CH>(xs, xst, K, w + n * ws, ws, out);
    store(n, NR, out);
  }
  for (; n < n1; ++n) {
    dot_block512<T, M, 1, CH>(xs, xst, K, w + n * ws, ws, out);
    store(n, 1, out);
  }
}
#endif

template <typename T>
float dot_scalar(const float* x, const T* w, int64_t K) {
  float s = 0.f;
  for (int64_t k = 0; k < K; ++k) s += x[k] * to_float(w[k]);
  return s;
}

// Output features [n0, n1) for all rows.
template <typename T, int M>
void features(const FewRowsLinearParams& p, const float* xs, int64_t n0, int64_t n1) {
  const int64_t K = p.in_features, xst = x_row_stride(K);
  const T* w = static_cast<const T*>(p.w);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  // W rows per block and chains per dot product: the M * NR * CH accumulators, the W vectors and an
  // x vector stay within the 16 vector registers.
  constexpr bool kBf16 = std::is_same_v<T, bf16>;
  constexpr int NR = M == 1 ? 4 : (M == 2 ? (kBf16 ? 2 : 4) : (M <= 4 ? 2 : 1));
  constexpr int CH = M == 1 ? 2 : (kBf16 && M == 2 ? 2 : 1);
  float out[kFewRowsMax * 4];
  auto store = [&](int64_t n, int nr) {
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < nr; ++r) {
        const float b = bias ? to_float(bias[n + r]) : 0.f;
        y[m * p.y_row_stride + n + r] = from_float<T>(out[m * nr + r] + b);
      }
  };
  int64_t n = n0;
#ifdef MPTK_AVX2
  auto block = [&](auto nr_const, int64_t n) {
    constexpr int nr = decltype(nr_const)::value;
    if constexpr (std::is_same_v<T, bf16>)
      dot_block_bf16<M, nr, CH>(xs, xst, K, w + n * p.w_row_stride, p.w_row_stride, out);
    else
      dot_block<T, M, nr, CH>(xs, xst, K, w + n * p.w_row_stride, p.w_row_stride, out);
    store(n, nr);
  };
  for (; n + NR <= n1; n += NR) block(std::integral_constant<int, NR>{}, n);
  for (; n < n1; ++n) block(std::integral_constant<int, 1>{}, n);
#else
  for (; n < n1; ++n) {
    for (int m = 0; m < M; ++m) out[m] = dot_scalar(xs + m * xst, w + n * p.w_row_stride, K);
    store(n, 1);
  }
#endif
}

// Where x's element k is stored in the float32 copy: in place, except for bfloat16 in an AVX2 build,
// where each whole 16-chunk is de-interleaved (dot_block_bf16).
// The 512-bit path (wide) de-interleaves whole 32-chunks the same way (16 even, then 16 odd).
template <typename T>
inline int64_t x_layout(int64_t k, int64_t K, bool wide) {
#ifdef MPTK_AVX2
  if constexpr (std::is_same_v<T, bf16>) {
    if (wide) {
      const int64_t c = k & ~int64_t{31}, i = k & 31;
      if (c + 32 <= K) return c + (i & 1) * 16 + (i >> 1);
    } else {
      const int64_t c = k & ~int64_t{15}, i = k & 15;
      if (c + 16 <= K) return c + (i & 1) * 8 + (i >> 1);
    }
  }
#endif
  (void)K;
  (void)wide;
  return k;
}

template <typename T>
void run(const FewRowsLinearParams& p) {
  const int M = p.rows;
  const int64_t K = p.in_features, N = p.out_features;
  // x in float32 once (a few rows of K floats), shared by the threads.
  const int64_t xst = x_row_stride(K);
  aligned_vector<float> xs(static_cast<size_t>(M) * xst);
  const T* x = static_cast<const T*>(p.x);
#ifdef MPTK_AVX512_PATH
  // Read once: x's layout and the kernel must agree. Interleaved A/B runs against the 256-bit path
  // here (1-8 rows, MPT-125M's, a 7B block's and the tiny model's matrices): bfloat16 1.04-1.28x from
  // DRAM and 1.3-1.95x from cache; float32 1.0-1.15x from DRAM (within the runs' noise) and 1.1-1.75x
  // from cache at 2-8 rows, where the 256-bit kernel's 16 registers leave it compute-bound.
  const bool wide = cpu_avx512();
#else
  const bool wide = false;
#endif
  for (int m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xs[m * xst + x_layout<T>(k, K, wide)] = to_float(x[m * p.x_row_stride + k]);
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(),
                                                                            N / kMinFeaturesPerThread)));
#pragma omp parallel num_threads(threads)
  {
    // Contiguous ranges (each thread streams its own part of W), split on multiples of 8 features.
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t blocks = (N + 7) / 8;
    const int64_t n0 = std::min(N, blocks * t / nt * 8), n1 = std::min(N, blocks * (t + 1) / nt * 8);
    bool done = false;
#ifdef MPTK_AVX512_PATH
    {
      if (wide) {
        switch (M) {
          case 1: features512<T, 1>(p, xs.data(), n0, n1); break;
          case 2: features512<T, 2>(p, xs.data(), n0, n1); break;
          case 3: features512<T, 3>(p, xs.data(), n0, n1); break;
          case 4: features512<T, 4>(p, xs.data(), n0, n1); break;
          case 5: features512<T, 5>(p, xs.data(), n0, n1); break;
          case 6: features512<T, 6>(p, xs.data(), n0, n1); break;
          case 7: features512<T, 7>(p, xs.data(), n0, n1); break;
          default: features512<T, 8>(p, xs.data(), n0, n1); break;
        }
        done = true;
      }
    }
#endif
    if (!done) switch (M) {
      case 1: features<T, 1>(p, xs.data(), n0, n1); break;
      case 2: features<T, 2>(p, xs.data(), n0, n1); break;
      case 3: features<T, 3>(p, xs.data(), n0, n1); break;
      case 4: features<T, 4>(p, xs.data(), n0, n1); break;
      case 5: features<T, 5>(p, xs.data(), n0, n1); break;
      case 6: features<T, 6>(p, xs.data(), n0, n1); break;
      case 7: features<T, 7>(p, xs.data(), n0, n1); break;
      default: features<T, 8>(p, xs.data(), n0, n1); break;
    }
  }
}

}  // namespace

void few_rows_linear_cpu(const FewRowsLinearParams& p) {
  MPTK_CHECK(p.rows >= 0 && p.rows <= kFewRowsMax, "few_rows_linear: rows must be in [0, ", kFewRowsMax, "]");
  if (p.rows == 0 || p.out_features == 0) return;
  switch (p.dtype) {
    case DType::Float32: run<float>(p); break;
    case DType::BFloat16: run<bf16>(p); break;
    case DType::Float16: run<fp16>(p); break;
    default: MPTK_CHECK(false, "few_rows_linear: unsupported dtype ", dtype_name(p.dtype));
  }
}

}  // namespace mptk
