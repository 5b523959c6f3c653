"""A CPU decode step without the per-op Python: the same kernels as the module path, called directly.

A decode step of a small model on the CPU spends as long in Python as in its kernels: each op's
wrapper checks its arguments, routes, allocates and describes its tensors (~25-45 us per Linear,
LayerNorm or attention call, ~0.5 ms per block), where the kernels of an mpt-125m block take ~1.6 ms.
Here a step runs each block as a fixed list of ``_C`` calls on buffers allocated once, with the
weights' descriptions (``_ext.view`` tuples) made once: ~8x less Python per step (a 12-block model
at d_model 64: 7.5 -> 0.92 ms).

It computes exactly what ``MPTForCausalLM._forward`` computes (the same kernels, in the same order,
on the same values: the logits are bitwise the same) and runs only where that is certain:

- nothing records or intercepts: no gradient mode, no autocast, no compile / tracing / modes;
- the model is the stock one: its modules and parameters are the ones the step was built from
  (checked per step: a replaced module, parameter or ``.data``, a ``.to()``, a hook or a patched
  ``forward`` sends the step back to the module path), attention on the kernels, no qk_ln, dropout off;
  the settings the module path reads from its modules on every call (each attention's
  ``softmax_scale``, ``clip_qkv``, ``use_kernel`` and cached slopes, each LayerNorm's ``eps``) are
  read from them on every step too, so a change to one module is followed;
- a decode step: a KV cache holding a past, at most ``modeling.few_rows_limit`` new rows (batch x
  new tokens: 8, or on CPUs without bf16 dot products 24, float32 16, in passes of 8), host tensors
  of one dtype (float32, bfloat16, float16), an AVX2 build (the few-row linear kernel's);
- one thread at a time per model: the buffers are shared, so a second thread stepping the same model
  concurrently takes the module path (the kernels release the GIL).

Anything else returns None and the caller runs the module path. ``ENABLED = False`` switches it off.
"""
from __future__ import annotations

import math
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ext
from .._ext import _C, view
from ..ops import linear as _few_rows
from ..ops.attention import _scale_arg
from . import modeling as M

ENABLED = True
_CPU = torch.device("cpu")
# batch x new tokens per step: at most what modeling.linear sends to the few-row kernel
# (modeling.few_rows_limit: 8, or up to 24 in passes of 8 on CPUs without bf16 dot products)
_MOST_ROWS = max(max(_few_rows.CHUNKED_MAX_ROWS.values()), _few_rows.MAX_ROWS)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The classes whose forward the step reproduces; a patched forward on any of them disables it.
_FORWARDS = {cls: cls.forward for cls in (M.MPTBlock, M.MPTAttention, M.MPTMLP, M.LayerNorm, M.Linear)}
# ... and the functions those forwards call: a patched one (a debugging wrapper, a swapped kernel)
# disables it too.
_FUNCTIONS = [(ns, name, getattr(ns, name)) for ns, names in ((M, ("linear", "gelu", "embedding")),
                                                              (M.mk, ("layer_norm", "alibi_attention")))
              for name in names]
# model -> (_build_key, its _Runner or None where the step does not apply to it)
_RUNNERS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _build_key(model):
    """What a model the step did not take must change before it is looked at again: its config or a
    parameter's memory (a ``.to()``). ~0.5 us per parameter, against ~30 us of Python per module-path op."""
    return (id(getattr(model, "config", None)), tuple(p.data_ptr() for p in model.parameters()))


def step(model, input_ids: torch.Tensor, cache, logits_to_keep: int):
    """One decode step of ``model`` (``_forward``'s arguments: no mask, sequence ids or labels), or None
    where it does not apply. Advances ``cache`` as ``_forward`` does."""
    if not ENABLED or torch.is_grad_enabled() or not M._FEW_ROWS_KERNEL:
        return None
    B, S = input_ids.shape
    if (not cache.length or cache.batch_size != B or B * S > _MOST_ROWS or not input_ids.is_cpu
            or input_ids.dtype not in (torch.int64, torch.int32) or torch.is_autocast_enabled("cpu")
            or not _ext._plain_eager((input_ids,))):
        return None
    entry = _RUNNERS.get(model)
    if entry is None or (not entry[1].current() if entry[1] is not None else entry[0] != _build_key(model)):
        entry = _RUNNERS[model] = (_build_key(model), _Runner.build(model))
    runner = entry[1]
    if runner is None or B * S > M.few_rows_limit(runner.dtype) or not runner.usable(cache):
        return None
    if not runner.lock.acquire(blocking=False):
        return None
    try:
        return runner.run(input_ids, cache, logits_to_keep)
    finally:
        runner.lock.release()


class _Layer:
    """One block's weights as the kernels take them (``_ext.view`` tuples, made once)."""

    def __init__(self, block: M.MPTBlock):
        a, f = block.attn, block.ffn
        self.ln1 = _ln_views(block.norm_1)
        self.ln2 = _ln_views(block.norm_2)
        self.wqkv = _linear_views(a.Wqkv)
        self.out_proj = _linear_views(a.out_proj)
        self.up = _linear_views(f.up_proj)
        self.down = _linear_views(f.down_proj)
        self.slopes = a.slopes(a.Wqkv.weight.device)  # float32 (n_heads,), kept alive here
        self.slopes_view = view(self.slopes, "alibi_slopes")
        # the modules whose settings a step reads (weakly: a replaced module is noticed by current())
        self.attn, self.norm_1, self.norm_2 = weakref.ref(a), weakref.ref(block.norm_1), weakref.ref(block.norm_2)

    def settings(self, head_dim: int):
        """(softmax scale, clip_qkv, norm_1 eps, norm_2 eps) as the module path reads them on this
        call, or None where the step cannot reproduce them (the module path then runs, and raises for
        a bad value). Refreshes the slopes when the module's cached ones were replaced."""
        a, n1, n2 = self.attn(), self.norm_1(), self.norm_2()
        if a is None or n1 is None or n2 is None or not a.use_kernel or "q_ln" in a._modules:
            return None
        if a.training and a.attn_pdrop:  # the module path refuses it
            return None
        slopes = a.slopes(_CPU)
        if slopes is not self.slopes:
            if not (isinstance(slopes, torch.Tensor) and slopes.dtype == torch.float32 and slopes.is_cpu
                    and slopes.shape == self.slopes.shape and slopes.is_contiguous()):
                return None
            self.slopes, self.slopes_view = slopes, view(slopes, "alibi_slopes")
        scale = a.softmax_scale
        try:  # as alibi_attention: None is 1 / sqrt(head_dim) (not head_dim ** -0.5: the last bit differs)
            scale = 1.0 / math.sqrt(head_dim) if scale is None else _scale_arg(scale)
            clip = a.clip_qkv
            if clip is not None:
                clip = float(clip)
            return scale, clip, float(n1.eps), float(n2.eps)
        except (TypeError, ValueError):
            return None


def _linear_views(lin: M.Linear):
    return view(lin.weight, "weight"), (None if lin.bias is None else view(lin.bias, "bias"))


def _ln_views(ln: M.LayerNorm):
    """(weight, bias) views; the eps is read from the module on each step (``settings``)."""
    return view(ln.weight, "weight"), (None if ln.bias is None else view(ln.bias, "bias"))


class _Buffers:
    """A step's activations for ``rows`` = batch x new tokens, reused step after step."""

    def __init__(self, cfg, B: int, S: int, dtype):
        rows, d = B * S, cfg.d_model
        H, Hkv, D = cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
        width = (H + 2 * Hkv) * D
        new = lambda *shape: torch.empty(shape, dtype=dtype)  # noqa: E731
        self.stream = [new(rows, d), new(rows, d)]  # the residual stream, ping-pong (LN reads one, writes the other)
        self.h = new(rows, d)  # LayerNorm outputs
        self.qkv = new(rows, width)
        self.attn = new(B, S, H, D)
        self.branch = new(rows, d)  # out_proj's and down_proj's outputs: the branch the next LayerNorm adds
        self.up = new(rows, cfg.ffn_hidden_size)
        self.act = new(rows, cfg.ffn_hidden_size)
        qkv3 = self.qkv.view(B, S, width)
        self.k_new = qkv3[..., H * D:(H + Hkv) * D].unflatten(-1, (Hkv, D))  # (B, S, Hkv, D) views for the cache
        self.v_new = qkv3[..., (H + Hkv) * D:].unflatten(-1, (Hkv, D))
        es = self.qkv.element_size()
        code = _ext._torch_codes()[dtype]
        # q: (B, S, H, D) inside the Wqkv output, as alibi_attention gets it from the module path
        self.q_desc = (self.qkv.data_ptr(), code, (B, S, H, D), (S * width, width, D, 1), -1)
        self.q_row_bytes = S * width * es  # one batch row of q
        # LayerNorm's operands (any number of rows in one call)
        self.v = {name: view(t, name) for name, t in (("stream0", self.stream[0]), ("stream1", self.stream[1]),
                                                       ("h", self.h), ("branch", self.branch))}
        # the few-row kernel's operands: passes of at most 8 rows (one for a step of <= 8 rows)
        self.rows = {name: _row_passes(t, name) for name, t in (
            ("h", self.h), ("qkv", self.qkv), ("branch", self.branch), ("up", self.up), ("act", self.act),
            ("attn", self.attn.view(rows, H * D)))}
        self.attn_desc = view(self.attn, "out")


class _Runner:
    """A model's decode step: its weights' views, the slots they were read from, the step's buffers.
    Holds only weak references to the model's modules and parameters: a replaced module or parameter
    is freed as usual (the next step notices and rebuilds)."""

    def __init__(self, model, layers, slots, ptrs, modules, dropouts):
        self.model = weakref.proxy(model)  # the runner lives in a WeakKeyDictionary keyed by the model
        self.cfg = model.config
        self.dtype = model.dtype
        self.layers = layers
        self._slots = slots  # (parent, attribute dict, name, object or None): where each view was read
        self._ptrs = ptrs  # (parameter, its data_ptr when the views were made)
        self._modules = modules  # every module of the model (for hooks and patched forwards)
        self._dropouts = dropouts
        self._buffers: dict[tuple[int, int], _Buffers] = {}
        self.lock = threading.Lock()
        cfg = self.cfg
        tr = model.transformer
        self.norm_f = _ln_views(tr.norm_f)
        self.norm_f_module = weakref.ref(tr.norm_f)
        head = tr.wte.weight if cfg.tie_word_embeddings else model.lm_head.weight
        self.head = (view(head, "weight"), None)  # the module path's linear(h, w): no bias, even on an lm_head with one
        self.vocab = head.shape[0]

    @classmethod
    def build(cls, model) -> "_Runner | None":
        """A runner for ``model``, or None when its structure is not the one the step reproduces."""
        cfg = getattr(model, "config", None)
        if (type(model) is not M.MPTForCausalLM or not cfg.uses_kernel_attention or not _few_rows._AVX2
                or cfg.attn_config["qk_ln"] or model.dtype not in _DTYPES or model.device.type != "cpu"):
            return None
        modules = list(model.modules())
        params = list(model.parameters())
        if any(p.dtype != model.dtype or p.device.type != "cpu" or not p.is_contiguous() for p in params):
            return None
        slots, ptrs = [], []
        ref = weakref.ref

        def keep(parent: nn.Module, name: str, expect):
            """Record parent.<name> (a module of exactly type ``expect``, or a parameter: expect=Parameter,
            None allowed for a bias) so a step notices when it is replaced."""
            is_param = expect is nn.Parameter
            obj = (parent._parameters if is_param else parent._modules).get(name)
            if obj is None and not (is_param and name == "bias"):
                raise _Unsupported
            if obj is not None and not (isinstance(obj, nn.Parameter) if is_param else type(obj) is expect):
                raise _Unsupported
            slots.append((ref(parent), "_parameters" if is_param else "_modules", name,
                          None if obj is None else ref(obj)))
            if is_param and obj is not None:
                ptrs.append((ref(obj), obj.data_ptr()))
            return obj

        def keep_weights(mod):
            keep(mod, "weight", nn.Parameter)
            keep(mod, "bias", nn.Parameter)

        slots.append((ref(model), "__dict__", "config", ref(cfg)))  # resize_token_embeddings replaces it
        try:
            tr = keep(model, "transformer", M.MPTModel)
            keep(tr, "wte", nn.Embedding)
            keep(tr.wte, "weight", nn.Parameter)
            keep(tr, "emb_drop", nn.Dropout)
            blocks = keep(tr, "blocks", nn.ModuleList)
            if len(blocks) != cfg.n_layers:
                return None
            for i, blk in enumerate(blocks):
                keep(blocks, str(i), M.MPTBlock)
                for name in ("norm_1", "norm_2"):
                    keep_weights(keep(blk, name, M.LayerNorm))
                keep(blk, "resid_dropout", nn.Dropout)
                attn = keep(blk, "attn", M.MPTAttention)
                ffn = keep(blk, "ffn", M.MPTMLP)
                for parent, name in ((attn, "Wqkv"), (attn, "out_proj"), (ffn, "up_proj"), (ffn, "down_proj")):
                    keep_weights(keep(parent, name, M.Linear))
                if not attn.use_kernel or hasattr(attn, "q_ln"):
                    return None
            keep_weights(keep(tr, "norm_f", M.LayerNorm))
            if not cfg.tie_word_embeddings:
                keep(model, "lm_head", M.Linear)
                keep(model.lm_head, "weight", nn.Parameter)
        except _Unsupported:
            return None
        layers = [_Layer(blk) for blk in blocks]
        dropouts = [ref(m) for m in modules if isinstance(m, nn.Dropout)]
        return cls(model, layers, slots, ptrs, [ref(m) for m in modules], dropouts)

    def current(self) -> bool:
        """The model still has the modules and parameters (and their memory) the views describe."""
        for parent, attr, name, obj in self._slots:
            p = parent()
            if p is None:
                return False
            now = getattr(p, attr).get(name)
            if obj is None:
                if now is not None:
                    return False
            elif now is None or now is not obj():
                return False
        for param, ptr in self._ptrs:
            p = param()
            if p is None or p.data_ptr() != ptr:
                return False
        return True

    def usable(self, cache) -> bool:
        """Per step: no hooks, no patched forward, dropout off, a cache this step can write."""
        if (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
                or any(cls.forward is not fwd for cls, fwd in _FORWARDS.items())
                or any(getattr(ns, name) is not f for ns, name, f in _FUNCTIONS)):
            return False
        for r in self._modules:
            m = r()
            if m is None or m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
                return False
        for r in self._dropouts:
            m = r()
            if m is None or (m.training and m.p > 0):
                return False
        c = self.cfg
        return (cache.dtype == self.dtype and cache.device.type == "cpu" and cache.n_layers == len(self.layers)
                and cache.kv_heads == c.kv_n_heads and cache.head_dim == c.head_dim)

    def run(self, input_ids: torch.Tensor, cache, logits_to_keep: int):
        """The step, or None (nothing touched) where a module's setting is one it cannot reproduce."""
        cfg = self.cfg
        B, S = input_ids.shape
        H, Hkv, D = cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
        settings = [L.settings(D) for L in self.layers]  # read before anything is written
        norm_f = self.norm_f_module()
        if norm_f is None or any(st is None for st in settings):
            return None
        try:
            eps_f = float(norm_f.eps)
        except (TypeError, ValueError):
            return None
        buf = self._buffers.get((B, S))
        if buf is None:
            # normal tensors even when the first step runs under torch.inference_mode(): an inference
            # tensor cannot be written in place outside it (a later no_grad step would raise)
            with torch.inference_mode(False):
                buf = self._buffers[(B, S)] = _Buffers(cfg, B, S, self.dtype)
        bv = buf.v
        past = cache.length
        cache.reserve(past + S)
        end = past + S
        code = _ext._torch_codes()[self.dtype]
        starts = cache.row_starts or [0] * B
        es = buf.qkv.element_size()

        # embedding (as the module path: F.embedding, then the embedding_fraction mix)
        x = F.embedding(input_ids, self.model.transformer.wte.weight)
        f = cfg.embedding_fraction
        if f != 1:
            x = x * f + x.detach() * (1 - f)
        buf.stream[0].view(B, S, -1).copy_(x)

        # per-row attention descriptors: (q, k offset, out, seqlen_k) -- one call for the whole batch
        # when no row is padded (the module path's "dense" plan), one per row otherwise ("rows")
        if cache.row_starts is None:
            calls = [(buf.q_desc, 0, buf.attn_desc, end)]
        else:
            q_shape = (1, S, H, D)
            calls = []
            for b, s in enumerate(starts):
                q = (buf.q_desc[0] + b * buf.q_row_bytes, code, q_shape, buf.q_desc[3], -1)
                o = (buf.attn_desc[0] + b * S * H * D * es, code, q_shape, buf.attn_desc[3], -1)
                calls.append((q, (b, s), o, end - s))
        k0 = cache.k[0]
        kst = k0.stride()
        ws_bytes = 0
        for q, _, _, sk in calls:
            kd = (k0.data_ptr(), code, (q[2][0], sk, Hkv, D), kst, -1)
            ws_bytes = max(ws_bytes, _C.attention_fwd_workspace_size(q, kd, kd, self.layers[0].slopes_view, None, None,
                                                                     S, sk, settings[0][0], True))
        ws = torch.empty(ws_bytes, dtype=torch.uint8) if ws_bytes else None  # zeroed before each call
        ws_view = view(ws, "workspace") if ws is not None else None

        cur = 0  # which stream buffer holds the residual stream
        first = True
        for i, L in enumerate(self.layers):
            scale, clip, eps1, eps2 = settings[i]
            # norm_1: LN(x) for the first block, else x <- x + pending (the previous block's branch)
            w, b = L.ln1
            eps = eps1
            if first:
                _C.layer_norm_fwd(bv[f"stream{cur}"], w, b, None, bv["h"], None, None, None, eps, 0)
                first = False
            else:
                _C.layer_norm_fwd(bv["branch"], w, b, bv[f"stream{cur}"], bv["h"], bv[f"stream{1 - cur}"], None,
                                  None, eps, 0)
                cur = 1 - cur
            _linear(buf.rows["h"], L.wqkv, buf.rows["qkv"])
            if clip is not None:
                buf.qkv.clamp_(min=-clip, max=clip)
            kc, vc = cache.k[i], cache.v[i]  # (usable() checked the cache's dtype)
            kc[:, past:end].copy_(buf.k_new)
            vc[:, past:end].copy_(buf.v_new)
            kp, vp, kst = kc.data_ptr(), vc.data_ptr(), kc.stride()
            for q, off, o, sk in calls:
                if off:  # a padded row: its own keys cache[b, start_b:end]
                    rb, s = off
                    shift = (rb * kst[0] + s * kst[1]) * es
                    shape = (1, sk, Hkv, D)
                else:
                    shift, shape = 0, (B, sk, Hkv, D)
                if ws is not None:
                    ws.zero_()  # the launchers' contract: a zero-filled workspace, as _attention_fwd_impl's
                _C.attention_fwd(q, (kp + shift, code, shape, kst, -1), (vp + shift, code, shape, kst, -1), o, None,
                                 L.slopes_view, None, None, S, sk, scale, True, ws_view, 0)
            _linear(buf.rows["attn"], L.out_proj, buf.rows["branch"])
            # norm_2: x <- x + attention; h = LN(x)
            w, b = L.ln2
            eps = eps2
            _C.layer_norm_fwd(bv["branch"], w, b, bv[f"stream{cur}"], bv["h"], bv[f"stream{1 - cur}"], None, None,
                              eps, 0)
            cur = 1 - cur
            _linear(buf.rows["h"], L.up, buf.rows["up"])
            torch._C._nn.gelu(buf.up, out=buf.act)
            _linear(buf.rows["act"], L.down, buf.rows["branch"])
        cache.advance(S)

        w, b = self.norm_f
        _C.layer_norm_fwd(bv["branch"], w, b, bv[f"stream{cur}"], bv["h"], bv[f"stream{1 - cur}"], None, None, eps_f,
                          0)
        h = buf.h
        keep = S if not logits_to_keep or logits_to_keep >= S else logits_to_keep
        if keep != S:
            h = buf.h.view(B, S, -1)[:, S - keep:].reshape(B * keep, -1)
        logits = _few_rows._alloc((B * keep, self.vocab), self.dtype, torch.device("cpu"))
        _linear(_row_passes(h, "x"), self.head, _row_passes(logits, "y"))
        logits = logits.view(B, keep, self.vocab)
        if self.model.logit_scale is not None:
            logits = logits * self.model.logit_scale
        return M.MPTOutput(logits=logits, loss=None, past_key_values=cache)


def _row_passes(t: torch.Tensor, name: str) -> list:
    """Views of a (rows, n) matrix in blocks of the few-row kernel's 8 rows."""
    return [view(t[i:i + _few_rows.MAX_ROWS], name) for i in range(0, t.shape[0], _few_rows.MAX_ROWS)]


def _linear(x_passes: list, weights: tuple, y_passes: list) -> None:
    """y = x W^T (+ b), one few-row kernel call per block of 8 rows (as ops.linear.rows_linear)."""
    for xv, yv in zip(x_passes, y_passes):
        _C.few_rows_linear(xv, *weights, yv)


class _Unsupported(Exception):
    pass
