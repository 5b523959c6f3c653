"""The MPT decoder, readable in one sitting, running on mpt_kernels' ALiBi attention and LayerNorm.

    tokens (B, S) -> wte -> [ norm_1 -> attention -> +residual -> norm_2 -> MLP -> +residual ] x n_layers
                  -> norm_f -> logits = h @ wte.weight.T (tied head)

Parameter names are Hugging Face MPT's (``transformer.blocks.N.attn.Wqkv.weight`` ...), so a state dict
moves between this model and transformers' MptForCausalLM unchanged.

The residual add is fused into the next LayerNorm: each block hands ``(x, branch_out)`` forward and
``mk.layer_norm(branch_out, w, residual=x)`` returns both ``LN(x + branch_out)`` and ``x + branch_out``
from one pass over memory.

Attention plans (``_AttnPlan``), chosen once per forward from the inputs:
- ``dense``: every token of every row is real: one batched call, causal rows aligned bottom-right (so
  the same call serves prefill and decode against a KV cache).
- ``varlen``: padding (attention_mask) and/or packed documents (sequence_id), no cached past: real
  tokens are gathered into one packed (T, H, D) batch and attended per segment via cu_seqlens.
  ALiBi only depends on the distance between query and key inside a segment, so dropping the pad
  tokens gives what MPT/transformers compute with a key-padding mask.
- ``rows``: left-padded rows with a cached past (decode after a padded prefill): the kernel has no
  key-padding mask, so each row attends to its own slice ``cache[b, start_b:]`` (one call per row).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mpt_kernels as mk
from mpt_kernels.ops import linear as _few_rows
from mpt_kernels.ops.loss import cross_entropy as _cross_entropy

from .config import MPTConfig


# ------------------------------------------------------------------------------------------------
# Linear layers: bf16/fp16 GEMMs run in float32 on CPUs without bf16 dot-product instructions
# ------------------------------------------------------------------------------------------------
def _cpu_lacks_bf16_dot() -> bool:
    """AVX2-only CPUs: torch's bf16 GEMM there runs at ~1/5 of the float32 rate, and the NN layout of
    Linear's input gradient hits a further ~15x slower path (measured in benchmarks/NOTES.md). Override
    with MPT_KERNELS_CPU_FP32_GEMM=0/1."""
    env = os.environ.get("MPT_KERNELS_CPU_FP32_GEMM", "auto")
    if env in ("0", "1"):
        return env == "1"
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return not any(x in flags for x in ("avx512_bf16", "amx_bf16"))


_FP32_GEMM_ON_CPU = _cpu_lacks_bf16_dot()
_DIRECT_ROWS = 8  # no-grad calls with at most this many rows skip the float32 copies
# No-grad calls with at most 8 rows run mpt_kernels' few-row linear kernel (tests switch it off to
# compare with the torch paths it replaces).
_FEW_ROWS_KERNEL = True
# Under autocast, LayerNorm reads the 16-bit branch and the float32 stream and writes its output in
# autocast's dtype directly (tests switch it off to compare with the float32 LayerNorm it replaces).
_MIXED_LAYER_NORM = True
# Training forwards hand the fused Wqkv output to mk.alibi_attention_qkvpacked, whose backward writes
# dq, dk, dv into one gradient buffer (no concatenation; see ops/attention.py). False: per-slice calls.
_PACKED_QKV = True


def _pooled(shape, dtype, like: torch.Tensor, pool: bool) -> torch.Tensor:
    return mk._ext.empty(shape, dtype, like.device) if pool else torch.empty(shape, dtype=dtype, device=like.device)


def _float32(t: torch.Tensor, pool: bool) -> torch.Tensor:
    """``t.float()``, into host-pool memory when ``pool``: a fresh multi-MiB buffer pays its page faults on
    every call (4096x4096 bf16 -> float32: 24 ms fresh, 2.7 ms into reused memory, here)."""
    if t.dtype == torch.float32:
        return t
    return _pooled(t.shape, torch.float32, t, pool).copy_(t) if pool else t.float()


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, pool: bool, bias=None, shape=None) -> torch.Tensor:
    """``(a @ b + bias).to(out_dtype)`` with float32 a, b, shaped ``shape`` (default: 2-D); the float32
    product and the converted result in pooled memory when ``pool``, the result then a tensor of its
    own, not a view (FSDP2 warns about module outputs that are views: an in-place op on one would
    skip its pre-backward hook)."""
    rows, cols = a.shape[0], b.shape[1]
    if not pool:
        y = a @ b if bias is None else torch.addmm(bias.float(), a, b)
        y = y.to(out_dtype)
        return y if shape is None else y.view(shape)
    shape = (rows, cols) if shape is None else shape
    y = _pooled(shape if out_dtype == torch.float32 else (rows, cols), torch.float32, a, True)
    if bias is None:
        torch.mm(a, b, out=y.view(rows, cols))
    else:
        torch.addmm(bias.float(), a, b, out=y.view(rows, cols))
    if out_dtype == torch.float32:
        return y
    out = _pooled(shape, out_dtype, y, True)
    out.view(rows, cols).copy_(y)
    return out


class _Float32GemmLinear(torch.autograd.Function):
    """y = x @ w.T + b with low-precision inputs/outputs and float32 GEMMs (saves x and w as they are).
    In plain eager mode the float32 copies and the products live in the host pool (``mk._ext.empty``);
    under compile/export/tracing, ordinary torch allocations."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        pool = mk._ext.direct_call_ok(x, w, b)
        with torch.autocast("cpu", enabled=False):  # float32 products even inside an autocast region
            x2 = _float32(x, pool).reshape(-1, x.shape[-1])
            return _mm(x2, _float32(w, pool).t(), x.dtype, pool, bias=b, shape=(*x.shape[:-1], w.shape[0]))

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        pool = mk._ext.direct_call_ok(g, x, w)
        gx = gw = gb = None
        with torch.autocast("cpu", enabled=False):
            g2 = _float32(g, pool).reshape(-1, g.shape[-1])  # (N, out)
            if ctx.needs_input_grad[0]:
                gx = _mm(g2, _float32(w, pool), x.dtype, pool).view(x.shape)  # (N, in)
            if ctx.needs_input_grad[1]:
                gw = _mm(g2.t(), _float32(x, pool).reshape(-1, x.shape[-1]), w.dtype, pool)  # (out, in)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = g2.sum(0).to(w.dtype)
        return gx, gw, gb


def few_rows_limit(dtype) -> int:
    """The most rows of a no-grad CPU product that ``linear`` gives the few-row kernel: 8 (one pass);
    on CPUs without bf16 dot products, where the alternative is a float32 GEMM on a converted weight
    (or torch's float32 GEMM), up to ``CHUNKED_MAX_ROWS`` in passes of 8 (measured there: 1.2-4x).
    Where torch has fast bf16 GEMMs (AMX, AVX512-BF16) nothing was measured: 8 rows stay the limit."""
    return _few_rows.CHUNKED_MAX_ROWS.get(dtype, 0) if _FP32_GEMM_ON_CPU else _few_rows.MAX_ROWS


def linear(x, weight, bias=None):
    if not x.is_cpu:
        return F.linear(x, weight, bias)
    if (_FEW_ROWS_KERNEL and _few_rows.supported(x, weight, bias, few_rows_limit(x.dtype))
            and mk._ext.direct_call_ok(x, weight, bias) and not torch.is_autocast_enabled("cpu")):
        # Up to 8 rows with nothing to record (decode steps): a read of the weight, once for all rows
        # (mpt_kernels/ops/linear.py): bf16 1.2-1.5x torch's for one row, 3-4x for four. A few more
        # rows (batched decode, short prompts): one such pass per 8 rows (few_rows_limit). First, as
        # it is the per-token path (checks that fail fast on anything else).
        return _few_rows.rows_linear(x, weight, bias)
    if torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
        # (torch.func transforms refuse _Float32GemmLinear's form of autograd.Function)
        return F.linear(x, weight, bias)
    if (x.dtype == torch.float32 and weight.dtype == torch.float32 and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad) and not torch.is_autocast_enabled("cpu")):
        # float32 training on the CPU: the same GEMMs as F.linear, with the output and both gradients
        # in the host pool. torch's fresh multi-MiB tensors pay their page faults on every step (the
        # weight gradients alone are the model's size: ~120k faults, ~0.3 s of an mpt-125m step here).
        return _Float32GemmLinear.apply(x, weight, bias)
    if not _FP32_GEMM_ON_CPU:
        return F.linear(x, weight, bias)
    if torch.is_autocast_enabled("cpu") and x.is_floating_point():
        # CPU autocast would run a bf16 GEMM here (the slow path this function avoids): make the input
        # cast autocast would make, keep the weight as it is, and take the float32 GEMM below, which
        # runs with autocast off. The output has autocast's dtype.
        dt = torch.get_autocast_dtype("cpu")
        if dt in (torch.bfloat16, torch.float16):
            x = x.to(dt)
    if x.dtype not in (torch.bfloat16, torch.float16):
        return F.linear(x, weight, bias)
    if x.numel() <= _DIRECT_ROWS * x.shape[-1] and not torch.is_grad_enabled() and weight.dtype == x.dtype:
        # A few rows (decode steps): memory-bound, and torch's low-precision product reads the
        # weight as it is (half the bytes of a float32 copy, which must also be written first).
        # Measured here, no-grad, bf16 direct vs pooled float32: 4096x4096 at 4 rows 12 vs 16 ms,
        # 16384x4096 at 8 rows 53 vs 78 ms; from ~12 rows on the float32 GEMM wins.
        return F.linear(x, weight, bias)
    return _Float32GemmLinear.apply(x, weight, bias)


class _PooledEmbeddingGrad(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose weight gradient (vocab x d: the size of the LM head) is
    built in host-pool memory: torch's dense embedding backward allocates a fresh zeroed tensor, and
    its page faults cost more than the scatter-add (~38k faults per step at mpt-125m here)."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight_shape = weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        pool = mk._ext.direct_call_ok(g)
        gw = _pooled(ctx.weight_shape, g.dtype, g, pool).zero_()
        gw.index_add_(0, ids.reshape(-1), g.reshape(-1, g.shape[-1]))
        return None, gw


def embedding(ids, weight):
    if (ids.device.type == "cpu" and torch.is_grad_enabled() and weight.requires_grad
            and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()):
        # (torch.func transforms refuse an autograd.Function of this form: F.embedding there)
        return _PooledEmbeddingGrad.apply(ids, weight)
    return F.embedding(ids, weight)


class _PooledGelu(torch.autograd.Function):
    """Exact (erf) GELU whose output and input gradient live in host-pool memory: the FFN's hidden
    activations are the step's largest tensors after the logits, and torch's fresh buffers pay their
    page faults on every call (the GELU's were most of a tiny 8 x 128 CPU step's ~3,800 faults)."""

    @staticmethod
    def forward(ctx, x):  # gelu() has checked x is a plain eager CPU tensor
        ctx.save_for_backward(x)
        return torch.ops.aten.gelu.out(x, out=_pooled(x.shape, x.dtype, x, True))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled() or not mk._ext.direct_call_ok(g, x):
            # create_graph=True (an out= op records no gradient), or tracing/modes: torch's own op
            return torch.ops.aten.gelu_backward(g, x)
        return torch.ops.aten.gelu_backward.grad_input(g, x, grad_input=_pooled(x.shape, x.dtype, x, True))


def gelu(x):
    """``F.gelu(x)`` (exact); on the CPU in eager mode with its buffers from the host pool."""
    # Plain eager tensors only (direct_call_ok of the detached input: no compile, tracing, modes,
    # functorch transform or forward-mode AD, all of which F.gelu handles and this path would not).
    if x.device.type != "cpu" or not x.is_contiguous() or not mk._ext.direct_call_ok(x.detach()):
        return F.gelu(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _PooledGelu.apply(x)
    return torch.ops.aten.gelu.out(x, out=_pooled(x.shape, x.dtype, x, True))


class Linear(nn.Linear):
    def forward(self, x):
        return linear(x, self.weight, self.bias)


# ------------------------------------------------------------------------------------------------
# Attention back ends
# ------------------------------------------------------------------------------------------------
def torch_alibi_attention(q, k, v, *, slopes, softmax_scale, dropout_p=0.0, training=False):
    """Readable reference, as MPT's ``scaled_multihead_dot_product_attention`` and transformers do it:
    dense scores, MPT's key-position ALiBi bias, causal mask aligned bottom-right, float32 softmax.
    q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> (B, Sq, H, D). Memory O(Sq * Sk) per head."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    q = q.transpose(1, 2)  # (B, H, Sq, D)
    k = k.transpose(1, 2).repeat_interleave(H // Hkv, dim=1)  # (B, H, Sk, D)
    v = v.transpose(1, 2).repeat_interleave(H // Hkv, dim=1)  # (B, H, Sk, D)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * softmax_scale  # (B, H, Sq, Sk)
    key_distance = (Sk - 1 - torch.arange(Sk, device=q.device)).float()  # (Sk,)
    scores = scores - slopes.float().view(H, 1, 1) * key_distance  # ALiBi: -slope * (Sk - 1 - j)
    row = torch.arange(Sq, device=q.device).view(Sq, 1) + (Sk - Sq)  # query i sits at key position i+Sk-Sq
    scores = scores.masked_fill(torch.arange(Sk, device=q.device).view(1, Sk) > row, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)  # (B, H, Sq, Sk)
    if dropout_p and training:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v).transpose(1, 2)  # (B, Sq, H, D)


@dataclasses.dataclass
class _AttnPlan:
    kind: str  # "dense" | "varlen" | "rows"
    index: torch.Tensor | None = None  # varlen: flat (B*S) positions of real tokens, None when all are
    cu_seqlens: torch.Tensor | None = None  # varlen: int32 (n_segments + 1,)
    max_seqlen: int = 0
    row_starts: list[int] | None = None  # rows: first real key position in each row of the cache


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------
class KVCache:
    """Per-layer K and V buffers in the layout the attention kernel reads, (B, capacity, Hkv, D).

    New tokens are written in place at ``length``; attention reads the views ``k[:, :length]``. The
    buffers grow in chunks (one copy per growth, never per token); ``generate`` sizes them once for
    prompt + max_new_tokens. ``row_starts`` holds each row's first real position (left padding)."""

    def __init__(self, n_layers, batch_size, kv_heads, head_dim, *, dtype, device, capacity=0, chunk=256):
        self.n_layers, self.batch_size, self.kv_heads, self.head_dim = n_layers, batch_size, kv_heads, head_dim
        self.dtype, self.device, self.chunk = dtype, torch.device(device), chunk
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.capacity = 0
        self.length = 0
        self.row_starts: list[int] | None = None  # None: no padding
        self.reserve(capacity)

    def reserve(self, total: int) -> None:
        """Make room for ``total`` positions (rounded up to the chunk size; grows by at least 1.5x)."""
        if total <= self.capacity:
            return
        new_cap = max(total, self.capacity + self.capacity // 2)
        new_cap = -(-new_cap // self.chunk) * self.chunk
        shape = (self.batch_size, new_cap, self.kv_heads, self.head_dim)
        for i in range(self.n_layers):
            for buf in (self.k, self.v):
                try:
                    new = torch.empty(shape, dtype=self.dtype, device=self.device)
                except RuntimeError as exc:  # (torch.OutOfMemoryError included) the capacity stays as it was
                    gib = 2 * self.n_layers * math.prod(shape) * self.dtype.itemsize / 2**30
                    raise MemoryError(f"KVCache: cannot allocate room for {new_cap} positions x {self.batch_size} "
                                      f"row(s) on {self.device} ({gib:.1f} GiB of keys and values in {self.n_layers} "
                                      f"layers): ask for fewer new tokens (max_new_tokens) or rows") from exc
                if buf[i] is not None and self.length:
                    new[:, : self.length].copy_(buf[i][:, : self.length])
                buf[i] = new
        self.capacity = new_cap

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        """Write (B, S, Hkv, D) at [length, length + S) of ``layer``; return views of all keys/values so
        far, (B, length + S, Hkv, D). ``length`` itself moves in ``advance`` once every layer wrote."""
        end = self.length + k_new.shape[1]
        if end > self.capacity:
            raise RuntimeError("KVCache.update: call reserve() first")  # the model always does
        if k_new.dtype != self.dtype:
            raise ValueError(f"past_key_values: the cache holds {self.dtype} but this forward makes {k_new.dtype} "
                             "keys (an autocast region?): make the cache with model.new_cache() in the same "
                             "autocast region as the forward")
        self.k[layer][:, self.length:end].copy_(k_new)
        self.v[layer][:, self.length:end].copy_(v_new)
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (beam search / dropping finished rows): an integer tensor (or a list of
        row indices) on any device; a CUDA cache gets it moved to its device (index_select on CUDA
        refuses a host index)."""
        rows = torch.as_tensor(rows)
        idx = rows.tolist()
        rows = rows.to(self.device)
        for buf in (self.k, self.v):
            for i in range(self.n_layers):
                if buf[i] is not None:  # nothing allocated yet: an empty cache
                    buf[i] = buf[i].index_select(0, rows)
        if self.row_starts is not None:
            self.row_starts = [self.row_starts[j] for j in idx]
        self.batch_size = len(idx)

    def __len__(self) -> int:
        return self.length


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """MPT's low-precision LayerNorm on ``mk.layer_norm`` (float32 statistics, activation-dtype output).
    ``forward(x, residual)`` returns ``(LN(x + residual), x + residual)`` from one fused pass."""

    def __init__(self, dim: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x, residual=None):
        stream = x if residual is None else residual
        out_dtype = None
        if (_MIXED_LAYER_NORM and stream.dtype == torch.float32 and self.weight.dtype == torch.float32
                and stream.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(stream.device.type)):
            # autocast: float32 residual stream and weights, 16-bit branches. The kernel adds the branch
            # to the stream in float32 and writes the output in autocast's dtype, the dtype the next
            # Linear would cast it to: no float32 copy of the branch, no 16-bit copy of the output.
            dt = torch.get_autocast_dtype(stream.device.type)
            if dt in (torch.bfloat16, torch.float16) and x.dtype in (torch.float32, dt):
                out_dtype = dt
        if residual is not None and x.dtype != residual.dtype and out_dtype is None:
            # the branch in another dtype than the stream, outside the case above: keep the stream's
            # dtype, as torch's promotion of ``residual + x`` would.
            x = x.to(residual.dtype)
        return mk.layer_norm(x, self.weight, self.bias, self.eps, residual=residual, out_dtype=out_dtype)


class MPTAttention(nn.Module):
    def __init__(self, cfg: MPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
        self.clip_qkv = cfg.attn_config["clip_qkv"]
        self.softmax_scale = cfg.softmax_scale
        self.alibi_bias_max = float(cfg.attn_config["alibi_bias_max"])
        self.attn_pdrop = float(cfg.attn_config["attn_pdrop"])
        self.use_kernel = cfg.uses_kernel_attention
        bias = not cfg.no_bias
        self.Wqkv = Linear(cfg.d_model, (self.n_heads + 2 * self.kv_heads) * self.head_dim, bias=bias)
        # (fan-in init per q/k/v slice, see init_weights)
        self.Wqkv._fused = (cfg.d_model, cfg.d_model + self.kv_heads * self.head_dim)
        if cfg.attn_config["qk_ln"]:
            self.q_ln = LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, bias)
            self.k_ln = LayerNorm(self.kv_heads * self.head_dim, cfg.layer_norm_epsilon, bias)
        self.out_proj = Linear(cfg.d_model, cfg.d_model, bias=bias)
        self.out_proj._is_residual = True
        self._slopes: dict[torch.device, torch.Tensor] = {}  # float32 always, so not a (castable) buffer

    def slopes(self, device) -> torch.Tensor:
        s = self._slopes.get(device)
        if s is None:
            s = self._slopes[device] = mk.alibi_slopes(self.n_heads, self.alibi_bias_max).to(device)
        return s

    def forward(self, x: torch.Tensor, plan: _AttnPlan, cache: KVCache | None = None) -> torch.Tensor:
        if self.training and self.attn_pdrop and self.use_kernel:
            raise ValueError(f"attn_config.attn_pdrop={self.attn_pdrop} in training mode: the flash kernel has no "
                             "attention dropout; train with attn_config.attn_impl='torch' or attn_pdrop=0 "
                             "(in eval mode, where dropout is off, the kernel runs)")
        B, S, _ = x.shape
        H, Hkv, D = self.n_heads, self.kv_heads, self.head_dim
        qkv = self.Wqkv(x)  # (B, S, (H + 2*Hkv) * D)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        if (_PACKED_QKV and self.use_kernel and cache is None and not hasattr(self, "q_ln")
                and plan.kind in ("dense", "varlen")
                and torch.is_grad_enabled() and qkv.requires_grad):
            # training: the kernel's backward writes dq, dk, dv into one buffer shaped like qkv (no concat)
            return self.out_proj(self._attend_packed(qkv, plan).reshape(B, S, H * D))
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        if hasattr(self, "q_ln"):
            q, k = self.q_ln(q), self.k_ln(k)
        # Views of the Wqkv output: only the last dim is contiguous, which is all the kernel needs.
        q = q.unflatten(-1, (H, D))  # (B, S, H, D)
        k = k.unflatten(-1, (Hkv, D))  # (B, S, Hkv, D)
        v = v.unflatten(-1, (Hkv, D))  # (B, S, Hkv, D)
        if cache is not None:
            k_all, v_all = cache.update(self.layer_idx, k, v)  # (B, past + S, Hkv, D) views of the cache
            if plan.kind != "varlen":  # varlen runs only on an empty past, where k_all == k
                k, v = k_all, v_all
        y = self._attend(q, k, v, plan)  # (B, S, H, D)
        return self.out_proj(y.reshape(B, S, H * D))

    def _attend_packed(self, qkv, plan: _AttnPlan) -> torch.Tensor:
        B, S, _ = qkv.shape
        kw = dict(causal=True, softmax_scale=self.softmax_scale, alibi_slopes=self.slopes(qkv.device))
        if plan.kind == "dense":
            return mk.alibi_attention_qkvpacked(qkv, self.n_heads, self.kv_heads, **kw)  # (B, S, H, D)
        flat = qkv.reshape(B * S, qkv.shape[-1])
        if plan.index is not None:  # drop pad tokens: (T, (H + 2 Hkv) D), one gather for q, k and v
            flat = flat[plan.index]
        out = mk.alibi_attention_qkvpacked(flat, self.n_heads, self.kv_heads, cu_seqlens=plan.cu_seqlens,
                                           max_seqlen=plan.max_seqlen, **kw)  # (T, H, D)
        if plan.index is not None:
            out = out.new_zeros(B * S, self.n_heads, self.head_dim).index_copy(0, plan.index, out)
        return out.view(B, S, self.n_heads, self.head_dim)

    def _attend(self, q, k, v, plan: _AttnPlan) -> torch.Tensor:
        if plan.kind == "dense":
            return self._attention(q, k, v)
        if plan.kind == "rows":
            rows = [self._attention(q[b:b + 1], k[b:b + 1, s:], v[b:b + 1, s:]) for b, s in enumerate(plan.row_starts)]
            return torch.cat(rows, dim=0)  # (B, S, H, D)
        B, S, H, D = q.shape
        qf = q.reshape(B * S, H, D)  # still a view: (B, S) merge over the Wqkv rows
        kf = k.reshape(B * S, k.shape[2], D)
        vf = v.reshape(B * S, v.shape[2], D)
        if plan.index is not None:  # drop pad tokens: (T, heads, D)
            qf, kf, vf = qf[plan.index], kf[plan.index], vf[plan.index]
        out = self._attention(qf, kf, vf, plan)  # (T, H, D)
        if plan.index is not None:
            out = out.new_zeros(B * S, H, D).index_copy(0, plan.index, out)  # pad tokens get zeros
        return out.view(B, S, H, D)

    def _attention(self, q, k, v, plan: _AttnPlan | None = None):
        slopes = self.slopes(q.device)
        if self.use_kernel:
            if plan is None:
                return mk.alibi_attention(q, k, v, causal=True, softmax_scale=self.softmax_scale, alibi_slopes=slopes)
            return mk.alibi_attention(q, k, v, causal=True, softmax_scale=self.softmax_scale, alibi_slopes=slopes,
                                      cu_seqlens_q=plan.cu_seqlens, cu_seqlens_k=plan.cu_seqlens,
                                      max_seqlen_q=plan.max_seqlen, max_seqlen_k=plan.max_seqlen)
        kw = dict(slopes=slopes, softmax_scale=self.softmax_scale, dropout_p=self.attn_pdrop, training=self.training)
        if plan is None:
            return torch_alibi_attention(q, k, v, **kw)
        cu = plan.cu_seqlens.tolist()
        segs = [torch_alibi_attention(q[None, a:b], k[None, a:b], v[None, a:b], **kw)[0] for a, b in zip(cu, cu[1:])]
        return torch.cat(segs, dim=0)  # (T, H, D)


class MPTMLP(nn.Module):
    def __init__(self, cfg: MPTConfig):
        super().__init__()
        self.up_proj = Linear(cfg.d_model, cfg.ffn_hidden_size, bias=not cfg.no_bias)
        self.down_proj = Linear(cfg.ffn_hidden_size, cfg.d_model, bias=not cfg.no_bias)
        self.down_proj._is_residual = True

    def forward(self, x):
        return self.down_proj(gelu(self.up_proj(x)))  # exact (erf) GELU, as MPT


class MPTBlock(nn.Module):
    def __init__(self, cfg: MPTConfig, layer_idx: int):
        super().__init__()
        bias = not cfg.no_bias
        self.norm_1 = LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, bias)
        self.attn = MPTAttention(cfg, layer_idx)
        self.norm_2 = LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, bias)
        self.ffn = MPTMLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x, pending, plan, cache=None):
        """x: the residual stream (B, S, d); pending: the previous block's branch output not yet added
        (None for the first block). Returns the new (x, pending)."""
        if pending is None:
            h = self.norm_1(x)
        else:
            h, x = self.norm_1(pending, residual=x)  # x <- x + pending; h = LN(x)
        a = self.resid_dropout(self.attn(h, plan, cache))  # (B, S, d)
        h, x = self.norm_2(a, residual=x)  # x <- x + attention; h = LN(x)
        return x, self.resid_dropout(self.ffn(h))


class MPTModel(nn.Module):
    def __init__(self, cfg: MPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.emb_drop = nn.Dropout(cfg.emb_pdrop)
        self.blocks = nn.ModuleList([MPTBlock(cfg, i) for i in range(cfg.n_layers)])
        self.norm_f = LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, not cfg.no_bias)


@dataclasses.dataclass
class MPTOutput:
    logits: torch.Tensor  # (B, S, vocab) float in the model dtype (or the last ``logits_to_keep`` positions)
    loss: torch.Tensor | None = None  # mean next-token cross entropy over labels != -100
    past_key_values: KVCache | None = None

    def __getitem__(self, i):  # tuple-style access, as transformers' outputs
        return [x for x in (self.loss, self.logits, self.past_key_values) if x is not None][i]


class MPTForCausalLM(nn.Module):
    """MPT decoder with a (by default tied) language-model head. See the module docstring."""

    def __init__(self, config: MPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = MPTModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        ls = config.logit_scale
        self.logit_scale = 1.0 / math.sqrt(config.d_model) if ls == "inv_sqrt_d_model" else ls
        init_weights(self)

    # ---- conveniences ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied head counts once

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at ``seq_len``, llm-foundry's MFU formula:
        3 * (2 * n_params + 2 * 2 * n_layers * d_model * seq_len). Forward alone is a third of it."""
        c = self.config
        return 3.0 * (2.0 * self.num_parameters() + 4.0 * c.n_layers * c.d_model * seq_len)

    def new_cache(self, batch_size: int, capacity: int = 0) -> KVCache:
        """A KV cache in the dtype the attention's keys have here: the weights' dtype, or autocast's
        when an autocast region for this device is active and the weights are float32 (bf16 training
        samples inside its autocast region)."""
        c = self.config
        dtype, dev = self.dtype, self.device.type
        if dtype == torch.float32 and dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
        return KVCache(c.n_layers, batch_size, c.kv_n_heads, c.head_dim, dtype=dtype, device=self.device,
                       capacity=capacity)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                sequence_id: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                logits_to_keep: int = 0) -> MPTOutput:
        """input_ids (B, S) int; attention_mask (B, S) or (B, past + S) with 1 for real tokens (padding on
        the left, or on the right without a cache); sequence_id (B, S): packed documents attend only
        within their own id; labels (B, S): next-token targets, shifted inside, -100 ignored;
        past_key_values: a KVCache to read and extend (``use_cache=True`` makes one when None);
        logits_to_keep: compute logits only for the last N positions (0: all)."""
        self._check_ids(input_ids, labels)
        return self._forward(input_ids, attention_mask, sequence_id, labels, past_key_values, use_cache,
                             logits_to_keep)

    def _check_ids(self, input_ids, labels=None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids: expected an integer tensor of shape (batch, seqlen)")
        if input_ids.dtype not in (torch.int64, torch.int32):
            # (the embedding takes only these two; generate refuses the same)
            raise ValueError(f"input_ids: expected int64 or int32 ids, got {input_ids.dtype} (convert with .long())")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids: empty sequence")
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            # Reading the range back is a data-dependent branch (a graph break); compiled graphs skip it
            # (an out-of-range id then fails inside the embedding: an IndexError on the CPU, a device
            # assert on CUDA). So do torch.func transforms: vmap cannot read a batched tensor back.
            return
        ranges = [r.long() for r in torch.aminmax(input_ids)]
        if (isinstance(labels, torch.Tensor) and labels.shape == input_ids.shape and labels.shape[1] > 1
                and not labels.dtype.is_floating_point and labels.device == input_ids.device):
            # The labels' range too (the ignored -100s mapped into range), in the same read-back: the
            # fused loss gives a NaN for an out-of-range target on CUDA rather than syncing to check.
            counted = labels[:, 1:].long()  # the targets the loss reads (the first label is never one)
            ranges += list(torch.aminmax(torch.where(counted == -100, 0, counted)))
        got = torch.stack(ranges).tolist()  # one read-back for all (one CUDA sync)
        lo, hi = got[0], got[1]
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids: ids must be in [0, {self.config.vocab_size}), got range [{lo}, {hi}]")
        if len(got) > 2 and (got[2] < 0 or got[3] >= self.config.vocab_size):
            raise ValueError(f"labels: must be in [0, {self.config.vocab_size}) or -100, got range [{got[2]}, {got[3]}]")

    def _forward(self, input_ids, attention_mask, sequence_id, labels, cache, use_cache, logits_to_keep):
        if cache is not None and cache.length and attention_mask is None and sequence_id is None and labels is None:
            # A CPU decode step: the same kernels without the per-op Python, where that is certain to
            # compute the same (decode.py says when); None: the module path below.
            out = _decode.step(self, input_ids, cache, logits_to_keep)
            if out is not None:
                return out
        B, S = input_ids.shape
        if use_cache and cache is None:
            cache = self.new_cache(B, capacity=S)
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"past_key_values: cache holds {cache.batch_size} rows, input_ids has {B}")
        plan = self._plan(B, S, attention_mask, sequence_id, cache, input_ids.device)
        if cache is not None:
            cache.reserve(cache.length + S)

        x = embedding(input_ids, self.transformer.wte.weight)  # (B, S, d)
        f = self.config.embedding_fraction
        if f != 1:  # scale the embedding gradient only (MPT's trick for stabler training)
            x = x * f + x.detach() * (1 - f)
        x = self.transformer.emb_drop(x)
        pending = None
        for block in self.transformer.blocks:
            x, pending = block(x, pending, plan, cache)
        if cache is not None:
            cache.advance(S)
        h, _ = self.transformer.norm_f(pending, residual=x)  # (B, S, d)

        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        w = self.transformer.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight
        logits = linear(h, w)  # (B, S, vocab)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale

        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels: expected shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
            if logits_to_keep:
                raise ValueError("labels: cannot compute a loss with logits_to_keep")
            # Targets shifted left, the last position ignored: the same mean as slicing logits[:, :-1],
            # without the slice's backward (a zero-filled copy of the whole logits tensor: 412 MB at
            # mpt-125m x 2048 tokens in float32).
            targets = F.pad(labels[:, 1:].long(), (0, 1), value=-100)
            # Fused kernel: reads the logits in their dtype (no float32 copy, log-softmax or gradient
            # buffers the size of the logits), float32 arithmetic (mpt_kernels/ops/loss.py).
            loss = _cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return MPTOutput(logits=logits, loss=loss, past_key_values=cache)

    def _plan(self, B, S, attention_mask, sequence_id, cache, device) -> _AttnPlan:
        past = cache.length if cache is not None else 0
        if cache is not None and not past:
            # An empty cache holds no padding: this prefill's mask (below) decides. Starts left by a
            # prefill that raised before advancing the cache would skew every later decode step.
            cache.row_starts = None
        if attention_mask is not None:
            # (!= twice, not `not in (S, past + S)`: Dynamo evaluates `int in (SymInt, ...)` as False once
            # the sequence length is dynamic, and raised this error for a mask of the right shape)
            if (attention_mask.dim() != 2 or attention_mask.shape[0] != B
                    or (attention_mask.shape[1] != S and attention_mask.shape[1] != past + S)):
                shapes = f"({B}, {S})" + (f" (the new tokens) or ({B}, {past + S}) (the cached and new ones)"
                                          if past else "")
                raise ValueError(f"attention_mask: expected shape {shapes}, got {tuple(attention_mask.shape)}")
            mask = attention_mask.to(device=device, dtype=torch.bool)
            if past and mask.shape[1] == past + S:
                new = mask[:, past:]
                if not bool(new.all()):
                    raise ValueError("attention_mask: tokens appended to a KV cache must all be real (1)" + _CHUNKS)
                starts = _row_starts(mask, right_padding_ok=False, chunked=True)
                if starts != (cache.row_starts or [0] * B):
                    raise ValueError("attention_mask: does not match the padding the cache was filled with")
                mask = None if cache.row_starts is None else mask
            elif past:
                if not bool(mask.all()):
                    raise ValueError("attention_mask: tokens appended to a KV cache must all be real (1)" + _CHUNKS)
                mask = None
            elif bool(mask.all()):
                mask = None
        else:
            mask = None
        if sequence_id is not None:
            if cache is not None:
                raise ValueError("sequence_id: not supported together with a KV cache")
            if sequence_id.shape != (B, S):
                raise ValueError(f"sequence_id: expected shape ({B}, {S}), got {tuple(sequence_id.shape)}")

        if cache is not None and past:
            if cache.row_starts is None:
                return _AttnPlan("dense")
            return _AttnPlan("rows", row_starts=cache.row_starts)

        if mask is None and sequence_id is None:
            return _AttnPlan("dense")

        # varlen: pack real tokens, one segment per (row, document)
        valid = mask if mask is not None else torch.ones(B, S, dtype=torch.bool, device=device)
        if mask is not None:
            starts = _row_starts(mask, right_padding_ok=cache is None, chunked=cache is not None)
            if cache is not None:
                cache.row_starts = starts
        new_seg = valid.clone()
        new_seg[:, 1:] &= ~valid[:, :-1]  # first real token of each row
        if sequence_id is not None:
            sid = sequence_id.to(device)
            new_seg[:, 1:] |= valid[:, 1:] & (sid[:, 1:] != sid[:, :-1])
        flat_valid = valid.flatten()
        index = None if mask is None else flat_valid.nonzero().flatten()
        seg_start = new_seg.flatten()[flat_valid]  # (T,) bool in packed order
        T = int(seg_start.numel())
        if T == 0:
            raise ValueError("attention_mask: no real tokens at all")
        bounds = torch.cat([seg_start.nonzero().flatten(), torch.tensor([T], device=device)])
        with torch.inference_mode(False):
            # A tensor with a version counter even under inference_mode (generate, transformers'
            # pipelines): the attention op then checks device offsets once per forward (_ext.LastResult),
            # not with a read-back in every layer.
            cu = bounds.to(torch.int32)
        return _AttnPlan("varlen", index=index, cu_seqlens=cu, max_seqlen=int((bounds[1:] - bounds[:-1]).max()))

    # ---- checkpoints and generation (implemented in checkpoint.py / generation.py) -----------------
    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, attn_impl: str | None = "flash", strict=True):
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, attn_impl=attn_impl, strict=strict)

    def save_pretrained(self, path, max_shard_size: int | str = "5GB", *, eos_token_id: int | None = None,
                        bos_token_id: int | None = None) -> None:
        """config.json + safetensors, loadable by ``from_pretrained`` and transformers. Token ids given here
        go into config.json and a generation_config.json (transformers' ``generate`` stops at the EOS)."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, eos_token_id=eos_token_id,
                        bos_token_id=bos_token_id)

    @torch.no_grad()
    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow (or shrink) the vocabulary to ``vocab_size`` rows, in place: the embedding and, when not
        tied, the LM head. New rows start at the mean of the existing rows (so the new tokens' logits
        start at the average logit, not at random); ``config.vocab_size`` follows."""
        vocab_size = int(vocab_size)
        if vocab_size < 1:
            raise ValueError(f"vocab_size: must be >= 1, got {vocab_size}")
        old = self.config.vocab_size
        if vocab_size == old:
            return

        def resized(w: torch.Tensor) -> nn.Parameter:
            new = torch.empty(vocab_size, w.shape[1], dtype=w.dtype, device=w.device)
            keep = min(old, vocab_size)
            new[:keep] = w[:keep]
            if vocab_size > old:
                new[old:] = w.float().mean(0).to(w.dtype)
            return nn.Parameter(new, requires_grad=w.requires_grad)

        wte = self.transformer.wte
        wte.weight = resized(wte.weight)
        wte.num_embeddings = vocab_size
        if not self.config.tie_word_embeddings:
            self.lm_head.weight = resized(self.lm_head.weight)
            self.lm_head.out_features = vocab_size
        self.config = self.config.replace(vocab_size=vocab_size)

    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | list[int] | None = None, attention_mask=None,
                 streamer=None, pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 past_key_values: KVCache | None = None):
        """See ``mpt_kernels.model.generation.generate``; ``past_key_values`` continues from a cache."""
        from .generation import generate

        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, attention_mask=attention_mask, streamer=streamer,
                        pad_token_id=pad_token_id, generator=generator, past_key_values=past_key_values)


_CHUNKS = ("; a prefill split into chunks (forward calls with past_key_values) must hold all of a row's "
           "padding and at least one of its real tokens in the first chunk, later chunks real tokens only")


def _row_starts(mask: torch.Tensor, right_padding_ok: bool, chunked: bool = False) -> list[int]:
    """First real position of each row; checks every row's real tokens form one contiguous block
    (left and/or right padding), else ALiBi distances would silently differ from a dense mask.
    ``chunked``: the mask of a forward with a KV cache (the errors then say how to chunk a prefill)."""
    B, L = mask.shape
    pos = torch.arange(L, device=mask.device)
    count = mask.sum(1)
    first = torch.where(mask, pos, L).amin(1)
    last = torch.where(mask, pos, -1).amax(1)
    if bool((count == 0).any()):
        row = int((count == 0).nonzero()[0])
        raise ValueError(f"attention_mask: row {row} has no real tokens" + (_CHUNKS if chunked else ""))
    if bool((last - first + 1 != count).any()):
        raise ValueError("attention_mask: real tokens of a row must be contiguous (left or right padding only)")
    if not right_padding_ok and bool((last != L - 1).any()):
        raise ValueError("attention_mask: with a KV cache only left padding is supported")
    return first.tolist()


# ------------------------------------------------------------------------------------------------
# llm-foundry's parameter initialisation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def init_weights(model: MPTForCausalLM, modules=None) -> None:
    """As llm-foundry's ``generic_param_init_fn_``: Linear and Embedding weights drawn by ``init_config``
    (default kaiming-normal, fan-in, relu gain); fused Wqkv initialised per q/k/v slice; the residual
    output projections (attn.out_proj, ffn.down_proj) divided by sqrt(2 * n_layers); biases zero;
    LayerNorm weight one. ``modules``: only these submodules (default: all)."""
    cfg = model.config
    ic = cfg.init_config
    div = ic["init_div_is_residual"]
    if div is True:
        div = math.sqrt(2 * cfg.n_layers)
    elif div is False or div is None:
        div = 1.0
    else:
        div = float(div)

    def init_(w):
        name = ic["name"]
        if name == "kaiming_normal_":
            nn.init.kaiming_normal_(w, a=ic["init_gain"], mode=ic["fan_mode"], nonlinearity=ic["init_nonlinearity"])
        elif name == "kaiming_uniform_":
            nn.init.kaiming_uniform_(w, a=ic["init_gain"], mode=ic["fan_mode"], nonlinearity=ic["init_nonlinearity"])
        elif name == "baseline_":
            if ic["init_std"] is None:
                raise ValueError("init_config.init_std is required for baseline_ init")
            nn.init.normal_(w, 0.0, ic["init_std"])
        elif name == "small_init_":
            nn.init.normal_(w, 0.0, math.sqrt(2 / (5 * cfg.d_model)))

    for module in (model.modules() if modules is None else modules):
        if isinstance(module, nn.Linear):
            fused = getattr(module, "_fused", None)
            if fused:
                bounds = (0, *fused, module.weight.shape[0])
                for a, b in zip(bounds, bounds[1:]):
                    init_(module.weight[a:b])
            else:
                init_(module.weight)
            if module.bias is not None:
                module.bias.zero_()
            if getattr(module, "_is_residual", False):
                module.weight.div_(div)
        elif isinstance(module, nn.Embedding):
            if ic["emb_init_std"] is not None:
                nn.init.normal_(module.weight, 0.0, ic["emb_init_std"])
            elif ic["emb_init_uniform_lim"] is not None:
                lim = ic["emb_init_uniform_lim"]
                lo, hi = (-lim, lim) if isinstance(lim, (int, float)) else lim
                nn.init.uniform_(module.weight, lo, hi)
            else:
                init_(module.weight)
        elif isinstance(module, LayerNorm):
            module.weight.fill_(1.0)
            if module.bias is not None:
                module.bias.zero_()


from . import decode as _decode  # noqa: E402  (it builds on the classes above)
