"""Shared benchmark machinery: timing, the machine's measured limits, and report output.

Every benchmark row carries its baseline timed in the same run, the ratio, and the fraction of a
limit measured in the same run (copy bandwidth for memory-bound ops, matmul FLOP/s for compute-bound
ones; on the CPU the fastest of repeated calls, as other jobs on a shared machine slow the rest). Reports go out as JSON (benchmarks/results/<name>_<device>.json), a Markdown table on stdout,
and a PNG plot when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch


@dataclasses.dataclass
class Context:
    name: str
    device: str
    quick: bool = False
    out_dir: Path = Path("benchmarks/results")
    plot: bool = True
    args: Any = None

    def __post_init__(self):
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
        if self.device == "cuda":
            import mpt_kernels as mk

            if not mk.cuda_available():
                raise SystemExit("--device cuda asked for, but mpt_kernels cannot run CUDA kernels here (built "
                                 f"with CUDA: {mk.build_info().get('cuda')}; rebuild with MPT_KERNELS_CUDA=1)")


# ---- argument types: a bad value is an argparse error before anything is measured -------------------
def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def comma_list(choices=None):
    """argparse type of a comma-separated list: positive integers, or names among ``choices``. The
    value stays a string (the items validated, spaces dropped), as the benchmarks split it."""

    def parse(text: str) -> str:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("an empty list")
        for t in items:
            if choices is None:
                positive_int(t)
            elif t not in choices:
                raise argparse.ArgumentTypeError(f"{t!r} is not one of: {', '.join(choices)}")
        return ",".join(items)

    return parse


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str, *, warmup: int = 3, iters: int = 10, min_time: float = 0.0,
            best: bool = False) -> float:
    """Median wall time of ``fn()`` in seconds (``best``: the fastest call instead). CUDA: events
    around each call on the current stream. ``min_time``: keep repeating (beyond ``iters``) until
    this many seconds have been measured."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    total = 0.0
    while len(times) < iters or total < min_time:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        times.append(t)
        total += t
        if len(times) > 10000:
            break
    return min(times) if best else statistics.median(times)


def copy_bandwidth(device: str, nbytes: int | None = None) -> float:
    """Measured device-memory copy bandwidth in GB/s (bytes read + bytes written per second), on a
    buffer far larger than the last-level cache (CPU: the faster of torch copy_ and memcpy).

    CPU: the fastest of the calls, not their median. A limit is what the machine can do; on a shared
    CPU other jobs slow most calls down, and a roof read low makes every fraction of it read high."""
    if nbytes is None:
        nbytes = (1 << 30) if device == "cuda" else (512 << 20)
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    best = device == "cpu"
    t = time_fn(lambda: dst.copy_(src), device, warmup=2, iters=10, best=best)
    if device == "cpu":
        # torch's CPU copy_ stays well under the memory roof on some hosts, where glibc's memcpy
        # (numpy's copyto) gets much closer: the roof is the faster of the two, both measured here.
        import numpy as np

        a, b = src.numpy(), dst.numpy()
        t = min(t, time_fn(lambda: np.copyto(b, a), device, warmup=2, iters=10, best=best))
    del src, dst
    gc.collect()
    return 2 * nbytes / t / 1e9


def matmul_flops(device: str, dtype: torch.dtype = torch.bfloat16, n: int | None = None) -> float:
    """Measured dense matmul throughput in TFLOP/s for ``dtype`` (the compute roof for this run).

    CPU: the fastest of at least 10 calls over at least a second (see copy_bandwidth: with the
    median of 5, a roof read while another job ran put model rows at 1.4-2.8x "of the roof")."""
    if n is None:
        n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if device == "cpu":
        t = time_fn(lambda: a @ b, device, warmup=2, iters=10, min_time=1.0, best=True)
    else:
        t = time_fn(lambda: a @ b, device, warmup=2, iters=5)
    return 2 * n ** 3 / t / 1e12


def peak_memory_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes(device: str) -> int | None:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return None


def machine_info(device: str) -> dict:
    import mpt_kernels as mk

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mpt_kernels": mk.build_info(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@dataclasses.dataclass
class Report:
    """Rows of results plus the limits measured in the same run."""

    title: str
    columns: list[str]
    rows: list[dict] = dataclasses.field(default_factory=list)
    limits: dict = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    plot: Callable[["Report", Path], None] | None = None  # draws the PNG; optional

    def add(self, **row) -> None:
        self.rows.append(row)
        # One line per row as it is measured: a run killed before emit() (a GPU session's deadline)
        # still leaves its rows in the log.
        print("[row] " + json.dumps({k: (v if not isinstance(v, float) or v == v else None) for k, v in row.items()},
                                    default=str), flush=True)

    def markdown(self) -> str:
        def fmt(v):
            if isinstance(v, float):
                if v != v:
                    return "n/a"
                return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
            return "" if v is None else str(v)

        lines = [f"### {self.title}", ""]
        if self.limits:
            lines.append("Measured limits: " + ", ".join(f"{k} = {fmt(v)}" for k, v in self.limits.items()))
            lines.append("")
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        for r in self.rows:
            lines.append("| " + " | ".join(fmt(r.get(c)) for c in self.columns) + " |")
        for n in self.notes:
            lines += ["", n]
        return "\n".join(lines)

    def emit(self, ctx: Context) -> dict:
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        stem = ctx.out_dir / f"{ctx.name}_{ctx.device}{'_quick' if ctx.quick else ''}"
        payload = {
            "title": self.title,
            "benchmark": ctx.name,
            "device": ctx.device,
            "quick": ctx.quick,
            "machine": machine_info(ctx.device),
            "limits": self.limits,
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
        }
        # strict JSON: a value not measured (NaN: a skipped baseline) is null, inf is a string
        stem.with_suffix(".json").write_text(json.dumps(_strict_json(payload), indent=2, default=str, allow_nan=False))
        md = self.markdown()
        stem.with_suffix(".md").write_text(md + "\n")
        print(md, flush=True)
        if ctx.plot and self.plot is not None:
            try:
                import matplotlib

                matplotlib.use("Agg")
                self.plot(self, stem.with_suffix(".png"))
                print(f"\nplot: {stem.with_suffix('.png')}")
            except ImportError:
                print("\n(matplotlib not installed: no plot; pip install matplotlib)")
        print(f"json: {stem.with_suffix('.json')}")
        return payload


def bar_plot(x_key: str, y_keys: list[str], ylabel: str, group_key: str | None = None):
    """A simple grouped bar plot factory for Report.plot: one bar per y_key for each row."""

    def draw(report: Report, path: Path) -> None:
        import matplotlib.pyplot as plt

        labels = [str(r.get(x_key)) + (f"\n{r.get(group_key)}" if group_key else "") for r in report.rows]
        n = len(y_keys)
        width = 0.8 / max(n, 1)
        fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.2), 4))
        for i, k in enumerate(y_keys):
            vals = [float(r.get(k) or 0.0) for r in report.rows]
            ax.bar([j + i * width for j in range(len(labels))], vals, width, label=k)
        ax.set_xticks([j + width * (n - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(report.title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    return draw


def _strict_json(x):
    if isinstance(x, float):
        return None if x != x else (str(x) if x in (float("inf"), float("-inf")) else x)
    if isinstance(x, dict):
        return {k: _strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict_json(v) for v in x]
    return x
