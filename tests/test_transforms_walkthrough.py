"""The public ops under torch's execution modes and transforms, where earlier tests did not look:
gradients of gradients, torch.func, checkpointing, optimizer state round trips."""
from __future__ import annotations

import contextlib

import pytest
import torch

import mpt_kernels as mk
from mpt_kernels.ops.loss import cross_entropy
from test_eager_paths import _Passthrough  # an active mode sends the ops to their custom ops


def _gradient_penalty_cases():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    qkv = torch.randn(1, 4, 3 * 2 * 8)
    x, w = torch.randn(3, 8), torch.randn(8)
    logits = torch.randn(3, 8)
    return {
        "attention": (lambda t: mk.alibi_attention(t, k, v).sum(), q),
        "qkvpacked": (lambda t: mk.alibi_attention_qkvpacked(t, 2).sum(), qkv),
        "layer_norm": (lambda t: (mk.layer_norm(t, w) * torch.arange(8.0)).sum(), x),
        "cross_entropy": (lambda t: cross_entropy(t, torch.tensor([1, 2, 3])), logits),
    }


@pytest.mark.parametrize("through_op", [False, True])
@pytest.mark.parametrize("name", ["attention", "qkvpacked", "layer_norm", "cross_entropy"])
def test_gradient_penalty_raises_instead_of_dropping_the_second_order_term(name, through_op):
    """loss + |dloss/dx|^2 with create_graph=True: the penalty's gradient needs a backward through the
    ops' backward, which they do not have. The incoming gradient (ones from a sum or a scalar loss)
    does not require grad, so once_differentiable alone returned a gradient detached from x, and the
    penalty term silently contributed nothing to x.grad. Both paths must raise."""
    f, x0 = _gradient_penalty_cases()[name]
    x = x0.clone().requires_grad_()
    with (_Passthrough() if through_op else contextlib.nullcontext()):
        loss = f(x)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    assert g.requires_grad  # attached to x: a backward through it reaches the refusal below
    with pytest.raises(RuntimeError, match="no autograd formula"):
        (loss + g.pow(2).sum()).backward()


@pytest.mark.parametrize("name", ["attention", "qkvpacked", "layer_norm", "cross_entropy"])
def test_create_graph_first_order_gradient_is_right(name):
    """create_graph=True only to keep the graph: the first-order gradient equals the plain one."""
    f, x0 = _gradient_penalty_cases()[name]
    x = x0.clone().requires_grad_()
    (g1,) = torch.autograd.grad(f(x), x, create_graph=True)
    (g0,) = torch.autograd.grad(f(x), x)
    assert torch.equal(g1.detach(), g0)


def test_vmap_over_a_dim_after_head_dim_copies_the_operands():
    """vmap over the last dim: each sample's head_dim is strided, so q and k are copied for the
    kernels; that copy used to be ``torch.empty(...).copy_(t)``, which vmap refuses (an unbatched
    tensor cannot take a batched copy). Values and gradients equal per-sample calls."""
    from mpt_kernels.ops.reference import attention_reference

    torch.manual_seed(1)
    q = torch.randn(2, 5, 4, 8, 3, requires_grad=True)
    k = torch.randn(2, 5, 2, 8, 3)
    v = torch.randn(2, 5, 2, 8)
    out = torch.func.vmap(lambda a, b: mk.alibi_attention(a, b, v), in_dims=(4, 4))(q, k)
    qr = q.detach().double().requires_grad_()
    slopes = mk.alibi_slopes(4).double()
    ref = torch.stack([attention_reference(qr[..., i], k[..., i].double(), v.double(), alibi_slopes=slopes)
                       for i in range(3)])
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(q.grad, qr.grad.float(), rtol=1e-5, atol=1e-5)


def test_compiled_model_mask_shape_check_with_a_dynamic_sequence_length():
    """After a second shape, torch.compile marks the sequence length dynamic while a new mask's shape
    stays static; Dynamo evaluated ``mask.shape[1] not in (S, past + S)`` as True there, so the model
    raised "attention_mask: expected shape (2, 16), got (2, 16)" (fullgraph=True; with graph breaks,
    the frame fell back to eager). Now fullgraph=True stops at the documented data-dependent read of
    the mask, and a mask of the wrong shape is still refused."""
    from mpt_kernels.model import MPTConfig, MPTForCausalLM

    torch._dynamo.reset()
    torch.manual_seed(2)
    m = MPTForCausalLM(MPTConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=50, max_seq_len=32,
                                 attn_config={"attn_impl": "flash"}))
    cm = torch.compile(m, backend="eager", fullgraph=True)
    cm(torch.randint(0, 50, (2, 16)))
    cm(torch.randint(0, 50, (3, 11)))  # recompiles with dynamic sizes
    ids, mask = torch.randint(0, 50, (2, 16)), torch.ones(2, 16, dtype=torch.long)
    mask[0, :5] = 0
    with pytest.raises(Exception) as err:
        cm(ids, attention_mask=mask)
    assert "attention_mask: expected shape" not in str(err.value)
    cm = torch.compile(m, backend="eager")
    torch.testing.assert_close(cm(ids, attention_mask=mask).logits, m(ids, attention_mask=mask).logits)
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        cm(ids, attention_mask=mask[:, :15])
    torch._dynamo.reset()


def _lion_model():
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))


def _lion_train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 8, generator=g)).pow(2).sum().backward()
        opt.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_lion_copies_keep_clipping_skipping_and_the_skipped_count(how):
    """torch's Optimizer.__getstate__ keeps defaults, state and param_groups only: a deepcopy (or a
    pickle) of Lion came back with max_grad_norm=None and skip_nonfinite=False (no clipping, silently:
    the copy's trajectory left the original's) and skipped_steps reset to 0."""
    import copy
    import pickle

    model = _lion_model()
    opt = mk.optim.Lion(model.parameters(), lr=1e-2, max_grad_norm=0.5)
    _lion_train(model, opt, 2, seed=1)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert opt.skipped_steps == 1
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.max_grad_norm == 0.5 and opt2.skip_nonfinite and opt2.skipped_steps == 1
    _lion_train(model, opt, 2, seed=2)
    _lion_train(model2, opt2, 2, seed=2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for p in model2.parameters():
        p.grad = torch.full_like(p, float("inf"))
    opt2.step()
    assert opt2.skipped_steps == 2 and opt.skipped_steps == 1  # counters not shared


def test_lion_load_of_a_torch_style_state_dict_keeps_the_constructor_options():
    """A lion-pytorch / torch-style state dict has no decoupled_weight_decay, state_dtype,
    stochastic_rounding or seed. torch replaces each group by the saved one and __setstate__ filled
    in the class defaults: a Lion(decoupled_weight_decay=False, weight_decay=0.1) loading lion-pytorch's
    dict switched to the decoupled decay, 10% of the weights a step instead of lr * 0.1."""
    p = torch.nn.Parameter(torch.randn(64))
    opt = mk.optim.Lion([p], lr=1e-3, weight_decay=0.1, decoupled_weight_decay=False, state_dtype=torch.bfloat16,
                        stochastic_rounding=False, seed=7)
    sd = {"state": {0: {"exp_avg": torch.randn(64)}},
          "param_groups": [{"lr": 2e-3, "betas": (0.9, 0.99), "weight_decay": 0.1, "params": [0]}]}
    opt.load_state_dict(sd)
    g = opt.param_groups[0]
    assert (g["decoupled_weight_decay"], g["state_dtype"], g["stochastic_rounding"], g["seed"]) == (
        False, torch.bfloat16, False, 7)
    assert g["lr"] == 2e-3 and g["initial_lr"] == 2e-3 and g["step"] == 0  # the saved run's values
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    assert "decoupled_weight_decay" not in sd["param_groups"][0]  # the caller's dict is left alone
    p0 = p.detach().clone()
    p.grad = torch.zeros(64)
    opt.step()
    expected = p0 * (1 - 2e-3 * 0.1) - 2e-3 * torch.sign(sd["state"][0]["exp_avg"].bfloat16().float() * 0.9)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
