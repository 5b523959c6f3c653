"""Few-row linear (a decode step's products) on the CPU: mpt_kernels' few_rows_linear against torch's
F.linear, same weights, same run, over every weight matrix one decode step reads.

    python -m benchmarks linear --device cpu [--quick] [--rows 1,4,8]

A decode step multiplies a few rows (one per sequence in the batch) by every weight matrix of the
model once: a read of the weights and almost nothing else. A row per case times that whole pass
(MPT-125M: its 48 block matrices and the 50432-row LM head; a 7B-shaped pass: 4 of MPT-7B's blocks,
d_model 4096, and its LM head), so the weights stream from memory as in a real step rather than
from a warm cache; the tiny model's pass (the main job's) fits in the last-level cache, so it shows
the cache-resident case. GB_s counts the weight bytes read per second; the roof is the memory traffic of
a copy measured in this run (bytes read + written per second, the harness's copy_bandwidth, as the
other benchmarks use). A plain read (torch's sum over 512 MiB) is listed too: it reads slower here
than the kernel does, so it is no roof.
"""
from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from . import harness

VOCAB = 50432


def block_shapes(d_model: int, expansion: int = 4) -> list[tuple[int, int]]:
    """(out, in) of one MPT block's matrices: Wqkv, out_proj, up_proj, down_proj."""
    return [(3 * d_model, d_model), (d_model, d_model), (expansion * d_model, d_model), (d_model, expansion * d_model)]


PASSES = {
    # the main job's model (training/configs/tiny.yaml: 4 blocks, d_model 256, 4096-token BPE): 8-17 MB,
    # read from the last-level cache (GB_s above the copy roof), where torch's GEMMs compete best
    "tiny (cache-resident)": dict(d_model=256, blocks=4, vocab=4096),
    "mpt-125m": dict(d_model=768, blocks=12),
    "7b-shaped (4 blocks)": dict(d_model=4096, blocks=4),
}
QUICK = {"mpt-125m/4 (3 blocks, 1/4 head)": dict(d_model=768, blocks=3, vocab=VOCAB // 4)}


def add_arguments(p):
    p.add_argument("--rows", default="1,4,8", type=harness.comma_list(),
                   help="comma-separated rows per product, each at most 8 (default 1,4,8)")
    p.add_argument("--dtypes", default="bfloat16,float32",
                   type=harness.comma_list(["bfloat16", "float16", "float32"]),
                   help="comma-separated weight dtypes (default bfloat16,float32)")
    p.add_argument("--iters", type=harness.positive_int, default=None, help="timed passes per row (default 7)")


def read_bandwidth(nbytes: int = 512 << 20) -> float:
    """GB/s of the fastest full read (sum) of a float32 buffer far larger than the last-level cache."""
    x = torch.rand(nbytes // 4)
    t = harness.time_fn(lambda: x.sum(), "cpu", warmup=2, iters=10, best=True)
    del x
    gc.collect()
    return nbytes / t / 1e9


def run(ctx: harness.Context) -> harness.Report:
    import mpt_kernels as mk
    from mpt_kernels._ext import _C, view
    from mpt_kernels.ops.linear import MAX_ROWS, few_rows_linear

    report = harness.Report(
        title="Few-row linear: one decode step's weight products (cpu)",
        columns=["pass", "dtype", "rows", "weights_MB", "torch_ms", "ours_ms", "ours_kernel_ms", "speedup",
                 "speedup_kernel", "ours_GB_s",
                 "torch_GB_s", "ours_pct_copy_bw"],
        plot=harness.bar_plot("rows", ["speedup"], "speedup over torch F.linear", group_key="pass"),
    )
    if ctx.device != "cpu":
        report.notes.append("few_rows_linear is a CPU kernel (on CUDA the model uses cuBLAS): nothing to measure on "
                            f"{ctx.device}.")
        return report
    a = ctx.args
    rows_list = [int(r) for r in ((a.rows if a is not None and a.rows else None) or "1,4,8").split(",")]
    if any(r > MAX_ROWS for r in rows_list):
        raise SystemExit(f"--rows: at most {MAX_ROWS} rows per product")
    dtypes = [getattr(torch, d) for d in ((a.dtypes if a is not None and a.dtypes else None)
                                          or "bfloat16,float32").split(",")]
    iters = (a.iters if a is not None and a.iters else None) or (3 if ctx.quick else 7)
    copy_bw = harness.copy_bandwidth("cpu")
    report.limits = {"copy_GB_s": copy_bw, "torch_sum_read_GB_s": read_bandwidth()}
    passes = QUICK if ctx.quick else PASSES
    torch.manual_seed(0)
    for name, spec in passes.items():
        d, vocab = spec["d_model"], spec.get("vocab", VOCAB)
        shapes = block_shapes(d) * spec["blocks"] + [(vocab, d)]
        for dtype in dtypes:
            weights = [torch.randn(n, k, dtype=torch.float32).mul_(0.02).to(dtype) for n, k in shapes]
            nbytes = sum(w.numel() * w.element_size() for w in weights)
            for rows in rows_list:
                xs = {k: torch.randn(rows, k, dtype=dtype) for k in {s[1] for s in shapes}}
                # ours_kernel: the kernel alone, its arguments described once, as the model's decode
                # step calls it (mpt_kernels/model/decode.py); ours adds few_rows_linear's Python
                # (checks, output allocation, descriptions: ~10 us a call)
                ys = [torch.empty(rows, w.shape[0], dtype=dtype) for w in weights]
                calls = [(view(xs[w.shape[1]], "x"), view(w, "weight"), None, view(y, "y")) for w, y in zip(weights, ys)]
                times = {}
                for impl, fn in (("torch", F.linear), ("ours", few_rows_linear), ("ours_kernel", None)):
                    def one_pass(fn=fn):
                        if fn is None:
                            for c in calls:
                                _C.few_rows_linear(*c)
                            return
                        for w in weights:
                            fn(xs[w.shape[1]], w)

                    with torch.no_grad():
                        times[impl] = harness.time_fn(one_pass, "cpu", warmup=1, iters=iters)
                del calls, ys
                gbs = nbytes / times["ours"] / 1e9
                report.add(**{"pass": name}, dtype=str(dtype).replace("torch.", ""), rows=rows,
                           weights_MB=nbytes / 1e6, torch_ms=times["torch"] * 1e3, ours_ms=times["ours"] * 1e3,
                           ours_kernel_ms=times["ours_kernel"] * 1e3, speedup=times["torch"] / times["ours"],
                           speedup_kernel=times["torch"] / times["ours_kernel"], ours_GB_s=gbs,
                           torch_GB_s=nbytes / times["torch"] / 1e9, ours_pct_copy_bw=100 * gbs / copy_bw)
                print(f"  {name} {dtype} rows={rows}: torch {times['torch'] * 1e3:.1f} ms, ours "
                      f"{times['ours'] * 1e3:.1f} ms ({gbs:.1f} GB/s)", flush=True)
            del weights
            gc.collect()
    report.notes.append(
        f"Median of {iters} passes after a warm-up pass, wall clock, {torch.get_num_threads()} torch threads, OpenMP "
        f"{mk.build_info()['openmp_max_threads']}. A pass reads every matrix once (weights_MB). speedup = torch_ms / "
        "ours_ms; speedup_kernel = torch_ms / ours_kernel_ms (the kernel called as the model's decode step calls it, without few_rows_linear's ~10 us of Python per product). The roof, copy_GB_s, is the fastest of 10 copies of 512 MiB (bytes read + written), measured in "
        "this run.")
    report.notes.append(
        "torch's CPU bfloat16 product converts as it goes and its time grows with the rows; few_rows_linear reads "
        "each weight once for all rows (float32 sums, bfloat16 converted with two integer ops per 16 weights). "
        "CPU numbers come from a small shared machine: other jobs ran at the same time, so they are noisy.")
    return report
