"""The GEMM-only floor of one tiny 8 x 128 training step on this CPU: every GEMM of the step (forward,
input gradient, weight gradient of the 4 blocks' Wqkv, out_proj, up_proj, down_proj and the tied LM
head) timed alone at its exact shape and layout, into a preallocated output, best of 20, summed.
No training step using torch's GEMMs can be faster. (benchmarks/NOTES.md, Training section.)

    python benchmarks/gemm_floor_tiny.py
"""
import time

import torch


def best(fn, n=20):
    for _ in range(3):
        fn()
    b = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        b = min(b, time.perf_counter() - t)
    return b


def main(tokens=8 * 128, d=256, ffn=1024, vocab=4096, layers=4):
    torch.manual_seed(0)
    linears = [(d, 3 * d), (d, d), (d, ffn), (ffn, d)] * layers + [(d, vocab)]  # (in, out)
    shapes = []
    for i, o in linears:
        shapes += [("fwd", tokens, i, o), ("dx", tokens, o, i), ("dw", o, tokens, i)]  # (kind, M, K, N)
    cache, total, flops = {}, 0.0, 0
    for kind, M, K, N in shapes:
        if (kind, M, K, N) not in cache:
            out = torch.empty(M, N)
            if kind == "fwd":  # y = x @ W^T
                a, w = torch.randn(M, K), torch.randn(N, K)
                fn = lambda a=a, w=w, out=out: torch.mm(a, w.t(), out=out)  # noqa: E731
            elif kind == "dx":  # dx = dy @ W
                a, w = torch.randn(M, K), torch.randn(K, N)
                fn = lambda a=a, w=w, out=out: torch.mm(a, w, out=out)  # noqa: E731
            else:  # dW = dy^T @ x
                g, x = torch.randn(K, M), torch.randn(K, N)
                fn = lambda g=g, x=x, out=out: torch.mm(g.t(), x, out=out)  # noqa: E731
            cache[(kind, M, K, N)] = best(fn)
        total += cache[(kind, M, K, N)]
        flops += 2 * M * K * N
    print(f"{len(shapes)} GEMMs, {flops / 1e9:.2f} GFLOP: {total * 1e3:.1f} ms ({flops / total / 1e9:.0f} GFLOP/s); "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
