"""Cross-entropy of LM logits: mk's fused kernel (mpt_kernels/ops/loss.py) against what the model
used before, F.cross_entropy(logits.float()), forward + backward, timed in the same run.

    python -m benchmarks loss --device cpu|cuda [--quick]

Rows: tiny's vocabulary (4096) and MPT's (50432) at 1024 / 16384 tokens (CPU: 1024 and 2048), in
float32 and bfloat16 logits. GB/s counts the bytes the fused kernel must move: forward reads the
logits once, backward reads them and writes the gradient (3 logits-sized tensors in all); "frac
copy" divides that by the copy bandwidth measured beside each case.
"""
from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from mpt_kernels.ops.loss import cross_entropy

from . import harness


def run(ctx: harness.Context) -> harness.Report:
    dev = ctx.device
    report = harness.Report(
        title=f"Cross-entropy forward+backward ({dev}): fused kernel vs F.cross_entropy(logits.float())",
        columns=["tokens", "vocab", "dtype", "fused ms", "torch ms", "speedup", "GB/s", "copy GB/s", "frac copy"])
    tokens_list = ([1024] if ctx.quick else [1024, 2048]) if dev == "cpu" else [1024, 16384]
    copies = []
    for tokens in tokens_list:
        for vocab in (4096, 50432):
            for dtype in (torch.float32, torch.bfloat16):
                if dev == "cpu" and dtype == torch.bfloat16 and vocab == 50432 and tokens > 1024:
                    continue  # the CPU bf16 baseline alone takes many seconds here
                torch.manual_seed(0)
                x = (torch.randn(tokens, vocab, device=dev) * 2).to(dtype).requires_grad_()
                t = torch.randint(0, vocab, (tokens,), device=dev)

                def fused():
                    torch.autograd.grad(cross_entropy(x, t), x)

                def torch_ce():
                    torch.autograd.grad(F.cross_entropy(x.float(), t), x)

                copy_gbs = harness.copy_bandwidth(dev)
                copies.append(copy_gbs)
                reps = dict(warmup=1, iters=3) if ctx.quick or dev == "cpu" else dict(warmup=3, iters=10)
                best = {"fused": float("inf"), "torch": float("inf")}
                for _ in range(2):  # alternate, best of two medians
                    for k, f in (("fused", fused), ("torch", torch_ce)):
                        best[k] = min(best[k], harness.time_fn(f, dev, **reps))
                gbs = 3 * x.numel() * x.element_size() / best["fused"] / 1e9
                row = {"tokens": tokens, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""),
                       "fused ms": best["fused"] * 1e3, "torch ms": best["torch"] * 1e3,
                       "speedup": best["torch"] / best["fused"], "GB/s": gbs, "copy GB/s": copy_gbs,
                       "frac copy": gbs / copy_gbs}
                report.add(**row)
                print(f"  {tokens:>6} x {vocab:>6} {row['dtype']:>8}: fused {row['fused ms']:8.2f} ms, torch "
                      f"{row['torch ms']:8.2f} ms (x{row['speedup']:.2f}), {gbs:6.1f} GB/s ({row['frac copy']:.0%} of copy)",
                      flush=True)
                del x, t
                gc.collect()
                if dev == "cuda":
                    torch.cuda.empty_cache()
    report.limits = {"copy GB/s min": min(copies), "copy GB/s max": max(copies)}
    report.notes.append(
        "speedup = F.cross_entropy(logits.float()) time / fused time, forward + backward (gradient of the logits). "
        "GB/s: 3 logits-sized tensors (forward read, backward read + write) per second; frac copy: that over the "
        "copy bandwidth measured beside each case.")
    report.plot = harness.bar_plot("vocab", ["speedup"], "speedup vs F.cross_entropy(logits.float())", group_key="dtype")
    return report
