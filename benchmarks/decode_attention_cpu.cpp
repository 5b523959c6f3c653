// The CPU decode attention kernel alone, without Python or torch: one bf16 query row per head against
// L layers' KV caches of S keys (H heads, head_dim 64), as a decode step calls it. Prints a hash of the
// last output (compare two builds of the kernel bit for bit) and the thread CPU time per call (10th
// percentile of the repetitions: robust to a shared machine). benchmarks/NOTES.md, Attention / CPU.
//
//   g++ -O3 -march=native -fopenmp -fno-math-errno -std=gnu++17 -Icsrc benchmarks/decode_attention_cpu.cpp \
//       csrc/attention/attention_cpu.cpp csrc/common/host_pool.cpp -o /tmp/decode_attention_cpu
//   OMP_NUM_THREADS=1 /tmp/decode_attention_cpu S L REPS H    # e.g. 1024 1 3000 4 (in cache), 16384 8 20 4
#include <algorithm>
#include "attention/attention.h"
#include <chrono>
#include <time.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cstring>
#include <omp.h>
using namespace mptk;
int main(int argc, char** argv) {
  int S = argc > 1 ? atoi(argv[1]) : 16384, H = argc > 4 ? atoi(argv[4]) : 4, D = 64, L = argc > 2 ? atoi(argv[2]) : 1;
  int reps = argc > 3 ? atoi(argv[3]) : 50;
  std::vector<std::vector<uint16_t>> K(L), V(L);
  for (int l = 0; l < L; ++l) { K[l].resize((size_t)S*H*D); V[l].resize((size_t)S*H*D);
    for (auto& x : K[l]) x = 0x3f80 + (rand() & 0x7f); for (auto& x : V[l]) x = 0x3f80 + (rand() & 0x7f); }
  std::vector<uint16_t> q(H*D), o(H*D); for (auto& x : q) x = 0x3f00 + (rand() & 0xff);
  std::vector<float> slopes(H); for (int h=0;h<H;++h) slopes[h] = 1.f/(1<<(h+1));
  AttentionFwdParams p;
  p.q = q.data(); p.out = o.data(); p.dtype = DType::BFloat16;
  p.batch = 1; p.seqlen_q = 1; p.seqlen_k = S; p.n_heads = H; p.n_kv_heads = H; p.head_dim = D;
  p.q_batch_stride = H*D; p.q_row_stride = H*D; p.q_head_stride = D;
  p.k_batch_stride = (int64_t)S*H*D; p.k_row_stride = H*D; p.k_head_stride = D;
  p.v_batch_stride = (int64_t)S*H*D; p.v_row_stride = H*D; p.v_head_stride = D;
  p.out_batch_stride = H*D; p.out_row_stride = H*D; p.out_head_stride = D;
  p.alibi_slopes = slopes.data(); p.softmax_scale = 0.125f; p.causal = true;
  size_t ws = alibi_attention_fwd_workspace_size_cpu(p);
  std::vector<char> w(ws + 64);
  p.workspace = ws ? w.data() : nullptr; p.workspace_bytes = ws;
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    timespec a, b; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    for (int l = 0; l < L; ++l) { p.k = K[l].data(); p.v = V[l].data(); if (ws) memset(w.data(), 0, ws); alibi_attention_fwd_cpu(p); }
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b); t.push_back(((b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec)) / L);
  }
  unsigned long long h = 1469598103934665603ull; for (auto x : o) { h ^= x; h *= 1099511628211ull; }
  printf("out hash %llx\n", h);
  std::sort(t.begin(), t.end());
  double m = t[t.size()/10];
  printf("S=%d L=%d threads=%d ws=%zu: %.3f ms/call, %.1f ns/key-head, %.1f GB/s\n", S, L, omp_get_max_threads(), ws, m*1e3, m/S/H*1e9, 2.0*S*H*D*2/m/1e9);
}
