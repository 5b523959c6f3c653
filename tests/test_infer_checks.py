"""Argument checks of the inference path found by a user walkthrough: each raises a ValueError that
names the argument (or setting) and says what to do, before anything fails midway."""
import warnings

import pytest
import torch

from mpt_kernels.model import MPTConfig, MPTForCausalLM

VOCAB = 101


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    attn = kw.pop("attn_config", {})
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=32,
                    attn_config=dict(attn_impl="flash", **attn), **kw)
    return MPTForCausalLM(cfg).eval()


def _early_eos(m, ids):
    """An EOS id that row 0 produces on its second greedy step, so that row finishes early."""
    ref = m.generate(ids, 6, temperature=0)
    return int(ref[0, ids.shape[1] + 1]), ref


@pytest.mark.parametrize("pad", [-1, -100, VOCAB, 10**9, 2.0, True])
def test_generate_refuses_a_pad_outside_the_vocabulary_up_front(pad):
    """A finished row is fed its pad token on the next step (as in transformers): an out-of-range pad
    used to fail midway with the embedding's bare IndexError."""
    m = tiny()
    ids = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(1))
    eos, _ = _early_eos(m, ids)
    with pytest.raises(ValueError, match=rf"pad_token_id: must be None or an id in \[0, {VOCAB}\)"):
        m.generate(ids, 6, temperature=0, eos_token_id=eos, pad_token_id=pad)


@pytest.mark.parametrize("eos", [-1, VOCAB, [3, VOCAB + 5]])
def test_generate_refuses_eos_ids_outside_the_vocabulary(eos):
    m = tiny()
    with pytest.raises(ValueError, match=rf"eos_token_id: ids must be in \[0, {VOCAB}\)"):
        m.generate(torch.tensor([[1, 2, 3]]), 3, temperature=0, eos_token_id=eos)


def test_generate_pads_finished_rows_and_feeds_the_pad():
    """A valid pad still fills a finished row (and the other rows are unchanged), the pad as a tensor too."""
    m = tiny()
    ids = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(1))
    eos, ref = _early_eos(m, ids)
    for pad in (VOCAB - 1, torch.tensor(VOCAB - 1)):
        out = m.generate(ids, 6, temperature=0, eos_token_id=eos, pad_token_id=pad)
        assert out[0, ids.shape[1] + 1] == eos and (out[0, ids.shape[1] + 2:] == VOCAB - 1).all()
        for r in (1, 2):
            if eos not in ref[r, ids.shape[1]:].tolist():
                assert torch.equal(out[r], ref[r])


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8])
def test_forward_and_generate_agree_on_id_dtypes(dtype):
    """forward used to accept int16/uint8 ids and then fail in the embedding; both refuse them, saying
    how to convert, and both take int32."""
    m = tiny()
    ids = torch.tensor([[5, 20, 7]])
    for call in (lambda x: m(x), lambda x: m.generate(x, 2, temperature=0)):
        with pytest.raises(ValueError, match=rf"input_ids: expected int64 or int32 ids, got {dtype}.*\.long\(\)"):
            call(ids.to(dtype))
    torch.testing.assert_close(m(ids.int()).logits, m(ids).logits, rtol=0, atol=0)
    assert torch.equal(m.generate(ids.int(), 2, temperature=0)[:, 3:], m.generate(ids, 2, temperature=0)[:, 3:])


def test_generate_names_a_temperature_so_small_the_logits_overflow():
    m = tiny()
    ids = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"temperature: 1e-40 is too small.*temperature=0 for greedy"):
        m.generate(ids, 3, temperature=1e-40)
    m.generate(ids, 3, temperature=1e-3)  # small but fine


def test_chunked_prefill_errors_say_how_to_chunk():
    """The README's promise: a chunked prefill whose first chunk lacks a row's real token (or whose
    later chunk holds padding) raises a ValueError saying the first chunk must hold all of a row's
    padding and at least one real token."""
    m = tiny()
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :7] = 0  # row 1: 7 pads, so a 6-token first chunk is all padding there
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"attention_mask: row 1 has no real tokens; a prefill split into "
                                             r"chunks .* must hold all of a row's padding and at least one"):
            m(ids[:, :6], attention_mask=mask[:, :6], past_key_values=m.new_cache(3))
        c = m.new_cache(3)
        m(ids[:, :5], attention_mask=torch.ones(3, 5, dtype=torch.long), past_key_values=c)
        with pytest.raises(ValueError, match=r"must all be real \(1\); a prefill split into chunks"):
            m(ids[:, 5:], attention_mask=torch.cat([torch.ones(3, 5), mask[:, 5:] * 0], 1).long(),
              past_key_values=c)
        with pytest.raises(ValueError, match=r"attention_mask: row 1 has no real tokens$"):
            m(ids[:, :6], attention_mask=mask[:, :6])  # no cache: no chunking advice


def test_attention_mask_shape_error_lists_each_shape_once():
    m = tiny()
    ids = torch.randint(0, VOCAB, (3, 10))
    with pytest.raises(ValueError, match=r"^attention_mask: expected shape \(3, 10\), got \(3, 9\)$"):
        m(ids, attention_mask=torch.ones(3, 9, dtype=torch.long))
    c = m.new_cache(3)
    with torch.no_grad():
        m(ids, past_key_values=c)
    with pytest.raises(ValueError, match=r"expected shape \(3, 2\) \(the new tokens\) or \(3, 12\) \(the cached"):
        m(ids[:, :2], attention_mask=torch.ones(3, 9, dtype=torch.long), past_key_values=c)


def test_kernel_api_names_a_bad_scalar_argument():
    import mpt_kernels as mk

    q = torch.randn(1, 5, 4, 16)
    with pytest.raises(ValueError, match=r"^softmax_scale: expected a number or None .* got 'a'$"):
        mk.alibi_attention(q, q, q, softmax_scale="a")
    with pytest.raises(ValueError, match=r"^alibi_bias_max: expected a number, got '8'$"):
        mk.alibi_attention(q, q, q, alibi_bias_max="8")
    with pytest.raises(ValueError, match=r"^n_heads: expected an int, got 4.0$"):
        mk.alibi_attention_qkvpacked(torch.randn(2, 5, 128), 4.0, 2)
    with pytest.raises(ValueError, match=r"^kv_heads: expected an int, got '2'$"):
        mk.alibi_attention_qkvpacked(torch.randn(2, 5, 128), 4, "2")
    with pytest.raises(ValueError, match=r"^n_heads: expected an int"):
        mk.alibi_slopes(4.0)
    # numbers of other kinds still work: a 0-d tensor scale, an int bias maximum
    ref = mk.alibi_attention(q, q, q, softmax_scale=0.25, alibi_bias_max=8.0)
    torch.testing.assert_close(mk.alibi_attention(q, q, q, softmax_scale=torch.tensor(0.25), alibi_bias_max=8),
                               ref, rtol=0, atol=0)


def test_layer_norm_says_how_to_pass_a_strided_weight():
    """mk.layer_norm refuses a strided weight or bias (tests/test_layernorm.py pins that), where torch's
    layer_norm accepts one: the message says what to pass instead."""
    import mpt_kernels as mk

    x, w = torch.randn(3, 32), torch.randn(64)
    with pytest.raises(ValueError, match=r"^weight: must be contiguous.*pass weight\.contiguous\(\)"):
        mk.layer_norm(x, w[::2])
    with pytest.raises(ValueError, match=r"^bias: must be contiguous.*pass bias\.contiguous\(\)"):
        mk.layer_norm(x, w[:32], w[::2])
    torch.testing.assert_close(mk.layer_norm(x, w[::2].contiguous(), w[1::2].contiguous()),
                               torch.nn.functional.layer_norm(x, (32,), w[::2], w[1::2]), rtol=0, atol=1e-5)


def test_kv_n_heads_without_grouped_query_attention_warns_once(monkeypatch):
    """llm-foundry's semantics are kept (kv_n_heads applies only with grouped_query_attention), but a
    config that says kv_n_heads=2 and runs 4 key/value heads warns, once per process."""
    from mpt_kernels.model import config as config_module

    monkeypatch.setattr(config_module, "_WARNED", set())
    kw = dict(d_model=64, n_heads=4, n_layers=1, vocab_size=VOCAB)
    with pytest.warns(UserWarning, match=r"attn_config.kv_n_heads=2 is ignored with attn_type='multihead_attention'"
                                         r": the model has 4 key/value head\(s\).*grouped_query_attention") as rec:
        cfg = MPTConfig(**kw, attn_config={"kv_n_heads": 2})
        cfg.replace(attn_impl="flash")  # the same setting again: no second warning
        MPTConfig.from_dict(cfg.to_dict())
    assert len(rec) == 1 and rec[0].filename == __file__  # pointing at the caller's line
    assert cfg.kv_n_heads == 4 and cfg.to_dict()["attn_config"]["kv_n_heads"] == 2  # semantics unchanged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MPTConfig(**kw, attn_config={"kv_n_heads": 4})  # agrees with the model: silent
        MPTConfig(**kw, attn_config={"attn_type": "multiquery_attention", "kv_n_heads": 1})
        MPTConfig(**kw, attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2})
        MPTConfig(**kw).to_dict()
    with pytest.warns(UserWarning, match="kv_n_heads=2 is ignored with attn_type='multiquery_attention'"):
        MPTConfig(**kw, attn_config={"attn_type": "multiquery_attention", "kv_n_heads": 2})
