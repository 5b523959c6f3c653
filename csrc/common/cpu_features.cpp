// Runtime CPU feature switch for the kernels' 512-bit paths (common/cpu_math.h: cpu_avx512), and
// the process-wide flush-to-zero switch (set_flush_denormal).
#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common/cpu_math.h"

namespace mptk {
namespace {

bool cpu_supports_avx512() {
#ifdef MPTK_AVX512_PATH
  // GCC's and Clang's checks also require the OS to save the 512-bit state (XCR0).
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool env_allows_avx512() {
  const char* v = std::getenv("MPTK_CPU_AVX512");
  return v == nullptr || !(std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0 || std::strcmp(v, "false") == 0);
}

std::atomic<bool>& avx512_flag() {
  static std::atomic<bool> flag{cpu_supports_avx512() && env_allows_avx512()};
  return flag;
}

}  // namespace

bool cpu_avx512_supported() {
  static const bool s = cpu_supports_avx512();
  return s;
}

bool cpu_avx512() { return avx512_flag().load(std::memory_order_relaxed); }

bool set_cpu_avx512(bool on) { return avx512_flag().exchange(on && cpu_avx512_supported()); }

bool set_flush_denormal(bool on) {
#if defined(MPTK_MXCSR)
  constexpr unsigned kBits = kMxcsrFlushDenormals;
  const bool was = (_mm_getcsr() & kBits) == kBits;
  // The register is per thread: the caller's, then every thread of the OpenMP pool, which torch's
  // CPU ops and MKL's GEMMs share with these kernels (one libgomp in the process); threads the pool
  // creates later start from their creator's setting.
  auto apply = [on] { _mm_setcsr(on ? (_mm_getcsr() | kBits) : (_mm_getcsr() & ~kBits)); };
  apply();
#pragma omp parallel
  apply();
  return was;
#else
  (void)on;
  return false;
#endif
}

}  // namespace mptk
