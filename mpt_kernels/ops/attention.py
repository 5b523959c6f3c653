"""ALiBi flash attention as torch ops over the compiled kernels (csrc/attention/).

    out = alibi_attention(q, k, v)                    # causal, MPT's slopes
    q: (batch, seqlen_q, n_heads, head_dim); k, v: (batch, seqlen_k, n_kv_heads, head_dim)
    varlen: q (total_q, n_heads, head_dim), k/v (total_k, n_kv_heads, head_dim), int32 cu_seqlens_q/k

The bias added to score (i, j) is ``-slope * (seqlen_k - 1 - j)`` (MPT's key-position form), computed
inside the kernel from the slope: nothing of size seqlen^2 is ever allocated. Only the head_dim axis
must be contiguous, so q, k, v can be views into a fused Wqkv projection without a copy.

Devices and dtypes: CPU float32, bfloat16 and float16 (computed in float32); CUDA float16 and bfloat16
with the head dims the CUDA build supports (``_C.attention_cuda_supports_head_dim``).

Layers: ``mpt_kernels::alibi_attention_fwd`` / ``_bwd`` are torch.library custom ops with fake
(meta) implementations and autograd, so ``torch.compile(fullgraph=True)`` traces them; the forward
saves only out and the float32 logsumexp for the backward.

Symbolic shapes. ``max_seqlen_q`` / ``max_seqlen_k`` (varlen) and ``seqlen_q`` / ``seqlen_k`` (batched)
reach the custom op as they come, never through ``int()``: under tracing that runs this Python with
symbolic ints (``torch.export(strict=False)``, ``make_fx(tracing_mode="symbolic")``), ``int(s)`` of a
SymInt installs a guard that pins it to the traced value. (Dynamo itself treats ``int()`` of a SymInt
as a no-op, so ``torch.compile(dynamic=True)`` never recompiled for a new max_seqlen; the export path
did specialise.) A max_seqlen given as a one-element tensor is read with ``.item()``: a host sync in
eager mode on CUDA, an unbacked SymInt under tracing. When max_seqlen_* are not given they are read
from cu_seqlens the same way. That read cannot be avoided on the host: the launch grid and the
workspace size depend on the value, and the only sync-free bound (the total token count) would
size both by batch x total instead of batch x max. Pass them when the caller knows them.

Device cu_seqlens are still validated against max_seqlen_* with one small copy to the host per call
(skipped while a CUDA graph is captured); without it, offsets beyond max_seqlen would be clamped by
the kernel into a silently wrong answer.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

import torch

from .._ext import (LastResult, _C, autograd_call, bwd_op, current_stream, eager_function, refuse_forward_ad,
                    register_vmap, route, transform_function, view)
from .._ext import batch_first as _ext_batch_first
from .._ext import sample_shape as _ext_sample_shape
from .._ext import empty as _empty
from . import reference as _reference
from .reference import alibi_slopes  # noqa: F401  (public: mk.alibi_slopes)


def _opt_view(t, name):
    return None if t is None else view(t, name)


def _kernel_operand(t: torch.Tensor, cuda_layout: bool) -> torch.Tensor:
    """``t`` as the kernels take it: the head_dim axis contiguous and, for the CUDA kernels (16-bit
    dtypes, 16-byte loads), a start 16-byte aligned and every other stride a multiple of 8 elements.
    Anything else is copied into a fresh tensor (differentiably): a transposed head_dim, a view at an
    odd offset into a larger buffer. Views of a fused QKV projection with head_dim % 8 == 0 pass as
    they are. (A clone, not ``torch.empty(...).copy_(t)``: under ``torch.func.vmap`` an unbatched
    empty tensor cannot take a batched copy, e.g. a vmap over a dim after head_dim.)"""
    if t.stride(-1) == 1 and not (cuda_layout and (t.storage_offset() % 8 != 0
                                                   or any(st % 8 != 0 for st in t.stride()[:-1]))):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _workspace(nbytes: int, device) -> Optional[torch.Tensor]:
    # The kernels' scratch (split-K partials, backward row statistics): zero-filled, as the launchers
    # expect, and owned by torch's allocator so no allocation happens inside a kernel.
    return torch.zeros(nbytes, dtype=torch.uint8, device=device) if nbytes > 0 else None


def _check_device_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, rows_q, rows_k):
    """The compiled core checks host cu_seqlens itself; device ones are checked here (one small copy
    to the host), except while a CUDA graph is being captured, where a sync is not allowed (offsets
    outside q's or k's rows then read and write out of bounds: capture only checked offsets)."""
    if cu_seqlens_q.device.type != "cuda":
        return
    # Capturing or not is a property of the offsets' device's current stream, which need not be the
    # current device's (a graph captured on cuda:1 while cuda:0 is current).
    with torch.cuda.device(cu_seqlens_q.device):
        if torch.cuda.is_current_stream_capturing():
            return
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_k.dtype != torch.int32:
        return  # the binding names the argument
    if cu_seqlens_q.dim() != 1 or cu_seqlens_k.dim() != 1 or cu_seqlens_q.numel() == 0 or cu_seqlens_k.numel() == 0:
        return  # the binding names the problem
    _check_cu_seqlens_once(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, rows_q, rows_k)


def _check_cu_seqlens_once(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, rows_q, rows_k):
    """A model passes the same offsets to every layer (and again in an activation-checkpoint
    recompute): read them back and check them once (``_ext.LastResult``: the same tensor objects,
    unmodified, with the same arguments)."""
    _CHECKED_CU((cu_seqlens_q, cu_seqlens_k), (max_seqlen_q, max_seqlen_k, causal, rows_q, rows_k),
                lambda: _check_cu_seqlens_values(*_host_pair(cu_seqlens_q, cu_seqlens_k), max_seqlen_q, max_seqlen_k,
                                                 causal, rows_q, rows_k))


def _host_pair(cu_q, cu_k):
    """Host copies of the offsets: one copy (one sync) when q and k share them, as a model's do."""
    cq = cu_q.cpu()
    return cq, (cq if cu_k is cu_q else cu_k.cpu())


_CHECKED_CU = LastResult()  # the last device cu_seqlens pair that passed _check_device_cu_seqlens


def _check_cu_seqlens_values(cq, ck, max_seqlen_q, max_seqlen_k, causal, rows_q, rows_k):
    """The offsets' values (host copies): the checks the compiled core makes on host cu_seqlens."""
    for name, cu, rows, what in (("cu_seqlens_q", cq, rows_q, "q"), ("cu_seqlens_k", ck, rows_k, "k")):
        if int(cu[0]) < 0:
            raise ValueError(f"{name}: must start at a non-negative offset, got {int(cu[0])}")
        if int(cu.max()) > rows:
            raise ValueError(f"{name}: last offset {int(cu.max())} exceeds {what}'s {rows} rows")
    lq = torch.diff(cq)
    lk = torch.diff(ck)
    if (lq < 0).any():
        raise ValueError("cu_seqlens_q: must be non-decreasing")
    if (lk < 0).any():
        raise ValueError("cu_seqlens_k: must be non-decreasing")
    if lq.numel() and int(lq.max()) > max_seqlen_q:
        raise ValueError(f"max_seqlen_q: is {max_seqlen_q} but a sequence has {int(lq.max())} queries")
    if lk.numel() and int(lk.max()) > max_seqlen_k:
        raise ValueError(f"max_seqlen_k: is {max_seqlen_k} but a sequence has {int(lk.max())} keys")
    if causal and lq.numel() == lk.numel() and (lq > lk).any():
        raise ValueError("cu_seqlens_q: a sequence has seqlen_q > seqlen_k, not allowed with causal=True")


def _scale_arg(softmax_scale):
    """softmax_scale as a float (a SymFloat stays symbolic): ValueError naming it for a non-number."""
    if isinstance(softmax_scale, torch.SymFloat):
        return softmax_scale
    if not isinstance(softmax_scale, (str, bytes, bool)):
        try:
            return float(softmax_scale)  # numbers, numpy scalars, one-element tensors
        except (TypeError, ValueError, RuntimeError):
            pass
    raise ValueError(f"softmax_scale: expected a number or None (default 1 / sqrt(head_dim)), got {softmax_scale!r}")


def _heads_arg(n, name):
    if isinstance(n, bool) or not isinstance(n, (numbers.Integral, torch.SymInt)):
        raise ValueError(f"{name}: expected an int, got {n!r}")
    return n


def _length_arg(x, name):
    """An int-like max_seqlen for the custom op, passed through unchanged when symbolic (see the module
    docstring) and rejected with a ValueError when it is not an integer (int(7.9) would truncate)."""
    # Plain and symbolic ints go through untouched (Dynamo presents a SymInt as an int here, and
    # operator.index() on it would install the guard this function exists to avoid).
    if isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool):
        return x
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name}: expected an int or a one-element integer tensor, got a {x.dtype} tensor "
                             f"of shape {tuple(x.shape)}")
        return x.item()
    if isinstance(x, bool):
        raise ValueError(f"{name}: expected an int, got bool")
    try:  # numpy integers and other __index__ types
        return operator.index(x)
    except TypeError:
        raise ValueError(f"{name}: expected an int, got {type(x).__name__}") from None


def _max_length(cu_seqlens: torch.Tensor):
    # .item(), not int(): under tracing it becomes an unbacked SymInt instead of a guard on the value.
    return torch.diff(cu_seqlens).max().item() if cu_seqlens.numel() > 1 else 0


def _lse_shape(q: torch.Tensor, varlen: bool):
    if varlen:  # (n_heads, total_q)
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])  # (batch, n_heads, seqlen_q)


@torch.library.custom_op("mpt_kernels::alibi_attention_fwd", mutates_args=())
def alibi_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alibi_slopes: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out like q, float32 lse: (batch, n_heads, seqlen_q) or varlen (n_heads, total_q))."""
    return _attention_fwd_impl(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale, causal)


def _attention_fwd_impl(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        softmax_scale, causal, with_lse=True):
    """The forward's body: the custom op runs it, and ``alibi_attention`` calls it directly where the
    op's dispatch has nothing to do (``_ext.direct_call_ok``). ``with_lse=False`` (the direct call, not
    varlen) skips the logsumexp output: lse is returned as None."""
    varlen = cu_seqlens_q is not None
    if varlen and cu_seqlens_k is not None:
        _check_device_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, q.shape[0], k.shape[0])
    args = (view(q, "q"), view(k, "k"), view(v, "v"), _opt_view(alibi_slopes, "alibi_slopes"),
            _opt_view(cu_seqlens_q, "cu_seqlens_q"), _opt_view(cu_seqlens_k, "cu_seqlens_k"),
            max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    ws = _workspace(_C.attention_fwd_workspace_size(*args), q.device)
    # Varlen rows outside every sequence (cu_seqlens_q[-1] < total) are not written by the kernel.
    if varlen:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full(_lse_shape(q, True), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        out = _empty(q.shape, q.dtype, q.device)  # large CPU outputs come from the host pool
        lse = _empty(_lse_shape(q, False), torch.float32, q.device) if with_lse else None
    _C.attention_fwd(args[0], args[1], args[2], view(out, "out"), _opt_view(lse, "lse"), *args[3:],
                     _opt_view(ws, "workspace"), current_stream(q))
    return out, lse


@alibi_attention_fwd.register_fake
def _(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    varlen = cu_seqlens_q is not None
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, varlen), dtype=torch.float32)


@torch.library.custom_op("mpt_kernels::alibi_attention_bwd", mutates_args=())
def alibi_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    alibi_slopes: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv); dk and dv are summed over the query heads of each KV group."""
    varlen = cu_seqlens_q is not None
    dq = _grad_buffer(q.shape, q, varlen)
    dk = _grad_buffer(k.shape, k, varlen)
    dv = _grad_buffer(v.shape, v, varlen)
    _attention_bwd_impl(dout, q, k, v, out, lse, dq, dk, dv, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, softmax_scale, causal)
    return dq, dk, dv


def _grad_buffer(shape, like, varlen):
    # varlen rows outside every sequence are not written: 0; large CPU outputs come from the host pool
    return torch.zeros(shape, dtype=like.dtype, device=like.device) if varlen else _empty(shape, like.dtype, like.device)


def _attention_bwd_impl(dout, q, k, v, out, lse, dq, dk, dv, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, softmax_scale, causal):
    """Writes dq, dk, dv (any views whose last axis is contiguous: the packed op's are views of one
    dqkv buffer)."""
    dout = _kernel_operand(dout, dout.device.type == "cuda")  # autograd may hand over expanded (stride 0) gradients
    args = (view(q, "q"), view(k, "k"), view(v, "v"), _opt_view(alibi_slopes, "alibi_slopes"),
            _opt_view(cu_seqlens_q, "cu_seqlens_q"), _opt_view(cu_seqlens_k, "cu_seqlens_k"),
            max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    ws = _workspace(_C.attention_bwd_workspace_size(*args), q.device)
    _C.attention_bwd(view(dout, "dout"), args[0], args[1], args[2], view(out, "out"), view(lse, "lse"),
                     view(dq, "dq"), view(dk, "dk"), view(dv, "dv"), *args[3:], _opt_view(ws, "workspace"),
                     current_stream(q))


@alibi_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, slopes, cu_q, cu_k, max_sq, max_sk, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, slopes, cu_q, cu_k)
    ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.softmax_scale, ctx.causal = max_sq, max_sk, scale, causal


def _backward(ctx, dout, dlse):
    # lse is an auxiliary output: its gradient is not propagated (it is not part of the public API).
    q, k, v, out, lse, slopes, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = bwd_op(ctx, alibi_attention_bwd)(dout, q, k, v, out, lse, slopes, cu_q, cu_k, ctx.max_seqlen_q,
                                                  ctx.max_seqlen_k, ctx.softmax_scale, ctx.causal)
    return dq, dk, dv, None, None, None, None, None, None, None


alibi_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
# Plain eager training calls: the same body and formula without the custom op's dispatch.
_AttentionEager = eager_function("_AttentionEager", alibi_attention_fwd, _setup_context, _backward)
# torch.func transforms: the custom op under a Function they accept.
_AttentionFunc = transform_function("_AttentionFunc", alibi_attention_fwd, _setup_context, _backward)


def alibi_attention(q, k, v, *, causal=True, softmax_scale=None, alibi_slopes=None, alibi_bias_max=8.0,
                    cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """Exact attention with MPT's ALiBi bias, O(seqlen) memory. See the module docstring for shapes.

    causal: rows aligned to the bottom-right (query i sees keys j <= i + seqlen_k - seqlen_q), so
        seqlen_q = 1 is a decode step against a KV cache. seqlen_q > seqlen_k is a ValueError.
    softmax_scale: default 1 / sqrt(head_dim).
    alibi_slopes: float32 (n_heads,) or (batch, n_heads); default ``alibi_slopes(n_heads, alibi_bias_max)``.
        Zeros give plain (unbiased) attention.
    cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) offsets for packed sequences; max_seqlen_q/k are
        then read from them when not given (a host sync on CUDA; pass them under torch.compile).
    max_seqlen_q, max_seqlen_k: int, SymInt or one-element integer tensor; kept symbolic when traced.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"{name}: expected 3 (varlen) or 4 dimensions, got a scalar")
    refuse_forward_ad("alibi_attention", q, k, v)
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError(f"{'cu_seqlens_k' if cu_seqlens_k is None else 'cu_seqlens_q'}: cu_seqlens_q and "
                         "cu_seqlens_k must be given together")
    if q.dim() != (3 if varlen else 4):
        raise ValueError(f"q: expected {3 if varlen else 4} dimensions, got shape {tuple(q.shape)}")
    head_dim, n_heads = q.shape[-1], q.shape[-2]
    if isinstance(head_dim, int) and not 1 <= head_dim <= 256:
        raise ValueError(f"q: head_dim must be in [1, 256], got {head_dim} (shape {tuple(q.shape)})")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if alibi_slopes is None:
        alibi_slopes = _reference.alibi_slopes(n_heads, alibi_bias_max, device=q.device)
    elif not isinstance(alibi_slopes, torch.Tensor):
        raise ValueError(f"alibi_slopes: expected a float32 tensor, got {type(alibi_slopes).__name__}")
    elif alibi_slopes.requires_grad and torch.is_grad_enabled():
        # a silently missing gradient would leave "learnable" slopes untrained
        raise ValueError("alibi_slopes: requires_grad is set, but the kernels compute no gradient for the slopes "
                         "(MPT's are fixed); pass alibi_slopes.detach()")
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected True or False, got {causal!r}")
    # Checked here as well as in _C: a mix with a meta tensor would otherwise dispatch to the fake kernel.
    for name, t in (("k", k), ("v", v), ("alibi_slopes", alibi_slopes), ("cu_seqlens_q", cu_seqlens_q),
                    ("cu_seqlens_k", cu_seqlens_k)):
        if isinstance(t, torch.Tensor) and t.device != q.device:
            raise ValueError(f"{name}: is on {t.device} but q is on {q.device}; all tensors must be on the same device")
    # Only the last axis must be contiguous (CUDA: plus 16-byte alignment); anything else is copied.
    q, k, v = (_kernel_operand(t, q.device.type == "cuda") for t in (q, k, v))
    if varlen:
        for name, c in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if not isinstance(c, torch.Tensor) or c.dim() != 1:
                raise ValueError(f"{name}: expected a 1-D int32 tensor")
            if c.dtype != torch.int32:
                raise ValueError(f"{name}: must have dtype int32, got {c.dtype}")
        max_seqlen_q = _max_length(cu_seqlens_q) if max_seqlen_q is None else _length_arg(max_seqlen_q, "max_seqlen_q")
        max_seqlen_k = _max_length(cu_seqlens_k) if max_seqlen_k is None else _length_arg(max_seqlen_k, "max_seqlen_k")
    else:  # max_seqlen_* only mean something for varlen; the batched shapes decide here
        max_seqlen_q, max_seqlen_k = q.shape[1], (k.shape[1] if k.dim() == 4 else 0)
    # A SymFloat scale (from a symbolic head_dim) stays symbolic for the same reason as the lengths.
    softmax_scale = _scale_arg(softmax_scale)
    how = route(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k)
    if how == "direct":  # inference: skip the op's dispatch
        # Only the output: no logsumexp (nothing will read it), except varlen, whose outputs are pre-filled.
        return _attention_fwd_impl(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   softmax_scale, bool(causal), with_lse=cu_seqlens_q is not None)[0]
    op = autograd_call(how, _AttentionEager, _AttentionFunc, alibi_attention_fwd)
    out, _ = op(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                bool(causal))
    return out


# ------------------------------------------------------------------------------------------------
# Packed QKV: the fused Wqkv projection's output as one tensor. The forward reads q, k, v as views of
# it (as alibi_attention does); the backward writes dq, dk, dv into views of ONE gradient buffer shaped
# like it. With separate q, k, v (split views of the projection) autograd's split backward instead
# concatenates the three gradients into a new tensor: per layer and token, 3 x d_model elements read
# and written again (~10 GB per mpt-1b 8 x 2048 training step in bf16).
# ------------------------------------------------------------------------------------------------
def _split_qkv(qkv: torch.Tensor, n_heads: int, kv_heads: int):
    D = qkv.shape[-1] // (n_heads + 2 * kv_heads)
    q, k, v = qkv.split([n_heads * D, kv_heads * D, kv_heads * D], dim=-1)
    return q.unflatten(-1, (n_heads, D)), k.unflatten(-1, (kv_heads, D)), v.unflatten(-1, (kv_heads, D))


@torch.library.custom_op("mpt_kernels::alibi_attention_qkvpacked_fwd", mutates_args=())
def alibi_attention_qkvpacked_fwd(
    qkv: torch.Tensor,
    n_heads: int,
    kv_heads: int,
    alibi_slopes: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    max_seqlen: int,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (..., n_heads, head_dim), float32 lse) of the attention of qkv's q over its k, v."""
    q, k, v = _split_qkv(qkv, n_heads, kv_heads)
    return _attention_fwd_impl(q, k, v, alibi_slopes, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale,
                               causal)


@alibi_attention_qkvpacked_fwd.register_fake
def _(qkv, n_heads, kv_heads, alibi_slopes, cu_seqlens, max_seqlen, softmax_scale, causal):
    q, _, _ = _split_qkv(qkv, n_heads, kv_heads)
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens is not None), dtype=torch.float32)


@torch.library.custom_op("mpt_kernels::alibi_attention_qkvpacked_bwd", mutates_args=())
def alibi_attention_qkvpacked_bwd(
    dout: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    n_heads: int,
    kv_heads: int,
    alibi_slopes: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    max_seqlen: int,
    softmax_scale: float,
    causal: bool,
) -> torch.Tensor:
    """dqkv shaped like qkv: dq, dk, dv written by the kernel straight into its three slices."""
    dqkv = _grad_buffer(qkv.shape, qkv, cu_seqlens is not None)
    q, k, v = _split_qkv(qkv, n_heads, kv_heads)
    dq, dk, dv = _split_qkv(dqkv, n_heads, kv_heads)
    _attention_bwd_impl(dout, q, k, v, out, lse, dq, dk, dv, alibi_slopes, cu_seqlens, cu_seqlens, max_seqlen,
                        max_seqlen, softmax_scale, causal)
    return dqkv


@alibi_attention_qkvpacked_bwd.register_fake
def _(dout, qkv, out, lse, n_heads, kv_heads, alibi_slopes, cu_seqlens, max_seqlen, softmax_scale, causal):
    return qkv.new_empty(qkv.shape)


def _packed_setup_context(ctx, inputs, output):
    qkv, n_heads, kv_heads, slopes, cu, max_seqlen, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, slopes, cu)
    ctx.n_heads, ctx.kv_heads, ctx.max_seqlen, ctx.softmax_scale, ctx.causal = n_heads, kv_heads, max_seqlen, scale, causal


def _packed_backward(ctx, dout, dlse):
    qkv, out, lse, slopes, cu = ctx.saved_tensors
    dqkv = bwd_op(ctx, alibi_attention_qkvpacked_bwd)(dout, qkv, out, lse, ctx.n_heads, ctx.kv_heads, slopes, cu,
                                                      ctx.max_seqlen, ctx.softmax_scale, ctx.causal)
    return dqkv, None, None, None, None, None, None, None


alibi_attention_qkvpacked_fwd.register_autograd(_packed_backward, setup_context=_packed_setup_context)
_PackedAttentionEager = eager_function("_PackedAttentionEager", alibi_attention_qkvpacked_fwd, _packed_setup_context,
                                       _packed_backward)
_PackedAttentionFunc = transform_function("_PackedAttentionFunc", alibi_attention_qkvpacked_fwd,
                                          _packed_setup_context, _packed_backward)


def alibi_attention_qkvpacked(qkv, n_heads: int, kv_heads: Optional[int] = None, *, causal=True, softmax_scale=None,
                              alibi_slopes=None, alibi_bias_max=8.0, cu_seqlens=None, max_seqlen=None):
    """``alibi_attention`` of a fused QKV projection's output, one tensor (MPT's Wqkv layout):
    qkv (batch, seqlen, (n_heads + 2 * kv_heads) * head_dim), or varlen (total, ...) with int32
    ``cu_seqlens`` (the same offsets for queries and keys). Returns (batch, seqlen, n_heads, head_dim).
    Same results as ``alibi_attention`` on its q, k, v slices; the gradient is one tensor shaped like
    qkv, written by the kernel directly (no concatenation of dq, dk, dv)."""
    if not isinstance(qkv, torch.Tensor):
        raise ValueError(f"qkv: expected a torch.Tensor, got {type(qkv).__name__}")
    refuse_forward_ad("alibi_attention_qkvpacked", qkv)
    n_heads = _heads_arg(n_heads, "n_heads")
    kv_heads = n_heads if kv_heads is None else _heads_arg(kv_heads, "kv_heads")
    if n_heads < 1 or kv_heads < 1 or n_heads % kv_heads:
        raise ValueError(f"n_heads ({n_heads}) and kv_heads ({kv_heads}) must be positive, kv_heads dividing n_heads")
    width = n_heads + 2 * kv_heads
    if qkv.dim() != (2 if cu_seqlens is not None else 3) or qkv.shape[-1] % width:
        raise ValueError(f"qkv: expected ({'total' if cu_seqlens is not None else 'batch, seqlen'}, "
                         f"(n_heads + 2 * kv_heads) * head_dim) with (n_heads + 2 * kv_heads) = {width}, "
                         f"got shape {tuple(qkv.shape)}")
    cuda = qkv.device.type == "cuda"
    D = qkv.shape[-1] // width
    q, k, v = _split_qkv(qkv, n_heads, kv_heads)
    packed_ok = (not (cuda and D % 8) and isinstance(causal, bool) and torch.is_grad_enabled() and qkv.requires_grad
                 and not (isinstance(alibi_slopes, torch.Tensor) and alibi_slopes.requires_grad))
    if not packed_ok:  # no gradient wanted (the plain op is as fast), or a layout the packed views cannot take
        kw = {} if cu_seqlens is None else dict(cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                                max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
        return alibi_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, alibi_slopes=alibi_slopes,
                               alibi_bias_max=alibi_bias_max, **kw)
    qkv = _kernel_operand(qkv, cuda)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    softmax_scale = _scale_arg(softmax_scale)
    if alibi_slopes is None:
        alibi_slopes = _reference.alibi_slopes(n_heads, alibi_bias_max, device=qkv.device)
    elif not isinstance(alibi_slopes, torch.Tensor):
        raise ValueError(f"alibi_slopes: expected a float32 tensor, got {type(alibi_slopes).__name__}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError("cu_seqlens: expected a 1-D int32 tensor")
        max_seqlen = _max_length(cu_seqlens) if max_seqlen is None else _length_arg(max_seqlen, "max_seqlen")
    else:
        max_seqlen = qkv.shape[1]
    how = route(qkv, alibi_slopes, cu_seqlens)  # ("direct" cannot come: a gradient is recorded here)
    op = autograd_call(how, _PackedAttentionEager, _PackedAttentionFunc, alibi_attention_qkvpacked_fwd)
    out, _ = op(qkv, n_heads, kv_heads, alibi_slopes, cu_seqlens, max_seqlen, softmax_scale, causal)
    return out


# ------------------------------------------------------------------------------------------------
# torch.func.vmap: batching rules (``_ext.register_vmap``), so vmap(grad(...)) runs one kernel call per
# op for the whole batch instead of one per sample. Samples share no parameter here (the slopes get no
# gradient), so the vmapped dim folds into one the kernels already loop over: the batch for the batched
# layout; for packed sequences (varlen) the heads, the offsets being shared by every sample (head
# b * H + h of the folded call is head h of sample b, and its KV head b * Hkv + h // group is that
# sample's own). Vmapped offsets (cu_seqlens that differ per sample) run the samples one by one.
# Bit for bit: the kernels compute each (sequence, head) on its own, except that a decode-shaped
# forward splits the keys into more pieces when it has few (batch x heads) items to spread over the
# threads or SMs (split-K, visible in the workspace size): where the folded call would split
# differently from each sample's own call, the samples run one by one.
# ------------------------------------------------------------------------------------------------
def _fold_slopes(s, d, n, batch, into_heads):
    """The slopes for a folded call. A sample's slopes are None, (H,) or (batch, H) (varlen: batch =
    sequences). Folded into the batch: (H,) when shared, else (n * batch, H); into the heads:
    (n * H,) or (batch, n * H)."""
    if s is None:
        return None
    if not into_heads and d is None and s.dim() == 1:
        return s
    s = _ext_batch_first(s, d, n)  # (n, H) or (n, batch, H)
    if into_heads:
        return (s.flatten() if s.dim() == 2 else s.movedim(0, 1).flatten(1)).contiguous()
    if s.dim() == 2:
        s = s.unsqueeze(1).expand(n, batch, s.shape[-1])
    return s.flatten(0, 1).contiguous()


def _fwd_workspace_bytes(q_shape, k_shape, s_shape, dtype, device, n_cu, max_sq, max_sk, scale, causal):
    """The forward's workspace size for these shapes (``_ext.shape_view`` stand-ins: the tensors may
    still be wrapped by an outer transform; host offsets read as zeros)."""
    from .._ext import shape_view

    cu = None if n_cu is None else shape_view((n_cu,), torch.int32, device, "cu_seqlens")
    return _C.attention_fwd_workspace_size(
        shape_view(q_shape, dtype, device, "q"), shape_view(k_shape, dtype, device, "k"),
        shape_view(k_shape, dtype, device, "v"),
        None if s_shape is None else shape_view(s_shape, torch.float32, device, "alibi_slopes"),
        cu, cu, max_sq, max_sk, scale, causal)


def _same_splits(n, one, folded, dtype, device, n_cu, max_sq, max_sk, scale, causal):
    """True when the folded forward splits its keys as each sample's own call does (``one``, ``folded``:
    (q, k, slopes) shapes). A shape the binding refuses answers False: the per-sample calls then raise
    its error."""
    try:
        ws_one = _fwd_workspace_bytes(*one, dtype, device, n_cu, max_sq, max_sk, scale, causal)
        ws_folded = _fwd_workspace_bytes(*folded, dtype, device, n_cu, max_sq, max_sk, scale, causal)
    except (ValueError, RuntimeError, TypeError):
        return False
    return ws_folded == n * ws_one


def _fold_qkv_heads(ts, n):
    """Varlen q, k, v, out, dout with the vmapped dim first, (n, total, heads, D) -> (total, n * heads, D)."""
    return [t.movedim(0, 1).flatten(1, 2) for t in ts]


def _attention_fwd_vmap(n, in_dims, q, k, v, slopes, cu_q, cu_k, max_sq, max_sk, scale, causal):
    if in_dims[4] is not None or in_dims[5] is not None:
        return None  # offsets per sample
    cuda = q.device.type == "cuda"
    qb, kb, vb = (_ext_batch_first(t, d, n) for t, d in zip((q, k, v), in_dims))
    s_one = None if slopes is None else _ext_sample_shape(slopes, in_dims[3])
    if cu_q is not None:  # varlen: fold into the heads
        H = qb.shape[-2]
        qf, kf, vf = _fold_qkv_heads((qb, kb, vb), n)
        sf = _fold_slopes(slopes, in_dims[3], n, None, True)
        n_cu = cu_q.shape[0]
    else:  # fold into the batch
        batch = qb.shape[1]
        qf, kf, vf = (t.flatten(0, 1) for t in (qb, kb, vb))
        sf = _fold_slopes(slopes, in_dims[3], n, batch, False)
        n_cu = None
    if not _same_splits(n, (qb.shape[1:], kb.shape[1:], s_one), (qf.shape, kf.shape, None if sf is None else sf.shape),
                        q.dtype, q.device, n_cu, max_sq, max_sk, scale, causal):
        return None
    qf, kf, vf = (_kernel_operand(t, cuda) for t in (qf, kf, vf))
    out, lse = alibi_attention_fwd(qf, kf, vf, sf, cu_q, cu_k, max_sq, max_sk, scale, causal)
    if cu_q is not None:
        return (out.unflatten(1, (n, H)), lse.unflatten(0, (n, H))), (1, 0)
    return (out.unflatten(0, (n, batch)), lse.unflatten(0, (n, batch))), (0, 0)


def _attention_bwd_vmap(n, in_dims, dout, q, k, v, out, lse, slopes, cu_q, cu_k, max_sq, max_sk, scale, causal):
    # The backward splits nothing by batch on the CPU (its single- and two-pass schedules give the same
    # bits); on CUDA only a GQA/MQA group's dK, dV may be summed with float32 atomics (in no fixed order
    # in a sample's own call either).
    if in_dims[7] is not None or in_dims[8] is not None:
        return None
    cuda = q.device.type == "cuda"
    db, qb, kb, vb, ob, lb = (_ext_batch_first(t, d, n) for t, d in zip((dout, q, k, v, out, lse), in_dims))
    if cu_q is not None:
        H, Hkv = qb.shape[-2], kb.shape[-2]
        df, qf, kf, vf, of = _fold_qkv_heads((db, qb, kb, vb, ob), n)
        sf = _fold_slopes(slopes, in_dims[6], n, None, True)
    else:
        batch = qb.shape[1]
        df, qf, kf, vf, of = (t.flatten(0, 1) for t in (db, qb, kb, vb, ob))
        sf = _fold_slopes(slopes, in_dims[6], n, batch, False)
    qf, kf, vf, of = (_kernel_operand(t, cuda) for t in (qf, kf, vf, of))
    lf = lb.flatten(0, 1).contiguous()
    dq, dk, dv = alibi_attention_bwd(df, qf, kf, vf, of, lf, sf, cu_q, cu_k, max_sq, max_sk, scale, causal)
    if cu_q is not None:
        return (dq.unflatten(1, (n, H)), dk.unflatten(1, (n, Hkv)), dv.unflatten(1, (n, Hkv))), (1, 1, 1)
    return tuple(t.unflatten(0, (n, batch)) for t in (dq, dk, dv)), (0, 0, 0)


def _packed_fwd_vmap(n, in_dims, qkv, n_heads, kv_heads, slopes, cu, max_seqlen, scale, causal):
    if in_dims[4] is not None:
        return None
    cuda = qkv.device.type == "cuda"
    qkvb = _ext_batch_first(qkv, in_dims[0], n)
    qb, kb, _ = _split_qkv(qkvb, n_heads, kv_heads)  # (n, [batch,] seqlen, heads, D) views
    s_one = None if slopes is None else _ext_sample_shape(slopes, in_dims[3])
    if cu is not None:  # varlen: the unpacked op over head-folded copies of q, k, v (the same kernel)
        qf, kf, vf = _fold_qkv_heads(_split_qkv(qkvb, n_heads, kv_heads), n)
        sf = _fold_slopes(slopes, in_dims[3], n, None, True)
        one, folded = (qb.shape[1:], kb.shape[1:], s_one), (qf.shape, kf.shape, None if sf is None else sf.shape)
        if not _same_splits(n, one, folded, qkv.dtype, qkv.device, cu.shape[0], max_seqlen, max_seqlen, scale, causal):
            return None
        qf, kf, vf = (_kernel_operand(t, cuda) for t in (qf, kf, vf))
        out, lse = alibi_attention_fwd(qf, kf, vf, sf, cu, cu, max_seqlen, max_seqlen, scale, causal)
        return (out.unflatten(1, (n, n_heads)), lse.unflatten(0, (n, n_heads))), (1, 0)
    batch = qkvb.shape[1]
    qkvf = qkvb.flatten(0, 1)
    sf = _fold_slopes(slopes, in_dims[3], n, batch, False)
    one = (qb.shape[1:], kb.shape[1:], s_one)
    folded = (qb.flatten(0, 1).shape, kb.flatten(0, 1).shape, None if sf is None else sf.shape)
    if not _same_splits(n, one, folded, qkv.dtype, qkv.device, None, max_seqlen, max_seqlen, scale, causal):
        return None
    out, lse = alibi_attention_qkvpacked_fwd(_kernel_operand(qkvf, cuda), n_heads, kv_heads, sf, None, max_seqlen,
                                             scale, causal)
    return (out.unflatten(0, (n, batch)), lse.unflatten(0, (n, batch))), (0, 0)


def _packed_bwd_vmap(n, in_dims, dout, qkv, out, lse, n_heads, kv_heads, slopes, cu, max_seqlen, scale, causal):
    if in_dims[7] is not None:
        return None
    cuda = qkv.device.type == "cuda"
    db, qkvb, ob, lb = (_ext_batch_first(t, d, n) for t, d in zip((dout, qkv, out, lse), in_dims))
    if cu is not None:  # varlen: the unpacked backward over head-folded copies, then one dqkv
        total = qkvb.shape[1]
        qf, kf, vf, of = (_kernel_operand(t, cuda) for t in
                          _fold_qkv_heads((*_split_qkv(qkvb, n_heads, kv_heads), ob), n))
        (df,) = _fold_qkv_heads((db,), n)
        sf = _fold_slopes(slopes, in_dims[6], n, None, True)
        dq, dk, dv = alibi_attention_bwd(df, qf, kf, vf, of, lb.flatten(0, 1).contiguous(), sf, cu, cu, max_seqlen,
                                         max_seqlen, scale, causal)
        dqkv = torch.cat([t.reshape(total, n, -1) for t in (dq, dk, dv)], dim=-1)  # (total, n, width)
        return dqkv, 1
    batch = qkvb.shape[1]
    sf = _fold_slopes(slopes, in_dims[6], n, batch, False)
    dqkv = alibi_attention_qkvpacked_bwd(db.flatten(0, 1), _kernel_operand(qkvb.flatten(0, 1), cuda),
                                         _kernel_operand(ob.flatten(0, 1), cuda), lb.flatten(0, 1).contiguous(),
                                         n_heads, kv_heads, sf, None, max_seqlen, scale, causal)
    return dqkv.unflatten(0, (n, batch)), 0


register_vmap(alibi_attention_fwd, _attention_fwd_vmap)
register_vmap(alibi_attention_bwd, _attention_bwd_vmap)
register_vmap(alibi_attention_qkvpacked_fwd, _packed_fwd_vmap)
register_vmap(alibi_attention_qkvpacked_bwd, _packed_bwd_vmap)
