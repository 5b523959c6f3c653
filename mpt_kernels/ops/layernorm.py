"""Low-precision LayerNorm (MPT's LPLayerNorm) as torch ops over the compiled kernels.

``layer_norm(x, weight, bias=None, eps=1e-5, residual=None)`` normalises over the last dim of ``x``
in x's dtype (float32, bfloat16; float16 too) with float32 statistics. With ``residual`` it returns
``(layer_norm(x + residual), x + residual)`` from one pass over memory, the sum rounded to x's dtype.

Two ``torch.library.custom_op``s carry the work, ``mpt_kernels::layer_norm_fwd`` and
``mpt_kernels::layer_norm_bwd``, each with a fake (meta) implementation, and the forward has a
registered autograd formula, so ``torch.compile(fullgraph=True)`` traces callers without breaks.

Layout: only the last dim must be contiguous. Rows one stride apart (e.g. ``x[:, :n]`` of a wider
buffer, or a slice along the batch) are read in place; leading dims that cannot be addressed with
one row stride are copied by ``reshape`` first. Outputs are new contiguous tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from .._ext import _C

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _alloc(shape, dtype, device) -> Tensor:
    """Every output and workspace of the ops is allocated here (tests swap it for a NaN-filled
    allocator to prove the kernels write every element). Large CPU outputs come from the host
    caching pool (``_ext.empty``): reused blocks are not faulted in again on every call."""
    return _ext.empty(shape, dtype, device)


def _rows(t: Tensor) -> Tensor:
    """t as (rows, hidden) with a contiguous last dim; a view when the rows share one stride."""
    if t.dim() == 0:
        t = t.reshape(1)
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


@torch.library.custom_op("mpt_kernels::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, h, mean, rstd): h = x + residual (empty when residual is None), mean and rstd
    float32 with x.shape[:-1]."""
    return _layer_norm_fwd_impl(x, weight, bias, residual, eps)


def _layer_norm_fwd_impl(x, weight, bias, residual, eps):
    """The forward's body: the custom op runs it, and ``layer_norm`` calls it directly where the op's
    dispatch has nothing to do (``_ext.direct_call_ok``)."""
    x2 = _rows(x)
    y = _alloc(x.shape, x.dtype, x.device)
    mean = _alloc(x.shape[:-1], torch.float32, x.device)
    rstd = _alloc(x.shape[:-1], torch.float32, x.device)
    if residual is not None:
        h = _alloc(x.shape, x.dtype, x.device)
        r2 = _rows(residual)
        h2 = h.view(-1, x.shape[-1])
    else:
        h = x.new_empty(0)
        r2 = h2 = None
    _C.layer_norm_fwd(
        _ext.view(x2, "x"),
        _ext.view(weight, "weight"),
        _ext.optional_view(bias, "bias"),
        _ext.optional_view(r2, "residual"),
        _ext.view(y.view(-1, x.shape[-1]), "y"),
        _ext.optional_view(h2, "residual_out"),
        _ext.view(mean.view(-1), "mean"),
        _ext.view(rstd.view(-1), "rstd"),
        float(eps),
        _ext.current_stream(x),
    )
    return y, h, mean, rstd


def _layer_norm_direct(x, weight, bias, residual, eps):
    """``layer_norm``'s direct (no-gradient) call: returns (y, h or None). No mean/rstd (nothing will
    read them) and, for contiguous inputs, no reshaped views: a decode step's LayerNorm is a few
    microseconds of kernel, so every tensor op around it counts."""
    if not x.is_contiguous() or (residual is not None and not residual.is_contiguous()):
        y, h, _, _ = _layer_norm_fwd_impl(x, weight, bias, residual, eps)
        return y, (h if residual is not None else None)
    y = _alloc(x.shape, x.dtype, x.device)
    h = _alloc(x.shape, x.dtype, x.device) if residual is not None else None
    _C.layer_norm_fwd(
        _ext.view(x, "x"),
        _ext.view(weight, "weight"),
        _ext.optional_view(bias, "bias"),
        _ext.optional_view(residual, "residual"),
        _ext.view(y, "y"),
        _ext.optional_view(h, "residual_out"),
        None,
        None,
        eps,
        _ext.current_stream(x),
    )
    return y, h


@layer_norm_fwd.register_fake
def _layer_norm_fwd_fake(x, weight, bias, residual, eps):
    y = x.new_empty(x.shape)
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32)
    rstd = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return y, h, mean, rstd


@torch.library.custom_op("mpt_kernels::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: Tensor,
    dresidual_out: Optional[Tensor],
    h: Tensor,
    weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
    has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dh, dweight, dbias): dh is the gradient of x (and of residual when fused); dbias is
    empty when has_bias is False. h is the forward's normalised input (x, or x + residual)."""
    hidden = h.shape[-1]
    h2, dy2 = _rows(h), _rows(dy)
    dr2 = _rows(dresidual_out) if dresidual_out is not None else None
    rows = h2.shape[0]
    dh = _alloc(h.shape, h.dtype, h.device)
    dweight = _alloc(weight.shape, weight.dtype, weight.device)
    dbias = _alloc(weight.shape, weight.dtype, weight.device) if has_bias else weight.new_empty(0)
    device = h.device.index if h.device.type == "cuda" else -1
    codes = _ext._torch_codes()
    numel = _C.layer_norm_bwd_workspace_numel(rows, hidden, codes[h.dtype], codes[weight.dtype], has_bias, device)
    workspace = _alloc((numel,), torch.float32, h.device)
    # Named, so a reshape that has to copy (a non-contiguous mean from a direct caller) stays alive
    # through the call: the core gets raw pointers only.
    mean1, rstd1 = mean.reshape(-1), rstd.reshape(-1)
    _C.layer_norm_bwd(
        _ext.view(dy2, "dy"),
        _ext.optional_view(dr2, "dresidual_out"),
        _ext.view(h2, "h"),
        _ext.view(weight, "weight"),
        _ext.view(mean1, "mean"),
        _ext.view(rstd1, "rstd"),
        _ext.view(dh.view(-1, hidden), "dh"),
        _ext.view(dweight, "dweight"),
        _ext.view(dbias, "dbias") if has_bias else None,
        _ext.view(workspace, "workspace"),
        _ext.current_stream(h),
    )
    return dh, dweight, dbias


@layer_norm_bwd.register_fake
def _layer_norm_bwd_fake(dy, dresidual_out, h, weight, mean, rstd, has_bias):
    dbias = weight.new_empty(weight.shape) if has_bias else weight.new_empty(0)
    return h.new_empty(h.shape), weight.new_empty(weight.shape), dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    y, h, mean, rstd = output
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)


def _backward(ctx, dy, dh_out, dmean, drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    dres = dh_out if ctx.has_residual else None
    dh, dweight, dbias = layer_norm_bwd(dy, dres, h, weight, mean, rstd, ctx.has_bias)
    # The same gradient reaches x and residual: h = x + residual, rounding passes it through.
    return dh, dweight, (dbias if ctx.has_bias else None), (dh if ctx.has_residual else None), None


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_param(t, name: str, x: Tensor, hidden: int) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name}: is on {t.device} but x is on {x.device}; all tensors must be on the same device")
    if t.shape != (hidden,):
        raise ValueError(f"{name}: expected shape ({hidden},) (the last dim of x), got {tuple(t.shape)}")
    if t.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"{name}: dtype must be float32 or x's dtype {x.dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None, eps: float = 1e-5,
               residual: Optional[Tensor] = None):
    """LayerNorm over the last dim of ``x`` with float32 statistics, output in x's dtype.

    ``weight`` and ``bias`` are (hidden,) in x's dtype or float32 (``weight=None``: no scale).
    With ``residual`` (same shape and dtype as x): returns ``(layer_norm(x + residual), x + residual)``,
    and gradients reach x and residual through both outputs. Raises ValueError naming the bad
    argument (dtype, shape, device, non-contiguous last dim).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x: expected a Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x: unsupported dtype {x.dtype} (expected one of float32, bfloat16, float16)")
    if x.dim() < 1:
        raise ValueError("x: must have at least one dimension (the normalised one)")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"x: unsupported device {x.device} (expected cpu or cuda)")
    hidden = x.shape[-1]
    if hidden > 1 and x.stride(-1) != 1:
        raise ValueError(f"x: last dimension must be contiguous (stride 1), got stride {x.stride(-1)}")
    if hidden == 0 and math.prod(x.shape[:-1]) > 0:
        raise ValueError(f"x: the last (normalised) dimension must be non-empty, got shape {tuple(x.shape)}")
    if weight is None:
        weight = torch.ones(hidden, dtype=x.dtype, device=x.device)
    _check_param(weight, "weight", x, hidden)
    if bias is not None:
        _check_param(bias, "bias", x, hidden)
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias: dtype {bias.dtype} does not match weight dtype {weight.dtype}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise ValueError(f"residual: expected a Tensor, got {type(residual).__name__}")
        if residual.device != x.device:
            raise ValueError(f"residual: is on {residual.device} but x is on {x.device}")
        if residual.shape != x.shape:
            raise ValueError(f"residual: shape {tuple(residual.shape)} does not match x shape {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual: dtype {residual.dtype} does not match x dtype {x.dtype}")
        if hidden > 1 and residual.stride(-1) != 1:
            raise ValueError(f"residual: last dimension must be contiguous (stride 1), got stride {residual.stride(-1)}")
    if _ext.direct_call_ok(x, weight, bias, residual):  # inference: skip the custom op's dispatch
        y, h = _layer_norm_direct(x, weight, bias, residual, float(eps))
    else:
        y, h, _, _ = layer_norm_fwd(x, weight, bias, residual, float(eps))
    return (y, h) if residual is not None else y
