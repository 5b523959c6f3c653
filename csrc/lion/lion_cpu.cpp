// Fused Lion step on the CPU: one OpenMP parallel loop over the chunks of every tensor of a dtype
// group (see lion.h for the chunk decomposition, shared with lion_cuda.cu), AVX2/FMA vectorised,
// float32 math, bfloat16 handled as raw bits with the same rounding code as the CUDA kernel.
//
// Memory traffic per float32 element: read p, g, m and write p, m = 20 bytes, one pass.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/cpu_math.h"
#include "common/error.h"
#include "lion/lion.h"

namespace mptk {
namespace {

using bf16_bits = uint16_t;

inline float load1(const float* p) { return *p; }
inline float load1(const bf16_bits* p) { return lion_bf16_to_float(*p); }
inline void store1(float* p, float v, bool, uint32_t) { *p = v; }
inline void store1(bf16_bits* p, float v, bool sr, uint32_t rnd) {
  *p = sr ? lion_float_to_bf16_sr(v, rnd) : lion_float_to_bf16_rne(v);
}

// Chunk k of the flattened list belongs to tensor upper_bound(prefix, k) - 1 (empty tensors own
// no chunks and are skipped by the search).
struct ChunkTable {
  std::vector<int64_t> prefix;  // prefix[i] = first global chunk of tensor i; prefix[n] = total
  explicit ChunkTable(const std::vector<int64_t>& numel) : prefix(numel.size() + 1, 0) {
    for (size_t i = 0; i < numel.size(); ++i) prefix[i + 1] = prefix[i] + lion_num_chunks(numel[i]);
  }
  int64_t total() const { return prefix.back(); }
  size_t tensor_of(int64_t chunk) const {
    return static_cast<size_t>(std::upper_bound(prefix.begin(), prefix.end(), chunk) - prefix.begin()) - 1;
  }
};

#ifdef MPTK_AVX2
inline __m256 load8v(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8v(const bf16_bits* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline __m256i mix8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bU)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  return x;
}
// lion_rng_bits for the 16 consecutive elements starting at the even index `elem`: 8 pair hashes
// (one full-width vector of multiplies), widened to two 8-lane vectors of 16-bit values.
inline void rng16(LionRngKey key, int64_t elem, __m256i out[2]) {
  const __m256i pair = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint64_t>(elem) >> 1)),
                                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i x = mix8(_mm256_xor_si256(pair, _mm256_set1_epi32(static_cast<int>(key.k1))));
  x = mix8(_mm256_xor_si256(x, _mm256_set1_epi32(static_cast<int>(key.k2))));
  out[0] = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(x));
  out[1] = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(x, 1));
}
inline __m128i mix4(__m128i x) {
  x = _mm_xor_si128(x, _mm_srli_epi32(x, 16));
  x = _mm_mullo_epi32(x, _mm_set1_epi32(0x7feb352d));
  x = _mm_xor_si128(x, _mm_srli_epi32(x, 15));
  x = _mm_mullo_epi32(x, _mm_set1_epi32(static_cast<int>(0x846ca68bU)));
  x = _mm_xor_si128(x, _mm_srli_epi32(x, 16));
  return x;
}
// lion_rng_bits for the 8 consecutive elements starting at the even index `elem`: 4 pair hashes,
// whose 16-bit halves widen in order (low half = even element) to 8 lanes.
inline __m256i rng8(LionRngKey key, int64_t elem) {
  const __m128i pair = _mm_add_epi32(_mm_set1_epi32(static_cast<int>(static_cast<uint64_t>(elem) >> 1)),
                                     _mm_setr_epi32(0, 1, 2, 3));
  __m128i x = mix4(_mm_xor_si128(pair, _mm_set1_epi32(static_cast<int>(key.k1))));
  x = mix4(_mm_xor_si128(x, _mm_set1_epi32(static_cast<int>(key.k2))));
  return _mm256_cvtepu16_epi32(x);
}

inline void store8v(float* p, __m256 v, const __m256i*) { _mm256_storeu_ps(p, v); }
// Bit-for-bit the vector form of lion_float_to_bf16_rne / lion_float_to_bf16_sr (rnd: 16 random
// bits per lane, or null for round to nearest even).
inline void store8v(bf16_bits* p, __m256 v, const __m256i* rnd) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i exp_mask = _mm256_set1_epi32(0x7f800000);
  const __m256i nonfinite = _mm256_cmpeq_epi32(_mm256_and_si256(u, exp_mask), exp_mask);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rne = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  __m256i r = rne;
  if (rnd != nullptr) {
    r = _mm256_blendv_epi8(_mm256_add_epi32(u, *rnd), rne, nonfinite);
  }
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), is_nan);
  const __m256i hi = _mm256_srli_epi32(r, 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)));
}

inline __m256 sign8(__m256 c) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 s = _mm256_blendv_ps(c, _mm256_set1_ps(1.f), _mm256_cmp_ps(c, zero, _CMP_GT_OQ));
  return _mm256_blendv_ps(s, _mm256_set1_ps(-1.f), _mm256_cmp_ps(c, zero, _CMP_LT_OQ));
}
#endif

template <typename P, typename G, typename M>
void lion_chunk(const LionTensor& t, const LionHyper& h, int64_t begin, int64_t end, float gmul,
                uint64_t seed, uint64_t step) {
  P* p = static_cast<P*>(t.param);
  const G* g = static_cast<const G*>(t.grad);
  M* m = static_cast<M*>(t.exp_avg);
  const bool sr_p = std::is_same<P, bf16_bits>::value && h.stochastic_rounding;
  const bool sr_m = std::is_same<M, bf16_bits>::value && h.stochastic_rounding;
  const uint32_t elem_hi = static_cast<uint32_t>(static_cast<uint64_t>(begin) >> 32);
  const LionRngKey key_p = lion_rng_key(seed, step, t.rng_index, 0, elem_hi);
  const LionRngKey key_m = lion_rng_key(seed, step, t.rng_index, 1, elem_hi);
  int64_t i = begin;
#ifdef MPTK_AVX2
  const __m256 vb1 = _mm256_set1_ps(h.beta1), v1mb1 = _mm256_set1_ps(h.one_minus_beta1);
  const __m256 vb2 = _mm256_set1_ps(h.beta2), v1mb2 = _mm256_set1_ps(h.one_minus_beta2);
  const __m256 vneg_lr = _mm256_set1_ps(-h.lr), vneg_decay = _mm256_set1_ps(-h.decay);
  const __m256 vgmul = _mm256_set1_ps(gmul);
  auto body8 = [&](int64_t j, const __m256i* rnd_p, const __m256i* rnd_m) {
    const __m256 gv = _mm256_mul_ps(load8v(g + j), vgmul);
    __m256 mv = load8v(m + j);
    __m256 pv = load8v(p + j);
    const __m256 c = _mm256_fmadd_ps(vb1, mv, _mm256_mul_ps(v1mb1, gv));
    const __m256 s = sign8(c);
    pv = _mm256_add_ps(pv, _mm256_fmadd_ps(vneg_decay, pv, _mm256_mul_ps(vneg_lr, s)));
    mv = _mm256_fmadd_ps(vb2, mv, _mm256_mul_ps(v1mb2, gv));
    store8v(p + j, pv, rnd_p);
    store8v(m + j, mv, rnd_m);
  };
  // 16 elements per iteration so one 8-lane hash serves them (i stays even: chunks start at
  // multiples of kLionChunk).
  __m256i rp[2], rm[2];
  for (; i + 16 <= end; i += 16) {
    if (sr_p) rng16(key_p, i, rp);
    if (sr_m) rng16(key_m, i, rm);
    body8(i, sr_p ? &rp[0] : nullptr, sr_m ? &rm[0] : nullptr);
    body8(i + 8, sr_p ? &rp[1] : nullptr, sr_m ? &rm[1] : nullptr);
  }
  if (i + 8 <= end) {
    if (sr_p) rp[0] = rng8(key_p, i);
    if (sr_m) rm[0] = rng8(key_m, i);
    body8(i, sr_p ? &rp[0] : nullptr, sr_m ? &rm[0] : nullptr);
    i += 8;
  }
#endif
  for (; i < end; ++i) {
    float pv = load1(p + i), mv = load1(m + i);
    lion_update(pv, mv, load1(g + i) * gmul, h);
    store1(p + i, pv, sr_p, sr_p ? lion_rng_bits(key_p, static_cast<uint64_t>(i)) : 0u);
    store1(m + i, mv, sr_m, sr_m ? lion_rng_bits(key_m, static_cast<uint64_t>(i)) : 0u);
  }
}

template <typename P, typename G, typename M>
void lion_step_typed(const LionStepParams& sp, float gmul) {
  std::vector<int64_t> numel;
  numel.reserve(sp.tensors.size());
  for (const auto& t : sp.tensors) numel.push_back(t.numel);
  const ChunkTable table(numel);
  const int64_t total = table.total();
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < total; ++c) {
    const size_t ti = table.tensor_of(c);
    const LionTensor& t = sp.tensors[ti];
    const int64_t begin = (c - table.prefix[ti]) * kLionChunk;
    const int64_t end = std::min(t.numel, begin + kLionChunk);
    lion_chunk<P, G, M>(t, sp.hyper[t.hyper], begin, end, gmul, sp.seed, sp.step);
  }
}

template <typename T>
float sum_squares_chunk(const T* x, int64_t begin, int64_t end) {
  int64_t i = begin;
  float acc = 0.f;
#ifdef MPTK_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; i + 16 <= end; i += 16) {
    const __m256 v0 = load8v(x + i), v1 = load8v(x + i + 8);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
  }
  acc = hsum8(_mm256_add_ps(a0, a1));
#endif
  for (; i < end; ++i) {
    const float v = load1(x + i);
    acc = fmaf(v, v, acc);
  }
  return acc;
}

template <typename T>
void sum_squares_typed(const SumSquaresParams& sp) {
  const ChunkTable table(sp.numel);
  const int64_t total = table.total();
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < total; ++c) {
    const size_t ti = table.tensor_of(c);
    const int64_t begin = (c - table.prefix[ti]) * kLionChunk;
    const int64_t end = std::min(sp.numel[ti], begin + kLionChunk);
    sp.partials[c] = sum_squares_chunk(static_cast<const T*>(sp.data[ti]), begin, end);
  }
}

}  // namespace

void lion_step_cpu(const LionStepParams& sp) {
  if (sp.skip != nullptr && *sp.skip != 0.f) return;
  const float gmul = sp.grad_multiplier ? *sp.grad_multiplier : 1.f;
  const bool pf = sp.param_dtype == DType::Float32, gf = sp.grad_dtype == DType::Float32,
             mf = sp.state_dtype == DType::Float32;
  // 8 storage combinations; the compiler generates one vectorised loop for each.
  if (pf && gf && mf) return lion_step_typed<float, float, float>(sp, gmul);
  if (pf && gf && !mf) return lion_step_typed<float, float, bf16_bits>(sp, gmul);
  if (pf && !gf && mf) return lion_step_typed<float, bf16_bits, float>(sp, gmul);
  if (pf && !gf && !mf) return lion_step_typed<float, bf16_bits, bf16_bits>(sp, gmul);
  if (!pf && gf && mf) return lion_step_typed<bf16_bits, float, float>(sp, gmul);
  if (!pf && gf && !mf) return lion_step_typed<bf16_bits, float, bf16_bits>(sp, gmul);
  if (!pf && !gf && mf) return lion_step_typed<bf16_bits, bf16_bits, float>(sp, gmul);
  return lion_step_typed<bf16_bits, bf16_bits, bf16_bits>(sp, gmul);
}

void sum_squares_cpu(const SumSquaresParams& sp) {
  if (sp.dtype == DType::Float32) return sum_squares_typed<float>(sp);
  return sum_squares_typed<bf16_bits>(sp);
}

void lion_finalize_cpu(const LionFinalizeParams& fp) {
  double sumsq = 0.0;  // fixed order: the result does not depend on the thread count
  for (int64_t i = 0; i < fp.n_partials; ++i) sumsq += static_cast<double>(fp.partials[i]);
  lion_finalize_math(sumsq, fp);
}

}  // namespace mptk
