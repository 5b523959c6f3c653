// Shared binding helpers: the TensorView type caster (Python passes a 5-tuple
// (data_ptr, dtype_code, shape, strides, device); see mpt_kernels/_ext.py: view()), the common
// argument checks, and a registry so each op's bind_<op>.cpp adds itself without touching module.cpp.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <utility>
#include <vector>

#include "common/error.h"
#include "common/tensor.h"
#ifdef MPTK_WITH_CUDA
#include "common/cuda_check.h"
#if defined(__linux__)
#include <dlfcn.h>
#endif
#endif

namespace pybind11 {
namespace detail {
template <>
struct type_caster<mptk::TensorView> {
 public:
  PYBIND11_TYPE_CASTER(mptk::TensorView, const_name("TensorView"));
  bool load(handle src, bool) {
    if (!isinstance<tuple>(src)) return false;
    auto t = reinterpret_borrow<tuple>(src);
    if (t.size() != 5) return false;
    mptk::TensorView v;
    v.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
    v.dtype = static_cast<mptk::DType>(t[1].cast<int>());
    auto shape = t[2].cast<std::vector<int64_t>>();
    auto strides = t[3].cast<std::vector<int64_t>>();
    if (shape.size() != strides.size() || shape.size() > static_cast<size_t>(mptk::kMaxDims)) return false;
    v.ndim = static_cast<int>(shape.size());
    bool empty = false;
    uint64_t numel = 1;
    for (int i = 0; i < v.ndim; ++i) {
      // a negative size is no tensor at all (the framework-free path passes shapes as given)
      if (shape[i] < 0) throw mptk::ValueError("tensor: negative size in shape");
      if (shape[i] > 0 && numel > (uint64_t{1} << 62) / static_cast<uint64_t>(shape[i]))
        throw mptk::ValueError("tensor: too many elements (the shape's product overflows)");
      numel *= static_cast<uint64_t>(shape[i] > 0 ? shape[i] : 1);
      v.shape[i] = shape[i];
      v.stride[i] = strides[i];
      empty |= shape[i] == 0;
    }
    // Every kernel dereferences a non-empty tensor's data: a null pointer there is refused here, once
    // for all ops (empty tensors may be null: CUDA allocates nothing for them).
    if (v.data == nullptr && !empty) throw mptk::ValueError("tensor: null data pointer for a non-empty tensor");
    v.device = t[4].cast<int>();
    value = v;
    return true;
  }
  static handle cast(const mptk::TensorView&, return_value_policy, handle) {
    throw std::runtime_error("TensorView cannot be returned to Python");
  }
};
}  // namespace detail
}  // namespace pybind11

namespace mptk {

using RegisterFn = void (*)(pybind11::module_&);
std::vector<std::pair<const char*, RegisterFn>>& binding_registry();
struct BindingRegistrar {
  BindingRegistrar(const char* name, RegisterFn fn) { binding_registry().emplace_back(name, fn); }
};
#define MPTK_REGISTER_BINDINGS(name, fn) static ::mptk::BindingRegistrar mptk_registrar_##name(#name, fn)

// The host caching pool's bindings (bind_memory.cpp); called by module.cpp, not an op.
void bind_memory(pybind11::module_& m);

// ---- argument checks shared by all ops (each names the argument) ----
inline void check_dtype(const TensorView& t, const char* name, std::initializer_list<DType> allowed) {
  for (DType d : allowed)
    if (t.dtype == d) return;
  std::string s;
  for (DType d : allowed) s += std::string(s.empty() ? "" : ", ") + dtype_name(d);
  MPTK_CHECK_ARG(false, name, "unsupported dtype ", dtype_name(t.dtype), " (expected one of: ", s, ")");
}
inline void check_same_device(const TensorView& a, const char* na, const TensorView& b, const char* nb) {
  MPTK_CHECK_ARG(a.device == b.device, nb, "is on ", b.device_str(), " but ", na, " is on ", a.device_str(),
                 "; all tensors must be on the same device");
}
inline void check_last_dim_contiguous(const TensorView& t, const char* name) {
  MPTK_CHECK_ARG(t.ndim >= 1 && (t.stride[t.ndim - 1] == 1 || t.shape[t.ndim - 1] <= 1 || t.numel() == 0), name,
                 "last dimension must be contiguous (stride 1), got stride ", t.ndim ? t.stride[t.ndim - 1] : 0);
}
inline void check_contiguous(const TensorView& t, const char* name) {
  MPTK_CHECK_ARG(t.is_contiguous(), name, "must be contiguous, got shape ", t.shape_str());
}
inline void check_ndim(const TensorView& t, const char* name, int ndim) {
  MPTK_CHECK_ARG(t.ndim == ndim, name, "expected ", ndim, " dimensions, got ", t.ndim, " (shape ", t.shape_str(), ")");
}
inline void check_alignment(const TensorView& t, const char* name, size_t bytes) {
  MPTK_CHECK_ARG(reinterpret_cast<uintptr_t>(t.data) % bytes == 0, name, "data pointer must be ", bytes,
                 "-byte aligned");
}
// A 2-D tensor read as rows of contiguous elements (a matrix of logits, a weight): last dim contiguous,
// rows not overlapping, aligned to its element size. Returns the row stride (the row length when
// there is one row or none). cols_name names the row length in the error ("vocab", ...).
inline int64_t matrix_row_stride(const TensorView& t, const char* name, const char* cols_name) {
  check_ndim(t, name, 2);
  if (t.shape[0] == 0 || t.shape[1] == 0) return t.shape[1];
  check_last_dim_contiguous(t, name);
  const int64_t stride = t.shape[0] > 1 ? t.stride[0] : t.shape[1];
  MPTK_CHECK_ARG(stride >= t.shape[1], name, "rows overlap (row stride ", stride, " < ", cols_name, " ", t.shape[1],
                 ")");
  check_alignment(t, name, dtype_size(t.dtype));
  return stride;
}
[[noreturn]] inline void throw_no_cuda(const char* op) {
  throw std::runtime_error(std::string(op) +
                           ": this build of mpt_kernels has no CUDA kernels (rebuild with nvcc available or "
                           "MPT_KERNELS_CUDA=1)");
}

#ifdef MPTK_WITH_CUDA
// Whether `device`'s primary context exists (true when that cannot be told). Since CUDA 12,
// cudaSetDevice creates the primary context at once: restoring a thread's default device 0 after a
// launch on device 1 from a thread that never used device 0 would put a context (hundreds of MB) on
// GPU 0, in every process of a multi-GPU job that calls an op from such a thread. PyTorch's device
// guards make the same check. The driver library is already loaded by the runtime (RTLD_NOLOAD:
// never loaded here); its two functions are looked up once.
inline bool cuda_primary_context_active(int device) {
#if defined(__linux__)
  using DeviceGetFn = int (*)(int*, int);                    // cuDeviceGet(CUdevice*, int ordinal)
  using CtxStateFn = int (*)(int, unsigned int*, int*);      // cuDevicePrimaryCtxGetState(CUdevice, flags*, active*)
  static const std::pair<DeviceGetFn, CtxStateFn> fns = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
    if (lib == nullptr) return std::pair<DeviceGetFn, CtxStateFn>(nullptr, nullptr);
    return std::pair<DeviceGetFn, CtxStateFn>(reinterpret_cast<DeviceGetFn>(dlsym(lib, "cuDeviceGet")),
                                              reinterpret_cast<CtxStateFn>(dlsym(lib, "cuDevicePrimaryCtxGetState")));
  }();
  int dev = 0, active = 1;
  unsigned int flags = 0;
  if (fns.first == nullptr || fns.second == nullptr || fns.first(&dev, device) != 0 ||
      fns.second(dev, &flags, &active) != 0)
    return true;  // cannot tell: restore, as before
  return active != 0;
#else
  (void)device;
  return true;
#endif
}

// Makes `device` current for the duration of a launch and restores the caller's device after, unless
// the caller's device has no context yet (a fresh thread's default 0): then, as with PyTorch's guards,
// the launch's device stays current rather than creating a context on a GPU the thread never used.
struct CudaDeviceGuard {
  int prev = -1;
  explicit CudaDeviceGuard(int device) {
    MPTK_CUDA_CHECK(cudaGetDevice(&prev));
    if (prev != device) MPTK_CUDA_CHECK(cudaSetDevice(device));
  }
  ~CudaDeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev && cuda_primary_context_active(prev)) cudaSetDevice(prev);
  }
};
inline cudaStream_t as_stream(uint64_t s) { return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(s)); }
#endif

}  // namespace mptk
