"""Fused cross-entropy for language-model logits as torch ops over the compiled kernels.

``cross_entropy(logits, targets, ignore_index=-100)`` is ``F.cross_entropy``'s mean over the rows
whose target is not ``ignore_index``, computed from bfloat16/float16/float32 logits directly: per
row a float32 logsumexp in one read of the row (forward), and the gradient
``(softmax - onehot(target)) / count`` written in the logits' dtype in one more read (backward). What
it replaces (``F.cross_entropy(logits.float(), ...)``) makes a float32 copy of the logits, a float32
log-softmax, and float32 gradient buffers of the same size, each read and written in passes of
their own: at MPT's 50432-token vocabulary and 16k tokens a step, ~40 GB of traffic and ~10 GB of
memory, against ~5 GB and none here.

Two ``torch.library.custom_op``s, ``mpt_kernels::cross_entropy_fwd`` (per-row loss and logsumexp) and
``mpt_kernels::cross_entropy_bwd``, with fake implementations and an autograd formula, so
``torch.compile(fullgraph=True)`` traces callers. The mean is taken by torch outside them (no host
sync). A target outside ``[0, vocab)`` other than ``ignore_index`` raises ValueError on the CPU; on
CUDA it gives a NaN loss and NaN gradients for its row (checking would need a host sync; the model
checks its labels' range together with its input ids').
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from .._ext import _C, current_stream, empty, view

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _alloc(shape, dtype, device) -> Tensor:
    """Every output of the ops is allocated here (tests swap it for a NaN-filled allocator)."""
    return empty(shape, dtype, device)


@torch.library.custom_op("mpt_kernels::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(loss, lse), float32 (rows,): loss = lse - logits[row, target], 0 for ignored rows."""
    rows = logits.shape[0]
    loss = _alloc((rows,), torch.float32, logits.device)
    lse = _alloc((rows,), torch.float32, logits.device)
    _C.cross_entropy_fwd(view(logits, "logits"), view(targets, "targets"), view(loss, "loss"), view(lse, "lse"),
                         int(ignore_index), current_stream(logits))
    return loss, lse


@cross_entropy_fwd.register_fake
def _fwd_fake(logits, targets, ignore_index):
    rows = logits.shape[0]
    return logits.new_empty((rows,), dtype=torch.float32), logits.new_empty((rows,), dtype=torch.float32)


@torch.library.custom_op("mpt_kernels::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(logits: Tensor, targets: Tensor, lse: Tensor, drow: Tensor, ignore_index: int) -> Tensor:
    """dlogits in logits' dtype: (softmax - onehot(target)) * drow[row]; zero rows where ignored."""
    dlogits = _alloc(logits.shape, logits.dtype, logits.device)
    drow = drow.contiguous()  # named: the core gets raw pointers, a temporary would be freed first
    _C.cross_entropy_bwd(view(logits, "logits"), view(targets, "targets"), view(lse, "lse"), view(drow, "drow"),
                         view(dlogits, "dlogits"), int(ignore_index), current_stream(logits))
    return dlogits


@cross_entropy_bwd.register_fake
def _bwd_fake(logits, targets, lse, drow, ignore_index):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    _, lse = output
    ctx.ignore_index = ignore_index
    ctx.save_for_backward(logits, targets, lse)


def _backward(ctx, dloss, dlse):
    logits, targets, lse = ctx.saved_tensors
    if dloss is None:
        dloss = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    # lse is an auxiliary output: its gradient is not propagated (not part of the public API).
    return _ext.bwd_op(ctx, cross_entropy_bwd)(logits, targets, lse, dloss.float(), ctx.ignore_index), None, None


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)
# Plain eager training calls: the same body and formula without the custom op's dispatch.
_CrossEntropyEager = _ext.eager_function("_CrossEntropyEager", cross_entropy_fwd, _setup_context, _backward)
# torch.func transforms: the custom op under a Function they accept.
_CrossEntropyFunc = _ext.transform_function("_CrossEntropyFunc", cross_entropy_fwd, _setup_context, _backward)


# torch.func.vmap: batching rules (``_ext.register_vmap``). Both kernels work row by row, so the vmapped
# dim folds into the rows: one call for the whole batch, each row's result bit for bit its sample's
# own. (The mean over a sample's non-ignored rows is taken by torch outside the ops, per sample.)
def _rows_first(t, d, n):
    """(n, rows, ...) with the vmapped dim first -> (n * rows, ...), the vocab axis contiguous."""
    t = _ext.batch_first(t, d, n).flatten(0, 1)
    return t.contiguous() if t.dim() > 1 and t.shape[1] > 1 and t.stride(1) != 1 else t


def _fwd_vmap(n, in_dims, logits, targets, ignore_index):
    rows = _ext.sample_shape(logits, in_dims[0])[0]
    loss, lse = cross_entropy_fwd(_rows_first(logits, in_dims[0], n),
                                  _rows_first(targets, in_dims[1], n).contiguous(), ignore_index)
    return (loss.unflatten(0, (n, rows)), lse.unflatten(0, (n, rows))), (0, 0)


def _bwd_vmap(n, in_dims, logits, targets, lse, drow, ignore_index):
    rows = _ext.sample_shape(logits, in_dims[0])[0]
    dlogits = cross_entropy_bwd(*(_rows_first(t, d, n) for t, d in zip((logits, targets, lse, drow), in_dims)),
                                ignore_index)
    return dlogits.unflatten(0, (n, rows)), 0


_ext.register_vmap(cross_entropy_fwd, _fwd_vmap)
_ext.register_vmap(cross_entropy_bwd, _bwd_vmap)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of ``logits`` (N, V) against ``targets`` (N,) over the rows whose target is
    not ``ignore_index`` (0/0 = NaN when there are none, as ``F.cross_entropy``). float32 result;
    logits float32, bfloat16 or float16 (read as they are, float32 arithmetic), their vocab axis
    contiguous; targets integer. Raises ValueError naming the bad argument."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"logits: expected a (rows, vocab) tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    if logits.dtype not in _DTYPES:
        raise ValueError(f"logits: unsupported dtype {logits.dtype} (expected float32, bfloat16 or float16)")
    if logits.device.type not in ("cpu", "cuda"):
        raise ValueError(f"logits: unsupported device {logits.device}")
    if not isinstance(targets, Tensor) or targets.shape != logits.shape[:1]:
        raise ValueError(f"targets: expected shape ({logits.shape[0]},) (one per row of logits), got "
                         f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets: expected an integer dtype, got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"targets: is on {targets.device} but logits are on {logits.device}")
    _ext.refuse_forward_ad("cross_entropy", logits)
    if logits.shape[1] == 0 and logits.shape[0] > 0:
        raise ValueError("logits: the vocab (last) dimension must be non-empty")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    targets = targets.to(torch.int64).contiguous()
    how = _ext.route(logits, targets)
    op = _ext.autograd_call("eager" if how == "direct" else how, _CrossEntropyEager, _CrossEntropyFunc,
                            cross_entropy_fwd)
    loss_rows, _ = op(logits, targets, int(ignore_index))
    count = (targets != ignore_index).sum()
    return loss_rows.sum() / count
