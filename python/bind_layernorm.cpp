// Bindings of the LayerNorm kernels: every tensor argument is checked here (named in the error)
// before any kernel sees it, then the host or CUDA launcher is picked from the device.
#include <cmath>
#include <optional>

#include "bindings.h"
#include "layernorm/layernorm.h"

namespace py = pybind11;

namespace mptk {
namespace {

using OptView = std::optional<TensorView>;

// A tensor seen as `rows` rows of `hidden` contiguous elements, one stride apart.
struct RowLayout {
  int64_t rows = 0, hidden = 0, row_stride = 0;
};

RowLayout row_layout(const TensorView& t, const char* name, bool is_output) {
  MPTK_CHECK_ARG(t.ndim >= 1, name, "must have at least one dimension (the normalised one)");
  RowLayout L;
  L.hidden = t.shape[t.ndim - 1];
  L.rows = 1;
  for (int d = 0; d + 1 < t.ndim; ++d) L.rows *= t.shape[d];
  L.row_stride = L.hidden;
  if (L.rows == 0 || L.hidden == 0) return L;  // nothing is addressed: strides are meaningless
  check_last_dim_contiguous(t, name);
  bool have = false;
  int64_t expect = 0;
  // The leading dimensions must collapse into one row index with a single stride; size-1
  // dimensions impose nothing.
  for (int d = t.ndim - 2; d >= 0; --d) {
    if (t.shape[d] == 1) continue;
    if (!have) {
      L.row_stride = t.stride[d];
      expect = t.stride[d] * t.shape[d];
      have = true;
    } else {
      MPTK_CHECK_ARG(t.stride[d] == expect, name, "leading dimensions of shape ", t.shape_str(),
                     " cannot be addressed with one row stride; make it contiguous first");
      expect *= t.shape[d];
    }
  }
  MPTK_CHECK_ARG(L.row_stride >= 0, name, "negative strides are not supported");
  if (is_output)
    MPTK_CHECK_ARG(L.rows <= 1 || L.row_stride >= L.hidden, name, "output rows overlap (row stride ", L.row_stride,
                   " < hidden size ", L.hidden, ")");
  return L;
}

// Contiguity of an empty tensor means nothing (numpy gives empty arrays arbitrary strides).
void check_dense(const TensorView& t, const char* name) {
  if (t.numel() > 0) check_contiguous(t, name);
}

void check_same_shape(const TensorView& a, const char* na, const TensorView& b, const char* nb) {
  bool same = a.ndim == b.ndim;
  for (int d = 0; same && d < a.ndim; ++d) same = a.shape[d] == b.shape[d];
  MPTK_CHECK_ARG(same, nb, "shape ", b.shape_str(), " does not match ", na, " shape ", a.shape_str());
}

void check_activation_like(const TensorView& x, const char* nx, const TensorView& t, const char* nt) {
  check_same_device(x, nx, t, nt);
  MPTK_CHECK_ARG(t.dtype == x.dtype, nt, "dtype ", dtype_name(t.dtype), " does not match ", nx, " dtype ",
                 dtype_name(x.dtype));
  check_same_shape(x, nx, t, nt);
}

// Same device and shape as x; the dtype is checked by the caller (the mixed modes, layernorm.h).
void check_placed_like(const TensorView& x, const char* nx, const TensorView& t, const char* nt) {
  check_same_device(x, nx, t, nt);
  check_same_shape(x, nx, t, nt);
}

bool is_low(DType t) { return t == DType::BFloat16 || t == DType::Float16; }

const char* kMixedRule =
    " (mixed precision takes a float32 residual stream with a bfloat16/float16 or float32 x, or a float32 x "
    "without residual, a bfloat16/float16 y and float32 weights)";

void check_param(const TensorView& x, const char* nx, const TensorView& p, const char* np, int64_t hidden) {
  check_same_device(x, nx, p, np);
  MPTK_CHECK_ARG(p.ndim == 1 && p.shape[0] == hidden, np, "expected shape (", hidden, ",) (the last dim of ", nx,
                 "), got ", p.shape_str());
  check_dense(p, np);
  MPTK_CHECK_ARG(p.dtype == x.dtype || p.dtype == DType::Float32, np, "dtype must be float32 or ", nx, "'s dtype ",
                 dtype_name(x.dtype), ", got ", dtype_name(p.dtype));
}

void check_stats(const TensorView& x, const TensorView& s, const char* ns, int64_t rows) {
  check_same_device(x, "x", s, ns);
  MPTK_CHECK_ARG(s.dtype == DType::Float32, ns, "must be float32, got ", dtype_name(s.dtype));
  MPTK_CHECK_ARG(s.numel() == rows, ns, "must have one element per row (", rows, "), got shape ", s.shape_str());
  check_dense(s, ns);
}

void check_activation_dtype(const TensorView& x, const char* nx) {
  check_dtype(x, nx, {DType::Float32, DType::BFloat16, DType::Float16});
}

int64_t bwd_num_partials(int64_t rows, int64_t hidden, DType dtype, DType wdtype, DType dy_dtype, int device) {
  if (device < 0) return layer_norm_bwd_num_partials_cpu(rows, hidden);
#ifdef MPTK_WITH_CUDA
  CudaDeviceGuard guard(device);
  return layer_norm_bwd_num_partials_cuda(rows, hidden, dtype, wdtype, dy_dtype);
#else
  (void)dtype;
  (void)wdtype;
  (void)dy_dtype;
  throw_no_cuda("layer_norm");
#endif
}

void layer_norm_fwd(const TensorView& x, const TensorView& weight, const OptView& bias, const OptView& residual,
                    const TensorView& y, const OptView& residual_out, const OptView& mean, const OptView& rstd,
                    double eps, uint64_t stream) {
  check_activation_dtype(x, "x");
  RowLayout lx = row_layout(x, "x", false);
  MPTK_CHECK_ARG(lx.hidden > 0 || lx.rows == 0, "x", "the last (normalised) dimension must be non-empty, got shape ",
                 x.shape_str());
  MPTK_CHECK_ARG(std::isfinite(eps) && eps >= 0, "eps", "must be finite and >= 0, got ", eps);
  MPTK_CHECK_ARG(residual.has_value() == residual_out.has_value(), residual ? "residual_out" : "residual",
                 "residual and residual_out must be given together");
  // Uniform: every activation in x's dtype. Mixed (layernorm.h): float32 h (the residual stream, or
  // x itself), 16-bit y, float32 weights.
  const bool mixed = y.dtype != x.dtype || (residual && residual->dtype != x.dtype);
  if (!mixed) {
    check_param(x, "x", weight, "weight", lx.hidden);
  } else {
    if (residual)
      MPTK_CHECK_ARG(residual->dtype == DType::Float32 || residual->dtype == x.dtype, "residual", "dtype ",
                     dtype_name(residual->dtype), " does not match x dtype ", dtype_name(x.dtype), kMixedRule);
    check_activation_dtype(y, "y");
    MPTK_CHECK_ARG(is_low(y.dtype), "y", "dtype ", dtype_name(y.dtype), " does not match x dtype ", dtype_name(x.dtype),
                   kMixedRule);
    MPTK_CHECK_ARG(x.dtype == DType::Float32 || (residual && x.dtype == y.dtype), "x", "dtype ", dtype_name(x.dtype),
                   " with y ", dtype_name(y.dtype), kMixedRule);
    check_param(y, "y", weight, "weight", lx.hidden);
    MPTK_CHECK_ARG(weight.dtype == DType::Float32, "weight", "must be float32 in mixed precision, got ",
                   dtype_name(weight.dtype));
  }
  if (bias) {
    check_param(x, "x", *bias, "bias", lx.hidden);
    MPTK_CHECK_ARG(bias->dtype == weight.dtype, "bias", "dtype ", dtype_name(bias->dtype), " does not match weight dtype ",
                   dtype_name(weight.dtype));
  }
  check_placed_like(x, "x", y, "y");
  LayerNormFwdParams p;
  p.x = x.data;
  p.x_row_stride = lx.row_stride;
  p.weight = weight.data;
  p.bias = bias ? bias->data : nullptr;
  p.y = y.data;
  p.y_row_stride = row_layout(y, "y", true).row_stride;
  if (residual) {
    check_placed_like(x, "x", *residual, "residual");
    check_activation_like(*residual, "residual", *residual_out, "residual_out");
    p.residual = residual->data;
    p.residual_row_stride = row_layout(*residual, "residual", false).row_stride;
    p.residual_out = residual_out->data;
    p.residual_out_row_stride = row_layout(*residual_out, "residual_out", true).row_stride;
  }
  if (mean) {
    check_stats(x, *mean, "mean", lx.rows);
    p.mean = static_cast<float*>(mean->data);
  }
  if (rstd) {
    check_stats(x, *rstd, "rstd", lx.rows);
    p.rstd = static_cast<float*>(rstd->data);
  }
  p.rows = lx.rows;
  p.hidden = lx.hidden;
  p.eps = static_cast<float>(eps);
  p.dtype = x.dtype;
  p.weight_dtype = weight.dtype;
  p.residual_dtype = residual ? residual->dtype : x.dtype;
  p.y_dtype = y.dtype;
  MPTK_CHECK(layer_norm_fwd_dtypes_ok(p.dtype, p.residual_dtype, residual.has_value(), p.y_dtype, p.weight_dtype),
             "layer_norm: dtype combination not caught by the argument checks");
  if (p.rows == 0) return;
  if (x.is_cuda()) {
#ifdef MPTK_WITH_CUDA
    CudaDeviceGuard guard(x.device);
    layer_norm_fwd_cuda(p, as_stream(stream));
#else
    (void)stream;
    throw_no_cuda("layer_norm");
#endif
  } else {
    py::gil_scoped_release release;
    layer_norm_fwd_cpu(p);
  }
}

void layer_norm_bwd(const TensorView& dy, const OptView& dresidual_out, const TensorView& h, const TensorView& weight,
                    const TensorView& mean, const TensorView& rstd, const TensorView& dh, const TensorView& dweight,
                    const OptView& dbias, const TensorView& workspace, uint64_t stream, const OptView& dx) {
  check_activation_dtype(h, "h");
  RowLayout lh = row_layout(h, "h", false);
  MPTK_CHECK_ARG(lh.hidden > 0 || lh.rows == 0, "h", "the last (normalised) dimension must be non-empty");
  check_placed_like(h, "h", dy, "dy");
  const bool mixed = dy.dtype != h.dtype;  // float32 h, 16-bit dy (layernorm.h)
  if (mixed) {
    check_activation_dtype(dy, "dy");
    MPTK_CHECK_ARG(h.dtype == DType::Float32 && is_low(dy.dtype), "dy", "dtype ", dtype_name(dy.dtype),
                   " does not match h dtype ", dtype_name(h.dtype),
                   " (mixed precision takes a float32 h with a bfloat16/float16 dy)");
    MPTK_CHECK_ARG(weight.dtype == DType::Float32, "weight", "must be float32 in mixed precision, got ",
                   dtype_name(weight.dtype));
  }
  if (dx) {
    MPTK_CHECK_ARG(mixed, "dx", "is for mixed precision only (a bfloat16/float16 dy with a float32 h)");
    check_activation_like(dy, "dy", *dx, "dx");
  }
  check_activation_like(h, "h", dh, "dh");
  check_param(h, "h", weight, "weight", lh.hidden);
  check_stats(h, mean, "mean", lh.rows);
  check_stats(h, rstd, "rstd", lh.rows);
  check_param(h, "h", dweight, "dweight", lh.hidden);
  MPTK_CHECK_ARG(dweight.dtype == weight.dtype, "dweight", "dtype must match weight's");
  if (dbias) {
    check_param(h, "h", *dbias, "dbias", lh.hidden);
    MPTK_CHECK_ARG(dbias->dtype == weight.dtype, "dbias", "dtype must match weight's");
  }
  LayerNormBwdParams p;
  p.dy = dy.data;
  p.dy_row_stride = row_layout(dy, "dy", false).row_stride;
  if (dresidual_out) {
    check_activation_like(h, "h", *dresidual_out, "dresidual_out");
    p.dresidual_out = dresidual_out->data;
    p.dresidual_out_row_stride = row_layout(*dresidual_out, "dresidual_out", false).row_stride;
  }
  p.h = h.data;
  p.h_row_stride = lh.row_stride;
  p.weight = weight.data;
  p.mean = static_cast<const float*>(mean.data);
  p.rstd = static_cast<const float*>(rstd.data);
  p.dh = dh.data;
  p.dh_row_stride = row_layout(dh, "dh", true).row_stride;
  if (dx) {
    p.dx = dx->data;
    p.dx_row_stride = row_layout(*dx, "dx", true).row_stride;
  }
  p.dweight = dweight.data;
  p.dbias = dbias ? dbias->data : nullptr;
  p.rows = lh.rows;
  p.hidden = lh.hidden;
  p.dtype = h.dtype;
  p.weight_dtype = weight.dtype;
  p.dy_dtype = dy.dtype;
  MPTK_CHECK(layer_norm_bwd_dtypes_ok(p.dtype, p.dy_dtype, p.weight_dtype),
             "layer_norm: dtype combination not caught by the argument checks");
  check_same_device(h, "h", workspace, "workspace");
  MPTK_CHECK_ARG(workspace.dtype == DType::Float32, "workspace", "must be float32");
  check_dense(workspace, "workspace");
  if (p.hidden == 0) return;
  p.num_partials = bwd_num_partials(p.rows, p.hidden, p.dtype, p.weight_dtype, p.dy_dtype, h.device);
  const int64_t need = layer_norm_bwd_workspace_numel(p.num_partials, p.hidden, dbias.has_value());
  MPTK_CHECK_ARG(workspace.numel() == need, "workspace", "must have ", need,
                 " elements (layer_norm_bwd_workspace_numel), got ", workspace.numel());
  p.workspace = static_cast<float*>(workspace.data);
  if (h.is_cuda()) {
#ifdef MPTK_WITH_CUDA
    CudaDeviceGuard guard(h.device);
    layer_norm_bwd_cuda(p, as_stream(stream));
#else
    (void)stream;
    throw_no_cuda("layer_norm");
#endif
  } else {
    py::gil_scoped_release release;
    layer_norm_bwd_cpu(p);
  }
}

void register_layernorm(py::module_& m) {
  m.def("layer_norm_fwd", &layer_norm_fwd, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("residual"),
        py::arg("y"), py::arg("residual_out"), py::arg("mean"), py::arg("rstd"), py::arg("eps"),
        py::arg("stream") = 0,
        "LayerNorm forward over the last dim of x into y (and residual_out = x + residual when residual is "
        "given); float32 mean/rstd per row when given. Tensors are _ext.view() tuples.");
  m.def("layer_norm_bwd", &layer_norm_bwd, py::arg("dy"), py::arg("dresidual_out"), py::arg("h"), py::arg("weight"),
        py::arg("mean"), py::arg("rstd"), py::arg("dh"), py::arg("dweight"), py::arg("dbias"), py::arg("workspace"),
        py::arg("stream") = 0, py::arg("dx") = py::none(),
        "LayerNorm backward: dh (gradient of x and residual), dweight, dbias (optional). h is the forward's "
        "normalised input (x, or residual_out when fused). workspace: float32, "
        "layer_norm_bwd_workspace_numel(...) elements. Mixed precision (float32 h, bfloat16/float16 dy): dx, "
        "optional, receives dh rounded to dy's dtype.");
  m.def(
      "layer_norm_bwd_workspace_numel",
      [](int64_t rows, int64_t hidden, int dtype, int weight_dtype, bool has_bias, int device, int dy_dtype) {
        MPTK_CHECK_ARG(rows >= 0 && hidden >= 0, "rows", "rows and hidden must be >= 0");
        if (rows == 0 || hidden == 0) return int64_t{0};
        const DType dt = static_cast<DType>(dtype), wdt = static_cast<DType>(weight_dtype);
        const DType dydt = dy_dtype < 0 ? dt : static_cast<DType>(dy_dtype);
        MPTK_CHECK_ARG(layer_norm_bwd_dtypes_ok(dt, dydt, wdt), "dtype", "unsupported dtypes (h ", dtype_name(dt),
                       ", dy ", dtype_name(dydt), ", weight ", dtype_name(wdt), ")");
        int64_t P = bwd_num_partials(rows, hidden, dt, wdt, dydt, device);
        return layer_norm_bwd_workspace_numel(P, hidden, has_bias);
      },
      py::arg("rows"), py::arg("hidden"), py::arg("dtype"), py::arg("weight_dtype"), py::arg("has_bias"),
      py::arg("device"), py::arg("dy_dtype") = -1,
      "float32 elements of scratch layer_norm_bwd needs (device -1 = host; dy_dtype -1 = dtype).");
}

}  // namespace
}  // namespace mptk

MPTK_REGISTER_BINDINGS(layernorm, mptk::register_layernorm);
