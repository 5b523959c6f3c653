"""Optimizers: the fused multi-tensor Lion and a multi-tensor ``clip_grad_norm_``.

    opt = mk.optim.Lion(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1,
                        max_grad_norm=1.0)        # global-norm clipping fused into the step
    loss.backward(); opt.step(); opt.zero_grad()
    opt.skipped_steps                             # steps skipped for non-finite gradients

One ``step()`` makes one call into the compiled core per (device, param dtype, grad dtype, state
dtype) group with lists of tensors; on CUDA that is one kernel launch per group (more only when a
group has more tensors than one kernel-argument block holds, see ``LION_CUDA_MAX_TENSORS_PER_LAUNCH``).
With clipping, gradient unscaling (``grad_scale``) or skipping, a multi-tensor sum-of-squares kernel
and a one-block "finalize" kernel run first and leave the gradient multiplier and the skip flag on the
device, so there is no host synchronisation anywhere in ``step()``.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

from ._ext import _C, view

__all__ = ["Lion", "clip_grad_norm_"]

_STORAGE_DTYPES = (torch.float32, torch.bfloat16)


def _is_dtensor(t) -> bool:
    """FSDP2 parameters are DTensors whose local shards we step. torch.distributed.tensor is not
    imported here (0.9 s of `import mpt_kernels`): a tensor can only be a DTensor once it is."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _local(t):
    return t.to_local() if _is_dtensor(t) else t


def _shard_groups(dtensor):
    """Process groups over which a DTensor's local squared norms must be summed: the mesh dimensions
    it is sharded along (replicated dimensions already hold the whole value)."""
    from torch.distributed.tensor import Shard

    mesh = dtensor.device_mesh
    return tuple(mesh.get_group(d) for d, pl in enumerate(dtensor.placements) if isinstance(pl, Shard))


def _check_grad(p, grad, where: str):
    if grad.is_sparse:
        raise ValueError(f"{where}: Lion does not support sparse gradients")
    if p.is_complex() or grad.is_complex():
        raise ValueError(f"{where}: Lion does not support complex parameters or gradients")
    if p.dtype not in _STORAGE_DTYPES:
        raise ValueError(f"{where}: parameters must be float32 or bfloat16, got {p.dtype}")
    if grad.dtype not in _STORAGE_DTYPES:
        raise ValueError(f"{where}: gradients must be float32 or bfloat16, got {grad.dtype}")
    if grad.shape != p.shape:
        raise ValueError(f"{where}: gradient shape {tuple(grad.shape)} differs from parameter shape {tuple(p.shape)}")
    if p.device != grad.device:
        raise ValueError(f"{where}: gradient is on {grad.device} but the parameter is on {p.device}")
    if p.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{where}: unsupported device {p.device} (expected cpu or cuda)")


class _NormPlan:
    """Gradients to take the global L2 norm of, grouped by (device, dtype, sharding)."""

    def __init__(self):
        self.groups: dict = {}  # (device, dtype, shard process groups or None) -> [local grads]

    def add(self, grad, dtensor_of=None):
        key = (grad.device, grad.dtype, _shard_groups(dtensor_of) if dtensor_of is not None else None)
        self.groups.setdefault(key, []).append(grad)

    def devices(self):
        out = []
        for dev, _, _ in self.groups:
            if dev not in out:
                out.append(dev)
        return out

    def finalize(self, max_norm, grad_scale, found_inf, skip_nonfinite, counters=None):
        """Runs the sum-of-squares kernels and the finalize step on each device; returns
        {device: aux} with aux = [norm of the unscaled gradients, gradient multiplier, skip flag]."""
        partials_by_dev = {}
        sharded = False
        for (dev, dtype, shard), grads in self.groups.items():
            n = _C.lion_num_chunks([g.numel() for g in grads])
            part = torch.empty(n, dtype=torch.float32, device=dev)
            _C.sum_squares([view(g, "grads") for g in grads], view(part, "partials"), _stream(dev))
            partials_by_dev.setdefault(dev, []).append((shard, part))
            sharded |= shard is not None
        devices = self.devices()
        if len(devices) == 1 and not sharded:
            # Fast path: the finalize kernel reduces the partials itself, in a fixed order.
            parts = [p for _, p in partials_by_dev[devices[0]]]
            partials = {devices[0]: parts[0] if len(parts) == 1 else torch.cat(parts)}
        else:
            # Several devices or sharded parameters: reduce in float64 with torch, all-reduce the
            # sharded part across its process groups, then hand each device the total.
            total = torch.zeros((), dtype=torch.float64, device=devices[0])
            for dev, items in partials_by_dev.items():
                for shard, part in items:
                    s = part.double().sum()
                    if shard:
                        import torch.distributed as dist

                        for pg in shard:
                            dist.all_reduce(s, group=pg)
                    total = total + s.to(devices[0])
            partials = {dev: total.float().reshape(1).to(dev) for dev in devices}
        aux = {}
        for dev in devices:
            a = torch.empty(3, dtype=torch.float32, device=dev)
            gs = None if grad_scale is None else grad_scale.to(device=dev, dtype=torch.float32)
            fi = None if found_inf is None else found_inf.to(device=dev, dtype=torch.float32)
            cnt = None if counters is None else counters(dev)
            _C.lion_finalize(view(partials[dev], "partials"), view(a, "aux"), float(max_norm or 0.0),
                             None if gs is None else view(gs, "grad_scale"),
                             None if fi is None else view(fi, "found_inf"), bool(skip_nonfinite),
                             None if cnt is None else view(cnt, "skipped_count"), _stream(dev))
            aux[dev] = a
        return aux


def _stream(dev) -> int:
    return torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0


def _scale_only(devices, grad_scale, found_inf, counters):
    """The finalize step without a norm: multiplier 1/grad_scale, skip flag from found_inf."""
    aux = {}
    for dev in devices:
        a = torch.empty(3, dtype=torch.float32, device=dev)
        gs = None if grad_scale is None else grad_scale.to(device=dev, dtype=torch.float32)
        fi = None if found_inf is None else found_inf.to(device=dev, dtype=torch.float32)
        empty = torch.empty(0, dtype=torch.float32, device=dev)
        cnt = counters(dev)
        _C.lion_finalize(view(empty, "partials"), view(a, "aux"), 0.0,
                         None if gs is None else view(gs, "grad_scale"),
                         None if fi is None else view(fi, "found_inf"), False,
                         view(cnt, "skipped_count"), _stream(dev))
        aux[dev] = a
    return aux


class Lion(Optimizer):
    r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"), fused.

    Per element, in float32:  c = b1*m + (1-b1)*g;  p = p*(1-decay) - lr*sign(c);
    m = b2*m + (1-b2)*g  with sign(0) = 0 and sign(NaN) = NaN (torch.sign gives 0 there, which
    would freeze the element silently): a non-finite step that is not skipped shows in the parameters.

    Args:
        params: parameters or parameter groups (float32 or bfloat16, contiguous; CPU or CUDA;
            DTensor parameters are stepped through their local shards).
        lr, betas: as in the paper.
        weight_decay: see decoupled_weight_decay: with the default (True) it is the per-step decay
            itself at the initial lr (MPT's configs: 0 to 1e-5), not the paper's lr * weight_decay.
        decoupled_weight_decay: True (llm-foundry's DecoupledLionW): decay = weight_decay * lr /
            initial_lr, initial_lr being the group's lr when the optimizer was built, so the decay
            follows the LR schedule but not the LR's magnitude. (A scheduler may set initial_lr
            itself: torch's OneCycleLR writes max_lr / div_factor there, so the decay at its peak is
            div_factor x weight_decay, as with llm-foundry's DecoupledLionW.) False (the paper,
            lion-pytorch): decay = lr * weight_decay.
        max_grad_norm: clip by the global L2 norm of all gradients (torch.nn.utils.clip_grad_norm_
            semantics, a NaN norm included: every gradient NaN), applied inside the step as a
            multiplier; gradients are not rewritten.
        skip_nonfinite: skip the step (parameters and state untouched) when the global gradient
            norm is inf/NaN, counting it in ``skipped_steps``. Default: on when max_grad_norm is set
            (the norm is computed anyway); set True to pay for the norm without clipping.
        state_dtype: dtype of ``exp_avg``: torch.float32 (default) or torch.bfloat16.
        stochastic_rounding: round bfloat16 parameters and bfloat16 state stochastically (default
            True): updates below one bf16 ulp survive on average, so pure-bf16 training works
            without an fp32 master copy. No effect on float32 storage.
        seed: seed of the stochastic-rounding hash (default 0). The hash also takes the step and the
            parameter's index, so one seed gives independent roundings across steps and tensors and
            a run is reproducible bit for bit on one device type without touching torch's RNG (CPU
            and CUDA agree bit for bit too, except that with clipping or a grad scale the norm is
            summed in a different order on each).
    Per-group keys: lr, betas, weight_decay, decoupled_weight_decay, state_dtype,
    stochastic_rounding, initial_lr, step. ``step(grad_scale=, found_inf=)`` take the tensors torch's
    fused optimizers take, so ``torch.amp.GradScaler`` drives this optimizer without a host sync.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        *,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = True,
        seed: int = 0,
    ):
        _check_hyper(lr, betas, weight_decay, state_dtype, "")
        if max_grad_norm is not None and not (float(max_grad_norm) > 0.0 and float(max_grad_norm) < float("inf")):
            raise ValueError(f"max_grad_norm: must be a positive finite number or None, got {max_grad_norm}")
        if not (0 <= int(seed) < 2**64):
            raise ValueError(f"seed: must be an integer in [0, 2**64), got {seed}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            weight_decay=weight_decay,
            decoupled_weight_decay=bool(decoupled_weight_decay),
            state_dtype=state_dtype or torch.float32,
            stochastic_rounding=bool(stochastic_rounding),
            seed=int(seed),
        )
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.skip_nonfinite = (max_grad_norm is not None) if skip_nonfinite is None else bool(skip_nonfinite)
        self._skip_counters: dict = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        prefix = f"param_groups[{len(self.param_groups) - 1}]: "
        try:
            if len({id(p) for p in group["params"]}) != len(group["params"]):
                # torch only warns (a future error, pytorch#40967) and steps such a parameter twice; the
                # fused step would update it from two threads (CUDA blocks) at once and lose updates.
                raise ValueError(f"{prefix}a parameter appears more than once in the group")
            _check_hyper(group["lr"], group["betas"], group["weight_decay"], group["state_dtype"], prefix)
        except (ValueError, TypeError):
            # A refused group must not stay behind: its parameters could not be added again (torch:
            # "appear in more than one parameter group") and every step would fail on it.
            self.param_groups.pop()
            raise
        group.setdefault("initial_lr", _lr_copy(group["lr"]))
        group.setdefault("step", 0)

    def __getstate__(self):
        # torch's keeps only defaults, state and param_groups: a deepcopy or pickle of the optimizer
        # would come back without max_grad_norm / skip_nonfinite (__setstate__ below defaults them to
        # off: no clipping, silently) and with its skipped-step count reset.
        state = super().__getstate__()
        state.update(max_grad_norm=self.max_grad_norm, skip_nonfinite=self.skip_nonfinite,
                     _skip_counters=self._skip_counters, _skipped_base=self.__dict__.get("_skipped_base", 0))
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in (("decoupled_weight_decay", True), ("state_dtype", torch.float32),
                         ("stochastic_rounding", True), ("seed", 0), ("step", 0)):
                group.setdefault(k, v)
            group.setdefault("initial_lr", _lr_copy(group["lr"]))
        self.__dict__.setdefault("_skip_counters", {})
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("skip_nonfinite", False)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because the gradients were not finite, those of a loaded state dict included
        (reading it synchronises CUDA)."""
        base = self.__dict__.get("_skipped_base", 0)
        if not self._skip_counters:
            return base
        return base + max(int(c.item()) for c in self._skip_counters.values())

    def state_dict(self) -> dict:
        """torch's optimizer state dict; the skipped-step count rides in the first parameter group
        (``"skipped_steps"``), where torch.distributed.checkpoint keeps group entries as they are."""
        sd = super().state_dict()
        if sd["param_groups"]:
            sd["param_groups"][0]["skipped_steps"] = self.skipped_steps
        return sd

    def _counter(self, device):
        c = self._skip_counters.get(device)
        if c is None:
            c = self._skip_counters[device] = torch.zeros(1, dtype=torch.int64, device=device)
        return c

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating-point state to the parameter's dtype on load; exp_avg keeps the
        # group's state_dtype instead (a float32 state of a bf16 parameter must not be rounded).
        # A group entry the saved dict lacks (a lion-pytorch or torch-style dict has no
        # decoupled_weight_decay, state_dtype, stochastic_rounding or seed) keeps this optimizer's
        # value: torch would replace the group by the saved one and __setstate__ then fill in the
        # class defaults, e.g. switch a decoupled_weight_decay=False optimizer loading a lion-pytorch
        # dict to the decoupled decay (weight_decay=0.1 then shrinks the weights 10% a step).
        # initial_lr and step are the saved run's: not filled in from here.
        if len(state_dict["param_groups"]) == len(self.param_groups):
            filled = []
            for g_saved, group in zip(state_dict["param_groups"], self.param_groups):
                g_saved = dict(g_saved)
                for k, v in group.items():
                    if k not in ("params", "initial_lr", "step"):
                        g_saved.setdefault(k, v)
                filled.append(g_saved)
            state_dict = {**state_dict, "param_groups": filled}
        saved = {}
        for group in state_dict["param_groups"]:
            for idx in group["params"]:
                st = state_dict["state"].get(idx)
                if st is not None and "exp_avg" in st:
                    saved[idx] = st["exp_avg"]
        super().load_state_dict(state_dict)
        skipped = 0
        for group in self.param_groups:  # torch copied the saved group entries into the live groups
            skipped = max(skipped, int(group.pop("skipped_steps", 0)))
        self._skipped_base = skipped
        self._skip_counters = {}
        id_map = {}  # saved index -> (live parameter, its group's state dtype)
        for g_saved, group in zip(state_dict["param_groups"], self.param_groups):
            id_map.update((i, (p, group["state_dtype"])) for i, p in zip(g_saved["params"], group["params"]))
        for idx, value in saved.items():
            p, state_dtype = id_map[idx]
            self.state[p]["exp_avg"] = value.to(device=p.device, dtype=state_dtype, copy=True)

    @torch.no_grad()
    def step(self, closure: Callable | None = None, *, grad_scale: torch.Tensor | None = None,
             found_inf: torch.Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # torch.amp.GradScaler hands these over as attributes (the fused-optimizer contract).
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)

        buckets: dict = {}  # (device, p dtype, g dtype, state dtype) -> lists
        hyper = []
        norm_plan = _NormPlan() if (self.max_grad_norm is not None or self.skip_nonfinite) else None
        devices = []
        # Every tensor whose raw pointer goes to the core stays referenced until the launches are
        # queued: a contiguous copy of a gradient would otherwise be freed (and its memory handed to
        # the next allocation) before the kernel reads it.
        keep = []
        written = []  # tensors the kernels update in place: their autograd version counters are bumped
        spans: dict = {}  # device -> [(first byte, end byte, where)] of every parameter to step
        rng_index = 0
        for gi, group in enumerate(self.param_groups):
            lr = float(group["lr"])
            beta1, beta2 = (float(b) for b in group["betas"])
            wd = float(group["weight_decay"])
            if group["decoupled_weight_decay"]:
                initial_lr = float(group["initial_lr"])
                decay = wd * (lr / initial_lr if initial_lr else 1.0)
            else:
                decay = lr * wd
            hyper.append((lr, beta1, beta2, decay, bool(group["stochastic_rounding"])))
            state_dtype = group["state_dtype"]
            for p in group["params"]:
                index = rng_index
                rng_index += 1
                if p.grad is None:
                    continue
                where = f"param_groups[{gi}] parameter {index}"
                grad = p.grad
                _check_grad(p, grad, where)
                p_local, g_local = _local(p), _local(grad)
                if not p_local.is_contiguous():
                    raise ValueError(f"{where}: parameters must be contiguous")
                if not g_local.is_contiguous():
                    g_local = g_local.contiguous()
                state = self.state[p]
                m = state.get("exp_avg")
                if m is not None and (m.shape != p.shape or m.device != p.device):
                    # Checked here, before any kernel runs: the core would refuse it only after
                    # stepping the other (device, dtype) groups, naming its index in that group.
                    raise ValueError(f"{where}: exp_avg has shape {tuple(m.shape)} on {m.device} but the parameter "
                                     f"has shape {tuple(p.shape)} on {p.device} (a state dict of another model?)")
                if m is None or m.dtype != state_dtype:
                    m = torch.zeros_like(p, dtype=state_dtype) if m is None else m.to(state_dtype)
                    state["exp_avg"] = m
                m_local = _local(m)
                if not m_local.is_contiguous():
                    m = state["exp_avg"] = m.contiguous()
                    m_local = _local(m)
                keep += (p_local, g_local, m_local)
                written += (p, m) if p_local is p else (p, m, p_local, m_local)
                if p_local.numel():
                    start = p_local.data_ptr()
                    spans.setdefault(p_local.device, []).append(
                        (start, start + p_local.numel() * p_local.element_size(), where))
                key = (p_local.device, p_local.dtype, g_local.dtype, m_local.dtype)
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = ([], [], [], [], [])
                b[0].append(view(p_local, "params"))
                b[1].append(view(g_local, "grads"))
                b[2].append(view(m_local, "exp_avgs"))
                b[3].append(index)
                b[4].append(gi)
                if p_local.device not in devices:
                    devices.append(p_local.device)
                if norm_plan is not None:
                    norm_plan.add(g_local, p if _is_dtensor(p) else None)
        if buckets:
            _check_disjoint(spans)
        for group in self.param_groups:  # counted once every check passed: a refused step is no step
            group["step"] += 1
        if not buckets:
            return loss

        aux = None
        if norm_plan is not None:
            aux = norm_plan.finalize(self.max_grad_norm, grad_scale, found_inf, self.skip_nonfinite, self._counter)
        elif grad_scale is not None or found_inf is not None:
            aux = _scale_only(devices, grad_scale, found_inf, self._counter)

        seed = int(self.param_groups[0]["seed"])
        rng_step = max(int(g["step"]) for g in self.param_groups)
        for (dev, _, _, _), (pv, gv, mv, idx, hidx) in buckets.items():
            a = None if aux is None else aux[dev]
            _C.lion_step(pv, gv, mv, idx, hidx, hyper,
                         None if a is None else view(a[1:2], "grad_multiplier"),
                         None if a is None else view(a[2:3], "skip"),
                         seed, rng_step, _stream(dev))
        # The kernels write through raw pointers, which autograd does not see: without the bump a
        # backward through a graph that saved a parameter before this step would silently use the
        # updated values instead of raising "modified by an inplace operation" as after torch's optimizers.
        torch.autograd.graph.increment_version(written)  # (one call for all)
        return loss


def _check_disjoint(spans):
    """Distinct parameters that share memory (``nn.Parameter(other_param)`` makes an alias, not a
    tie) would be updated by two threads (CUDA blocks) at once, losing updates from run to run;
    torch's optimizers step them one after the other."""
    for dev_spans in spans.values():
        dev_spans.sort()
        for a, b in zip(dev_spans, dev_spans[1:]):
            if b[0] < a[1]:
                raise ValueError(f"{a[2]} and {b[2]} share memory; the fused step updates each element once: "
                                 "register a tied weight as one parameter")


def _lr_copy(lr):
    """initial_lr's value: a tensor lr is cloned, as torch's LR schedulers do. LR schedulers update a
    tensor lr in place (fill_), so an alias would follow the schedule and lr / initial_lr would stay 1:
    the decoupled decay would then ignore the schedule."""
    return lr.clone() if isinstance(lr, torch.Tensor) else lr


def _check_hyper(lr, betas, weight_decay, state_dtype, prefix):
    lr_f = float(lr)
    if not (lr_f >= 0.0 and lr_f < float("inf")):
        raise ValueError(f"{prefix}lr: must be a finite number >= 0, got {lr}")
    if len(tuple(betas)) != 2 or not all(0.0 <= float(b) <= 1.0 for b in betas):
        raise ValueError(f"{prefix}betas: must be two numbers in [0, 1], got {betas}")
    if not (float(weight_decay) >= 0.0 and float(weight_decay) < float("inf")):
        raise ValueError(f"{prefix}weight_decay: must be a finite number >= 0, got {weight_decay}")
    if state_dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"{prefix}state_dtype: must be torch.float32 or torch.bfloat16, got {state_dtype}")


@torch.no_grad()
def clip_grad_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ with the norm from the multi-tensor sum-of-squares kernel.

    Returns the total norm of the gradients (before clipping), like torch. The clip coefficient stays
    on the device (no host sync unless ``error_if_nonfinite``). Norms other than L2 and gradients the
    kernels do not take (float16, float64, sparse) go to torch's implementation.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters]
    grads = [p.grad for p in params if p.grad is not None]
    max_norm = float(max_norm)
    if not grads:
        return torch.tensor(0.0)
    supported = float(norm_type) == 2.0 and all(
        not g.is_sparse and g.dtype in _STORAGE_DTYPES and g.device.type in ("cpu", "cuda") for g in grads)
    if not supported:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    if not (max_norm > 0.0 and max_norm < float("inf")):
        # torch allows any max_norm; a non-positive one zeroes (or flips) the gradients there. Keep
        # its exact behaviour rather than reinvent it.
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    plan = _NormPlan()
    locals_by_dev: dict = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        gl = _local(g)
        # A non-contiguous gradient (a channels_last conv weight's, a transposed view's) is summed from
        # a contiguous copy, which the plan keeps until the norm is taken; the clip scales it in place.
        plan.add(gl if gl.is_contiguous() else gl.contiguous(), g if _is_dtensor(g) else None)
        locals_by_dev.setdefault(gl.device, []).append(gl)
    aux = plan.finalize(max_norm, None, None, False)
    first = plan.devices()[0]
    total = aux[first][0]
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            "The total norm of order 2.0 for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")
    for dev, gl in locals_by_dev.items():
        torch._foreach_mul_(gl, aux[dev][1])
    return total
