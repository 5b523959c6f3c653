"""The ops under torch.func's reverse-mode transforms (grad, vjp, jacrev, vmap of grad) and the model
under functional_call: the kernels run (through the ops' ``transform_function`` twins), the
gradients match float64 references and plain autograd, and what is not supported (second
derivatives, forward mode) raises a clear error instead of torch's generic refusal."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import grad, jacrev, vjp, vmap

import mpt_kernels as mk
from mpt_kernels.ops import attention as attn_op
from mpt_kernels.ops import layernorm as ln_op
from mpt_kernels.ops import loss as loss_op
from mpt_kernels.ops.reference import attention_reference, layer_norm_reference

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


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


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_gradients_with_vmap_of_grad(name):
    """vmap(grad(f)) over a batch of inputs equals a loop of single-input gradients."""
    ours, _, x, _ = _cases()[name]
    xs = torch.stack([x, x.flip(0), 0.5 * x])
    got = vmap(grad(ours))(xs)
    for i in range(3):
        torch.testing.assert_close(got[i], grad(ours)(xs[i]), rtol=1e-6, atol=1e-7)


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


def test_model_gradients_and_per_sample_gradients_under_functional_call():
    """The model with functional_call: torch.func.grad equals loss.backward(), and vmap(grad) gives each
    sample's gradient (the canonical per-sample-gradient recipe, e.g. for DP-SGD)."""
    from mpt_kernels.model import MPTConfig, MPTForCausalLM

    torch.manual_seed(6)
    m = MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=101, max_seq_len=32,
                                 attn_config={"attn_impl": "flash"}))
    ids = torch.randint(0, 101, (3, 16))
    params = {n: p.detach() for n, p in m.named_parameters()}

    def loss_fn(p, ids):
        return torch.func.functional_call(m, p, (ids,), {"labels": ids}).loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = grad(loss_fn)(params, ids)
        per_sample = vmap(grad(loss_fn), in_dims=(None, 0))(params, ids.unsqueeze(1))
    m(ids, labels=ids).loss.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-5, atol=1e-6)
    for i in range(3):
        m.zero_grad(set_to_none=True)
        m(ids[i:i + 1], labels=ids[i:i + 1]).loss.backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-5, atol=1e-6)


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
