// std::vector whose storage starts on a 64-byte (cache-line) boundary, for the CPU kernels' scratch.
//
// malloc aligns to 16 bytes, and a block past its mmap threshold starts 16 bytes into a page, so a
// plain std::vector<float> put every 32- or 64-byte vector load of a tile row across two cache lines.
// A split load costs the core two loads: a stand-alone loop of the few-row product's 8 x 2 register
// tile (x rows from memory, one thread, AVX-512 host) ran 1.46-1.72x slower with its x rows 16 bytes
// off a line than with aligned ones (K = 256-4096).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace mptk {

template <typename T, std::size_t Align = 64>
struct AlignedAllocator {
  using value_type = T;
  template <typename U>
  struct rebind {
    using other = AlignedAllocator<U, Align>;
  };
  AlignedAllocator() noexcept = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U, Align>&) noexcept {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{Align}));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{Align}); }
  template <typename U>
  bool operator==(const AlignedAllocator<U, Align>&) const noexcept {
    return true;
  }
  template <typename U>
  bool operator!=(const AlignedAllocator<U, Align>&) const noexcept {
    return false;
  }
};

template <typename T>
using aligned_vector = std::vector<T, AlignedAllocator<T>>;

}  // namespace mptk
