"""What the top-p sampler costs on the CPU, against the full-sort rule it replaced: one row of 50,432
logits at three widths of nucleus, 1 thread, thread CPU time (20th percentile of 60 calls).
(benchmarks/NOTES.md, "Sampling on the CPU".)

    python benchmarks/sampling_cpu.py
"""
import time

import torch

from mpt_kernels.model.generation import sample_next, top_p_drop


def sort_path_drop(logits, top_p):
    """The previous rule's implementation: torch.sort of the whole row, softmax, float32 cumsum."""
    sl, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sl, dim=-1)
    drop = (probs.cumsum(dim=-1) - probs) >= top_p
    drop[:, 0] = False
    return torch.zeros_like(drop).scatter(-1, order, drop)


def cost_ms(fn, n=60):
    fn()
    ts = []
    for _ in range(n):
        t = time.thread_time()
        fn()
        ts.append(time.thread_time() - t)
    ts.sort()
    return ts[len(ts) // 5] * 1e3


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("| nucleus at top_p 0.9 | top_p_drop | sort path | sample_next(top_p=0.9) | temperature only |")
    print("|---|---|---|---|---|")
    for scale in (6.0, 3.0, 0.5):
        x = torch.randn(1, 50432) * scale
        kept = int((~top_p_drop(x, 0.9)).sum())
        print(f"| {kept:,} | {cost_ms(lambda: top_p_drop(x, 0.9)):.2f} ms | {cost_ms(lambda: sort_path_drop(x, 0.9)):.2f} ms "
              f"| {cost_ms(lambda: sample_next(x, 1.0, top_p=0.9)):.2f} ms | {cost_ms(lambda: sample_next(x, 1.0)):.2f} ms |")


if __name__ == "__main__":
    main()
