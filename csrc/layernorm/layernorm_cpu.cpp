// CPU LayerNorm: OpenMP over rows, AVX2/FMA over the hidden axis (csrc/common/cpu_math.h converts
// bfloat16/float16 at load and store), float32 statistics. The twin of layernorm_cuda.cu: one row
// is one unit of work, its statistics take two passes over the row (sum, then squared deviations)
// while the row sits in L1/L2, and the weight/bias gradients go through per-group float32 partial
// rows reduced in a fixed order (see layernorm.h).
#include <omp.h>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/aligned_vector.h"
#include "common/cpu_math.h"
#include "common/error.h"
#include "layernorm/layernorm.h"

// No implicit a*b+c contraction: the backward forms mean(g) from the same rounded products g that
// it later subtracts it from, so a constant row (hidden 1, or all g equal) gives exactly dx = 0
// instead of rstd (up to 1/sqrt(eps)) times a rounding difference. Explicit FMAs stay FMAs.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace mptk {
namespace {

// Below this many elements a launch is done by the calling thread alone: waking the OpenMP team
// costs more than the work (and far more on an oversubscribed machine).
constexpr int64_t kParallelMinElems = 1 << 15;

#ifdef MPTK_AVX2
template <bool kStream, typename T>
inline void store_out(T* p, __m256 v) {
  if constexpr (kStream) {
    store8_stream(p, v);
  } else {
    store8(p, v);
  }
}
#endif

// Outputs larger than this go out with streaming stores (common/cpu_math.h: store8_stream): they
// cannot stay cached for the next op anyway, and skipping the read-for-ownership saves a third of
// the forward's memory traffic. Half the last-level cache, which all cores share;
// MPT_KERNELS_STREAM_MIN_BYTES overrides it (read once per process).
int64_t streaming_store_min_bytes() {
  static const int64_t v = [] {
    if (const char* env = std::getenv("MPT_KERNELS_STREAM_MIN_BYTES")) return static_cast<int64_t>(std::atoll(env));
    long llc = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
    llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return static_cast<int64_t>(llc > 0 ? llc / 2 : (16 << 20));
  }();
  return v;
}

// Streaming stores need every row start aligned to 32 bytes (the bfloat16 path stores 16 elements,
// 32 bytes, at a time; the others 8 elements).
template <typename T>
bool rows_stream_aligned(const void* base, int64_t row_stride) {
  constexpr uintptr_t a = 32;
  return reinterpret_cast<uintptr_t>(base) % a == 0 && (row_stride * static_cast<int64_t>(sizeof(T))) % a == 0;
}

// Forward of one row. `hout` receives x + res rounded to TH when res is set; the statistics are
// taken over that rounded sum, as the reference does (what is normalised is what is returned).
// Without res, h is x itself (TX == TH: the dispatcher guarantees it). The row is converted to
// float32 once, into `scratch` (unused when TH is float: the row is read in place): the two
// statistics passes and the output pass then read floats from L1/L2, so a 16-bit row costs one
// conversion per element instead of three. w and b are float32 here. TX, TH, TY: the types of x,
// of h (residual, hout) and of y; all equal, or TH float with 16-bit TY (mixed, layernorm.h).
template <typename TX, typename TH, typename TY, bool kStream>
void layer_norm_fwd_row(const TX* x, const TH* res, TH* hout, const float* w, const float* b, bool wb_finite, TY* y,
                        int64_t H, float eps, float* scratch, float* mean_out, float* rstd_out) {
  constexpr bool kFloat = std::is_same_v<TH, float>;
  float* hf = kFloat ? nullptr : scratch;  // the row as float32, for 16-bit TH
  float sum = 0.f;
  int64_t i = 0;
#ifdef MPTK_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  if (res) {
    for (; i + 8 <= H; i += 8) {
      store8(hout + i, _mm256_add_ps(load8(x + i), load8(res + i)));
      __m256 v = load8(hout + i);  // the rounded sum
      if constexpr (!kFloat) _mm256_storeu_ps(hf + i, v);
      a0 = _mm256_add_ps(a0, v);
    }
  } else {
    // Four independent sums: one accumulator chain would wait on the add latency every 8 elements.
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; i + 32 <= H; i += 32) {
      __m256 v0 = load8(x + i), v1 = load8(x + i + 8), v2 = load8(x + i + 16), v3 = load8(x + i + 24);
      if constexpr (!kFloat) {
        _mm256_storeu_ps(hf + i, v0);
        _mm256_storeu_ps(hf + i + 8, v1);
        _mm256_storeu_ps(hf + i + 16, v2);
        _mm256_storeu_ps(hf + i + 24, v3);
      }
      a0 = _mm256_add_ps(a0, v0);
      a1 = _mm256_add_ps(a1, v1);
      a2 = _mm256_add_ps(a2, v2);
      a3 = _mm256_add_ps(a3, v3);
    }
    a0 = _mm256_add_ps(a0, a2);
    a1 = _mm256_add_ps(a1, a3);
    for (; i + 16 <= H; i += 16) {
      __m256 v0 = load8(x + i), v1 = load8(x + i + 8);
      if constexpr (!kFloat) {
        _mm256_storeu_ps(hf + i, v0);
        _mm256_storeu_ps(hf + i + 8, v1);
      }
      a0 = _mm256_add_ps(a0, v0);
      a1 = _mm256_add_ps(a1, v1);
    }
    for (; i + 8 <= H; i += 8) {
      __m256 v = load8(x + i);
      if constexpr (!kFloat) _mm256_storeu_ps(hf + i, v);
      a0 = _mm256_add_ps(a0, v);
    }
  }
  sum = hsum8(_mm256_add_ps(a0, a1));
#endif
  for (; i < H; ++i) {
    float v;
    if (res) {
      hout[i] = from_float<TH>(to_float(x[i]) + to_float(res[i]));
      v = to_float(hout[i]);
    } else {
      v = to_float(x[i]);
    }
    if constexpr (!kFloat) hf[i] = v;
    sum += v;
  }
  const float* h;
  if constexpr (kFloat) {
    h = res ? hout : reinterpret_cast<const float*>(x);  // no res: TX == TH == float
  } else {
    h = hf;
  }
  const float mean = sum / static_cast<float>(H);

  // Second pass over the cached row: squared deviations from the mean (no cancellation, unlike
  // E[x^2] - E[x]^2, which loses everything when |mean| >> std).
  float sq = 0.f;
  i = 0;
#ifdef MPTK_AVX2
  const __m256 vmean = _mm256_set1_ps(mean);
  a0 = _mm256_setzero_ps();
  a1 = _mm256_setzero_ps();
  {
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; i + 32 <= H; i += 32) {
      __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(h + i), vmean), d1 = _mm256_sub_ps(_mm256_loadu_ps(h + i + 8), vmean);
      __m256 d2 = _mm256_sub_ps(_mm256_loadu_ps(h + i + 16), vmean);
      __m256 d3 = _mm256_sub_ps(_mm256_loadu_ps(h + i + 24), vmean);
      a0 = _mm256_fmadd_ps(d0, d0, a0);
      a1 = _mm256_fmadd_ps(d1, d1, a1);
      a2 = _mm256_fmadd_ps(d2, d2, a2);
      a3 = _mm256_fmadd_ps(d3, d3, a3);
    }
    a0 = _mm256_add_ps(a0, a2);
    a1 = _mm256_add_ps(a1, a3);
  }
  for (; i + 16 <= H; i += 16) {
    __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(h + i), vmean), d1 = _mm256_sub_ps(_mm256_loadu_ps(h + i + 8), vmean);
    a0 = _mm256_fmadd_ps(d0, d0, a0);
    a1 = _mm256_fmadd_ps(d1, d1, a1);
  }
  for (; i + 8 <= H; i += 8) {
    __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(h + i), vmean);
    a0 = _mm256_fmadd_ps(d0, d0, a0);
  }
  sq = hsum8(_mm256_add_ps(a0, a1));
#endif
  for (; i < H; ++i) {
    float d = h[i] - mean;
    sq += d * d;
  }
  const float rstd = 1.f / std::sqrt(sq / static_cast<float>(H) + eps);
  if (mean_out) *mean_out = mean;
  if (rstd_out) *rstd_out = rstd;

  i = 0;
#ifdef MPTK_AVX2
  const __m256 vrstd = _mm256_set1_ps(rstd);
  if constexpr (std::is_same_v<TY, bf16>) {
    // A finite sum and sum of squares mean every h, the mean and rstd are finite, so every xhat is;
    // with finite w and b no output can be NaN and the rounding can skip pack8's NaN handling.
    if (wb_finite && std::isfinite(sum) && std::isfinite(sq) && std::isfinite(rstd)) {
      for (; i + 16 <= H; i += 16) {
        __m256 x0 = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(h + i), vmean), vrstd);
        __m256 x1 = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(h + i + 8), vmean), vrstd);
        __m256 y0, y1;  // the same operations as the generic loop below
        if (b) {
          y0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w + i), _mm256_loadu_ps(b + i));
          y1 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(b + i + 8));
        } else {
          y0 = _mm256_mul_ps(x0, _mm256_loadu_ps(w + i));
          y1 = _mm256_mul_ps(x1, _mm256_loadu_ps(w + i + 8));
        }
        __m256i packed = pack16_bf16_no_nan(y0, y1);
        if constexpr (kStream) {
          _mm256_stream_si256(reinterpret_cast<__m256i*>(y + i), packed);
        } else {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), packed);
        }
      }
    }
  }
  if (b) {
    for (; i + 8 <= H; i += 8) {
      __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(h + i), vmean), vrstd);
      store_out<kStream>(y + i, _mm256_fmadd_ps(xhat, _mm256_loadu_ps(w + i), _mm256_loadu_ps(b + i)));
    }
  } else {
    for (; i + 8 <= H; i += 8) {
      __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(h + i), vmean), vrstd);
      store_out<kStream>(y + i, _mm256_mul_ps(xhat, _mm256_loadu_ps(w + i)));
    }
  }
#endif
  for (; i < H; ++i) {
    float xhat = (h[i] - mean) * rstd;
    y[i] = from_float<TY>(std::fma(xhat, w[i], b ? b[i] : 0.f));
  }
}

// The weight (or bias) as float32: the array itself when WT is float, else converted into `buf`.
template <typename WT>
const float* as_float(const WT* v, int64_t n, aligned_vector<float>& buf) {
  if (v == nullptr) return nullptr;
  if constexpr (std::is_same_v<WT, float>) {
    return v;
  } else {
    buf.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) buf[i] = to_float(v[i]);
    return buf.data();
  }
}

template <typename TX, typename TH, typename TY, typename WT>
void layer_norm_fwd_impl(const LayerNormFwdParams& p) {
  const TX* x = static_cast<const TX*>(p.x);
  const TH* res = static_cast<const TH*>(p.residual);
  TH* hout = static_cast<TH*>(p.residual_out);
  TY* y = static_cast<TY*>(p.y);
  aligned_vector<float> wbuf, bbuf;
  const float* w = as_float(static_cast<const WT*>(p.weight), p.hidden, wbuf);
  const float* b = as_float(static_cast<const WT*>(p.bias), p.hidden, bbuf);
  bool wb_finite = true;  // lets the bfloat16 rows with finite statistics skip the NaN-safe rounding
  if constexpr (std::is_same_v<TY, bf16>)  // the only type that reads it
    for (int64_t c = 0; c < p.hidden; ++c) wb_finite &= std::isfinite(w[c]) && (!b || std::isfinite(b[c]));
  auto run = [&](auto stream) {
    constexpr bool kStream = decltype(stream)::value;
#pragma omp parallel if (p.rows * p.hidden >= kParallelMinElems)
    {
      aligned_vector<float> scratch(std::is_same_v<TH, float> ? 0 : static_cast<size_t>(p.hidden));
#pragma omp for schedule(static)
      for (int64_t r = 0; r < p.rows; ++r) {
        layer_norm_fwd_row<TX, TH, TY, kStream>(
            x + r * p.x_row_stride, res ? res + r * p.residual_row_stride : nullptr,
            hout ? hout + r * p.residual_out_row_stride : nullptr, w, b, wb_finite, y + r * p.y_row_stride, p.hidden, p.eps,
            scratch.data(), p.mean ? p.mean + r : nullptr, p.rstd ? p.rstd + r : nullptr);
      }
#ifdef MPTK_AVX2
      // Streaming stores are weakly ordered: each thread fences its own before the team joins.
      if constexpr (kStream) _mm_sfence();
#endif
    }
  };
#ifdef MPTK_AVX2
  if (p.rows * p.hidden * static_cast<int64_t>(sizeof(TY)) >= streaming_store_min_bytes() &&
      rows_stream_aligned<TY>(y, p.y_row_stride)) {
    run(std::true_type{});
    return;
  }
#endif
  run(std::false_type{});
}

// Backward of every row of group g (rows g, g + P, ...), accumulating dy * xhat and dy into the
// group's own float32 partial rows, which stay in this core's cache across the group's rows.
// The first pass keeps xhat and g = dy * w of the row in float32 scratch (2 * hidden floats), so
// the second pass reads them back from cache instead of converting h, dy and w again.
// TH: h, dresidual_out, dh; TY: dy and dx (equal, or TH float with 16-bit TY: layernorm.h).
template <typename TH, typename TY>
void layer_norm_bwd_group(const LayerNormBwdParams& p, const float* w, int64_t g, float* xh, float* gw) {
  const int64_t H = p.hidden, P = p.num_partials;
  float* dwp = p.workspace + g * H;
  float* dbp = p.dbias ? p.workspace + (P + g) * H : nullptr;
  std::fill(dwp, dwp + H, 0.f);
  if (dbp) std::fill(dbp, dbp + H, 0.f);
  for (int64_t r = g; r < p.rows; r += P) {
    const TH* h = static_cast<const TH*>(p.h) + r * p.h_row_stride;
    const TY* dy = static_cast<const TY*>(p.dy) + r * p.dy_row_stride;
    const TH* dres = p.dresidual_out ? static_cast<const TH*>(p.dresidual_out) + r * p.dresidual_out_row_stride : nullptr;
    TH* dh = static_cast<TH*>(p.dh) + r * p.dh_row_stride;
    TY* dx = p.dx ? static_cast<TY*>(p.dx) + r * p.dx_row_stride : nullptr;
    const float mean = p.mean[r], rstd = p.rstd[r];

    float s1 = 0.f, s2 = 0.f;  // sum(g), sum(g * xhat) with g = dy * w
    int64_t i = 0;
#ifdef MPTK_AVX2
    const __m256 vmean = _mm256_set1_ps(mean), vrstd = _mm256_set1_ps(rstd);
    __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
    for (; i + 8 <= H; i += 8) {
      __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(load8(h + i), vmean), vrstd);
      __m256 vdy = load8(dy + i);
      __m256 gg = _mm256_mul_ps(vdy, _mm256_loadu_ps(w + i));
      _mm256_storeu_ps(xh + i, xhat);
      _mm256_storeu_ps(gw + i, gg);
      a1 = _mm256_add_ps(a1, gg);
      a2 = _mm256_fmadd_ps(gg, xhat, a2);
      _mm256_storeu_ps(dwp + i, _mm256_fmadd_ps(vdy, xhat, _mm256_loadu_ps(dwp + i)));
      if (dbp) _mm256_storeu_ps(dbp + i, _mm256_add_ps(vdy, _mm256_loadu_ps(dbp + i)));
    }
    s1 = hsum8(a1);
    s2 = hsum8(a2);
#endif
    for (; i < H; ++i) {
      float xhat = (to_float(h[i]) - mean) * rstd, vdy = to_float(dy[i]), gg = vdy * w[i];
      xh[i] = xhat;
      gw[i] = gg;
      s1 += gg;
      s2 += gg * xhat;
      dwp[i] += vdy * xhat;
      if (dbp) dbp[i] += vdy;
    }
    const float c1 = s1 / static_cast<float>(H), c2 = s2 / static_cast<float>(H);

    i = 0;
#ifdef MPTK_AVX2
    const __m256 vc1 = _mm256_set1_ps(c1), vc2 = _mm256_set1_ps(c2);
    for (; i + 8 <= H; i += 8) {
      __m256 d = _mm256_mul_ps(vrstd, _mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(gw + i), vc1),
                                                    _mm256_mul_ps(_mm256_loadu_ps(xh + i), vc2)));
      if (dres) d = _mm256_add_ps(d, load8(dres + i));
      store8(dh + i, d);
      if (dx) store8(dx + i, d);
    }
#endif
    for (; i < H; ++i) {
      float d = rstd * (gw[i] - c1 - xh[i] * c2);
      if (dres) d += to_float(dres[i]);
      dh[i] = from_float<TH>(d);
      if (dx) dx[i] = from_float<TY>(d);
    }
  }
}

// dst[c] = sum over g = 0..P-1 of partials[g * H + c], always in that order (deterministic).
template <typename WT>
void reduce_partials(const float* partials, int64_t P, int64_t H, WT* dst) {
  constexpr int64_t kCols = 256;  // a column strip of accumulators that fits in L1
  const int64_t strips = (H + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (P * H >= kParallelMinElems)
  for (int64_t s = 0; s < strips; ++s) {
    const int64_t c0 = s * kCols, n = std::min(kCols, H - c0);
    float acc[kCols];
    std::fill(acc, acc + n, 0.f);
    for (int64_t g = 0; g < P; ++g) {
      const float* row = partials + g * H + c0;
      for (int64_t c = 0; c < n; ++c) acc[c] += row[c];
    }
    for (int64_t c = 0; c < n; ++c) dst[c0 + c] = from_float<WT>(acc[c]);
  }
}

template <typename TH, typename TY, typename WT>
void layer_norm_bwd_impl(const LayerNormBwdParams& p) {
  aligned_vector<float> wbuf;
  const float* w = as_float(static_cast<const WT*>(p.weight), p.hidden, wbuf);
#pragma omp parallel if (p.rows * p.hidden >= kParallelMinElems)
  {
    aligned_vector<float> scratch(2 * static_cast<size_t>(p.hidden));
#pragma omp for schedule(static)
    for (int64_t g = 0; g < p.num_partials; ++g)
      layer_norm_bwd_group<TH, TY>(p, w, g, scratch.data(), scratch.data() + p.hidden);
  }
  reduce_partials<WT>(p.workspace, p.num_partials, p.hidden, static_cast<WT*>(p.dweight));
  if (p.dbias)
    reduce_partials<WT>(p.workspace + p.num_partials * p.hidden, p.num_partials, p.hidden,
                        static_cast<WT*>(p.dbias));
}

// Calls f(T{}, WT{}) for the supported (activation, weight) dtype pairs.
template <typename F>
void dispatch_dtypes(DType dtype, DType weight_dtype, F&& f) {
  if (dtype == DType::Float32 && weight_dtype == DType::Float32) return f(float{}, float{});
  if (dtype == DType::BFloat16 && weight_dtype == DType::BFloat16) return f(bf16{}, bf16{});
  if (dtype == DType::BFloat16 && weight_dtype == DType::Float32) return f(bf16{}, float{});
  if (dtype == DType::Float16 && weight_dtype == DType::Float16) return f(fp16{}, fp16{});
  if (dtype == DType::Float16 && weight_dtype == DType::Float32) return f(fp16{}, float{});
  MPTK_CHECK(false, "layer_norm: unsupported dtype pair (", dtype_name(dtype), ", ", dtype_name(weight_dtype), ")");
}

// The mixed combinations (float32 h and weights, 16-bit y / dy): calls f(TY{}).
template <typename F>
void dispatch_low(DType t, F&& f) {
  if (t == DType::BFloat16) return f(bf16{});
  if (t == DType::Float16) return f(fp16{});
  MPTK_CHECK(false, "layer_norm: unsupported mixed output dtype ", dtype_name(t));
}

}  // namespace

void layer_norm_fwd_cpu(const LayerNormFwdParams& p) {
  MPTK_CHECK(p.hidden > 0 || p.rows == 0, "layer_norm_fwd_cpu: hidden must be positive");
  MPTK_CHECK(!p.residual == !p.residual_out, "layer_norm_fwd_cpu: residual and residual_out go together");
  MPTK_CHECK(layer_norm_fwd_dtypes_ok(p.dtype, p.residual_dtype, p.residual != nullptr, p.y_dtype, p.weight_dtype),
             "layer_norm_fwd_cpu: unsupported dtypes (x ", dtype_name(p.dtype), ", residual ",
             dtype_name(p.residual_dtype), ", y ", dtype_name(p.y_dtype), ", weight ", dtype_name(p.weight_dtype), ")");
  const bool uniform = p.y_dtype == p.dtype && (!p.residual || p.residual_dtype == p.dtype);
  if (uniform) {
    dispatch_dtypes(p.dtype, p.weight_dtype, [&](auto t, auto wt) {
      using T = decltype(t);
      layer_norm_fwd_impl<T, T, T, decltype(wt)>(p);
    });
  } else {
    dispatch_low(p.y_dtype, [&](auto ty) {
      using TY = decltype(ty);
      if (p.dtype == DType::Float32)
        layer_norm_fwd_impl<float, float, TY, float>(p);
      else
        layer_norm_fwd_impl<TY, float, TY, float>(p);
    });
  }
}

int64_t layer_norm_bwd_num_partials_cpu(int64_t rows, int64_t /*hidden*/) {
  // At most 256 groups of at least 8 rows: enough groups to feed many cores, and the partials'
  // traffic (2 * 4 bytes * hidden per group) stays small next to the rows' own.
  if (rows <= 0) return 0;
  const int64_t rows_per_group = std::max<int64_t>(8, (rows + 255) / 256);
  return (rows + rows_per_group - 1) / rows_per_group;
}

void layer_norm_bwd_cpu(const LayerNormBwdParams& p) {
  MPTK_CHECK(p.num_partials == layer_norm_bwd_num_partials_cpu(p.rows, p.hidden),
             "layer_norm_bwd_cpu: num_partials does not match layer_norm_bwd_num_partials_cpu");
  MPTK_CHECK(layer_norm_bwd_dtypes_ok(p.dtype, p.dy_dtype, p.weight_dtype),
             "layer_norm_bwd_cpu: unsupported dtypes (h ", dtype_name(p.dtype), ", dy ", dtype_name(p.dy_dtype),
             ", weight ", dtype_name(p.weight_dtype), ")");
  MPTK_CHECK(!p.dx || p.dy_dtype != p.dtype, "layer_norm_bwd_cpu: dx is for the mixed mode only");
  if (p.dy_dtype == p.dtype) {
    dispatch_dtypes(p.dtype, p.weight_dtype, [&](auto t, auto wt) {
      using T = decltype(t);
      layer_norm_bwd_impl<T, T, decltype(wt)>(p);
    });
  } else {
    dispatch_low(p.dy_dtype, [&](auto ty) { layer_norm_bwd_impl<float, decltype(ty), float>(p); });
  }
}

}  // namespace mptk
