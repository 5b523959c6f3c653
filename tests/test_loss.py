"""Fused cross-entropy (CPU and CUDA) against a float64 reference.

Every output the ops allocate is NaN-filled first (autouse fixture), so an element a kernel forgets
to write fails. Tolerances: the loss is a float32 logsumexp over up to 50432 terms minus one logit:
rtol 1e-5 of the float64 value (float32 ulp at the loss scale, a few roundings of the sum). The
gradient (softmax - onehot) / count is rounded once to the logits' dtype after float32 arithmetic:
its natural scale is 1 / count (no element exceeds it); the bound is one ulp of the output dtype
at that scale (bfloat16 2^-8, float16 2^-10; float32 1e-5: exp(x - lse) inherits the float32
rounding of lse, ~|lse| * 2^-23, which the bound adds for rows of huge logits).
"""
import pytest
import torch
import torch.nn.functional as F

import mpt_kernels as mk
from mpt_kernels import _ext
from mpt_kernels._ext import _C
from mpt_kernels.ops import loss as loss_op
from mpt_kernels.ops.loss import cross_entropy

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}
# rows x vocab: one row, vocab 1, odd vocab (no 16-byte packs), tiny's 4096, MPT's 50432 padded
# vocabulary, a vocab one past a pack boundary.
SHAPES = [(1, 7), (5, 1), (37, 1000), (16, 4096), (3, 50432), (6, 4097)]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(loss_op, "_alloc",
                        lambda shape, dtype, device: torch.full(tuple(shape), float("nan"), dtype=dtype, device=device))


def reference(logits, targets, ignore_index=-100):
    """float64 loss and gradient of the mean over counted rows (F.cross_entropy in float64)."""
    x = logits.detach().double().cpu().requires_grad_()
    loss = F.cross_entropy(x, targets.cpu().long(), ignore_index=ignore_index)
    loss.backward()
    return loss.detach(), x.grad


def check(logits, targets, ignore_index=-100):
    leaf = logits.detach().clone().requires_grad_()
    loss = cross_entropy(leaf, targets, ignore_index)
    loss.backward()
    ref_loss, ref_grad = reference(logits, targets, ignore_index)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    if torch.isnan(ref_loss):
        assert torch.isnan(loss.cpu())
    else:
        torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-6)
    g = leaf.grad
    assert g.dtype == logits.dtype and g.shape == logits.shape
    count = max(int((targets != ignore_index).sum()), 1)
    lse = torch.logsumexp(logits.detach().double().cpu(), dim=1).abs().nan_to_num(0, 0, 0).max().item() if logits.numel() else 0
    bound = (GRAD_RTOL[logits.dtype] + lse * 2.0 ** -22) / count + 1e-9
    err = (g.double().cpu() - ref_grad).abs()
    assert not torch.isnan(err).any(), "unwritten (NaN) gradient elements"
    assert err.max().item() <= bound, f"gradient: max error {err.max().item():.3g} > {bound:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(device, dtype, shape):
    torch.manual_seed(sum(shape))
    rows, vocab = shape
    logits = (torch.randn(rows, vocab) * 4 + 1).to(dtype).to(device)  # spread: probabilities from ~1 to ~0
    targets = torch.randint(0, vocab, (rows,))
    targets[0], targets[-1] = 0, vocab - 1  # the first and last ids (a slip at either end shows)
    if rows > 2:
        targets[1] = -100  # an ignored row
    check(logits, targets.to(device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_avx512_paths_equal_the_avx2_paths_bitwise(dtype):
    """The kernels' 512-bit paths (taken where the CPU has AVX-512) give bitwise the 256-bit paths'
    loss, lse and gradient: vocab sizes ending on every tail (16-, 8-lane and scalar), a NaN row, an
    ignored row, huge logits."""
    if not _C._set_cpu_avx512(True) and not _C._cpu_avx512():
        pytest.skip("this CPU has no AVX-512: only the 256-bit paths exist here")
    torch.manual_seed(3)
    try:
        for vocab in (1, 7, 8, 15, 16, 24, 63, 64, 72, 1000, 4096, 4097, 50432):
            logits = (torch.randn(9, vocab) * 4 + 1).to(dtype)
            logits[2, vocab // 2] = float("nan")
            logits[4] *= 1e4
            targets = torch.randint(0, vocab, (9,))
            targets[5] = -100
            drow = torch.rand(9)
            got = {}
            for wide in (True, False):
                _C._set_cpu_avx512(wide)
                loss, lse = loss_op.cross_entropy_fwd(logits, targets, -100)
                got[wide] = (loss, lse, loss_op.cross_entropy_bwd(logits, targets, lse, drow, -100))
            for name, a, b in zip(("loss", "lse", "dlogits"), got[True], got[False]):
                assert torch.equal(a.isnan(), b.isnan()), (vocab, name)
                assert torch.equal(a.nan_to_num(), b.nan_to_num()), (vocab, name)
            assert got[True][0][2].isnan() and not got[True][2][0].isnan().any()
    finally:
        _C._set_cpu_avx512(True)


@pytest.mark.parametrize("device", DEVICES)
def test_ignored_rows_custom_index_and_all_ignored(device):
    torch.manual_seed(0)
    logits = torch.randn(8, 300, device=device)
    targets = torch.randint(0, 300, (8,), device=device)
    targets[::2] = 7  # ignore_index in range: those rows are skipped, not scored
    check(logits, targets, ignore_index=7)
    check(logits, torch.full((8,), -100, device=device))  # nothing counted: NaN loss, zero gradient (torch)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows_and_int32_targets(device):
    """Rows one stride apart (the logits of a wider buffer) are read in place; int32 targets work."""
    torch.manual_seed(1)
    wide = torch.randn(9, 640, device=device).bfloat16()
    logits = wide[:, :600]
    targets = torch.randint(0, 600, (9,), device=device, dtype=torch.int32)
    check(logits, targets)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits(device):
    """Large logits (no overflow: max-shifted), -inf logits (masked vocabulary entries: probability
    0), a row of all -inf and a NaN (NaN loss, as torch)."""
    logits = torch.randn(4, 64, device=device) * 3
    logits[0, 5] = 1e4  # overflows exp() unshifted
    logits[1, :32] = float("-inf")
    targets = torch.tensor([5, 40, 3, 3], device=device)
    check(logits[:2], targets[:2])
    logits[2] = float("-inf")
    logits[3, 9] = float("nan")
    out, _ = loss_op.cross_entropy_fwd(logits, targets, -100)
    assert torch.isnan(out[2:]).all() and torch.isfinite(out[:2]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logits_near_the_dtype_maximum(device, dtype):
    """Logits past float32's max / log2(e) (~2.36e38; bfloat16 reaches 3.39e38): the kernels shift by
    the row's max before scaling to base 2, so nothing overflows (they used to give NaN here)."""
    big = torch.finfo(dtype).max * (0.9 if dtype == torch.float16 else 0.98)
    V = 1000
    logits = torch.randn(4, V, device=device) * 3
    logits[0, 5] = big  # the target holds the max: loss 0, gradient 0
    logits[1, 5], logits[1, 7] = big, -big  # the target is an ordinary logit: loss ~ big
    logits[2] = -big  # every logit hugely negative but one
    logits[2, 3] = -big / 3
    logits[3, 11], logits[3, 12] = big, big / 2  # the target half the max: loss big / 2
    # (Not tested: ties at the max. lse = big + log(2) rounds to big in float32, so each tied logit's
    # probability comes out 1, not 1/2: the |lse| * 2^-23 precision of a saved lse, as check() allows.)
    logits = logits.to(dtype)
    targets = torch.tensor([5, 2, 3, 12], device=device)
    rows, _ = loss_op.cross_entropy_fwd(logits, targets, -100)  # per row: their mean overflows float32
    ref_rows = F.cross_entropy(logits.double().cpu(), targets.cpu(), reduction="none")
    torch.testing.assert_close(rows.double().cpu(), ref_rows, rtol=1e-5, atol=1e-5)
    leaf = logits.detach().clone().requires_grad_()
    cross_entropy(leaf, targets).backward()
    _, ref_grad = reference(logits, targets)
    # float64 softmax of these rows is 0 or 1 to well below any dtype's rounding
    torch.testing.assert_close(leaf.grad.double().cpu(), ref_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_model_loss_equals_torch_cross_entropy(device):
    """The model's loss (the fused kernel on its logits) equals F.cross_entropy on the same logits."""
    from mpt_kernels.model import MPTConfig, MPTForCausalLM

    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=301, max_seq_len=32)
    torch.manual_seed(2)
    m = MPTForCausalLM(cfg).to(device)
    ids = torch.randint(0, 301, (2, 17), device=device)
    labels = ids.clone()
    labels[0, :5] = -100
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.autocast(device, dtype=dt, enabled=device == "cuda"):
        out = m(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    bad = labels.clone()
    bad[1, 3] = 301
    with pytest.raises(ValueError, match="^labels:"):
        m(ids, labels=bad)


def test_bad_inputs_raise_value_error_naming_the_argument():
    x, t = torch.randn(4, 10), torch.randint(0, 10, (4,))
    cases = [
        ("logits", lambda: cross_entropy(torch.randn(4), t)),
        ("logits", lambda: cross_entropy(x.double(), t)),
        ("logits", lambda: cross_entropy(torch.zeros(4, 0), t)),
        ("targets", lambda: cross_entropy(x, t[:3])),
        ("targets", lambda: cross_entropy(x, t.float())),
        ("targets", lambda: cross_entropy(x, torch.tensor([0, 1, 10, 2]))),  # out of range (CPU raises)
        ("targets", lambda: cross_entropy(x, torch.tensor([0, -3, 1, 2]))),
    ]
    for name, fn in cases:
        with pytest.raises(ValueError, match=f"^{name}:"):
            fn()
    # The core checks on its own, naming the argument.
    V = _ext.view
    loss, lse = torch.empty(4), torch.empty(4)
    core = [
        ("targets", lambda: _C.cross_entropy_fwd(V(x), V(t.int()), V(loss), V(lse), -100)),
        ("loss", lambda: _C.cross_entropy_fwd(V(x), V(t), V(torch.empty(3)), V(lse), -100)),
        ("lse", lambda: _C.cross_entropy_fwd(V(x), V(t), V(loss), V(lse.double()), -100)),
        ("logits", lambda: _C.cross_entropy_fwd(V(x.t()), V(t), V(loss), V(lse), -100)),
        ("dlogits", lambda: _C.cross_entropy_bwd(V(x), V(t), V(lse), V(loss), V(x.bfloat16()), -100)),
        ("drow", lambda: _C.cross_entropy_bwd(V(x), V(t), V(lse), V(torch.empty(5)), V(x), -100)),
    ]
    for name, fn in core:
        with pytest.raises(ValueError, match=f"^{name}:"):
            fn()


def test_empty_batch():
    out = cross_entropy(torch.randn(0, 10, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert torch.isnan(out)  # 0 / 0, as F.cross_entropy


def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()
    x = torch.randn(6, 50, requires_grad=True)
    t = torch.randint(0, 50, (6,))

    def f(x, t):
        return cross_entropy(x, t) * 2

    eager = f(x, t)
    (g_eager,) = torch.autograd.grad(eager, x)
    comp = torch.compile(f, backend="aot_eager", fullgraph=True)(x, t)
    (g_comp,) = torch.autograd.grad(comp, x)
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(g_comp, g_eager)
    torch._dynamo.reset()


@pytest.mark.cuda
def test_cuda_uses_current_stream_and_matches_cpu():
    torch.manual_seed(4)
    x = torch.randn(64, 50432).bfloat16()
    t = torch.randint(0, 50432, (64,))
    ref = cross_entropy(x, t)
    s = torch.cuda.Stream()
    xc, tc = x.cuda(), t.cuda()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(10_000_000)  # the stream is busy: a kernel on another stream would race ahead
        xc.mul_(1.0)
        out = cross_entropy(xc, tc)
    torch.cuda.synchronize()
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-6)
    assert mk.cuda_available()
