"""The CUDA kernels' own source, run on the CPU by the host emulator (tests/cuda_emu): ``_C_emu`` is the
extension's bindings and csrc/*/*.cu compiled by g++ against tests/cuda_emu/cuda_emu.h, and CPU tensors
described to it as "cuda:0" take the CUDA launchers and kernels. Each CUDA thread is a fiber; shared
memory starts poisoned; cp.async data lands only at its wait_group; warp collectives (shuffles,
ldmatrix, mma.m16n8k16) check that the whole warp takes part. Outputs start as NaN and are judged
against float64 references with the real-GPU tests' bounds (tests/test_attention_cuda.py's
``_bound_check``: at most 2x torch's own low-precision error). Some cases rerun under other thread and
block orders (MPTK_EMU_SCHEDULE): a missing barrier or a cross-block dependency changes results there.

Not covered: the hardware's exact float32 accumulation in mma (bounded instead: the attention paths
also run with a truncating, one-product-at-a-time accumulation, worse than the hardware's), timing,
registers, occupancy, the memory model beyond barriers. tests/cuda_emu/README.md has the details.
"""
import math
import os
import shutil
import sys
import zlib

import pytest
import torch

import mpt_kernels as mk
from mpt_kernels import _ext
from mpt_kernels.ops import reference

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cuda_emu"))
import build as emu_build  # noqa: E402
# SMOKE: (name, (B, Sq, Sk, H, Hkv, D, causal, alibi), grad) per kernel path; _bound_check: the real-GPU
# tests' bound, max|got - ref64| <= 2 max|ref_lp - ref64| + atol, plus a relative-norm check
from test_attention_cuda import SMOKE, _bound_check  # noqa: E402

def _missing_toolchain():
    import importlib.util
    import sysconfig

    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "needs g++ (or $CXX)"
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return "needs the Python development headers"
    if importlib.util.find_spec("pybind11") is None:
        return "needs pybind11 (pip install '.[test]')"
    return None


pytestmark = pytest.mark.skipif(_missing_toolchain() is not None, reason=str(_missing_toolchain()))


@pytest.fixture(scope="module")
def E():
    return emu_build.load()


def dv(t, name="t"):
    """A CPU tensor described to _C_emu as a cuda:0 tensor."""
    v = _ext.view(t, name)
    return (v[0], v[1], v[2], v[3], 0)


def odv(t, name="t"):
    return None if t is None else dv(t, name)


@pytest.fixture(params=["0", "1", "2"])
def schedule(request, monkeypatch):
    """Tests that take it run under each of: lockstep, warp at a time (descending), warp at a time in a
    shuffled order (tests/cuda_emu/cuda_emu.cpp, run_block)."""
    monkeypatch.setenv("MPTK_EMU_SCHEDULE", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _spread_schedules(request, monkeypatch):
    """Every other test runs under one schedule picked from its id (0-3: lockstep, warp at a time,
    shuffled warp at a time, shuffled lockstep), so the suite covers all of them at no extra cost."""
    if "schedule" not in request.fixturenames:
        monkeypatch.setenv("MPTK_EMU_SCHEDULE", str(zlib.crc32(request.node.nodeid.encode()) % 4))


# ---------------------------------------------------------------------------------------------- attention
def _attention_args(q, k, v, slopes, causal, cu_q, cu_k, max_sq, max_sk, scale):
    """The binding's shared inputs, as mpt_kernels/ops/attention.py passes them, and the zeroed
    workspace the launchers expect (None when they need none)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if cu_q is None:
        max_sq, max_sk = q.shape[1], k.shape[1]
    return (dv(q), dv(k), dv(v), odv(slopes), odv(cu_q), odv(cu_k), max_sq, max_sk, scale, causal)


def _zeroed_workspace(nbytes):
    """(tensor, view): the caller keeps the tensor alive through the call (a view is a raw pointer)."""
    t = torch.zeros(nbytes, dtype=torch.uint8) if nbytes else None
    return t, odv(t)


def emu_attention_fwd(E, q, k, v, slopes, causal, cu_q=None, cu_k=None, max_sq=0, max_sk=0, scale=None):
    args = _attention_args(q, k, v, slopes, causal, cu_q, cu_k, max_sq, max_sk, scale)
    varlen = cu_q is not None
    # rows outside every varlen sequence are not written (the op pre-fills them): NaN elsewhere
    out = torch.full(q.shape, 0.0 if varlen else float("nan"), dtype=q.dtype)
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    lse = torch.full(lse_shape, float("-inf") if varlen else float("nan"), dtype=torch.float32)
    ws, ws_view = _zeroed_workspace(E.attention_fwd_workspace_size(*args))
    E.attention_fwd(*args[:3], dv(out), dv(lse), *args[3:], ws_view, 0)
    del ws
    return out, lse


def emu_attention_bwd(E, dout, q, k, v, out, lse, slopes, causal, cu_q=None, cu_k=None, max_sq=0, max_sk=0,
                      scale=None):
    args = _attention_args(q, k, v, slopes, causal, cu_q, cu_k, max_sq, max_sk, scale)
    fill = 0.0 if cu_q is not None else float("nan")
    dq, dk, dvv = (torch.full_like(t, fill) for t in (q, k, v))
    ws, ws_view = _zeroed_workspace(E.attention_bwd_workspace_size(*args))
    E.attention_bwd(dv(dout), *args[:3], dv(out), dv(lse), dv(dq), dv(dk), dv(dvv), *args[3:], ws_view, 0)
    del ws
    return dq, dk, dvv


def _ref(q, k, v, slopes, causal, dtype, grad_out=None):
    xs = [x.detach().to(dtype).requires_grad_(grad_out is not None) for x in (q, k, v)]
    s = None if slopes is None else slopes.to(torch.float64 if dtype == torch.float64 else slopes.dtype)
    o, lse = reference.attention_reference(*xs, causal=causal, alibi_slopes=s, compute_dtype=dtype, return_lse=True)
    grads = None
    if grad_out is not None:
        grads = torch.autograd.grad(o, xs, grad_out.to(dtype))
    return o.detach(), lse.detach(), grads


def _run_attention(E, q, k, v, causal, slopes, grad=True):
    dtype = q.dtype
    atol_fwd = 1e-3 if dtype == torch.bfloat16 else 2e-4
    atol_bwd = 2e-3 if dtype == torch.bfloat16 else 5e-4
    out, lse = emu_attention_fwd(E, q, k, v, slopes, causal)
    dout = torch.randn(out.shape, dtype=dtype) if grad else None
    o64, lse64, g64 = _ref(q, k, v, slopes, causal, torch.float64, dout)
    olp, _, glp = _ref(q, k, v, slopes, causal, dtype, dout)
    _bound_check(out, o64, olp, "out", atol_fwd)
    assert not torch.isnan(lse).any(), "lse: unwritten element"
    torch.testing.assert_close(lse.double(), lse64.double(), rtol=2e-5, atol=2e-4)
    if not grad:
        return out, lse, None
    grads = emu_attention_bwd(E, dout, q, k, v, out, lse, slopes, causal)
    for name, a, b64, blp in zip(("dq", "dk", "dv"), grads, g64, glp):
        _bound_check(a, b64, blp, name, atol_bwd)
    return out, lse, grads


def _qkv(B, Sq, Sk, H, Hkv, D, dtype, fused=False):
    if fused:  # views of one (B, S, 3, H, D) projection, like MPT's Wqkv
        qkv = torch.randn(B, Sq, 3, H, D, dtype=dtype)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return (torch.randn(B, Sq, H, D, dtype=dtype), torch.randn(B, Sk, Hkv, D, dtype=dtype),
            torch.randn(B, Sk, Hkv, D, dtype=dtype))


DTYPES = [torch.bfloat16, torch.float16]

# One case per kernel path: the real-GPU smoke list, then more.
PATHS = list(SMOKE) + [
    # several K/V tiles per CTA (the prefetch into the stage other warps just read), several query
    # blocks per backward CTA, several tiles per decode split (B * Hkv = 64 -> 4 splits of 10 tiles)
    ("fwd_d64_causal_4_tiles", (1, 70, 230, 2, 1, 64, True, True), False),
    ("fwd_d128_full_3_tiles", (1, 130, 150, 1, 1, 128, False, True), False),
    ("bwd_d64_causal_4_query_blocks", (1, 200, 230, 2, 2, 64, True, True), True),
    ("bwd_d128_full_5_query_blocks", (1, 150, 150, 1, 1, 128, False, True), True),
    ("decode_d64_3_tiles_per_split", (2, 1, 600, 32, 32, 64, True, True), False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,grad", PATHS, ids=[c[0] for c in PATHS])
def test_attention_each_path(E, schedule, name, shape, grad, dtype):
    _attention_path_case(E, name, shape, grad, dtype)


def _attention_path_case(E, name, shape, grad, dtype):
    torch.manual_seed(hash(name) % 1000)
    B, Sq, Sk, H, Hkv, D, causal, alibi = shape
    q, k, v = _qkv(B, Sq, Sk, H, Hkv, D, dtype)
    slopes = mk.alibi_slopes(H) if alibi else torch.zeros(H)
    _run_attention(E, q, k, v, causal, slopes, grad=grad)


# Long key ranges: one output's accumulator takes hundreds of mma calls (the forward's P V and the
# backward's dK, dV sums over query rows; a decode split's tiles).
_LONG = [("fwd_d128_causal_long", (1, 260, 900, 2, 1, 128, True, True), False),
         ("bwd_d64_full_long", (1, 330, 330, 1, 1, 64, False, True), True),
         ("decode_d128_gqa_long", (1, 1, 2000, 32, 4, 128, True, True), False)]  # 8 query rows per mma


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,grad", PATHS + _LONG, ids=[c[0] for c in PATHS + _LONG])
def test_attention_within_bounds_under_truncating_mma_accumulation(E, monkeypatch, name, shape, grad, dtype):
    """The emulator's mma normally sums its 16 exact products in double, better than tensor cores do.
    MPTK_EMU_MMA=1 adds them one by one into the float32 accumulator, each sum truncated toward zero:
    more roundings than the hardware makes, and all biased one way. Every kernel path (and long key
    ranges, where the bias accumulates) still meets the real-GPU tests' bound."""
    monkeypatch.setenv("MPTK_EMU_MMA", "1")
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)
    B, Sq, Sk, H, Hkv, D, causal, alibi = shape
    q, k, v = _qkv(B, Sq, Sk, H, Hkv, D, dtype)
    slopes = mk.alibi_slopes(H) if alibi else torch.zeros(H)
    _run_attention(E, q, k, v, causal, slopes, grad=grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128, 80, 40])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 300), (17, 17), (17, 130), (97, 97), (97, 200), (130, 60)])
def test_attention_mha(E, Sq, Sk, causal, D, dtype):
    if causal and Sq > Sk:
        pytest.skip("causal needs seqlen_q <= seqlen_k (bottom-right alignment)")
    torch.manual_seed(Sq * 1000 + Sk + D)
    q, k, v = _qkv(1, Sq, Sk, 2, 2, D, dtype, fused=(Sq == Sk))
    _run_attention(E, q, k, v, causal, mk.alibi_slopes(2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,Hkv", [(8, 2), (6, 1)], ids=["gqa8:2", "mqa6:1"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("Sq,Sk", [(1, 257), (2, 77), (17, 97), (70, 70)])
def test_attention_gqa_mqa_per_batch_slopes(E, Sq, Sk, causal, H, Hkv, dtype):
    torch.manual_seed(Sq * 1000 + Sk + H)
    q, k, v = _qkv(2, Sq, Sk, H, Hkv, 64, dtype)
    _run_attention(E, q, k, v, causal, torch.rand(2, H))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Sq,Sk,H,Hkv", [(1, 600, 24, 1), (3, 200, 32, 2), (16, 16, 4, 4), (16, 150, 8, 2)])
def test_attention_decode_row_blocks(E, Sq, Sk, H, Hkv, dtype):
    # split-K decode with several 16-row blocks per kv head (24, 48, 16 and 64 rows per kv head)
    torch.manual_seed(Sq + Sk + H)
    q, k, v = _qkv(1, Sq, Sk, H, Hkv, 128, dtype)
    _run_attention(E, q, k, v, True, mk.alibi_slopes(H), grad=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_varlen_offsets_past_zero_and_empty_sequences(E, dtype):
    torch.manual_seed(5)
    H, Hkv, D = 4, 2, 64
    lens = [(5, 9), (0, 7), (37, 37), (1, 70), (20, 0)]  # (q, k) per sequence; an empty one of each
    lead = (3, 2)
    tq, tk = lead[0] + sum(a for a, _ in lens) + 2, lead[1] + sum(b for _, b in lens) + 1  # rows after the last
    q, k, v = torch.randn(tq, H, D, dtype=dtype), torch.randn(tk, Hkv, D, dtype=dtype), torch.randn(tk, Hkv, D, dtype=dtype)
    cq = torch.tensor([lead[0]] + [lead[0] + sum(a for a, _ in lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32)
    ck = torch.tensor([lead[1]] + [lead[1] + sum(b for _, b in lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32)
    mq, mk_ = max(a for a, _ in lens), max(b for _, b in lens)
    slopes = mk.alibi_slopes(H)
    out, lse = emu_attention_fwd(E, q, k, v, slopes, True, cq, ck, mq, mk_)
    dout = torch.randn(q.shape, dtype=dtype)
    dq, dk, dvv = emu_attention_bwd(E, dout, q, k, v, out, lse, slopes, True, cq, ck, mq, mk_)
    for b, (lq, lk) in enumerate(lens):
        qs, ks = int(cq[b]), int(ck[b])
        sl = lambda t, s, n: t[s:s + n][None]  # noqa: E731
        if lq == 0:
            continue
        qb, kb, vb = sl(q, qs, lq), sl(k, ks, lk), sl(v, ks, lk)
        if lk == 0:  # no keys: out 0, lse -inf, no gradient
            assert (out[qs:qs + lq] == 0).all() and torch.isneginf(lse[:, qs:qs + lq]).all()
            assert (dq[qs:qs + lq] == 0).all()
            continue
        d = dout[qs:qs + lq][None]
        o64, _, g64 = _ref(qb, kb, vb, slopes, True, torch.float64, d)
        olp, _, glp = _ref(qb, kb, vb, slopes, True, dtype, d)
        _bound_check(out[qs:qs + lq][None], o64, olp, f"out[{b}]", 1e-3)
        for name, got, r64, rlp in zip(("dq", "dk", "dv"), (dq[qs:qs + lq], dk[ks:ks + lk], dvv[ks:ks + lk]), g64, glp):
            _bound_check(got[None], r64, rlp, f"{name}[{b}]", 2e-3)
    # rows outside every sequence are not written
    assert (out[:lead[0]] == 0).all() and (out[int(cq[-1]):] == 0).all()
    assert (dk[:lead[1]] == 0).all() and (dk[int(ck[-1]):] == 0).all()


_RACY = [c for c in PATHS if c[0] in ("fwd_d64_causal_4_tiles", "bwd_d64_causal_4_query_blocks",
                                       "decode_d64_3_tiles_per_split", "decode_kernel_d128_gqa")]


@pytest.mark.parametrize("schedule", ["1", "2", "12345"], indirect=True)
@pytest.mark.parametrize("name,shape,grad", _RACY, ids=[c[0] for c in _RACY])
def test_attention_other_schedules_same_result(E, schedule, name, shape, grad):
    """Reversed and shuffled thread and block orders: the forward must be bitwise the same as in
    ascending order (no atomics there); the backward (float32 atomics into dq) within the bounds."""
    torch.manual_seed(11)
    B, Sq, Sk, H, Hkv, D, causal, alibi = shape
    q, k, v = _qkv(B, Sq, Sk, H, Hkv, D, torch.bfloat16)
    slopes = mk.alibi_slopes(H)
    out, lse, _ = _run_attention(E, q, k, v, causal, slopes, grad=grad)
    os.environ["MPTK_EMU_SCHEDULE"] = "0"
    out0, lse0 = emu_attention_fwd(E, q, k, v, slopes, causal)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)


def test_attention_refused_head_dim_is_an_error_not_a_launch(E):
    q = torch.randn(1, 4, 1, 136, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        emu_attention_fwd(E, q, q, q, None, True)


def test_attention_float32_on_cuda_says_what_to_do(E):
    """A float32 model on CUDA (no autocast) reaches the kernels with float32 q: the error says the CUDA
    kernels take 16-bit inputs and how to get them, not only "unsupported dtype"."""
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(ValueError, match=r"q: float32 on CUDA: .*torch.autocast\("):
        emu_attention_fwd(E, q, q, q, None, True)


# ------------------------------------------------------------------------- LayerNorm, cross-entropy, Lion
# These run the same binding on both sides: the CPU kernels (tested against float64 in their own test
# files) and the emulated CUDA kernels, with NaN-filled outputs, and compare.
def vw(t, dev, name="t"):
    v = _ext.view(t, name)
    return (v[0], v[1], v[2], v[3], dev)


def ovw(t, dev, name="t"):
    return None if t is None else vw(t, dev, name)


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def ln_fwd(mod, dev, x, w, b, r, y_dtype, eps=1e-5):
    y = _nan(x.shape, y_dtype)
    h = _nan(x.shape, r.dtype) if r is not None else None
    mean, rstd = _nan(x.shape[:-1], torch.float32), _nan(x.shape[:-1], torch.float32)
    mod.layer_norm_fwd(vw(x, dev), vw(w, dev), ovw(b, dev), ovw(r, dev), vw(y, dev), ovw(h, dev), vw(mean, dev),
                       vw(rstd, dev), eps, 0)
    return y, h, mean, rstd


def ln_bwd(mod, dev, dy, dres, h, w, mean, rstd, has_bias, want_dx):
    codes = _ext._torch_codes()
    rows, hidden = h.shape
    n = mod.layer_norm_bwd_workspace_numel(rows, hidden, codes[h.dtype], codes[w.dtype], has_bias, dev, codes[dy.dtype])
    ws = torch.zeros(max(n, 1), dtype=torch.float32)
    dh, dw = _nan(h.shape, h.dtype), _nan(w.shape, w.dtype)
    db = _nan(w.shape, w.dtype) if has_bias else None
    dx = _nan(h.shape, dy.dtype) if want_dx else None
    mod.layer_norm_bwd(vw(dy, dev), ovw(dres, dev), vw(h, dev), vw(w, dev), vw(mean, dev), vw(rstd, dev), vw(dh, dev),
                       vw(dw, dev), ovw(db, dev), vw(ws, dev), 0, ovw(dx, dev))
    return dh, dw, db, dx


def _close(got, want, name, ulps=2):
    """got (emulated CUDA) against want (CPU kernel): a few units in the last place of the dtype, scaled
    by the tensor's magnitude (the two sum in different orders)."""
    if want is None:
        assert got is None
        return
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten element or poisoned read)"
    eps = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[got.dtype]
    scale = max(want.double().abs().max().item(), 1e-30)
    if got.dtype == torch.float32:  # float32 results of sums in another order: ~64 ulps of the largest
        ulps = max(ulps, 64)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= ulps * eps * scale, f"{name}: max diff {err:.3g} (scale {scale:.3g}, {ulps} ulps)"


LN_SHAPES = [(1, 7), (3, 1), (5, 64), (37, 768), (9, 4096), (3, 16384), (2, 40000), (300, 96)]
# (x, weight, residual, y) dtypes: uniform, and the mixed modes of layernorm.h
LN_MODES = [
    ("f32", torch.float32, torch.float32, None, torch.float32),
    ("bf16", torch.bfloat16, torch.bfloat16, None, torch.bfloat16),
    ("f16_f32w", torch.float16, torch.float32, None, torch.float16),
    ("bf16_res", torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
    ("f32_res_f32w", torch.float32, torch.float32, torch.float32, torch.float32),
    ("mixed_f32x_bf16y", torch.float32, torch.float32, None, torch.bfloat16),
    ("mixed_f32stream_bf16", torch.bfloat16, torch.float32, torch.float32, torch.bfloat16),
    ("mixed_f32stream_f16", torch.float16, torch.float32, torch.float32, torch.float16),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mode", LN_MODES, ids=[m[0] for m in LN_MODES])
@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_matches_cpu_kernels(E, shape, mode, bias):
    _layer_norm_case(E, shape, mode, bias)


def _layer_norm_case(E, shape, mode, bias):
    _, xd, wd, rd, yd = mode
    torch.manual_seed(shape[0] * 7 + shape[1])
    x = (torch.randn(shape) * 2 + 0.5).to(xd)
    w = (torch.rand(shape[1]) + 0.5).to(wd)
    b = torch.randn(shape[1]).to(wd) if bias else None
    r = torch.randn(shape).to(rd) if rd is not None else None
    cpu = ln_fwd(_ext._C, -1, x, w, b, r, yd)
    emu = ln_fwd(E, 0, x, w, b, r, yd)
    for name, g, c in zip(("y", "h", "mean", "rstd"), emu, cpu):
        _close(g, c, name)
    h = cpu[1] if r is not None else x
    dy = torch.randn(shape).to(yd)
    dres = torch.randn(shape).to(h.dtype) if r is not None else None
    want_dx = dy.dtype != h.dtype
    cpu_b = ln_bwd(_ext._C, -1, dy, dres, h, w, cpu[2], cpu[3], bias, want_dx)
    emu_b = ln_bwd(E, 0, dy, dres, h, w, cpu[2], cpu[3], bias, want_dx)
    for name, g, c in zip(("dh", "dweight", "dbias", "dx"), emu_b, cpu_b):
        # dweight/dbias: float32 sums over rows in another order (rows x ulp)
        _close(g, c, name, ulps=2 if name in ("dh", "dx") else 4 * shape[0] + 8)


CE_CASES = [(5, 1), (4, 7), (6, 1000), (3, 4099), (2, 50432), (9, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,vocab", CE_CASES, ids=[f"{r}x{v}" for r, v in CE_CASES])
def test_cross_entropy_matches_cpu_and_float64(E, rows, vocab, dtype):
    _cross_entropy_case(E, rows, vocab, dtype)


def _cross_entropy_case(E, rows, vocab, dtype):
    torch.manual_seed(rows * 100 + vocab)
    base = torch.randn(rows, vocab + 8) * 4
    logits = base[:, 3:3 + vocab].to(dtype) if dtype == torch.float32 else base[:, :vocab].to(dtype)
    targets = torch.randint(0, vocab, (rows,))
    targets[0], targets[-1] = 0, vocab - 1  # the first and last ids
    targets[1 % rows] = -100  # an ignored row
    outs = {}
    for mod, dev in ((_ext._C, -1), (E, 0)):
        loss, lse = _nan((rows,), torch.float32), _nan((rows,), torch.float32)
        mod.cross_entropy_fwd(vw(logits, dev), vw(targets, dev), vw(loss, dev), vw(lse, dev), -100, 0)
        drow = torch.randn(rows)
        dl = _nan(logits.shape, dtype)
        mod.cross_entropy_bwd(vw(logits, dev), vw(targets, dev), vw(lse, dev), vw(drow, dev), vw(dl, dev), -100, 0)
        outs[dev] = (loss, lse, dl, drow)
    for i, name in enumerate(("loss", "lse")):
        _close(outs[0][i][targets != -100], outs[-1][i][targets != -100], name, ulps=8)
    # dlogits: both against float64 (the drow draws differ between the two calls)
    lg = logits.double()
    lse64 = torch.logsumexp(lg, -1)
    kept = targets != -100  # (ignored rows: loss 0, lse unspecified)
    torch.testing.assert_close(outs[0][1].double()[kept], lse64[kept], rtol=1e-6, atol=1e-5)
    assert (outs[0][0][~kept] == 0).all()
    for dev in (0, -1):
        _, _, dl, drow = outs[dev]
        p = torch.softmax(lg, -1)
        p[torch.arange(rows), targets.clamp(min=0)] -= 1
        ref = p * drow.double()[:, None]
        ref[targets == -100] = 0
        tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
        assert not torch.isnan(dl).any()
        torch.testing.assert_close(dl.double(), ref, rtol=tol, atol=tol * max(1.0, drow.abs().max().item()))


@pytest.fixture
def lion_on_emulated_cuda(E, monkeypatch):
    """mk.optim.Lion whose CPU tensors go through the emulated CUDA kernels (sum of squares, finalize,
    the multi-tensor step)."""
    _emulate_lion(E, monkeypatch)


def _emulate_lion(E, monkeypatch):
    import mpt_kernels.optim as optim

    monkeypatch.setattr(optim, "_C", E)
    monkeypatch.setattr(optim, "view", lambda t, name="t": vw(t, 0, name))
    monkeypatch.setattr(optim, "_stream", lambda dev: 0)


def _lion_run(shapes, pdtype, gdtype, steps, **kw):
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s).to(pdtype)) for s in shapes]
    if gdtype != pdtype:
        for p in params:
            p.grad_dtype = gdtype  # (torch >= 2.10 checks a gradient's dtype against this)
    opt = mk.optim.Lion(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, **kw)
    for i in range(steps):
        g = torch.Generator().manual_seed(100 + i)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 3).to(gdtype)
        opt.step()
    return params, opt


LION_SHAPES = [(1,), (1000,), (70000,), (3, 0, 2), (513, 33)]


@pytest.mark.parametrize("kw", [{}, {"max_grad_norm": 1.0}, {"max_grad_norm": 1e-3, "state_dtype": torch.bfloat16}],
                         ids=["plain", "clip", "clip_bf16_state"])
@pytest.mark.parametrize("pdtype,gdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32)], ids=["f32", "bf16", "bf16p_f32g"])
def test_lion_matches_cpu(request, pdtype, gdtype, kw):
    cpu_params, cpu_opt = _lion_run(LION_SHAPES, pdtype, gdtype, 3, **kw)
    request.getfixturevalue("lion_on_emulated_cuda")
    emu_params, emu_opt = _lion_run(LION_SHAPES, pdtype, gdtype, 3, **kw)
    for i, (a, b) in enumerate(zip(emu_params, cpu_params)):
        assert not torch.isnan(a).any(), f"param {i}: NaN"
        # one lr step (1e-2) apart at most where a sign flips near 0 on the other summation order
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7 if pdtype != torch.float32 else 1e-6, atol=1e-5,
                                   msg=lambda m: f"param {i}: {m}")
        ma, mb = emu_opt.state[a]["exp_avg"], cpu_opt.state[b]["exp_avg"]
        torch.testing.assert_close(ma.float(), mb.float(), rtol=2 ** -7, atol=1e-5)


def _lion_pair_steps(make_params, gdtype, steps, emulate, **kw):
    """Runs mk.optim.Lion on the CPU kernels, then (emulate(): patched) on the emulated CUDA ones, from
    the same parameters and gradients; returns both (params, optimizer)."""
    out = []
    for i in range(2):
        if i == 1:
            emulate()
        params = make_params()
        opt = mk.optim.Lion(params, seed=5, **kw)
        for s in range(steps):
            g = torch.Generator().manual_seed(100 + s)
            for p in params:
                p.grad_dtype = None  # (torch >= 2.10: allow a gradient dtype other than the parameter's)
                p.grad = torch.randn(p.shape, generator=g).to(gdtype)
            opt.step()
        out.append((params, opt))
    return out


@pytest.mark.parametrize("pd,gd,sd", [(pd, gd, sd) for pd in (torch.float32, torch.bfloat16)
                                      for gd in (torch.float32, torch.bfloat16) for sd in (torch.float32, torch.bfloat16)],
                         ids=lambda d: {torch.float32: "f32", torch.bfloat16: "bf16"}[d])
def test_lion_bit_for_bit_with_cpu_over_two_launches(request, pd, gd, sd):
    """tests/test_lion.py's real-GPU check on the emulator: same chunking, operation order, bf16
    rounding and RNG give identical bits without clipping; 105 tensors take more than one launch."""
    sizes = [(1,), (7,), (4097,), (278011,), (33, 65)] + [(3,)] * 100

    def make():
        torch.manual_seed(1)
        return [torch.nn.Parameter(torch.randn(s).to(pd)) for s in sizes]

    (cp, co), (ep, eo) = _lion_pair_steps(make, gd, 3, lambda: request.getfixturevalue("lion_on_emulated_cuda"),
                                          lr=1e-2, weight_decay=0.1, state_dtype=sd)
    for i, (a, b) in enumerate(zip(ep, cp)):
        assert torch.equal(a.detach(), b.detach()), f"param {i}"
        assert torch.equal(eo.state[a]["exp_avg"], co.state[b]["exp_avg"]), f"exp_avg {i}"


def test_lion_clipping_with_misaligned_tensors(request):
    def make():
        torch.manual_seed(2)
        base = torch.randn(278011 + 3)
        return [torch.nn.Parameter(base[3:]), torch.nn.Parameter(torch.randn(4101)[1:])]  # 12 and 4 bytes off

    (cp, co), (ep, eo) = _lion_pair_steps(make, torch.float32, 3, lambda: request.getfixturevalue("lion_on_emulated_cuda"),
                                          lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    for a, b in zip(ep, cp):
        # the clipping norm sums in another order: a few updates may flip sign where m ~ 0
        diff = (a.detach() - b.detach()).abs()
        assert not torch.isnan(a).any()
        assert (diff > 1e-6).float().mean().item() < 1e-3 and diff.max().item() <= 2 * 1e-2 * 3 + 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_decode_from_cache_slices(E, dtype):
    """The model's decode: q of a few positions against the first Sk rows of a preallocated (B, S_max,
    Hkv, D) cache, so the batch stride spans S_max rows, not Sk."""
    torch.manual_seed(21)
    B, Smax, Sk, H, Hkv, D = 2, 700, 333, 8, 2, 128
    kc, vc = torch.randn(B, Smax, Hkv, D, dtype=dtype), torch.randn(B, Smax, Hkv, D, dtype=dtype)
    for Sq in (1, 3):
        q = torch.randn(B, Sq, H, D, dtype=dtype)
        k, v = kc[:, :Sk], vc[:, :Sk]
        slopes = mk.alibi_slopes(H)
        out, lse = emu_attention_fwd(E, q, k, v, slopes, True)
        o64, _, _ = _ref(q, k, v, slopes, True, torch.float64)
        olp, _, _ = _ref(q, k, v, slopes, True, dtype)
        _bound_check(out, o64, olp, f"out (Sq={Sq})", 1e-3)


def test_attention_unaligned_view_is_refused_not_misread(E):
    base = torch.randn(1, 64, 2, 64 + 1, dtype=torch.bfloat16)
    q = base[..., 1:]  # rows 130 B apart, start 2 B past 16-byte alignment: the 16-byte loads cannot read it
    with pytest.raises(ValueError):
        emu_attention_fwd(E, q, q, q, None, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_backward_single_buffered_on_smaller_shared_memory(E, dtype, monkeypatch):
    """GPUs whose per-block shared memory opt-in is 99 KiB (sm_86, sm_89) get the backward with one
    Q/dO stage at head dim 128 (97,536 B instead of 114,944 B): the launcher reads the limit."""
    monkeypatch.setenv("MPTK_EMU_SMEM_OPTIN", str(99 * 1024))
    torch.manual_seed(4)
    q, k, v = _qkv(1, 150, 150, 2, 1, 128, dtype)
    _run_attention(E, q, k, v, True, mk.alibi_slopes(2))


@pytest.mark.parametrize("rows,hidden", [(300, 96), (40, 4096)], ids=["warp_rows", "block_rows"])
@pytest.mark.parametrize("sms", ["1", "7", "200"])
def test_layer_norm_backward_grid_follows_the_sm_count(E, sms, monkeypatch, rows, hidden):
    """The backward's grid (and so its partial sums) is sized from the SM count and occupancy. At hidden
    4096 a row takes a whole block (block-wide reductions through shared memory), and with few SMs a
    block takes several rows in turn: one reduction's buffer reused by the next."""
    _layer_norm_bwd_grid_case(E, sms, monkeypatch, rows, hidden)


def _layer_norm_bwd_grid_case(E, sms, monkeypatch, rows, hidden):
    monkeypatch.setenv("MPTK_EMU_SM_COUNT", sms)
    torch.manual_seed(int(sms))
    x, w, b = torch.randn(rows, hidden), torch.rand(hidden) + 0.5, torch.randn(hidden)
    cpu = ln_fwd(_ext._C, -1, x, w, b, None, torch.float32)
    dy = torch.randn(rows, hidden)
    cpu_b = ln_bwd(_ext._C, -1, dy, None, x, w, cpu[2], cpu[3], True, False)
    emu_b = ln_bwd(E, 0, dy, None, x, w, cpu[2], cpu[3], True, False)
    for name, g, c in zip(("dh", "dweight", "dbias"), emu_b, cpu_b):
        _close(g, c, name, ulps=2 if name == "dh" else 4 * rows + 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_backward_with_a_huge_alibi_row_constant(E, dtype):
    """A slope of 200 over 300 keys puts MPT's true logsumexp at ~6e4 (its causal ALiBi row constant
    -slope * (Sq - 1 - i)), the magnitude of slope 0.84 at 65k tokens, where a float32 ulp is 0.004:
    the backward rebuilds P from that lse (NOTES, precision note). Measured relative errors at slope
    200 equal those at 0.84 (bf16 dq 2.9e-3 vs 3.2e-3), except float16 dv: 8.0e-4 (2.9e-4 at 0.84),
    and 1.40e-3 with the old conversion (lse and the row constant each scaled by log2 e before the
    subtraction): its bound, 1.1e-3, is set between the two so that regression fails here."""
    torch.manual_seed(8)
    q, k, v = _qkv(1, 300, 300, 2, 2, 64, dtype)
    slopes = torch.tensor([200.0, 0.5])
    out, lse = emu_attention_fwd(E, q, k, v, slopes, True)
    assert lse.abs().max() > 5e4
    dout = torch.randn(out.shape, dtype=dtype)
    o64, lse64, g64 = _ref(q, k, v, slopes, True, torch.float64, dout)
    grads = emu_attention_bwd(E, dout, q, k, v, out, lse, slopes, True)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out,) + grads, (o64,) + g64):
        bound = 6e-3 if dtype == torch.bfloat16 else (1.1e-3 if name == "dv" else 1.6e-3)
        assert not torch.isnan(got).any(), name
        rel = ((got.double() - ref).norm() / ref.norm()).item()
        assert rel < bound, f"{name}: relative error {rel:.3g}"


# ----------------------------------------------------------------------------------------- racecheck
# The racecheck variant of the emulator (tests/cuda_emu/README.md, "Racecheck"): the kernels' every
# shared-memory access is checked against the last write and the reads since, per byte; two threads'
# accesses, one a write, with no __syncthreads between them (nor, within a warp, a warp collective)
# are reported with both source lines. Strict mode (MPTK_EMU_RACECHECK_STRICT=1) counts barriers only.
@pytest.fixture(scope="module")
def R():
    if os.environ.get("MPTK_EMU_SANITIZE"):
        pytest.skip("the racecheck build excludes MPTK_EMU_SANITIZE (GCC's thread and address instrumentation)")
    return emu_build.load(racecheck=True)


@pytest.fixture
def strict(monkeypatch):
    monkeypatch.setenv("MPTK_EMU_RACECHECK_STRICT", "1")


SELFTESTS = ["exchange", "overwrite_read", "same_slot", "within_warp", "static_exchange", "async_read",
             "async_in_flight", "async_overwrite", "ldmatrix_other_warp", "global_overlap", "global_other_block",
             "global_atomic", "global_atomic_last_block"]


@pytest.mark.parametrize("sched", ["0", "1", "2", "3"])
@pytest.mark.parametrize("name", SELFTESTS)
def test_racecheck_reports_each_planted_hazard(E, R, monkeypatch, name, sched):
    """tests/cuda_emu/selftest.cu: each kernel with a planted bug is reported (under every schedule: the
    check does not depend on the order the threads happen to run in), naming both accesses' lines in
    selftest.cu; its fixed twin runs clean and computes what the plain emulator computes."""
    monkeypatch.setenv("MPTK_EMU_SCHEDULE", sched)
    monkeypatch.delenv("MPTK_EMU_RACECHECK_STRICT", raising=False)  # (within_warp's twin relies on a shuffle)
    line = r"selftest\.cu:\d+"
    with pytest.raises(RuntimeError, match=rf"racecheck: .*(hazard|in flight) on .* at .*{line}.* at .*{line}"):
        R._emu_selftest(name, False)
    fixed = R._emu_selftest(name, True)
    assert fixed == E._emu_selftest(name, True)
    assert not any(math.isnan(v) for v in fixed)


def test_racecheck_strict_mode_counts_barriers_only(R, monkeypatch):
    """A warp collective orders the lanes of its warp by default (how the kernels' warp-level exchanges
    behave on the hardware); strict mode asks for a __syncthreads there too."""
    monkeypatch.delenv("MPTK_EMU_RACECHECK_STRICT", raising=False)
    R._emu_selftest("within_warp", True)
    monkeypatch.setenv("MPTK_EMU_RACECHECK_STRICT", "1")
    with pytest.raises(RuntimeError, match="racecheck: (read-after-write|write-after-read) hazard"):
        R._emu_selftest("within_warp", True)
    R._emu_selftest("exchange", True)


def test_racecheck_plain_build_checks_nothing():
    """The plain emulator runs the planted bugs without a report (what racecheck adds)."""
    plain = emu_build.load(racecheck=False)  # (E is the racecheck build under MPTK_EMU_RACECHECK=1)
    for name in SELFTESTS:
        plain._emu_selftest(name, False)


@pytest.mark.parametrize("name,shape,grad", PATHS, ids=[c[0] for c in PATHS])
def test_racecheck_attention_each_path(R, strict, name, shape, grad):
    """Every attention kernel path (forward, split-K decode and its combine, backward) under the strict
    racecheck: the cp.async stages, the Q tile that borrows a K/V stage, the backward's reused dS tile."""
    _attention_path_case(R, name, shape, grad, torch.bfloat16)


@pytest.mark.parametrize("shape", [(1, 7), (37, 768), (3, 16384), (300, 96)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", [m for m in LN_MODES if m[0] in ("bf16_res", "mixed_f32stream_bf16", "f32")],
                         ids=lambda m: m[0])
def test_racecheck_layer_norm(R, strict, shape, mode):
    _layer_norm_case(R, shape, mode, True)


def test_racecheck_layer_norm_backward_rows_in_turn(R, strict, monkeypatch):
    """One SM: each block of the backward takes several whole-block rows, reusing its reduction buffer."""
    _layer_norm_bwd_grid_case(R, "1", monkeypatch, 40, 4096)


@pytest.mark.parametrize("rows,vocab", [(4, 7), (6, 1000), (2, 50432)], ids=lambda v: str(v))
def test_racecheck_cross_entropy(R, strict, rows, vocab):
    _cross_entropy_case(R, rows, vocab, torch.bfloat16)


def test_racecheck_lion(R, strict, monkeypatch):
    cpu, _ = _lion_run(LION_SHAPES, torch.bfloat16, torch.float32, 2, max_grad_norm=1.0)
    _emulate_lion(R, monkeypatch)  # (the clipping norm's block reduction goes through shared memory)
    emu, _ = _lion_run(LION_SHAPES, torch.bfloat16, torch.float32, 2, max_grad_norm=1.0)
    for a, b in zip(emu, cpu):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-5)
