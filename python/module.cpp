// The extension module mpt_kernels._C: build information plus every op's bindings, each
// registered from its own bind_<op>.cpp through MPTK_REGISTER_BINDINGS.
#include <omp.h>

#include "bindings.h"
#include "common/cpu_math.h"

namespace py = pybind11;

namespace mptk {
std::vector<std::pair<const char*, RegisterFn>>& binding_registry() {
  static std::vector<std::pair<const char*, RegisterFn>> r;
  return r;
}
}  // namespace mptk

static py::list cpu_features() {
  py::list f;
#ifdef __SSE4_2__
  f.append("sse4.2");
#endif
#ifdef __AVX__
  f.append("avx");
#endif
#ifdef __AVX2__
  f.append("avx2");
#endif
#ifdef __FMA__
  f.append("fma");
#endif
#ifdef __F16C__
  f.append("f16c");
#endif
#ifdef __AVX512F__
  f.append("avx512f");
#endif
#ifdef __AVX512BF16__
  f.append("avx512bf16");
#endif
#ifdef __ARM_NEON
  f.append("neon");
#endif
  return f;
}

static bool cuda_available() {
#ifdef MPTK_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later calls are not confused
    return false;
  }
  return n > 0;
#else
  return false;
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "mpt_kernels compiled core: framework-free CPU and CUDA kernels";
  m.def("cuda_available", &cuda_available, "True when built with CUDA and a CUDA device is usable");
  m.def("build_info", []() {
    py::dict d;
    d["version"] = MPTK_VERSION;
    d["cxx_compiler"] = MPTK_CXX_COMPILER;
    d["cxx_flags"] = MPTK_CXX_FLAGS;
    d["cpu_features"] = cpu_features();
    d["openmp_max_threads"] = omp_get_max_threads();
    d["cpu_avx512_kernels"] = mptk::cpu_avx512();  // 512-bit kernel paths in use (run-time choice)
#ifdef MPTK_WITH_CUDA
    d["cuda"] = true;
    d["cuda_archs"] = MPTK_CUDA_ARCHS;
    d["cuda_version"] = MPTK_CUDA_VERSION;
#else
    d["cuda"] = false;
    d["cuda_archs"] = "";
    d["cuda_version"] = "";
#endif
    py::list ops;
    for (auto& kv : mptk::binding_registry()) ops.append(kv.first);
    d["ops"] = ops;
    return d;
  });
  m.def("cuda_synchronize", []() {
#ifdef MPTK_WITH_CUDA
    MPTK_CUDA_CHECK(cudaDeviceSynchronize());
#endif
  });
  // The CPU kernels' 512-bit paths (common/cpu_math.h): on by default where the CPU has AVX-512;
  // MPTK_CPU_AVX512=0 turns them off for the process, this for tests comparing the two paths.
  m.def("_cpu_avx512", []() { return mptk::cpu_avx512(); }, "whether the CPU kernels take their 512-bit paths");
  m.def("_set_cpu_avx512", [](bool on) { return mptk::set_cpu_avx512(on); }, py::arg("on"),
        "turn the CPU kernels' 512-bit paths on (where the CPU has AVX-512) or off; returns the previous setting");
  m.def("set_flush_denormal", [](bool on) { return mptk::set_flush_denormal(on); }, py::arg("on"),
        "flush-to-zero + denormals-are-zero on the calling thread and every OpenMP pool thread (x86); "
        "returns the calling thread's previous setting");
  py::register_exception<mptk::ValueError>(m, "KernelValueError", PyExc_ValueError);
  mptk::bind_memory(m);  // not an op: the host caching pool (bind_memory.cpp)
  for (auto& kv : mptk::binding_registry()) kv.second(m);
}
