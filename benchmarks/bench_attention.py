"""ALiBi flash attention: mk.alibi_attention against what people use instead, timed in the same run.

    python -m benchmarks attention --device cpu [--quick] [--heads 8] [--batch 1]
    python -m benchmarks attention --device cuda

Rows: causal bf16 attention, seqlen {512, 2048, 8192} (CUDA adds 16384), head dim 64 and 128.
FLOPs: 4 * B * H * Sq * Sk * D for the forward, halved for causal; the backward counts 2.5x the
forward, so forward+backward is 3.5x. Baselines:
  sdpa_bias    torch SDPA with a dense (B, H, S, S) ALiBi + causal bias tensor: what Hugging Face's
               MPT does. The bias is built outside the timed region (it is built once per forward
               for all layers), which favours the baseline; its bytes are in the memory column.
  sdpa_causal  torch SDPA is_causal=True without any bias: the speed ALiBi should cost us nothing against.
  flex         (CUDA) FlexAttention with an ALiBi score_mod and a causal block mask, compiled.
  flash_attn   (CUDA, when importable) flash-attn's alibi_slopes path.
"frac" is the fraction of the matmul throughput measured in the same run: float32 matmul on the CPU
(the CPU kernel computes in float32; bf16 matmul on an AVX2 host is no meaningful roof) and bf16 on
CUDA. Memory: CUDA peak allocated bytes above the inputs; CPU peak RSS growth during the call
(VmHWM reset through /proc/self/clear_refs), which includes the output tensor.
"""
from __future__ import annotations

import gc
import math

import torch
import torch.nn.functional as F

import mpt_kernels as mk
from mpt_kernels.ops import reference as R

from . import harness

METHODS = ["ours", "sdpa_bias", "sdpa_causal", "flex", "flash_attn"]


def add_arguments(p):
    p.add_argument("--heads", type=harness.positive_int, default=8)
    p.add_argument("--batch", type=harness.positive_int, default=1)
    p.add_argument("--seqlens", type=harness.comma_list(), default=None,
                   help="comma-separated, overrides the default list")
    p.add_argument("--head-dims", type=harness.comma_list(), default="64,128",
                   help="comma-separated (--quick: the first only)")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--flex-seqlens", type=str, default="all",
                   help="CUDA: seqlens at which FlexAttention runs ('all', 'none' or a comma list); each "
                        "seqlen compiles it anew (tens of seconds), so a short GPU session names one or two")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: time by the process's CPU seconds (all threads), which a shared machine's "
                        "time-slicing does not inflate; CPU device only")


# ------------------------------------------------------------------------------------------- timing


def time_cpu_seconds(fn, *, warmup: int, iters: int) -> float:
    """Median CPU seconds of fn() summed over this process's threads, divided by the thread count:
    the wall time the call would take on otherwise idle cores. OpenMP spin-waiting counts as busy,
    for our kernel and torch's alike."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.process_time()
        fn()
        times.append((time.process_time() - t0) / torch.get_num_threads())
    return statistics.median(times)


# ------------------------------------------------------------------------------------------- memory


def _proc_status(key: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    # Hand malloc's cached free pages back to the OS so the next allocations show up as RSS growth
    # (otherwise memory reused from an earlier call is invisible to the peak-RSS measurement).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_bytes(fn, device: str) -> float:
    """Peak memory above the state before the call (NaN when it cannot be measured)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    _release_free_heap()
    # Our ops take CPU outputs from the host pool, which keeps freed blocks mapped: a block reused from
    # the timed calls before would not show in RSS, and "extra minus output" read negative. Unmapped
    # first, the output is counted like any other allocation.
    mk.empty_host_cache()
    before = _proc_status("VmRSS:")
    if before is None or not _reset_peak_rss():
        return float("nan")
    fn()
    return float(_proc_status("VmHWM:") - before)


# ------------------------------------------------------------------------------------------- methods


def _dense_alibi_causal_bias(slopes, S, dtype, device):
    bias = R.alibi_bias(slopes.to(device), S, S, dtype=torch.float32)  # (H, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=device).triu(1)
    return bias.masked_fill(causal, float("-inf")).to(dtype)[None]  # (1, H, S, S), broadcast over batch


def _flex_fn(slopes, S):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (S - 1 - kv_idx)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = create_block_mask(causal, None, None, S, S, device="cuda")
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, score_mod=alibi, block_mask=mask)


def _flash_attn_fn(slopes):
    from flash_attn import flash_attn_func  # noqa: F401  (ImportError -> baseline skipped)

    return lambda q, k, v: flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)


def build_methods(device, slopes, S, dtype, flex=True):
    """name -> (layout, fn(q, k, v) -> out, extra_bytes_held). layout 'bshd' or 'bhsd'."""
    m = {"ours": ("bshd", lambda q, k, v: mk.alibi_attention(q, k, v, causal=True, alibi_slopes=slopes), 0)}
    bias = _dense_alibi_causal_bias(slopes, S, dtype, device)
    m["sdpa_bias"] = ("bhsd", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                      bias.numel() * bias.element_size())
    m["sdpa_causal"] = ("bhsd", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), 0)
    if device == "cuda" and flex:
        try:
            m["flex"] = ("bhsd", _flex_fn(slopes, S), 0)
        except Exception as exc:  # noqa: BLE001 - report and go on without this baseline
            print(f"[attention] FlexAttention unavailable: {exc}")
        try:
            m["flash_attn"] = ("bshd", _flash_attn_fn(slopes), 0)
        except ImportError:
            pass
    return m


# ------------------------------------------------------------------------------------------- run


def _plot(report: harness.Report, path):
    import matplotlib.pyplot as plt

    dims = sorted({r["head_dim"] for r in report.rows})
    fig, axes = plt.subplots(len(dims), 2, figsize=(11, 3.6 * len(dims)), squeeze=False)
    for i, d in enumerate(dims):
        for j, (suffix, title) in enumerate((("fwd", "forward"), ("fwdbwd", "forward+backward"))):
            ax = axes[i][j]
            for meth in METHODS:
                pts = [(r["seqlen"], r.get(f"{meth}_{suffix}_tflops")) for r in report.rows if r["head_dim"] == d]
                pts = [(s, t) for s, t in pts if t is not None and t == t]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=meth)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("seqlen")
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"{title}, head dim {d}, causal bf16")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx: harness.Context) -> harness.Report:
    a = ctx.args
    device, dtype = ctx.device, torch.bfloat16
    if a.clock == "cpu" and device != "cpu":  # before anything is measured (it used to be ignored)
        raise SystemExit("--clock cpu: CPU device only (CUDA rows are timed with CUDA events)")
    B, H = a.batch, a.heads
    if a.seqlens:
        seqlens = [int(s) for s in a.seqlens.split(",")]
    elif ctx.quick:
        seqlens = [512, 2048]
    else:
        seqlens = [512, 2048, 8192] + ([16384] if device == "cuda" else [])
    head_dims = [int(d) for d in a.head_dims.split(",")]
    if ctx.quick:
        head_dims = head_dims[:1]
    cpu = device == "cpu"
    roof_dtype = torch.float32 if cpu else torch.bfloat16
    use_cpu_clock = cpu and a.clock == "cpu"
    if use_cpu_clock:  # the roof on the same clock as the rows
        n = 1024
        x, y = torch.randn(n, n, dtype=roof_dtype), torch.randn(n, n, dtype=roof_dtype)
        roof = 2 * n ** 3 / time_cpu_seconds(lambda: x @ y, warmup=2, iters=5) / 1e12
        del x, y
    else:
        roof = harness.matmul_flops(device, roof_dtype)

    def timed(fn, warmup, iters):
        if use_cpu_clock:
            return time_cpu_seconds(fn, warmup=warmup, iters=iters)
        return harness.time_fn(fn, device, warmup=warmup, iters=iters)

    cols = ["seqlen", "head_dim"]
    for suffix in ("fwd", "fwdbwd"):
        cols += [f"ours_{suffix}_tflops", f"sdpa_bias_{suffix}_tflops", f"sdpa_causal_{suffix}_tflops"]
        if not cpu:
            cols += [f"flex_{suffix}_tflops", f"flash_attn_{suffix}_tflops"]
        cols += [f"x_vs_sdpa_bias_{suffix}", f"x_vs_sdpa_causal_{suffix}"]
        if not cpu:
            cols += [f"x_vs_flex_{suffix}"]
    cols += ["ours_fwd_frac", "ours_fwd_extra_MiB", "ours_fwd_extra_minus_out_MiB", "sdpa_bias_fwd_extra_MiB",
             "dense_bias_MiB", "extra_over_bias"]
    report = harness.Report(
        title=f"ALiBi attention, causal bf16, batch {B}, {H} heads ({device}"
        + (", CPU-seconds clock)" if cpu and a.clock == "cpu" else ")"),
        columns=cols,
        limits={f"matmul_{str(roof_dtype)[6:]}_tflops": roof},
        plot=_plot,
    )
    slopes = mk.alibi_slopes(H).to(device)
    for D in head_dims:
        for S in seqlens:
            flops_fwd = 4 * B * H * S * S * D / 2
            row = {"seqlen": S, "head_dim": D}
            long_cpu = cpu and S >= 8192
            warmup, iters = (1, 2) if cpu else (3, 10)
            if ctx.quick or long_cpu:
                warmup, iters = 1, 1 if long_cpu else 2
            q = torch.randn(B, S, H, D, device=device, dtype=dtype)
            k, v = torch.randn_like(q), torch.randn_like(q)
            dout = torch.randn_like(q)
            methods = build_methods(device, slopes, S, dtype, flex=a.flex_seqlens == "all" or str(S) in a.flex_seqlens.split(","))
            def measure(name, layout, fn, held):
                qq, kk, vv, gg = (t.transpose(1, 2) if layout == "bhsd" else t for t in (q, k, v, dout))
                with torch.no_grad():
                    t = timed(lambda: fn(qq, kk, vv), warmup, iters)
                    row[f"{name}_fwd_tflops"] = flops_fwd / t / 1e12
                    if name in ("ours", "sdpa_bias"):
                        extra = peak_extra_bytes(lambda: fn(qq, kk, vv), device)
                        row[f"{name}_fwd_extra_MiB"] = (extra + held) / 2 ** 20
                # The CPU SDPA backward in bf16 is very slow (~100x the forward at 8192): skip it there.
                if a.no_backward or (long_cpu and name != "ours"):
                    row[f"{name}_fwdbwd_tflops"] = float("nan")
                    return
                qg, kg, vg = (x.detach().requires_grad_() for x in (qq, kk, vv))

                def step():
                    out = fn(qg, kg, vg)
                    torch.autograd.grad(out, (qg, kg, vg), gg)

                t = timed(step, warmup, iters)
                row[f"{name}_fwdbwd_tflops"] = 3.5 * flops_fwd / t / 1e12

            for name, (layout, fn, held) in methods.items():
                if name == "ours":
                    measure(name, layout, fn, held)  # a failure of ours stops the benchmark
                    continue
                try:  # a baseline that fails (a compile error, out of memory) is reported and skipped
                    measure(name, layout, fn, held)
                except Exception as exc:  # noqa: BLE001
                    print(f"[attention] {name} failed at seqlen {S} head_dim {D}: {type(exc).__name__}: {exc}"[:400])
                    report.notes.append(f"{name} failed at seqlen {S}, head_dim {D}: {type(exc).__name__}")
                    for suffix in ("fwd", "fwdbwd"):
                        row.setdefault(f"{name}_{suffix}_tflops", float("nan"))
                    if device == "cuda":
                        torch.cuda.empty_cache()
            for suffix in ("fwd", "fwdbwd"):
                ours = row.get(f"ours_{suffix}_tflops", float("nan"))
                for base in ("sdpa_bias", "sdpa_causal", "flex"):
                    other = row.get(f"{base}_{suffix}_tflops")
                    if other is not None:
                        row[f"x_vs_{base}_{suffix}"] = ours / other if other == other and other > 0 else float("nan")
            row["ours_fwd_frac"] = row["ours_fwd_tflops"] / roof
            dense = B * H * S * S * torch.finfo(dtype).bits // 8
            row["dense_bias_MiB"] = dense / 2 ** 20
            row["extra_over_bias"] = row.get("ours_fwd_extra_MiB", float("nan")) * 2 ** 20 / dense
            row["ours_fwd_extra_minus_out_MiB"] = row.get("ours_fwd_extra_MiB", float("nan")) - q.numel() * 2 / 2 ** 20
            report.add(**row)
            print(f"[attention] seqlen {S} head_dim {D}: ours fwd {row['ours_fwd_tflops']:.4f} TFLOP/s", flush=True)
            del methods, q, k, v, dout
            gc.collect()
    report.notes.append(
        "x_vs_*: our TFLOP/s over the baseline's (same FLOP count, so a speed ratio). frac: fraction of "
        f"{str(roof_dtype)[6:]} matmul throughput measured in this run. *_extra_MiB: peak memory growth during "
        "one forward, output included (extra_minus_out: without the output tensor); sdpa_bias adds the dense bias tensor it needs. extra_over_bias: ours / "
        "dense bias size. CPU: the SDPA baselines' backward is skipped at seqlen >= 8192 (minutes per call)."
    )
    if cpu:
        report.notes.append(
            f"CPU timings with {torch.get_num_threads()} threads, "
            + ("process CPU seconds / threads (--clock cpu)" if use_cpu_clock else "wall-clock medians")
            + "; on a shared machine they are noisy: compare within a row (all methods timed back to back)."
        )
    return report
