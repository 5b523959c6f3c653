// The host emulator's runtime: fibers, barriers, warp collectives, shared memory,
// cp.async, ldmatrix and mma.m16n8k16 (tests/cuda_emu/cuda_emu.h says what is modelled).
#include "cuda_emu.h"

#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <stdexcept>
#include <string>

namespace mptk_emu {

uint16_t float_to_half_bits(float f) {  // round to nearest even
  uint32_t x = bitcast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return sign | (x > 0x7F800000u ? 0x7E00u : 0x7C00u);  // NaN, inf
  if (x >= 0x477FF000u) return sign | 0x7C00u;                                  // >= 65520: inf
  if (x < 0x38800000u)                                                           // below 2^-14: subnormal
    return sign | static_cast<uint16_t>(std::nearbyint(bitcast<float>(x) * 16777216.0f));
  return sign | static_cast<uint16_t>((x + 0xFFFu + ((x >> 13) & 1u) - 0x38000000u) >> 13);
}

// ---------------------------------------------------------------- runtime API state
static thread_local cudaError_t g_last_error = cudaSuccess;
static int g_mma_mode = 0;  // MPTK_EMU_MMA (see mma below)
static std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize

static int env_int(const char* name, int dflt) {
  const char* s = std::getenv(name);
  return s && *s ? std::atoi(s) : dflt;
}
static int sm_count() { return env_int("MPTK_EMU_SM_COUNT", 132); }
static int smem_optin() { return env_int("MPTK_EMU_SMEM_OPTIN", 232448); }  // H100/H200: 227 KiB

const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}
cudaError_t take_last_error() {
  cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
cudaError_t device_attribute(int* v, cudaDeviceAttr a, int dev) {
  if (dev != 0) return cudaErrorInvalidValue;
  if (a == cudaDevAttrMultiProcessorCount) *v = sm_count();
  else if (a == cudaDevAttrMaxSharedMemoryPerBlockOptin) *v = smem_optin();
  else return cudaErrorInvalidValue;
  return cudaSuccess;
}
cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > smem_optin())
    return cudaErrorInvalidValue;
  g_max_dynamic_smem[func] = value;
  return cudaSuccess;
}
int occupancy(const void*, int block_size, size_t smem) {
  // threads and shared memory only (registers are not known here): 2048 threads, 228 KiB per SM
  int by_threads = 2048 / std::max(block_size, 1);
  int by_smem = smem ? static_cast<int>((233472) / (smem + 1024)) : 32;
  return std::max(0, std::min({by_threads, by_smem, 32}));
}

// ---------------------------------------------------------------- fibers
// A fiber switch happens at every __syncthreads and warp collective of every thread. glibc's
// swapcontext also saves and restores the signal mask, a system call per switch (a quarter of an
// attention test's time), so on x86-64 the switch is the few instructions below: the callee-saved
// registers, MXCSR and the x87 control word pushed on the fiber's own stack, then the stack pointer
// swapped. AddressSanitizer is told of each switch (its fiber interface), so it tracks the stacks as
// it does for swapcontext. On other machines, or with MPTK_EMU_UCONTEXT=1 set, fibers use ucontext.
#if defined(__x86_64__)
#define MPTK_EMU_FAST_SWITCH 1
extern "C" void mptk_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl mptk_emu_switch
  .hidden mptk_emu_switch
  .type mptk_emu_switch, @function
mptk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw 12(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw 12(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mptk_emu_switch, .-mptk_emu_switch
)");
#else
#define MPTK_EMU_FAST_SWITCH 0
#endif

#if defined(__SANITIZE_ADDRESS__)
#define MPTK_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define MPTK_EMU_ASAN 0
#endif

struct Context {
  ucontext_t uc;
  void* sp = nullptr;  // the fast switch's saved stack pointer
  const void* stack_bottom = nullptr;  // for AddressSanitizer: the context's stack (the scheduler's is
  size_t stack_size = 0;               // learnt at the first switch into a fiber)
};

static bool fast_switch() {
  static const bool fast = MPTK_EMU_FAST_SWITCH && env_int("MPTK_EMU_UCONTEXT", 0) == 0;
  return fast;
}

static void switch_context(Context& from, Context& to, bool from_finished = false) {
#if MPTK_EMU_FAST_SWITCH
  if (fast_switch()) {
#if MPTK_EMU_ASAN
    void* fake_stack = nullptr;
    __sanitizer_start_switch_fiber(from_finished ? nullptr : &fake_stack, to.stack_bottom, to.stack_size);
#endif
    mptk_emu_switch(&from.sp, to.sp);
#if MPTK_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);  // back in `from`
#endif
    return;
  }
#endif
  (void)from_finished;
  swapcontext(&from.uc, &to.uc);
}

thread_local ThreadState* g_thread = nullptr;
thread_local dim3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;


#if MPTK_EMU_RACECHECK
// Racecheck (tests/cuda_emu/README.md, "Racecheck"): the kernels' translation units are compiled
// with -fsanitize=thread, which only instruments them: every load and store calls __tsan_readN /
// __tsan_writeN (defined at the end of this file, in place of ThreadSanitizer's runtime). Shared- and
// global-memory accesses of a CUDA thread are checked against one shadow entry per byte: the last
// write and the reads since, each with its thread, its block and the number of barriers and warp
// collectives that thread had passed. Two accesses of different threads, one a write, are a hazard
// unless they are in one block and a __syncthreads lies between them (the later thread has passed more
// barriers than the earlier one had) or, within one warp, a warp collective (shuffle, ldmatrix, mma)
// does, or both are atomic adds.
namespace race {
enum : uint8_t {
  kWrite = 1, kPending = 2, kRead = 4, kReadLanes = 8, kReadWarps = 16, kReadBlocks = 32, kAtomic = 64,
  kAtomicBlocks = 128  // atomics of more than one block since the last plain write
};
struct Shadow {
  uint32_t gen = 0;  // the block (shared memory) or launch (global) of this entry; older ones are empty
  uint8_t flags = 0;
  uint16_t w_thread = 0, r_thread = 0, r2_thread = 0;
  uint32_t w_block = 0, r_block = 0, r2_block = 0;  // linear block indices (r2: a reader of another block)
  uint32_t w_epoch = 0, w_wepoch = 0, r_epoch = 0, r_wepoch = 0;  // r_wepoch: the latest reader's
  const void* w_pc = nullptr;
  const void* r_pc = nullptr;
  const void* r2_pc = nullptr;
};
struct Region {
  unsigned char* base;
  size_t size;
  std::vector<Shadow> shadow;
  std::string name;
};
}  // namespace race
#endif

namespace {

constexpr size_t kStackBytes = 256 * 1024;

enum class Wait { None, Block, Warp };

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Block;

}  // namespace

struct ThreadState {
  Context ctx;
  int index = 0;  // linear thread index in the block
  dim3 tid;
  bool done = false;
  Wait wait = Wait::None;
  int exchange_parity = 0;
  // barriers and warp collectives this thread has passed (racecheck's happens-before)
  uint32_t bar_epoch = 0, warp_epoch = 0;
  // cp.async: committed groups (oldest first) and the open one
  struct Copy {
    unsigned char* dst;
    const unsigned char* src;
    bool valid;
  };
  std::vector<std::vector<Copy>> groups;
  std::vector<Copy> open;
  void* stack = nullptr;
};

namespace {

struct WarpState {
  int arrived = 0;
  const char* op = nullptr;
  alignas(16) unsigned char slot[2][32][64];
};

struct Block {
  std::vector<ThreadState> threads;
  std::vector<WarpState> warps;
  int block_arrived = 0;
  int live = 0;
  std::vector<unsigned char> dyn;  // dynamic shared memory
  size_t dyn_size = 0;
  std::map<std::pair<int, size_t>, std::vector<unsigned char>> statics;  // (site, type hash) -> bytes
  Context scheduler;
#if MPTK_EMU_RACECHECK
  std::vector<race::Region> regions;  // dynamic shared memory first, then each static variable
#endif
  std::string error;
  const std::function<void()>* body = nullptr;
};

thread_local Block* g_block = nullptr;

constexpr unsigned char kPoison = 0xFF;

int warp_size_of(const Block& b, int w) {
  return std::min(32, static_cast<int>(b.threads.size()) - 32 * w);
}

[[noreturn]] void abandon_fiber() {
  // the fiber never runs again: back to the scheduler, which sees the error
  switch_context(g_thread->ctx, g_block->scheduler);
  std::abort();
}

void yield() { switch_context(g_thread->ctx, g_block->scheduler); }

// After a thread exits or arrives somewhere: release the block barrier when every live thread is there.
void maybe_release_block(Block& b) {
  if (b.live > 0 && b.block_arrived == b.live) {
    b.block_arrived = 0;
    for (auto& t : b.threads)
      if (t.wait == Wait::Block) t.wait = Wait::None;
  }
}

void fiber_entry() {
  ThreadState* t = g_thread;
  (*g_block->body)();
  t->done = true;
  Block& b = *g_block;
  --b.live;
  const int w = t->index / 32;
  if (b.warps[w].arrived > 0 && b.error.empty())
    b.error = "a thread exited while lanes of its warp wait in a warp collective (" +
              std::string(b.warps[w].op ? b.warps[w].op : "?") + ")";
  maybe_release_block(b);
  // returning switches to uc_link (the scheduler); fiber_start does that for the fast switch
}

#if MPTK_EMU_FAST_SWITCH
[[noreturn]] void fiber_start() {
#if MPTK_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_block->scheduler.stack_bottom, &g_block->scheduler.stack_size);
#endif
  fiber_entry();
  switch_context(g_thread->ctx, g_block->scheduler, true);  // done: the scheduler never resumes it
  std::abort();
}

// A new fiber's stack as mptk_emu_switch leaves a suspended one: its first switch-in "returns" into
// fiber_start, with the stack aligned as at a function's entry (rsp = 8 mod 16).
void* initial_stack(void* stack, size_t bytes) {
#if MPTK_EMU_ASAN
  __asan_unpoison_memory_region(stack, bytes);  // frames an abandoned fiber left poisoned
#endif
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15};
  auto* frame = reinterpret_cast<uint64_t*>(top - 80);
  std::memset(frame, 0, 80);  // r15 .. rbp = 0, and a null return address above fiber_start's frame
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(reinterpret_cast<unsigned char*>(frame) + 8, &mxcsr, 4);
  std::memcpy(reinterpret_cast<unsigned char*>(frame) + 12, &fpucw, 2);
  frame[8] = reinterpret_cast<uint64_t>(&fiber_start);
  return frame;
}
#endif

std::string dim_str(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

void run_block(Block& b, dim3 block, int schedule, std::mt19937& rng) {
  const int n = static_cast<int>(b.threads.size());
  for (int i = 0; i < n; ++i) {
    ThreadState& t = b.threads[i];
    t.index = i;
    t.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    t.done = false;
    t.wait = Wait::None;
    t.exchange_parity = 0;
    t.bar_epoch = t.warp_epoch = 0;
    t.groups.clear();
    t.open.clear();
#if MPTK_EMU_FAST_SWITCH
    if (fast_switch()) {
      t.ctx.sp = initial_stack(t.stack, kStackBytes);
      t.ctx.stack_bottom = t.stack;
      t.ctx.stack_size = kStackBytes;
      continue;
    }
#endif
    getcontext(&t.ctx.uc);
    t.ctx.uc.uc_stack.ss_sp = t.stack;
    t.ctx.uc.uc_stack.ss_size = kStackBytes;
    t.ctx.uc.uc_link = &b.scheduler.uc;
    makecontext(&t.ctx.uc, fiber_entry, 0);
  }
  for (auto& w : b.warps) {
    w.arrived = 0;
    w.op = nullptr;
  }
  b.block_arrived = 0;
  b.live = n;
  // Schedules: 0 lockstep (every runnable thread one step per pass, ascending); 1 warp at a time
  // (the highest warp runs until it waits at __syncthreads or exits, then the next; lanes descending);
  // other values: seeded, odd ones lockstep in a shuffled order, even ones warp at a time in a shuffled
  // warp order. Warp at a time lets one warp run ahead of the others as far as the barriers allow.
  const bool warp_at_a_time = schedule == 1 || (schedule > 1 && schedule % 2 == 0);
  const int nwarps = (n + 31) / 32;
  std::vector<int> order(n), worder(nwarps);
  for (int i = 0; i < n; ++i) order[i] = schedule == 1 ? n - 1 - i : i;
  for (int w = 0; w < nwarps; ++w) worder[w] = schedule == 1 ? nwarps - 1 - w : w;
  auto step = [&](int i) {
    ThreadState& t = b.threads[i];
    if (t.done || t.wait != Wait::None) return false;
    g_thread = &t;
    g_thread_idx = t.tid;
    switch_context(b.scheduler, t.ctx);
    g_thread = nullptr;
    if (!b.error.empty()) throw Error(b.error);
    return true;
  };
  for (;;) {
    bool ran = false;
    if (warp_at_a_time) {
      if (schedule > 1) std::shuffle(worder.begin(), worder.end(), rng);
      for (int w : worder) {
        for (bool any = true; any;) {
          any = false;
          for (int l = 0; l < 32; ++l) {
            const int i = schedule == 1 ? 32 * w + 31 - l : 32 * w + l;
            if (i < n) any |= step(i);
          }
          ran |= any;
        }
      }
    } else {
      if (schedule > 1) std::shuffle(order.begin(), order.end(), rng);
      for (int i : order) ran |= step(i);
    }
    if (b.live == 0) return;
    if (!ran) {
      std::string where;
      for (auto& t : b.threads)
        if (!t.done && where.size() < 300)
          where += " thread " + std::to_string(t.index) + (t.wait == Wait::Block ? " at __syncthreads" : " in a warp op");
      throw Error("deadlock: no thread can proceed (" + std::to_string(b.live) + " live;" + where + ")");
    }
  }
}

struct StackPool {
  std::vector<void*> stacks;
  void* get(size_t i) {
    while (stacks.size() <= i) {
      // a guard page below each stack: an overflow faults instead of corrupting a neighbour
      const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
      void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map a fiber stack");
      mprotect(p, page, PROT_NONE);
      stacks.push_back(static_cast<unsigned char*>(p) + page);
    }
    return stacks[i];
  }
};
thread_local StackPool g_stacks;

}  // namespace

void fail(const char* fmt, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (g_thread == nullptr || g_block == nullptr) throw Error(std::string("cuda_emu: ") + buf);
  if (g_block->error.empty()) {
    g_block->error = std::string(buf) + " (block " + dim_str(g_block_idx) + ", thread " + dim_str(g_thread_idx) + ")";
  }
  abandon_fiber();
}


#if MPTK_EMU_RACECHECK
// ---------------------------------------------------------------- racecheck (see race:: above)
namespace race {
namespace {
thread_local uintptr_t g_lo = UINTPTR_MAX, g_hi = 0;  // bounds of the running block's shared memory
thread_local uint32_t g_gen = 0;                      // increments at every block start
thread_local uint32_t g_launch = 0;                    // increments at every launch
bool g_strict = false;  // MPTK_EMU_RACECHECK_STRICT=1: only __syncthreads orders threads (not warp collectives)

// Global memory: a shadow page per 4 KiB page touched during the launch (dropped at the next launch;
// per OS thread, like the launch itself).
constexpr uintptr_t kPage = 4096;
thread_local std::map<uintptr_t, std::vector<Shadow>> g_pages;
thread_local uintptr_t g_last_page = 0;
thread_local Shadow* g_last_shadow = nullptr;

void new_launch() {
  ++g_launch;
  g_pages.clear();
  g_last_page = 0;
  g_last_shadow = nullptr;
}

void set_bounds(const Block* b) {
  g_lo = UINTPTR_MAX;
  g_hi = 0;
  if (b == nullptr) return;
  for (const Region& r : b->regions) {
    if (r.size == 0) continue;
    g_lo = std::min(g_lo, reinterpret_cast<uintptr_t>(r.base));
    g_hi = std::max(g_hi, reinterpret_cast<uintptr_t>(r.base) + r.size);
  }
}

// "file:line" of a code address (innermost inlined frame first, " <- " its callers), by addr2line.
std::string code_location(const void* pc) {
  if (pc == nullptr) return "?";
  Dl_info info;
  if (dladdr(pc, &info) == 0 || info.dli_fname == nullptr) return "?";
  const uintptr_t off = reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase) - 1;
  char cmd[1200];
  std::snprintf(cmd, sizeof cmd, "addr2line -i -e '%s' 0x%lx 2>/dev/null", info.dli_fname,
                static_cast<unsigned long>(off));
  std::string out;
  if (FILE* f = popen(cmd, "r")) {
    char line[1024];
    while (std::fgets(line, sizeof line, f)) {
      std::string l(line);
      while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) l.pop_back();
      const size_t d = l.find(" (discriminator");
      if (d != std::string::npos) l.resize(d);
      const size_t slash = l.rfind('/');
      if (slash != std::string::npos) l = l.substr(slash + 1);
      if (l.empty() || l.rfind("??", 0) == 0) continue;
      out += (out.empty() ? "" : " <- ") + l;
    }
    pclose(f);
  }
  return out.empty() ? "?" : out;
}

uint32_t block_linear() { return g_block_idx.x + g_grid_dim.x * (g_block_idx.y + g_grid_dim.y * g_block_idx.z); }

std::string thread_str(int index, uint32_t block) {
  const dim3 d = g_block_dim, g = g_grid_dim;
  std::string s = dim_str(dim3(index % d.x, (index / d.x) % d.y, index / (d.x * d.y)));
  if (block != block_linear()) s += " of block " + dim_str(dim3(block % g.x, (block / g.x) % g.y, block / (g.x * g.y)));
  return s;
}

struct Where {  // what a report calls the byte
  const char* space;
  uintptr_t at;
  bool shared;
};

[[noreturn]] void report(const char* hazard, const Where& where, int prev_thread, uint32_t prev_block,
                         const char* prev_what, const void* prev_pc, const char* what, const void* pc, const char* advice) {
  const ThreadState& t = *g_thread;
  char at[64];
  std::snprintf(at, sizeof at, where.shared ? " byte %lu" : " at 0x%lx", static_cast<unsigned long>(where.at));
  std::string msg = std::string("racecheck: ") + hazard + " on " + where.space + at + ": thread " +
                    thread_str(prev_thread, prev_block) + " " + prev_what + " it at " + code_location(prev_pc) +
                    ", then thread " + thread_str(t.index, block_linear()) + " " + what + " it at " +
                    code_location(pc) + " " + advice;
  fail("%s", msg.c_str());
  std::abort();
}

enum Kind { kLoad, kStore, kAsyncIssue, kAsyncLand, kAtomicAdd };

void check_byte(Shadow& s, uint32_t gen, const Where& where, Kind kind, const void* pc) {
  const ThreadState& t = *g_thread;
  if (s.gen != gen) s = Shadow{gen};
  const uint32_t e = t.bar_epoch, we = t.warp_epoch, blk = block_linear();
  const int me = t.index, w = me / 32;
  // Barriers and warp collectives order the threads of one block; nothing orders two blocks.
  auto ordered = [&](uint32_t pb, int p, uint32_t pe, uint32_t pwe) {
    return pb == blk && (p == me || e > pe || (!g_strict && p / 32 == w && we > pwe));
  };
  const char* no_sync = where.shared ? "with no __syncthreads between them (nor, within a warp, a warp collective)"
                                     : "with nothing ordering them (another block, or no __syncthreads between them)";
  auto set_write = [&](uint8_t flags) {
    s.flags = flags;
    s.w_thread = static_cast<uint16_t>(me);
    s.w_block = blk;
    s.w_epoch = e;
    s.w_wepoch = we;
    s.w_pc = pc;
  };
  if (kind == kAsyncLand) {  // the issuing thread's copy completes at its wait_group
    const void* issued = s.w_pc;
    set_write(kWrite);
    s.w_pc = issued;
    return;
  }
  const char* doing = kind == kLoad ? "reads" : kind == kAsyncIssue ? "starts a cp.async into" :
                      kind == kAtomicAdd ? "atomically adds to" : "writes";
  if (s.flags & kPending)
    report("access to a cp.async destination in flight", where, s.w_thread, s.w_block, "issued a cp.async into", s.w_pc,
           doing, pc, "before the copy was waited for (cp.async.wait_group in the issuing thread, then __syncthreads for others)");
  const bool atomic_pair = kind == kAtomicAdd && (s.flags & kAtomic);  // atomics commute with each other
  if ((s.flags & kAtomicBlocks) && kind != kAtomicAdd)  // (the last adder alone may be this very thread)
    report(kind == kLoad ? "read-after-atomic hazard" : "write-after-atomic hazard", where, s.w_thread, s.w_block,
           "(as did a thread of another block) atomically added to", s.w_pc, doing, pc, no_sync);
  const bool atomic_blocks = atomic_pair && ((s.flags & kAtomicBlocks) || s.w_block != blk);
  if ((s.flags & kWrite) && !atomic_pair && !ordered(s.w_block, s.w_thread, s.w_epoch, s.w_wepoch))
    report(kind == kLoad ? "read-after-write hazard" : "write-after-write hazard", where, s.w_thread, s.w_block,
           (s.flags & kAtomic) ? "atomically added to" : "wrote", s.w_pc, doing, pc, no_sync);
  if (kind == kLoad) {
    const uint8_t keep = s.flags & (kWrite | kPending | kAtomic);
    if (!(s.flags & kRead)) {
      s.flags = keep | kRead;
    } else if (s.r_block != blk) {  // remember one reader of another block
      s.flags |= kReadBlocks;
      s.r2_thread = s.r_thread;
      s.r2_block = s.r_block;
      s.r2_pc = s.r_pc;
    } else if (s.r_epoch < e) {  // same-block readers of earlier barrier intervals precede every later access
      s.flags = keep | kRead | (s.flags & kReadBlocks);
    } else if (s.r_thread / 32 != w) {
      s.flags |= kReadWarps;
    } else if (s.r_thread != me) {
      s.flags |= kReadLanes;
    }
    s.r_wepoch = (s.flags & (kReadLanes | kReadWarps)) ? std::max(s.r_wepoch, we) : we;
    s.r_thread = static_cast<uint16_t>(me);
    s.r_block = blk;
    s.r_epoch = e;
    s.r_pc = pc;
    return;
  }
  if ((s.flags & kReadBlocks) && s.r2_block != blk)
    report("write-after-read hazard", where, s.r2_thread, s.r2_block, "read", s.r2_pc, doing, pc, no_sync);
  if (s.flags & kRead) {
    bool ok;
    if (s.r_block != blk) ok = false;
    else if (s.flags & kReadBlocks) ok = false;  // (a reader of another block before this block's)
    else if (s.r_epoch < e) ok = true;
    else if (s.flags & kReadWarps) ok = false;
    else if (s.r_thread / 32 != w) ok = false;
    else if (!(s.flags & kReadLanes) && s.r_thread == me) ok = true;
    else ok = !g_strict && we > s.r_wepoch;
    if (!ok) {
      const bool other = s.r_block == blk && (s.flags & kReadBlocks);
      report("write-after-read hazard", where, other ? s.r2_thread : s.r_thread, other ? s.r2_block : s.r_block, "read",
             other ? s.r2_pc : s.r_pc, doing, pc, no_sync);
    }
  }
  set_write(static_cast<uint8_t>(kWrite | (kind == kAsyncIssue ? kPending : 0) | (kind == kAtomicAdd ? kAtomic : 0) |
                                 (atomic_blocks ? kAtomicBlocks : 0)));
}

bool private_to_the_thread(uintptr_t a) {
  // the fiber's own stack, and the emulator's thread-local threadIdx/blockIdx/blockDim/gridDim
  const uintptr_t stack = reinterpret_cast<uintptr_t>(g_thread->stack);
  if (a >= stack && a < stack + kStackBytes) return true;
  for (const dim3* d : {&g_thread_idx, &g_block_idx, &g_block_dim, &g_grid_dim}) {
    const uintptr_t b = reinterpret_cast<uintptr_t>(d);
    if (a >= b && a < b + sizeof(dim3)) return true;
  }
  return false;
}

Shadow* global_page(uintptr_t page) {
  if (page == g_last_page && g_last_shadow) return g_last_shadow;
  auto it = g_pages.find(page);
  if (it == g_pages.end()) it = g_pages.emplace(page, std::vector<Shadow>(kPage)).first;
  g_last_page = page;
  g_last_shadow = it->second.data();
  return g_last_shadow;
}
}  // namespace

inline bool in_kernel() { return g_thread != nullptr && g_block != nullptr; }

void access(const void* p, size_t n, int kind, const void* pc) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a < g_hi && a + n > g_lo) {
    for (Region& r : g_block->regions) {
      const uintptr_t b = reinterpret_cast<uintptr_t>(r.base);
      if (a + n <= b || a >= b + r.size) continue;
      const size_t from = a > b ? a - b : 0, to = std::min<uintptr_t>(a + n - b, r.size);
      for (size_t off = from; off < to; ++off)
        check_byte(r.shadow[off], g_gen, Where{r.name.c_str(), off, true}, static_cast<Kind>(kind), pc);
    }
    return;
  }
  if (private_to_the_thread(a)) return;
  for (uintptr_t x = a; x < a + n; ++x) {
    Shadow* page = global_page(x & ~(kPage - 1));
    check_byte(page[x & (kPage - 1)], g_launch, Where{"global memory", x, false}, static_cast<Kind>(kind), pc);
  }
}
}  // namespace race

float atomic_add_f32(float* p, float v) {
  if (race::in_kernel()) race::access(p, sizeof(float), race::kAtomicAdd, __builtin_return_address(0));
  const float old = *p;
  *p = old + v;
  return old;
}
#define MPTK_EMU_RACE(p, n, kind, pc) \
  do {                                \
    if (::mptk_emu::race::in_kernel()) ::mptk_emu::race::access(p, n, kind, pc); \
  } while (0)
#else
#define MPTK_EMU_RACE(p, n, kind, pc) \
  do {                                \
  } while (0)
#endif

void run_grid(const void* func, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body) {
  const uint64_t nthreads = uint64_t{block.x} * block.y * block.z;
  int max_dyn = 48 * 1024;
  auto it = g_max_dynamic_smem.find(func);
  if (it != g_max_dynamic_smem.end()) max_dyn = std::max(max_dyn, it->second);
  if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 || dynamic_smem > static_cast<size_t>(max_dyn)) {
    g_last_error = cudaErrorInvalidConfiguration;
    if (std::getenv("MPTK_EMU_VERBOSE"))
      std::fprintf(stderr, "cuda_emu: refused launch grid %s block %s smem %zu (limit %d)\n", dim_str(grid).c_str(),
                   dim_str(block).c_str(), dynamic_smem, max_dyn);
    return;
  }
  const int schedule = env_int("MPTK_EMU_SCHEDULE", 0);
  g_mma_mode = env_int("MPTK_EMU_MMA", 0);
#if MPTK_EMU_RACECHECK
  race::g_strict = env_int("MPTK_EMU_RACECHECK_STRICT", 0) != 0;
  race::new_launch();
#endif
  std::mt19937 rng(static_cast<unsigned>(schedule));
  Block b;
  b.threads.resize(nthreads);
  for (size_t i = 0; i < nthreads; ++i) b.threads[i].stack = g_stacks.get(i);
  b.warps.resize((nthreads + 31) / 32);
  b.dyn_size = dynamic_smem;
  b.dyn.resize(dynamic_smem + 16);
#if MPTK_EMU_RACECHECK
  b.regions.push_back({b.dyn.data(), dynamic_smem, std::vector<race::Shadow>(dynamic_smem), "dynamic shared memory"});
#endif
  b.body = &body;
  Block* saved_block = g_block;
  const dim3 saved_dims[3] = {g_block_idx, g_block_dim, g_grid_dim};
  g_block = &b;
  g_block_dim = block;
  g_grid_dim = grid;
  // block order: row-major, or reversed / shuffled with the schedule (blocks must not depend on it)
  const uint64_t nblocks = uint64_t{grid.x} * grid.y * grid.z;
  std::vector<uint64_t> border(nblocks);
  for (uint64_t k = 0; k < nblocks; ++k) border[k] = schedule == 1 ? nblocks - 1 - k : k;
  if (schedule > 1) std::shuffle(border.begin(), border.end(), rng);
  try {
    for (uint64_t k = 0; k < nblocks; ++k) {
      const uint64_t lin = border[k];
      g_block_idx = dim3(lin % grid.x, (lin / grid.x) % grid.y, lin / (uint64_t{grid.x} * grid.y));
      std::memset(b.dyn.data(), kPoison, b.dyn.size());
      for (auto& s : b.statics) std::memset(s.second.data(), kPoison, s.second.size());
#if MPTK_EMU_RACECHECK
      ++race::g_gen;  // every shadow entry of the previous block reads as empty
      race::set_bounds(&b);
#endif
      run_block(b, block, schedule, rng);
    }
  } catch (...) {
#if MPTK_EMU_RACECHECK
    race::set_bounds(saved_block);
#endif
    g_block = saved_block;
    g_block_idx = saved_dims[0];
    g_block_dim = saved_dims[1];
    g_grid_dim = saved_dims[2];
    throw;
  }
#if MPTK_EMU_RACECHECK
  race::set_bounds(saved_block);
#endif
  g_block = saved_block;
  g_block_idx = saved_dims[0];
  g_block_dim = saved_dims[1];
  g_grid_dim = saved_dims[2];
}

void syncthreads() {
  Block& b = *g_block;
  ThreadState& t = *g_thread;
  t.wait = Wait::Block;
  ++b.block_arrived;
  maybe_release_block(b);
  while (t.wait == Wait::Block) yield();
  ++t.bar_epoch;
  g_thread_idx = t.tid;
}

unsigned char* dynamic_smem() {
  if (g_block == nullptr) fail("dynamic shared memory outside a kernel");
  return g_block->dyn.data();
}
size_t dynamic_smem_size() { return g_block ? g_block->dyn_size : 0; }

void* static_smem(int site, size_t bytes, size_t align, const std::type_info& type) {
  Block& b = *g_block;
  auto key = std::make_pair(site, type.hash_code());
  auto it = b.statics.find(key);
  if (it == b.statics.end()) {
    it = b.statics.emplace(key, std::vector<unsigned char>(bytes + align, kPoison)).first;
#if MPTK_EMU_RACECHECK
    uintptr_t q = reinterpret_cast<uintptr_t>(it->second.data());
    q = (q + align - 1) / align * align;
    b.regions.push_back({reinterpret_cast<unsigned char*>(q), bytes, std::vector<race::Shadow>(bytes),
                         "static __shared__ variable #" + std::to_string(site)});
    race::set_bounds(&b);
#endif
  }
  uintptr_t p = reinterpret_cast<uintptr_t>(it->second.data());
  p = (p + align - 1) / align * align;
  return reinterpret_cast<void*>(p);
}

int lane_id() { return g_thread->index % 32; }

void warp_exchange(const char* op, const void* in, size_t bytes, void* all_out) {
  Block& b = *g_block;
  ThreadState& t = *g_thread;
  const int w = t.index / 32, lane = t.index % 32;
  WarpState& ws = b.warps[w];
  if (warp_size_of(b, w) != 32) fail("%s: warp %d has %d threads (warp collectives need all 32)", op, w, warp_size_of(b, w));
  if (bytes > 64) fail("%s: %zu bytes per lane (emulator limit 64)", op, bytes);
  if (ws.arrived == 0) {
    ws.op = op;
  } else if (ws.op != op && std::strcmp(ws.op, op) != 0) {
    fail("warp %d: lanes in different warp collectives (%s vs %s)", w, ws.op, op);
  }
  const int parity = t.exchange_parity;
  std::memcpy(ws.slot[parity][lane], in, bytes);
  t.exchange_parity ^= 1;
  t.wait = Wait::Warp;
  if (++ws.arrived == 32) {
    ws.arrived = 0;
    for (int l = 0; l < 32; ++l) {
      ThreadState& o = b.threads[32 * w + l];
      if (o.exchange_parity != t.exchange_parity)
        fail("warp %d: lanes out of step in warp collectives", w);
      o.wait = Wait::None;
    }
  }
  while (t.wait == Wait::Warp) yield();
  ++t.warp_epoch;
  g_thread_idx = t.tid;
  unsigned char* out = static_cast<unsigned char*>(all_out);
  for (int l = 0; l < 32; ++l) std::memcpy(out + l * bytes, ws.slot[parity][l], bytes);
}

// ---------------------------------------------------------------- cp.async
void cp_async_16(uint32_t off, const void* src, bool valid) {
  Block& b = *g_block;
  if (off % 16 != 0) fail("cp.async: shared address %u is not 16-byte aligned", off);
  if (off + 16 > b.dyn_size) fail("cp.async: shared address %u + 16 past the dynamic shared memory (%zu bytes)", off, b.dyn_size);
  if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async: global address %p is not 16-byte aligned", src);
  unsigned char* dst = b.dyn.data() + off;
  MPTK_EMU_RACE(dst, 16, 2, __builtin_return_address(0));
  if (valid) MPTK_EMU_RACE(src, 16, 0, __builtin_return_address(0));  // (read at some point before the wait)
  std::memset(dst, kPoison, 16);  // undefined until the group completes
  g_thread->open.push_back({dst, static_cast<const unsigned char*>(src), valid});
}
void cp_async_commit() {
  ThreadState& t = *g_thread;
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}
void cp_async_wait(int allowed) {
  ThreadState& t = *g_thread;
  while (static_cast<int>(t.groups.size()) > allowed) {
    for (auto& c : t.groups.front()) {
      if (c.valid) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
      MPTK_EMU_RACE(c.dst, 16, 3, nullptr);
    }
    t.groups.erase(t.groups.begin());
  }
}

// ---------------------------------------------------------------- ldmatrix, mma
void ldmatrix_x4(uint32_t (&r)[4], uint32_t off, bool trans) {
  Block& b = *g_block;
  if (off % 16 != 0) fail("ldmatrix: row address %u is not 16-byte aligned", off);
  if (off + 16 > b.dyn_size) fail("ldmatrix: row address %u + 16 past the dynamic shared memory (%zu bytes)", off, b.dyn_size);
  uint32_t addr[32];
  warp_exchange(trans ? "ldmatrix.trans" : "ldmatrix", &off, sizeof(off), addr);
  const int L = lane_id();
  if (L == 0 && std::getenv("MPTK_EMU_ALLOW_BANK_CONFLICTS") == nullptr) {
    // each 8x8 matrix is one shared-memory wavefront: its 8 rows must sit in 8 different 16-byte bank
    // groups (32 banks x 4 bytes), or the load serialises
    for (int i = 0; i < 4; ++i) {
      unsigned seen = 0;
      for (int j = 0; j < 8; ++j) seen |= 1u << ((addr[8 * i + j] / 16) % 8);
      if (seen != 0xFFu) fail("ldmatrix: bank conflict in matrix %d (row addresses %u, %u, ...)", i, addr[8 * i], addr[8 * i + 1]);
    }
  }
  const unsigned char* base = b.dyn.data();
  const void* pc = __builtin_return_address(0);
  (void)pc;
  for (int i = 0; i < 4; ++i) {
    if (!trans) {
      MPTK_EMU_RACE(base + addr[8 * i + L / 4] + 4 * (L % 4), 4, 0, pc);
      std::memcpy(&r[i], base + addr[8 * i + L / 4] + 4 * (L % 4), 4);
    } else {
      uint16_t lo, hi;
      MPTK_EMU_RACE(base + addr[8 * i + 2 * (L % 4)] + 2 * (L / 4), 2, 0, pc);
      MPTK_EMU_RACE(base + addr[8 * i + 2 * (L % 4) + 1] + 2 * (L / 4), 2, 0, pc);
      std::memcpy(&lo, base + addr[8 * i + 2 * (L % 4)] + 2 * (L / 4), 2);
      std::memcpy(&hi, base + addr[8 * i + 2 * (L % 4) + 1] + 2 * (L / 4), 2);
      r[i] = lo | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

// How mma.m16n8k16 sums (MPTK_EMU_MMA, read at each launch): 0, the 16 exact products in double and
// one rounding into float32 (better than the hardware); 1, a pessimistic bound on it: the products
// added one by one into the float32 accumulator, each sum truncated toward zero (17 roundings in one
// direction, where tensor cores align a block of products to the largest exponent, truncate and
// normalise: a few). A kernel that passes under 1 leaves room for the hardware's accumulation.

namespace {
float add_toward_zero(float acc, double x) {
  const double d = static_cast<double>(acc) + x;  // exact for these magnitudes (a float plus an exact product)
  float f = static_cast<float>(d);
  if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
  return f;
}

struct MmaIn {
  uint32_t a[4], b0, b1;
};
template <bool kBf16>
float elem(uint32_t reg, int half) {
  const uint16_t h = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xFFFF);
  return kBf16 ? bitcast<float>(static_cast<uint32_t>(h) << 16) : half_bits_to_float(h);
}
template <bool kBf16>
void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaIn mine{{a[0], a[1], a[2], a[3]}, b0, b1}, all[32];
  warp_exchange(kBf16 ? "mma.bf16" : "mma.f16", &mine, sizeof(mine), all);
  const int L = lane_id(), g = L / 4, t = L % 4;
  auto A = [&](int row, int k) {  // A (16 x 16, row-major fragments)
    const MmaIn& src = all[(row % 8) * 4 + (k % 8) / 2];
    const uint32_t reg = src.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return elem<kBf16>(reg, k % 2);
  };
  auto B = [&](int k, int col) {  // B (16 x 8, column fragments)
    const MmaIn& src = all[col * 4 + (k % 8) / 2];
    return elem<kBf16>(k >= 8 ? src.b1 : src.b0, k % 2);
  };
  // this lane's two rows of A (g, g + 8) and two columns of B (2t, 2t + 1), each element converted once
  double a_rows[2][16], b_cols[2][16];
  for (int k = 0; k < 16; ++k) {
    a_rows[0][k] = A(g, k);
    a_rows[1][k] = A(g + 8, k);
    b_cols[0][k] = B(k, 2 * t);
    b_cols[1][k] = B(k, 2 * t + 1);
  }
  for (int i = 0; i < 4; ++i) {
    const double* ar = a_rows[i >= 2 ? 1 : 0];
    const double* bc = b_cols[i % 2];
    if (g_mma_mode == 1) {
      for (int k = 0; k < 16; ++k) c[i] = add_toward_zero(c[i], ar[k] * bc[k]);
      continue;
    }
    double s = 0.0;  // products exact; one rounding of the sum into float32
    for (int k = 0; k < 16; ++k) s += ar[k] * bc[k];
    c[i] = static_cast<float>(static_cast<double>(c[i]) + s);
  }
}
}  // namespace

void mma_16816_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { mma<true>(c, a, b0, b1); }
void mma_16816_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { mma<false>(c, a, b0, b1); }

}  // namespace mptk_emu

#if MPTK_EMU_RACECHECK
// The entry points GCC's -fsanitize=thread instrumentation calls (the kernels' translation units only;
// ThreadSanitizer's own runtime is not linked). Only shared-memory accesses of a running CUDA thread
// are checked; the rest return at the bounds test.
extern "C" {
#define MPTK_EMU_TSAN_ACCESS(n)                                                                           \
  void __tsan_read##n(void* p) { MPTK_EMU_RACE(p, n, 0, __builtin_return_address(0)); }                  \
  void __tsan_write##n(void* p) { MPTK_EMU_RACE(p, n, 1, __builtin_return_address(0)); }                 \
  void __tsan_unaligned_read##n(void* p) { MPTK_EMU_RACE(p, n, 0, __builtin_return_address(0)); }        \
  void __tsan_unaligned_write##n(void* p) { MPTK_EMU_RACE(p, n, 1, __builtin_return_address(0)); }
MPTK_EMU_TSAN_ACCESS(1)
MPTK_EMU_TSAN_ACCESS(2)
MPTK_EMU_TSAN_ACCESS(4)
MPTK_EMU_TSAN_ACCESS(8)
MPTK_EMU_TSAN_ACCESS(16)
#undef MPTK_EMU_TSAN_ACCESS
void __tsan_read_range(void* p, unsigned long n) { MPTK_EMU_RACE(p, n, 0, __builtin_return_address(0)); }
void __tsan_write_range(void* p, unsigned long n) { MPTK_EMU_RACE(p, n, 1, __builtin_return_address(0)); }
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}
#endif
