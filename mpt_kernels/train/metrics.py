"""Throughput and model FLOPs utilisation (MFU), the metrics log and the loss-curve plot.

MFU follows llm-foundry: achieved model FLOP/s over the hardware's peak, where the model's FLOPs
per token are ``3 * (2 * n_params + 4 * n_layers * d_model * seq_len)`` (forward and backward,
attention included, activation recomputation not counted: ``MPTForCausalLM.flops_per_token``).
The GPU peak comes from a table of dense tensor-core rates (no sparsity); the CPU has no datasheet
number we could trust, so its peak is a matmul in the dtype its GEMMs run in, measured at start-up
(and again at each evaluation by the trainer, which keeps the best).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core TFLOP/s (datasheet, without 2:4 sparsity), matched by substring of
# torch.cuda.get_device_name(); most specific first. fp32 training runs on TF32 at half the rate.
GPU_PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),     # SXM / HBM3
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),     # fp16 (no bf16 on Volta)
    ("T4", 65.0),        # fp16
]


def gpu_peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s for a known GPU (None when the card is not in the table)."""
    for key, tflops in GPU_PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12 * (1.0 if precision == "bf16" else 0.5)
    return None


def measure_cpu_peak_flops(dtype: torch.dtype = torch.float32, n: int = 768, seconds: float = 0.5) -> float:
    """Best dense matmul rate (FLOP/s) over ~``seconds``: the best of many, because the machine may
    be shared and the best run is the closest to what the cores can do."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=c)
    best = math.inf
    t_end = time.perf_counter() + seconds
    runs = 0
    while runs < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return 2.0 * n ** 3 / best


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); elsewhere bf16 is
    emulated and runs many times slower than fp32, so "auto" precision picks fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def peak_flops(device: torch.device, precision: str, seconds: float = 0.5) -> tuple[float, str]:
    """(peak FLOP/s, where the number came from) for one device of this run; ``seconds``: how long a
    CPU measurement runs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, precision)
        if peak is not None:
            return peak, f"{name} datasheet ({precision})"
        # Unknown card: measure, like the CPU (underestimates the peak a little, overestimates MFU).
        n = 4096
        dt = torch.bfloat16 if precision == "bf16" else torch.float32
        a = torch.randn(n, n, device=device, dtype=dt)
        for _ in range(3):
            a @ a
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize(device)
        return 2 * n ** 3 * 10 / (time.perf_counter() - t0), f"{name} measured matmul ({precision})"
    dt = cpu_gemm_dtype(precision)
    name = "bf16" if dt == torch.bfloat16 else "fp32"
    return measure_cpu_peak_flops(dt, seconds=seconds), f"CPU measured {name} matmul ({precision}, {torch.get_num_threads()} threads)"


def cpu_gemm_dtype(precision: str) -> torch.dtype:
    """The dtype the model's CPU GEMMs run in: bf16 training on a CPU without bf16 dot products runs
    its Linear layers as float32 GEMMs (``mpt_kernels.model.modeling``), so its peak is float32's."""
    if precision != "bf16":
        return torch.float32
    from mpt_kernels.model import modeling

    return torch.float32 if modeling._FP32_GEMM_ON_CPU else torch.bfloat16


def mfu(flops_per_token: float, tokens_per_second: float, peak: float, world_size: int = 1) -> float:
    return flops_per_token * tokens_per_second / (peak * world_size)


class MetricsLog:
    """Append-only JSONL of dicts (one per event). After a resume the file keeps the earlier lines;
    readers take the last record of each step (:func:`read_metrics`)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record.setdefault("time", time.time())
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike, kind: str = "train") -> list[dict]:
    """Records of ``kind``, one per step (the last one written wins), sorted by step."""
    by_step: dict[int, dict] = {}
    p = Path(path)
    if not p.is_file():
        return []
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if rec.get("kind") == kind and "step" in rec:
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(metrics_path: str | os.PathLike, out_png: str | os.PathLike, title: str = "") -> bool:
    """Train loss per step and held-out loss per evaluation; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = read_metrics(metrics_path, "train")
    evals = read_metrics(metrics_path, "eval")
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(str(out_png) + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return True
