"""Plain, readable torch references for every op. Tests compare the kernels against these run in
float64; the model's ``attn_impl="torch"`` path uses them too. Nothing here is fast on purpose."""
from __future__ import annotations

import math
import numbers

import torch


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8.0, device=None) -> torch.Tensor:
    """MPT's ``gen_slopes``: ``1 / 2**(i * alibi_bias_max / H')`` for i = 1..H' (H' the next power
    of two), interleaved ``[s[1::2], s[::2]][:H]`` when H is not a power of two. float32 (n_heads,)."""
    if isinstance(n_heads, bool) or not isinstance(n_heads, (numbers.Integral, torch.SymInt)):
        raise ValueError(f"n_heads: expected an int, got {n_heads!r}")
    if isinstance(alibi_bias_max, bool) or not isinstance(alibi_bias_max, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise ValueError(f"alibi_bias_max: expected a number, got {alibi_bias_max!r}")
    if n_heads <= 0:
        raise ValueError(f"n_heads: must be positive, got {n_heads}")
    padded = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, padded + 1, dtype=torch.float32, device=device) * (alibi_bias_max / padded)
    slopes = 1.0 / torch.pow(2, m)
    if padded != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def alibi_bias(slopes: torch.Tensor, seqlen_q: int, seqlen_k: int, dtype=torch.float32) -> torch.Tensor:
    """Dense MPT key-position bias, shape (..., n_heads, seqlen_q, seqlen_k): ``-slope * (seqlen_k-1-j)``.
    ``slopes`` is (n_heads,) or (batch, n_heads)."""
    dist = (seqlen_k - 1 - torch.arange(seqlen_k, device=slopes.device)).to(dtype)  # (Sk,)
    bias = -slopes.to(dtype)[..., None, None] * dist  # (..., H, 1, Sk)
    return bias.expand(*slopes.shape, seqlen_q, seqlen_k)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    return_lse: bool = False,
):
    """Batched reference: q (B, Sq, H, D), k/v (B, Sk, Hkv, D); slopes (H,) or (B, H) or None (no bias).
    Causal rows are aligned to the bottom-right. Computes in ``compute_dtype`` (default q's dtype) and
    returns the output in q's dtype (and the float32 logsumexp (B, H, Sq) if asked)."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    ct = compute_dtype or q.dtype
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qh = q.to(ct).permute(0, 2, 1, 3)  # (B, H, Sq, D)
    kh = k.to(ct).permute(0, 2, 1, 3).repeat_interleave(H // Hkv, dim=1)  # (B, H, Sk, D)
    vh = v.to(ct).permute(0, 2, 1, 3).repeat_interleave(H // Hkv, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if alibi_slopes is not None:
        s = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None].expand(B, H)
        scores = scores + alibi_bias(s.to(q.device), Sq, Sk, dtype=ct)
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (Sk - Sq), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq)
    probs = torch.exp(scores - lse[..., None])
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key (Sk == 0) give zeros
    out = torch.matmul(probs, vh).permute(0, 2, 1, 3).to(q.dtype)  # (B, Sq, H, D)
    if return_lse:
        return out, lse.float()
    return out


def attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, **kw):
    """Varlen reference: q (Tq, H, D), k/v (Tk, Hkv, D); each sequence attended independently."""
    outs = []
    slopes = kw.pop("alibi_slopes", None)
    for b in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        s = None
        if slopes is not None:
            s = slopes[b] if slopes.dim() == 2 else slopes
        outs.append(attention_reference(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], alibi_slopes=s, **kw)[0])
    return torch.cat(outs, dim=0)


def layer_norm_reference(x, weight, bias=None, eps: float = 1e-5, residual=None, compute_dtype=torch.float32):
    """MPT's low-precision LayerNorm: statistics in ``compute_dtype``, output in x's dtype.
    With ``residual``: returns (layer_norm(x + residual), x + residual)."""
    h = x
    if residual is not None:
        h = (x.to(compute_dtype) + residual.to(compute_dtype)).to(x.dtype)
    hf = h.to(compute_dtype)
    mean = hf.mean(dim=-1, keepdim=True)
    var = (hf - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (hf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(compute_dtype)
    if bias is not None:
        y = y + bias.to(compute_dtype)
    y = y.to(x.dtype)
    return (y, h) if residual is not None else y


@torch.no_grad()
def lion_step_reference(param, grad, exp_avg, *, lr, beta1, beta2, decay):
    """One Lion step in place (any dtype; tests run it in float64):
    c = b1*m + (1-b1)*g;  p = p*(1-decay) - lr*sign(c);  m = b2*m + (1-b2)*g, with sign(NaN) = NaN
    (torch.sign gives 0 there)."""
    c = exp_avg * beta1 + grad * (1 - beta1)
    param.mul_(1 - decay).add_(torch.where(torch.isnan(c), c, torch.sign(c)), alpha=-lr)
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
