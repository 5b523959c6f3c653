// Host-side numeric helpers shared by the CPU kernels: bfloat16/float16 storage types with
// round-to-nearest-even conversion, and 8-wide AVX2 load/store of them as float32.
// Every CPU kernel computes in float32 (or wider) and converts at load/store, like the CUDA twins.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__SSE__)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr (set_flush_denormal, ScopedFlushDenormals)
#define MPTK_MXCSR 1
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MPTK_AVX2 1
// 512-bit paths, compiled into every x86-64 build (GCC/Clang function targets) and taken at run time
// when the CPU has AVX-512 F/VL/BW/DQ: a portable -mavx2 build uses them too, and a test can turn
// them off and compare (each path's results are bitwise those of its 256-bit twin).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MPTK_AVX512_PATH 1
#define MPTK_AVX512_FN __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#if !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 headers build their "undefined" vectors by self-initialisation (GCC bug 105593),
// and -Wall then reports an uninitialised variable wherever a 512-bit intrinsic is inlined (~100
// false warnings per kernel file). Off for the files that include this header, with GCC 12 only:
// GCC 13 and later, and Clang, keep the check.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif
#endif

namespace mptk {

// Whether the CPU kernels take their 512-bit paths now: the CPU (and OS) supports AVX-512 F/VL/BW/DQ
// and neither MPTK_CPU_AVX512=0 in the environment (read once) nor set_cpu_avx512(false) turned
// them off. set_cpu_avx512 returns the previous setting; turning it on on a CPU without AVX-512
// leaves it off. (common/cpu_features.cpp)
bool cpu_avx512_supported();
bool cpu_avx512();
bool set_cpu_avx512(bool on);
// MXCSR bit 15, flush-to-zero (denormal results become 0), and bit 6, denormals-are-zero (inputs).
constexpr unsigned kMxcsrFlushDenormals = 0x8040u;

// Flush-to-zero and denormals-are-zero on (or off) for the calling thread and every OpenMP pool
// thread (x86; elsewhere changes nothing). Returns whether the calling thread had both on before.
// Denormal operands cost Intel cores a microcode assist per operation: a CPU training run slowed
// 1.5x once its gradients and attention probabilities reached them (benchmarks/NOTES.md, Training).
bool set_flush_denormal(bool on);

// Flush-to-zero and denormals-are-zero on the calling thread for this object's lifetime (x86; a
// no-op elsewhere), the previous MXCSR restored after. A kernel's parallel region opens one per
// thread, so its float32 arithmetic never takes the microcode path for denormals whatever the caller
// set: with ALiBi the probabilities of far keys, and their products with a loss's small gradients,
// fall into that range over long sequences (a bfloat16 tiny-model step at 16,384 tokens: 26-28 s
// without, 10.5-11 s with; attention's backward was 80% of it). Only values below 2^-126 change
// (to zero): the same results elsewhere, far below every output's rounding.
struct ScopedFlushDenormals {
#if defined(MPTK_MXCSR)
  unsigned saved;
  ScopedFlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | kMxcsrFlushDenormals); }
  ~ScopedFlushDenormals() { _mm_setcsr(saved); }
#else
  ScopedFlushDenormals() {}  // (user-provided: the kernels declare it const)
#endif
  ScopedFlushDenormals(const ScopedFlushDenormals&) = delete;
  ScopedFlushDenormals& operator=(const ScopedFlushDenormals&) = delete;
};

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

inline float bf16_to_float(bf16 h) {
  uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return bf16{static_cast<uint16_t>(u >> 16)};
}

inline float fp16_to_float(fp16 h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.bits);
#else
  uint32_t sign = (h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1f, mant = h.bits & 0x3ff, u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { ++e; mant <<= 1; } while (!(mant & 0x400));
      u = sign | ((127 - 15 - e) << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

inline fp16 float_to_fp16(float f) {
#if defined(__F16C__)
  return fp16{static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT))};
#else
  // Portable path through double rounding is not exact for all inputs; the F16C path is the one
  // the x86 builds use. Kept simple: round mantissa to nearest-even on the float bits.
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  int32_t exp = static_cast<int32_t>((u >> 23) & 0xff) - 127 + 15;
  uint32_t mant = u & 0x7fffffu;
  if (((u >> 23) & 0xff) == 0xff) return fp16{static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0))};
  if (exp >= 31) return fp16{static_cast<uint16_t>(sign | 0x7c00u)};
  if (exp <= 0) {
    if (exp < -10) return fp16{static_cast<uint16_t>(sign)};
    mant |= 0x800000u;
    uint32_t shift = static_cast<uint32_t>(14 - exp);
    uint32_t half = mant >> shift, rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return fp16{static_cast<uint16_t>(sign | half)};
  }
  uint32_t h = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
  return fp16{static_cast<uint16_t>(h)};
#endif
}

// Uniform scalar load/store so kernels can be templated on the storage type.
inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return bf16_to_float(x); }
inline float to_float(fp16 x) { return fp16_to_float(x); }
template <typename T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline bf16 from_float<bf16>(float x) { return float_to_bf16(x); }
template <> inline fp16 from_float<fp16>(float x) { return float_to_fp16(x); }

#ifdef MPTK_AVX2
// 8 elements <-> one __m256 of float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const fp16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// 8 floats rounded to 8 bfloat16 / float16 in one __m128i.
inline __m128i pack8(bf16*, __m256 v) {
  // Round to nearest even on the integer bits, NaN kept quiet; then pack the high halves.
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  __m256 is_nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  __m256i nan_bits = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
  u = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(nan_bits), is_nan));
  __m256i hi = _mm256_srli_epi32(u, 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
}
inline __m128i pack8(fp16*, __m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }

// 16 floats (lo = elements 0-7, hi = 8-15) rounded to 16 bfloat16, for callers that know no element
// is NaN: round to nearest even on the integer bits, without pack8's NaN test and blend. Exact for
// every non-NaN input (finite values that round past the largest bfloat16 become inf, as they must;
// inf stays inf); a NaN input could come out as inf or -0, hence the precondition.
inline __m256i pack16_bf16_no_nan(__m256 lo, __m256 hi) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
  __m256i a = _mm256_castps_si256(lo), b = _mm256_castps_si256(hi);
  a = _mm256_add_epi32(a, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(a, 16), one)));
  b = _mm256_add_epi32(b, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(b, 16), one)));
  // packus works within 128-bit lanes: [a0-3 b0-3 | a4-7 b4-7]; the qword permute restores the order.
  __m256i packed = _mm256_packus_epi32(_mm256_srli_epi32(a, 16), _mm256_srli_epi32(b, 16));
  return _mm256_permute4x64_epi64(packed, 0xD8);
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
template <typename T>
inline void store8(T* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), pack8(p, v));
}

// Non-temporal (streaming) stores: the line is written without being read first and bypasses the
// caches. For outputs far larger than the last-level cache that removes the read-for-ownership
// traffic, a third of what a read-one-write-one kernel moves. p must be aligned to 8 elements
// (32 bytes for float, 16 for 16-bit types); issue _mm_sfence() before the data is published.
inline void store8_stream(float* p, __m256 v) { _mm256_stream_ps(p, v); }
template <typename T>
inline void store8_stream(T* p, __m256 v) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), pack8(p, v));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}
inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}
#ifdef MPTK_AVX512_PATH
// 16 elements <-> one __m512 of float32 (512-bit paths; conversions as load8 / store8 on each half).
MPTK_AVX512_FN inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
MPTK_AVX512_FN inline __m512 load16(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
MPTK_AVX512_FN inline __m512 load16(const fp16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
MPTK_AVX512_FN inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// The first n (0-16) elements as float32, zeros above; elements past n are not read.
MPTK_AVX512_FN inline __m512 load16_first(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
MPTK_AVX512_FN inline __m512 load16_first(const bf16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
MPTK_AVX512_FN inline __m512 load16_first(const fp16* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
// 8 floats in the low half of a __m512, zeros above (a cast would leave the upper half undefined).
MPTK_AVX512_FN inline __m512 zext512(__m256 v) { return _mm512_insertf32x8(_mm512_setzero_ps(), v, 0); }
template <typename T>
MPTK_AVX512_FN inline void store16(T* p, __m512 v) {
  store8(p, _mm512_castps512_ps256(v));
  store8(p + 8, _mm512_extractf32x8_ps(v, 1));
}
#endif
#endif

}  // namespace mptk
