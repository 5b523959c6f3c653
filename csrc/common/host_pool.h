// A caching allocator for large host buffers (kernel outputs and workspaces on the CPU).
//
// Why: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and
// returns it with munmap, so each call of an op with a 128 MiB output faults in 32k new 4 KiB pages.
// On virtualised hosts a fault costs more than the kernel's own work (measured here: 425-466 ms to
// fault in 128 MiB, 42 ms to fill it once mapped). This pool maps blocks 2 MiB-aligned, asks for
// transparent huge pages (MADV_HUGEPAGE: 512x fewer faults where THP is in "madvise" mode), and keeps
// freed blocks for the next request of a similar size, as the CUDA caching allocators do on the GPU.
//
// Thread-safe; blocks may be freed from any thread. Framework-free: the bindings wrap blocks as
// DLPack capsules whose deleter returns them here.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mptk {

struct HostPoolStats {
  size_t in_use_bytes;    // capacity of blocks handed out and not yet freed
  size_t cached_bytes;    // capacity of free blocks kept for reuse
  size_t limit_bytes;     // most cached_bytes kept; freeing beyond it unmaps
  uint64_t hits;          // requests served from the cache
  uint64_t misses;        // requests that mapped new memory
  uint64_t huge_page_advised;  // mappings for which madvise(MADV_HUGEPAGE) succeeded
};

// A block of at least nbytes (nbytes > 0), 2 MiB aligned; *capacity receives its real size, which
// must be passed back to host_free. Throws std::bad_alloc when the system has no memory left even
// after the cache is emptied.
void* host_alloc(size_t nbytes, size_t* capacity);
void host_free(void* ptr, size_t capacity);

HostPoolStats host_pool_stats();
void host_pool_empty();              // unmap every cached block (blocks in use are unaffected)
void host_pool_set_limit(size_t bytes);  // also trims the cache down to the new limit

}  // namespace mptk
