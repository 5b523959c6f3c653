"""The ops under torch.func's reverse-mode transforms (grad, vjp, jacrev, vmap of grad) and the model
under functional_call: the kernels run (through the ops' ``transform_function`` twins), the
gradients match float64 references and plain autograd, and what is not supported (second
derivatives, forward mode) raises a clear error instead of torch's generic refusal.

Under vmap each op has a batching rule (``_ext.register_vmap``): one kernel call for the whole batch,
each sample's result bit for bit what its own call gives (the per-sample loop torch's fallback ran),
with vmapped dims anywhere, unvmapped arguments mixed in, nested vmaps and chunk_size; the cases a
rule cannot fold exactly run the samples one by one, without torch's "performance drop" warning,
which fails every test of this file."""
from __future__ import annotations

import collections
import contextlib
import warnings

import pytest
import torch
from torch.func import grad, jacrev, vjp, vmap

import mpt_kernels as mk
from mpt_kernels._ext import _C, vmap_rules
from mpt_kernels.ops import attention as attn_op
from mpt_kernels.ops import layernorm as ln_op
from mpt_kernels.ops import loss as loss_op
from mpt_kernels.ops.reference import attention_reference, attention_varlen_reference, layer_norm_reference

pytestmark = pytest.mark.filterwarnings("error:There is a performance drop")

_KERNELS = ("attention_fwd", "attention_bwd", "layer_norm_fwd", "layer_norm_bwd", "cross_entropy_fwd",
            "cross_entropy_bwd")


@pytest.fixture
def calls(monkeypatch):
    """Counts the transform twins' applies: the kernels ran, not a fallback that skips them."""
    seen = {}
    for mod, name in ((attn_op, "_AttentionFunc"), (attn_op, "_PackedAttentionFunc"), (ln_op, "_LayerNormFunc"),
                      (loss_op, "_CrossEntropyFunc")):
        cls = getattr(mod, name)
        orig = cls.apply

        def counted(*a, _orig=orig, _name=name):
            seen[_name] = seen.get(_name, 0) + 1
            return _orig(*a)

        monkeypatch.setattr(cls, "apply", counted)
    return seen


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the compiled core's kernel calls by name: one per batch where a batching rule folds."""
    seen = collections.Counter()
    for name in _KERNELS:
        def counted(*a, _orig=getattr(_C, name), _name=name):
            seen[_name] += 1
            return _orig(*a)

        monkeypatch.setattr(_C, name, counted)
    return seen


@pytest.fixture
def poisoned(monkeypatch):
    """The ops' outputs NaN-filled before the kernels write them (varlen attention's are zero-filled
    by contract), so an element a folded call leaves unwritten shows."""
    def nan_empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t

    monkeypatch.setattr(attn_op, "_empty", nan_empty)
    monkeypatch.setattr(ln_op, "_alloc", nan_empty)
    monkeypatch.setattr(loss_op, "_alloc", nan_empty)


@contextlib.contextmanager
def no_fallback_warning():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
    drops = [str(w.message) for w in seen if "performance drop" in str(w.message)]
    assert not drops, drops[0]


def _same(a, b):
    """Bit for bit, NaN where NaN (a sample whose every target is ignored has a NaN loss and gradient)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _sample(args, in_dims, i):
    return [a if d is None else a.select(d, i) for a, d in zip(args, in_dims)]


def _loop(f, args, in_dims, out_dim=0):
    """f once per sample, outputs stacked: what vmap must equal."""
    n = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    outs = [f(*_sample(args, in_dims, i)) for i in range(n)]
    return tuple(torch.stack(o, dim=out_dim) for o in zip(*outs))


def _check_vmap(f, args, in_dims, out_dim=0, **kw):
    """vmap(f) over args equals the per-sample loop bit for bit, without torch's fallback warning."""
    with no_fallback_warning():
        got = vmap(f, in_dims=in_dims, out_dims=out_dim, **kw)(*args)
    want = _loop(f, args, in_dims, out_dim)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert _same(g, w), (i, g.shape, w.shape, (g.double() - w.double()).abs().max())
    return got


def _weights(t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=torch.float64)


def _cases():
    """name -> (ours(x), reference(x) in float64, x, twin): a scalar of one op's output, weighted so
    every output element matters."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 7, 4, 16), torch.randn(2, 7, 2, 16), torch.randn(2, 7, 2, 16)  # GQA
    qkv = torch.randn(2, 6, (3 + 2 * 3) * 8)  # MHA, 3 heads of 8
    x, w, b, r = torch.randn(5, 48), torch.randn(48), torch.randn(48), torch.randn(5, 48)
    logits, targets = torch.randn(6, 37), torch.tensor([3, 0, -100, 36, 5, 5])
    wa, wp, wl = _weights(q, 1), _weights(qkv[..., :3 * 8].reshape(2, 6, 3, 8), 2), _weights(x, 3)

    def packed_ref(t):
        t = t.reshape(2, 6, 9, 8)
        return (attention_reference(t[:, :, :3], t[:, :, 3:6], t[:, :, 6:], alibi_slopes=mk.alibi_slopes(3).double())
                * wp).sum()

    def ln_ref(t):
        y, h = layer_norm_reference(t, w.double(), b.double(), residual=r.double(), compute_dtype=torch.float64)
        return (y * wl).sum() + (h * h).sum()

    def ln_ours(t):
        y, h = mk.layer_norm(t, w, b, residual=r)
        return (y * wl.float()).sum() + (h * h).sum()

    def ce_ref(t):
        keep = targets != -100
        return torch.nn.functional.cross_entropy(t[keep], targets[keep])

    return {
        "attention": (lambda t: (mk.alibi_attention(t, k, v) * wa.float()).sum(),
                      lambda t: (attention_reference(t, k.double(), v.double(),
                                                     alibi_slopes=mk.alibi_slopes(4).double()) * wa).sum(),
                      q, "_AttentionFunc"),
        "qkvpacked": (lambda t: (mk.alibi_attention_qkvpacked(t, 3) * wp.float()).sum(), packed_ref, qkv,
                      "_PackedAttentionFunc"),
        "layer_norm": (ln_ours, ln_ref, x, "_LayerNormFunc"),
        "cross_entropy": (lambda t: loss_op.cross_entropy(t, targets), ce_ref, logits, "_CrossEntropyFunc"),
    }


NAMES = ["attention", "qkvpacked", "layer_norm", "cross_entropy"]


def _reference_grad(ref, x):
    xr = x.detach().double().requires_grad_()
    (g,) = torch.autograd.grad(ref(xr), xr)
    return g.float()


@pytest.mark.parametrize("name", NAMES)
def test_grad_and_vjp_match_float64_and_autograd(name, calls):
    ours, ref, x, twin = _cases()[name]
    expected = _reference_grad(ref, x)
    g = grad(ours)(x)
    assert calls.get(twin, 0) >= 1
    torch.testing.assert_close(g, expected, rtol=2e-4, atol=2e-5)
    value, pull = vjp(ours, x)
    (gv,) = pull(torch.ones_like(value))
    assert torch.equal(gv, g)  # vjp and grad are one computation
    torch.testing.assert_close(value.double(), ref(x.double()), rtol=1e-5, atol=1e-4)
    # plain autograd through the eager twin: the same kernels, bit for bit
    xa = x.clone().requires_grad_()
    ours(xa).backward()
    assert torch.equal(xa.grad, g)


def test_grad_with_respect_to_several_arguments():
    """argnums over LayerNorm's x, weight and bias at once (the twin returns each input's gradient)."""
    torch.manual_seed(2)
    x, w, b = torch.randn(6, 40), torch.randn(40), torch.randn(40)
    wl = _weights(x, 9)

    def f(x, w, b):
        return (mk.layer_norm(x, w, b) * wl.float()).sum()

    got = grad(f, argnums=(0, 1, 2))(x, w, b)
    xs = [t.double().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad((layer_norm_reference(*xs, compute_dtype=torch.float64) * wl).sum(), xs)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e.float(), rtol=2e-4, atol=2e-5)


def test_jacrev_of_layer_norm_matches_float64():
    """A whole Jacobian (vmap over the backward: one backward kernel call per output element)."""
    torch.manual_seed(3)
    x, w = torch.randn(2, 12), torch.randn(12)
    jac = jacrev(lambda t: mk.layer_norm(t, w))(x)
    want = torch.autograd.functional.jacobian(
        lambda t: layer_norm_reference(t, w.double(), compute_dtype=torch.float64), x.double())
    torch.testing.assert_close(jac, want.float(), rtol=1e-4, atol=1e-5)


# (forward calls, backward calls) of one vmap(grad) over the batch: LayerNorm's backward is two calls,
# one for every row's dx and one for the per-sample weight gradients.
_FOLDED_CALLS = {"attention": ("attention", 1, 1), "qkvpacked": ("attention", 1, 1),
                 "layer_norm": ("layer_norm", 1, 2), "cross_entropy": ("cross_entropy", 1, 1)}


@pytest.mark.parametrize("name", NAMES)
def test_vmap_of_grad_runs_each_kernel_once_and_equals_the_loop(name, kernel_calls, poisoned):
    """vmap(grad(f)) over 5 samples: one forward and one backward kernel call for the whole batch (no
    per-sample fallback, no warning), each sample's gradient bit for bit its own grad(f), and close to
    the float64 reference."""
    ours, ref, x, _ = _cases()[name]
    xs = torch.stack([x, x.flip(0), 0.5 * x, -x, x + 0.25])
    with no_fallback_warning():
        got = vmap(grad(ours))(xs)
    kernel, fwd, bwd = _FOLDED_CALLS[name]
    assert (kernel_calls[kernel + "_fwd"], kernel_calls[kernel + "_bwd"]) == (fwd, bwd)
    for i in range(len(xs)):
        assert torch.equal(got[i], grad(ours)(xs[i]))
        torch.testing.assert_close(got[i], _reference_grad(ref, xs[i]), rtol=2e-4, atol=2e-5)
    with vmap_rules(False):  # every sample alone (the fallback's cost): the same bits
        assert torch.equal(vmap(grad(ours))(xs), got)


def _attention_and_vjp(fn, n_diff=None):
    """f(*inputs) -> (out, gradients of sum(out * out) / 2 with respect to the first n_diff inputs (all))."""
    def f(*inputs):
        k = len(inputs) if n_diff is None else n_diff
        out, pull = vjp(lambda *d: fn(*d, *inputs[k:]), *inputs[:k])
        return (out,) + pull(out)
    return f


def _attention_cases(n):
    """name -> (f, args, in_dims, out_dim, vmap kwargs, calls, ref): f(*sample) returns the output and the
    vjp's input gradients; calls: the forward kernel calls vmap makes (1: folded, n: one per sample,
    None: depends on the machine's thread count); ref(*sample) the output in float64, or None."""
    g = torch.Generator().manual_seed(11)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    cu = torch.tensor([2, 5, 5, 12, 20], dtype=torch.int32)  # rows 0-1 and 20-22 in no sequence; one empty
    cases = {}
    # GQA 4:2, head_dim 24, q vmapped after its batch dim, k and v shared; out_dims 1.
    k, v = r(2, 9, 2, 24), r(2, 9, 2, 24)
    cases["gqa_q_dim1_kv_shared"] = (
        _attention_and_vjp(lambda q: mk.alibi_attention(q, k, v)), (r(2, n, 7, 4, 24),), (1,), 1, {}, 1,
        lambda q: attention_reference(q.double(), k.double(), v.double(), alibi_slopes=mk.alibi_slopes(4).double()))
    # Every input vmapped, each at another dim, v after head_dim (its head_dim is then strided), q a
    # transposed view; not causal, seqlen_q < seqlen_k; MQA.
    qt = r(n, 2, 3, 5, 8).transpose(2, 3)  # (n, 2, 5, 3, 8), not contiguous
    cases["all_vmapped_strided_mqa"] = (
        _attention_and_vjp(lambda q, k, v: mk.alibi_attention(q, k, v, causal=False)),
        (qt, r(2, n, 11, 1, 8), r(2, 11, 1, 8, n)), (0, 1, 4), 0, {}, 1,
        lambda q, k, v: attention_reference(q.double(), k.double(), v.double(), causal=False,
                                            alibi_slopes=mk.alibi_slopes(3).double()))
    # Slopes: one set per sample (vmapped), and per batch row (shared).
    kk = r(2, 6, 3, 16)
    cases["slopes_per_sample"] = (
        _attention_and_vjp(lambda q, s: mk.alibi_attention(q, kk, kk, alibi_slopes=s), 1),
        (r(n, 2, 6, 3, 16), torch.rand(n, 3, generator=g)), (0, 0), 0, {}, 1,
        lambda q, s: attention_reference(q.double(), kk.double(), kk.double(), alibi_slopes=s.double()))
    sb = torch.rand(2, 3, generator=g)
    cases["slopes_per_batch_row"] = (
        _attention_and_vjp(lambda q: mk.alibi_attention(q, kk, kk, alibi_slopes=sb)), (r(n, 2, 6, 3, 16),), (0,), 0,
        {}, 1, lambda q: attention_reference(q.double(), kk.double(), kk.double(), alibi_slopes=sb.double()))
    # Varlen with offsets shared by the samples (folded into the heads): GQA, q and k vmapped, v shared.
    vv = r(23, 2, 16)
    cases["varlen_shared_offsets"] = (
        _attention_and_vjp(lambda q, k: mk.alibi_attention(q, k, vv, cu_seqlens_q=cu, cu_seqlens_k=cu)),
        (r(n, 23, 4, 16), r(23, 2, 16, n)), (0, 3), 0, {}, 1,
        lambda q, k: attention_varlen_reference(q.double(), k.double(), vv.double(), cu, cu,
                                                alibi_slopes=mk.alibi_slopes(4).double()))
    # Varlen with offsets per sample: the samples run one by one.
    cus = torch.tensor([[0, 3, 9, 9, 23], [2, 5, 5, 12, 20], [0, 23, 23, 23, 23]], dtype=torch.int32)[:n]
    cases["varlen_per_sample_offsets"] = (
        _attention_and_vjp(lambda q, c: mk.alibi_attention(q, q[:, :2], q[:, :2], cu_seqlens_q=c, cu_seqlens_k=c,
                                                           max_seqlen_q=23, max_seqlen_k=23), 1),
        (r(n, 23, 4, 8), cus), (0, 0), 0, {}, n, None)
    # A decode step over 300 keys: the CPU forward splits the keys across threads when batch x heads is
    # small, and the folded batch may split them otherwise: then the samples run one by one.
    kd = r(1, 300, 4, 40)
    cases["decode_split_keys"] = (
        _attention_and_vjp(lambda q: mk.alibi_attention(q, kd, kd)), (r(n, 1, 1, 4, 40),), (0,), 0, {}, None,
        lambda q: attention_reference(q.double(), kd.double(), kd.double(), alibi_slopes=mk.alibi_slopes(4).double()))
    # bfloat16, chunk_size 2 (the last chunk smaller).
    kb = r(1, 33, 2, 32, dtype=torch.bfloat16)
    cases["bf16_chunked"] = (
        _attention_and_vjp(lambda q: mk.alibi_attention(q, kb, kb)), (r(n, 1, 33, 2, 32, dtype=torch.bfloat16),),
        (0,), 0, {"chunk_size": 2}, 2, None)
    # Packed QKV (3 heads, 1 KV head, head_dim 8), batched and varlen, vmapped at the last dim.
    cases["packed"] = (
        _attention_and_vjp(lambda t: mk.alibi_attention_qkvpacked(t, 3, 1)), (r(2, 11, 40, n),), (3,), 0, {}, 1,
        None)
    cases["packed_varlen"] = (
        _attention_and_vjp(lambda t: mk.alibi_attention_qkvpacked(t, 3, 1, cu_seqlens=cu)), (r(23, 40, n),), (2,), 1,
        {}, 1, None)
    return cases


ATTENTION_CASES = list(_attention_cases(3))


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_vmap_of_attention_equals_the_loop(case, kernel_calls, poisoned):
    """Forward and input gradients of attention under vmap, bit for bit the per-sample loop: vmapped
    dims anywhere, strided inputs, unvmapped arguments, slopes per sample or batch row, varlen with
    shared or per-sample offsets, decode, bfloat16, chunk_size, packed QKV. Forward outputs are checked
    against float64 too; rows in no varlen sequence stay zero."""
    n = 3
    f, args, in_dims, out_dim, kw, calls, ref = _attention_cases(n)[case]
    got = _check_vmap(f, args, in_dims, out_dim, **kw)
    if calls is not None:
        assert kernel_calls["attention_fwd"] - n == calls  # (the loop made n)
    if ref is not None:
        for i in range(n):
            out = got[0].select(out_dim, i)
            want = ref(*_sample(args, in_dims, i))
            if "varlen" in case:
                assert not out[:2].any() and not out[20:].any()
                out = out[2:20]
            torch.testing.assert_close(out, want.float(), rtol=2e-5, atol=2e-5)


def test_decode_whose_key_split_would_change_runs_per_sample(monkeypatch):
    """Why the attention rule compares workspace sizes: a decode-shaped forward splits the keys over
    the threads when batch x heads is small; folding 3 samples changes the split and the last bits."""
    q, k = torch.randn(3, 1, 1, 4, 40), torch.randn(1, 300, 4, 40)
    if attn_op._fwd_workspace_bytes(q.shape[1:], k.shape, (4,), q.dtype, q.device, None, 1, 300, 0.125, True) == 0:
        pytest.skip("one thread here: the forward never splits the keys")
    f = lambda t: mk.alibi_attention(t, k, k)  # noqa: E731
    loop = torch.stack([f(t) for t in q])
    assert torch.equal(vmap(f)(q), loop)
    monkeypatch.setattr(attn_op, "_same_splits", lambda *a: True)  # fold regardless
    assert not torch.equal(vmap(f)(q), loop)


def _layer_norm_cases(n):
    """name -> (f, args, in_dims, (forward, backward) kernel calls vmap makes, float64 check or None);
    f(*sample) returns LayerNorm's outputs and the vjp's gradients for x, weight, bias, residual."""
    g = torch.Generator().manual_seed(12)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    def full(x, w, b, res, out_dtype=None):
        (y, h), pull = vjp(lambda *t: mk.layer_norm(t[0], t[1], t[2], residual=t[3], out_dtype=out_dtype),
                           x, w, b, res)
        return (y, h) + pull((y * 0.5 + 1, h))

    ref = True  # (checked against layer_norm_reference in float64)
    avx2 = ln_op._AVX2
    cases = {
        # hidden 48; x vmapped, weight/bias/residual shared
        "x_vmapped": (full, (r(n, 5, 48), r(48), r(48), r(5, 48)), (0, None, None, None), (1, 2), ref),
        # 3-d rows, residual vmapped after hidden (its hidden is strided), x shared
        "residual_vmapped_last_dim": (full, (r(2, 3, 40), r(40), r(40), r(2, 3, 40, n)), (None, None, None, 3), (1, 2),
                                      ref),
        # hidden 45 (odd): with AVX2 the per-sample weight gradients cannot fold exactly (see the rule)
        "odd_hidden": (full, (r(n, 7, 45), r(45), r(45), r(n, 7, 45)), (0, None, None, 0), (1, n if avx2 else 2),
                       ref),
        # one element per row; a single row per sample
        "hidden_1": (full, (r(n, 6, 1), r(1), r(1), r(6, 1)), (0, None, None, None), (1, 2), None),
        "one_row": (full, (r(48, n), r(48), r(48), r(48)), (1, None, None, None), (1, 2), ref),
        # 2100 rows per sample: the kernel's partial rows hold more than 8 rows each
        "many_rows": (full, (r(n, 2100, 16), r(16), r(16), r(2100, 16)), (0, None, None, None), (1, 2), ref),
        # bfloat16, float32 weights and residual (mixed precision: x's gradient rounded by the backward)
        "mixed_bf16_x_f32_residual": (full, (r(n, 4, 64, dtype=torch.bfloat16), r(64), r(64), r(n, 4, 64)),
                                      (0, None, None, 0), (1, 2), None),
        # per-sample weights (vmapped weight): one by one
        "weight_vmapped": (full, (r(n, 5, 48), r(n, 48), r(48), r(5, 48)), (0, 0, None, None), (n, n), ref),
    }
    return cases


LAYER_NORM_CASES = list(_layer_norm_cases(3))


@pytest.mark.parametrize("case", LAYER_NORM_CASES)
def test_vmap_of_layer_norm_equals_the_loop(case, kernel_calls, poisoned):
    """LayerNorm (bias and residual) and its vjp under vmap, bit for bit the per-sample loop; the
    per-sample weight and bias gradients are each sample's own sums, not the batch's. Folded: one
    forward call and two backward calls for the batch."""
    n = 3
    f, args, in_dims, calls, ref = _layer_norm_cases(n)[case]
    got = _check_vmap(f, args, in_dims)
    assert (kernel_calls["layer_norm_fwd"] - n, kernel_calls["layer_norm_bwd"] - n) == calls  # (the loop made n)
    for i in range(n):
        if ref is None:
            continue
        # output and every input's gradient (the same cotangents) against float64
        sample = [t.detach().double().requires_grad_() for t in _sample(args, in_dims, i)]
        y, h = layer_norm_reference(*sample[:3], residual=sample[3], compute_dtype=torch.float64)
        want = torch.autograd.grad((y, h), sample, (got[0][i].double() * 0.5 + 1, got[1][i].double()))
        torch.testing.assert_close(got[0][i].double(), y, rtol=1e-5, atol=1e-5)
        for a, e in zip(got[2:], want):
            torch.testing.assert_close(a[i].double(), e, rtol=1e-4, atol=1e-4)
    # the weight gradients differ between samples (not one sum over the batch; hidden 1: xhat = 0, all zero)
    assert not torch.equal(got[3][0], got[3][1]) or case == "hidden_1"


def test_vmap_of_layer_norm_variants():
    """Without bias or weight, with out_dtype, vmapped at the last dim with out_dims 1, chunk_size 2."""
    torch.manual_seed(13)
    x, w = torch.randn(4, 9, 32), torch.randn(32)

    def no_bias(x):
        y, pull = vjp(lambda a, c: mk.layer_norm(a, c), x, w)
        return (y,) + pull(y)

    def no_weight(x):
        y, pull = vjp(lambda a: mk.layer_norm(a, None), x)
        return (y,) + pull(y)

    def out_bf16(x):
        y, pull = vjp(lambda a, c: mk.layer_norm(a, c, out_dtype=torch.bfloat16), x, w)
        return (y,) + pull(y)

    for f in (no_bias, no_weight, out_bf16):
        _check_vmap(f, (x,), (0,))
        _check_vmap(f, (x.movedim(0, -1),), (-1,), 1)
        _check_vmap(f, (x,), (0,), chunk_size=3)


def test_vmap_of_cross_entropy_equals_the_loop(kernel_calls, poisoned):
    """Loss and gradient per sample, bit for bit the loop: the mean over each sample's own non-ignored
    rows (a sample with every target ignored gives NaN, as F.cross_entropy), shared targets with logits
    vmapped at their last dim, bfloat16 logits, vocab 1; against float64."""
    n = 3
    torch.manual_seed(14)

    def f(logits, targets):
        return loss_op.cross_entropy(logits, targets), grad(loss_op.cross_entropy)(logits, targets)

    for vocab in (37, 1):
        logits = torch.randn(n, 6, vocab)
        targets = torch.randint(0, vocab, (n, 6))
        targets[0, 2] = targets[1] = -100  # sample 1: nothing to average
        kernel_calls.clear()
        got = _check_vmap(f, (logits, targets), (0, 0))
        assert (kernel_calls["cross_entropy_fwd"], kernel_calls["cross_entropy_bwd"]) == (2 + 2 * n, 1 + n)
        assert got[0][1].isnan() and not got[0][[0, 2]].isnan().any()
        for i in (0, 2):
            keep = targets[i] != -100
            want = torch.nn.functional.cross_entropy(logits[i][keep].double(), targets[i][keep])
            torch.testing.assert_close(got[0][i].double(), want, rtol=1e-6, atol=1e-6)
        _check_vmap(f, (logits.permute(1, 2, 0), targets[2]), (2, None))
        _check_vmap(f, (logits.bfloat16(), targets), (0, 0))


def test_nested_vmap_folds_both_levels(kernel_calls):
    """vmap(vmap(grad(f))) over 2 x 3 samples: the inner rule's call goes through the outer rule, so one
    call per kernel for all six (LayerNorm's backward: its two calls, each twice through the outer
    rule), each sample's own bits."""
    torch.manual_seed(15)
    k, w = torch.randn(1, 6, 2, 8), torch.randn(48)
    targets = torch.tensor([3, -100, 7, 0])

    def f(q, x, logits):
        return ((mk.alibi_attention(q, k, k) ** 2).sum() + (mk.layer_norm(x, w) ** 2).sum()
                + loss_op.cross_entropy(logits, targets))

    args = (torch.randn(2, 3, 1, 6, 2, 8), torch.randn(2, 3, 5, 48), torch.randn(2, 3, 4, 11))
    with no_fallback_warning():
        got = vmap(vmap(grad(f, argnums=(0, 1, 2))))(*args)
    assert dict(kernel_calls) == {"attention_fwd": 1, "attention_bwd": 1, "layer_norm_fwd": 1, "layer_norm_bwd": 4,
                                  "cross_entropy_fwd": 1, "cross_entropy_bwd": 1}
    for i in range(2):
        for j in range(3):
            want = grad(f, argnums=(0, 1, 2))(*(a[i, j] for a in args))
            for a, b in zip(got, want):
                assert torch.equal(a[i, j], b)


def test_second_derivatives_raise_a_clear_error():
    torch.manual_seed(4)
    x, w = torch.randn(3, 16), torch.randn(16)

    def f(t):
        return mk.layer_norm(t, w).pow(3).sum()

    with pytest.raises(NotImplementedError, match="mpt_kernels::layer_norm_bwd: no second derivative"):
        grad(lambda t: grad(f)(t).sum())(x)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.hessian(f)(x)
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(NotImplementedError, match="mpt_kernels::alibi_attention_bwd: no second derivative"):
        jacrev(jacrev(lambda t: mk.alibi_attention(t, t, t).sum()))(q)


def test_model_gradients_and_per_sample_gradients_under_functional_call(kernel_calls):
    """The model with functional_call: torch.func.grad equals loss.backward(), and vmap(grad) gives each
    sample's gradient (the canonical per-sample-gradient recipe, e.g. for DP-SGD) bit for bit equal to
    a looped loss.backward(), with one call per kernel and layer for the whole batch."""
    from mpt_kernels.model import MPTConfig, MPTForCausalLM

    torch.manual_seed(6)
    m = MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=101, max_seq_len=32,
                                 attn_config={"attn_impl": "flash"}))
    ids = torch.randint(0, 101, (3, 16))
    params = {n: p.detach() for n, p in m.named_parameters()}

    def loss_fn(p, ids):
        return torch.func.functional_call(m, p, (ids,), {"labels": ids}).loss

    g = grad(loss_fn)(params, ids)
    kernel_calls.clear()
    with no_fallback_warning():
        per_sample = vmap(grad(loss_fn), in_dims=(None, 0))(params, ids.unsqueeze(1))
    # per layer: attention once, LayerNorm twice (+ the final norm); the loss once
    assert dict(kernel_calls) == {"attention_fwd": 2, "attention_bwd": 2, "layer_norm_fwd": 5, "layer_norm_bwd": 10,
                                  "cross_entropy_fwd": 1, "cross_entropy_bwd": 1}
    m(ids, labels=ids).loss.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-5, atol=1e-6)
    for i in range(3):
        m.zero_grad(set_to_none=True)
        m(ids[i:i + 1], labels=ids[i:i + 1]).loss.backward()
        for n, p in m.named_parameters():
            assert torch.equal(per_sample[n][i], p.grad), n


@pytest.mark.cuda
def test_grad_on_cuda_equals_backward():
    """The transform twins on CUDA tensors (bfloat16 attention and LayerNorm, float32 loss): torch.func.grad
    runs the same kernels as a plain backward. LayerNorm and the loss are deterministic (bit for bit);
    multi-head attention's dq too (GQA's dk/dv would add float32 atomics in no fixed order)."""
    torch.manual_seed(8)
    dev = "cuda"
    q, k, v = (torch.randn(2, 33, 4, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    x, w = torch.randn(7, 256, device=dev, dtype=torch.bfloat16), torch.randn(256, device=dev, dtype=torch.bfloat16)
    logits, targets = torch.randn(9, 1031, device=dev), torch.randint(0, 1031, (9,), device=dev)
    wa, wl = torch.randn_like(q), torch.randn_like(x)
    cases = [(lambda t: (mk.alibi_attention(t, k, v) * wa).float().sum(), q),
             (lambda t: (mk.layer_norm(t, w) * wl).float().sum(), x),
             (lambda t: loss_op.cross_entropy(t, targets), logits)]
    for f, t in cases:
        g = grad(f)(t)
        ta = t.clone().requires_grad_()
        f(ta).backward()
        assert torch.equal(g, ta.grad)
