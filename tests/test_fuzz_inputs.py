"""Random inputs, valid and not, through the public ops on the CPU: every call either returns what the
float64 reference computes or raises ValueError / TypeError naming the problem; never a crash, a
hang, a torch-internal error or a silent wrong answer. Shapes mix zeros, odd sizes, tile boundaries,
every dtype the ops take and some they refuse, non-contiguous views, broken cu_seqlens and slopes.
Seeds are fixed (a failure names its seed); tests/run_sanitized.sh runs this file under ASan, where a
read past a buffer fails too.

Tolerances: float32 1e-4, bfloat16 / float16 3e-2 (absolute, on outputs of magnitude ~1), as
tests/test_attention.py for the same sizes.
"""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpt_kernels as mk
from mpt_kernels.ops import reference as ref
from mpt_kernels.ops.loss import cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")

CLEAR = (ValueError, TypeError)
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32]


def _maybe_strided(t: torch.Tensor, rnd: random.Random) -> torch.Tensor:
    """t itself, or the same values in a non-contiguous layout (leading axes or, rarely, the last)."""
    c = rnd.random()
    if c < 0.6 or t.dim() < 2:
        return t
    if c < 0.8:  # every other row of a twice-as-long tensor: leading-axis stride
        big = torch.empty((t.shape[0] * 2, *t.shape[1:]), dtype=t.dtype)
        big[::2] = t
        return big[::2]
    if c < 0.9:  # last axis strided
        big = torch.empty((*t.shape[:-1], t.shape[-1] * 2), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)  # last axis stride != 1 (for dim >= 2)


def _randn(shape, dtype, g):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-3, 4, shape, generator=g).to(dtype)


def _check_attention_result(out, q, k, v, *, causal, scale, slopes, cu=None):
    """out against the float64 reference (per segment for varlen)."""
    tol = TOL[q.dtype]
    if cu is None:
        want = ref.attention_reference(q.double(), k.double(), v.double(), causal=causal, softmax_scale=scale,
                                       alibi_slopes=slopes.double())
        # rows that see no key (causal with seqlen_q > seqlen_k is refused; an empty key set gives zeros)
        want = torch.nan_to_num(want, nan=0.0)
    else:
        cq, ck = cu
        want = torch.zeros(q.shape, dtype=torch.float64)
        for b in range(len(cq) - 1):
            qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
            if cq[b + 1] == cq[b]:
                continue
            s = slopes[b] if slopes.dim() == 2 else slopes
            seg = ref.attention_reference(q[None, qs].double(), k[None, ks].double(), v[None, ks].double(),
                                          causal=causal, softmax_scale=scale, alibi_slopes=s.double())[0]
            want[qs] = torch.nan_to_num(seg, nan=0.0)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("seed", range(60))
def test_attention_random_inputs(seed):
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B = rnd.choice([0, 1, 2, 3])
    Sq = rnd.choice([0, 1, 5, 64, 65, 193])
    Sk = rnd.choice([Sq, Sq, Sq + rnd.choice([0, 1, 63, 200]), max(Sq - 1, 0), 0])
    H = rnd.choice([1, 2, 3, 4, 6])
    Hkv = rnd.choice([H, H, 1, 2, 4])
    D = rnd.choice([1, 7, 8, 64, 72, 128, 256, 257, 0])
    dt = rnd.choice(DTYPES[:3] * 3 + DTYPES[3:])
    causal = rnd.random() < 0.7
    scale = rnd.choice([None, 0.3, 1.0])
    slope_kind = rnd.choice(["default", "default", "batch", "zeros", "wrong_len", "wrong_dtype"])
    q = _maybe_strided(_randn((B, Sq, H, D), dt, g), rnd)
    k = _maybe_strided(_randn((B, Sk, Hkv, D), dt, g), rnd)
    v = _maybe_strided(_randn((B, Sk, Hkv, D), dt, g), rnd)
    slopes = {"default": None, "batch": torch.rand(B, H, generator=g), "zeros": torch.zeros(H),
              "wrong_len": torch.rand(H + 1, generator=g), "wrong_dtype": torch.rand(H, generator=g).double()}[slope_kind]
    want_ok = (dt in TOL and D in range(1, 257) and H % Hkv == 0 and not (causal and Sq > Sk)
               and slope_kind not in ("wrong_len", "wrong_dtype"))
    try:
        out = mk.alibi_attention(q, k, v, causal=causal, softmax_scale=scale, alibi_slopes=slopes)
    except CLEAR:
        assert not want_ok, f"seed {seed}: a valid call raised"
        return
    assert want_ok, f"seed {seed}: an invalid call returned"
    s = slopes if slopes is not None else mk.alibi_slopes(H)
    _check_attention_result(out, q, k, v, causal=causal, scale=scale or 1 / math.sqrt(D), slopes=s)
    if dt == torch.float32 and q.numel() and k.numel():  # gradients exist and are finite
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        mk.alibi_attention(qq, kk, vv, causal=causal, softmax_scale=scale, alibi_slopes=slopes).sum().backward()
        for t in (qq, kk, vv):
            assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all(), f"seed {seed}"


@pytest.mark.parametrize("seed", range(40))
def test_varlen_attention_random_cu_seqlens(seed):
    rnd = random.Random(1000 + seed)
    g = torch.Generator().manual_seed(1000 + seed)
    n = rnd.choice([1, 2, 3, 5])
    lens_q = [rnd.choice([0, 1, 3, 64, 65, 130]) for _ in range(n)]
    lens_k = [lq + rnd.choice([0, 0, 2]) for lq in lens_q]
    H, D, dt = rnd.choice([1, 2, 4]), rnd.choice([8, 40, 64]), rnd.choice(DTYPES[:3])
    causal = rnd.random() < 0.7
    cq = [0] + list(torch.tensor(lens_q).cumsum(0).tolist())
    ck = [0] + list(torch.tensor(lens_k).cumsum(0).tolist())
    q = _randn((cq[-1], H, D), dt, g)
    k = _randn((ck[-1], H, D), dt, g)
    v = _randn((ck[-1], H, D), dt, g)
    breakage = rnd.choice(["none", "none", "none", "decreasing", "past_end", "short_end", "int64", "max_small",
                           "max_big", "q_longer"])
    cu_q, cu_k = torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32)
    max_q, max_k = None, None
    if breakage == "decreasing" and n > 1:
        cu_q[1], cu_q[2] = cu_q[2] + 1, cu_q[1]
    elif breakage == "past_end":
        cu_k[-1] += 5
    elif breakage == "short_end" and cq[-1] > 0:
        cu_q[-1] -= 1
    elif breakage == "int64":
        cu_q = cu_q.long()
    elif breakage == "max_small" and max(lens_q) > 1:
        max_q = max(lens_q) - 1
    elif breakage == "max_big":
        max_q, max_k = max(lens_q) + 7, max(lens_k) + 7  # an upper bound is allowed
    elif breakage == "q_longer" and causal and any(lens_q):
        cu_k = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0).tolist()), dtype=torch.int32)
        cu_q = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0).tolist()), dtype=torch.int32)
        q, k, v = _randn((int(cu_q[-1]), H, D), dt, g), _randn((int(cu_k[-1]), H, D), dt, g), _randn((int(cu_k[-1]), H, D), dt, g)
    cq2, ck2 = cu_q.tolist(), cu_k.tolist()
    valid = (cu_q.dtype == torch.int32 and cq2 == sorted(cq2) and ck2 == sorted(ck2) and cq2[0] == 0 and ck2[0] == 0
             and cq2[-1] <= q.shape[0] and ck2[-1] <= k.shape[0]  # rows past the last sequence: zeros
             and (max_q is None or max_q >= max(b - a for a, b in zip(cq2, cq2[1:])))
             and not (causal and any((b - a) > (d - c) for a, b, c, d in zip(cq2, cq2[1:], ck2, ck2[1:]))))
    try:
        out = mk.alibi_attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                 max_seqlen_q=max_q, max_seqlen_k=max_k)
    except CLEAR:
        assert not valid, f"seed {seed} ({breakage}): a valid call raised"
        return
    assert valid, f"seed {seed} ({breakage}): an invalid call returned"
    _check_attention_result(out, q, k, v, causal=causal, scale=1 / math.sqrt(D), slopes=mk.alibi_slopes(H),
                            cu=(cq2, ck2))


@pytest.mark.parametrize("seed", range(40))
def test_layer_norm_random_inputs(seed):
    rnd = random.Random(2000 + seed)
    g = torch.Generator().manual_seed(2000 + seed)
    rows = rnd.choice([0, 1, 3, 17, 256])
    lead = rnd.choice([(rows,), (2, rows), ()])
    N = rnd.choice([1, 7, 8, 64, 257, 768, 0])
    dt = rnd.choice(DTYPES[:3] * 3 + DTYPES[3:])
    x = _maybe_strided(_randn((*lead, N), dt, g) * 3 + 1, rnd)
    wkind = rnd.choice(["ok", "ok", "ok", "wrong_len", "2d", "other_dtype"])
    w = {"ok": torch.rand(N, generator=g).to(dt if dt.is_floating_point else torch.float32) + 0.5,
         "wrong_len": torch.rand(N + 1, generator=g), "2d": torch.rand(1, N, generator=g),
         "other_dtype": torch.rand(N, generator=g).double()}[wkind]
    b = rnd.choice([None, torch.randn(N, generator=g).to(w.dtype) if w.dim() == 1 else None])
    use_res = rnd.random() < 0.3
    res = _randn(x.shape, dt, g) if use_res else None
    eps = rnd.choice([1e-5, 1e-2])
    valid = dt in TOL and wkind in ("ok",) and w.dtype in (dt, torch.float32)  # a strided x is copied
    either = valid and N == 0  # no features: an empty result or a ValueError
    try:
        y = mk.layer_norm(x, w, b, eps=eps, residual=res)
    except CLEAR:
        assert not valid or either, f"seed {seed}: a valid call raised"
        return
    assert valid, f"seed {seed}: an invalid call returned"
    if use_res:
        y, h = y
        torch.testing.assert_close(h.double(), (x.double() + res.double()).to(h.dtype).double(), atol=TOL[dt], rtol=TOL[dt])
        src = x.double() + res.double()
    else:
        src = x.double()
    want = F.layer_norm(src, (N,), w.double(), None if b is None else b.double(), eps)
    assert y.shape == x.shape
    torch.testing.assert_close(y.double(), want, atol=TOL[dt] * 4, rtol=TOL[dt])


@pytest.mark.parametrize("seed", range(40))
def test_cross_entropy_random_inputs(seed):
    rnd = random.Random(3000 + seed)
    g = torch.Generator().manual_seed(3000 + seed)
    rows = rnd.choice([0, 1, 5, 64])
    V = rnd.choice([1, 7, 8, 4096, 4097, 0])
    dt = rnd.choice(DTYPES[:3] * 3 + DTYPES[3:])
    logits = _maybe_strided(_randn((rows, V), dt, g) * 4, rnd)
    tkind = rnd.choice(["ok", "ok", "ignored", "out_of_range", "float", "wrong_len"])
    hi = max(V, 1)
    targets = {"ok": torch.randint(0, hi, (rows,), generator=g),
               "ignored": torch.where(torch.rand(rows, generator=g) < 0.5, -100, torch.randint(0, hi, (rows,), generator=g)),
               "out_of_range": torch.full((rows,), V + 3), "float": torch.zeros(rows),
               "wrong_len": torch.zeros(rows + 1, dtype=torch.long)}[tkind]
    # a strided vocab axis is copied; an empty batch may have an empty vocab
    # (targets outside [0, V): ValueError on the CPU, as torch; CUDA gives NaN instead of a host sync)
    valid = dt in TOL and (V > 0 or rows == 0) and (tkind in ("ok", "ignored") or (tkind == "out_of_range" and rows == 0))
    try:
        loss = cross_entropy(logits, targets)
    except CLEAR:
        assert not valid, f"seed {seed}: a valid call raised"
        return
    assert valid, f"seed {seed}: an invalid call returned"
    want = F.cross_entropy(logits.double(), targets, ignore_index=-100) if rows else torch.tensor(float("nan"))
    if torch.isnan(want):
        assert torch.isnan(loss)
    else:
        torch.testing.assert_close(loss.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(40))
def test_few_rows_linear_random_inputs(seed):
    """The decode-step product: rows 0-10 (at most 8 valid), odd and vector-boundary widths, mixed or
    refused dtypes, strided views, wrong bias shapes."""
    from mpt_kernels.ops.linear import few_rows_linear

    rnd = random.Random(3500 + seed)
    g = torch.Generator().manual_seed(3500 + seed)
    M, K, N = rnd.choice([0, 1, 2, 3, 4, 7, 8, 9, 10]), rnd.choice([0, 1, 8, 15, 16, 17, 100]), rnd.choice([0, 1, 5, 9, 70])
    dt = rnd.choice(DTYPES[:3] * 3 + DTYPES[3:])
    wdt = dt if rnd.random() < 0.85 else rnd.choice(DTYPES)
    x = _maybe_strided(_randn((M, K), dt, g), rnd)
    w = _maybe_strided(_randn((N, K), wdt, g) * 0.3, rnd)
    bkind = rnd.choice(["none", "ok", "ok", "wrong_len", "wrong_dtype"])
    b = {"none": None, "ok": _randn((N,), dt, g), "wrong_len": _randn((N + 1,), dt, g),
         "wrong_dtype": _randn((N,), torch.float64 if dt != torch.float64 else torch.float32, g)}[bkind]
    valid = dt in TOL and w.dtype == dt and M <= 8 and bkind in ("none", "ok")  # (int weights * 0.3: float32)
    try:
        y = few_rows_linear(x, w, b)
    except CLEAR:
        assert not valid, f"seed {seed}: a valid call raised"
        return
    assert valid, f"seed {seed}: an invalid call returned"
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.dtype == dt and y.shape == want.shape
    torch.testing.assert_close(y.double(), want, atol=TOL[dt] * max(1.0, math.sqrt(K)), rtol=TOL[dt])


@pytest.mark.parametrize("seed", range(30))
def test_lion_random_parameters(seed):
    rnd = random.Random(4000 + seed)
    g = torch.Generator().manual_seed(4000 + seed)
    params = []
    for _ in range(rnd.choice([1, 2, 5])):
        shape = rnd.choice([(0,), (1,), (7,), (33, 5), (1024,), (3, 0, 2), (1025, 3)])
        dt = rnd.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
        p = torch.randn(shape, generator=g).to(dt)
        p.grad = torch.randn(shape, generator=g).to(dt) if rnd.random() < 0.9 else None
        params.append(torch.nn.Parameter(p, requires_grad=True))
        params[-1].grad = p.grad
    clip = rnd.choice([None, 1.0, 1e-3])
    lr, wd = rnd.choice([1e-3, 0.1]), rnd.choice([0.0, 0.1])
    before = [p.detach().clone() for p in params]
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    valid = all(p.dtype in (torch.float32, torch.bfloat16) for p in params if p.grad is not None)
    try:
        opt = mk.optim.Lion(params, lr=lr, betas=(0.9, 0.99), weight_decay=wd, max_grad_norm=clip,
                            stochastic_rounding=False)
        opt.step()
    except CLEAR:
        assert not valid, f"seed {seed}: a valid call raised"
        return
    assert valid, f"seed {seed}: float16 parameters were taken"
    # reference: clip by the global float32 norm, then one Lion step from a zero momentum; decoupled
    # weight decay (the default): p * (1 - weight_decay) at the initial lr; the new momentum holds the
    # clipped gradient
    norm = math.sqrt(sum(float(gr.double().pow(2).sum()) for gr in grads if gr is not None))
    factor = 1.0 if clip is None or norm <= clip else clip / (norm + 1e-6)
    for p, p0, gr in zip(params, before, grads):
        if gr is None:
            assert torch.equal(p.detach(), p0), f"seed {seed}: a parameter without a gradient moved"
            continue
        c = (1 - 0.9) * gr.double() * factor  # beta1 * m (= 0) + (1 - beta1) * g
        want = p0.double() * (1 - wd) - lr * torch.sign(c)
        sure = c.abs() > 1e-6  # sign() of a value near 0 may flip with rounding
        tol = 1e-6 if p.dtype == torch.float32 else 2 ** -8 * want.abs() + 1e-6  # one bf16 rounding
        err = (p.detach().double() - want).abs()
        assert bool((err <= tol)[sure].all()), f"seed {seed}: max error {float(err[sure].max())}"
        # the momentum carries the clipped gradient's scale, which the sign above cannot show:
        # m = beta2 * 0 + (1 - beta2) * g * factor (float32 state)
        m = opt.state[p]["exp_avg"].double()
        m_want = (1 - 0.99) * gr.double() * factor
        torch.testing.assert_close(m, m_want, rtol=1e-5, atol=1e-9, msg=lambda e: f"seed {seed}: momentum: {e}")


@pytest.mark.parametrize("seed", range(24))
def test_model_random_configs_masks_and_caches(seed):
    """A random small MPT (heads, GQA/MQA, qk LayerNorm, biases, clip_qkv, alibi_bias_max), random batch
    with left / right padding or packed documents: the kernel path's logits at real tokens, loss and
    gradients equal the dense torch path's; a left-padded prompt prefilled in random chunks into a
    cache, then decoded, gives the full forward's logits."""
    from mpt_kernels.model import MPTConfig, MPTForCausalLM

    rnd = random.Random(5000 + seed)
    torch.manual_seed(5000 + seed)
    H = rnd.choice([1, 2, 4, 6])
    kv = rnd.choice([h for h in (1, 2, H) if H % h == 0])
    head_dim = rnd.choice([8, 16, 24])
    attn = dict(attn_type="grouped_query_attention" if kv != H else "multihead_attention", kv_n_heads=kv,
                qk_ln=rnd.random() < 0.3, clip_qkv=rnd.choice([None, None, 2.0]),
                alibi_bias_max=rnd.choice([8, 16]))
    if kv == H:
        attn.pop("kv_n_heads")
    cfg = MPTConfig(d_model=H * head_dim, n_heads=H, n_layers=rnd.choice([1, 2]), vocab_size=rnd.choice([64, 101]),
                    max_seq_len=64, no_bias=rnd.random() < 0.7, attn_config=dict(attn_impl="flash", **attn))
    a = MPTForCausalLM(cfg)
    with torch.no_grad():
        for n, p in a.named_parameters():
            if "norm" in n or "_ln" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
    b = MPTForCausalLM(cfg.replace(attn_impl="torch"))
    b.load_state_dict(a.state_dict())
    B, S = rnd.choice([1, 2, 3]), rnd.choice([1, 5, 17, 40])
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    kind = rnd.choice(["none", "left", "right", "packed"])
    kw, real = {}, torch.ones(B, S, dtype=torch.bool)
    if kind in ("left", "right") and S > 1:
        n_real = torch.randint(1, S + 1, (B,))
        pos = torch.arange(S)[None]
        real = pos >= (S - n_real[:, None]) if kind == "left" else pos < n_real[:, None]
        kw["attention_mask"] = real.long()
    elif kind == "packed":
        kw["sequence_id"] = torch.sort(torch.randint(0, 3, (B, S)), dim=1).values
    labels = ids.masked_fill(~real, -100)
    la, lb = a(ids, labels=labels, **kw), b(ids, labels=labels, **kw)
    torch.testing.assert_close(la.logits[real], lb.logits[real], atol=1e-4, rtol=0, msg=f"seed {seed}")
    if bool(torch.isfinite(lb.loss)):
        torch.testing.assert_close(la.loss, lb.loss, atol=1e-4, rtol=0)
        ga = torch.autograd.grad(la.loss, list(a.parameters()))
        gb = torch.autograd.grad(lb.loss, list(b.parameters()))
        for (n, _), x, y in zip(a.named_parameters(), ga, gb):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-3, msg=f"seed {seed}: {n}")
    if kind in ("none", "left"):  # the cache takes left padding only
        a.eval()
        with torch.no_grad():
            full = a(ids, **kw).logits
            cache, pos, got = a.new_cache(B), 0, []
            while pos < S:  # random chunks; the first holds the padding, so at least every row's first token
                first_real = int((~real).sum(1).max()) + 1 if pos == 0 else 1
                step = min(S - pos, max(first_real, rnd.choice([1, 2, 7, 16])))
                m = kw["attention_mask"][:, :pos + step] if kw else None
                got.append(a(ids[:, pos:pos + step], attention_mask=m, past_key_values=cache, use_cache=True).logits)
                pos += step
        torch.testing.assert_close(torch.cat(got, 1)[real], full[real], atol=1e-4, rtol=0, msg=f"seed {seed}")


@pytest.mark.parametrize("seed", range(12))
def test_checkpoint_and_export_round_trips_of_random_configs(seed, tmp_path):
    """A random small MPT through every way out and back in: save_pretrained / from_pretrained (bit
    for bit), transformers' MptForCausalLM loading our save (multi-head configs: it has no GQA), the
    ONNX-able graph module, and FasterTransformer files (fp32: bit for bit; options FasterTransformer
    cannot express need force=True and are then reported, not silently dropped)."""
    import warnings

    from mpt_kernels.export import export_fastertransformer, load_fastertransformer, read_fastertransformer
    from mpt_kernels.export.onnx import MPTGraph
    from mpt_kernels.model import MPTConfig, MPTForCausalLM

    rnd = random.Random(6000 + seed)
    torch.manual_seed(6000 + seed)
    H = rnd.choice([2, 3, 4, 6])
    kv = rnd.choice([h for h in (1, 2, H) if H % h == 0]) if rnd.random() < 0.4 else H
    attn = dict(attn_impl="flash", clip_qkv=rnd.choice([None, None, 1.5]), qk_ln=rnd.random() < 0.25,
                alibi_bias_max=rnd.choice([8, 8, 16]))
    if kv != H:
        attn.update(attn_type="grouped_query_attention", kv_n_heads=kv)
    cfg = MPTConfig(d_model=H * rnd.choice([8, 16]), n_heads=H, n_layers=rnd.choice([1, 2]),
                    vocab_size=rnd.choice([61, 97]), max_seq_len=32, expansion_ratio=rnd.choice([2, 3, 4]),
                    no_bias=rnd.random() < 0.7, tie_word_embeddings=rnd.random() < 0.7,
                    logit_scale=rnd.choice([None, None, 0.5]), attn_config=attn)
    model = MPTForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.15 * torch.randn_like(p) if ("norm" in n or "_ln" in n) and n.endswith("weight")
                    else 0.15 * torch.randn_like(p))
    ids = torch.randint(0, cfg.vocab_size, (2, rnd.choice([3, 11])))
    with torch.no_grad():
        ref = model(ids).logits
    # ours -> ours
    from mpt_kernels.model.checkpoint import transformers_cannot_load, transformers_ignores

    ignored = transformers_ignores(cfg) + transformers_cannot_load(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "hf")
    assert bool(ignored) == any("transformers' MptForCausalLM" in str(w.message) for w in caught), f"seed {seed}"
    back = MPTForCausalLM.from_pretrained(tmp_path / "hf")
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), f"seed {seed}: {n}"
    # ours -> transformers, where transformers can represent the config
    if not ignored:  # transformers can represent the config: its outputs must be ours
        assert kv == H and cfg.expansion_ratio == 4
        transformers = pytest.importorskip("transformers")
        hf = transformers.MptForCausalLM.from_pretrained(tmp_path / "hf").eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, ref, atol=1e-4, rtol=0, msg=f"seed {seed}")
    # the ONNX-able graph module (no onnxruntime needed here)
    g = MPTGraph(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(g(ids, None, *g.empty_past(2))[0], ref, atol=1e-5, rtol=0, msg=f"seed {seed}")
    # FasterTransformer
    odd = [k for k, on in (("clip_qkv", attn["clip_qkv"]), ("qk_ln", attn["qk_ln"]),
                           ("alibi_bias_max", attn["alibi_bias_max"] != 8), ("logit_scale", cfg.logit_scale),
                           ("kv_n_heads", kv != H)) if on]
    tp = rnd.choice([t for t in (1, 2) if H % t == 0 and (cfg.d_model * cfg.expansion_ratio) % t == 0])
    if odd:
        with pytest.raises(ValueError):
            export_fastertransformer(model, tmp_path / "ft", tensor_parallel=tp)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_fastertransformer(model, tmp_path / "ft", tensor_parallel=tp, force=True)
        assert caught, f"seed {seed}: forced export of {odd} said nothing"
        return
    export_fastertransformer(model, tmp_path / "ft", tensor_parallel=tp)
    _, sd = read_fastertransformer(tmp_path / "ft")
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), f"seed {seed}: {k}"
    ft = load_fastertransformer(tmp_path / "ft")
    with torch.no_grad():
        torch.testing.assert_close(ft(ids).logits, ref, atol=0, rtol=0, msg=f"seed {seed}")


_ALPHABET = list("abc xyz\n\t  .,;:()[]{}=+-_'\"0123456789") + ["é", "ß", "中", "🙂", "\u200b", "\\", "#"]


@pytest.fixture(scope="module")
def fuzz_tok(tmp_path_factory):
    from mpt_kernels.data import train_bpe_tokenizer

    rnd = random.Random(7)
    texts = ["".join(rnd.choice(_ALPHABET) for _ in range(rnd.randint(50, 400))) for _ in range(200)]
    return train_bpe_tokenizer(texts, 400, save_path=tmp_path_factory.mktemp("fuzztok") / "tokenizer.json")


@pytest.mark.parametrize("seed", range(16))
def test_converter_and_stream_random_corpora(seed, tmp_path, fuzz_tok):
    """Random corpora (unicode, blank and tiny documents, documents far longer than a sample, .txt,
    .jsonl and a folder of code files) through the converter: train + val samples are exactly the
    EOS-joined token stream of each split, cut into seq_len samples; the streaming dataset over them
    gives every rank its share of one global order, whatever the world size, and resumes from a state
    at the exact next sample."""
    import json

    from mpt_kernels.data import StreamingTokenDataset, TokenShards
    from mpt_kernels.data.convert import convert, is_validation, iter_documents

    rnd = random.Random(8000 + seed)

    def text(n):
        return "".join(rnd.choice(_ALPHABET) for _ in range(n))

    root = tmp_path / "in"
    (root / "code").mkdir(parents=True)
    for i in range(rnd.randint(0, 5)):
        (root / "code" / f"m{i}.py").write_text(text(rnd.choice([0, 1, 30, 700])), encoding="utf-8")
    (root / "a.txt").write_text(text(rnd.choice([5, 300, 3000])), encoding="utf-8")
    with open(root / "d.jsonl", "w", encoding="utf-8") as fh:
        for i in range(rnd.randint(1, 40)):
            fh.write(json.dumps({"text": text(rnd.choice([0, 1, 2, 20, 200]))}) + "\n" + ("\n" if rnd.random() < 0.1 else ""))
    inputs = [root / "a.txt", root / "d.jsonl", root / "code"]
    seq_len, per_shard = rnd.choice([1, 2, 7, 16, 64]), rnd.choice([1, 3, 8, 1000])
    val_fraction = rnd.choice([0.0, 0.0, 0.3])
    streams = {"train": [], "val": []}
    for d in iter_documents(inputs):
        streams["val" if is_validation(d, val_fraction) else "train"] += fuzz_tok.encode(d.text) + [fuzz_tok.eos_id]
    try:
        idx = convert(inputs, tmp_path / "out", tokenizer=fuzz_tok, seq_len=seq_len, samples_per_shard=per_shard,
                      val_fraction=val_fraction, show_progress=False, log=lambda m: None)
    except (ValueError, OSError) as exc:  # ConvertError (a ValueError): nothing to train on
        assert len(streams["train"]) < seq_len, f"seed {seed}: {exc}"
        return
    for split, toks in streams.items():
        if split not in idx:
            continue
        n = len(toks) // seq_len
        assert idx[split]["num_samples"] == n, f"seed {seed} {split}"
        if n == 0:
            continue
        shards = TokenShards(tmp_path / "out" / split)
        shards.verify()
        got = np.stack([shards[i] for i in range(len(shards))]).astype(np.int64).reshape(-1)
        np.testing.assert_array_equal(got, np.asarray(toks[:n * seq_len]), err_msg=f"seed {seed} {split}")
    # the stream: one global order however it is sharded, and exact resumption
    n_train = idx["train"]["num_samples"]
    world, b = rnd.choice([1, 2, 3]), rnd.choice([1, 2, 5])
    total = world * b * 3
    ref = StreamingTokenDataset(str(tmp_path / "out" / "train"), seed=seed, batch_size=world * b, rank=0, world_size=1)
    want = [ref.sample(g)["input_ids"] for g in range(total)]
    got = {}
    for r in range(world):
        ds = StreamingTokenDataset(str(tmp_path / "out" / "train"), seed=seed, batch_size=b, rank=r, world_size=world)
        it = iter(ds)
        for k in range(3 * b):
            got[r + world * k] = next(it)["input_ids"]
    assert sorted(got) == list(range(total))
    for g in range(total):
        assert torch.equal(got[g], want[g]), f"seed {seed}: position {g}"
    cut = world * b * rnd.choice([0, 1, 2])
    resumed = StreamingTokenDataset(str(tmp_path / "out" / "train"), seed=seed, batch_size=world * b)
    resumed.load_state_dict(ref.state_dict(num_samples=cut))
    it = iter(resumed)
    for g in range(cut, total):
        assert torch.equal(next(it)["input_ids"], want[g]), f"seed {seed}: resumed at {cut}, position {g}"
    assert n_train >= 1
