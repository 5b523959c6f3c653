"""Low-precision LayerNorm (MPT's LPLayerNorm) as torch ops over the compiled kernels.

``layer_norm(x, weight, bias=None, eps=1e-5, residual=None, out_dtype=None)`` normalises over the
last dim of ``x`` in x's dtype (float32, bfloat16; float16 too) with float32 statistics. With
``residual`` it returns ``(layer_norm(x + residual), x + residual)`` from one pass over memory, the sum
rounded to x's dtype.

Mixed precision (an autocast model: float32 weights and residual stream, bfloat16/float16 branches):
``residual`` may be float32 with a 16-bit ``x`` (the sum is then float32), and ``out_dtype`` may ask
for a 16-bit output of a float32 normalised input. The kernels read and write those dtypes directly,
so no float32 copy of the branch and no 16-bit copy of the output is made: the result is the float32
computation with its output rounded to ``out_dtype`` (bit for bit on the CPU; on CUDA the row sums may
run in another order, so last bits may differ), and the gradient of a 16-bit x is the float32
gradient rounded, written in the backward's own pass.

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
_LOW = (torch.bfloat16, torch.float16)


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
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, h, mean, rstd): y in out_dtype (None: x's dtype), h = x + residual in residual's
    dtype (empty when residual is None), mean and rstd float32 with x.shape[:-1]."""
    return _layer_norm_fwd_impl(x, weight, bias, residual, eps, out_dtype)


def _layer_norm_fwd_impl(x, weight, bias, residual, eps, out_dtype=None):
    """The forward's body: the custom op runs it, and ``layer_norm`` calls it directly where the op's
    dispatch has nothing to do (``_ext.direct_call_ok``)."""
    x2 = _rows(x)
    y = _alloc(x.shape, out_dtype or x.dtype, x.device)
    mean = _alloc(x.shape[:-1], torch.float32, x.device)
    rstd = _alloc(x.shape[:-1], torch.float32, x.device)
    if residual is not None:
        h = _alloc(x.shape, residual.dtype, x.device)
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


def _layer_norm_direct(x, weight, bias, residual, eps, out_dtype=None):
    """``layer_norm``'s direct (no-gradient) call: returns (y, h or None). No mean/rstd (nothing will
    read them) and, for contiguous inputs, no reshaped views: a decode step's LayerNorm is a few
    microseconds of kernel, so every tensor op around it counts."""
    if not x.is_contiguous() or (residual is not None and not residual.is_contiguous()):
        y, h, _, _ = _layer_norm_fwd_impl(x, weight, bias, residual, eps, out_dtype)
        return y, (h if residual is not None else None)
    y = _alloc(x.shape, out_dtype or x.dtype, x.device)
    h = _alloc(x.shape, residual.dtype, x.device) if residual is not None else None
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
def _layer_norm_fwd_fake(x, weight, bias, residual, eps, out_dtype=None):
    y = x.new_empty(x.shape, dtype=out_dtype or x.dtype)
    h = residual.new_empty(x.shape) if residual is not None else x.new_empty(0)
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
    want_dx: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dh, dweight, dbias, dx): dh is the gradient of x (and of residual when fused); dbias is
    empty when has_bias is False. h is the forward's normalised input (x, or x + residual). Mixed
    precision (float32 h, bfloat16/float16 dy): with want_dx, dx is dh rounded to dy's dtype (the
    gradient of a 16-bit x), else empty."""
    hidden = h.shape[-1]
    h2, dy2 = _rows(h), _rows(dy)
    dr2 = _rows(dresidual_out) if dresidual_out is not None else None
    rows = h2.shape[0]
    dh = _alloc(h.shape, h.dtype, h.device)
    dweight = _alloc(weight.shape, weight.dtype, weight.device)
    dbias = _alloc(weight.shape, weight.dtype, weight.device) if has_bias else weight.new_empty(0)
    want_dx = want_dx and dy.dtype != h.dtype
    dx = _alloc(h.shape, dy.dtype, h.device) if want_dx else h.new_empty(0)
    device = h.device.index if h.device.type == "cuda" else -1
    codes = _ext._torch_codes()
    numel = _C.layer_norm_bwd_workspace_numel(rows, hidden, codes[h.dtype], codes[weight.dtype], has_bias, device,
                                              codes[dy.dtype])
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
        _ext.view(dx.view(-1, hidden), "dx") if want_dx else None,
    )
    return dh, dweight, dbias, dx


@layer_norm_bwd.register_fake
def _layer_norm_bwd_fake(dy, dresidual_out, h, weight, mean, rstd, has_bias, want_dx=False):
    dbias = weight.new_empty(weight.shape) if has_bias else weight.new_empty(0)
    dx = dy.new_empty(h.shape) if want_dx and dy.dtype != h.dtype else h.new_empty(0)
    return h.new_empty(h.shape), weight.new_empty(weight.shape), dbias, dx


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, out_dtype = inputs
    y, h, mean, rstd = output
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.y_dtype = y.dtype
    # A 16-bit x added to a float32 residual: its gradient is dh rounded, written by the backward.
    ctx.split_dx = residual is not None and x.dtype != residual.dtype
    # An output nobody differentiates (the final norm's residual sum) arrives as None, not as a
    # tensor of zeros that would be written and then read back.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)


def _backward(ctx, dy, dh_out, dmean, drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros(h.shape, dtype=ctx.y_dtype, device=h.device)
    dres = dh_out if ctx.has_residual else None
    dh, dweight, dbias, dx = _ext.bwd_op(ctx, layer_norm_bwd)(dy, dres, h, weight, mean, rstd, ctx.has_bias,
                                                               ctx.split_dx)
    # The same gradient reaches x and residual: h = x + residual, rounding passes it through (a
    # 16-bit x gets it rounded to its dtype).
    return ((dx if ctx.split_dx else dh), dweight, (dbias if ctx.has_bias else None),
            (dh if ctx.has_residual else None), None, None)


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
# Plain eager training calls: the same body and formula without the custom op's dispatch.
_LayerNormEager = _ext.eager_function("_LayerNormEager", layer_norm_fwd, _setup_context, _backward)
# torch.func transforms: the custom op under a Function they accept.
_LayerNormFunc = _ext.transform_function("_LayerNormFunc", layer_norm_fwd, _setup_context, _backward)


# torch.func.vmap: batching rules (``_ext.register_vmap``): one kernel call for the whole batch. The
# forward is per row, so the vmapped dim folds into the rows. The backward's dweight and dbias are sums
# over rows, which must stay per sample: the folded call gives dh (and dx) of every row, and a second
# call, shaped (rows, samples x hidden) over the normalised input xhat (mean 0, rstd 1, weight 1),
# reduces each sample's columns apart. It sums every column over the same rows in the same order (the
# partial rows depend on the row count only, on the CPU) with the same float32 operations, so both
# give each sample's own result bit for bit, with one exception the rule checks: the CPU kernel's
# 8-wide vector body and its scalar tail round dy * xhat + partial differently (one fused multiply-add
# against two roundings), so with AVX2 and a hidden size not a multiple of 8 a sample's tail columns
# would land in the vector body of the wide call. There, and on CUDA where the wide call's partial count
# differs from a sample's, and for per-sample weights (vmapped weight or bias), the samples run one by one.
_AVX2 = "avx2" in _C.build_info().get("cpu_features", ())
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _fwd_vmap(n, in_dims, x, weight, bias, residual, eps, out_dtype=None):
    if in_dims[1] is not None or in_dims[2] is not None:
        return None  # per-sample weights
    xb = _ext.batch_first(x, in_dims[0], n)
    rb = None if residual is None else _ext.batch_first(residual, in_dims[3], n)
    y, h, mean, rstd = layer_norm_fwd(xb, weight, bias, rb, eps, out_dtype)
    return (y, h, mean, rstd), (0, 0 if residual is not None else None, 0, 0)


def _wide_reduction_exact(n, rows, hidden, has_bias, device, h_dtype, w_dtype, dy_dtype) -> bool:
    """Whether the (rows, n * hidden) weight-gradient call sums every column as a sample's own call does."""
    if n == 1 or rows == 0 or hidden == 0:
        return True
    if device.type == "cpu":
        return not _AVX2 or hidden % 8 == 0 or n * hidden < 8
    codes = _ext._torch_codes()
    per = 2 if has_bias else 1
    dev = device.index or 0
    one = _C.layer_norm_bwd_workspace_numel(rows, hidden, codes[h_dtype], codes[w_dtype], has_bias, dev,
                                            codes[dy_dtype]) // (hidden * per)
    f32 = codes[torch.float32]
    wide = _C.layer_norm_bwd_workspace_numel(rows, n * hidden, f32, f32, has_bias, dev, f32) // (n * hidden * per)
    return one == wide


def _bwd_vmap(n, in_dims, dy, dresidual_out, h, weight, mean, rstd, has_bias, want_dx=False):
    if in_dims[3] is not None:
        return None  # per-sample weights
    dyb, hb, meanb, rstdb = (_ext.batch_first(t, d, n) for t, d in
                             ((dy, in_dims[0]), (h, in_dims[2]), (mean, in_dims[4]), (rstd, in_dims[5])))
    drb = None if dresidual_out is None else _ext.batch_first(dresidual_out, in_dims[1], n)
    hidden = hb.shape[-1]
    rows = math.prod(hb.shape[1:-1])
    if not _wide_reduction_exact(n, rows, hidden, has_bias, h.device, h.dtype, weight.dtype, dy.dtype):
        return None
    # dh (and dx) of every row: one call over all samples' rows (its summed dweight is not used).
    dh, _, _, dx = layer_norm_bwd(dyb, drb, hb, weight, meanb, rstdb, False, want_dx)
    if n * rows * hidden == 0:  # nothing to sum: zeros, as the kernel writes them
        dweight = torch.zeros((n, hidden), dtype=weight.dtype, device=h.device)
        dbias = torch.zeros((n, hidden), dtype=weight.dtype, device=h.device) if has_bias else weight.new_empty(0)
    else:
        # Each sample's dweight, dbias: columns b * hidden + c of a (rows, n * hidden) call over
        # xhat = (h - mean) * rstd (the kernel's own float32 expression, in the same order) and dy in float32.
        h3 = hb.reshape(n, rows, hidden).transpose(0, 1)  # (rows, n, hidden) views
        dy3 = dyb.reshape(n, rows, hidden).transpose(0, 1)
        mean3, rstd3 = meanb.reshape(n, rows).t().unsqueeze(-1), rstdb.reshape(n, rows).t().unsqueeze(-1)
        if any(_wrapped(t) for t in (h3, dy3, mean3, rstd3)):  # nested transforms: no out= on their tensors
            xhat = ((h3 - mean3) * rstd3).reshape(rows, n * hidden)
            dyw = dy3.to(torch.float32).reshape(rows, n * hidden)
        else:  # written straight into the wide layout: two passes fewer
            xhat = torch.empty((rows, n, hidden), dtype=torch.float32, device=h.device)
            torch.sub(h3, mean3, out=xhat).mul_(rstd3)
            dyw = torch.empty((rows, n, hidden), dtype=torch.float32, device=h.device).copy_(dy3)
            xhat, dyw = xhat.view(rows, n * hidden), dyw.view(rows, n * hidden)
        ones = torch.ones(n * hidden, dtype=torch.float32, device=h.device)
        zero_mean = torch.zeros(rows, dtype=torch.float32, device=h.device)
        unit_rstd = torch.ones(rows, dtype=torch.float32, device=h.device)
        _, dw, db, _ = layer_norm_bwd(dyw, None, xhat, ones, zero_mean, unit_rstd, has_bias, False)
        dweight = dw.view(n, hidden).to(weight.dtype)  # the kernel's own rounding (nearest even) to weight's dtype
        dbias = db.view(n, hidden).to(weight.dtype) if has_bias else weight.new_empty(0)
    mixed_dx = want_dx and dy.dtype != h.dtype
    return (dh, dweight, dbias, dx), (0, 0, 0 if has_bias else None, 0 if mixed_dx else None)


_ext.register_vmap(layer_norm_fwd, _fwd_vmap)
_ext.register_vmap(layer_norm_bwd, _bwd_vmap)


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
        # (refused, not copied: tests/test_layernorm.py pins the refusal as the op's contract)
        raise ValueError(f"{name}: must be contiguous, got strides {t.stride()} (torch's layer_norm accepts a strided "
                         f"{name}; pass {name}.contiguous(), whose gradient reaches the original)")


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None, eps: float = 1e-5,
               residual: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None):
    """LayerNorm over the last dim of ``x`` with float32 statistics, output in x's dtype.

    ``weight`` and ``bias`` are (hidden,) in x's dtype or float32 (``weight=None``: no scale).
    With ``residual`` (same shape and dtype as x): returns ``(layer_norm(x + residual), x + residual)``,
    and gradients reach x and residual through both outputs. Raises ValueError naming the bad
    argument (dtype, shape, device, a strided weight or bias); a strided x or residual is copied.

    Mixed precision (an autocast model's float32 residual stream and weights): ``residual`` may be
    float32 with a bfloat16/float16 x (the sum is float32, the output in x's dtype), and
    ``out_dtype`` (bfloat16/float16) may be asked of a float32 normalised input (x, or x + residual);
    weight and bias must be float32 then. The float32 computation with its output rounded to
    ``out_dtype`` (bit for bit on the CPU; on CUDA the row sums' order may differ in the last bits).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x: expected a Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x: unsupported dtype {x.dtype} (expected one of float32, bfloat16, float16)")
    if x.dim() < 1:
        raise ValueError("x: must have at least one dimension (the normalised one)")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"x: unsupported device {x.device} (expected cpu or cuda)")
    _ext.refuse_forward_ad("layer_norm", x, weight, bias, residual)
    hidden = x.shape[-1]
    if hidden > 1 and x.stride(-1) != 1:  # the kernels read rows: copied, as alibi_attention and cross_entropy do
        x = x.contiguous()
    if hidden == 0 and math.prod(x.shape[:-1]) > 0:
        raise ValueError(f"x: the last (normalised) dimension must be non-empty, got shape {tuple(x.shape)}")
    if weight is None:
        mixed_hint = (isinstance(residual, Tensor) and residual.dtype != x.dtype) or out_dtype not in (None, x.dtype)
        weight = torch.ones(hidden, dtype=torch.float32 if mixed_hint else x.dtype, device=x.device)
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
        if residual.dtype != x.dtype and not (residual.dtype == torch.float32 and x.dtype in _LOW):
            raise ValueError(f"residual: dtype {residual.dtype} does not match x dtype {x.dtype} (the one mixed "
                             "pair is a float32 residual with a bfloat16/float16 x)")
        if hidden > 1 and residual.stride(-1) != 1:
            residual = residual.contiguous()
    h_dtype = residual.dtype if residual is not None else x.dtype
    if out_dtype == x.dtype:
        out_dtype = None
    if out_dtype is not None:
        if out_dtype not in _LOW or h_dtype != torch.float32:
            raise ValueError(f"out_dtype: {out_dtype} with x {x.dtype}"
                             + (f" and residual {residual.dtype}" if residual is not None else "")
                             + ": a different output dtype is bfloat16/float16 from a float32 x + residual (or x)")
        if x.dtype != torch.float32:  # (out_dtype == x.dtype was folded to None above)
            raise ValueError(f"out_dtype: {out_dtype} differs from x's {x.dtype}: a 16-bit x gives its own dtype")
    mixed = h_dtype != x.dtype or out_dtype is not None
    if mixed:
        for t, name in ((weight, "weight"), (bias, "bias")):
            if t is not None and t.dtype != torch.float32:
                raise ValueError(f"{name}: must be float32 in mixed precision (float32 residual or out_dtype), "
                                 f"got {t.dtype}")
    how = _ext.route(x, weight, bias, residual)
    if how == "direct":  # inference: skip the custom op's dispatch
        y, h = _layer_norm_direct(x, weight, bias, residual, float(eps), out_dtype)
    else:  # eager training skips the dispatch too
        op = _ext.autograd_call(how, _LayerNormEager, _LayerNormFunc, layer_norm_fwd)
        y, h, _, _ = op(x, weight, bias, residual, float(eps), out_dtype)
    return (y, h) if residual is not None else y
