// Bindings of the fused Lion step, the multi-tensor sum of squares and the clip/skip finalize step.
// Python (mpt_kernels/optim.py) groups parameters by (device, param dtype, grad dtype, state dtype)
// and calls lion_step once per group with lists of tensor views; everything is validated here again
// so the kernels only ever see well-formed input.
#include <optional>
#include <tuple>

#include "bindings.h"
#include "lion/lion.h"

namespace py = pybind11;

namespace mptk {
namespace {

std::string item_name(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

void check_scalar(const std::optional<TensorView>& t, const char* name, DType dtype, int device) {
  if (!t) return;
  check_dtype(*t, name, {dtype});
  MPTK_CHECK_ARG(t->numel() == 1, name, "must hold exactly one element, got shape ", t->shape_str());
  MPTK_CHECK_ARG(t->device == device, name, "is on ", t->device_str(), " but the tensors are on ",
                 device < 0 ? std::string("cpu") : "cuda:" + std::to_string(device));
  check_alignment(*t, name, dtype_size(dtype));
}

// Checks every tensor of `list` and returns the shared dtype.
DType check_list(const std::vector<TensorView>& list, const char* name, int device,
                 const std::vector<TensorView>* shape_ref, const char* ref_name) {
  DType dtype = list.empty() ? DType::Float32 : list[0].dtype;
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string n = item_name(name, i);
    const TensorView& t = list[i];
    check_dtype(t, n.c_str(), {DType::Float32, DType::BFloat16});
    MPTK_CHECK_ARG(t.dtype == dtype, n, "has dtype ", dtype_name(t.dtype), " but ", name, "[0] has ",
                   dtype_name(dtype), "; one call takes one dtype per list");
    MPTK_CHECK_ARG(t.device == device, n, "is on ", t.device_str(), " but ", ref_name ? ref_name : name,
                   "[0] is on ", list[0].device_str());
    check_contiguous(t, n.c_str());
    check_alignment(t, n.c_str(), dtype_size(t.dtype));
    if (shape_ref != nullptr) {
      const TensorView& r = (*shape_ref)[i];
      bool same = r.ndim == t.ndim;
      for (int d = 0; same && d < t.ndim; ++d) same = r.shape[d] == t.shape[d];
      MPTK_CHECK_ARG(same, n, "has shape ", t.shape_str(), " but ", item_name(ref_name, i), " has shape ",
                     r.shape_str());
    }
  }
  return dtype;
}

using HyperTuple = std::tuple<double, double, double, double, bool>;  // lr, beta1, beta2, decay, sr

void lion_step(const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
               const std::vector<TensorView>& exp_avgs, const std::vector<int64_t>& rng_index,
               const std::vector<int64_t>& hyper_index, const std::vector<HyperTuple>& hyper,
               const std::optional<TensorView>& grad_multiplier, const std::optional<TensorView>& skip,
               uint64_t seed, uint64_t step, uint64_t stream) {
  const size_t n = params.size();
  MPTK_CHECK_ARG(grads.size() == n, "grads", "has ", grads.size(), " tensors but params has ", n);
  MPTK_CHECK_ARG(exp_avgs.size() == n, "exp_avgs", "has ", exp_avgs.size(), " tensors but params has ", n);
  MPTK_CHECK_ARG(rng_index.size() == n, "rng_index", "has ", rng_index.size(), " entries but params has ", n);
  MPTK_CHECK_ARG(hyper_index.size() == n, "hyper_index", "has ", hyper_index.size(), " entries but params has ", n);
  if (n == 0) return;
  const int device = params[0].device;
  LionStepParams sp;
  sp.param_dtype = check_list(params, "params", device, nullptr, nullptr);
  sp.grad_dtype = check_list(grads, "grads", device, &params, "params");
  sp.state_dtype = check_list(exp_avgs, "exp_avgs", device, &params, "params");
  check_scalar(grad_multiplier, "grad_multiplier", DType::Float32, device);
  check_scalar(skip, "skip", DType::Float32, device);
  MPTK_CHECK_ARG(!hyper.empty(), "hyper", "must hold at least one parameter group");
  for (size_t i = 0; i < hyper.size(); ++i) {
    const auto& [lr, beta1, beta2, decay, sr] = hyper[i];
    const std::string nm = item_name("hyper", i);
    MPTK_CHECK_ARG(std::isfinite(lr) && lr >= 0.0, nm, "lr must be finite and >= 0, got ", lr);
    MPTK_CHECK_ARG(beta1 >= 0.0 && beta1 <= 1.0, nm, "beta1 must be in [0, 1], got ", beta1);
    MPTK_CHECK_ARG(beta2 >= 0.0 && beta2 <= 1.0, nm, "beta2 must be in [0, 1], got ", beta2);
    MPTK_CHECK_ARG(std::isfinite(decay), nm, "decay must be finite, got ", decay);
    LionHyper h;
    h.lr = static_cast<float>(lr);
    h.beta1 = static_cast<float>(beta1);
    h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
    h.beta2 = static_cast<float>(beta2);
    h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    h.decay = static_cast<float>(decay);
    h.stochastic_rounding = sr ? 1 : 0;
    sp.hyper.push_back(h);
  }
  sp.tensors.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    MPTK_CHECK_ARG(hyper_index[i] >= 0 && hyper_index[i] < static_cast<int64_t>(hyper.size()),
                   item_name("hyper_index", i), "must index hyper (", hyper.size(), " entries), got ", hyper_index[i]);
    MPTK_CHECK_ARG(rng_index[i] >= 0 && rng_index[i] <= 0xffffffffLL, item_name("rng_index", i),
                   "must fit in 32 bits unsigned, got ", rng_index[i]);
    LionTensor t;
    t.param = params[i].data;
    t.grad = grads[i].data;
    t.exp_avg = exp_avgs[i].data;
    t.numel = params[i].numel();
    t.rng_index = static_cast<uint32_t>(rng_index[i]);
    t.hyper = static_cast<int32_t>(hyper_index[i]);
    if (t.numel > 0) sp.tensors.push_back(t);
  }
  sp.grad_multiplier = grad_multiplier ? static_cast<const float*>(grad_multiplier->data) : nullptr;
  sp.skip = skip ? static_cast<const float*>(skip->data) : nullptr;
  sp.seed = seed;
  sp.step = step;
  if (device < 0) {
    py::gil_scoped_release nogil;
    lion_step_cpu(sp);
    return;
  }
#ifdef MPTK_WITH_CUDA
  CudaDeviceGuard guard(device);
  lion_step_cuda(sp, as_stream(stream));
#else
  (void)stream;
  throw_no_cuda("lion_step");
#endif
}

void sum_squares(const std::vector<TensorView>& tensors, const TensorView& partials, uint64_t stream) {
  if (tensors.empty()) return;
  const int device = tensors[0].device;
  SumSquaresParams sp;
  sp.dtype = check_list(tensors, "tensors", device, nullptr, nullptr);
  for (const auto& t : tensors) {
    if (t.numel() == 0) continue;
    sp.data.push_back(t.data);
    sp.numel.push_back(t.numel());
  }
  check_dtype(partials, "partials", {DType::Float32});
  check_contiguous(partials, "partials");
  MPTK_CHECK_ARG(partials.device == device, "partials", "is on ", partials.device_str(), " but tensors[0] is on ",
                 tensors[0].device_str());
  const int64_t need = lion_num_chunks(sp.numel);
  MPTK_CHECK_ARG(partials.numel() >= need, "partials", "needs ", need, " elements (one per chunk of ",
                 kLionChunk, "), got ", partials.numel());
  sp.partials = static_cast<float*>(partials.data);
  if (sp.data.empty()) return;
  if (device < 0) {
    py::gil_scoped_release nogil;
    sum_squares_cpu(sp);
    return;
  }
#ifdef MPTK_WITH_CUDA
  CudaDeviceGuard guard(device);
  sum_squares_cuda(sp, as_stream(stream));
#else
  (void)stream;
  throw_no_cuda("sum_squares");
#endif
}

void lion_finalize(const TensorView& partials, const TensorView& aux, double max_norm,
                   const std::optional<TensorView>& grad_scale, const std::optional<TensorView>& found_inf,
                   bool skip_nonfinite, const std::optional<TensorView>& skipped_count, uint64_t stream) {
  const int device = aux.device;
  check_dtype(aux, "aux", {DType::Float32});
  check_contiguous(aux, "aux");
  MPTK_CHECK_ARG(aux.numel() >= 3, "aux", "needs 3 elements (norm, multiplier, skip), got ", aux.numel());
  check_dtype(partials, "partials", {DType::Float32});
  check_contiguous(partials, "partials");
  MPTK_CHECK_ARG(partials.device == device || partials.numel() == 0, "partials", "is on ", partials.device_str(),
                 " but aux is on ", aux.device_str());
  check_scalar(grad_scale, "grad_scale", DType::Float32, device);
  check_scalar(found_inf, "found_inf", DType::Float32, device);
  check_scalar(skipped_count, "skipped_count", DType::Int64, device);
  MPTK_CHECK_ARG(std::isfinite(max_norm), "max_norm", "must be finite, got ", max_norm);
  LionFinalizeParams fp;
  fp.partials = static_cast<const float*>(partials.data);
  fp.n_partials = partials.numel();
  fp.max_norm = static_cast<float>(max_norm);
  fp.grad_scale = grad_scale ? static_cast<const float*>(grad_scale->data) : nullptr;
  fp.found_inf = found_inf ? static_cast<const float*>(found_inf->data) : nullptr;
  fp.skip_nonfinite = skip_nonfinite;
  fp.aux = static_cast<float*>(aux.data);
  fp.skipped_count = skipped_count ? static_cast<int64_t*>(skipped_count->data) : nullptr;
  if (device < 0) {
    lion_finalize_cpu(fp);
    return;
  }
#ifdef MPTK_WITH_CUDA
  CudaDeviceGuard guard(device);
  lion_finalize_cuda(fp, as_stream(stream));
#else
  (void)stream;
  throw_no_cuda("lion_finalize");
#endif
}

void register_lion(py::module_& m) {
  m.attr("LION_CHUNK") = kLionChunk;
  m.def("lion_num_chunks", [](const std::vector<int64_t>& numel) { return lion_num_chunks(numel); }, py::arg("numel"),
        "Number of sum-of-squares partials (chunks) for tensors of these sizes");
  m.def("lion_step", &lion_step, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("rng_index"),
        py::arg("hyper_index"), py::arg("hyper"), py::arg("grad_multiplier") = py::none(),
        py::arg("skip") = py::none(), py::arg("seed") = 0, py::arg("step") = 0, py::arg("stream") = 0,
        "Fused Lion step over lists of same-dtype contiguous tensors on one device. hyper: list of "
        "(lr, beta1, beta2, decay, stochastic_rounding); hyper_index picks one per tensor.");
  m.def("sum_squares", &sum_squares, py::arg("tensors"), py::arg("partials"), py::arg("stream") = 0,
        "Per-chunk float32 sums of squares of a list of same-dtype tensors (one partial per chunk)");
  m.def("lion_finalize", &lion_finalize, py::arg("partials"), py::arg("aux"), py::arg("max_norm") = 0.0,
        py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(), py::arg("skip_nonfinite") = false,
        py::arg("skipped_count") = py::none(), py::arg("stream") = 0,
        "aux <- [norm of the unscaled gradients, gradient multiplier (unscale x clip), skip flag]");
#ifdef MPTK_WITH_CUDA
  m.attr("LION_CUDA_MAX_TENSORS_PER_LAUNCH") = lion_cuda_max_tensors_per_launch();
#endif
}

}  // namespace
MPTK_REGISTER_BINDINGS(lion, register_lion);
}  // namespace mptk
