"""The CPU decode step that calls the kernels directly (mpt_kernels/model/decode.py).

It claims to compute exactly what the module path computes (the same kernels, in the same order), so
every comparison here is bitwise: logits, the KV cache it writes, and the cache length. The module
path itself is checked against transformers and a float32 reference in test_model.py. Each case also
asserts which path ran, and the logits buffer is NaN-poisoned so an unwritten element shows.
"""
import gc
import threading
import weakref

import pytest
import torch
from torch import nn

from mpt_kernels.model import MPTConfig, MPTForCausalLM
from mpt_kernels.model import decode
from mpt_kernels.ops import linear as lin

pytestmark = pytest.mark.skipif(not lin._AVX2, reason="the step runs only in AVX2 builds (the few-row linear kernel)")


def config(n_heads=6, kv_n_heads=None, d_model=96, n_layers=3, vocab=101, **kw):
    attn = dict(attn_impl="flash", **({"kv_n_heads": kv_n_heads, "attn_type": "grouped_query_attention"}
                                      if kv_n_heads else {}))
    for key in ("clip_qkv", "alibi_bias_max", "softmax_scale"):
        if key in kw:
            attn[key] = kw.pop(key)
    return MPTConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers, vocab_size=vocab, max_seq_len=64,
                     attn_config=attn, **kw)


def build(cfg, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = MPTForCausalLM(cfg)
    with torch.no_grad():  # random norms and biases: a swapped or skipped one would show
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.uniform_(-0.2, 0.2)
    return m.to(dtype).eval()


@pytest.fixture(autouse=True)
def poisoned_logits(monkeypatch):
    monkeypatch.setattr(lin, "_alloc",
                        lambda shape, dtype, device: torch.full(tuple(shape), float("nan"), dtype=dtype, device=device))


class Spy:
    """Counts the steps the direct path ran (and lets a test switch it off)."""

    def __init__(self, monkeypatch):
        self.runs = 0
        run = decode._Runner.run

        def counted(runner, *a):
            self.runs += 1
            return run(runner, *a)

        monkeypatch.setattr(decode._Runner, "run", counted)


def prefill(m, B, past, mask=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.config.vocab_size, (B, past), generator=g)
    cache = m.new_cache(B)
    with torch.no_grad():
        m(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return cache


def clone_cache(cache):
    c = type(cache).__new__(type(cache))
    c.__dict__.update(cache.__dict__)
    c.k = [t.clone() for t in cache.k]
    c.v = [t.clone() for t in cache.v]
    c.row_starts = None if cache.row_starts is None else list(cache.row_starts)
    return c


def both_paths(m, cache, ids, logits_to_keep=0, spy=None, expect_direct=True):
    """One step through each path from the same cache; asserts bitwise equality and returns the logits."""
    twin = clone_cache(cache)
    before = spy.runs if spy else 0
    with torch.no_grad():
        fast = m._forward(ids, None, None, None, cache, True, logits_to_keep).logits
        if spy:
            assert spy.runs == before + (1 if expect_direct else 0), "the direct path did not run as expected"
        decode.ENABLED = False
        try:
            slow = m._forward(ids, None, None, None, twin, True, logits_to_keep).logits
        finally:
            decode.ENABLED = True
    assert fast.dtype == slow.dtype and fast.shape == slow.shape
    assert not fast.isnan().any()
    assert torch.equal(fast, slow)
    assert cache.length == twin.length
    n = cache.length
    for a, b in zip(cache.k + cache.v, twin.k + twin.v):
        assert torch.equal(a[:, :n], b[:, :n])
    return fast


CASES = {
    "mha": dict(),
    "gqa-scale": dict(kv_n_heads=2, softmax_scale=0.37),
    "mqa-bias-clip": dict(kv_n_heads=1, no_bias=False, clip_qkv=0.3),
    "untied-logit_scale": dict(tie_word_embeddings=False, logit_scale=0.7),
    "emb_fraction-head_dim40": dict(n_heads=3, d_model=120, embedding_fraction=0.3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("B, S", [(1, 1), (3, 1), (2, 3), (8, 1), (1, 8), (3, 3), (16, 1), (3, 8)])
def test_step_is_bitwise_the_module_path(monkeypatch, case, dtype, B, S):
    """Up to 8 rows one pass of the few-row kernel, past that passes of 8 (float32 up to 16 rows,
    16-bit up to 24); more rows take the module path."""
    spy = Spy(monkeypatch)
    m = build(config(**CASES[case]), dtype)
    cache = prefill(m, B, 9)
    g = torch.Generator().manual_seed(2)
    direct = B * S <= decode.M.few_rows_limit(dtype)
    for _ in range(3):  # three steps: buffers reused, the cache growing
        ids = torch.randint(0, m.config.vocab_size, (B, S), generator=g)
        both_paths(m, cache, ids, spy=spy, expect_direct=direct)
    both_paths(m, cache, ids[:, :1], logits_to_keep=1, spy=spy)  # another (B, S): a second buffer set
    if S > 1:
        out = both_paths(m, cache, ids, logits_to_keep=2, spy=spy, expect_direct=direct)
        assert out.shape == (B, 2, m.config.vocab_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_left_padded_rows(monkeypatch, dtype):
    """Rows of a left-padded prefill attend only to their own keys (one attention call per row)."""
    spy = Spy(monkeypatch)
    m = build(config(kv_n_heads=2), dtype)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, :5] = 0
    mask[2, :11] = 0
    cache = prefill(m, 4, 12, mask=mask)
    assert cache.row_starts == [5, 0, 11, 0]
    for t in range(3):
        both_paths(m, cache, torch.randint(0, 101, (4, 1 + t % 2)), spy=spy)


def test_split_keys_with_two_threads(monkeypatch):
    """Enough keys and threads for the attention to split the keys (the workspace path), at mpt-like
    head size; the workspace is shared by the layers of a step."""
    spy = Spy(monkeypatch)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        m = build(config(n_heads=4, d_model=256, n_layers=2), torch.bfloat16)
        cache = prefill(m, 1, 700)
        for _ in range(2):
            both_paths(m, cache, torch.randint(0, 101, (1, 1)), spy=spy)
        cache2 = prefill(m, 2, 300)
        both_paths(m, cache2, torch.randint(0, 101, (2, 2)), spy=spy)
    finally:
        torch.set_num_threads(n)


def test_greedy_generation_same_tokens_either_way(monkeypatch):
    spy = Spy(monkeypatch)
    m = build(config(kv_n_heads=3, no_bias=False), torch.bfloat16)
    ids = torch.randint(1, 101, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    fast = m.generate(ids, 12, temperature=0, attention_mask=mask)
    assert spy.runs == 11  # every decode step after the prefill
    monkeypatch.setattr(decode, "ENABLED", False)
    assert torch.equal(fast, m.generate(ids, 12, temperature=0, attention_mask=mask))


def test_changed_model_is_followed(monkeypatch):
    """A replaced parameter, parameter data, module, dtype or config: the next step uses the new model."""
    spy = Spy(monkeypatch)
    m = build(config(), torch.float32)
    cache = prefill(m, 2, 6)
    ids = torch.randint(0, 101, (2, 1))
    both_paths(m, cache, ids, spy=spy)
    blk = m.transformer.blocks[1]
    with torch.no_grad():
        old = weakref.ref(blk.ffn.up_proj.weight)
        blk.ffn.up_proj.weight = nn.Parameter(torch.randn_like(blk.ffn.up_proj.weight))  # a new Parameter
        gc.collect()
        assert old() is None  # the step's views keep no replaced weight alive
        a = both_paths(m, cache, ids, spy=spy)
        blk.attn.out_proj.weight.data = torch.randn_like(blk.attn.out_proj.weight)  # new .data, same Parameter
        b = both_paths(m, cache, ids, spy=spy)
        blk.norm_2 = type(blk.norm_2)(96, 1e-5, False)  # a new module
        c = both_paths(m, cache, ids, spy=spy)
        m.transformer.norm_f.weight.mul_(1.5)  # in place: the views read the live memory
        d = both_paths(m, cache, ids, spy=spy)
    assert not torch.equal(a, b) and not torch.equal(b, c) and not torch.equal(c, d)
    m.resize_token_embeddings(130)  # new wte and config
    ids = torch.randint(0, 130, (2, 1))
    out = both_paths(m, cache, ids, spy=spy)
    assert out.shape[-1] == 130
    m.to(torch.bfloat16)  # a new dtype: a new cache too
    cache = prefill(m, 2, 6)
    both_paths(m, cache, ids, spy=spy)


def test_hooks_patches_and_modes_take_the_module_path(monkeypatch):
    spy = Spy(monkeypatch)
    m = build(config(), torch.float32)
    cache = prefill(m, 1, 5)
    ids = torch.randint(0, 101, (1, 1))
    seen = []
    h = m.transformer.blocks[2].ffn.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    both_paths(m, cache, ids, spy=spy, expect_direct=False)
    assert seen == [(1, 1, 96), (1, 1, 96)]  # the hook ran in both paths' steps
    h.remove()
    with nn.modules.module.register_module_forward_pre_hook(lambda mod, inp: None):  # a global hook
        both_paths(m, cache, ids, spy=spy, expect_direct=False)
    m.transformer.blocks[0].attn.forward = m.transformer.blocks[0].attn.forward  # an instance-level forward
    both_paths(m, cache, ids, spy=spy, expect_direct=False)
    del m.transformer.blocks[0].attn.forward
    both_paths(m, cache, ids, spy=spy)
    monkeypatch.setattr(decode.M.MPTMLP, "forward", lambda self, x: self.down_proj(self.up_proj(x)))  # patched class
    with torch.no_grad():
        patched = m._forward(ids, None, None, None, clone_cache(cache), True, 0).logits
    assert spy.runs == 1  # only the step before the patch
    monkeypatch.undo()
    spy = Spy(monkeypatch)
    assert not torch.equal(patched, both_paths(m, cache, ids, spy=spy))  # the patch was honoured
    seen.clear()
    real = decode.M.mk.alibi_attention
    monkeypatch.setattr(decode.M.mk, "alibi_attention", lambda *a, **k: seen.append(1) or real(*a, **k))
    both_paths(m, cache, ids, spy=spy, expect_direct=False)  # a patched function the forwards call
    assert len(seen) == 2 * 3  # both paths' steps, three layers each
    monkeypatch.setattr(decode.M.mk, "alibi_attention", real)

    # training mode with dropout on, gradients, autocast, a second thread: the module path
    m.config.resid_pdrop = 0.0
    m.train()
    both_paths(m, cache, ids, spy=spy)  # dropout modules with p = 0: still the direct path
    m.transformer.blocks[1].resid_dropout.p = 0.5
    before = spy.runs
    with torch.no_grad():
        m._forward(ids, None, None, None, clone_cache(cache), True, 0)
    assert spy.runs == before
    m.eval()
    with torch.enable_grad():
        m._forward(ids, None, None, None, clone_cache(cache), True, 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        c = clone_cache(cache)
        c.dtype = torch.bfloat16  # (the cache a model makes in an autocast region)
        c.k = [t.bfloat16() for t in c.k]
        c.v = [t.bfloat16() for t in c.v]
        m._forward(ids, None, None, None, c, True, 0)
    assert spy.runs == before
    runner = decode._RUNNERS[m][1]
    assert runner.lock.acquire(blocking=False)  # another thread holds the buffers
    try:
        both_paths(m, cache, ids, spy=spy, expect_direct=False)
    finally:
        runner.lock.release()
    both_paths(m, cache, ids, spy=spy)


def test_models_it_does_not_take(monkeypatch):
    spy = Spy(monkeypatch)
    for cfg in (config().replace(qk_ln=True), config().replace(attn_impl="torch")):
        m = build(cfg, torch.float32)
        cache = prefill(m, 1, 5)
        both_paths(m, cache, torch.randint(0, 101, (1, 1)), spy=spy, expect_direct=False)
    m = build(config(), torch.bfloat16)
    m.transformer.blocks[0].norm_1.float()  # mixed parameter dtypes (a float32 LayerNorm in a bf16 model)
    cache = prefill(m, 1, 5)
    both_paths(m, cache, torch.randint(0, 101, (1, 1)), spy=spy, expect_direct=False)
    m.to(torch.bfloat16)  # consistent again: the step is looked at again and taken
    both_paths(m, cache, torch.randint(0, 101, (1, 1)), spy=spy)
    big = prefill(m, 25, 3)  # 25 rows: more than modeling.linear gives the few-row kernel
    both_paths(m, big, torch.randint(0, 101, (25, 1)), spy=spy, expect_direct=False)
    both_paths(m, big, torch.randint(0, 101, (25, 1)), spy=spy, expect_direct=False)


def test_concurrent_threads_agree():
    """Two threads stepping one model: one takes the direct path, the other (while the buffers are
    held) the module path; every step gives the single-threaded answer."""
    m = build(config(), torch.bfloat16)
    caches = [prefill(m, 2, 8, seed=s) for s in (1, 1)]
    ids = torch.randint(0, 101, (2, 1))
    with torch.no_grad():
        ref_cache = prefill(m, 2, 8, seed=1)
        ref = [m._forward(ids, None, None, None, ref_cache, True, 0).logits for _ in range(20)]
    out = [[], []]

    def worker(i):
        with torch.no_grad():
            for _ in range(20):
                out[i].append(m._forward(ids, None, None, None, caches[i], True, 0).logits)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert all(torch.equal(a, b) for a, b in zip(out[i], ref))


def test_inference_mode_then_no_grad(monkeypatch):
    """Buffers made in a first step under inference_mode are normal tensors: a later no_grad step
    (or the reverse order) writes them in place without an error, with the module path's results."""
    spy = Spy(monkeypatch)
    m = build(config(clip_qkv=0.5), torch.bfloat16)
    ids = torch.randint(0, 101, (2, 9))
    monkeypatch.setattr(decode, "ENABLED", False)
    ref = m.generate(ids, 6, temperature=0)
    monkeypatch.setattr(decode, "ENABLED", True)
    with torch.inference_mode():
        assert torch.equal(m.generate(ids, 6, temperature=0), ref)
    assert spy.runs == 5
    assert torch.equal(m.generate(ids, 6, temperature=0), ref)
    with torch.inference_mode():
        assert torch.equal(m.generate(ids, 6, temperature=0), ref)
    assert spy.runs == 15


def test_module_settings_changed_after_the_first_step_are_followed(monkeypatch):
    """The settings the module path reads from its modules on every call (an attention's softmax_scale,
    clip_qkv and cached slopes, a LayerNorm's eps) changed on the modules: the step follows them, bitwise,
    and keeps running directly. It used to take the scale from the config and clip_qkv once when built."""
    spy = Spy(monkeypatch)
    m = build(config(kv_n_heads=2, clip_qkv=0.5), torch.float32)
    cache = prefill(m, 2, 6)
    ids = torch.randint(0, 101, (2, 1))
    outs = [both_paths(m, cache, ids, spy=spy)]  # the runner is built here
    blocks = m.transformer.blocks
    changes = [
        lambda: [setattr(b.attn, "softmax_scale", 0.01) for b in blocks],
        lambda: setattr(blocks[1].attn, "softmax_scale", None),  # None: alibi_attention's default
        lambda: setattr(blocks[0].attn, "clip_qkv", 0.05),
        lambda: setattr(blocks[2].attn, "clip_qkv", None),
        lambda: setattr(blocks[1].norm_2, "eps", 0.5),
        lambda: setattr(m.transformer.norm_f, "eps", 2.0),
        # a new ALiBi maximum takes effect in the module path once its cached slopes are dropped
        lambda: [setattr(blocks[0].attn, "alibi_bias_max", 2.0), blocks[0].attn._slopes.clear()],
    ]
    for change in changes:
        change()
        outs.append(both_paths(m, cache, ids, spy=spy))
        assert not torch.equal(outs[-1], outs[-2])  # the change mattered

    # greedy generation against a no-cache forward loop (the walkthrough's check), after such a change
    m2 = build(config(), torch.float32, seed=3)
    for b in m2.transformer.blocks:
        b.attn.softmax_scale = 0.01
    prompt = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(4))
    before = spy.runs
    out = m2.generate(prompt, 6, temperature=0)
    assert spy.runs == before + 5  # every decode step ran directly
    ref = prompt
    with torch.no_grad():
        for _ in range(6):
            ref = torch.cat([ref, m2(ref).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_a_setting_the_step_cannot_take_sends_it_to_the_module_path(monkeypatch):
    spy = Spy(monkeypatch)
    m = build(config(), torch.float32)
    cache = prefill(m, 1, 6)
    ids = torch.randint(0, 101, (1, 1))
    both_paths(m, cache, ids, spy=spy)
    m.transformer.blocks[2].attn.softmax_scale = "0.1"  # the module path raises for it, naming it
    with torch.no_grad(), pytest.raises(ValueError, match="softmax_scale"):
        m._forward(ids, None, None, None, cache, True, 0)
    assert spy.runs == 2  # (it ran, found the setting, and left everything to the module path)
