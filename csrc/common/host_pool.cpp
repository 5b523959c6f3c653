#include "common/host_pool.h"

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>
#include <new>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#define MPTK_HAVE_MMAP 1
#else
#include <cstdlib>
#endif

namespace mptk {
namespace {

constexpr size_t kAlign = size_t(2) << 20;  // the x86-64 / aarch64 huge-page size

struct Pool {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // capacity -> block
  HostPoolStats stats{0, 0, size_t(2) << 30, 0, 0, 0};
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may be freed during interpreter shutdown
  return *p;
}

void* map_block(size_t capacity, bool* advised) {
  *advised = false;
#ifdef MPTK_HAVE_MMAP
  // Over-map by one alignment unit, then cut the unaligned head and the tail away.
  size_t len = capacity + kAlign;
  void* raw = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  uintptr_t aligned = (start + kAlign - 1) & ~(kAlign - 1);
  if (aligned > start) munmap(raw, aligned - start);
  uintptr_t end = start + len, aligned_end = aligned + capacity;
  if (end > aligned_end) munmap(reinterpret_cast<void*>(aligned_end), end - aligned_end);
#ifdef MADV_HUGEPAGE
  *advised = madvise(reinterpret_cast<void*>(aligned), capacity, MADV_HUGEPAGE) == 0;
#endif
  return reinterpret_cast<void*>(aligned);
#else
  return std::aligned_alloc(kAlign, capacity);
#endif
}

void unmap_block(void* p, size_t capacity) {
#ifdef MPTK_HAVE_MMAP
  munmap(p, capacity);
#else
  (void)capacity;
  std::free(p);
#endif
}

// Unmaps cached blocks, largest first, until cached_bytes <= target. Caller holds the lock.
void trim_locked(Pool& P, size_t target) {
  while (P.stats.cached_bytes > target && !P.free_blocks.empty()) {
    auto it = std::prev(P.free_blocks.end());
    unmap_block(it->second, it->first);
    P.stats.cached_bytes -= it->first;
    P.free_blocks.erase(it);
  }
}

}  // namespace

void* host_alloc(size_t nbytes, size_t* capacity) {
#if defined(__SANITIZE_ADDRESS__)
  // AddressSanitizer builds (MPT_KERNELS_SANITIZE=address): one exact-size allocation per request, so
  // the sanitizer's red zone starts right after the buffer (a pooled block rounded up to 2 MiB would
  // hide an overrun) and a use after free is caught (a cached block would be handed out again).
  {
    void* p = nullptr;
    if (posix_memalign(&p, 64, nbytes ? nbytes : 1) != 0) throw std::bad_alloc();
    Pool& P = pool();
    std::lock_guard<std::mutex> lock(P.mu);
    *capacity = nbytes;
    P.stats.in_use_bytes += nbytes;
    P.stats.misses++;
    return p;
  }
#endif
  size_t cap = (nbytes + kAlign - 1) / kAlign * kAlign;
  if (cap == 0) cap = kAlign;
  Pool& P = pool();
  {
    std::lock_guard<std::mutex> lock(P.mu);
    // Best fit, wasting at most a quarter of the block (or one huge page for small requests).
    auto it = P.free_blocks.lower_bound(cap);
    if (it != P.free_blocks.end() && it->first <= cap + std::max(cap / 4, kAlign)) {
      void* p = it->second;
      *capacity = it->first;
      P.stats.cached_bytes -= it->first;
      P.stats.in_use_bytes += it->first;
      P.stats.hits++;
      P.free_blocks.erase(it);
      return p;
    }
  }
  bool advised = false;
  void* p = map_block(cap, &advised);
  if (p == nullptr) {
    host_pool_empty();
    p = map_block(cap, &advised);
    if (p == nullptr) throw std::bad_alloc();
  }
  std::lock_guard<std::mutex> lock(P.mu);
  *capacity = cap;
  P.stats.in_use_bytes += cap;
  P.stats.misses++;
  if (advised) P.stats.huge_page_advised++;
  return p;
}

void host_free(void* ptr, size_t capacity) {
  if (ptr == nullptr) return;
  Pool& P = pool();
  std::lock_guard<std::mutex> lock(P.mu);
  P.stats.in_use_bytes -= capacity;
#if defined(__SANITIZE_ADDRESS__)
  std::free(ptr);
  return;
#endif
  if (capacity > P.stats.limit_bytes) {
    unmap_block(ptr, capacity);
    return;
  }
  P.free_blocks.emplace(capacity, ptr);
  P.stats.cached_bytes += capacity;
  trim_locked(P, P.stats.limit_bytes);
}

HostPoolStats host_pool_stats() {
  Pool& P = pool();
  std::lock_guard<std::mutex> lock(P.mu);
  return P.stats;
}

void host_pool_empty() {
  Pool& P = pool();
  std::lock_guard<std::mutex> lock(P.mu);
  trim_locked(P, 0);
}

void host_pool_set_limit(size_t bytes) {
  Pool& P = pool();
  std::lock_guard<std::mutex> lock(P.mu);
  P.stats.limit_bytes = bytes;
  trim_locked(P, bytes);
}

}  // namespace mptk
