// CPU cross-entropy: OpenMP over rows, AVX2 (or AVX-512, chosen at run time) over the vocab axis (bf16/fp16 converted at load and
// store, csrc/common/cpu_math.h; exp2 from attention_cpu_math.h). The twin of cross_entropy_cuda.cu:
// one row is one unit of work, float32 arithmetic, exponentials taken as 2^((x - shift) * log2(e))
// with the shift (the row's max, then lse) subtracted first, the same outputs (cross_entropy.h). The
// row (a few hundred KB at most) stays in L2 between its passes.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "attention/attention_cpu_math.h"
#include "common/cpu_math.h"
#include "common/error.h"
#include "loss/cross_entropy.h"

namespace mptk {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int64_t kParallelMinElems = 1 << 15;

#ifdef MPTK_AVX512_PATH
// The 512-bit twins of row_max, row_sum_exp2 and the backward's row (taken when cpu_avx512()):
// bitwise the same results. The sum's 16 lanes are the 256-bit loop's two 8-lane accumulators
// (a0 = lanes 0-7, a1 = lanes 8-15), each adding the same terms in the same order.
// The vector part of row_max: m and nan over x[0, v), returns v (the scalar tail is row_max's).
template <typename T>
MPTK_AVX512_FN int64_t row_max512(const T* x, int64_t V, float& m, bool& nan) {
  int64_t v = 0;
  __m512 a0 = _mm512_set1_ps(m), a1 = a0, a2 = a0, a3 = a0;
  __mmask16 un = 0;
  for (; v + 64 <= V; v += 64) {
    const __m512 x0 = load16(x + v), x1 = load16(x + v + 16), x2 = load16(x + v + 32), x3 = load16(x + v + 48);
    a0 = _mm512_max_ps(a0, x0);
    a1 = _mm512_max_ps(a1, x1);
    a2 = _mm512_max_ps(a2, x2);
    a3 = _mm512_max_ps(a3, x3);
    un |= _mm512_cmp_ps_mask(x0, x1, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(x2, x3, _CMP_UNORD_Q);
  }
  for (; v + 16 <= V; v += 16) {
    const __m512 x0 = load16(x + v);
    a0 = _mm512_max_ps(a0, x0);
    un |= _mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q);
  }
  m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3)));
  nan = un != 0;
  return v;
}

// The vector part of row_sum_exp2: s over x[0, v), returns v.
template <typename T>
MPTK_AVX512_FN int64_t row_sum_exp2_512(const T* x, int64_t V, float m, float& s) {
  int64_t v = 0;
  const __m512 l2e = _mm512_set1_ps(kLog2e), vm = _mm512_set1_ps(m);
  __m512 a = _mm512_setzero_ps();
  for (; v + 16 <= V; v += 16)
    a = _mm512_add_ps(a, attn_cpu::exp2_ps512(_mm512_mul_ps(_mm512_sub_ps(load16(x + v), vm), l2e)));
  if (v + 8 <= V) {  // one more 8 into a0 (lanes 0-7)
    const __m512 e = attn_cpu::exp2_ps512(zext512(
        _mm256_mul_ps(_mm256_sub_ps(load8(x + v), _mm512_castps512_ps256(vm)), _mm512_castps512_ps256(l2e))));
    a = _mm512_mask_add_ps(a, 0xff, a, e);
    v += 8;
  }
  s = hsum8(_mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)));
  return v;
}

// d[v] = 2^((x_v - lse) * log2e) * g for v in [0, V - V % 8); returns where the scalar tail starts.
template <typename T>
MPTK_AVX512_FN int64_t bwd_row512(T* d, const T* x, int64_t V, float lse, float g) {
  int64_t v = 0;
  const __m512 l2e = _mm512_set1_ps(kLog2e), vl = _mm512_set1_ps(lse), vg = _mm512_set1_ps(g);
  for (; v + 16 <= V; v += 16)
    store16(d + v, _mm512_mul_ps(attn_cpu::exp2_ps512(_mm512_mul_ps(_mm512_sub_ps(load16(x + v), vl), l2e)), vg));
  if (v + 8 <= V) {
    const __m512 e = attn_cpu::exp2_ps512(zext512(
        _mm256_mul_ps(_mm256_sub_ps(load8(x + v), _mm512_castps512_ps256(vl)), _mm512_castps512_ps256(l2e))));
    store8(d + v, _mm256_mul_ps(_mm512_castps512_ps256(e), _mm512_castps512_ps256(vg)));
    v += 8;
  }
  return v;
}
#endif

template <typename T>
float row_max(const T* x, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t v = 0;
  bool nan = false;
#ifdef MPTK_AVX512_PATH
  if (cpu_avx512()) v = row_max512(x, V, m, nan);
  else  // the 256-bit loop below
#endif
  {
#ifdef MPTK_AVX2
  // max_ps drops a NaN (it returns its second operand when either is NaN): NaNs are tracked apart.
  __m256 a0 = _mm256_set1_ps(m), a1 = a0, a2 = a0, a3 = a0, un = _mm256_setzero_ps();
  for (; v + 32 <= V; v += 32) {
    const __m256 x0 = load8(x + v), x1 = load8(x + v + 8), x2 = load8(x + v + 16), x3 = load8(x + v + 24);
    a0 = _mm256_max_ps(a0, x0);
    a1 = _mm256_max_ps(a1, x1);
    a2 = _mm256_max_ps(a2, x2);
    a3 = _mm256_max_ps(a3, x3);
    un = _mm256_or_ps(un, _mm256_or_ps(_mm256_cmp_ps(x0, x1, _CMP_UNORD_Q), _mm256_cmp_ps(x2, x3, _CMP_UNORD_Q)));
  }
  for (; v + 8 <= V; v += 8) {
    const __m256 x0 = load8(x + v);
    a0 = _mm256_max_ps(a0, x0);
    un = _mm256_or_ps(un, _mm256_cmp_ps(x0, x0, _CMP_UNORD_Q));
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3)));
  for (float e : t) m = std::max(m, e);
  nan = _mm256_movemask_ps(un) != 0;
#endif
  }
  for (; v < V; ++v) {
    const float e = to_float(x[v]);
    nan |= e != e;
    m = std::max(m, e);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// sum_v 2^((x_v - m) * log2e). The shift is taken before the scaling: x * log2e overflows float32 for
// |x| > ~2.36e38, x - m does not for finite logits of one sign (and -inf for opposite signs: 0).
template <typename T>
float row_sum_exp2(const T* x, int64_t V, float m) {
  float s = 0.f;
  int64_t v = 0;
#ifdef MPTK_AVX512_PATH
  if (cpu_avx512()) v = row_sum_exp2_512(x, V, m, s);
  else  // the 256-bit loop below
#endif
  {
#ifdef MPTK_AVX2
  const __m256 l2e = _mm256_set1_ps(kLog2e), vm = _mm256_set1_ps(m);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  for (; v + 16 <= V; v += 16) {
    a0 = _mm256_add_ps(a0, attn_cpu::exp2_ps(_mm256_mul_ps(_mm256_sub_ps(load8(x + v), vm), l2e)));
    a1 = _mm256_add_ps(a1, attn_cpu::exp2_ps(_mm256_mul_ps(_mm256_sub_ps(load8(x + v + 8), vm), l2e)));
  }
  for (; v + 8 <= V; v += 8)
    a0 = _mm256_add_ps(a0, attn_cpu::exp2_ps(_mm256_mul_ps(_mm256_sub_ps(load8(x + v), vm), l2e)));
  s = hsum8(_mm256_add_ps(a0, a1));
#endif
  }
  for (; v < V; ++v) s += std::exp2((to_float(x[v]) - m) * kLog2e);
  return s;
}

template <typename T>
int64_t fwd_impl(const CrossEntropyFwdParams& p) {
  const T* base = static_cast<const T*>(p.logits);
  const int64_t V = p.vocab;
  int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (p.rows * V >= kParallelMinElems)
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t t = p.targets[r];
    if (t == p.ignore_index) {
      p.loss[r] = 0.f;
      p.lse[r] = 0.f;
      continue;
    }
    const T* x = base + r * p.row_stride;
    // Max first (a pass over a row that then sits in L2), then the sum of exponentials shifted by
    // it: no overflow, and the largest term is exactly 1.
    const float m = row_max(x, V);
    float lse;
    if (std::isinf(m)) {  // every logit -inf: lse -inf (loss NaN, as torch); a +inf logit: NaN, as torch
      lse = m < 0 ? m : std::numeric_limits<float>::quiet_NaN();
    } else {
      lse = m + std::log2(row_sum_exp2(x, V, m)) * kLn2;
    }
    p.lse[r] = lse;
    if (t < 0 || t >= V) {
      p.loss[r] = std::numeric_limits<float>::quiet_NaN();
      ++bad;
    } else {
      p.loss[r] = lse - to_float(x[t]);
    }
  }
  return bad;
}

template <typename T>
void bwd_impl(const CrossEntropyBwdParams& p) {
  const int64_t V = p.vocab;
#pragma omp parallel for schedule(static) if (p.rows * V >= kParallelMinElems)
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t t = p.targets[r];
    T* d = static_cast<T*>(p.dlogits) + r * p.dlogits_row_stride;
    if (t == p.ignore_index) {
      const T zero = from_float<T>(0.f);
      for (int64_t v = 0; v < V; ++v) d[v] = zero;
      continue;
    }
    const T* x = static_cast<const T*>(p.logits) + r * p.row_stride;
    const float g = p.drow[r];
    if (t < 0 || t >= V) {
      const T nan = from_float<T>(std::numeric_limits<float>::quiet_NaN());
      for (int64_t v = 0; v < V; ++v) d[v] = nan;
      continue;
    }
    const float lse = p.lse[r];
    if (lse != lse) {  // a NaN logit: the whole row is NaN (filled here rather than through exp2_ps's NaN)
      const T nan = from_float<T>(std::numeric_limits<float>::quiet_NaN());
      for (int64_t v = 0; v < V; ++v) d[v] = nan;
      continue;
    }
    int64_t v = 0;
#ifdef MPTK_AVX512_PATH
    if (cpu_avx512()) v = bwd_row512(d, x, V, lse, g);
#endif
#ifdef MPTK_AVX2
    const __m256 l2e = _mm256_set1_ps(kLog2e), vl = _mm256_set1_ps(lse), vg = _mm256_set1_ps(g);
    for (; v + 8 <= V; v += 8)
      store8(d + v, _mm256_mul_ps(attn_cpu::exp2_ps(_mm256_mul_ps(_mm256_sub_ps(load8(x + v), vl), l2e)), vg));
#endif
    for (; v < V; ++v) d[v] = from_float<T>(std::exp2((to_float(x[v]) - lse) * kLog2e) * g);
    // The target's element: softmax - 1, from the float32 probability (not from the stored one).
    d[t] = from_float<T>((std::exp2((to_float(x[t]) - lse) * kLog2e) - 1.f) * g);
  }
}

template <typename F>
auto dispatch(DType dtype, F&& f) {
  if (dtype == DType::Float32) return f(float{});
  if (dtype == DType::BFloat16) return f(bf16{});
  if (dtype == DType::Float16) return f(fp16{});
  MPTK_CHECK(false, "cross_entropy: unsupported dtype ", dtype_name(dtype));
  return f(float{});
}

}  // namespace

int64_t cross_entropy_fwd_cpu(const CrossEntropyFwdParams& p) {
  MPTK_CHECK(p.vocab > 0 || p.rows == 0, "cross_entropy_fwd_cpu: vocab must be positive");
  return dispatch(p.dtype, [&](auto t) { return fwd_impl<decltype(t)>(p); });
}

void cross_entropy_bwd_cpu(const CrossEntropyBwdParams& p) {
  MPTK_CHECK(p.vocab > 0 || p.rows == 0, "cross_entropy_bwd_cpu: vocab must be positive");
  dispatch(p.dtype, [&](auto t) {
    bwd_impl<decltype(t)>(p);
    return 0;
  });
}

}  // namespace mptk
