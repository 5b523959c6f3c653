// Bindings of the fused cross-entropy kernels: every tensor argument is checked here (named in the
// error) before a kernel sees it, then the host or CUDA launcher is picked from the device.
#include "bindings.h"
#include "loss/cross_entropy.h"

namespace py = pybind11;

namespace mptk {
namespace {

// (rows, vocab) with a contiguous vocab axis; returns the row stride.
int64_t check_logits_like(const TensorView& t, const char* name) {
  check_ndim(t, name, 2);
  check_dtype(t, name, {DType::Float32, DType::BFloat16, DType::Float16});
  return matrix_row_stride(t, name, "vocab");
}

void check_rows_vector(const TensorView& t, const char* name, DType dtype, int64_t rows, const TensorView& ref) {
  check_same_device(ref, "logits", t, name);
  check_dtype(t, name, {dtype});
  MPTK_CHECK_ARG(t.ndim == 1 && t.shape[0] == rows, name, "expected shape (", rows, ",) (one per row of logits), got ",
                 t.shape_str());
  if (rows > 0) {
    check_contiguous(t, name);
    check_alignment(t, name, dtype_size(dtype));
  }
}

// The logits and targets both ops take: checked, and their fields copied into either params struct.
struct LogitsRows {
  int64_t stride = 0, rows = 0, vocab = 0;
};

LogitsRows check_logits_and_targets(const TensorView& logits, const TensorView& targets) {
  LogitsRows L;
  L.stride = check_logits_like(logits, "logits");
  L.rows = logits.shape[0];
  L.vocab = logits.shape[1];
  MPTK_CHECK_ARG(L.vocab > 0 || L.rows == 0, "logits", "the vocab (last) dimension must be non-empty, got shape ",
                 logits.shape_str());
  check_rows_vector(targets, "targets", DType::Int64, L.rows, logits);
  return L;
}

template <typename P>
void fill_common(P& p, const TensorView& logits, const TensorView& targets, const LogitsRows& L, int64_t ignore_index) {
  p.logits = logits.data;
  p.row_stride = L.stride;
  p.targets = static_cast<const int64_t*>(targets.data);
  p.rows = L.rows;
  p.vocab = L.vocab;
  p.ignore_index = ignore_index;
  p.dtype = logits.dtype;
}

int64_t cross_entropy_fwd(const TensorView& logits, const TensorView& targets, const TensorView& loss,
                          const TensorView& lse, int64_t ignore_index, uint64_t stream) {
  const LogitsRows L = check_logits_and_targets(logits, targets);
  check_rows_vector(loss, "loss", DType::Float32, L.rows, logits);
  check_rows_vector(lse, "lse", DType::Float32, L.rows, logits);
  if (L.rows == 0) return 0;
  CrossEntropyFwdParams p;
  fill_common(p, logits, targets, L, ignore_index);
  p.loss = static_cast<float*>(loss.data);
  p.lse = static_cast<float*>(lse.data);
  if (logits.is_cuda()) {
#ifdef MPTK_WITH_CUDA
    CudaDeviceGuard guard(logits.device);
    cross_entropy_fwd_cuda(p, as_stream(stream));
    return 0;
#else
    (void)stream;
    throw_no_cuda("cross_entropy");
#endif
  }
  int64_t bad = 0;
  {
    py::gil_scoped_release release;
    bad = cross_entropy_fwd_cpu(p);
  }
  MPTK_CHECK_ARG(bad == 0, "targets", bad, " of them outside [0, ", L.vocab, ") and not ignore_index (",
                 ignore_index, ")");
  return 0;
}

void cross_entropy_bwd(const TensorView& logits, const TensorView& targets, const TensorView& lse,
                       const TensorView& drow, const TensorView& dlogits, int64_t ignore_index, uint64_t stream) {
  const LogitsRows L = check_logits_and_targets(logits, targets);
  check_rows_vector(lse, "lse", DType::Float32, L.rows, logits);
  check_rows_vector(drow, "drow", DType::Float32, L.rows, logits);
  check_same_device(logits, "logits", dlogits, "dlogits");
  MPTK_CHECK_ARG(dlogits.dtype == logits.dtype, "dlogits", "dtype ", dtype_name(dlogits.dtype),
                 " does not match logits dtype ", dtype_name(logits.dtype));
  MPTK_CHECK_ARG(dlogits.ndim == 2 && dlogits.shape[0] == L.rows && dlogits.shape[1] == L.vocab, "dlogits", "shape ",
                 dlogits.shape_str(), " does not match logits shape ", logits.shape_str());
  const int64_t dstride = check_logits_like(dlogits, "dlogits");
  if (L.rows == 0) return;
  CrossEntropyBwdParams p;
  fill_common(p, logits, targets, L, ignore_index);
  p.lse = static_cast<const float*>(lse.data);
  p.drow = static_cast<const float*>(drow.data);
  p.dlogits = dlogits.data;
  p.dlogits_row_stride = dstride;
  if (logits.is_cuda()) {
#ifdef MPTK_WITH_CUDA
    CudaDeviceGuard guard(logits.device);
    cross_entropy_bwd_cuda(p, as_stream(stream));
#else
    (void)stream;
    throw_no_cuda("cross_entropy");
#endif
  } else {
    py::gil_scoped_release release;
    cross_entropy_bwd_cpu(p);
  }
}

void register_loss(py::module_& m) {
  m.def("cross_entropy_fwd", &cross_entropy_fwd, py::arg("logits"), py::arg("targets"), py::arg("loss"),
        py::arg("lse"), py::arg("ignore_index"), py::arg("stream") = 0,
        "Per-row cross-entropy of (rows, vocab) logits against int64 targets into float32 loss and lse (rows,). "
        "Ignored rows give 0. A target out of range raises on the CPU and gives NaN on CUDA (no sync).");
  m.def("cross_entropy_bwd", &cross_entropy_bwd, py::arg("logits"), py::arg("targets"), py::arg("lse"),
        py::arg("drow"), py::arg("dlogits"), py::arg("ignore_index"), py::arg("stream") = 0,
        "dlogits = (softmax - onehot(target)) * drow[row]; zero rows where target == ignore_index.");
}

}  // namespace
}  // namespace mptk

MPTK_REGISTER_BINDINGS(loss, mptk::register_loss);
