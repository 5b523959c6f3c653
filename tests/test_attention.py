"""ALiBi flash attention (csrc/attention, mpt_kernels/ops/attention.py) against a float64 reference.

Error bounds follow the FlashAttention test convention: the kernel's max error against the float64
reference must be at most twice PyTorch's own max error when it computes the same attention in the
same dtype, plus a small atol. The kernel computes in float32 whatever the storage dtype, so its error
is mostly the final rounding of the output; PyTorch's low-precision path rounds the scores, the
probabilities and the output, so "2x PyTorch's error" is a bound a correct kernel meets with margin
and a wrong one (a mask off by one, a dropped tile, a bad rescale) misses by orders of magnitude.

Helpers at module level (make_qkv, fwd_C, bwd_C, reference_fwd, torch_lowp_attention, ...) take a
device argument so tests/test_attention_cuda.py can reuse them.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from _subproc import NEUTRAL_CWD, subprocess_env
import mpt_kernels as mk
from mpt_kernels._ext import _C, view
from mpt_kernels.ops import reference as R
from mpt_kernels.ops.attention import alibi_attention_bwd, alibi_attention_fwd

NAN = float("nan")

# atol added to "2 x PyTorch's error": about a quarter of the dtype's rounding step at 1.0 for the
# low-precision types (covers a single rounding of an output whose reference error is tiny), and a
# few float32 ulps for float32 (sums of up to 1025 terms reordered by the tiling).
ATOL = {torch.float32: 2e-5, torch.bfloat16: 1e-3, torch.float16: 2e-4}


# ----------------------------------------------------------------------------- helpers


def make_qkv(B, Sq, Sk, H, Hkv, D, dtype, device="cpu", fused=False):
    """Fresh random q (B, Sq, H, D), k, v (B, Sk, Hkv, D). fused=True returns non-contiguous views
    into one (B, S, H + 2 Hkv, D) buffer, like slices of MPT's fused Wqkv output (needs Sq == Sk)."""
    if fused:
        assert Sq == Sk
        qkv = torch.randn(B, Sq, H + 2 * Hkv, D, dtype=dtype, device=device)
        return qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]
    q = torch.randn(B, Sq, H, D, dtype=dtype, device=device)
    k = torch.randn(B, Sk, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, Sk, Hkv, D, dtype=dtype, device=device)
    return q, k, v


def make_slopes(kind, B, H, device="cpu"):
    if kind == "mpt":
        return mk.alibi_slopes(H).to(device)
    # Random slopes per (batch, head), up to 0.5 (the steepest MPT slope with alibi_bias_max=8 at 8 heads).
    return (torch.rand(B, H, device=device) * 0.5).float()


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def fwd_C(q, k, v, slopes, causal, scale=None, cu_q=None, cu_k=None, max_sq=None, max_sk=None):
    """Forward straight through _C with out and lse poisoned (NaN), so any unwritten element fails.
    Returns (out, lse, workspace_bytes)."""
    varlen = cu_q is not None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not varlen:
        max_sq, max_sk = q.shape[1], k.shape[1]
    out = torch.full(q.shape, NAN, dtype=q.dtype, device=q.device)
    lse = torch.full(_lse_shape(q, varlen), NAN, dtype=torch.float32, device=q.device)
    args = (view(q, "q"), view(k, "k"), view(v, "v"), None if slopes is None else view(slopes, "alibi_slopes"),
            None if cu_q is None else view(cu_q), None if cu_k is None else view(cu_k), max_sq, max_sk, scale, causal)
    nbytes = _C.attention_fwd_workspace_size(*args)
    ws = torch.zeros(nbytes, dtype=torch.uint8, device=q.device) if nbytes else None
    stream = torch.cuda.current_stream().cuda_stream if q.is_cuda else 0
    _C.attention_fwd(args[0], args[1], args[2], view(out), view(lse), *args[3:],
                     None if ws is None else view(ws), stream)
    return out, lse, nbytes


def bwd_C(dout, q, k, v, out, lse, slopes, causal, scale=None, cu_q=None, cu_k=None, max_sq=None, max_sk=None):
    """Backward straight through _C with dq, dk, dv poisoned (NaN)."""
    varlen = cu_q is not None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not varlen:
        max_sq, max_sk = q.shape[1], k.shape[1]
    dq, dk, dv = (torch.full(t.shape, NAN, dtype=t.dtype, device=t.device) for t in (q, k, v))
    args = (view(q), view(k), view(v), None if slopes is None else view(slopes), None if cu_q is None else view(cu_q),
            None if cu_k is None else view(cu_k), max_sq, max_sk, scale, causal)
    nbytes = _C.attention_bwd_workspace_size(*args)
    ws = torch.zeros(nbytes, dtype=torch.uint8, device=q.device) if nbytes else None
    stream = torch.cuda.current_stream().cuda_stream if q.is_cuda else 0
    _C.attention_bwd(view(dout), args[0], args[1], args[2], view(out), view(lse), view(dq), view(dk), view(dv),
                     *args[3:], None if ws is None else view(ws), stream)
    return dq, dk, dv


def reference_fwd(q, k, v, slopes, causal, scale=None):
    """float64 reference (mpt_kernels.ops.reference builds the bias itself): (out float64, lse)."""
    out, lse = R.attention_reference(q.double(), k.double(), v.double(), causal=causal, softmax_scale=scale,
                                     alibi_slopes=slopes, compute_dtype=torch.float64, return_lse=True)
    return out, lse


def torch_lowp_attention(q, k, v, slopes, causal, scale=None):
    """What PyTorch computes in q's dtype, the way Hugging Face's MptAttention does it: scores from a
    low-precision matmul (float32 accumulation, output rounded to the dtype), the float32 bias added,
    float32 softmax, probabilities rounded to the dtype, then a low-precision P @ V. Low-precision
    matmuls are emulated as float32 matmul + rounding (the same arithmetic: CPU bf16 matmul runs at
    under 1 GFLOP/s on an AVX2 host). Differentiable, so it also gives PyTorch's gradient error."""
    dt = q.dtype
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    def mm(a, b):
        return torch.matmul(a.float(), b.float()).to(dt)

    qh = q.permute(0, 2, 1, 3)
    kh = k.permute(0, 2, 1, 3).repeat_interleave(H // Hkv, dim=1)
    vh = v.permute(0, 2, 1, 3).repeat_interleave(H // Hkv, dim=1)
    scores = (mm(qh, kh.transpose(-1, -2)) * scale).to(dt).float()
    if slopes is not None:
        s = slopes if slopes.dim() == 2 else slopes[None].expand(B, H)
        scores = scores + R.alibi_bias(s.float(), Sq, Sk)
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (Sk - Sq), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(dt)
    return mm(probs, vh).permute(0, 2, 1, 3)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within(kernel, ref64, lowp, dtype, what):
    err, base = max_err(kernel, ref64), max_err(lowp, ref64)
    bound = 2 * base + ATOL[dtype]
    assert err <= bound, f"{what}: kernel error {err:.3g} > 2 x PyTorch's {dtype} error {base:.3g} + {ATOL[dtype]}"


def lowp_baseline(q, k, v, slopes, causal, scale=None):
    """PyTorch's own result in q's dtype (float32 runs the plain reference in float32)."""
    if q.dtype == torch.float32:
        return R.attention_reference(q, k, v, causal=causal, softmax_scale=scale, alibi_slopes=slopes,
                                     compute_dtype=torch.float32)
    return torch_lowp_attention(q, k, v, slopes, causal, scale)


# ----------------------------------------------------------------------------- forward

# (B, Sq, Sk, H, Hkv, D): seqlen_q in {1, 17, 97, 1025}, head dims 64, 128, 40, 80, 12 heads (not a
# power of two), GQA 8:2 and MQA. The largest cases use fewer heads to keep the file fast.
FWD_CASES = [
    (2, 1, 1, 12, 12, 64),
    (2, 1, 1025, 12, 12, 128),  # decode against a cache
    (2, 17, 17, 12, 12, 40),
    (2, 17, 97, 8, 2, 80),  # GQA 8:2
    (1, 97, 97, 12, 1, 64),  # MQA
    (1, 97, 1025, 8, 2, 128),
    (1, 1025, 1025, 2, 1, 40),
    (1, 1025, 1025, 2, 2, 80),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: "B{}_Sq{}_Sk{}_H{}_{}_D{}".format(*c))
def test_forward_matches_float64_reference(case, causal, dtype):
    B, Sq, Sk, H, Hkv, D = case
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, dtype)
    slopes = make_slopes("mpt" if (Sq + D) % 2 else "random", B, H)
    out, lse, _ = fwd_C(q, k, v, slopes, causal)
    ref, ref_lse = reference_fwd(q, k, v, slopes, causal)
    assert_within(out, ref, lowp_baseline(q, k, v, slopes, causal), dtype, "out")
    # lse is float32 from float32 statistics whatever the dtype; its inputs are the dtype's values,
    # which the float64 reference sees too, so only float32 rounding separates them.
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_public_api_default_slopes_and_scale(dtype):
    q, k, v = make_qkv(2, 33, 70, 12, 4, 64, dtype)
    out = mk.alibi_attention(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    slopes = R.alibi_slopes(12)
    ref, _ = reference_fwd(q, k, v, slopes, True)
    assert_within(out, ref, lowp_baseline(q, k, v, slopes, True), dtype, "out")


def test_custom_scale_bias_max_and_zero_slopes():
    q, k, v = make_qkv(1, 40, 40, 12, 12, 64, torch.float32)
    out = mk.alibi_attention(q, k, v, causal=False, softmax_scale=0.3, alibi_bias_max=16.0)
    ref, _ = reference_fwd(q, k, v, R.alibi_slopes(12, 16.0), False, scale=0.3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # Zero slopes: plain attention, compared with PyTorch's SDPA.
    out0 = mk.alibi_attention(q, k, v, alibi_slopes=torch.zeros(12))
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    torch.testing.assert_close(out0, sdpa.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_alibi_slopes_match_mpt_gen_slopes():
    # MPT's gen_slopes, written out independently: 1/2^(i*8/H') for i=1..H', interleaved for H=12.
    s8 = torch.tensor([1 / 2 ** (i * 8 / 8) for i in range(1, 9)])
    torch.testing.assert_close(mk.alibi_slopes(8), s8)
    s16 = [1 / 2 ** (i * 8 / 16) for i in range(1, 17)]
    s12 = torch.tensor((s16[1::2] + s16[::2])[:12])
    torch.testing.assert_close(mk.alibi_slopes(12), s12)


def test_noncontiguous_views_of_fused_qkv_need_no_copy():
    q, k, v = make_qkv(2, 97, 97, 8, 2, 64, torch.bfloat16, fused=True)
    assert not q.is_contiguous() and not k.is_contiguous()
    slopes = mk.alibi_slopes(8)
    out, lse, _ = fwd_C(q, k, v, slopes, True)  # _C takes the views' strides directly
    out2, lse2, _ = fwd_C(q.contiguous(), k.contiguous(), v.contiguous(), slopes, True)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    assert torch.equal(mk.alibi_attention(q, k, v), out)


def test_split_k_decode_path():
    """seqlen_q = 1 with few (batch, head) items splits the keys across threads (workspace > 0);
    the combined result must match the reference like the unsplit one does."""
    q, k, v = make_qkv(1, 1, 4099, 1, 1, 128, torch.float32)
    slopes = make_slopes("random", 1, 1)
    out, lse, nbytes = fwd_C(q, k, v, slopes, True)
    if torch.get_num_threads() >= 2 and int(os.environ.get("OMP_NUM_THREADS", "2")) >= 2:
        assert nbytes > 0, "expected the split-K path for one decode row on several threads"
    ref, ref_lse = reference_fwd(q, k, v, slopes, True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-5, atol=1e-5)


def test_empty_key_sequence_gives_zeros():
    q, k, v = make_qkv(1, 3, 0, 2, 2, 64, torch.float32)
    out, lse, _ = fwd_C(q, k, v, mk.alibi_slopes(2), False)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("shape,causal", [((1, 3, 0, 2, 2), False), ((2, 0, 5, 4, 1), False), ((0, 4, 4, 2, 2), True)],
                         ids=["no-keys", "no-queries-mqa", "batch-0"])
def test_empty_shapes_forward_and_backward(shape, causal):
    """No keys: zero output and dq; no queries: zero dk, dv (the backward once refused these with an
    internal error: no forward lse exists when there are no queries). Outputs poisoned at _C level."""
    B, Sq, Sk, H, Hkv = shape
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, 64, torch.float32)
    slopes = mk.alibi_slopes(H)
    out, lse, _ = fwd_C(q, k, v, slopes, causal)
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = bwd_C(torch.randn_like(out), q, k, v, out, lse, slopes, causal)
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert (g == 0).all(), name
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    mk.alibi_attention(qg, kg, vg, causal=causal).sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all() for t in (qg, kg, vg))


def test_matches_hugging_face_mpt_attention():
    """Hugging Face's MptAttention adds build_mpt_alibi_tensor's bias to the scores (plus its causal
    mask); the kernel computes the same bias from the slopes. Tiny config, float32."""
    from transformers import MptConfig
    from transformers.models.mpt.modeling_mpt import MptAttention, build_mpt_alibi_tensor

    H, D, S, B = 12, 8, 23, 2
    cfg = MptConfig(d_model=H * D, n_heads=H, max_seq_len=64, attn_config={"alibi": True})
    attn = MptAttention(cfg).eval()
    x = torch.randn(B, S, H * D)
    bias = build_mpt_alibi_tensor(H, cfg.max_seq_len)
    for causal in (True, False):
        mask = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None].expand(B, 1, S, S) if causal else None
        with torch.no_grad():
            hf, _ = attn(x, position_bias=bias, attention_mask=mask)
            q, k, v = attn.Wqkv(x).chunk(3, dim=2)
            q, k, v = (t.reshape(B, S, H, D) for t in (q, k, v))
            ours = mk.alibi_attention(q, k, v, causal=causal, softmax_scale=attn.softmax_scale)
            ours = attn.out_proj(ours.reshape(B, S, H * D))
            ref = R.attention_reference(q, k, v, causal=causal, softmax_scale=attn.softmax_scale,
                                        alibi_slopes=mk.alibi_slopes(H), compute_dtype=torch.float64)
            ref = attn.out_proj(ref.reshape(B, S, H * D).float())
        torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref, hf, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- varlen


def _varlen_batch(lens_q, lens_k, H, Hkv, D, dtype):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), H, D, dtype=dtype)
    k = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype)
    v = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("per_batch_slopes", [False, True])
def test_varlen_equals_batched_per_sequence(causal, per_batch_slopes):
    lens_q, lens_k = [17, 1, 97, 64], [40, 5, 97, 130]
    H, Hkv, D = 8, 2, 80
    q, k, v, cu_q, cu_k = _varlen_batch(lens_q, lens_k, H, Hkv, D, torch.bfloat16)
    slopes = make_slopes("random", 4, H) if per_batch_slopes else mk.alibi_slopes(H)
    out, lse, _ = fwd_C(q, k, v, slopes, causal, cu_q=cu_q, cu_k=cu_k, max_sq=max(lens_q), max_sk=max(lens_k))
    dout = torch.randn_like(q)
    dq, dk, dv = bwd_C(dout, q, k, v, out, lse, slopes, causal, cu_q=cu_q, cu_k=cu_k, max_sq=max(lens_q),
                       max_sk=max(lens_k))
    for b in range(4):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        s = slopes[b:b + 1] if per_batch_slopes else slopes
        ob, lb, _ = fwd_C(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], s, causal)
        # Same tiles, same arithmetic: the packed run must equal the batched one bit for bit.
        assert torch.equal(out[qs:qe], ob[0]), f"sequence {b}: out"
        assert torch.equal(lse[:, qs:qe], lb[0]), f"sequence {b}: lse"
        gq, gk, gv = bwd_C(dout[None, qs:qe], q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], ob, lb, s, causal)
        assert torch.equal(dq[qs:qe], gq[0]) and torch.equal(dk[ks:ke], gk[0]) and torch.equal(dv[ks:ke], gv[0])


def test_varlen_public_api_and_reference():
    lens_q, lens_k = [5, 33, 1], [5, 40, 70]
    q, k, v, cu_q, cu_k = _varlen_batch(lens_q, lens_k, 12, 4, 64, torch.float32)
    out = mk.alibi_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)  # max_seqlen_* from cu_seqlens
    ref = R.attention_varlen_reference(q.double(), k.double(), v.double(), cu_q, cu_k, causal=True,
                                       alibi_slopes=mk.alibi_slopes(12), compute_dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- backward

# (B, Sq, Sk, H, Hkv, D, causal, slopes)
BWD_CASES = [
    (2, 17, 97, 8, 2, 80, True, "mpt"),
    (1, 97, 97, 12, 1, 40, False, "random"),
    (2, 1, 300, 4, 4, 64, True, "mpt"),
    (1, 130, 257, 4, 2, 128, True, "random"),
    (1, 1025, 1025, 2, 2, 64, True, "mpt"),
]


# Every case in float32 and bfloat16, except the largest (float32 only, for the file's run time).
BWD_PARAMS = [(c, dt) for c in BWD_CASES for dt in (torch.float32, torch.bfloat16)
              if not (c[1] == 1025 and dt == torch.bfloat16)]


@pytest.mark.parametrize("case,dtype", BWD_PARAMS,
                         ids=["B{}_Sq{}_Sk{}_H{}_{}_D{}_causal{}_{}".format(*c) + f"_{str(d)[6:]}" for c, d in BWD_PARAMS])
def test_gradients_match_float64_autograd(case, dtype):
    B, Sq, Sk, H, Hkv, D, causal, kind = case
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, dtype)
    slopes = make_slopes(kind, B, H)
    dout = torch.randn(B, Sq, H, D, dtype=dtype)
    out, lse, _ = fwd_C(q, k, v, slopes, causal)
    grads = bwd_C(dout, q, k, v, out, lse, slopes, causal)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = R.attention_reference(q64, k64, v64, causal=causal, alibi_slopes=slopes)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    low = lowp_baseline(ql, kl, vl, slopes, causal)
    low_grads = torch.autograd.grad(low, (ql, kl, vl), dout)
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert g.dtype == dtype
        assert_within(g, r, lo, dtype, name)


SCHEDULE_CASES = [  # (B, Sq, Sk, H, Hkv, D, causal, slopes)
    (2, 17, 97, 8, 2, 80, True, "mpt"),
    (3, 250, 70, 4, 1, 64, False, "random"),  # MQA, more queries than keys
    (2, 200, 200, 6, 3, 72, False, "random"),
    (4, 5, 5, 2, 2, 8, True, "mpt"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=["B{}_Sq{}_Sk{}_H{}_{}_D{}_causal{}_{}".format(*c) for c in SCHEDULE_CASES])
def test_backward_schedules_agree_bitwise(case, dtype, monkeypatch):
    """The CPU backward's single pass (dQ kept per (batch, KV head)) and its two passes form the same
    products in the same order: bitwise equal gradients, and both within the float64-reference bound."""
    B, Sq, Sk, H, Hkv, D, causal, kind = case
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, dtype)
    slopes = make_slopes(kind, B, H)
    dout = torch.randn(B, Sq, H, D, dtype=dtype)
    out, lse, _ = fwd_C(q, k, v, slopes, causal)
    grads = {}
    for schedule in ("single", "two"):
        monkeypatch.setenv("MPT_KERNELS_ATTN_BWD", schedule)
        grads[schedule] = bwd_C(dout, q, k, v, out, lse, slopes, causal)
    for a, b in zip(grads["single"], grads["two"]):
        assert torch.equal(a, b)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = R.attention_reference(q64, k64, v64, causal=causal, alibi_slopes=slopes)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    low_grads = torch.autograd.grad(lowp_baseline(ql, kl, vl, slopes, causal), (ql, kl, vl), dout)
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads["single"], ref_grads, low_grads):
        assert_within(g, r, lo, dtype, name)
    # varlen, an empty sequence and one with keys but no queries among them, same two schedules
    lens_q, lens_k = [17, 0, 97, 30, 0, 3], [40, 0, 97, 64, 12, 9]
    q, k, v, cu_q, cu_k = _varlen_batch(lens_q, lens_k, H, Hkv, D, dtype)
    dout = torch.randn_like(q)
    kw = dict(cu_q=cu_q, cu_k=cu_k, max_sq=max(lens_q), max_sk=max(lens_k))
    out, lse, _ = fwd_C(q, k, v, mk.alibi_slopes(H), causal, **kw)
    for schedule in ("single", "two"):
        monkeypatch.setenv("MPT_KERNELS_ATTN_BWD", schedule)
        grads[schedule] = bwd_C(dout, q, k, v, out, lse, mk.alibi_slopes(H), causal, **kw)
    for a, b in zip(grads["single"], grads["two"]):
        assert torch.equal(a, b)  # NaN-poisoned: every row (keys without queries get dK = dV = 0) written


AVX512_CASES = SCHEDULE_CASES + [  # head dims that end in each panel width's tail; decode; long keys
    (2, 130, 130, 4, 4, 24, True, "mpt"),
    (1, 70, 200, 2, 1, 40, True, "random"),
    (2, 64, 64, 3, 3, 128, False, "mpt"),
    (1, 33, 33, 2, 2, 256, True, "random"),
    (3, 1, 700, 4, 2, 64, True, "mpt"),  # decode: split keys
    (1, 3, 300, 4, 4, 96, True, "mpt"),  # few query rows: K and V read in place
]


@pytest.fixture(params=["avx512", "avx2"])
def simd_path(request):
    """The test on both CPU paths: the 512-bit one (where the CPU has AVX-512) and the 256-bit one."""
    if request.param == "avx512" and not _C._set_cpu_avx512(True) and not _C._cpu_avx512():
        pytest.skip("this CPU has no AVX-512: the 256-bit path is the only one")
    _C._set_cpu_avx512(request.param == "avx512")
    yield request.param
    _C._set_cpu_avx512(True)


@pytest.fixture
def cpu_avx512_restored():
    if not _C._set_cpu_avx512(True) and not _C._cpu_avx512():
        pytest.skip("this CPU has no AVX-512: only the 256-bit paths exist here")
    yield
    _C._set_cpu_avx512(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", AVX512_CASES, ids=["B{}_Sq{}_Sk{}_H{}_{}_D{}_causal{}_{}".format(*c) for c in AVX512_CASES])
def test_avx512_paths_equal_the_avx2_paths_bitwise(case, dtype, cpu_avx512_restored):
    """The CPU kernels' 512-bit paths (taken at run time where the CPU has AVX-512) form every product
    and sum in the 256-bit paths' order: forward (out, lse) and backward (dq, dk, dv), batched and
    varlen, NaN-poisoned outputs, bitwise equal; the 512-bit results also meet the float64 bound.
    Decode-sized queries (<= 4 rows per head, K and V read in place) sum scores differently: there
    the two paths agree to rounding and each meets the bound."""
    B, Sq, Sk, H, Hkv, D, causal, kind = case
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, dtype)
    q[0, Sq - 1, 0, 1] = NAN  # a NaN row: must come out NaN the same way on both paths
    slopes = make_slopes(kind, B, H)
    dout = torch.randn(B, Sq, H, D, dtype=dtype)
    lens_q, lens_k = [min(Sq, 17), 0, Sq], [min(Sk, 40), 9, Sk]
    vq, vk, vv, cu_q, cu_k = _varlen_batch(lens_q, lens_k, H, Hkv, D, dtype)
    vdout = torch.randn_like(vq)
    kw = dict(cu_q=cu_q, cu_k=cu_k, max_sq=max(lens_q), max_sk=max(lens_k))
    results = {}
    for wide in (True, False):
        _C._set_cpu_avx512(wide)
        assert _C._cpu_avx512() == wide
        out, lse, _ = fwd_C(q, k, v, slopes, causal)
        grads = bwd_C(dout, q, k, v, out, lse, slopes, causal)
        vout, vlse, _ = fwd_C(vq, vk, vv, mk.alibi_slopes(H), causal, **kw)
        vgrads = bwd_C(vdout, vq, vk, vv, vout, vlse, mk.alibi_slopes(H), causal, **kw)
        results[wide] = (out, lse, *grads, vout, vlse, *vgrads)
    names = ("out", "lse", "dq", "dk", "dv", "varlen out", "varlen lse", "varlen dq", "varlen dk", "varlen dv")
    # At most 4 query rows per head the forward reads K and V in place (the direct path), whose 512-bit
    # scores sum in 16 lanes and a transposing tree, not in 8 lanes and across them: close, not equal.
    direct = Sq <= 4
    for name, a, b in zip(names, results[True], results[False]):
        assert torch.equal(a.isnan(), b.isnan()), name
        if direct:
            torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=DIRECT_RTOL[dtype], atol=4 * ATOL[dtype],
                                       msg=name)
        else:
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), name
    assert results[True][0][0, Sq - 1, 0].isnan().all() and not results[True][0][0, :Sq - 1].isnan().any()
    q = q.nan_to_num()  # the float64 bound, without the NaN row: the wide path, and the direct path's two
    for wide in ((False, True) if direct else (True,)):
        _C._set_cpu_avx512(wide)
        _fwd_against_reference(q, k, v, slopes, causal, dtype)


DIRECT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def test_autograd_through_public_api_with_views_and_gqa():
    q, k, v = make_qkv(2, 65, 65, 8, 2, 64, torch.float32, fused=True)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = mk.alibi_attention(q, k, v)
    out.sum().backward()  # expanded (stride-0) output gradient
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    R.attention_reference(q64, k64, v64, causal=True, alibi_slopes=mk.alibi_slopes(8)).sum().backward()
    for g, r in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


def test_varlen_gradients_through_public_api():
    lens = [7, 30]
    q, k, v, cu_q, cu_k = _varlen_batch(lens, lens, 4, 4, 40, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = mk.alibi_attention(q, k, v, causal=False, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=30,
                             max_seqlen_k=30)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = R.attention_varlen_reference(q64, k64, v64, cu_q, cu_k, causal=False, alibi_slopes=mk.alibi_slopes(4))
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_kernel_operand_layout_rules():
    """What the op hands the kernels: head_dim-contiguous tensors pass as they are on the CPU; for the
    CUDA kernels also a 16-byte aligned start and strides that are multiples of 8 elements, else a
    differentiable copy (checked here on CPU tensors with the CUDA rule switched on)."""
    from mpt_kernels.ops.attention import _kernel_operand

    qkv = torch.randn(2, 9, 3, 4, 64, dtype=torch.bfloat16)
    q = qkv[:, :, 1]  # a fused-projection view: strides (1728, 192, 64, 1), offset 256
    assert _kernel_operand(q, True) is q and _kernel_operand(q, False) is q
    buf = torch.randn(2, 9, 4, 72, dtype=torch.bfloat16, requires_grad=True)
    odd = buf[..., 1:65]  # offset 1 element, row stride 288 (fine), start misaligned
    assert _kernel_operand(odd, False) is odd
    c = _kernel_operand(odd, True)
    assert c is not odd and c.is_contiguous() and torch.equal(c, odd)
    c.float().sum().backward()
    assert torch.equal(buf.grad[..., 1:65], torch.ones_like(odd)) and buf.grad[..., :1].abs().sum() == 0
    wide = torch.randn(2, 9, 4, 68, dtype=torch.bfloat16)[..., :64]  # aligned start, head stride 68
    assert _kernel_operand(wide, False) is wide and _kernel_operand(wide, True).stride() == (2304, 256, 64, 1)
    t = torch.randn(2, 9, 64, 4, dtype=torch.bfloat16).transpose(-1, -2)  # head_dim not contiguous
    assert _kernel_operand(t, False).stride(-1) == 1


def test_torch_compile_fullgraph_traces_forward_and_backward():
    q, k, v = make_qkv(2, 33, 40, 4, 2, 64, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        return mk.alibi_attention(q, k, v, causal=True)

    # aot_eager: Dynamo + the fake kernels + the registered autograd, without Inductor's C++ build.
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    gc = torch.autograd.grad(out.square().sum(), (q, k, v))
    out_e = f(q, k, v)
    ge = torch.autograd.grad(out_e.square().sum(), (q, k, v))
    assert torch.equal(out, out_e)
    for a, b in zip(gc, ge):
        assert torch.equal(a, b)


def _varlen_caller(q, k, v, cu_q, cu_k, max_q, max_k):
    return mk.alibi_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)


# Three packed batches with different token counts and different max_seqlen_q / max_seqlen_k.
VARLEN_SHAPE_CHANGES = [([3, 5], [4, 9]), ([4, 7, 2], [6, 7, 2]), ([2, 11, 3, 1], [2, 12, 5, 1])]


def test_torch_compile_dynamic_varlen_does_not_recompile_for_new_max_seqlen():
    """fullgraph=True, dynamic=True: max_seqlen_q/k stay SymInts through the wrapper, the custom op,
    its fake kernel and the saved backward context, so a second and third max_seqlen reuse the
    first graph (error_on_recompile turns any guard on their values into a failure)."""
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # reset() keeps the counters
    compiled = torch.compile(_varlen_caller, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lens_q, lens_k in VARLEN_SHAPE_CHANGES:
            q, k, v, cu_q, cu_k = _varlen_batch(lens_q, lens_k, 4, 2, 40, torch.float32)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            out = compiled(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
            gc = torch.autograd.grad(out.square().sum(), (q, k, v))
            ref = _varlen_caller(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
            ge = torch.autograd.grad(ref.square().sum(), (q, k, v))
            assert torch.equal(out, ref)
            for a, b in zip(gc, ge):
                assert torch.equal(a, b)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1
    torch._dynamo.reset()


def test_torch_export_non_strict_keeps_lengths_symbolic():
    """torch.export(strict=False) runs the wrapper with real SymInts, where int(max_seqlen) would pin
    the value (a constraint violation for a Dim.DYNAMIC input). The exported program must then run a
    batch with other lengths and match eager; likewise a dynamic seqlen in the batched layout."""
    from torch.export import Dim

    class Varlen(torch.nn.Module):
        def forward(self, q, k, v, cu_q, cu_k, max_q, max_k):
            return _varlen_caller(q, k, v, cu_q, cu_k, max_q, max_k)

    (lq0, lk0), (lq1, lk1) = VARLEN_SHAPE_CHANGES[0], VARLEN_SHAPE_CHANGES[2]
    q, k, v, cu_q, cu_k = _varlen_batch(lq0, lk0, 4, 2, 40, torch.float32)
    tq, tk = Dim("total_q"), Dim("total_k")
    ep = torch.export.export(Varlen(), (q, k, v, cu_q, cu_k, max(lq0), max(lk0)), strict=False,
                             dynamic_shapes=({0: tq}, {0: tk}, {0: tk}, {0: Dim("cu_q")}, {0: Dim("cu_k")},
                                             Dim.DYNAMIC, Dim.DYNAMIC))
    q, k, v, cu_q, cu_k = _varlen_batch(lq1, lk1, 4, 2, 40, torch.float32)
    got = ep.module()(q, k, v, cu_q, cu_k, max(lq1), max(lk1))
    assert torch.equal(got, _varlen_caller(q, k, v, cu_q, cu_k, max(lq1), max(lk1)))

    class Batched(torch.nn.Module):
        def forward(self, q, k, v):
            return mk.alibi_attention(q, k, v)

    s = Dim("seqlen")
    ep = torch.export.export(Batched(), make_qkv(2, 7, 7, 4, 2, 40, torch.float32), strict=False,
                             dynamic_shapes=({1: s}, {1: s}, {1: s}))
    q, k, v = make_qkv(2, 19, 19, 4, 2, 40, torch.float32)
    assert torch.equal(ep.module()(q, k, v), mk.alibi_attention(q, k, v))


def test_max_seqlen_argument_types():
    lens = [3, 6]
    q, k, v, cu_q, cu_k = _varlen_batch(lens, lens, 2, 2, 40, torch.float32)
    ref = _varlen_caller(q, k, v, cu_q, cu_k, 6, 6)
    import numpy as np
    for m in (torch.tensor(6), torch.tensor([6], dtype=torch.int32), np.int64(6)):
        assert torch.equal(_varlen_caller(q, k, v, cu_q, cu_k, m, m), ref)
    # int(6.9) would have truncated silently; a non-integer length is an error naming the argument.
    for bad in (6.0, torch.tensor(6.0), torch.tensor([6, 6]), True):
        with pytest.raises(ValueError, match=r"^max_seqlen_q\b"):
            _varlen_caller(q, k, v, cu_q, cu_k, bad, 6)
    with pytest.raises(ValueError, match=r"^max_seqlen_k\b"):
        _varlen_caller(q, k, v, cu_q, cu_k, 6, "6")


def test_opcheck_custom_ops():
    q, k, v = make_qkv(1, 9, 12, 4, 2, 64, torch.float32)
    slopes = mk.alibi_slopes(4)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), slopes, None, None, 9, 12, 0.125, True)
    torch.library.opcheck(alibi_attention_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                                  "test_aot_dispatch_dynamic"))
    out, lse = alibi_attention_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, slopes, None, None, 9, 12, 0.125,
             True)
    torch.library.opcheck(alibi_attention_bwd, bargs, test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- long context


def test_long_context_forward_memory_is_linear():
    """seqlen 16384 forward in a fresh process: the peak RSS growth during the call (VmHWM reset
    through /proc/self/clear_refs) stays under 64 MiB; the dense bias alone would be 1 GiB per head."""
    code = textwrap.dedent(
        """
        import torch, mpt_kernels as mk
        S, H, D = 16384, 1, 32
        q = torch.randn(1, S, H, D, dtype=torch.bfloat16)
        k, v = torch.randn_like(q), torch.randn_like(q)
        mk.alibi_attention(q[:, :64], k[:, :64], v[:, :64])  # warm up the op machinery
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        before = status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS watermark VmHWM to the current RSS
        out = mk.alibi_attention(q, k, v)
        peak = status("VmHWM:")
        assert torch.isfinite(out.float()).all()
        print(peak - before)
        """
    )
    env = subprocess_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=NEUTRAL_CWD)
    assert res.returncode == 0, res.stderr
    extra = int(res.stdout.strip().splitlines()[-1])
    assert extra < 64 * 2 ** 20, f"extra memory {extra / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- bad input


def _good():
    q, k, v = make_qkv(2, 8, 8, 12, 4, 64, torch.float32)
    return dict(q=q, k=k, v=v)


BAD_INPUTS = [
    ("head-dim mismatch", lambda a: a.update(k=a["k"][..., :32], v=a["v"][..., :32]), "k"),
    ("v head-dim mismatch", lambda a: a.update(v=a["v"][..., :32]), "v"),
    ("n_heads % n_kv_heads", lambda a: a.update(k=torch.randn(2, 8, 5, 64), v=torch.randn(2, 8, 5, 64)), "k"),
    ("seqlen_q > seqlen_k causal", lambda a: a.update(k=a["k"][:, :4], v=a["v"][:, :4]), "q"),
    ("slopes wrong shape", lambda a: a.update(alibi_slopes=torch.rand(11)), "alibi_slopes"),
    ("slopes wrong batch", lambda a: a.update(alibi_slopes=torch.rand(3, 12)), "alibi_slopes"),
    ("slopes wrong dtype", lambda a: a.update(alibi_slopes=torch.rand(12, dtype=torch.float64)), "alibi_slopes"),
    ("unsupported dtype", lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), "q"),
    ("mixed dtypes", lambda a: a.update(k=a["k"].bfloat16()), "k"),
    ("head_dim too big on CPU", lambda a: a.update(q=torch.randn(1, 2, 2, 264), k=torch.randn(1, 2, 2, 264),
                                                   v=torch.randn(1, 2, 2, 264)), "q"),
    ("3-D q without cu_seqlens", lambda a: a.update(q=a["q"][0]), "q"),
    ("k batch mismatch", lambda a: a.update(k=a["k"][:1], v=a["v"][:1]), "k"),
    ("k on another device", lambda a: a.update(k=a["k"].to("meta")), "k"),
    ("slopes on another device", lambda a: a.update(alibi_slopes=mk.alibi_slopes(12, device="meta")), "alibi_slopes"),
]


@pytest.mark.parametrize("name,mutate,arg", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_argument(name, mutate, arg):
    a = _good()
    mutate(a)
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        mk.alibi_attention(a.pop("q"), a.pop("k"), a.pop("v"), **a)


def test_bad_cu_seqlens():
    q, k, v, cu_q, cu_k = _varlen_batch([4, 6], [4, 6], 4, 4, 64, torch.float32)
    with pytest.raises(ValueError, match=r"^cu_seqlens_q\b"):
        mk.alibi_attention(q, k, v, cu_seqlens_q=cu_q.long(), cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match=r"^cu_seqlens_k\b"):
        mk.alibi_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=torch.tensor([0, 6, 4], dtype=torch.int32),
                           max_seqlen_q=6, max_seqlen_k=6)
    with pytest.raises(ValueError, match=r"^cu_seqlens_q\b"):
        mk.alibi_attention(q, k, v, cu_seqlens_q=torch.tensor([0, 6, 4], dtype=torch.int32), cu_seqlens_k=cu_k,
                           max_seqlen_q=6, max_seqlen_k=6)
    with pytest.raises(ValueError, match=r"^cu_seqlens_k\b"):
        mk.alibi_attention(q, k, v, cu_seqlens_q=cu_q)
    with pytest.raises(ValueError, match=r"^cu_seqlens_q\b"):  # past the end of q
        mk.alibi_attention(q, k, v, cu_seqlens_q=torch.tensor([0, 4, 99], dtype=torch.int32), cu_seqlens_k=cu_k,
                           max_seqlen_q=95, max_seqlen_k=6, causal=False)
    with pytest.raises(ValueError, match=r"^max_seqlen_q\b"):
        mk.alibi_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=3, max_seqlen_k=6)
    with pytest.raises(ValueError, match=r"^cu_seqlens_q\b"):  # causal with seqlen_q > seqlen_k in a sequence
        mk.alibi_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=torch.tensor([0, 2, 10], dtype=torch.int32))


CU_BAD = [  # (cu_q, cu_k, max_q, max_k, causal, argument named)
    ([0, 4, 6], [0, 6, 4], 6, 6, True, "cu_seqlens_k"),       # decreasing
    ([-1, 4, 10], [0, 4, 10], 6, 6, False, "cu_seqlens_q"),    # negative start
    ([0, 4, 11], [0, 4, 10], 7, 6, False, "cu_seqlens_q"),     # past the end of q
    ([0, 4, 10], [2, 6, 12], 6, 6, False, "cu_seqlens_k"),     # past the end of k
    ([0, 4, 10], [0, 4, 10], 5, 6, False, "max_seqlen_q"),
    ([0, 4, 10], [0, 2, 10], 6, 8, True, "cu_seqlens_q"),      # causal, seqlen_q > seqlen_k
]


@pytest.mark.parametrize("cu_q,cu_k,max_q,max_k,causal,arg", CU_BAD, ids=[c[-1] + str(i) for i, c in enumerate(CU_BAD)])
def test_device_cu_seqlens_checks_match_the_core(cu_q, cu_k, max_q, max_k, causal, arg):
    """Device cu_seqlens are checked in Python (one copy to the host) since the core cannot read
    them: the same bad offsets must fail there as in the core's host check, naming the same
    argument (out-of-range offsets on a GPU would read and write out of bounds)."""
    from mpt_kernels.ops.attention import _check_cu_seqlens_values

    q, k, v, _, _ = _varlen_batch([4, 6], [4, 6], 4, 4, 64, torch.float32)
    cq, ck = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        mk.alibi_attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max_q, max_seqlen_k=max_k,
                           causal=causal)
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        _check_cu_seqlens_values(cq, ck, max_q, max_k, causal, q.shape[0], k.shape[0])
    _check_cu_seqlens_values(torch.tensor([2, 4, 10], dtype=torch.int32), torch.tensor([0, 4, 10], dtype=torch.int32),
                             6, 6, True, q.shape[0], k.shape[0])  # a start past 0 is allowed


def test_device_cu_seqlens_checked_once_per_tensor(monkeypatch):
    """The device offsets' read-back (a GPU sync) happens once for the tensors a model passes to
    every layer, and again for a new tensor, an in-place change or other arguments."""
    from mpt_kernels.ops import attention as A

    calls = []
    monkeypatch.setattr(A, "_check_cu_seqlens_values", lambda *a: calls.append(a))
    A._CHECKED_CU.clear()
    cq, ck = torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 4, 10], dtype=torch.int32)
    for _ in range(5):  # five layers
        A._check_cu_seqlens_once(cq, ck, 6, 6, True, 10, 10)
    assert len(calls) == 1
    A._check_cu_seqlens_once(cq, ck, 7, 6, True, 10, 10)  # other arguments
    cq[2] = 9  # changed in place
    A._check_cu_seqlens_once(cq, ck, 7, 6, True, 10, 10)
    A._check_cu_seqlens_once(cq.clone(), ck, 7, 6, True, 10, 10)  # a new tensor
    assert len(calls) == 4


def test_last_result_memo_rules():
    """_ext.LastResult (the device read-backs above, and apply_to_hf's mask): reused only for the same
    tensor objects, unmodified, with equal arguments; a failing compute is not remembered; tensors
    made under inference_mode (no version counter) are computed every time instead of raising."""
    from mpt_kernels._ext import LastResult

    memo, calls = LastResult(), []

    def compute(t):
        calls.append(1)
        if t[0] < 0:
            raise ValueError("bad")
        return int(t.sum())

    t = torch.tensor([1, 2, 3])
    assert [memo((t,), "a", lambda: compute(t)) for _ in range(3)] == [6, 6, 6] and len(calls) == 1
    memo((t,), "b", lambda: compute(t))  # other arguments
    t[0] = 4  # changed in place
    assert memo((t,), "b", lambda: compute(t)) == 9 and len(calls) == 3
    bad = torch.tensor([-1])
    for _ in range(2):
        with pytest.raises(ValueError):
            memo((bad,), "b", lambda: compute(bad))
    assert len(calls) == 5
    with torch.inference_mode():
        ti = torch.tensor([1, 1])
    assert [memo((ti,), "b", lambda: compute(ti)) for _ in range(2)] == [2, 2] and len(calls) == 7


def test_tensors_on_different_devices_rejected_by_C():
    """A CUDA-vs-CPU mix is rejected before any memory is touched (the view's device field is
    checked first), so this runs without a GPU."""
    q, k, v = make_qkv(1, 4, 4, 2, 2, 64, torch.float32)
    kv = list(view(k, "k"))
    kv[4] = 0  # claim k lives on cuda:0
    with pytest.raises(ValueError, match=r"^k: is on cuda:0 but q is on cpu"):
        _C.attention_fwd_workspace_size(view(q), tuple(kv), view(v), None, None, None, 4, 4, 0.125, True)
    sl = list(view(mk.alibi_slopes(2)))
    sl[4] = 0
    with pytest.raises(ValueError, match=r"^alibi_slopes: is on cuda:0"):
        _C.attention_fwd_workspace_size(view(q), view(k), view(v), tuple(sl), None, None, 4, 4, 0.125, True)


def test_out_and_workspace_checked_by_C():
    q, k, v = make_qkv(1, 4, 4, 2, 2, 64, torch.float32)
    lse = torch.empty(1, 2, 4)
    with pytest.raises(ValueError, match=r"^out\b"):
        _C.attention_fwd(view(q), view(k), view(v), view(torch.empty(1, 4, 2, 32)), view(lse), None, None, None, 4, 4,
                         0.125, True, None)
    with pytest.raises(ValueError, match=r"^lse\b"):
        _C.attention_fwd(view(q), view(k), view(v), view(torch.empty_like(q)), view(torch.empty(1, 2, 5)), None, None,
                         None, 4, 4, 0.125, True, None)
    with pytest.raises(ValueError, match=r"^workspace\b"):  # the backward always needs one
        _C.attention_bwd(view(q), view(q), view(k), view(v), view(q), view(lse), view(q), view(k), view(v), None,
                         None, None, 4, 4, 0.125, True, None)


def test_long_causal_rows_keep_float32_precision():
    """MPT's key-position bias reaches -slope * (seqlen_k - 1) on the first rows (here -0.5 * 4095);
    the kernel scores each row relative to its last visible key, so float32 keeps its precision there
    (an absolute-frame bias would lose ~1e-3 of every score through rounding at that magnitude)."""
    S = 4096
    q, k, v = make_qkv(1, S, S, 2, 1, 64, torch.float32)
    slopes = torch.tensor([0.5, 0.0625])
    out, lse, _ = fwd_C(q, k, v, slopes, True)
    ref, ref_lse = reference_fwd(q, k, v, slopes, True)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    # The stored lse is the true one (it carries the row constant, ~1e3 here): relative float32 rounding.
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-7, atol=1e-5)


def _fwd_against_reference(q, k, v, slopes, causal, dtype):
    """The CPU kernel's output, checked against the float64 reference (output and lse)."""
    out, lse, _ = fwd_C(q, k, v, slopes, causal)
    ref, ref_lse = reference_fwd(q, k, v, slopes, causal)
    assert_within(out, ref, lowp_baseline(q, k, v, slopes, causal), dtype, "out")
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-5, atol=1e-5)
    return out


def _one_head_alone(q, k, v, slopes, h, causal):
    """Head h run by itself in MHA layout (its own KV head, no grouping)."""
    g = q.shape[2] // k.shape[2]
    o1, _, _ = fwd_C(q[:, :, h:h + 1], k[:, :, h // g:h // g + 1], v[:, :, h // g:h // g + 1],
                     slopes[:, h:h + 1].contiguous(), causal)
    return o1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [(2, 1, 1025, 8, 2, 64), (1, 3, 500, 12, 1, 80), (1, 1, 4099, 4, 1, 64),
                                  (1, 9, 9, 12, 1, 40)], ids=lambda c: "B{}_Sq{}_Sk{}_H{}_{}_D{}".format(*c))
def test_grouped_decode_matches_reference_and_per_head_runs(case, dtype, simd_path):
    """Short query chunks of a GQA/MQA group share one tile (seqlen_q x group <= the query block);
    each head must come out as if run alone (same arithmetic per row) and match the reference."""
    B, Sq, Sk, H, Hkv, D = case
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, dtype)
    slopes = make_slopes("random", B, H)
    out = _fwd_against_reference(q, k, v, slopes, True, dtype)
    for h in (0, H - 1):  # one head alone: MHA layout, no grouping
        o1 = _one_head_alone(q, k, v, slopes, h, True)
        torch.testing.assert_close(out[:, :, h:h + 1], o1, rtol=0, atol=0 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(1, 1, 2049, 12, 12, 64), (2, 4, 777, 6, 6, 72), (3, 2, 300, 16, 4, 40),
                                  (1, 3, 1500, 8, 2, 128), (2, 1, 70, 48, 48, 16)],
                         ids=lambda c: "B{}_Sq{}_Sk{}_H{}_{}_D{}".format(*c))
@pytest.mark.parametrize("layout", ["contiguous", "cache-view", "head-strided"])
def test_decode_tile_of_every_head(case, dtype, layout, simd_path):
    """A decode step or a chunk of up to 4 rows stacks every head of a sequence in one work item (the
    key loop walks whole cache rows, all KV heads): each head must match the reference and come out
    bitwise as if run alone (fp32), with K/V read from a KV cache's view (capacity > length) and with
    heads that are not adjacent in a row (a prefetch per head)."""
    B, Sq, Sk, H, Hkv, D = case
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, dtype)
    if layout == "cache-view":  # (B, capacity, Hkv, D) buffers, the first Sk rows
        kb, vb = (torch.randn(B, Sk + 37, Hkv, D, dtype=dtype) for _ in range(2))
        kb[:, :Sk], vb[:, :Sk] = k, v
        k, v = kb[:, :Sk], vb[:, :Sk]
    elif layout == "head-strided":  # every other head slot of a wider row
        kb, vb = (torch.randn(B, Sk, 2 * Hkv, D, dtype=dtype) for _ in range(2))
        kb[:, :, ::2], vb[:, :, ::2] = k, v
        k, v = kb[:, :, ::2], vb[:, :, ::2]
    slopes = make_slopes("random", B, H)
    out = _fwd_against_reference(q, k, v, slopes, True, dtype)
    for h in (0, H // 2, H - 1):
        o1 = _one_head_alone(q, k, v, slopes, h, True)
        torch.testing.assert_close(out[:, :, h:h + 1], o1, rtol=0, atol=0 if dtype == torch.float32 else 1e-2)


def test_inference_calls_skip_the_custom_op_and_match_it(monkeypatch):
    """Without a gradient to record (and nothing tracing), ``alibi_attention`` runs the kernel directly,
    not through ``mpt_kernels::alibi_attention_fwd``: same output bit for bit (a decode step here, where
    the op's dispatch costs about as much as the kernel). With a gradient, plain eager tensors take the
    eager autograd.Function (the op's body and formula without its dispatch); under a torch-function
    mode the op runs."""
    from mpt_kernels.ops import attention as att_op

    torch.manual_seed(0)
    q = torch.randn(2, 1, 4, 32, dtype=torch.bfloat16)
    k, v = torch.randn(2, 77, 2, 32, dtype=torch.bfloat16), torch.randn(2, 77, 2, 32, dtype=torch.bfloat16)
    slopes = mk.alibi_slopes(4)
    ref, _ = att_op.alibi_attention_fwd(q, k, v, slopes, None, None, 1, 77, 32 ** -0.5, True)
    calls = []
    real = att_op.alibi_attention_fwd
    monkeypatch.setattr(att_op, "alibi_attention_fwd", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        out = mk.alibi_attention(q, k, v)
    assert calls == [] and torch.equal(out, ref)
    eager = []
    real_eager = att_op._AttentionEager.apply
    monkeypatch.setattr(att_op._AttentionEager, "apply", lambda *a: eager.append(1) or real_eager(*a))
    mk.alibi_attention(q.requires_grad_(), k, v)
    assert calls == [] and eager == [1]
    with torch.device("cpu"):
        mk.alibi_attention(q, k, v)
    assert calls == [1] and eager == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal", [
    (1, 1, 1, 4, 4, 64, True), (2, 1, 300, 8, 2, 64, True), (1, 1, 4096, 4, 4, 64, True),  # decode, GQA
    (2, 37, 130, 6, 3, 32, True), (1, 70, 70, 4, 1, 128, False), (3, 5, 9, 2, 2, 40, False)])
def test_direct_call_equals_the_op(dtype, b, sq, sk, h, hkv, d, causal):
    """The no-gradient direct call (no logsumexp) gives the op's output bit for bit: decode, GQA/MQA,
    causal or not, q/k/v as strided views of one fused projection; varlen too."""
    from mpt_kernels.ops import attention as att_op

    torch.manual_seed(2)
    qkv = torch.randn(b, max(sq, sk), (h + 2 * hkv) * d, dtype=dtype)
    q = qkv[:, :sq, : h * d].unflatten(-1, (h, d))
    k = qkv[:, :sk, h * d:(h + hkv) * d].unflatten(-1, (hkv, d))
    v = qkv[:, :sk, (h + hkv) * d:].unflatten(-1, (hkv, d))
    slopes = mk.alibi_slopes(h)
    ref, _ = att_op.alibi_attention_fwd(q, k, v, slopes, None, None, sq, sk, d ** -0.5, causal)
    with torch.no_grad():
        assert torch.equal(mk.alibi_attention(q, k, v, causal=causal, alibi_slopes=slopes), ref)
    if sq == sk:  # varlen: the batch packed into one (total, heads, d) run
        cu = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32)
        qf, kf, vf = (t.reshape(b * sq, t.shape[2], d) for t in (q, k, v))
        ref, _ = att_op.alibi_attention_fwd(qf, kf, vf, slopes, cu, cu, sq, sq, d ** -0.5, causal)
        with torch.no_grad():
            got = mk.alibi_attention(qf, kf, vf, causal=causal, alibi_slopes=slopes, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                     max_seqlen_q=sq, max_seqlen_k=sq)
        assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(1, 1, 1, 4, 4, 8), (2, 1, 67, 6, 1, 36), (1, 2, 130, 6, 2, 100),
                                  (1, 4, 259, 4, 4, 20), (1, 5, 300, 4, 4, 64), (3, 3, 3, 2, 2, 256),
                                  (1, 1, 4096, 8, 8, 128)],
                         ids=lambda c: "B{}_Sq{}_Sk{}_H{}_{}_D{}".format(*c))
def test_few_query_rows_read_kv_in_place(case, dtype, simd_path):
    """Up to 4 query rows per head (decode, short chunks) take the CPU path that reads K and V in place
    (no tiles): key counts that are not multiples of the 4-key step or the 64-key block, head dims
    with an 8-lane tail, GQA groups larger than the 4-row register tile, and the 5-row boundary (the
    tile path). Each head also matches a run of that head alone."""
    B, Sq, Sk, H, Hkv, D = case
    for causal in (True, False):
        q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, dtype)
        slopes = make_slopes("random", B, H)
        out = _fwd_against_reference(q, k, v, slopes, causal, dtype)
        h = H - 1
        o1 = _one_head_alone(q, k, v, slopes, h, causal)
        # (not bit for bit: a head alone may be split across threads where the full run is not)
        torch.testing.assert_close(out[:, :, h:h + 1], o1, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("shape", [(1, 64, 64, 4, 32), (2, 3, 300, 4, 64), (2, 1, 8192, 4, 64)],
                         ids=["tiles", "few_rows", "split_k_decode"])
def test_nan_inputs_propagate_to_exactly_the_rows_they_reach(device, shape, simd_path):
    """A NaN in a query row makes that (row, head) NaN, output and lse, and nothing else; a NaN key
    makes NaN exactly the rows that see it (causal: its position and later). Before, the row max
    dropped the NaN and a NaN query row came out finite, as if fully masked."""
    B, Sq, Sk, H, D = shape
    torch.manual_seed(0)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(B, s, H, D).to(dt).to(device) for s in (Sq, Sk, Sk))
    q[B - 1, Sq - 1, 1, 3] = float("nan")
    slopes = mk.alibi_slopes(H).to(device)
    out, lse = alibi_attention_fwd(q, k, v, slopes, None, None, Sq, Sk, D ** -0.5, True)
    nan_rows = torch.isnan(out).any(-1)  # (B, Sq, H)
    expect = torch.zeros_like(nan_rows)
    expect[B - 1, Sq - 1, 1] = True
    assert torch.equal(nan_rows, expect)
    assert torch.equal(torch.isnan(lse).cpu(), expect.permute(0, 2, 1).cpu())
    q = q.nan_to_num()
    j = Sk - Sq // 2 - 1  # a key the last Sq // 2 + 1 query rows see (bottom-right aligned causal rows)
    k[0, j, 2, 0] = float("nan")
    out = mk.alibi_attention(q, k, v, alibi_slopes=slopes)
    rows = torch.arange(Sq, device=device) + (Sk - Sq) >= j  # query i sees keys <= i + Sk - Sq
    expect = torch.zeros(B, Sq, H, dtype=torch.bool, device=device)
    expect[0, :, 2] = rows
    assert torch.equal(torch.isnan(out).any(-1), expect)


def test_slopes_requiring_grad_and_non_bool_causal_are_refused():
    """The kernels compute no gradient for the ALiBi slopes: slopes that require one would silently
    stay untrained, so they are refused (fine under no_grad, or detached)."""
    q = torch.randn(1, 8, 2, 16)
    s = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="alibi_slopes: requires_grad"):
        mk.alibi_attention(q, q, q, alibi_slopes=s)
    with torch.no_grad():
        a = mk.alibi_attention(q, q, q, alibi_slopes=s)
    torch.testing.assert_close(a, mk.alibi_attention(q, q, q, alibi_slopes=s.detach()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="causal: expected True or False"):
        mk.alibi_attention(q, q, q, causal="no")


def _assert_same_packed_grad(got, want, H, Hkv, device):
    """Bit for bit, except the dk, dv slices on CUDA when the kernel sums a KV group's heads in float32
    atomics from more than 2 CTAs (attention_cuda.cu: bwd_group_splits, MQA here): their order is
    unspecified, so a sum may differ in its last float32 bit and round to the neighbouring bf16 value
    (at most one bf16 ulp, 2^-7 relative). Two terms (GQA 4:2) add in either order to the same bits."""
    if device == "cpu" or H // Hkv <= 2:
        assert torch.equal(got, want)
        return
    D = got.shape[-1] // (H + 2 * Hkv)
    assert torch.equal(got[..., :H * D], want[..., :H * D])  # dq: one key block, one atomic per element
    torch.testing.assert_close(got[..., H * D:], want[..., H * D:], rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
def test_qkvpacked_equals_attention_on_the_slices(device, heads, varlen):
    """alibi_attention_qkvpacked on a fused projection: output and gradient bit for bit those of
    alibi_attention on the q, k, v slices (same kernel calls; the gradient is written into one
    buffer instead of concatenated), poisoned output memory, NaN-free; compile traces it."""
    H, Hkv = heads
    D = 64
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    shape = (67, (H + 2 * Hkv) * D) if varlen else (2, 45, (H + 2 * Hkv) * D)
    cu = torch.tensor([0, 30, 31, 67], dtype=torch.int32, device=device) if varlen else None
    qkv = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    g = torch.randn(shape[:-1] + (H, D), dtype=dtype, device=device)
    out = mk.alibi_attention_qkvpacked(qkv, H, Hkv, cu_seqlens=cu)
    out.backward(g)
    ref_in = qkv.detach().clone().requires_grad_()
    q, k, v = ref_in.split([H * D, Hkv * D, Hkv * D], dim=-1)
    kw = {} if cu is None else dict(cu_seqlens_q=cu, cu_seqlens_k=cu)
    ref = mk.alibi_attention(q.unflatten(-1, (H, D)), k.unflatten(-1, (Hkv, D)), v.unflatten(-1, (Hkv, D)), **kw)
    ref.backward(g)
    assert torch.equal(out, ref)
    _assert_same_packed_grad(qkv.grad, ref_in.grad, H, Hkv, device)
    assert torch.isfinite(qkv.grad).all() and qkv.grad.abs().sum() > 0
    # the backward op alone into poisoned memory: every element written
    from mpt_kernels.ops.attention import alibi_attention_qkvpacked_bwd, alibi_attention_qkvpacked_fwd

    slopes = mk.alibi_slopes(H).to(device)
    o, lse = alibi_attention_qkvpacked_fwd(qkv.detach(), H, Hkv, slopes, cu, 37 if varlen else 45, D ** -0.5, True)
    from mpt_kernels.ops import attention as A

    real_buffer = A._grad_buffer
    A._grad_buffer = lambda shape, like, vl: real_buffer(shape, like, vl).fill_(float("nan"))
    try:
        dqkv = alibi_attention_qkvpacked_bwd(g, qkv.detach(), o, lse, H, Hkv, slopes, cu, 37 if varlen else 45,
                                             D ** -0.5, True)
    finally:
        A._grad_buffer = real_buffer
    _assert_same_packed_grad(dqkv, qkv.grad, H, Hkv, device)
    with pytest.raises(ValueError, match="qkv: expected"):
        mk.alibi_attention_qkvpacked(qkv[..., :-1], H, Hkv, cu_seqlens=cu)


def test_qkvpacked_compiles_fullgraph_with_backward():
    H, Hkv, D = 4, 2, 32
    x = torch.randn(2, 20, (H + 2 * Hkv) * D, requires_grad=True)
    f = torch.compile(lambda t: mk.alibi_attention_qkvpacked(t, H, Hkv).float().square().sum(), fullgraph=True,
                      backend="aot_eager")
    f(x).backward()
    y = x.detach().clone().requires_grad_()
    mk.alibi_attention_qkvpacked(y, H, Hkv).float().square().sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)


def test_model_training_uses_the_packed_backward(monkeypatch):
    """A training forward of the model goes through the packed op (no concatenation in backward),
    with the same loss and gradients, bit for bit, as the per-slice path (dense and varlen, GQA)."""
    from mpt_kernels.model import MPTConfig, MPTForCausalLM, modeling
    from mpt_kernels.ops import attention as A

    cfg = MPTConfig(d_model=96, n_heads=6, n_layers=2, vocab_size=101, max_seq_len=48,
                    attn_config=dict(attn_impl="flash", kv_n_heads=2, attn_type="grouped_query_attention"))
    torch.manual_seed(0)
    m = MPTForCausalLM(cfg)
    ids = torch.randint(0, 101, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    calls = []
    real = A.alibi_attention_qkvpacked_bwd
    monkeypatch.setattr(A, "alibi_attention_qkvpacked_bwd", lambda *a: calls.append(1) or real(*a))
    got = {}
    for packed in (True, False):
        monkeypatch.setattr(modeling, "_PACKED_QKV", packed)
        for name, mm in (("dense", None), ("varlen", mask)):
            m.zero_grad()
            loss = m(ids, labels=ids, attention_mask=mm).loss
            loss.backward()
            got[packed, name] = (loss.detach(), [p.grad.clone() for p in m.parameters()])
    assert len(calls) == 2 * cfg.n_layers  # two packed backwards (dense, varlen) per layer
    for name in ("dense", "varlen"):
        (la, ga), (lb, gb) = got[True, name], got[False, name]
        assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(ga, gb))


def test_device_offsets_are_not_read_back_while_their_device_captures(monkeypatch):
    """A CUDA graph captured on cuda:1 while cuda:0 is the current device: the capture check asked
    cuda:0's current stream (not capturing), so the offsets were copied to the host inside the capture
    (an error there). The check now asks the offsets' device. No GPU here: torch.cuda's device context
    and capture query are replaced by a model of two devices, cuda:1 capturing."""
    import contextlib

    from mpt_kernels.ops import attention as att

    state = {"current": 0}

    @contextlib.contextmanager
    def device(d):
        before, state["current"] = state["current"], torch.device(d).index
        try:
            yield
        finally:
            state["current"] = before

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["current"] == 1)

    def read_back(*args):
        raise AssertionError("offsets read back to the host during a capture")

    monkeypatch.setattr(att, "_check_cu_seqlens_once", read_back)

    class Offsets:  # what _check_device_cu_seqlens looks at of a device int32 offsets tensor
        def __init__(self, index):
            self.device, self.dtype = torch.device("cuda", index), torch.int32

        def dim(self):
            return 1

        def numel(self):
            return 3

    cu = Offsets(1)
    att._check_device_cu_seqlens(cu, cu, 4, 4, True, 8, 8)  # capturing on cuda:1: no read-back
    assert state["current"] == 0
    cu = Offsets(0)  # cuda:0 is not capturing: the offsets are checked (read back)
    with pytest.raises(AssertionError, match="read back"):
        att._check_device_cu_seqlens(cu, cu, 4, 4, True, 8, 8)


@pytest.mark.parametrize("caller_flushes", [False, True])
def test_cpu_kernels_flush_denormals_and_leave_the_callers_setting(caller_flushes):
    """The CPU attention computes with denormals flushed (inputs read as zero, results written as zero)
    whatever the caller set: far keys' probabilities and their products with small gradients reach
    that range over long sequences, where each operation would cost an Intel core a microcode assist.
    The caller's own setting (mk.set_flush_denormal) is the same after the forward and the backward."""
    before = mk.set_flush_denormal(caller_flushes)
    try:
        torch.manual_seed(0)
        q, k = torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16)
        v = torch.full((2, 40, 2, 16), 1e-39).requires_grad_()  # float32 denormals
        out = mk.alibi_attention(q, k, v)
        assert (out == 0).all(), "denormal values went through unflushed"
        assert mk.set_flush_denormal(caller_flushes) == caller_flushes
        q2, k2, v2 = (torch.randn(1, 33, 2, 16, requires_grad=True) for _ in range(3))
        o2 = mk.alibi_attention(q2, k2, v2)
        g = torch.full_like(o2, 1e-39)  # a denormal gradient: every product below 2^-126
        dq, dk, dv = torch.autograd.grad(o2, (q2, k2, v2), g)
        assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()
        assert mk.set_flush_denormal(caller_flushes) == caller_flushes
        # normal values are untouched: the same as the float64 reference's rounding allows
        ref = R.attention_reference(q2.double(), k2.double(), v2.double(), alibi_slopes=R.alibi_slopes(2).double())
        torch.testing.assert_close(o2.double(), ref, rtol=1e-5, atol=1e-6)
    finally:
        mk.set_flush_denormal(before)
