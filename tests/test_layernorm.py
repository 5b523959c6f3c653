"""LayerNorm kernels (CPU and CUDA) against the float64 reference.

Every output, gradient and workspace the op allocates is NaN-filled first (autouse fixture below
swaps the op's allocator), so an element the kernel forgets to write fails the comparison.

Tolerances (|actual - expected| <= rtol * |expected| + atol_frac * max|expected|):
  outputs      rtol = one ulp of the output dtype: float32 1e-5 (a few float32 roundings of the
               affine step), bfloat16 2^-7, float16 2^-10 (round-to-nearest costs half an ulp and the
               float32 arithmetic before it may cross one rounding boundary: one ulp in total);
               atol_frac = 1e-5 covers float32 statistics (mean/variance summed over up to 40000
               elements) on elements near zero, where relative error means nothing.
  gradients    same rtol; atol_frac = 1e-4: dx subtracts the row means of g and g*xhat from g
               (cancellation on small elements), dweight/dbias sum up to 64 rows in float32.
A wrong index, a missed row or column, or a wrong formula errs by O(1) and fails all of these.
"""
import os

import pytest
import torch

import mpt_kernels as mk
from mpt_kernels import _ext
from mpt_kernels._ext import _C
from mpt_kernels.ops import layernorm as ln_op
from mpt_kernels.ops.reference import layer_norm_reference

RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
OUT_ATOL_FRAC = 1e-5
GRAD_ATOL_FRAC = 1e-4

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = {"cpu": [torch.float32, torch.bfloat16, torch.float16],
          "cuda": [torch.float32, torch.bfloat16, torch.float16]}
# rows x hidden: empty, hidden 1, tiny, odd (1023: no 16-byte packs), MPT-125M, MPT-7B, wide, and
# wider than any register-cached path of the CUDA kernels (40000).
SHAPES = [(0, 64), (3, 1), (5, 7), (2, 3, 1023), (37, 768), (9, 4096), (3, 16384), (2, 40000)]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def alloc(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ln_op, "_alloc", alloc)


def assert_close(actual, expected, rtol, atol_frac, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    a, e = actual.double().cpu(), expected.double().cpu()
    bound = rtol * e.abs() + atol_frac * e.abs().max() + 1e-300
    bad = ~((a - e).abs() <= bound)  # NaN (an unwritten element) counts as bad
    if bad.any():
        err = (a - e).abs().nan_to_num(float("inf"))
        i = int(torch.argmax((err - bound).flatten()))
        raise AssertionError(f"{what}: {int(bad.sum())}/{a.numel()} elements out of tolerance; worst at flat index "
                             f"{i}: got {a.flatten()[i].item()}, expected {e.flatten()[i].item()}")


def make_inputs(shape, dtype, device, with_bias, with_residual, weight_dtype=None):
    hidden = shape[-1]
    wd = weight_dtype or dtype
    # Non-zero mean and non-unit scale so that mean subtraction and rstd both matter.
    x = (torch.randn(shape) * 2.5 + 0.75).to(dtype).to(device)
    w = (torch.randn(hidden) * 0.5 + 1.0).to(wd).to(device)
    b = torch.randn(hidden).to(wd).to(device) if with_bias else None
    r = torch.randn(shape).to(dtype).to(device) if with_residual else None
    return x, w, b, r


def reference(x, w, b, r, eps, dy=None, dsum=None):
    """float64 reference: h = x + r rounded to x's dtype (what the op normalises and returns), then
    y, and gradients by float64 autograd of layer_norm_reference. The gradient of x (and r) is that
    of h plus the gradient flowing into the returned sum."""
    h = x if r is None else (x.double() + r.double()).to(x.dtype)
    h64 = h.double().requires_grad_()
    w64 = w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    y64 = layer_norm_reference(h64, w64, b64, eps, compute_dtype=torch.float64)
    grads = None
    if dy is not None:
        y64.backward(dy.double())
        dx = h64.grad + (dsum.double() if dsum is not None else 0.0)
        grads = (dx, w64.grad, b64.grad if b is not None else None)
    return y64.detach(), h, grads


# (bias, residual): every shape runs MPT's plain no-bias norm and the fused residual add with a
# bias; the two mixed variants run on a few shapes (they share every code path with the others).
VARIANTS = [(False, False), (True, True)]
MIXED_VARIANT_SHAPES = [(5, 7), (37, 768), (2, 3, 1023)]
CASES = [(s, b, r) for s in SHAPES for b, r in VARIANTS] + [
    (s, b, r) for s in MIXED_VARIANT_SHAPES for b, r in [(True, False), (False, True)]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,with_bias,with_residual", CASES,
                         ids=["x".join(map(str, s)) + ("-bias" if b else "") + ("-residual" if r else "")
                              for s, b, r in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_backward(device, dtype, shape, with_bias, with_residual):
    if dtype not in DTYPES[device]:
        pytest.skip(f"{dtype} not supported on {device}")
    eps = 1e-5
    x, w, b, r = make_inputs(shape, dtype, device, with_bias, with_residual)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    out = mk.layer_norm(*leaves[:3], eps=eps, residual=leaves[3])
    y, h = out if with_residual else (out, None)
    dy = torch.randn(shape).to(dtype).to(device)
    dsum = torch.randn(shape).to(dtype).to(device) if with_residual else None
    y_ref, h_ref, (dx_ref, dw_ref, db_ref) = reference(x, w, b, r, eps, dy, dsum)

    rtol = RTOL[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, rtol, OUT_ATOL_FRAC, "y")
    if with_residual:
        assert torch.equal(h.cpu(), h_ref.cpu()), "residual sum must equal (x + residual) rounded to dtype"
        torch.autograd.backward([y, h], [dy, dsum])
    else:
        y.backward(dy)
    assert_close(leaves[0].grad, dx_ref, rtol, GRAD_ATOL_FRAC, "dx")
    assert_close(leaves[1].grad, dw_ref, RTOL[w.dtype], GRAD_ATOL_FRAC, "dweight")
    if with_bias:
        assert_close(leaves[2].grad, db_ref, RTOL[w.dtype], GRAD_ATOL_FRAC, "dbias")
    if with_residual:
        assert_close(leaves[3].grad, dx_ref, rtol, GRAD_ATOL_FRAC, "dresidual")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.25], ids=lambda e: f"eps{e:g}")
def test_eps_matters_for_small_variance_rows(device, dtype, eps):
    """Rows whose variance is comparable to eps (std 3e-3 .. 1, mean half the std), so eps moves rstd
    by far more than the tolerance: the inputs of test_forward_backward (variance ~6) cannot tell eps
    from 1.5 eps in float32. (A mean far above the std would make float32 statistics themselves
    ill-conditioned, as torch's are: not what this tests.) Forward and gradients against float64."""
    if dtype not in DTYPES[device]:
        pytest.skip(f"{dtype} not supported on {device}")
    rows, hidden = 6, 1031  # odd: the vector body and the scalar tail both see eps
    scale = torch.tensor([3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]).unsqueeze(1)
    x = ((torch.randn(rows, hidden, dtype=torch.float64) + 0.5) * scale).to(dtype).to(device)
    w = (torch.randn(hidden) * 0.5 + 1.0).to(dtype).to(device)
    b = torch.randn(hidden).to(dtype).to(device)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = mk.layer_norm(*leaves, eps=eps)
    dy = torch.randn(rows, hidden).to(dtype).to(device)
    y.backward(dy)
    y_ref, _, (dx_ref, dw_ref, db_ref) = reference(x, w, b, None, eps, dy)
    rtol = RTOL[dtype]
    assert_close(y, y_ref, rtol, OUT_ATOL_FRAC, "y")
    assert_close(leaves[0].grad, dx_ref, rtol, GRAD_ATOL_FRAC, "dx")
    assert_close(leaves[1].grad, dw_ref, rtol, GRAD_ATOL_FRAC, "dweight")
    assert_close(leaves[2].grad, db_ref, rtol, GRAD_ATOL_FRAC, "dbias")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(5, 7), (17, 1024), (4, 16384)], ids=lambda s: "x".join(map(str, s)))
def test_float32_weight_with_low_precision_input(device, dtype, shape):
    """Weights kept in float32 (no autocast) with bfloat16/float16 activations."""
    x, w, b, r = make_inputs(shape, dtype, device, True, True, weight_dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    y, h = mk.layer_norm(*leaves[:3], residual=leaves[3])
    dy, dsum = torch.randn(shape).to(dtype).to(device), torch.randn(shape).to(dtype).to(device)
    y_ref, h_ref, (dx_ref, dw_ref, db_ref) = reference(x, w, b, r, 1e-5, dy, dsum)
    assert_close(y, y_ref, RTOL[dtype], OUT_ATOL_FRAC, "y")
    torch.autograd.backward([y, h], [dy, dsum])
    assert leaves[1].grad.dtype == torch.float32
    assert_close(leaves[0].grad, dx_ref, RTOL[dtype], GRAD_ATOL_FRAC, "dx")
    assert_close(leaves[1].grad, dw_ref, RTOL[torch.float32], GRAD_ATOL_FRAC, "dweight")
    assert_close(leaves[2].grad, db_ref, RTOL[torch.float32], GRAD_ATOL_FRAC, "dbias")


# Mixed precision, an autocast model's layout: float32 residual stream and weights, 16-bit branch
# (x) and output. "residual": 16-bit x into a float32 stream; "residual-f32-x": a float32 x (the
# branch kept in float32) with out_dtype; "no-residual": a float32 x (the first block's input)
# with out_dtype.
MIXED_MODES = ["residual", "residual-f32-x", "no-residual"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MIXED_MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_precision(device, low, shape, mode):
    """Against the float64 reference, and (CPU) bit for bit the float32 op on the same values with
    its output rounded: same arithmetic, only the loads and stores differ. Outputs poisoned."""
    eps, hidden = 1e-5, shape[-1]
    with_bias = hidden % 2 == 1  # odd rows with a bias, even ones without: both paths on all sizes
    x32 = torch.randn(shape) * 2.5 + 0.75
    x = (x32.to(low) if mode == "residual" else x32).to(device)
    r = torch.randn(shape).to(device) if mode != "no-residual" else None
    w = (torch.randn(hidden) * 0.5 + 1.0).to(device)
    b = torch.randn(hidden).to(device) if with_bias else None
    out_dtype = None if mode == "residual" else low  # a 16-bit x gives its own dtype by default
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    out = mk.layer_norm(*leaves[:3], eps=eps, residual=leaves[3], out_dtype=out_dtype)
    y, h = out if r is not None else (out, None)
    assert y.dtype == low and y.shape == x.shape
    dy = torch.randn(shape).to(low).to(device)
    dsum = torch.randn(shape).to(device) if r is not None else None
    y_ref, h_ref, (dx_ref, dw_ref, db_ref) = reference(x.float(), w, b, r, eps, dy.float(), dsum)
    assert_close(y, y_ref, RTOL[low], OUT_ATOL_FRAC, "y")
    if r is not None:
        assert h.dtype == torch.float32 and torch.equal(h.cpu(), h_ref.cpu()), "h = x + residual in float32"
        torch.autograd.backward([y, h], [dy, dsum])
    else:
        y.backward(dy)
    assert leaves[0].grad.dtype == x.dtype
    assert_close(leaves[0].grad, dx_ref, RTOL[x.dtype], GRAD_ATOL_FRAC, "dx")
    assert_close(leaves[1].grad, dw_ref, RTOL[torch.float32], GRAD_ATOL_FRAC, "dweight")
    if with_bias:
        assert_close(leaves[2].grad, db_ref, RTOL[torch.float32], GRAD_ATOL_FRAC, "dbias")
    if r is not None:
        assert leaves[3].grad.dtype == torch.float32
        assert_close(leaves[3].grad, dx_ref, RTOL[torch.float32], GRAD_ATOL_FRAC, "dresidual")
    if device != "cpu":  # CUDA: the mixed kernels group a row's elements differently (other sums order)
        return
    f32 = [t.float().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    out32 = mk.layer_norm(*f32[:3], eps=eps, residual=f32[3])
    y32, h32 = out32 if r is not None else (out32, None)
    assert torch.equal(y, y32.to(low)), "y must be the float32 op's y rounded"
    if r is not None:
        assert torch.equal(h, h32)
        torch.autograd.backward([y32, h32], [dy.float(), dsum])
        assert torch.equal(leaves[3].grad, f32[3].grad)
    else:
        y32.backward(dy.float())
    assert torch.equal(leaves[0].grad, f32[0].grad.to(x.dtype)), "dx must be the float32 dx rounded"
    assert torch.equal(leaves[1].grad, f32[1].grad)
    if with_bias:
        assert torch.equal(leaves[2].grad, f32[2].grad)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_unused_sum_output(device):
    """The final norm's residual sum is not used: its gradient arrives as None (not materialised as
    zeros); x and residual still get the LayerNorm's gradient."""
    x = torch.randn(6, 256).bfloat16().to(device).requires_grad_()
    r = torch.randn(6, 256, device=device, requires_grad=True)
    w = torch.randn(256, device=device, requires_grad=True)
    y, _ = mk.layer_norm(x, w, residual=r)
    dy = torch.randn(6, 256).bfloat16().to(device)
    y.backward(dy)
    _, _, (dx_ref, dw_ref, _) = reference(x.detach().float(), w.detach(), None, r.detach(), 1e-5, dy.float())
    assert_close(r.grad, dx_ref, RTOL[torch.float32], GRAD_ATOL_FRAC, "dresidual")
    assert_close(x.grad, dx_ref, RTOL[torch.bfloat16], GRAD_ATOL_FRAC, "dx")
    assert_close(w.grad, dw_ref, RTOL[torch.float32], GRAD_ATOL_FRAC, "dweight")


def test_mixed_precision_bad_inputs():
    """Every dtype combination outside the mixed modes is refused, naming the argument."""
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    w, xb = torch.randn(32), torch.randn(4, 32).bfloat16()
    cases = [
        ("residual", lambda: mk.layer_norm(x, w, residual=r.bfloat16())),  # 16-bit stream, float32 x
        ("residual", lambda: mk.layer_norm(xb, w, residual=r.half())),
        ("out_dtype", lambda: mk.layer_norm(xb, w, out_dtype=torch.float32)),  # 16-bit h
        ("out_dtype", lambda: mk.layer_norm(x, w, out_dtype=torch.float64)),
        ("out_dtype", lambda: mk.layer_norm(xb, w, residual=r, out_dtype=torch.float16)),  # not x's dtype
        ("weight", lambda: mk.layer_norm(xb, w.bfloat16(), residual=r)),
        ("weight", lambda: mk.layer_norm(x, w.half(), out_dtype=torch.float16)),
        ("bias", lambda: mk.layer_norm(x, w, w.bfloat16(), out_dtype=torch.bfloat16)),
    ]
    for name, fn in cases:
        with pytest.raises(ValueError, match=f"^{name}:"):
            fn()
    # The core checks the same on its own. (Views carry raw pointers: every tensor a call may write
    # is kept alive by a name here.)
    V = _ext.view
    y, yb, mean, rstd = torch.empty(4, 32), torch.empty(4, 32).bfloat16(), torch.empty(4), torch.empty(4)
    h_out, dx, dw = torch.empty(4, 32), torch.empty(4, 32).bfloat16(), torch.empty(32)

    def fwd(**kw):
        args = dict(x=V(xb), weight=V(w), bias=None, residual=V(r), y=V(yb), residual_out=V(h_out),
                    mean=V(mean), rstd=V(rstd), eps=1e-5)
        args.update(kw)
        _C.layer_norm_fwd(**args)

    fwd()  # the valid mixed call
    core_cases = [
        ("residual_out", dict(residual_out=V(torch.empty(4, 32).bfloat16()))),
        ("residual", dict(residual=V(r.half()))),
        ("y", dict(y=V(y))),  # float32 y from a bfloat16 x into a float32 stream
        ("x", dict(x=V(xb.half()), y=V(yb))),
        ("weight", dict(weight=V(w.bfloat16()))),
        ("x", dict(residual=None, residual_out=None, y=V(yb.half()))),  # 16-bit x, other 16-bit y, no residual
    ]
    for name, kw in core_cases:
        with pytest.raises(ValueError, match=f"^{name}:"):
            fwd(**kw)
    codes = _ext._torch_codes()
    n = _C.layer_norm_bwd_workspace_numel(4, 32, codes[torch.float32], codes[torch.float32], False, -1,
                                          codes[torch.bfloat16])
    ws = torch.empty(n)

    def bwd(**kw):
        args = dict(dy=V(yb), dresidual_out=None, h=V(x), weight=V(w), mean=V(mean), rstd=V(rstd), dh=V(y),
                    dweight=V(dw), dbias=None, workspace=V(ws), dx=V(dx))
        args.update(kw)
        _C.layer_norm_bwd(**args)

    mean.zero_(), rstd.fill_(1.0)
    bwd()
    bwd_cases = [
        ("dx", dict(dx=V(torch.empty(4, 32).half()))),
        ("dx", dict(dy=V(y), dx=V(torch.empty(4, 32)))),  # uniform float32: no dx
        ("dy", dict(h=V(xb), dh=V(yb), dy=V(torch.empty(4, 32).half()), dx=None)),
        ("weight", dict(weight=V(w.bfloat16()))),
    ]
    for name, kw in bwd_cases:
        with pytest.raises(ValueError, match=f"^{name}:"):
            bwd(**kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_and_misaligned_rows(device, dtype):
    """Rows one stride apart inside a wider buffer, at an odd element offset (no 16-byte packs on
    CUDA); and a 3-D slice whose leading dims cannot share one stride (copied by the op)."""
    H = 1024
    buf = torch.randn(12, H + 8).to(dtype).to(device)
    x = buf[1:, 1:H + 1]  # row stride H + 8, storage offset H + 9
    rbuf = torch.randn(11, H + 3).to(dtype).to(device)
    r = rbuf[:, 2:H + 2]
    w = torch.randn(H).to(dtype).to(device)
    y, h = mk.layer_norm(x, w, residual=r)
    y_ref, h_ref, _ = reference(x, w, None, r, 1e-5)
    assert torch.equal(h.cpu(), h_ref.cpu())
    assert_close(y, y_ref, RTOL[dtype], OUT_ATOL_FRAC, "y (strided rows)")

    x3 = torch.randn(2, 5, H).to(dtype).to(device)[:, :4]  # strides (5H, H, 1): not one row stride
    y3 = mk.layer_norm(x3, w)
    assert_close(y3, reference(x3, w, None, None, 1e-5)[0], RTOL[dtype], OUT_ATOL_FRAC, "y (3-D slice)")

    # Backward through _C with strided dy and dresidual_out, NaN-filled outputs and workspace.
    xs = x.clone()
    mean = torch.full((11,), float("nan"), device=device)
    rstd = torch.full((11,), float("nan"), device=device)
    yo = torch.full((11, H), float("nan"), dtype=dtype, device=device)
    _C.layer_norm_fwd(_ext.view(xs), _ext.view(w), None, None, _ext.view(yo), None, _ext.view(mean), _ext.view(rstd),
                      1e-5, _ext.current_stream(xs))
    dybuf = torch.randn(11, H + 16).to(dtype).to(device)
    dy, dres = dybuf[:, 8:H + 8], rbuf[:, 1:H + 1]
    dev = -1 if device == "cpu" else torch.device(device).index or 0
    codes = _ext._torch_codes()
    ws = torch.full((_C.layer_norm_bwd_workspace_numel(11, H, codes[dtype], codes[dtype], False, dev),), float("nan"),
                    device=device)
    dh = torch.full((11, H), float("nan"), dtype=dtype, device=device)
    dw = torch.full((H,), float("nan"), dtype=dtype, device=device)
    _C.layer_norm_bwd(_ext.view(dy), _ext.view(dres), _ext.view(x), _ext.view(w), _ext.view(mean), _ext.view(rstd),
                      _ext.view(dh), _ext.view(dw), None, _ext.view(ws), _ext.current_stream(x))
    _, _, (dx_ref, dw_ref, _) = reference(x, w, None, None, 1e-5, dy, dres)
    assert_close(dh, dx_ref, RTOL[dtype], GRAD_ATOL_FRAC, "dh (strided dy)")
    assert_close(dw, dw_ref, RTOL[dtype], GRAD_ATOL_FRAC, "dweight (strided dy)")


@pytest.mark.parametrize("device", DEVICES)
def test_saved_statistics_and_determinism(device):
    x, w, b, _ = make_inputs((64, 768), torch.bfloat16, device, True, False)
    y, h, mean, rstd = ln_op.layer_norm_fwd(x, w, b, None, 1e-5)
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32 and mean.shape == (64,)
    x64 = x.double()
    assert_close(mean, x64.mean(-1), 1e-6, 1e-6, "mean")
    assert_close(rstd, torch.rsqrt(x64.var(-1, unbiased=False) + 1e-5), 1e-5, 0, "rstd")
    dy = torch.randn(64, 768).to(torch.bfloat16).to(device)
    first = ln_op.layer_norm_bwd(dy, None, x, w, mean, rstd, True)
    for _ in range(2):
        again = ln_op.layer_norm_bwd(dy, None, x, w, mean, rstd, True)
        for a, b2 in zip(first, again):
            assert torch.equal(a, b2), "backward must be bitwise deterministic"


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_through_sum_output_only(device):
    """The normed output unused: its gradient arrives as zeros; x and residual get dsum only."""
    x, w, _, r = make_inputs((6, 96), torch.float32, device, False, True)
    xl, rl = x.clone().requires_grad_(), r.clone().requires_grad_()
    _, h = mk.layer_norm(xl, w, residual=rl)
    (h * 3).sum().backward()
    assert torch.equal(xl.grad, torch.full_like(x, 3.0)) and torch.equal(rl.grad, torch.full_like(r, 3.0))


@pytest.mark.parametrize("device", DEVICES)
def test_lp_layer_norm_module(device):
    torch_ln = torch.nn.LayerNorm(256, bias=True).to(device)
    with torch.no_grad():
        torch_ln.weight.normal_()
        torch_ln.bias.normal_()
    m = mk.nn.LPLayerNorm(256, bias=True).to(device)
    m.load_state_dict(torch_ln.state_dict())  # same parameter names as torch.nn.LayerNorm
    assert set(m.state_dict()) == {"weight", "bias"}
    assert set(mk.nn.LPLayerNorm(256).state_dict()) == {"weight"}  # MPT default: no bias
    x = torch.randn(4, 9, 256, device=device)
    assert_close(m(x), torch_ln(x).detach(), 1e-5, 1e-5, "LPLayerNorm vs torch.nn.LayerNorm (float32)")
    xb = x.bfloat16()
    r = torch.randn_like(xb)
    y, h = m.to(torch.bfloat16)(xb, residual=r)
    y_ref, h_ref, _ = reference(xb, m.weight.detach(), m.bias.detach(), r, 1e-5)
    assert torch.equal(h, h_ref)
    assert_close(y, y_ref, RTOL[torch.bfloat16], OUT_ATOL_FRAC, "LPLayerNorm residual")
    # Two normalised dims, like torch.nn.LayerNorm((9, 256)).
    m2 = mk.nn.LPLayerNorm((9, 256), bias=True).to(device)
    t2 = torch.nn.LayerNorm((9, 256)).to(device)
    t2.load_state_dict(m2.state_dict())
    assert_close(m2(x), t2(x).detach(), 1e-5, 1e-5, "LPLayerNorm 2-D normalized_shape")


def test_lp_layer_norm_autocast_cpu():
    """Like MPT's LPLayerNorm: under autocast, input and weights are cast to the autocast dtype."""
    m = mk.nn.LPLayerNorm(128)
    with torch.no_grad():
        m.weight.normal_()
    x = torch.randn(8, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y_ref, _, _ = reference(x.detach().bfloat16(), m.weight.detach().bfloat16(), None, None, 1e-5)
    assert_close(y, y_ref, RTOL[torch.bfloat16], OUT_ATOL_FRAC, "autocast")
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and m.weight.grad.dtype == torch.float32


def test_torch_compile_fullgraph_cpu():
    """The custom ops trace with torch.compile(fullgraph=True): no graph breaks, same values and
    gradients as eager."""
    torch._dynamo.reset()

    def block(x, w, r):
        y, h = mk.layer_norm(x, w, residual=r)
        z = mk.layer_norm(h * 0.5, w)
        return (y.float() * z.float()).sum() + h.float().pow(2).sum()

    x, w, _, r = make_inputs((16, 256), torch.bfloat16, "cpu", False, True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (block, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, w, r)]
        loss = fn(*leaves)
        loss.backward()
        grads.append((loss.detach(), *[t.grad for t in leaves]))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    x, w, b, _ = make_inputs((8, 64), torch.float32, "cpu", True, False)
    f = torch.compile(lambda x, w, b: mk.layer_norm(x, w, b) * 2 + 1, fullgraph=True)
    assert torch.equal(f(x, w, b), mk.layer_norm(x, w, b) * 2 + 1)


def test_bad_inputs_raise_value_error_naming_the_argument():
    x = torch.randn(4, 32)
    w = torch.randn(32)
    cases = [
        ("x", lambda: mk.layer_norm(x.double(), w)),
        ("x", lambda: mk.layer_norm(x.to(torch.int32), w)),
        ("x", lambda: mk.layer_norm(torch.randn(4, 0), torch.randn(0))),
        ("weight", lambda: mk.layer_norm(x, torch.randn(31))),
        ("weight", lambda: mk.layer_norm(x, torch.randn(32, dtype=torch.float64))),
        ("weight", lambda: mk.layer_norm(x.bfloat16(), torch.randn(32, dtype=torch.float16))),
        ("weight", lambda: mk.layer_norm(x, torch.randn(64)[::2])),
        ("weight", lambda: mk.layer_norm(x, torch.randn(32, device="meta"))),  # another device
        ("bias", lambda: mk.layer_norm(x, w, torch.randn(33))),
        ("bias", lambda: mk.layer_norm(x, w.bfloat16().float(), torch.randn(32).bfloat16())),
        ("residual", lambda: mk.layer_norm(x, w, residual=torch.randn(4, 31))),
        ("residual", lambda: mk.layer_norm(x, w, residual=torch.randn(4, 32).bfloat16())),
        ("residual", lambda: mk.layer_norm(x, w, residual=torch.randn(4, 32, device="meta"))),
    ]
    for name, fn in cases:
        with pytest.raises(ValueError, match=f"^{name}:"):
            fn()


def test_strided_last_dim_is_copied_not_refused():
    """A transposed x or residual (last dim not contiguous) gives what its contiguous copy gives, as
    alibi_attention and cross_entropy do (it used to raise)."""
    w, b = torch.rand(32) + 0.5, torch.randn(32)
    xt = torch.randn(32, 4).t().requires_grad_()  # (4, 32), stride (1, 4)
    rt = torch.randn(32, 4).t()
    y, h = mk.layer_norm(xt, w, b, residual=rt)
    xc = xt.detach().contiguous().requires_grad_()
    yc, hc = mk.layer_norm(xc, w, b, residual=rt.contiguous())
    assert torch.equal(y, yc) and torch.equal(h, hc)
    g = torch.randn(4, 32)
    y.backward(g)
    yc.backward(g)
    assert torch.equal(xt.grad, xc.grad)


def test_bad_inputs_at_the_c_boundary():
    """_C validates on its own (it is usable without the Python op): names the argument."""
    x, w = torch.randn(4, 32), torch.randn(32)
    y, mean, rstd = torch.empty(4, 32), torch.empty(4), torch.empty(4)
    V = _ext.view

    def fwd(**kw):
        args = dict(x=V(x), weight=V(w), bias=None, residual=None, y=V(y), residual_out=None, mean=V(mean),
                    rstd=V(rstd), eps=1e-5)
        args.update(kw)
        _C.layer_norm_fwd(**args)

    on_gpu = lambda t: V(t)[:4] + (0,)  # noqa: E731  (same memory, claimed to be on cuda:0)
    cases = [
        ("weight", dict(weight=on_gpu(w))),
        ("y", dict(y=on_gpu(y))),
        ("y", dict(y=V(torch.empty(4, 32, dtype=torch.float64)))),
        ("y", dict(y=V(torch.empty(4, 31)))),
        ("y", dict(y=(y.data_ptr(), 0, (4, 32), (0, 1), -1))),  # overlapping output rows
        ("x", dict(x=V(torch.randn(2, 5, 32)[:, :2]), y=V(torch.empty(2, 2, 32)))),  # no single row stride
        ("mean", dict(mean=V(torch.empty(5)))),
        ("rstd", dict(rstd=V(torch.empty(4, dtype=torch.float64)))),
        ("residual_out", dict(residual=V(torch.randn(4, 32)))),
        ("eps", dict(eps=float("nan"))),
    ]
    for name, kw in cases:
        with pytest.raises(ValueError, match=f"^{name}:"):
            fwd(**kw)
    ws = torch.empty(3)
    with pytest.raises(ValueError, match="^workspace:"):
        _C.layer_norm_bwd(V(x), None, V(x), V(w), V(mean), V(rstd), V(y), V(torch.empty(32)), None, V(ws))


@pytest.mark.cuda
def test_cuda_matches_cpu_and_uses_current_stream():
    x, w, b, r = make_inputs((33, 4096), torch.bfloat16, "cpu", True, True)
    y_cpu, h_cpu = mk.layer_norm(x, w, b, residual=r)
    xg, wg, bg, rg = x.cuda(), w.cuda(), b.cuda(), r.cuda()
    xs = torch.full_like(xg, float("nan"))
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        # The input is written on s after a ~50M-cycle wait: a kernel launched on another stream
        # (the legacy default one, say) would read the NaNs still there.
        torch.cuda._sleep(50_000_000)
        xs.copy_(xg)
        y, h = mk.layer_norm(xs, wg, bg, residual=rg)
    s.synchronize()
    assert torch.equal(h.cpu(), h_cpu)
    assert (y.cpu().float() - y_cpu.float()).abs().max().item() <= 2 * 2.0 ** -7 * y_cpu.float().abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_non_finite_values_propagate(device, dtype, with_bias):
    """NaN and inf in x, weight or bias, and outputs that overflow the dtype, give the reference's
    NaN/inf pattern, and every finite output stays right. The CPU bfloat16 path rounds rows with
    finite statistics and weights without its NaN test (layernorm_cpu.cpp): this pins down when it
    may and may not. (Rows whose float32 statistics themselves overflow are left out: there a
    float32-statistics norm and the float64 reference legitimately differ.)"""
    H = 100  # 16-element blocks plus an 8-element and a scalar tail
    top = torch.finfo(dtype).max

    def check(x, w, b):
        y = mk.layer_norm(x, w, b).cpu().double()
        e, _, _ = reference(x, w, b, None, 1e-5)
        # Rounded to the dtype, away from the overflow threshold (where float32 arithmetic and the
        # float64 reference may round to different sides): overflow must give inf.
        clear = ~((e.abs() > 0.99 * top) & (e.abs() < 1.01 * top))
        e_t = e.to(dtype).double()
        assert torch.equal(y.isnan(), e_t.isnan()), "NaN pattern"
        assert torch.equal(y.isinf()[clear], e_t.isinf()[clear]), "inf pattern"
        assert torch.equal(y[y.isinf() & clear].sign(), e_t[y.isinf() & clear].sign()), "sign of inf"
        fin = e_t.isfinite() & clear
        assert_close(y[fin], e[fin], RTOL[dtype], OUT_ATOL_FRAC, "finite outputs")

    x, w, b, _ = make_inputs((6, H), dtype, device, with_bias, False)
    x[1, 3] = float("nan")
    x[2, 50] = float("inf")
    x[3, 0], x[3, 99] = float("inf"), float("-inf")
    x[4, 17] = float("-inf")
    check(x, w, b)

    x, w, b, _ = make_inputs((6, H), dtype, device, with_bias, False)
    w[7] = float("nan")
    w[20] = float("inf")
    w[90] = top  # finite, but |xhat| * top overflows for |xhat| > 1
    w[98] = -top
    if with_bias:
        b[33] = float("-inf")
        b[40] = float("nan")
    check(x, w, b)

    if dtype != torch.float32:
        # float32 weight/bias NaNs whose payload fills the mantissa: rounding them to 16 bits like a
        # number would carry into the sign (0x7fffffff + 0x8000 -> -0.0). They must stay NaN.
        x, w, b, _ = make_inputs((5, H), dtype, device, with_bias, False, weight_dtype=torch.float32)
        w.view(torch.int32)[5] = 0x7FFFFFFF
        w.view(torch.int32)[60] = -1  # 0xffffffff
        if with_bias:
            b.view(torch.int32)[61] = 0x7FFFFFFF
        check(x, w, b)


def test_module_ops_registered():
    assert "layernorm" in mk.build_info()["ops"]


def test_streaming_store_path_cpu():
    """Large outputs go out with streaming stores (layernorm_cpu.cpp), which no small test reaches at
    the default threshold (half the last-level cache). The CPU correctness tests are run again in a
    child process with the threshold at 0 bytes, so every aligned output takes that path (and the
    misaligned-row test exercises the fallback)."""
    import subprocess
    import sys

    from _subproc import NEUTRAL_CWD, subprocess_env

    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.join(here, "test_layernorm.py"),
           "-k", "cpu and (forward_backward or float32_weight or strided or saved_statistics)"]
    env = subprocess_env(MPT_KERNELS_STREAM_MIN_BYTES="0")
    r = subprocess.run(cmd, cwd=NEUTRAL_CWD, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def test_inference_calls_skip_the_custom_op_and_match_it(monkeypatch):
    """Without a gradient to record (and nothing tracing), ``layer_norm`` runs the kernel directly, not
    through ``mpt_kernels::layer_norm_fwd`` (whose dispatch costs more than a decode-sized kernel); the
    results are the op's bit for bit. With a gradient, plain eager tensors take the eager
    autograd.Function (the op's body and formula, no dispatch); under a torch-function mode the op runs."""
    torch.manual_seed(0)
    x, r = torch.randn(2, 3, 64, dtype=torch.bfloat16), torch.randn(2, 3, 64, dtype=torch.bfloat16)
    w, b = torch.randn(64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    y_op, h_op, _, _ = ln_op.layer_norm_fwd(x, w, b, r, 1e-5)
    calls = []
    real = ln_op.layer_norm_fwd
    monkeypatch.setattr(ln_op, "layer_norm_fwd", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y, h = mk.layer_norm(x, w, b, 1e-5, residual=r)
    assert calls == [] and torch.equal(y, y_op) and torch.equal(h, h_op)
    y = mk.layer_norm(x, w, b, 1e-5)  # grad mode on, nothing requires grad: still direct
    assert calls == [] and torch.equal(y, ln_op.layer_norm_fwd(x, w, b, None, 1e-5)[0])
    calls.clear()
    eager = []
    real_eager = ln_op._LayerNormEager.apply
    monkeypatch.setattr(ln_op._LayerNormEager, "apply", lambda *a: eager.append(1) or real_eager(*a))
    mk.layer_norm(x.requires_grad_(), w, b)  # a gradient to record: the eager Function, not the op
    assert calls == [] and eager == [1]
    with torch.no_grad(), torch.device("cpu"):  # a torch-function mode: through the op
        mk.layer_norm(x, w, b)
    assert calls == [1] and eager == [1]
    with torch.device("cpu"):  # ... with a gradient too
        mk.layer_norm(x, w, b)
    assert calls == [1, 1] and eager == [1]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES["cpu"])
def test_direct_call_equals_the_op(dtype, shape):
    """The no-gradient direct call (no mean/rstd, N-d views) gives the op's outputs bit for bit, for
    every shape of the accuracy tests, contiguous and strided (rows of a wider buffer), with and
    without bias and residual; outputs are NaN-poisoned (fixture), so an unwritten element shows."""
    torch.manual_seed(1)
    hidden = shape[-1]
    wide = torch.randn(*shape[:-1], hidden + 3, dtype=dtype)
    for x in (torch.randn(shape, dtype=dtype), wide[..., :hidden]):
        r = torch.randn(shape, dtype=dtype)
        w, b = torch.randn(hidden, dtype=dtype), torch.randn(hidden, dtype=dtype)
        for bias, res in ((None, None), (b, None), (b, r), (None, r)):
            y_op, h_op, _, _ = ln_op.layer_norm_fwd(x, w, bias, res, 1e-5)
            with torch.no_grad():
                got = mk.layer_norm(x, w, bias, 1e-5, residual=res)
            y, h = got if res is not None else (got, None)
            assert torch.equal(y, y_op)
            if res is not None:
                assert torch.equal(h, h_op)
