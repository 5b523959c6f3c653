"""``few_rows_linear(x, weight, bias=None)``: ``F.linear`` for at most 8 rows of ``x`` on the CPU, the
product of a decode step (one row per sequence), over the compiled kernel (csrc/linear/linear.h).

At a few rows the product is a read of the weight and nothing else. The kernel reads it once for all
the rows, in order, with float32 sums: in bfloat16 here ~1.5x the bandwidth torch's CPU GEMM reaches,
and at 4 rows ~2.5x less time than torch, whose cost grows with the rows. Inference only: no autograd
(the model calls it only where nothing records a gradient), host tensors only (on CUDA cuBLAS's GEMV
is already bandwidth-bound).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from .._ext import _C, view

MAX_ROWS = 8
# Rows up to which a no-grad product is still faster as passes of 8 rows over W (``rows_linear``) than
# as the model's other CPU paths: for 16-bit dtypes the float32 GEMM on a converted copy of W, for
# float32 torch's GEMM. Measured here (2 threads) at 3072x768 and 4096x4096: float16 24 rows 1.4-2.0x,
# 32 rows 1.1-2.2x, 40 rows 0.9-1.3x; float32 16 rows 1.2x, 32 rows 0.75-1.0x.
CHUNKED_MAX_ROWS = {torch.float32: 16, torch.bfloat16: 24, torch.float16: 24}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_AVX2 = "avx2" in _C.build_info().get("cpu_features", ())


def _alloc(shape, dtype, device) -> Tensor:
    """The output is allocated here (tests swap it for a NaN-filled allocator)."""
    return _ext.empty(shape, dtype, device)


def supported(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, max_rows: int = MAX_ROWS) -> bool:
    """Whether the model should call ``few_rows_linear`` (``rows_linear`` with ``max_rows`` above 8)
    here: host tensors of one dtype (float32, bfloat16, float16), at most ``max_rows`` rows, a weight
    whose rows are contiguous (no copy of it), in an AVX2 build (the portable scalar loop is slower
    than torch). Cheap checks first: it runs on every Linear call of a decode step."""
    if not _AVX2 or x.dtype not in _DTYPES or weight.dtype != x.dtype or not (x.is_cpu and weight.is_cpu):
        return False
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or math.prod(x.shape[:-1]) > max_rows:
        return False
    if weight.stride(-1) != 1 or (weight.stride(0) < weight.shape[1] and weight.shape[0] > 1):
        return False
    return bias is None or (bias.dtype == x.dtype and bias.is_cpu)


def few_rows_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight.T + bias`` with x (..., in) holding at most 8 rows, weight (out, in), bias (out,)
    or None, all one dtype on the CPU. Raises ValueError otherwise (the kernel's argument checks).
    Strided inputs are fine (a copy is made where the last dimension is not contiguous)."""
    return _passes(x, weight, bias, MAX_ROWS)


def rows_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``few_rows_linear`` for any number of rows: one pass over W per 8 rows, into one output. Each
    output row is what ``few_rows_linear`` gives for it in its pass. For a few passes (batched decode
    past 8 rows, a short prompt) this beats converting W for a GEMM: see ``CHUNKED_MAX_ROWS``."""
    return _passes(x, weight, bias, None)


def _passes(x: Tensor, weight: Tensor, bias: Optional[Tensor], max_rows: Optional[int]) -> Tensor:
    """The kernel over x's rows, 8 per call, after the argument checks (at most ``max_rows`` rows)."""
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"few_rows_linear: x must have at least one dimension and weight two, got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"few_rows_linear: x's last dimension {x.shape[-1]} does not match weight's in_features "
                         f"{weight.shape[1]}")
    x2 = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    rows = x2.shape[0]
    if max_rows is not None and rows > max_rows:
        raise ValueError(f"few_rows_linear: at most {max_rows} rows, got {rows}")
    # named, not temporaries: the kernel gets raw pointers
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    y = _alloc((rows, weight.shape[0]), x.dtype, x.device)
    w_view, b_view = view(weight, "weight"), (None if bias is None else view(bias, "bias"))
    if rows <= MAX_ROWS:  # the per-token path: no slicing
        _C.few_rows_linear(view(x2, "x"), w_view, b_view, view(y, "y"))
    else:
        for i in range(0, rows, MAX_ROWS):
            _C.few_rows_linear(view(x2[i:i + MAX_ROWS], "x"), w_view, b_view, view(y[i:i + MAX_ROWS], "y"))
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])
