"""Fused Lion (mk.optim.Lion) and the multi-tensor clip_grad_norm_, against float64 plain torch.

How steps are compared. Each of the 10 steps is checked from identical inputs: before a step the
float64 reference is loaded with the optimizer's current p and exp_avg (exactly representable), the
step runs in both, and the outputs are compared. That keeps the check at the rounding level of one
step instead of letting float32/bf16 rounding compound over 10 steps (a free-running float32
trajectory is compared against lion-pytorch separately). An element the kernel forgot to write keeps
its old value, which is lr away from the reference, far outside every tolerance below.

Tolerances (per element, one step):
- float32 storage: the kernel rounds the update (one fma) and the sum p + update: <= 1 ulp(p) +
  1 ulp(update); we allow 2 ulp(p) + 2 ulp(lr). exp_avg: fma and a product, <= 2 ulp(m) + 2 ulp(|g|/100).
- bfloat16 storage: the float32 result is rounded to bf16 once: nearest (<= 1/2 ulp) or stochastic
  (one of the two neighbours, < 1 ulp); we allow 1 bf16 ulp of the reference plus the float32 error.
- sign flips: c = b1*m + (1-b1)*g is computed in float32 (b1 and 1-b1 are float32 roundings), so its
  error is below 8 float32 eps * (|b1*m| + |(1-b1)*g|). Where |c| (float64) is below that bound the
  sign may legitimately differ; there the parameter may be off by up to 2*lr. Such elements are
  counted and must be rare (they are ~1e-7 of random data).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import mpt_kernels as mk
from mpt_kernels import _ext
from mpt_kernels.ops.reference import lion_step_reference

SIZES = [(1,), (7,), (4097,), (278011,), (33, 65)]
EPS32 = 2.0 ** -23


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |x| (x float64; normal range, which is all these tests use,
    and a floor of 2**-149 so zeros get the smallest spacing)."""
    mant_bits = {torch.float32: 24, torch.bfloat16: 8}[dtype]
    _, e = torch.frexp(x)  # x = f * 2**e with 0.5 <= |f| < 1
    return torch.ldexp(torch.ones_like(x), (e - mant_bits).clamp_min(-149))


def decay_of(group) -> float:
    lr, wd = group["lr"], group["weight_decay"]
    if group["decoupled_weight_decay"]:
        return wd * (lr / group["initial_lr"] if group["initial_lr"] else 1.0)
    return lr * wd


def check_one_step(opt, params, grad_dtype, gmul=1.0):
    """Runs opt.step() beside the float64 reference from identical inputs; returns (n_ambiguous, n)."""
    refs = []
    for group in opt.param_groups:
        b1, b2 = group["betas"]
        lr, decay = group["lr"], decay_of(group)
        for p in group["params"]:
            if p.grad is None:
                continue
            st = opt.state.get(p, {})
            m0 = st["exp_avg"].double() if "exp_avg" in st else torch.zeros_like(p, dtype=torch.float64)
            p0 = p.detach().double()
            g = p.grad.double() * gmul
            p_ref, m_ref = p0.clone(), m0.clone()
            lion_step_reference(p_ref, g, m_ref, lr=lr, beta1=b1, beta2=b2, decay=decay)
            c = b1 * m0 + (1 - b1) * g
            ambiguous = c.abs() < 8 * EPS32 * (b1 * m0.abs() + (1 - b1) * g.abs())
            refs.append((p, p_ref, m_ref, g, ambiguous, lr, b2))
    opt.step()
    n_amb = n = 0
    for p, p_ref, m_ref, g, ambiguous, lr, b2 in refs:
        pd, md = p.dtype, opt.state[p]["exp_avg"].dtype
        got_p, got_m = p.detach().double(), opt.state[p]["exp_avg"].double()
        # ulps at the larger magnitude of the two: a flipped sign can land in another binade.
        mag = torch.maximum(p_ref.abs(), got_p.abs())
        tol_p = 2 * ulp(mag, torch.float32) + 2 * ulp(torch.tensor(lr, dtype=torch.float64), torch.float32)
        if pd == torch.bfloat16:
            tol_p = tol_p + ulp(mag, torch.bfloat16)
        tol_p = torch.where(ambiguous, tol_p + 2 * lr, tol_p)
        err_p = (got_p - p_ref).abs()
        bad = err_p > tol_p
        assert not bad.any(), (
            f"param {tuple(p.shape)} {pd}: {int(bad.sum())} elements off, worst {float((err_p - tol_p).max()):.3g} "
            f"beyond tolerance (e.g. got {float(got_p[bad][0])} want {float(p_ref[bad][0])})")
        tol_m = 2 * ulp(m_ref, torch.float32) + 2 * ulp(g * (1 - b2), torch.float32)
        if md == torch.bfloat16:
            tol_m = tol_m + ulp(m_ref, torch.bfloat16)
        err_m = (got_m - m_ref).abs()
        assert (err_m <= tol_m).all(), f"exp_avg {tuple(p.shape)} {md}: worst excess {float((err_m - tol_m).max()):.3g}"
        n_amb += int(ambiguous.sum())
        n += p.numel()
    return n_amb, n


DTYPE_COMBOS = [(pd, gd, sd) for pd in (torch.float32, torch.bfloat16) for gd in (torch.float32, torch.bfloat16)
                for sd in (torch.float32, torch.bfloat16)]


def _name(d):
    return {torch.float32: "f32", torch.bfloat16: "bf16"}[d]


@pytest.mark.parametrize("combo", DTYPE_COMBOS, ids=lambda c: "p{}-g{}-m{}".format(*map(_name, c)))
def test_step_matches_float64_reference(combo):
    pd, gd, sd = combo
    # bf16 parameters are kept small so that lr is well above one bf16 ulp: an unwritten element
    # must fail the check.
    scale = 0.1 if pd == torch.bfloat16 else 1.0
    params = [torch.nn.Parameter((torch.randn(s) * scale).to(pd)) for s in SIZES]
    # Two groups with their own hyperparameters, one per weight-decay mode.
    groups = [
        dict(params=params[:3], lr=2e-2, betas=(0.9, 0.99), weight_decay=0.1, decoupled_weight_decay=False),
        dict(params=params[3:], lr=5e-3, betas=(0.8, 0.95), weight_decay=0.5, decoupled_weight_decay=True),
    ]
    opt = mk.optim.Lion(groups, state_dtype=sd, seed=1234)
    amb = total = 0
    for step in range(10):
        for p in params:
            # Mixed magnitudes so exp_avg spans many binades; an occasional exact zero gives sign(0).
            g = torch.randn(p.shape) * torch.exp(torch.randn(p.shape))
            g[torch.rand(p.shape) < 0.01] = 0.0
            p.grad_dtype = None  # torch otherwise insists on grad dtype == param dtype
            p.grad = g.to(gd)
        a, n = check_one_step(opt, params, gd)
        amb += a
        total += n
        for group in opt.param_groups:  # a schedule: decoupled decay follows lr / initial_lr
            group["lr"] *= 0.8
    # Random float32 inputs almost never land on |c| ~ eps (~1e-7 of elements). bf16 inputs do: with
    # beta1 = 0.8, m = -g/4 is exactly representable and c is exactly 0 in real arithmetic, while
    # float32's 0.8f and 0.2f are not 0.8 and 0.2, so the kernel (like torch in float32) sees a
    # rounding-level c of either sign. ~5e-4 of elements here.
    limit = total // 10000 if (gd == torch.float32 and sd == torch.float32) else total // 1000
    assert amb <= max(3, limit), f"{amb} of {total} elements had an ambiguous sign"


def test_grad_none_is_skipped_and_state_not_created():
    a = torch.nn.Parameter(torch.randn(100))
    b = torch.nn.Parameter(torch.randn(50))
    opt = mk.optim.Lion([a, b], lr=0.1, weight_decay=0.1)
    a.grad = torch.randn(100)
    b0 = b.detach().clone()
    opt.step()
    assert torch.equal(b.detach(), b0)
    assert "exp_avg" not in opt.state.get(b, {})
    assert "exp_avg" in opt.state[a]


@pytest.mark.parametrize("empty_shape", [(0,), (3, 0, 2), (0, 5)], ids=str)
def test_empty_parameter_and_no_grads(empty_shape):
    """Empty parameters are skipped; a multi-dim one ((3, 0, 2): torch gives it strides (2, 2, 1)) used to
    fail the kernel's contiguity check (found by tests/test_fuzz_inputs.py)."""
    e = torch.nn.Parameter(torch.randn(empty_shape))
    p = torch.nn.Parameter(torch.randn(3))
    opt = mk.optim.Lion([e, p], lr=0.1, max_grad_norm=1.0)
    opt.step()  # no gradients at all: nothing happens
    e.grad = torch.randn(empty_shape)
    p.grad = torch.randn(3)
    p0 = p.detach().clone()
    opt.step()
    assert (p.detach() - p0).abs().max() > 0.05


def test_sign_zero_leaves_param_unchanged_without_decay():
    p = torch.nn.Parameter(torch.randn(1000))
    opt = mk.optim.Lion([p], lr=0.1)
    p.grad = torch.zeros(1000)
    p0 = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), p0)


def test_nan_gradient_propagates_without_skip():
    # sign(NaN) = NaN (torch.sign gives 0): with skipping off the NaN reaches the parameter.
    p = torch.nn.Parameter(torch.randn(20))
    opt = mk.optim.Lion([p], lr=0.1)
    g = torch.randn(20)
    g[3] = float("nan")
    p.grad = g
    opt.step()
    assert torch.isnan(p.detach()[3]) and torch.isfinite(p.detach()[torch.arange(20) != 3]).all()


# ---------------------------------------------------------------- independent implementation

class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                                       torch.nn.GELU(), torch.nn.Linear(64, 4))
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        return self.net(self.norm(x))


@pytest.mark.parametrize("decoupled", [True, False], ids=["decoupled", "paper"])
@pytest.mark.parametrize("impl", ["lion_pytorch", "lion_pytorch.foreach"])
def test_trajectory_matches_lion_pytorch(impl, decoupled):
    lp = pytest.importorskip(impl)
    model_a = _MLP()
    model_b = copy.deepcopy(model_a)
    kw = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.2)
    opt_a = mk.optim.Lion(model_a.parameters(), decoupled_weight_decay=decoupled, **kw)
    opt_b = lp.Lion(model_b.parameters(), decoupled_weight_decay=decoupled, **kw)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=10, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=10, gamma=0.5)
    x = torch.randn(256, 16)
    y = torch.randn(256, 4)
    for step in range(30):
        losses = []
        for model, opt, sched in ((model_a, opt_a, sched_a), (model_b, opt_b, sched_b)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        # lion-pytorch rounds c without an fma; only a |c| at rounding level could flip a sign,
        # which would move one weight by 2*lr and the loss by far less than this.
        assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-6), step
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        diff = (pa - pb).abs()
        assert (diff > 1e-5).float().mean() <= 1e-3 and diff.max() <= 30 * 2 * 3e-3


# ---------------------------------------------------------------- stochastic rounding

def _constant_descent(stochastic, steps=100, n=65536, lr=1e-4, seed=7):
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = mk.optim.Lion([p], lr=lr, stochastic_rounding=stochastic, seed=seed)
    for _ in range(steps):
        p.grad = torch.ones(n, dtype=torch.bfloat16)  # sign(c) = +1 every step: p moves by -lr
        opt.step()
    return p.detach()


def test_stochastic_rounding_keeps_updates_below_one_ulp():
    # One step is 1e-4; a bf16 ulp just below 1.0 is 2**-8 = 0.0039 (39 steps' worth). Without
    # stochastic rounding 1 - 1e-4 rounds back to 1.0 every step and the parameter never moves.
    steps, lr = 100, 1e-4
    p_det = _constant_descent(False, steps=steps, lr=lr)
    assert torch.equal(p_det, torch.ones_like(p_det))
    p_sr = _constant_descent(True, steps=steps, lr=lr)
    expected = 1.0 - steps * lr
    # Per element the rounding noise is a martingale with variance <= steps * ulp^2 / 4, so the mean
    # over 65536 elements has std <= sqrt(100) * 2**-8 / 2 / 256 = 7.6e-5; 6.5 sigma below.
    assert p_sr.double().mean().item() == pytest.approx(expected, abs=5e-4)
    assert len(torch.unique(p_sr)) > 1  # elements went their own ways
    # Reproducible: same seed, same bits; another seed, other bits.
    assert torch.equal(p_sr, _constant_descent(True, steps=steps, lr=lr))
    assert not torch.equal(p_sr, _constant_descent(True, steps=steps, lr=lr, seed=8))


def _mix32(x):
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def _rng_bits(seed, step, tensor, stream, elem):
    """Python twin of lion.h's lion_rng_key / lion_rng_bits (the documented RNG)."""
    m = lambda v: int(_mix32(np.array([v & 0xFFFFFFFF], dtype=np.uint64))[0])  # noqa: E731
    k = m(seed ^ 0x9E3779B9)
    k = m(k ^ (seed >> 32))
    k = m(k ^ step)
    k = m(k ^ (step >> 32))
    k = m(k ^ tensor)
    k = m(k ^ ((stream * 0x85EBCA6B) & 0xFFFFFFFF))
    k1 = m(k ^ 0)  # elem_hi = 0 for these sizes
    k2 = m(k1 ^ 0x27D4EB2F)
    pair = (elem >> 1).astype(np.uint32)
    h = _mix32(_mix32(pair ^ np.uint32(k1)) ^ np.uint32(k2))
    return np.where(elem & 1, h >> np.uint32(16), h & np.uint32(0xFFFF)).astype(np.uint32)


def test_stochastic_rounding_bits_follow_the_documented_hash():
    # 16413 elements: two chunks, the 16-wide and 8-wide vector loops and a scalar tail all used;
    # the CUDA kernel uses the scalar formula, so this also pins CPU == CUDA for the RNG.
    n, lr, seed = 16384 + 16 + 8 + 5, 3e-3, 0x1234_5678_9ABC
    p = torch.nn.Parameter((torch.randn(n) * 0.3).to(torch.bfloat16))
    q = torch.nn.Parameter(torch.randn(7).to(torch.bfloat16))  # rng index 1, before p's 2
    r = torch.nn.Parameter(torch.randn(3).to(torch.bfloat16))
    opt = mk.optim.Lion([r, q, p], lr=lr, seed=seed)
    g = torch.randn(n).to(torch.bfloat16)
    p.grad = g
    p0 = p.detach().float()
    opt.step()
    # Step 1, m = 0, no decay: c = (1-b1)*g has g's sign; p_new = p - lr*sign(g) in float32.
    p_new = p0 - torch.tensor(lr, dtype=torch.float32) * torch.sign(g.float())
    bits = p_new.view(torch.int32).numpy().astype(np.uint32)
    rnd = _rng_bits(seed, 1, 2, 0, np.arange(n, dtype=np.uint64))
    want = ((bits.astype(np.uint64) + rnd) >> np.uint64(16)).astype(np.uint16)
    got = p.detach().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(got, want), f"{int((got != want).sum())} of {n} elements differ"


def test_stochastic_rounding_bits_of_the_scalar_path():
    """Tensors under 8 elements take only the scalar formula (the one the CUDA kernel uses), which the
    test above reaches for 5 elements: a mutation giving even elements the odd elements' bits passed
    it. 60 tensors of 1-7 elements (240 elements), each against the documented hash."""
    lr, seed = 3e-3, 0x0BAD_5EED_1234
    torch.manual_seed(5)
    ps = [torch.nn.Parameter((torch.randn(1 + i % 7) * 0.3).to(torch.bfloat16)) for i in range(60)]
    opt = mk.optim.Lion(ps, lr=lr, seed=seed)
    before = []
    for p in ps:
        p.grad = torch.randn(p.shape).to(torch.bfloat16)
        before.append(p.detach().float())
    opt.step()
    bad = 0
    for idx, (p, p0) in enumerate(zip(ps, before)):
        p_new = p0 - torch.tensor(lr, dtype=torch.float32) * torch.sign(p.grad.float())
        bits = p_new.view(torch.int32).numpy().astype(np.uint32)
        rnd = _rng_bits(seed, 1, idx, 0, np.arange(p.numel(), dtype=np.uint64))
        want = ((bits.astype(np.uint64) + rnd) >> np.uint64(16)).astype(np.uint16)
        bad += int((p.detach().view(torch.int16).numpy().view(np.uint16) != want).sum())
    assert bad == 0, f"{bad} of {sum(p.numel() for p in ps)} elements rounded other than the hash says"


def test_fused_clipping_coefficient_is_torchs():
    """The fused clip multiplies the gradient by torch's max_norm / (norm + 1e-6) exactly when that is
    below 1: norms just above and just below max_norm, and a tiny max_norm where the 1e-6 matters.
    Read through the first step's exp_avg = (1 - beta2) * clipped g (m starts at 0), to float32
    rounding; the comparisons above (absolute 1e-6 on exp_avg, norms far above max_norm) passed a
    coefficient with 1e-3 in place of 1e-6 and a clip that waited for the coefficient to fall under 0.9."""
    b2 = 0.99
    for max_norm, ratio in [(1.0, 1.05), (1.0, 0.95), (1.0, 1.0001), (1e-3, 2.0), (1e-5, 3.0)]:
        torch.manual_seed(int(ratio * 1000))
        gs = [torch.randn(s) for s in ((300,), (17, 31), (5000,))]
        total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in gs))
        gs = [g * (max_norm * ratio / total) for g in gs]  # the global norm is max_norm * ratio
        ps = [torch.nn.Parameter(torch.randn(g.shape)) for g in gs]
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt = mk.optim.Lion(ps, lr=1e-3, betas=(0.9, b2), max_grad_norm=max_norm)
        opt.step()
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in gs))
        coef = min(1.0, max_norm / (norm + 1e-6))
        for p, g in zip(ps, gs):
            want = (1 - b2) * g.double() * coef
            torch.testing.assert_close(opt.state[p]["exp_avg"].double(), want, rtol=2e-6, atol=0.0,
                                       msg=lambda m: f"max_norm {max_norm}, norm/max_norm {ratio}: {m}")


def test_stochastic_rounding_of_bf16_state():
    # m_k = 1 - b2^k for g = 1. With b2 = 0.99 the increments (1-b2)(1-m) fall below half a bf16
    # ulp (2**-9 just below 1) once 1 - m < 0.2, well before k = 300 (m = 0.951), and
    # round-to-nearest stalls near 0.8; stochastic rounding tracks the mean.
    n, steps, b2 = 4096, 300, 0.99
    means = {}
    for sr in (False, True):
        p = torch.nn.Parameter(torch.zeros(n))
        opt = mk.optim.Lion([p], lr=1e-6, betas=(0.9, b2), state_dtype=torch.bfloat16, stochastic_rounding=sr,
                            seed=3)
        g = torch.ones(n)
        for _ in range(steps):
            p.grad = g
            opt.step()
        means[sr] = opt.state[p]["exp_avg"].double().mean().item()
    expected = 1 - b2 ** steps
    # Stationary per-element std <= (ulp/2)/sqrt(1-b2^2) = 0.014, over 4096 elements 2e-4.
    assert means[True] == pytest.approx(expected, abs=3e-3)
    assert means[False] < expected - 0.05


# ---------------------------------------------------------------- clipping, skipping, scaling

def _twins(sizes=((300,), (17, 31), (5000,)), dtype=torch.float32):
    a = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in sizes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    return a, b


def _close_with_rare_flips(x, y, lr, atol=1e-6):
    d = (x.double() - y.double()).abs()
    assert d.max() <= 2 * lr + atol
    assert (d > atol).double().mean() <= 1e-3


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_fused_clipping_equals_torch_clip_then_step(max_norm):
    a, b = _twins()
    opt_a = mk.optim.Lion(a, lr=1e-2, weight_decay=0.1, max_grad_norm=max_norm)
    opt_b = mk.optim.Lion(b, lr=1e-2, weight_decay=0.1)
    for step in range(5):
        for pa, pb in zip(a, b):
            g = torch.randn(pa.shape) * 3
            pa.grad, pb.grad = g.clone(), g.clone()
        grads_before = [p.grad.clone() for p in a]
        torch.nn.utils.clip_grad_norm_(b, max_norm)
        opt_a.step()
        opt_b.step()
        for pa, pb, g0 in zip(a, b, grads_before):
            assert torch.equal(pa.grad, g0)  # the fused path does not rewrite gradients
            _close_with_rare_flips(pa.detach(), pb.detach(), 1e-2)
            _close_with_rare_flips(opt_a.state[pa]["exp_avg"], opt_b.state[pb]["exp_avg"], 0.0, atol=1e-6)
    assert opt_a.skipped_steps == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_grad_norm_matches_torch(dtype):
    a, b = _twins(sizes=((1,), (4097,), (70000,), (3, 9)), dtype=dtype)
    for pa, pb in zip(a, b):
        g = (torch.randn(pa.shape) * 2).to(dtype)
        pa.grad, pb.grad = g.clone(), g.clone()
    norm_mk = mk.optim.clip_grad_norm_(a, 1.0)
    norm_t = torch.nn.utils.clip_grad_norm_(b, 1.0)
    # float32 partial sums over 16384-element chunks vs torch's per-tensor norms: both ~1e-6
    # relative; bf16: torch returns the norm rounded to bf16 (3 significant digits).
    rtol = 1e-5 if dtype == torch.float32 else 8e-3
    assert norm_mk.item() == pytest.approx(norm_t.float().item(), rel=rtol)
    for pa, pb in zip(a, b):
        # float32: the clip coefficients differ by at most an ulp or two; bf16: torch rounds the
        # scaled gradient to bf16 and so do we, so at most one bf16 ulp apart.
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(pa.grad.float(), pb.grad.float(), rtol=tol, atol=1e-7)
    # Below the threshold the gradients are left as they are.
    g = [p.grad.clone() for p in a]
    n2 = mk.optim.clip_grad_norm_(a, 1e9)
    assert n2.item() == pytest.approx(1.0, rel=1e-2)
    assert all(torch.equal(p.grad, q) for p, q in zip(a, g))


def test_clip_grad_norm_edge_cases():
    assert mk.optim.clip_grad_norm_([torch.nn.Parameter(torch.randn(3))], 1.0).item() == 0.0
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    p.grad[2] = float("inf")
    with pytest.raises(RuntimeError, match="non-finite"):
        mk.optim.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    # Other norm types go to torch.
    q = torch.nn.Parameter(torch.randn(10))
    q.grad = torch.randn(10)
    r = torch.nn.Parameter(q.detach().clone())
    r.grad = q.grad.clone()
    assert mk.optim.clip_grad_norm_([q], 0.1, norm_type=float("inf")).item() == pytest.approx(
        torch.nn.utils.clip_grad_norm_([r], 0.1, norm_type=float("inf")).item())


def test_clip_grad_norm_noncontiguous_gradients():
    """A channels_last conv weight has a non-contiguous gradient; torch clips it, we raised."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    conv(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)).square().sum().backward()
    t = torch.nn.Parameter(torch.randn(6, 5))
    t.grad = torch.randn(5, 6).t()  # a transposed gradient
    params = [conv.weight, conv.bias, t]
    assert not conv.weight.grad.is_contiguous()
    want = [p.grad.clone() for p in params]
    ref = [torch.nn.Parameter(torch.empty_like(g)) for g in want]
    for r, g in zip(ref, want):
        r.grad = g.clone()
    want_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    got_norm = mk.optim.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(got_norm, want_norm)
    assert not conv.weight.grad.is_contiguous()  # clipped in place
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad)



@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_norm_without_skipping_follows_clip_grad_norm(bad):
    """skip_nonfinite=False with clipping: exactly clip_grad_norm_ then an unclipped step. torch's
    coefficient clamp(max_norm / (norm + eps), max=1) is NaN for a NaN norm (every gradient NaN) and
    0 for an inf norm (inf * 0 = NaN where the inf was, 0 elsewhere)."""
    g = torch.randn(4097, dtype=torch.float64)
    g[1234] = bad
    # mk.optim.clip_grad_norm_ leaves the gradients exactly as torch's does (NaN where torch has NaN).
    a, b = torch.nn.Parameter(torch.randn(4097)), torch.nn.Parameter(torch.randn(4097))
    a.grad, b.grad = g.float(), g.float()
    na, nb = mk.optim.clip_grad_norm_([a], 1.0), torch.nn.utils.clip_grad_norm_([b], 1.0)
    assert torch.equal(na.isnan(), nb.isnan()) and (na.isnan() or na.item() == nb.item())
    assert torch.equal(a.grad.isnan(), b.grad.isnan())
    assert torch.equal(a.grad.nan_to_num(), b.grad.nan_to_num())
    # The fused step: the float64 reference fed torch-clipped gradients (NaN sign stays NaN).
    p0, m0 = torch.randn(4097), torch.randn(4097)
    p = torch.nn.Parameter(p0.clone())
    opt = mk.optim.Lion([p], lr=0.1, weight_decay=0.1, max_grad_norm=1.0, skip_nonfinite=False)
    opt.state[p]["exp_avg"] = m0.clone()
    p.grad = g.float()
    opt.step()
    assert opt.skipped_steps == 0
    ref = torch.nn.Parameter(p0.double())
    ref.grad = g.clone()
    torch.nn.utils.clip_grad_norm_([ref], 1.0)
    m_ref = m0.double()
    lion_step_reference(ref.data, ref.grad, m_ref, lr=0.1, beta1=0.9, beta2=0.99, decay=0.1)  # decoupled: wd * lr / initial_lr
    want_nan = ref.detach().isnan()
    assert want_nan.sum() == (4097 if bad != bad else 1)
    assert torch.equal(p.detach().isnan(), want_nan) and torch.equal(opt.state[p]["exp_avg"].isnan(), m_ref.isnan())
    torch.testing.assert_close(p.detach()[~want_nan].double(), ref.detach()[~want_nan], rtol=0, atol=1e-6)

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("how", ["max_grad_norm", "skip_nonfinite"])
def test_nonfinite_gradient_skips_the_step(bad, how):
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((100,), (4097,))]
    kw = dict(max_grad_norm=1.0) if how == "max_grad_norm" else dict(skip_nonfinite=True)
    opt = mk.optim.Lion(params, lr=1e-2, weight_decay=0.1, **kw)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    snap_p = [p.detach().clone() for p in params]
    snap_m = [opt.state[p]["exp_avg"].clone() for p in params]
    params[1].grad[1234] = bad
    opt.step()
    assert opt.skipped_steps == 1
    for p, s, m in zip(params, snap_p, snap_m):
        assert torch.equal(p.detach(), s) and torch.equal(opt.state[p]["exp_avg"], m)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()  # training goes on
    assert opt.skipped_steps == 1
    assert all(not torch.equal(p.detach(), s) for p, s in zip(params, snap_p))
    # the count survives a state-dict round trip (and keeps counting after it); live groups stay clean
    sd = opt.state_dict()
    assert sd["param_groups"][0]["skipped_steps"] == 1 and "skipped_steps" not in opt.param_groups[0]
    opt2 = mk.optim.Lion(params, lr=1e-2, weight_decay=0.1, **kw)
    opt2.load_state_dict(sd)
    assert opt2.skipped_steps == 1 and "skipped_steps" not in opt2.param_groups[0]
    params[0].grad[0] = bad
    opt2.step()
    assert opt2.skipped_steps == 2 and opt2.state_dict()["param_groups"][0]["skipped_steps"] == 2


def test_grad_scale_and_found_inf_arguments():
    a, b = _twins()
    opt_a = mk.optim.Lion(a, lr=1e-2, weight_decay=0.1)
    opt_b = mk.optim.Lion(b, lr=1e-2, weight_decay=0.1)
    scale = torch.tensor(1024.0)
    for _ in range(3):
        for pa, pb in zip(a, b):
            g = torch.randn(pa.shape)
            pa.grad, pb.grad = g * 1024.0, g.clone()
        opt_a.step(grad_scale=scale, found_inf=torch.tensor(0.0))
        opt_b.step()
        for pa, pb in zip(a, b):
            _close_with_rare_flips(pa.detach(), pb.detach(), 1e-2)
    snap = [p.detach().clone() for p in a]
    opt_a.step(grad_scale=scale, found_inf=torch.tensor(1.0))
    assert all(torch.equal(p.detach(), s) for p, s in zip(a, snap))
    assert opt_a.skipped_steps == 1


def test_grad_scaler_drives_the_optimizer():
    torch.manual_seed(0)
    model_a = _MLP()
    model_b = copy.deepcopy(model_a)
    opt_a = mk.optim.Lion(model_a.parameters(), lr=1e-3, weight_decay=0.1, max_grad_norm=1.0)
    opt_b = mk.optim.Lion(model_b.parameters(), lr=1e-3, weight_decay=0.1, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for step in range(4):
        opt_a.zero_grad()
        opt_b.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model_a(x), y)).backward()
        if step == 2:  # an overflow: GradScaler's found_inf must make the step a no-op
            next(model_a.parameters()).grad[0, 0] = float("inf")
            snap = [p.detach().clone() for p in model_a.parameters()]
        scaler.step(opt_a)
        scaler.update()
        if step == 2:
            assert all(torch.equal(p.detach(), s) for p, s in zip(model_a.parameters(), snap))
            assert scaler.get_scale() == 2.0 ** 9
            continue
        torch.nn.functional.mse_loss(model_b(x), y).backward()
        opt_b.step()
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            _close_with_rare_flips(pa.detach(), pb.detach(), 1e-3, atol=1e-5)
    assert opt_a.skipped_steps == 1


# ---------------------------------------------------------------- state, schedules, groups

@pytest.mark.parametrize("combo", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                   (torch.bfloat16, torch.bfloat16)], ids=["f32", "bf16-f32state", "bf16-bf16state"])
def test_state_dict_round_trip_continues_identically(combo):
    pd, sd = combo
    a = [torch.nn.Parameter(torch.randn(s).to(pd)) for s in ((1000,), (7, 13))]
    opt_a = mk.optim.Lion(a, lr=1e-2, weight_decay=0.1, state_dtype=sd, max_grad_norm=1.0)
    sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=10)
    grads = [[torch.randn(p.shape).to(pd) for p in a] for _ in range(6)]
    for k in range(3):
        for p, g in zip(a, grads[k]):
            p.grad = g.clone()
        opt_a.step()
        sched_a.step()
    saved = copy.deepcopy(opt_a.state_dict())
    saved_sched = copy.deepcopy(sched_a.state_dict())
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = mk.optim.Lion(b, lr=123.0, state_dtype=sd, max_grad_norm=1.0)  # hyperparameters come from the dict
    sched_b = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=10)
    opt_b.load_state_dict(saved)
    sched_b.load_state_dict(saved_sched)
    for p in b:
        assert opt_b.state[p]["exp_avg"].dtype == sd
    for k in range(3, 6):
        for pa, pb, g in zip(a, b, grads[k]):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        sched_a.step()
        sched_b.step()
        for pa, pb in zip(a, b):
            assert torch.equal(pa.detach(), pb.detach())
            assert torch.equal(opt_a.state[pa]["exp_avg"], opt_b.state[pb]["exp_avg"])
    assert "exp_avg" in saved["state"][0]


def test_lr_scheduler_sets_the_step_size():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = mk.optim.Lion([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    for k in range(4):
        p.grad = torch.randn(5000)
        p0 = p.detach().clone()
        opt.step()
        moved = (p.detach() - p0).abs()
        # No decay: every element moves by exactly lr (up to float32 rounding of p + lr).
        torch.testing.assert_close(moved, torch.full_like(moved, 0.1 * 0.5 ** k), rtol=0, atol=2e-6)
        sched.step()


def test_groups_with_own_hyperparameters_and_many_groups():
    # More groups than the CUDA kernel's hyperparameter table holds (8) still works (split launches
    # on CUDA; on the CPU one pass).
    params = [torch.nn.Parameter(torch.randn(257)) for _ in range(11)]
    groups = [dict(params=[p], lr=1e-3 * (i + 1), weight_decay=0.01 * i) for i, p in enumerate(params)]
    opt = mk.optim.Lion(groups)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(257)
        amb, _ = check_one_step(opt, params, torch.float32)
        assert amb <= 2


def test_initial_lr_is_kept_by_schedulers_and_paper_mode_uses_lr():
    p = torch.nn.Parameter(torch.ones(1000))
    opt = mk.optim.Lion([p], lr=0.1, weight_decay=0.5)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.1)  # sets lr = 0.01 immediately
    assert opt.param_groups[0]["initial_lr"] == 0.1 and opt.param_groups[0]["lr"] == pytest.approx(0.01)
    p.grad = torch.zeros(1000)
    opt.step()  # decay = 0.5 * 0.01 / 0.1 = 0.05
    torch.testing.assert_close(p.detach(), torch.full((1000,), 0.95))
    q = torch.nn.Parameter(torch.ones(1000))
    opt2 = mk.optim.Lion([q], lr=0.1, weight_decay=0.5, decoupled_weight_decay=False)
    q.grad = torch.zeros(1000)
    opt2.step()  # decay = lr * wd = 0.05
    torch.testing.assert_close(q.detach(), torch.full((1000,), 0.95))


def test_tensor_lr_decoupled_decay_follows_the_schedule():
    """A tensor lr is updated in place by LR schedulers (fill_); initial_lr was the same tensor, so
    lr / initial_lr stayed 1 and the decoupled decay ignored the schedule."""
    p = torch.nn.Parameter(torch.ones(1000))
    q = torch.nn.Parameter(torch.ones(1000))
    opt = mk.optim.Lion([p], lr=torch.tensor(0.1), weight_decay=0.5)
    opt.add_param_group(dict(params=[q], lr=torch.tensor(0.1)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    expected = 1.0
    for k in range(3):
        p.grad, q.grad = torch.zeros(1000), torch.zeros(1000)
        opt.step()
        expected *= 1 - 0.5 * 0.5 ** k  # decay = wd * lr / initial_lr
        torch.testing.assert_close(p.detach(), torch.full((1000,), expected))
        torch.testing.assert_close(q.detach(), torch.full((1000,), expected))
        sched.step()
    for group in opt.param_groups:
        assert float(group["initial_lr"]) == pytest.approx(0.1)


def test_add_param_group():
    a = torch.nn.Parameter(torch.randn(10))
    b = torch.nn.Parameter(torch.randn(10))
    opt = mk.optim.Lion([a], lr=0.1)
    opt.add_param_group(dict(params=[b], lr=0.01, state_dtype=torch.bfloat16))
    a.grad, b.grad = torch.randn(10), torch.randn(10)
    b0 = b.detach().clone()
    opt.step()
    assert opt.state[b]["exp_avg"].dtype == torch.bfloat16
    assert (b.detach() - b0).abs().max() <= 0.01 + 1e-6


def test_refused_param_group_is_not_kept():
    """A group refused by add_param_group stayed in param_groups: the corrected group was then refused
    because its parameters "appear in more than one parameter group", and every step failed."""
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.zeros(10))
    opt = mk.optim.Lion([a], lr=0.1)
    for bad in (dict(lr=-1.0), dict(betas=(0.9, 1.5)), dict(state_dtype=torch.float16)):
        with pytest.raises(ValueError, match=r"param_groups\[1\]"):
            opt.add_param_group(dict(params=[b], **bad))
        assert len(opt.param_groups) == 1
    opt.add_param_group(dict(params=[b], lr=0.01))
    a.grad, b.grad = torch.randn(10), torch.ones(10)
    opt.step()
    assert torch.equal(b.detach(), torch.full((10,), -0.01))


# ---------------------------------------------------------------- DTensor (FSDP2) local shards

def test_import_does_not_load_torch_distributed_tensor():
    """`import mpt_kernels` took ~0.9 s more while optim.py imported torch.distributed.tensor for an
    isinstance check; a tensor can only be a DTensor once that module is loaded, so it is looked up then."""
    import subprocess
    import sys

    from _subproc import NEUTRAL_CWD, subprocess_env

    code = "import sys, mpt_kernels; print('torch.distributed.tensor' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=subprocess_env(), cwd=NEUTRAL_CWD)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_dtensor_parameters_step_their_local_shards():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    own_pg = not dist.is_initialized()
    if own_pg:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        plain = [torch.nn.Parameter(torch.randn(s)) for s in ((64, 8), (1000,))]
        sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in plain]
        opt_p = mk.optim.Lion(plain, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5)
        opt_s = mk.optim.Lion(sharded, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5)
        for _ in range(3):
            for p, s in zip(plain, sharded):
                g = torch.randn(p.shape) * 2
                p.grad = g.clone()
                s.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            opt_p.step()
            opt_s.step()
        for p, s in zip(plain, sharded):
            _close_with_rare_flips(p.detach(), s.full_tensor().detach(), 1e-2)
        g = [distribute_tensor(torch.randn(p.shape), mesh, [Shard(0)]) for p in plain]
        for s, gi in zip(sharded, g):
            s.grad = gi
        norm = mk.optim.clip_grad_norm_(sharded, 1e9)
        want = torch.sqrt(sum((gi.full_tensor() ** 2).sum() for gi in g))
        assert norm.item() == pytest.approx(want.item(), rel=1e-5)
    finally:
        if own_pg:
            dist.destroy_process_group()


# ---------------------------------------------------------------- bad input

def test_bad_arguments_raise_value_error():
    p = torch.nn.Parameter(torch.randn(4))
    for kw, name in ((dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(betas=(0.9, 1.5)), "betas"),
                     (dict(weight_decay=-0.1), "weight_decay"), (dict(state_dtype=torch.float16), "state_dtype"),
                     (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(max_grad_norm=float("inf")), "max_grad_norm"),
                     (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=name):
            mk.optim.Lion([p], **kw)


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate")
def test_duplicate_parameters_raise():
    """torch refuses a parameter in two groups but only warns for one listed twice in a group; the
    fused step then updated it from two threads at once (lost updates, varying from run to run)."""
    w = torch.nn.Parameter(torch.zeros(1 << 16))
    with pytest.raises(ValueError, match="more than once"):
        mk.optim.Lion([w, w], lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        mk.optim.Lion([dict(params=[w]), dict(params=[w])], lr=0.1)
    v = torch.nn.Parameter(torch.zeros(3))
    opt = mk.optim.Lion([v], lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: .*more than once"):
        opt.add_param_group(dict(params=[w, w]))
    assert len(opt.param_groups) == 1
    opt.add_param_group(dict(params=[w]))
    w.grad = torch.ones(1 << 16)
    opt.step()
    assert torch.equal(w.detach(), torch.full((1 << 16,), -0.1))


def test_parameters_sharing_memory():
    """nn.Parameter(other) aliases other's memory: two parameters, one storage. The fused step updated
    both at once from two threads (lost updates varying from run to run); it now refuses. Disjoint
    views of one flat buffer stay fine."""
    a = torch.nn.Parameter(torch.zeros(1 << 16))
    b = torch.nn.Parameter(a)
    c = torch.nn.Parameter(torch.zeros(10))
    opt = mk.optim.Lion([dict(params=[c, a]), dict(params=[b], lr=0.01)], lr=0.1)
    a.grad, b.grad, c.grad = torch.ones(1 << 16), torch.ones(1 << 16), torch.ones(10)
    with pytest.raises(ValueError, match=r"param_groups\[0\] parameter 1 and param_groups\[1\] parameter 2 share memory"):
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(1 << 16)) and torch.equal(c.detach(), torch.zeros(10))
    flat = torch.zeros(300)
    xs = [torch.nn.Parameter(flat[:100]), torch.nn.Parameter(flat[100:300].view(20, 10))]
    for x in xs:
        x.grad = torch.ones_like(x)
    mk.optim.Lion(xs, lr=0.1).step()
    assert torch.equal(flat, torch.full((300,), -0.1))


def test_a_refused_step_is_not_counted():
    """A step that raises before any kernel runs (here: the second group's parameter is not contiguous)
    left every group's step count advanced: a retry after fixing it stepped with the wrong count (the
    stochastic-rounding stream's position) and a saved state disagreed with the updates made."""
    a = torch.nn.Parameter(torch.zeros(8))
    b = torch.nn.Parameter(torch.zeros(4, 6).t())
    opt = mk.optim.Lion([dict(params=[a]), dict(params=[b])], lr=0.1)
    a.grad, b.grad = torch.ones(8), torch.ones(6, 4)
    with pytest.raises(ValueError, match="contiguous"):
        opt.step()
    assert [g["step"] for g in opt.param_groups] == [0, 0] and torch.equal(a.detach(), torch.zeros(8))
    b.grad = None
    opt.step()
    assert [g["step"] for g in opt.param_groups] == [1, 1]


@pytest.mark.parametrize("case", ["sparse", "complex", "float16", "float64", "noncontiguous"])
def test_unsupported_parameters_raise(case):
    if case == "sparse":
        p = torch.nn.Parameter(torch.randn(4, 4))
        p.grad = torch.eye(4).to_sparse()
        match = "sparse"
    elif case == "complex":
        p = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
        p.grad = torch.randn(4, dtype=torch.complex64)
        match = "complex"
    elif case in ("float16", "float64"):
        dt = getattr(torch, case)
        p = torch.nn.Parameter(torch.randn(4, dtype=dt))
        p.grad = torch.randn(4, dtype=dt)
        match = "float32 or bfloat16"
    else:
        p = torch.nn.Parameter(torch.randn(8, 6).t())
        p.grad = torch.randn(6, 8)
        match = "contiguous"
    opt = mk.optim.Lion([p], lr=0.1)
    with pytest.raises(ValueError, match=match):
        opt.step()


def test_noncontiguous_grad_is_accepted():
    """Several parameters with transposed gradients: the step copies each to a contiguous tensor,
    which must live until the kernel reads it (a copy freed after its loop iteration was reused by
    the next copy or the new exp_avg, and the first parameter got the wrong update)."""
    ps = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(3)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for i, (p, q) in enumerate(zip(ps, qs)):
        g = torch.randn(64, 64) * (-1) ** i
        p.grad = g.t()
        q.grad = g.t().contiguous()
    for _ in range(2):
        mk.optim.Lion(ps, lr=0.1, seed=0).step()
        mk.optim.Lion(qs, lr=0.1, seed=0).step()
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach(), q.detach())


def test_state_of_the_wrong_shape_raises_before_any_update():
    """A loaded exp_avg whose shape differs from its parameter's was refused by the core after the
    other dtype groups had been stepped, and named by its index in its dtype group."""
    a = torch.nn.Parameter(torch.zeros(10))
    b = torch.nn.Parameter(torch.zeros(6).bfloat16())
    opt = mk.optim.Lion([a, b], lr=0.1)
    opt.load_state_dict({"state": {0: {"exp_avg": torch.zeros(10)}, 1: {"exp_avg": torch.zeros(3, 2)}},
                         "param_groups": [{**opt.state_dict()["param_groups"][0]}]})
    a.grad, b.grad = torch.ones(10), torch.ones(6).bfloat16()
    with pytest.raises(ValueError, match=r"param_groups\[0\] parameter 1: exp_avg has shape \(3, 2\)"):
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(10)) and torch.equal(b.detach(), torch.zeros(6).bfloat16())


def test_step_bumps_autograd_version_counters():
    """The kernels write through raw pointers: without a version bump, a backward through a graph that
    saved a parameter before the step silently used the stepped values (torch's optimizers raise)."""
    w = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(torch.randn(4).bfloat16())
    x = torch.randn(2, 4, requires_grad=True)
    y = (x @ w).sum()  # saves w for x's gradient
    opt = mk.optim.Lion([w, b], lr=0.1, max_grad_norm=1.0)
    w.grad, b.grad = torch.randn(4, 4), torch.randn(4).bfloat16()
    v_w, v_b = w._version, b._version
    opt.step()
    assert w._version > v_w and b._version > v_b
    m = opt.state[w]["exp_avg"]
    v_m = m._version
    opt.step()
    assert m._version > v_m
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_compiled_core_validates_its_arguments():
    p, g, m = torch.randn(10), torch.randn(10), torch.zeros(10)
    V = _ext.view
    hyper = [(0.1, 0.9, 0.99, 0.0, True)]
    with pytest.raises(ValueError, match=r"grads\[0\].*shape"):
        _ext._C.lion_step([V(p)], [V(torch.randn(11))], [V(m)], [0], [0], hyper)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\].*dtype"):
        _ext._C.lion_step([V(p)], [V(g)], [V(torch.zeros(10, dtype=torch.float64))], [0], [0], hyper)
    with pytest.raises(ValueError, match=r"params\[1\].*bfloat16"):
        _ext._C.lion_step([V(p), V(p.bfloat16())], [V(g), V(g)], [V(m), V(m)], [0, 1], [0, 0], hyper)
    with pytest.raises(ValueError, match=r"params\[0\].*contiguous"):
        q = torch.randn(4, 6).t()
        _ext._C.lion_step([V(q)], [V(torch.randn(6, 4))], [V(torch.zeros(6, 4))], [0], [0], hyper)
    with pytest.raises(ValueError, match="hyper_index"):
        _ext._C.lion_step([V(p)], [V(g)], [V(m)], [0], [3], hyper)
    with pytest.raises(ValueError, match="grads"):
        _ext._C.lion_step([V(p)], [], [V(m)], [0], [0], hyper)
    with pytest.raises(ValueError, match="lr"):
        _ext._C.lion_step([V(p)], [V(g)], [V(m)], [0], [0], [(-1.0, 0.9, 0.99, 0.0, True)])
    with pytest.raises(ValueError, match="grad_multiplier"):
        _ext._C.lion_step([V(p)], [V(g)], [V(m)], [0], [0], hyper, grad_multiplier=V(torch.ones(2)))
    with pytest.raises(ValueError, match="partials"):
        _ext._C.sum_squares([V(torch.randn(40000))], V(torch.empty(2)))
    with pytest.raises(ValueError, match="aux"):
        _ext._C.lion_finalize(V(torch.empty(1)), V(torch.empty(2)), 1.0)
    p0 = p.clone()
    one = torch.ones(1)  # kept alive: the view is a raw pointer
    _ext._C.lion_step([V(p)], [V(g)], [V(m)], [0], [0], hyper, skip=V(one))
    assert torch.equal(p, p0)
    half = torch.full((1,), 0.5)
    _ext._C.lion_step([V(p)], [V(g)], [V(m)], [0], [0], hyper, grad_multiplier=V(half))
    torch.testing.assert_close(m, 0.01 * 0.5 * g)


def test_sum_squares_partials_are_per_chunk_and_deterministic():
    xs = [torch.randn(n) for n in (1, 16384, 16385, 100000)]
    n = _ext._C.lion_num_chunks([x.numel() for x in xs])
    assert n == 1 + 1 + 2 + math.ceil(100000 / _ext._C.LION_CHUNK)
    part = torch.full((n,), float("nan"))
    _ext._C.sum_squares([_ext.view(x) for x in xs], _ext.view(part))
    want = torch.cat([(x.double().split(_ext._C.LION_CHUNK)) and torch.stack([(c ** 2).sum() for c in x.double().split(
        _ext._C.LION_CHUNK)]) for x in xs])
    torch.testing.assert_close(part.double(), want, rtol=1e-5, atol=0)
    part2 = torch.empty_like(part)
    _ext._C.sum_squares([_ext.view(x) for x in xs], _ext.view(part2))
    assert torch.equal(part, part2)


# ---------------------------------------------------------------- CUDA (unvalidated without a GPU)

def _cpu_cuda_pair(sizes, pd, gd, sd, **kw):
    cpu = [torch.nn.Parameter(torch.randn(s).to(pd)) for s in sizes]
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    return cpu, gpu, mk.optim.Lion(cpu, state_dtype=sd, seed=5, **kw), mk.optim.Lion(gpu, state_dtype=sd, seed=5, **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("combo", DTYPE_COMBOS, ids=lambda c: "p{}-g{}-m{}".format(*map(_name, c)))
def test_cuda_matches_cpu_bit_for_bit(combo):
    # Same chunking, same float32 operation order, same bf16 rounding and RNG: identical bits (without
    # clipping or a grad scale: the norm's reduction order differs between CPU and GPU).
    pd, gd, sd = combo
    cpu, gpu, oc, og = _cpu_cuda_pair(SIZES + [(3,)] * 100, pd, gd, sd, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for a, b in zip(cpu, gpu):
            g = torch.randn(a.shape).to(gd)
            for x in (a, b):  # torch otherwise insists on grad dtype == param dtype
                if hasattr(x, "grad_dtype"):
                    x.grad_dtype = None
            a.grad, b.grad = g, g.cuda()
        oc.step()
        og.step()
    for a, b in zip(cpu, gpu):
        assert torch.equal(a.detach(), b.detach().cpu())
        assert torch.equal(oc.state[a]["exp_avg"], og.state[b]["exp_avg"].cpu())


@pytest.mark.cuda
def test_cuda_step_matches_reference_with_clipping_and_unaligned_views():
    base = torch.randn(278011 + 3, device="cuda")
    p = torch.nn.Parameter(base[3:])  # contiguous, data pointer 12 bytes past a 16-byte boundary
    storage = torch.nn.Parameter(torch.randn(4100, device="cuda"))
    params = [p, storage]
    opt = mk.optim.Lion(params, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    for _ in range(3):
        full = torch.randn(4101, device="cuda")
        storage.grad = full[1:]  # misaligned grad pointer: the scalar path
        p.grad = torch.randn(p.shape, device="cuda")
        torch.cuda.synchronize()
        cpu_params = [q.detach().cpu().clone().requires_grad_() for q in params]
        ref = mk.optim.Lion(cpu_params, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
        for cq, q in zip(cpu_params, params):
            cq.grad = q.grad.cpu()
            if q in opt.state:
                ref.state[cq]["exp_avg"] = opt.state[q]["exp_avg"].cpu().clone()
        opt.step()
        ref.step()
        for cq, q in zip(cpu_params, params):
            _close_with_rare_flips(q.detach().cpu(), cq.detach(), 1e-2)


@pytest.mark.cuda
def test_cuda_nonfinite_skip_and_grad_scaler_without_sync():
    params = [torch.nn.Parameter(torch.randn(1000, device="cuda")) for _ in range(3)]
    opt = mk.optim.Lion(params, lr=1e-2, max_grad_norm=1.0)
    for p in params:
        p.grad = torch.randn(1000, device="cuda")
    opt.step()
    snap = [p.detach().clone() for p in params]
    params[0].grad[5] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(p, s) for p, s in zip(params, snap))
    opt.step(grad_scale=torch.tensor(2.0, device="cuda"), found_inf=torch.tensor(1.0, device="cuda"))
    assert opt.skipped_steps == 2


@pytest.mark.cuda
def test_cuda_sum_squares_many_tensors_and_clip_grad_norm():
    grads = [torch.randn(int(n), device="cuda") for n in torch.randint(1, 40000, (450,))]  # > 2 launches
    params = []
    for g in grads:
        q = torch.nn.Parameter(torch.empty_like(g))
        q.grad = g.clone()
        params.append(q)
    ref = torch.nn.utils.get_total_norm([g for g in grads]) if hasattr(torch.nn.utils, "get_total_norm") else \
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    n1 = mk.optim.clip_grad_norm_(params, 1e9)
    assert n1.item() == pytest.approx(ref.item(), rel=1e-5)
    for q, g in zip(params, grads):
        q.grad = g.clone()
    n2 = mk.optim.clip_grad_norm_(params, 1e9)
    assert torch.equal(n1, n2)  # deterministic


def test_deepcopy_keeps_clipping_skipping_and_the_skipped_count():
    """A deep copy of a model and its optimizer (checkpoint-in-memory, EMA twins) steps exactly as the
    original: the copy still clips (max_grad_norm), still skips non-finite steps and keeps the count."""
    a = [torch.nn.Parameter(torch.randn(s)) for s in ((300,), (17, 31))]
    opt_a = mk.optim.Lion(a, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5)
    for p in a:
        p.grad = torch.full(p.shape, float("nan"))
    opt_a.step()  # skipped
    for p in a:
        p.grad = torch.randn(p.shape)
    opt_a.step()
    b, opt_b = copy.deepcopy((a, opt_a))
    assert opt_b.max_grad_norm == 0.5 and opt_b.skip_nonfinite and opt_b.skipped_steps == 1
    for _ in range(3):  # gradients ~1000x the clip: clipped or not, sign(b1*m + (1-b1)*g) differs
        for pa, pb in zip(a, b):
            g = torch.randn(pa.shape) * 100
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        for pa, pb in zip(a, b):
            assert torch.equal(pa.detach(), pb.detach())
            assert torch.equal(opt_a.state[pa]["exp_avg"], opt_b.state[pb]["exp_avg"])


def test_a_groups_changed_state_dtype_converts_its_state():
    """state_dtype is a per-group key: set on a group after steps, the next step converts exp_avg and
    steps from the converted state (float64 reference from the bf16-rounded momentum)."""
    from mpt_kernels.ops.reference import lion_step_reference

    p = torch.nn.Parameter(torch.randn(4097))
    opt = mk.optim.Lion([p], lr=1e-2, betas=(0.9, 0.99), stochastic_rounding=False)
    p.grad = torch.randn(p.shape)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    opt.param_groups[0]["state_dtype"] = torch.bfloat16
    m0 = opt.state[p]["exp_avg"].bfloat16().double()
    p0 = p.detach().double()
    p.grad = torch.randn(p.shape)
    g = p.grad.double()
    opt.step()
    m = opt.state[p]["exp_avg"]
    assert m.dtype == torch.bfloat16
    p_ref, m_ref = p0.clone(), m0.clone()
    lion_step_reference(p_ref, g, m_ref, lr=1e-2, beta1=0.9, beta2=0.99, decay=0.0)
    # exp_avg: round-to-nearest to bf16 of the float32 update (<= 1/2 bf16 ulp, plus float32 rounding)
    tol_m = ulp(m_ref.abs(), torch.bfloat16) * 0.5 + 4 * ulp(m_ref.abs(), torch.float32)
    assert bool(((m.double() - m_ref).abs() <= tol_m).all())
    c = 0.9 * m0 + 0.1 * g
    clear = c.abs() > 8 * EPS32 * (0.9 * m0.abs() + 0.1 * g.abs())
    assert bool(((p.detach().double() - p_ref).abs()[clear] <= 2 * ulp(p_ref.abs()[clear], torch.float32) + 1e-9).all())
