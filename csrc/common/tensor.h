// Framework-free tensor view and dtype codes shared by every kernel and by the bindings.
// A TensorView is what Python hands over: a raw pointer, a dtype code, shape and strides in
// elements, and a device (-1 = host memory, >= 0 = CUDA device index). No ownership.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace mptk {

// Codes are part of the Python <-> C ABI (mpt_kernels/_ext.py mirrors them). Never renumber.
enum class DType : int32_t {
  Float32 = 0,
  Float16 = 1,
  BFloat16 = 2,
  Float64 = 3,
  Int32 = 4,
  Int64 = 5,
  UInt8 = 6,
};

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::Float32: return 4;
    case DType::Float16: return 2;
    case DType::BFloat16: return 2;
    case DType::Float64: return 8;
    case DType::Int32: return 4;
    case DType::Int64: return 8;
    case DType::UInt8: return 1;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float64: return "float64";
    case DType::Int32: return "int32";
    case DType::Int64: return "int64";
    case DType::UInt8: return "uint8";
  }
  return "unknown";
}

constexpr int kMaxDims = 8;
constexpr int kCPU = -1;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::Float32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {0};
  int64_t stride[kMaxDims] = {0};  // in elements, like torch
  int device = kCPU;

  bool is_cuda() const { return device >= 0; }
  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t strides(int d) const { return stride[d < 0 ? d + ndim : d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  bool is_contiguous() const {
    if (numel() == 0) return true;  // as torch: an empty tensor's strides are arbitrary ((3, 0, 2): (2, 2, 1))
    int64_t expected = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && stride[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
  std::string shape_str() const {
    std::string s = "(";
    for (int i = 0; i < ndim; ++i) {
      s += std::to_string(shape[i]);
      if (i + 1 < ndim || ndim == 1) s += ",";
      if (i + 1 < ndim) s += " ";
    }
    return s + ")";
  }
  std::string device_str() const { return device < 0 ? "cpu" : "cuda:" + std::to_string(device); }
};

}  // namespace mptk
