// Binds the emulator's self-test kernels (selftest.cu) into _C_emu as _emu_selftest(name, fixed).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

std::vector<float> mptk_emu_selftest_run(const std::string& name, bool fixed);

void mptk_emu_bind_selftest(pybind11::module_& m) {
  m.def("_emu_selftest", &mptk_emu_selftest_run, pybind11::arg("name"), pybind11::arg("fixed"),
        "Run one of tests/cuda_emu/selftest.cu's kernels (a planted shared-memory bug, or its fixed twin).");
}
