// Host memory from the caching pool (csrc/common/host_pool.h), handed to Python as DLPack capsules:
// torch.from_dlpack(capsule) gives a tensor whose storage returns the block to the pool when the last
// view of it dies. The DLPack structs are declared here from the specification (dmlc/dlpack, v0.8
// ABI, the "dltensor" capsule protocol) so the core needs no framework header.
#include <Python.h>

#include <cstdint>
#include <vector>

#include "bindings.h"
#include "common/host_pool.h"

namespace py = pybind11;

namespace {

struct DLDevice {
  int32_t device_type;  // 1 = kDLCPU
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // NULL: compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

struct PooledTensor {
  DLManagedTensor managed;
  std::vector<int64_t> shape;
  size_t capacity;
};

void pooled_deleter(DLManagedTensor* self) {
  auto* t = static_cast<PooledTensor*>(self->manager_ctx);
  mptk::host_free(self->dl_tensor.data, t->capacity);
  delete t;
}

// Called when the capsule object dies: only an unconsumed capsule (still named "dltensor") owns
// its tensor; a consumer renames it "used_dltensor" and calls the deleter itself.
void capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    if (m != nullptr && m->deleter != nullptr) m->deleter(m);
  }
}

DLDataType dl_dtype(mptk::DType d) {
  switch (d) {
    case mptk::DType::Float32: return {2, 32, 1};
    case mptk::DType::Float16: return {2, 16, 1};
    case mptk::DType::BFloat16: return {4, 16, 1};
    case mptk::DType::Float64: return {2, 64, 1};
    case mptk::DType::Int32: return {0, 32, 1};
    case mptk::DType::Int64: return {0, 64, 1};
    case mptk::DType::UInt8: return {1, 8, 1};
  }
  throw mptk::ValueError("dtype: unsupported dtype code");
}

py::object host_empty(const std::vector<int64_t>& shape, int dtype_code) {
  MPTK_CHECK_ARG(dtype_code >= 0 && dtype_code <= static_cast<int>(mptk::DType::UInt8), "dtype",
                 "unsupported dtype code ", dtype_code);
  auto dtype = static_cast<mptk::DType>(dtype_code);
  size_t numel = 1;
  const size_t limit = (size_t{1} << 62) / mptk::dtype_size(dtype);  // far above any host's memory
  for (int64_t s : shape) {
    MPTK_CHECK_ARG(s >= 0, "shape", "negative size ", s);
    MPTK_CHECK_ARG(s == 0 || numel <= limit / static_cast<size_t>(s), "shape", "too many elements");
    numel *= static_cast<size_t>(s);
  }
  size_t nbytes = numel * mptk::dtype_size(dtype);
  auto* t = new PooledTensor();
  t->shape = shape;
  void* data = nullptr;
  try {
    data = mptk::host_alloc(nbytes == 0 ? 1 : nbytes, &t->capacity);
  } catch (...) {
    delete t;
    throw;
  }
  DLTensor& dl = t->managed.dl_tensor;
  dl.data = data;
  dl.device = {1, 0};
  dl.ndim = static_cast<int32_t>(shape.size());
  dl.dtype = dl_dtype(dtype);
  dl.shape = t->shape.data();
  dl.strides = nullptr;
  dl.byte_offset = 0;
  t->managed.manager_ctx = t;
  t->managed.deleter = &pooled_deleter;
  PyObject* cap = PyCapsule_New(&t->managed, "dltensor", &capsule_destructor);
  if (cap == nullptr) {
    pooled_deleter(&t->managed);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(cap);
}

}  // namespace

namespace mptk {
void bind_memory(py::module_& m) {
  m.def("host_empty", &host_empty, py::arg("shape"), py::arg("dtype_code"),
        "A DLPack capsule over an uninitialised, 2 MiB-aligned host buffer from the caching pool");
  m.def("host_pool_stats", []() {
    auto s = mptk::host_pool_stats();
    py::dict d;
    d["in_use_bytes"] = s.in_use_bytes;
    d["cached_bytes"] = s.cached_bytes;
    d["limit_bytes"] = s.limit_bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["huge_page_advised"] = s.huge_page_advised;
    return d;
  });
  m.def("host_pool_empty", &mptk::host_pool_empty);
  m.def("host_pool_set_limit", &mptk::host_pool_set_limit, py::arg("bytes"));
}
}  // namespace mptk
