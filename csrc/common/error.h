// Argument checks and error types. Bindings translate ValueError -> Python ValueError and
// std::runtime_error -> RuntimeError (pybind11's default for std::invalid_argument is ValueError).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace mptk {

struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace mptk

// MPTK_CHECK_ARG(cond, "q", "must be bfloat16, got ", name) -> ValueError("q: must be bfloat16, got float32")
#define MPTK_CHECK_ARG(cond, argname, ...)                                                 \
  do {                                                                                     \
    if (!(cond)) throw ::mptk::ValueError(::mptk::str_cat(argname, ": ", __VA_ARGS__));    \
  } while (0)

// Internal invariant; failing one is a bug in this library, not in the caller's input.
#define MPTK_CHECK(cond, ...)                                                              \
  do {                                                                                     \
    if (!(cond))                                                                           \
      throw std::runtime_error(::mptk::str_cat("mpt_kernels internal error at ", __FILE__, \
                                               ":", __LINE__, ": ", __VA_ARGS__));          \
  } while (0)
