"""Bridge between torch (or numpy) arrays and the framework-free compiled core ``mpt_kernels._C``.

``_C`` never sees a torch object: every tensor crosses as a 5-tuple
``(data_ptr, dtype_code, shape, strides_in_elements, device)`` with ``device = -1`` for host memory,
and CUDA launches take the caller's current stream as an integer.
"""
from __future__ import annotations

import math
import weakref

import numpy as np


def _installed_core():
    """The compiled core of an installed copy of this same package, for a source checkout imported
    without a build of its own: `python -m mpt_kernels.generate` run from the repository root after
    `pip install .` puts the checkout first on sys.path. Used only when that copy's Python bridge
    (this file) is byte-identical to ours, i.e. it was installed from these sources; None otherwise."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "_ext.py"), "rb") as f:
        ours = f.read()
    for entry in sys.path:
        d = os.path.join(os.path.abspath(entry or os.curdir), __package__)
        if not os.path.isdir(d) or os.path.realpath(d) == os.path.realpath(here):
            continue
        try:
            with open(os.path.join(d, "_ext.py"), "rb") as f:
                if f.read() != ours:
                    continue
        except OSError:
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(d, "_C" + suffix)
            if os.path.isfile(path):
                spec = importlib.util.spec_from_file_location(f"{__package__}._C", path)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                sys.modules[f"{__package__}._C"] = mod
                return mod
    return None


try:
    from . import _C  # noqa: F401
except ImportError as exc:
    _C = _installed_core()
    if _C is None:
        raise ImportError(
            "mpt_kernels._C is missing or failed to load: build the package with `pip install .` "
            f"(or `python setup.py build_ext --inplace` in a checkout). Original error: {exc}"
        ) from exc

# Mirrors csrc/common/tensor.h: DType. Never renumber.
FLOAT32, FLOAT16, BFLOAT16, FLOAT64, INT32, INT64, UINT8 = range(7)

_NUMPY_CODES = {
    np.dtype(np.float32): FLOAT32,
    np.dtype(np.float16): FLOAT16,
    np.dtype(np.float64): FLOAT64,
    np.dtype(np.int32): INT32,
    np.dtype(np.int64): INT64,
    np.dtype(np.uint8): UINT8,
}

_TORCH_CODES = None


def _torch_codes():
    global _TORCH_CODES
    if _TORCH_CODES is None:
        import torch

        _TORCH_CODES = {
            torch.float32: FLOAT32,
            torch.float16: FLOAT16,
            torch.bfloat16: BFLOAT16,
            torch.float64: FLOAT64,
            torch.int32: INT32,
            torch.int64: INT64,
            torch.uint8: UINT8,
        }
    return _TORCH_CODES


def view(t, name: str = "tensor"):
    """Describe a torch tensor for ``_C``. Raises ValueError naming ``name`` for unsupported dtypes."""
    code = (_TORCH_CODES or _torch_codes()).get(t.dtype)
    if code is None:
        raise ValueError(f"{name}: unsupported dtype {t.dtype}")
    if t.is_cpu:
        device = -1
    elif t.is_cuda:
        device = t.get_device()
    else:
        raise ValueError(f"{name}: unsupported device {t.device} (expected cpu or cuda)")
    return (t.data_ptr(), code, tuple(t.shape), t.stride(), device)


def optional_view(t, name: str = "tensor"):
    return None if t is None else view(t, name)


def numpy_view(a: np.ndarray, name: str = "array", dtype_code: int | None = None):
    """Describe a numpy array for ``_C`` (host memory). ``dtype_code`` overrides the inferred code,
    e.g. BFLOAT16 for a uint16 array holding bfloat16 bit patterns."""
    if dtype_code is None:
        dtype_code = _NUMPY_CODES.get(a.dtype)
        if dtype_code is None:
            raise ValueError(f"{name}: unsupported numpy dtype {a.dtype}")
    item = a.itemsize
    if any(s % item for s in a.strides):
        raise ValueError(f"{name}: strides must be multiples of the item size")
    return (a.ctypes.data, dtype_code, tuple(a.shape), tuple(s // item for s in a.strides), -1)


def current_stream(t) -> int:
    """The caller's current CUDA stream for ``t``'s device as an integer (0 for host tensors)."""
    if t.device.type != "cuda":
        return 0
    import torch

    return torch.cuda.current_stream(t.device).cuda_stream


def cuda_available() -> bool:
    """True when this build has CUDA kernels and a CUDA device is usable."""
    return bool(_C.cuda_available())


def build_info() -> dict:
    """Version, compiler and flags, CPU features used, CUDA architectures compiled in, ops."""
    return dict(_C.build_info())


# ---- host caching pool ------------------------------------------------------------------------------
# Large CPU outputs of our ops come from a pool of 2 MiB-aligned, huge-page-advised blocks that are
# reused across calls (csrc/common/host_pool.h says why: a fresh 128 MiB glibc allocation is a fresh
# mmap whose page faults cost more than the kernel). Small ones stay with torch's allocator, which
# serves them from malloc's heap without faults.
_POOL_MIN_BYTES = 1 << 20
_pool_enabled = None


def _configure_pool() -> bool:
    import os

    global _pool_enabled
    mb = os.environ.get("MPT_KERNELS_HOST_CACHE_MB")
    if mb is None:
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            ram = 16 << 30
        limit = min(2 << 30, ram // 8)
    else:
        try:
            limit = int(float(mb) * (1 << 20))
        except ValueError:
            raise ValueError(f"MPT_KERNELS_HOST_CACHE_MB: expected a number of MiB, got {mb!r}") from None
    _C.host_pool_set_limit(max(limit, 0))
    _pool_enabled = limit > 0
    return _pool_enabled


def empty(shape, dtype, device):
    """An uninitialised tensor like ``torch.empty``; on the CPU, large ones come from the host pool.
    ``MPT_KERNELS_HOST_CACHE_MB=0`` turns the pool off (every tensor from torch.empty)."""
    import torch

    if math.prod(shape) * dtype.itemsize >= _POOL_MIN_BYTES:  # small ones: straight to torch.empty
        dev = device if type(device) is torch.device else torch.device(device)
        if dev.type == "cpu" and (_pool_enabled if _pool_enabled is not None else _configure_pool()):
            code = (_TORCH_CODES or _torch_codes()).get(dtype)
            if code is not None:
                return torch.from_dlpack(_C.host_empty(tuple(int(s) for s in shape), code))
    return torch.empty(shape, dtype=dtype, device=device)


def set_flush_denormal(on: bool) -> bool:
    """Flush-to-zero and denormals-are-zero for CPU float math, on the calling thread and on every
    thread of the OpenMP pool that torch's CPU ops, MKL's GEMMs and these kernels share (x86; a no-op
    elsewhere). Returns the calling thread's previous setting. Unlike ``torch.set_flush_denormal``
    (the calling thread only; pool threads that already exist keep theirs), it reaches the workers.
    Denormal operands cost Intel cores a microcode assist each: CPU training slowed ~1.5x once its
    attention probabilities and gradients reached them. The trainer turns it on for CPU runs."""
    if not isinstance(on, bool):
        raise ValueError(f"on: expected True or False, got {on!r}")
    return bool(_C.set_flush_denormal(on))


def host_cache_info() -> dict:
    """The host pool's counters: bytes in use and cached, the cache limit, hits and misses, and how
    many mappings got the huge-page advice."""
    if _pool_enabled is None:
        _configure_pool()
    return dict(_C.host_pool_stats())


def empty_host_cache() -> None:
    """Unmap every cached host block (blocks held by live tensors are kept)."""
    _C.host_pool_empty()


def set_host_cache_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of freed host blocks for reuse (0 disables the pool for new tensors)."""
    global _pool_enabled
    if nbytes < 0:
        raise ValueError(f"nbytes: must be >= 0, got {nbytes}")
    _C.host_pool_set_limit(int(nbytes))
    _pool_enabled = nbytes > 0


# ---- host read-backs done once --------------------------------------------------------------------
class LastResult:
    """Remembers the result of the last ``compute()`` made from some tensors and hands it back while
    the next call passes the same tensor objects (weak references: a new tensor reusing a freed one's
    memory is not mistaken for it), unmodified (version counters), with equal other ``args``. For
    values read back from a device that a model passes to every layer (one GPU sync per forward, not
    per layer). A compute that raises is not remembered; inference-mode tensors, which keep no version
    counter, are computed every time; nothing is remembered while torch.compile traces."""

    def __init__(self):
        self._last = None

    def clear(self) -> None:
        self._last = None

    def __call__(self, tensors, args, compute):
        import torch

        try:
            versions = tuple(t._version for t in tensors)
        except RuntimeError:  # inference-mode tensors
            return compute()
        last = self._last
        if (last is not None and last[2] == versions and last[3] == args
                and all(ref() is t for ref, t in zip(last[0], tensors))):
            return last[1]
        result = compute()
        if not torch.compiler.is_compiling():
            self._last = (tuple(weakref.ref(t) for t in tensors), result, versions, args)
        return result


# ---- forward-mode AD -------------------------------------------------------------------------------
def refuse_forward_ad(op: str, *tensors) -> None:
    """Raise NotImplementedError when forward-mode AD would run through ``op``'s kernels: its custom ops
    have no JVP, and torch then drops the tangent without a word (a directional derivative of zero).
    Covers ``torch.autograd.forward_ad`` dual tensors among ``tensors`` and any ``torch.func`` jvp
    transform in progress (``jvp``, ``jacfwd``, ``hessian``). Reverse mode (``backward``,
    ``torch.autograd.grad``) is what the ops support."""
    import torch

    if torch.compiler.is_compiling():
        return
    from torch.autograd import forward_ad

    dual = False
    if forward_ad._current_level >= 0:
        dual = any(isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    if not dual and torch._C._are_functorch_transforms_active():
        jvp = torch._C._functorch.TransformType.Jvp
        dual = any(i.key() == jvp for i in torch._C._functorch.get_interpreter_stack())
    if dual:
        raise NotImplementedError(
            f"{op}: forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) is not supported: the "
            "kernels define no JVP (torch would silently return a zero tangent); use reverse mode (backward)")


# ---- eager fast path ----------------------------------------------------------------------------------
def direct_call_ok(*tensors) -> bool:
    """True when an op may run its kernel directly instead of through its ``torch.library`` custom op.

    The custom op's dispatch (autograd, fake kernels, tracing) costs tens of microseconds per call,
    which is most of a decode step's LayerNorm or a short attention call. It is only skipped where it
    has nothing to do: plain eager tensors, no gradient to record, and nothing that intercepts or
    records ops (torch.compile, torch.export / make_fx / torch.jit tracing, dispatch or torch-function modes
    -- a ``with torch.device(...)`` block counts --, functorch transforms, forward-mode AD)."""
    import torch

    if not _plain_eager(tensors):
        return False
    if torch.is_grad_enabled():
        return not any(t is not None and t.requires_grad for t in tensors)
    return True


def _call_context(tensors) -> str:
    """"plain": plain eager tensors (or None) and nothing that intercepts or records ops; "func": the
    same under torch.func transforms (grad, vjp, jacrev, vmap) and nothing else; "other": compile,
    tracing, dispatch or torch-function modes, forward-mode AD, tensor subclasses."""
    import torch

    if torch.compiler.is_compiling():  # first: Dynamo folds it to True and traces nothing below
        return "other"
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._get_tracing_state() is not None):
        return "other"
    for t in tensors:
        if t is not None and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return "other"
    if torch._C._are_functorch_transforms_active():
        return "func"
    from torch.autograd import forward_ad

    return "other" if forward_ad._current_level >= 0 else "plain"


def _plain_eager(tensors) -> bool:
    """Plain eager tensors (or None), and nothing that intercepts or records ops."""
    return _call_context(tensors) == "plain"


def route(*tensors) -> str:
    """How an op call runs, with the checks made once: "direct" (``direct_call_ok``: the kernel, no
    autograd), "eager" (plain eager tensors with a gradient to record: the autograd.Function
    twin), "func" (torch.func transforms only: the ``transform_function`` twin) or "op" (the
    torch.library custom op: compile, tracing, modes)."""
    import torch

    context = _call_context(tensors)
    if context != "plain":
        return "func" if context == "func" else "op"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "eager"
    return "direct"


def op_body(op):
    """The Python function a ``torch.library.custom_op`` was made from (the op itself on a torch that
    does not keep it)."""
    return getattr(op, "_init_fn", op)


def eager_function(name: str, op, setup_context, backward):
    """An ``autograd.Function`` running ``op``'s body with ``op``'s registered autograd formula
    (``setup_context``, ``backward``): the same kernels and the same gradients as the custom op
    without its Python dispatch (~0.3 ms per LayerNorm forward + backward on a 2-core CPU, a few
    percent of a small model's training step). ``backward`` sees ``ctx.eager = True`` and calls the
    backward op's body too (``bwd_op``). Once differentiable, as the custom op: a backward through
    the backward raises. Under ``create_graph=True`` (grad mode on in the backward) the backward
    custom op itself runs, as on the op path: its gradients stay attached to the saved inputs and a
    backward through them raises torch's "no autograd formula" error. (``once_differentiable`` alone
    only refuses when the incoming gradients require grad; a gradient penalty on a sum or a scalar
    loss would get gradients detached from the inputs, its second-order term silently zero.)"""
    import torch

    body = op_body(op)

    def forward(ctx, *inputs):
        ctx.eager = True
        output = body(*inputs)
        setup_context(ctx, inputs, output)
        return output

    # (Autograd runs a backward with grad mode off unless create_graph=True: bwd_op tells which.)
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })


def transform_function(name: str, op, setup_context, backward):
    """An ``autograd.Function`` in torch.func's form (``setup_context`` apart from ``forward``, a
    generated vmap rule) that calls the custom op ``op`` with ``op``'s registered formula. torch's own
    autograd for a custom op is a Function without ``setup_context``, which every torch.func transform
    refuses ("must override the setup_context staticmethod"): this twin lets ``torch.func.grad``,
    ``vjp``, ``jacrev`` and ``vmap`` of them run the kernels. The backward calls the backward custom op,
    which has no formula of its own: a transform of a transform's gradient (``grad(grad(f))``,
    ``hessian``) raises instead of returning a silently wrong second derivative. Under vmap the
    generated rule runs forward and backward on batched tensors, which reach the custom ops' own
    batching rules (``register_vmap``): one kernel call for the batch."""
    import torch

    def forward(*inputs):
        return op(*inputs)

    def setup(ctx, inputs, output):
        ctx.transform = True  # (bwd_op: the backward op goes under a transform twin as well)
        setup_context(ctx, inputs, output)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup),
        "backward": staticmethod(backward),
        "generate_vmap_rule": True,
    })


_BACKWARD_TWINS = {}


def _backward_transform_function(op):
    """A backward custom op as a Function torch.func accepts (``torch.func.grad`` runs every backward
    with ``create_graph=True``, and the op's own no-formula autograd is a Function it refuses); its
    backward raises: the kernels have no second derivative."""
    import torch

    twin = _BACKWARD_TWINS.get(op)
    if twin is None:
        def forward(*inputs):
            return op(*inputs)

        def setup(ctx, inputs, output):
            pass

        def backward(ctx, *grads):
            raise NotImplementedError(
                f"{op._qualname}: no second derivative: the kernels' backward is not differentiable "
                "(grad of grad, hessian and gradient penalties through these ops are not supported)")

        twin = _BACKWARD_TWINS[op] = type(op._name + "_transform", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup),
            "backward": staticmethod(backward),
            "generate_vmap_rule": True,
        })
    return twin


def autograd_call(how: str, eager, transform, op):
    """The callable for ``route``'s answer ``how`` (not "direct"): the eager twin's or the transform
    twin's ``apply``, else the custom op."""
    return eager.apply if how == "eager" else transform.apply if how == "func" else op


def bwd_op(ctx, op):
    """The backward custom op, or its body under an ``eager_function`` (no dispatch there either)
    unless the backward records a graph (``create_graph=True``): the op then refuses a backward
    through its output, where the body's plain tensors would be silently detached. Under a
    ``transform_function``: the op's torch.func twin (``_backward_transform_function``)."""
    import torch

    if getattr(ctx, "transform", False):
        return _backward_transform_function(op).apply
    return op_body(op) if getattr(ctx, "eager", False) and not torch.is_grad_enabled() else op


# ---- torch.func.vmap batching rules -------------------------------------------------------------------
# Registered on the custom ops (torch.library's register_vmap): under torch.func.vmap (the transform
# twins' generated vmap rules run the ops on batched tensors), an op folds the vmapped dim into a
# dim its kernel already loops over (rows, the batch, the heads) and runs ONE kernel call for the
# whole batch instead of torch's per-sample fallback. A rule folds only where the result is bit for bit
# what each sample's own call gives; everywhere else it runs the op once per sample, as torch's
# fallback did (same results, no "performance drop" warning).
_VMAP_FOLD = True


class vmap_rules:
    """``with vmap_rules(False):`` makes every batching rule run its op once per sample (the cost and
    results of torch's per-sample fallback): for benchmarks and tests comparing the two."""

    def __init__(self, enabled: bool):
        self._enabled = bool(enabled)

    def __enter__(self):
        global _VMAP_FOLD
        self._saved, _VMAP_FOLD = _VMAP_FOLD, self._enabled
        return self

    def __exit__(self, *exc):
        global _VMAP_FOLD
        _VMAP_FOLD = self._saved
        return False


def register_vmap(op, fold):
    """Gives the custom op ``op`` a batching rule. ``fold(batch_size, in_dims, *args)`` returns
    ``(outputs, out_dims)`` from one call for the whole batch, or None where it cannot promise each
    sample's exact result; then the op runs once per sample (``vmap_loop``)."""

    def rule(info, in_dims, *args, **kwargs):
        if _VMAP_FOLD and not kwargs:
            result = fold(info.batch_size, in_dims, *args)
            if result is not None:
                return result
        return vmap_loop(op, info.batch_size, in_dims, args, kwargs)

    op.register_vmap(rule)
    return rule


def vmap_loop(op, batch_size, in_dims, args, kwargs=None):
    """``op`` once per sample, outputs stacked on a new dim 0: what torch's batching fallback does."""
    import torch

    if batch_size == 0:
        raise RuntimeError(f"{getattr(op, '_qualname', op)}: vmap over a dim of size 0 is not supported here "
                           "(the samples run one by one)")
    outs = [op(*[a if d is None else a.select(d, i) for a, d in zip(args, in_dims)], **(kwargs or {}))
            for i in range(batch_size)]
    if isinstance(outs[0], (tuple, list)):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


def batch_first(t, d, batch_size):
    """``t`` with the vmapped dim ``d`` first; an unvmapped ``t`` (d None) expanded (stride 0) to it."""
    return t.expand(batch_size, *t.shape) if d is None else t.movedim(d, 0)


_SHAPE_SCRATCH = [np.zeros(4096, dtype=np.uint8)]  # every one kept: views of a smaller one may be in use


def shape_view(shape, dtype, device, name: str = "tensor"):
    """A stand-in for a tensor of this shape in ``_C``'s workspace-size queries, which depend on shapes
    only (the tensor itself may still be wrapped by an outer transform, with no data pointer to give).
    Every row is one zero-filled host row (strides 0 but the last): whatever a query reads is in
    bounds, and host offsets read as zeros (empty sequences, which pass every check)."""
    code = (_TORCH_CODES or _torch_codes()).get(dtype)
    if code is None:
        raise ValueError(f"{name}: unsupported dtype {dtype}")
    shape = tuple(int(s) for s in shape)
    need = max(shape[-1] if shape else 1, 1) * dtype.itemsize
    if _SHAPE_SCRATCH[-1].size < need:
        _SHAPE_SCRATCH.append(np.zeros(2 * need, dtype=np.uint8))
    dev = -1 if device.type == "cpu" else (device.index or 0)
    strides = (0,) * (len(shape) - 1) + (1,) if shape else ()
    return (_SHAPE_SCRATCH[-1].ctypes.data, code, shape, strides, dev)


def sample_shape(t, d):
    """The shape one sample of ``t`` has under vmap (``t``'s shape without the vmapped dim ``d``)."""
    shape = tuple(t.shape)
    if d is None:
        return shape
    d %= len(shape)
    return shape[:d] + shape[d + 1:]
