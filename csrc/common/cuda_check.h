// CUDA error checking usable from .cu and .cpp files (only when built with CUDA).
#pragma once
#ifdef MPTK_WITH_CUDA
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define MPTK_CUDA_CHECK(expr)                                                                  \
  do {                                                                                         \
    cudaError_t _mptk_err = (expr);                                                            \
    if (_mptk_err != cudaSuccess)                                                              \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(_mptk_err) +   \
                               " (" #expr ") at " + __FILE__ + ":" + std::to_string(__LINE__)); \
  } while (0)

// Call right after every <<<...>>> launch: reports bad launch configurations immediately.
#define MPTK_CUDA_CHECK_LAUNCH() MPTK_CUDA_CHECK(cudaGetLastError())
#endif
