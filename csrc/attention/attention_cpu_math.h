// Small float32 building blocks of the CPU attention kernels (attention_cpu.cpp): a register-tiled
// GEMM on row-major tiles, a vectorised exp2 and row reductions. AVX2+FMA when the build has them,
// plain loops otherwise (same results up to rounding).
//
// Everything works on float32 tiles whose row length is a multiple of 8 (head dims are padded with
// zeros), so the vector loops never need a scalar tail.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/cpu_math.h"

namespace mptk {
namespace attn_cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#ifdef MPTK_AVX2
// R rows x (8*NV) columns of C kept in registers across the whole K loop: 6x16 uses 12 accumulators,
// 2 B vectors and 1 broadcast, i.e. 15 of the 16 ymm registers.
// Accumulators are named variables rather than an array: GCC keeps an array of __m256 in memory and
// stores it back on every iteration, which halves the FMA rate.
// AT: A is given transposed (element (r, k) at A[k * lda + r]): P^T dO and dS^T Q read P and dS as
// they are, with no transposed copy. Each C element sums the same products in the same order either way.
template <int R, int NV, bool AT = false>
inline void gemm_micro(int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                       bool accumulate) {
  static_assert(R >= 1 && R <= 6 && (NV == 1 || NV == 2), "register tile");
  const __m256 z = _mm256_setzero_ps();
  __m256 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z, c50 = z, c51 = z;
#define MPTK_GEMM_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define MPTK_GEMM_LOAD(r)                                       \
  if constexpr (R > r) {                                        \
    c##r##0 = _mm256_loadu_ps(C + r * ldc);                     \
    if constexpr (NV > 1) c##r##1 = _mm256_loadu_ps(C + r * ldc + 8); \
  }
#define MPTK_GEMM_FMA(r)                                        \
  if constexpr (R > r) {                                        \
    const __m256 a = _mm256_broadcast_ss(AT ? A + k * lda + r : A + r * lda + k); \
    c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0);                  \
    if constexpr (NV > 1) c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1); \
  }
#define MPTK_GEMM_STORE(r)                                      \
  if constexpr (R > r) {                                        \
    _mm256_storeu_ps(C + r * ldc, c##r##0);                     \
    if constexpr (NV > 1) _mm256_storeu_ps(C + r * ldc + 8, c##r##1); \
  }
  if (accumulate) {
    MPTK_GEMM_ROWS(MPTK_GEMM_LOAD)
  }
  for (int k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * ldb);
    const __m256 b1 = NV > 1 ? _mm256_loadu_ps(B + k * ldb + 8) : z;
    MPTK_GEMM_ROWS(MPTK_GEMM_FMA)
  }
  MPTK_GEMM_ROWS(MPTK_GEMM_STORE)
#undef MPTK_GEMM_ROWS
#undef MPTK_GEMM_LOAD
#undef MPTK_GEMM_FMA
#undef MPTK_GEMM_STORE
}

template <int NV, bool AT>
inline void gemm_rows(int rows, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                      int64_t ldc, bool acc) {
  switch (rows) {
    case 1: gemm_micro<1, NV, AT>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 2: gemm_micro<2, NV, AT>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 3: gemm_micro<3, NV, AT>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 4: gemm_micro<4, NV, AT>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 5: gemm_micro<5, NV, AT>(K, A, lda, B, ldb, C, ldc, acc); break;
    default: gemm_micro<6, NV, AT>(K, A, lda, B, ldb, C, ldc, acc); break;
  }
}
#endif

#ifdef MPTK_AVX512_PATH
// The 512-bit twin of gemm_micro: R rows x (16*NV) columns (NV = 1, 2 or 4; R * NV <= 24 of the 32
// zmm registers). Each C element is the same chain of FMAs over k, in the same order, as in the
// 256-bit kernel, so the two give bitwise the same C.
template <int R, int NV, bool AT = false>
MPTK_AVX512_FN inline void gemm_micro512(int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                                         int64_t ldc, bool accumulate) {
  static_assert(R >= 1 && R <= 6 && (NV == 1 || NV == 2 || NV == 4), "register tile");
  const __m512 z = _mm512_setzero_ps();
  __m512 c00 = z, c01 = z, c02 = z, c03 = z, c10 = z, c11 = z, c12 = z, c13 = z, c20 = z, c21 = z, c22 = z, c23 = z,
         c30 = z, c31 = z, c32 = z, c33 = z, c40 = z, c41 = z, c42 = z, c43 = z, c50 = z, c51 = z, c52 = z, c53 = z;
#define MPTK_G5_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define MPTK_G5_LOAD(r)                                                        \
  if constexpr (R > r) {                                                       \
    c##r##0 = _mm512_loadu_ps(C + r * ldc);                                    \
    if constexpr (NV > 1) c##r##1 = _mm512_loadu_ps(C + r * ldc + 16);         \
    if constexpr (NV > 2) c##r##2 = _mm512_loadu_ps(C + r * ldc + 32);         \
    if constexpr (NV > 2) c##r##3 = _mm512_loadu_ps(C + r * ldc + 48);         \
  }
#define MPTK_G5_FMA(r)                                                         \
  if constexpr (R > r) {                                                       \
    const __m512 a = _mm512_set1_ps(AT ? A[k * lda + r] : A[r * lda + k]);     \
    c##r##0 = _mm512_fmadd_ps(a, b0, c##r##0);                                 \
    if constexpr (NV > 1) c##r##1 = _mm512_fmadd_ps(a, b1, c##r##1);           \
    if constexpr (NV > 2) c##r##2 = _mm512_fmadd_ps(a, b2, c##r##2);           \
    if constexpr (NV > 2) c##r##3 = _mm512_fmadd_ps(a, b3, c##r##3);           \
  }
#define MPTK_G5_STORE(r)                                                       \
  if constexpr (R > r) {                                                       \
    _mm512_storeu_ps(C + r * ldc, c##r##0);                                    \
    if constexpr (NV > 1) _mm512_storeu_ps(C + r * ldc + 16, c##r##1);         \
    if constexpr (NV > 2) _mm512_storeu_ps(C + r * ldc + 32, c##r##2);         \
    if constexpr (NV > 2) _mm512_storeu_ps(C + r * ldc + 48, c##r##3);         \
  }
  if (accumulate) {
    MPTK_G5_ROWS(MPTK_G5_LOAD)
  }
  for (int k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    const __m512 b0 = _mm512_loadu_ps(bk);
    const __m512 b1 = NV > 1 ? _mm512_loadu_ps(bk + 16) : z;
    const __m512 b2 = NV > 2 ? _mm512_loadu_ps(bk + 32) : z;
    const __m512 b3 = NV > 2 ? _mm512_loadu_ps(bk + 48) : z;
    MPTK_G5_ROWS(MPTK_G5_FMA)
  }
  MPTK_G5_ROWS(MPTK_G5_STORE)
#undef MPTK_G5_ROWS
#undef MPTK_G5_LOAD
#undef MPTK_G5_FMA
#undef MPTK_G5_STORE
}

template <int NV, bool AT>
MPTK_AVX512_FN inline void gemm_rows512(int rows, int K, const float* A, int64_t lda, const float* B, int64_t ldb,
                                        float* C, int64_t ldc, bool acc) {
  switch (rows) {
    case 1: gemm_micro512<1, NV, AT>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 2: gemm_micro512<2, NV, AT>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 3: gemm_micro512<3, NV, AT>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 4: gemm_micro512<4, NV, AT>(K, A, lda, B, ldb, C, ldc, acc); break;
    case 5: gemm_micro512<5, NV, AT>(K, A, lda, B, ldb, C, ldc, acc); break;
    default: gemm_micro512<6, NV, AT>(K, A, lda, B, ldb, C, ldc, acc); break;
  }
}

// gemm_impl's 512-bit path: 64-, 32- and 16-column panels, then the 256-bit kernel for a last 8.
template <bool AT>
MPTK_AVX512_FN inline void gemm_impl512(int M, int N, int K, const float* A, int64_t lda, const float* B,
                                        int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int n = 0;
  auto panel = [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    for (int m = 0; m < M; m += 6)
      gemm_rows512<NV, AT>(std::min(6, M - m), K, AT ? A + m : A + m * lda, lda, B + n, ldb, C + m * ldc + n, ldc,
                           accumulate);
    n += 16 * NV;
  };
  while (n + 64 <= N) panel(std::integral_constant<int, 4>());
  if (n + 32 <= N) panel(std::integral_constant<int, 2>());
  if (n + 16 <= N) panel(std::integral_constant<int, 1>());
  for (; n < N; n += 8)
    for (int m = 0; m < M; m += 6)
      gemm_rows<1, AT>(std::min(6, M - m), K, AT ? A + m : A + m * lda, lda, B + n, ldb, C + m * ldc + n, ldc,
                       accumulate);
}
#endif

// C[M x N] = (accumulate ? C : 0) + op(A) * B[K x N]; all row-major float32, N % 8 == 0. op(A) is
// A[M x K] or, with AT, the transpose of A[K x M] (element (m, k) at A[k * lda + m]).
template <bool AT = false>
inline void gemm_impl(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                      int64_t ldc, bool accumulate) {
#ifdef MPTK_AVX512_PATH
  if (cpu_avx512()) return gemm_impl512<AT>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
#endif
#ifdef MPTK_AVX2
  // Column panels outermost: a K x 16 panel of B (at most 16 KiB) stays in L1 while the rows of A
  // stream past it.
  int n = 0;
  for (; n + 16 <= N; n += 16)
    for (int m = 0; m < M; m += 6)
      gemm_rows<2, AT>(std::min(6, M - m), K, AT ? A + m : A + m * lda, lda, B + n, ldb, C + m * ldc + n, ldc,
                       accumulate);
  for (; n < N; n += 8)
    for (int m = 0; m < M; m += 6)
      gemm_rows<1, AT>(std::min(6, M - m), K, AT ? A + m : A + m * lda, lda, B + n, ldb, C + m * ldc + n, ldc,
                       accumulate);
#else
  for (int m = 0; m < M; ++m) {
    float* c = C + m * ldc;
    if (!accumulate)
      for (int n = 0; n < N; ++n) c[n] = 0.f;
    for (int k = 0; k < K; ++k) {
      const float a = AT ? A[k * lda + m] : A[m * lda + k];
      const float* b = B + k * ldb;
      for (int n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
#endif
}

inline void gemm(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  gemm_impl<false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

// C[M x N] = (accumulate ? C : 0) + A^T * B with A[K x M] row-major (lda >= M): no transposed copy.
inline void gemm_at(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                    int64_t ldc, bool accumulate) {
  gemm_impl<true>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

#ifdef MPTK_AVX2
// 2^f = sum_i kExp2Poly[i] f^(7 - i) (Horner, highest degree first): shared by exp2_ps and its
// 512-bit twin, whose lanes must round alike.
constexpr float kExp2Poly[8] = {1.525273380405984e-05f, 1.5403530393381606e-04f, 1.3333558146428443e-03f,
                                9.618129107628477e-03f, 5.550410866482158e-02f,  2.402265069591007e-01f,
                                6.931471805599453e-01f, 1.0f};

// 2^x for float32 lanes: x = n + f with f in [-0.5, 0.5]; 2^f from its Taylor series in f*ln2 to
// degree 7 (relative error < 1e-8 before float rounding), 2^n built in the exponent field.
// x <= -127 (including -inf) gives exactly 0 because the biased exponent becomes 0; NaN stays NaN.
inline __m256 exp2_ps(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-127.f), x);  // operand order keeps NaN in x
  x = _mm256_min_ps(_mm256_set1_ps(127.f), x);  // here too: min_ps returns its second operand for a NaN
  __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 7
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

#ifdef MPTK_AVX512_PATH
// exp2_ps on 16 lanes: the same operations in the same order, so each lane is bitwise exp2_ps's.
MPTK_AVX512_FN inline __m512 exp2_ps512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-127.f), x);  // vmaxps/vminps return the second operand for a NaN,
  x = _mm512_min_ps(_mm512_set1_ps(127.f), x);   // as their 256-bit forms do
  __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 7
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// Row helpers below on 16 lanes, each bitwise its 256-bit twin: elementwise work is the same per
// element, and a sum adds the 16 lanes' two halves to the 8-lane accumulator one after the other,
// the order the 256-bit loop adds them in.
MPTK_AVX512_FN inline void exp2_diff512(float* out, const float* a, const float* b, int n);
MPTK_AVX512_FN inline float scale_alibi_mask_max512(float* x, float scale, float slope, int offset, int n);
MPTK_AVX512_FN inline float exp2_sub_sum512(float* x, int n, float sub);
MPTK_AVX512_FN inline void scale_row512(float* x, int n, float a);
MPTK_AVX512_FN inline void softmax_grad_row512(float* ds, const float* p, float delta, int n);
#endif

// out[j] = 2^(a[j] - b[j]); 0 where the difference is NaN (both -inf: a row with nothing visible yet).
// The tail goes through the same vector code (zero padded), so an element's value does not depend on
// its position: a tile row rounds the same whether its tile holds one head's rows or every head's.
inline void exp2_diff(float* out, const float* a, const float* b, int n) {
  int j = 0;
#ifdef MPTK_AVX512_PATH
  if (cpu_avx512()) return exp2_diff512(out, a, b, n);
#endif
#ifdef MPTK_AVX2
  auto eight = [](const __m256 d) {
    return _mm256_blendv_ps(exp2_ps(d), _mm256_setzero_ps(), _mm256_cmp_ps(d, d, _CMP_UNORD_Q));
  };
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(out + j, eight(_mm256_sub_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j))));
  if (j < n) {
    alignas(32) float d[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int t = 0; t < n - j; ++t) d[t] = a[j + t] - b[j + t];
    _mm256_store_ps(d, eight(_mm256_load_ps(d)));
    std::copy(d, d + (n - j), out + j);
    return;
  }
#endif
  for (; j < n; ++j) {
    const float d = a[j] - b[j];
    out[j] = d != d ? 0.f : std::exp2(d);
  }
}

// One pass over a row of raw scores Q K^T: x[j] = x[j] * scale + slope * (j + offset) where
// j + offset <= 0 (offset = first key of the tile - the row's last visible key), -inf elsewhere;
// returns max_j x[j]. The ALiBi term is relative to the row's last visible key, so it is exact and
// small where the probability mass is. n % 8 == 0.
// A visible NaN score (a NaN in q or k) makes the maximum NaN, so the row's output and lse come out
// NaN (the max instructions alone would drop it and the row would look fully masked: zeros).
inline float scale_alibi_mask_max(float* x, float scale, float slope, int offset, int n) {
#ifdef MPTK_AVX512_PATH
  if (cpu_avx512()) return scale_alibi_mask_max512(x, scale, slope, offset, n);
#endif
#ifdef MPTK_AVX2
  const __m256 s = _mm256_set1_ps(scale), sl = _mm256_set1_ps(slope), ninf = _mm256_set1_ps(kNegInf);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 m = ninf, un = _mm256_setzero_ps();
  for (int j = 0; j < n; j += 8) {
    const __m256i rel = _mm256_add_epi32(lane, _mm256_set1_epi32(j + offset));
    __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), s, _mm256_mul_ps(sl, _mm256_cvtepi32_ps(rel)));
    if (j + 7 + offset > 0) v = _mm256_blendv_ps(v, ninf, _mm256_castsi256_ps(_mm256_cmpgt_epi32(rel, _mm256_setzero_si256())));
    _mm256_storeu_ps(x + j, v);
    m = _mm256_max_ps(m, v);
    un = _mm256_or_ps(un, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  return _mm256_movemask_ps(un) ? std::numeric_limits<float>::quiet_NaN() : hmax8(m);
#else
  float m = kNegInf;
  bool nan = false;
  for (int j = 0; j < n; ++j) {
    const int rel = j + offset;
    x[j] = rel <= 0 ? x[j] * scale + slope * static_cast<float>(rel) : kNegInf;
    nan |= x[j] != x[j];
    m = std::max(m, x[j]);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
#endif
}

// max(a, b) that keeps a NaN from either side (std::max keeps its first argument when b is NaN).
inline float nan_max(float a, float b) { return (a != a || b != b) ? std::numeric_limits<float>::quiet_NaN() : std::max(a, b); }

inline float row_max(const float* x, int n) {
#ifdef MPTK_AVX2
  __m256 m = _mm256_set1_ps(kNegInf);
  for (int j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
  return hmax8(m);
#else
  float m = kNegInf;
  for (int j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
#endif
}

// x[j] = 2^(x[j] - sub); returns the sum. sub = -inf (a row with nothing visible yet) gives zeros.
inline float exp2_sub_sum(float* x, int n, float sub) {
  if (sub == kNegInf) {
    std::fill(x, x + n, 0.f);
    return 0.f;
  }
#ifdef MPTK_AVX512_PATH
  if (cpu_avx512()) return exp2_sub_sum512(x, n, sub);
#endif
#ifdef MPTK_AVX2
  const __m256 s = _mm256_set1_ps(sub);
  __m256 acc = _mm256_setzero_ps();
  for (int j = 0; j < n; j += 8) {
    __m256 e = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), s));
    _mm256_storeu_ps(x + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  return hsum8(acc);
#else
  float acc = 0.f;
  for (int j = 0; j < n; ++j) {
    x[j] = std::exp2(x[j] - sub);
    acc += x[j];
  }
  return acc;
#endif
}

inline void scale_row(float* x, int n, float a) {
#ifdef MPTK_AVX512_PATH
  if (cpu_avx512()) return scale_row512(x, n, a);
#endif
#ifdef MPTK_AVX2
  const __m256 s = _mm256_set1_ps(a);
  for (int j = 0; j < n; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), s));
#else
  for (int j = 0; j < n; ++j) x[j] *= a;
#endif
}

// dot of two float32 rows, n % 8 == 0.
inline float dot_row(const float* a, const float* b, int n) {
#ifdef MPTK_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (int j = 0; j < n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
  return hsum8(acc);
#else
  float acc = 0.f;
  for (int j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
#endif
}

// ds[j] = p[j] * (ds[j] - delta), n % 8 == 0 (dP -> dS in place).
inline void softmax_grad_row(float* ds, const float* p, float delta, int n) {
#ifdef MPTK_AVX512_PATH
  if (cpu_avx512()) return softmax_grad_row512(ds, p, delta, n);
#endif
#ifdef MPTK_AVX2
  const __m256 d = _mm256_set1_ps(delta);
  for (int j = 0; j < n; j += 8)
    _mm256_storeu_ps(ds + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(ds + j), d)));
#else
  for (int j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - delta);
#endif
}

// Row of storage type T (length d) -> float32 row of length dp >= d, zero padded.
template <typename T>
inline void load_row(float* dst, const T* src, int d, int dp) {
  int j = 0;
#ifdef MPTK_AVX2
  for (; j + 8 <= d; j += 8) _mm256_storeu_ps(dst + j, load8(src + j));
#endif
  for (; j < d; ++j) dst[j] = to_float(src[j]);
  for (; j < dp; ++j) dst[j] = 0.f;
}

// float32 row * scale -> storage type T (first d elements).
template <typename T>
inline void store_row(T* dst, const float* src, int d, float scale) {
  int j = 0;
#ifdef MPTK_AVX2
  const __m256 s = _mm256_set1_ps(scale);
  for (; j + 8 <= d; j += 8) store8(dst + j, _mm256_mul_ps(_mm256_loadu_ps(src + j), s));
#endif
  for (; j < d; ++j) dst[j] = from_float<T>(src[j] * scale);
}

#ifdef MPTK_AVX512_PATH
// Definitions of the 512-bit row helpers declared above. Called from code compiled without the
// 512-bit target (a portable build), they are not inlined there: one call per row of 64 or so.
MPTK_AVX512_FN inline void exp2_diff512(float* out, const float* a, const float* b, int n) {
  const __m512 zero = _mm512_setzero_ps();
  int j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j));
    _mm512_storeu_ps(out + j, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q), exp2_ps512(d), zero));
  }
  if (j < n) {  // the last 1-15 through the same 16-lane code, zero padded
    alignas(64) float d[16] = {};
    for (int t = 0; t < n - j; ++t) d[t] = a[j + t] - b[j + t];
    const __m512 v = _mm512_load_ps(d);
    _mm512_store_ps(d, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), exp2_ps512(v), zero));
    std::copy(d, d + (n - j), out + j);
  }
}

MPTK_AVX512_FN inline float scale_alibi_mask_max512(float* x, float scale, float slope, int offset, int n) {
  const __m512 s = _mm512_set1_ps(scale), sl = _mm512_set1_ps(slope), ninf = _mm512_set1_ps(kNegInf);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 m = ninf;
  __mmask16 un = 0;
  int j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i rel = _mm512_add_epi32(lane, _mm512_set1_epi32(j + offset));
    __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), s, _mm512_mul_ps(sl, _mm512_cvtepi32_ps(rel)));
    if (j + 15 + offset > 0) v = _mm512_mask_blend_ps(_mm512_cmpgt_epi32_mask(rel, _mm512_setzero_si512()), v, ninf);
    _mm512_storeu_ps(x + j, v);
    m = _mm512_max_ps(m, v);
    un |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  if (j < n) {  // n % 8 == 0: one last 8 (lanes 0-7 of the same arithmetic)
    const __mmask16 k8 = 0xff;
    const __m512i rel = _mm512_add_epi32(lane, _mm512_set1_epi32(j + offset));
    __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k8, x + j), s, _mm512_mul_ps(sl, _mm512_cvtepi32_ps(rel)));
    v = _mm512_mask_blend_ps(_mm512_cmpgt_epi32_mask(rel, _mm512_setzero_si512()), v, ninf);
    _mm512_mask_storeu_ps(x + j, k8, v);
    m = _mm512_mask_max_ps(m, k8, m, v);
    un |= _mm512_mask_cmp_ps_mask(k8, v, v, _CMP_UNORD_Q);
  }
  return un ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(m);
}

MPTK_AVX512_FN inline float exp2_sub_sum512(float* x, int n, float sub) {
  const __m512 s = _mm512_set1_ps(sub);
  __m256 acc = _mm256_setzero_ps();
  int j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp2_ps512(_mm512_sub_ps(_mm512_loadu_ps(x + j), s));
    _mm512_storeu_ps(x + j, e);
    acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
    acc = _mm256_add_ps(acc, _mm512_extractf32x8_ps(e, 1));
  }
  if (j < n) {  // n % 8 == 0: one last 8
    const __m256 e = _mm512_castps512_ps256(exp2_ps512(zext512(
        _mm256_sub_ps(_mm256_loadu_ps(x + j), _mm512_castps512_ps256(s)))));
    _mm256_storeu_ps(x + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  return hsum8(acc);
}

MPTK_AVX512_FN inline void scale_row512(float* x, int n, float a) {
  const __m512 s = _mm512_set1_ps(a);
  int j = 0;
  for (; j + 16 <= n; j += 16) _mm512_storeu_ps(x + j, _mm512_mul_ps(_mm512_loadu_ps(x + j), s));
  if (j < n) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), _mm512_castps512_ps256(s)));
}

MPTK_AVX512_FN inline void softmax_grad_row512(float* ds, const float* p, float delta, int n) {
  const __m512 d = _mm512_set1_ps(delta);
  int j = 0;
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(ds + j, _mm512_mul_ps(_mm512_loadu_ps(p + j), _mm512_sub_ps(_mm512_loadu_ps(ds + j), d)));
  if (j < n)
    _mm256_storeu_ps(ds + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(ds + j),
                                                                                   _mm512_castps512_ps256(d))));
}
#endif

}  // namespace attn_cpu
}  // namespace mptk
