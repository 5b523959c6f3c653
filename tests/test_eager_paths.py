"""The ops' eager autograd.Function twins (``_ext.eager_function``) against their custom ops.

Plain eager calls that record a gradient run the op's body and registered formula through an
``autograd.Function`` (no custom-op dispatch). Anything that intercepts ops still takes the custom
op: here a pass-through torch-function mode forces it. Both must give the
same outputs and gradients bit for bit (the same kernels on the same inputs), with every output
buffer the ops allocate NaN-filled first (an unwritten element would show as a NaN on one path or
both; ``_same`` also requires no NaN where the inputs have none), and a backward through the
backward must raise on both."""
from __future__ import annotations

import pytest
import torch

import mpt_kernels as mk
from mpt_kernels.ops import attention as att_op
from mpt_kernels.ops import layernorm as ln_op
from mpt_kernels.ops import loss as loss_op


class _Passthrough(torch.overrides.TorchFunctionMode):
    """Changes nothing, but an active mode sends the ops to their torch.library custom ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def alloc(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ln_op, "_alloc", alloc)
    monkeypatch.setattr(loss_op, "_alloc", alloc)
    monkeypatch.setattr(att_op, "_empty", alloc)


def _run(fn, inputs, grads, through_op):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    if through_op:
        with _Passthrough():
            outs = fn(*leaves)
    else:
        outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.manual_seed(1234)  # the same upstream gradients on both paths
    torch.autograd.backward(outs, grads(outs))
    return [o.detach() for o in outs], [t.grad for t in leaves if t.requires_grad]


def _same(fn, inputs, grads, spy):
    """fn's outputs and gradients, eager path vs custom op; ``spy`` (module, Function) proves the
    eager run took the Function."""
    mod, name = spy
    fn_cls = getattr(mod, name)
    hits = []
    real = fn_cls.apply
    try:
        fn_cls.apply = lambda *a: hits.append(1) or real(*a)
        eager = _run(fn, inputs, grads, through_op=False)
        assert hits, f"{name} was not used"
        hits.clear()
        op = _run(fn, inputs, grads, through_op=True)
        assert not hits, f"{name} was used under a torch-function mode"
    finally:
        fn_cls.apply = real
    for a, b in zip(eager[0] + eager[1], op[0] + op[1]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert not a.isnan().any() and torch.equal(a, b)  # finite inputs: a NaN is an unwritten element


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_eager_equals_op(dtype, residual):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 96, dtype=dtype, requires_grad=True)
    w, b = torch.randn(96, dtype=dtype, requires_grad=True), torch.randn(96, dtype=dtype, requires_grad=True)
    r = torch.randn(3, 7, 96, dtype=dtype, requires_grad=True)
    if residual:
        _same(lambda x, w, b, r: mk.layer_norm(x, w, b, residual=r), (x, w, b, r),
              lambda outs: [torch.randn_like(o) for o in outs], (ln_op, "_LayerNormEager"))
    else:
        _same(lambda x, w, b: mk.layer_norm(x, w, b), (x, w, b), lambda outs: [torch.randn_like(outs[0])],
              (ln_op, "_LayerNormEager"))


def test_layer_norm_eager_mixed_precision_equals_op():
    """A bf16 branch into a float32 residual stream, bf16 output of a float32 input (autocast model)."""
    torch.manual_seed(1)
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(5, 64, requires_grad=True)
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    _same(lambda x, r, w, b: mk.layer_norm(x, w, b, residual=r), (x, r, w, b),
          lambda outs: [torch.randn_like(o) for o in outs], (ln_op, "_LayerNormEager"))
    xf = torch.randn(5, 64, requires_grad=True)
    _same(lambda x, w: mk.layer_norm(x, w, out_dtype=torch.bfloat16), (xf, w),
          lambda outs: [torch.randn_like(outs[0])], (ln_op, "_LayerNormEager"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_eager_equals_op(dtype):
    torch.manual_seed(2)
    q = torch.randn(2, 37, 4, 32, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 37, 2, 32, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 37, 2, 32, dtype=dtype, requires_grad=True)
    _same(lambda q, k, v: mk.alibi_attention(q, k, v), (q, k, v), lambda outs: [torch.randn_like(outs[0])],
          (att_op, "_AttentionEager"))
    # varlen
    qv, kv, vv = (t.detach()[0].requires_grad_() for t in (q, k, v))
    cu = torch.tensor([0, 5, 20, 37], dtype=torch.int32)
    _same(lambda q, k, v: mk.alibi_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu), (qv, kv, vv),
          lambda outs: [torch.randn_like(outs[0])], (att_op, "_AttentionEager"))


@pytest.mark.parametrize("varlen", [False, True])
def test_packed_attention_eager_equals_op(varlen):
    torch.manual_seed(3)
    H, Hkv, D = 4, 2, 32
    if varlen:
        qkv = torch.randn(41, (H + 2 * Hkv) * D, requires_grad=True)
        cu = torch.tensor([0, 9, 30, 41], dtype=torch.int32)
        fn = lambda t: mk.alibi_attention_qkvpacked(t, H, Hkv, cu_seqlens=cu)  # noqa: E731
    else:
        qkv = torch.randn(2, 29, (H + 2 * Hkv) * D, requires_grad=True)
        fn = lambda t: mk.alibi_attention_qkvpacked(t, H, Hkv)  # noqa: E731
    _same(fn, (qkv,), lambda outs: [torch.randn_like(outs[0])], (att_op, "_PackedAttentionEager"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_eager_equals_op(dtype):
    torch.manual_seed(4)
    logits = torch.randn(33, 517, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 517, (33,))
    targets[::5] = -100
    _same(lambda lg: loss_op.cross_entropy(lg, targets), (logits,), lambda outs: [torch.tensor(1.7)],
          (loss_op, "_CrossEntropyEager"))


def test_eager_paths_refuse_a_double_backward():
    """As the custom ops (no autograd formula for their backward), the eager Functions are once
    differentiable: a gradient of a gradient raises instead of coming back silently wrong."""
    torch.manual_seed(5)
    x = torch.randn(4, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    (g,) = torch.autograd.grad(mk.layer_norm(x, w).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
    qkv = torch.randn(1, 8, 3 * 2 * 16, requires_grad=True)
    (g,) = torch.autograd.grad(mk.alibi_attention_qkvpacked(qkv, 2).pow(2).sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
    logits = torch.randn(6, 11, requires_grad=True)
    (g,) = torch.autograd.grad(loss_op.cross_entropy(logits, torch.arange(6)), logits, create_graph=True)
    with pytest.raises(RuntimeError):
        g.pow(2).sum().backward()


def test_model_training_step_eager_equals_op():
    """A whole model's loss and every parameter gradient: eager Functions vs custom ops."""
    from mpt_kernels.model import MPTConfig, MPTForCausalLM

    torch.manual_seed(6)
    m = MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=101, max_seq_len=32,
                                 attn_config={"attn_impl": "flash"}))
    ids = torch.randint(0, 101, (2, 16))

    def step(through_op):
        m.zero_grad(set_to_none=True)
        if through_op:
            with _Passthrough():
                loss = m(ids, labels=ids).loss
                loss.backward()
        else:
            loss = m(ids, labels=ids).loss
            loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    a, b = step(False), step(True)
    assert torch.equal(a[0], b[0])
    for ga, gb in zip(a[1], b[1]):
        assert torch.equal(ga, gb)


@pytest.mark.cuda
def test_eager_paths_equal_ops_on_cuda():
    """The same on CUDA for the deterministic kernels: LayerNorm (bf16, residual, bias), the loss, and
    multi-head packed attention (its dq, dk, dv are bitwise reproducible; GQA/MQA add dk/dv with
    float32 atomics in no fixed order, so they are left out here)."""
    torch.manual_seed(7)
    dev = "cuda"
    x = torch.randn(3, 7, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(3, 7, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    _same(lambda x, w, b, r: mk.layer_norm(x, w, b, residual=r), (x, w, b, r),
          lambda outs: [torch.randn_like(o) for o in outs], (ln_op, "_LayerNormEager"))
    logits = torch.randn(33, 1031, device=dev, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 1031, (33,), device=dev)
    _same(lambda lg: loss_op.cross_entropy(lg, targets), (logits,), lambda outs: [torch.tensor(1.3, device=dev)],
          (loss_op, "_CrossEntropyEager"))
    qkv = torch.randn(2, 70, 3 * 4 * 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    _same(lambda t: mk.alibi_attention_qkvpacked(t, 4), (qkv,), lambda outs: [torch.randn_like(outs[0])],
          (att_op, "_PackedAttentionEager"))
