// Binding of the few-row linear kernel (csrc/linear/linear.h): host tensors only, every argument
// checked here (named in the error) before the kernel sees it.
#include <optional>

#include "bindings.h"
#include "linear/linear.h"

namespace py = pybind11;

namespace mptk {
namespace {

// A 2-D matrix with a contiguous last dim and non-overlapping rows; returns its row stride.
int64_t check_matrix(const TensorView& t, const char* name, int64_t rows, int64_t cols, const TensorView& ref) {
  check_same_device(ref, "x", t, name);
  MPTK_CHECK_ARG(t.dtype == ref.dtype, name, "dtype ", dtype_name(t.dtype), " does not match x's ", dtype_name(ref.dtype));
  check_ndim(t, name, 2);
  MPTK_CHECK_ARG(t.shape[0] == rows && t.shape[1] == cols, name, "expected shape (", rows, ", ", cols, "), got ",
                 t.shape_str());
  return matrix_row_stride(t, name, "row length");
}

void few_rows_linear(const TensorView& x, const TensorView& weight, const std::optional<TensorView>& bias,
                     const TensorView& y) {
  MPTK_CHECK_ARG(!x.is_cuda(), "x", "few_rows_linear is a CPU kernel (on CUDA, cuBLAS's GEMV is used), got a tensor on ",
                 x.device_str());
  check_dtype(x, "x", {DType::Float32, DType::BFloat16, DType::Float16});
  check_ndim(x, "x", 2);
  check_ndim(weight, "weight", 2);
  const int64_t M = x.shape[0], K = x.shape[1], N = weight.shape[0];
  MPTK_CHECK_ARG(M <= kFewRowsMax, "x", "at most ", kFewRowsMax, " rows, got ", M);
  FewRowsLinearParams p;
  p.x_row_stride = check_matrix(x, "x", M, K, x);
  p.w_row_stride = check_matrix(weight, "weight", N, K, x);
  p.y_row_stride = check_matrix(y, "y", M, N, x);
  if (bias) {
    check_same_device(x, "x", *bias, "bias");
    MPTK_CHECK_ARG(bias->dtype == x.dtype, "bias", "dtype ", dtype_name(bias->dtype), " does not match x's ",
                   dtype_name(x.dtype));
    MPTK_CHECK_ARG(bias->ndim == 1 && bias->shape[0] == N, "bias", "expected shape (", N, ",), got ", bias->shape_str());
    if (N > 0) {
      check_contiguous(*bias, "bias");
      check_alignment(*bias, "bias", dtype_size(bias->dtype));
    }
    p.bias = bias->data;
  }
  p.x = x.data;
  p.w = weight.data;
  p.y = y.data;
  p.rows = static_cast<int>(M);
  p.in_features = K;
  p.out_features = N;
  p.dtype = x.dtype;
  py::gil_scoped_release release;
  few_rows_linear_cpu(p);
}

void register_linear(py::module_& m) {
  m.def("few_rows_linear", &few_rows_linear, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"),
        "y = x @ weight.T (+ bias) for at most 8 rows of x (host tensors, one dtype: float32, bfloat16, float16); "
        "float32 sums, each output rounded once; weight read once for all the rows.");
}

}  // namespace
}  // namespace mptk

MPTK_REGISTER_BINDINGS(linear, mptk::register_linear);
