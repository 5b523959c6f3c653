"""The MPT model: config, parity with transformers' MptForCausalLM (both loading directions),
checkpoint formats, padding / packed documents, KV-cache generation past max_seq_len, the HF patch.

Tolerances: float32 end to end. Logits agree with transformers to 1e-4 absolute on logits of size
~5: the only differences are summation order (fused vs dense attention, fused residual add) at ~1e-6
per op, accumulated over 2-3 layers. Greedy generation is compared token for token.
"""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpt_kernels as mk
from mpt_kernels.model import KVCache, MPTConfig, MPTForCausalLM, apply_to_hf

transformers = pytest.importorskip("transformers")
from transformers import MptConfig as HFConfig  # noqa: E402
from transformers import MptForCausalLM as HFModel  # noqa: E402

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def small(n_heads=6, d_model=96, n_layers=2, vocab=101, max_seq_len=48, attn_impl="flash", **attn):
    return MPTConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers, vocab_size=vocab, max_seq_len=max_seq_len,
                     attn_config=dict(attn_impl=attn_impl, **attn))


def perturb_norms(model):
    """LayerNorm weights start at 1: make them random so a swapped / missing weight would show."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "_ln" in n:
                p.uniform_(0.5, 1.5)
    return model


def to_hf(model, tmp_path):
    model.save_pretrained(tmp_path)
    return HFModel.from_pretrained(tmp_path).eval()


# ---------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------
def test_config_defaults_match_transformers():
    ours, hf = MPTConfig(), HFConfig()
    for f in ("d_model", "n_heads", "n_layers", "expansion_ratio", "max_seq_len", "vocab_size", "resid_pdrop",
              "emb_pdrop", "learned_pos_emb", "no_bias", "norm_type", "layer_norm_epsilon", "logit_scale",
              "embedding_fraction", "tie_word_embeddings"):
        assert getattr(ours, f) == getattr(hf, f), f
    for k in ("attn_type", "attn_pdrop", "attn_impl", "clip_qkv", "qk_ln", "softmax_scale", "prefix_lm",
              "attn_uses_sequence_id", "alibi", "alibi_bias_max"):
        assert ours.attn_config[k] == getattr(hf.attn_config, k), k


def test_config_json_round_trip_and_transformers_reads_it(tmp_path):
    cfg = MPTConfig.from_preset("mpt-7b-storywriter")
    cfg.save(tmp_path)
    back = MPTConfig.load(tmp_path)
    assert back.to_dict() == cfg.to_dict() and back.kv_n_heads == cfg.kv_n_heads
    hf = HFConfig.from_pretrained(tmp_path)
    assert (hf.d_model, hf.n_heads, hf.n_layers, hf.max_seq_len) == (4096, 32, 32, 65536)
    assert hf.attn_config.clip_qkv == 6 and hf.attn_config.alibi_bias_max == 16
    # and transformers' own config.json reads back into ours
    HFConfig(d_model=64, n_heads=4, n_layers=3, vocab_size=77).save_pretrained(tmp_path / "hf")
    ours = MPTConfig.load(tmp_path / "hf")
    assert (ours.d_model, ours.n_heads, ours.n_layers, ours.vocab_size) == (64, 4, 3, 77)


def test_presets():
    c = MPTConfig.from_preset("mpt-7b")
    assert (c.d_model, c.n_heads, c.n_layers, c.vocab_size) == (4096, 32, 32, 50432)
    c = MPTConfig.from_preset("mpt-7b-storywriter")
    assert c.max_seq_len == 65536 and c.attn_config["alibi_bias_max"] == 16 and c.attn_config["clip_qkv"] == 6
    assert MPTConfig.from_preset("mpt-125m").d_model == 768
    t = MPTConfig.from_preset("tiny", n_layers=2, attn_impl="torch")
    assert t.n_layers == 2 and t.attn_config["attn_impl"] == "torch" and t.head_dim == 64
    with pytest.raises(ValueError, match="unknown preset"):
        MPTConfig.from_preset("mpt-30b-nope")


@pytest.mark.parametrize("change, match", [
    (dict(attn_config=dict(prefix_lm=True)), "prefix_lm"),
    (dict(attn_config=dict(alibi=False)), "alibi"),
    (dict(norm_type="rmsnorm"), "norm_type"),
    (dict(attn_config=dict(attn_type="grouped_query_attention", kv_n_heads=3)), "kv_n_heads"),
    (dict(attn_config=dict(attn_impl="xformers")), "attn_impl"),
    (dict(attn_config=dict(bogus=1)), "unknown keys"),
    (dict(d_model=100, n_heads=6), "divisible"),
    (dict(logit_scale="sqrt"), "logit_scale"),
    (dict(extra=dict(ffn_config=dict(ffn_type="mptgeglu"))), "ffn_type"),
    (dict(init_config=dict(name="xavier_normal_")), "init_config"),
])
def test_unsupported_options_raise(change, match):
    with pytest.raises(ValueError, match=match):
        MPTConfig(d_model=change.pop("d_model", 64), n_heads=change.pop("n_heads", 4), n_layers=1, **change)


# ---------------------------------------------------------------------------------------------------
# model structure, init, flops
# ---------------------------------------------------------------------------------------------------
def test_state_dict_names_match_transformers():
    cfg = small()
    ours = MPTForCausalLM(cfg)
    hf = HFModel(HFConfig(**{k: v for k, v in cfg.to_dict().items() if k not in ("init_config",)}))
    hf_keys = set(hf.state_dict()) - {"lm_head.weight"}
    assert set(ours.state_dict()) == hf_keys
    for k, v in ours.state_dict().items():
        assert v.shape == hf.state_dict()[k].shape, k


def test_init_follows_llm_foundry():
    cfg = MPTConfig(d_model=256, n_heads=4, n_layers=8, vocab_size=1000)
    m = MPTForCausalLM(cfg)
    std = math.sqrt(2.0 / 256)  # kaiming normal, fan_in, relu gain
    blk = m.transformer.blocks[0]
    assert blk.attn.Wqkv.weight.std().item() == pytest.approx(std, rel=0.05)
    assert m.transformer.wte.weight.std().item() == pytest.approx(std, rel=0.05)
    assert blk.ffn.up_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    div = math.sqrt(2 * 8)
    assert blk.attn.out_proj.weight.std().item() == pytest.approx(std / div, rel=0.05)
    assert blk.ffn.down_proj.weight.std().item() == pytest.approx(math.sqrt(2.0 / 1024) / div, rel=0.05)
    assert torch.equal(blk.norm_1.weight, torch.ones(256))


def test_flops_per_token():
    cfg = small()
    m = MPTForCausalLM(cfg)
    n = sum(p.numel() for p in m.parameters())
    assert m.flops_per_token(1024) == 3 * (2 * n + 4 * cfg.n_layers * cfg.d_model * 1024)


def test_ids_outside_vocab_raise():
    m = MPTForCausalLM(small())
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.tensor([[1, 2, 101]]))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.randn(1, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.tensor([[1, 2, 3, 4]]), attention_mask=torch.tensor([[1, 0, 1, 1]]))  # hole in the middle


# ---------------------------------------------------------------------------------------------------
# parity with transformers
# ---------------------------------------------------------------------------------------------------
PARITY = [
    dict(n_heads=6, d_model=96),  # not a power of two: interleaved slopes
    dict(n_heads=12, d_model=192),
    dict(n_heads=4, d_model=64, clip_qkv=0.3),  # clip active on most entries
    dict(n_heads=6, d_model=96, clip_qkv=2.0, softmax_scale=0.2),
]


@pytest.mark.parametrize("attn_impl", ["flash", "torch"])
@pytest.mark.parametrize("kw", PARITY, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_logits_match_transformers_both_directions(kw, attn_impl, tmp_path):
    ours = perturb_norms(MPTForCausalLM(small(attn_impl=attn_impl, **kw))).eval()
    hf = to_hf(ours, tmp_path / "ours")
    ids = torch.randint(0, 101, (2, 37))
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        a, b = ours(ids, labels=labels), hf(ids, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)
    # the other way: a model transformers initialised and saved
    hf2 = HFModel(hf.config)
    perturb_norms(hf2).eval()
    hf2.save_pretrained(tmp_path / "hf")
    ours2 = MPTForCausalLM.from_pretrained(tmp_path / "hf", attn_impl=attn_impl)
    with torch.no_grad():
        torch.testing.assert_close(ours2(ids).logits, hf2(ids).logits, atol=ATOL, rtol=0)


def test_left_padding_matches_transformers(tmp_path):
    ours = perturb_norms(MPTForCausalLM(small())).eval()
    hf = to_hf(ours, tmp_path)
    ids = torch.randint(0, 101, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, :7] = 0
    mask[2, :1] = 0
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=ATOL, rtol=0)  # pad positions are garbage in both
    # and a padded row equals the same row run alone without padding
    with torch.no_grad():
        alone = ours(ids[:1, 7:]).logits
    torch.testing.assert_close(a[0, 7:], alone[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kw", [dict(), dict(n_heads=12, d_model=192, clip_qkv=0.5)])
def test_greedy_generate_matches_transformers_left_padded(kw, tmp_path):
    ours = perturb_norms(MPTForCausalLM(small(**kw))).eval()
    hf = to_hf(ours, tmp_path)
    ids = torch.randint(1, 101, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :8] = 0
    ids = ids.masked_fill(mask == 0, 0)
    ours_out = ours.generate(ids, 20, temperature=0, attention_mask=mask)
    hf_out = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ours_out, hf_out)
    # unpadded single row too
    assert torch.equal(ours.generate(ids[:1], 12, temperature=0),
                       hf.generate(ids[:1], max_new_tokens=12, do_sample=False, pad_token_id=0))


def test_where_transformers_departs_from_mpt(tmp_path):
    """alibi_bias_max != 8 and expansion_ratio != 4: transformers ignores both (documented); our kernel
    and reference paths agree with each other, and the 4x/8 config still matches transformers."""
    cfg = small(alibi_bias_max=16)
    cfg.expansion_ratio = 2
    cfg = MPTConfig.from_dict(cfg.to_dict())
    ours = perturb_norms(MPTForCausalLM(cfg)).eval()
    assert ours.transformer.blocks[0].ffn.up_proj.weight.shape == (192, 96)
    ref = MPTForCausalLM(cfg.replace(attn_impl="torch")).eval()
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=ATOL, rtol=0)
    with pytest.raises(Exception):  # transformers builds a 4x MLP: the checkpoint does not fit
        ours.save_pretrained(tmp_path)
        HFModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------
# kernel path vs readable torch path (features transformers lacks)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", [
    dict(attn_type="multiquery_attention"),
    dict(attn_type="grouped_query_attention", kv_n_heads=2),
    dict(qk_ln=True, clip_qkv=1.0),
])
def test_kernel_path_matches_torch_path_gqa_qkln_bias(attn):
    cfg = small(**attn)
    cfg.no_bias = False
    cfg.logit_scale = "inv_sqrt_d_model"
    cfg = MPTConfig.from_dict(cfg.to_dict())
    a = perturb_norms(MPTForCausalLM(cfg))
    with torch.no_grad():
        for n, p in a.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    b = MPTForCausalLM(cfg.replace(attn_impl="torch"))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 101, (2, 25))
    la, lb = a(ids, labels=ids), b(ids, labels=ids)
    torch.testing.assert_close(la.logits, lb.logits, atol=ATOL, rtol=0)
    la.loss.backward()
    lb.loss.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-3, msg=n)


def test_padded_and_packed_gradients_match_torch_path():
    """Training through the varlen path (gather real tokens, attend, scatter back) gives the reference
    gradients: right padding with -100 labels, and packed documents."""
    a = perturb_norms(MPTForCausalLM(small()))
    b = MPTForCausalLM(a.config.replace(attn_impl="torch"))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 101, (2, 21))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    seq = torch.tensor([[0] * 8 + [1] * 13, [0] * 21])
    for kw in (dict(attention_mask=mask), dict(sequence_id=seq), dict(attention_mask=mask, sequence_id=seq)):
        la, lb = a(ids, labels=labels, **kw).loss, b(ids, labels=labels, **kw).loss
        torch.testing.assert_close(la, lb, atol=ATOL, rtol=0)
        ga = torch.autograd.grad(la, list(a.parameters()))
        gb = torch.autograd.grad(lb, list(b.parameters()))
        for (n, _), x, y in zip(a.named_parameters(), ga, gb):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-3, msg=n)


def test_sequence_id_packed_documents_equal_separate_runs():
    m = perturb_norms(MPTForCausalLM(small())).eval()
    ids = torch.randint(0, 101, (2, 24))
    seq = torch.tensor([[0] * 10 + [1] * 5 + [2] * 9, [0] * 24])
    with torch.no_grad():
        packed = m(ids, sequence_id=seq).logits
        torch.testing.assert_close(packed[0, :10], m(ids[:1, :10]).logits[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(packed[0, 10:15], m(ids[:1, 10:15]).logits[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(packed[0, 15:], m(ids[:1, 15:]).logits[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(packed[1], m(ids[1:]).logits[0], atol=ATOL, rtol=0)
    ref = MPTForCausalLM(m.config.replace(attn_impl="torch")).eval()
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ref(ids, sequence_id=seq).logits, packed, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------
# KV cache and generation
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn_impl", ["flash", "torch"])
def test_decode_matches_full_forward_past_max_seq_len(attn_impl):
    """ALiBi extrapolation: generate to 4x max_seq_len; the cached decode logits at every step equal
    a fresh full forward over the whole sequence (no cap, no positional table)."""
    cfg = small(max_seq_len=16, attn_impl=attn_impl)
    m = perturb_norms(MPTForCausalLM(cfg)).eval()
    prompt = torch.randint(0, 101, (2, 5))
    out = m.generate(prompt, 59, temperature=0)
    assert out.shape == (2, 64)  # 4 x max_seq_len
    with torch.no_grad():
        full = m(out).logits  # (2, 64, V)
        assert torch.equal(full[:, 4:-1].argmax(-1), out[:, 5:])  # greedy tokens = argmax of full forward
        cache = m.new_cache(2)
        step = [m(out[:, :5], past_key_values=cache, use_cache=True).logits[:, -1]]
        for t in range(5, 64):
            step.append(m(out[:, t:t + 1], past_key_values=cache).logits[:, -1])
    torch.testing.assert_close(torch.stack(step[:-1], 1), full[:, 4:-1], atol=ATOL, rtol=0)


def test_bf16_batch1_decode_matches_full_forward():
    """The batch-1 decode step of a bf16 model (one-row Linear layers, kernels called without the custom
    ops' dispatch) gives the logits of a full forward over the same tokens, to bf16 accuracy."""
    torch.manual_seed(0)
    m = perturb_norms(MPTForCausalLM(small())).to(torch.bfloat16).eval()
    out = m.generate(torch.randint(0, 101, (1, 7)), 12, temperature=0)
    with torch.no_grad():
        full = m(out).logits.float()
        cache = m.new_cache(1)
        step = [m(out[:, :7], past_key_values=cache, use_cache=True).logits[:, -1]]
        for t in range(7, out.shape[1] - 1):
            step.append(m(out[:, t:t + 1], past_key_values=cache).logits[:, -1])
    torch.testing.assert_close(torch.stack(step, 1).float(), full[:, 6:-1], atol=0.05, rtol=0)
    assert (full[:, 6:-1].argmax(-1) == out[:, 7:]).float().mean() >= 0.9  # greedy: argmax, bar near-ties


def test_kv_cache_is_preallocated_and_grows_in_chunks():
    m = MPTForCausalLM(small()).eval()
    cache = m.new_cache(1)
    ids = torch.randint(0, 101, (1, 3))
    with torch.no_grad():
        m(ids, past_key_values=cache)
        ptr, cap = cache.k[0].data_ptr(), cache.capacity
        assert cache.k[0].shape == (1, cap, 6, 16) and cap >= 3
        for _ in range(cap - 3):  # fill without moving the buffer
            m(torch.randint(0, 101, (1, 1)), past_key_values=cache)
            assert cache.k[0].data_ptr() == ptr
        m(torch.randint(0, 101, (1, 1)), past_key_values=cache)  # one past capacity: one growth
        assert cache.capacity > cap and cache.length == cap + 1
        before = cache.k[1][:, :cap + 1].clone()
        m(torch.randint(0, 101, (1, 1)), past_key_values=cache)
        assert torch.equal(cache.k[1][:, :cap + 1], before)  # old entries kept across the growth


def test_decode_with_padded_cache_matches_unpadded_rows():
    m = perturb_norms(MPTForCausalLM(small())).eval()
    ids = torch.randint(1, 101, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    out = m.generate(ids, 10, temperature=0, attention_mask=mask)
    assert torch.equal(out[0, 6:], m.generate(ids[:1, 6:], 10, temperature=0)[0])
    assert torch.equal(out[1], m.generate(ids[1:], 10, temperature=0)[0])


def test_sampling_options_and_eos():
    m = perturb_norms(MPTForCausalLM(small())).eval()
    ids = torch.randint(0, 101, (2, 6))
    greedy = m.generate(ids, 8, temperature=0)
    assert torch.equal(m.generate(ids, 8, temperature=1.0, top_k=1), greedy)
    assert torch.equal(m.generate(ids, 8, temperature=0.7, top_p=1e-6), greedy)
    g1 = m.generate(ids, 8, temperature=1.5, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    g2 = m.generate(ids, 8, temperature=1.5, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(g1, g2)
    eos = int(greedy[0, 8])
    p = 6 + int((greedy[0, 6:] == eos).nonzero()[0])  # row 0's first EOS
    out = m.generate(ids, 8, temperature=0, eos_token_id=eos, pad_token_id=7)
    assert torch.equal(out[0, :p + 1], greedy[0, :p + 1]) and bool((out[0, p + 1:] == 7).all())
    hit = (greedy[1, 6:] == eos).nonzero()
    if len(hit) == 0:  # row 1 never stops: generation runs the full length
        assert out.shape[1] == 14 and torch.equal(out[1], greedy[1])


def test_streamer_protocol():
    m = MPTForCausalLM(small()).eval()
    seen = []

    class Streamer:
        def put(self, x):
            seen.append(x.clone())

        def end(self):
            seen.append("end")

    ids = torch.randint(0, 101, (1, 4))
    out = m.generate(ids, 5, temperature=0, streamer=Streamer())
    assert torch.equal(seen[0], ids) and seen[-1] == "end" and len(seen) == 7
    assert [int(t) for t in seen[1:-1]] == out[0, 4:].tolist()


# ---------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------
def test_checkpoint_formats(tmp_path):
    m = perturb_norms(MPTForCausalLM(small()))
    ids = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        ref = m(ids).logits
    # sharded safetensors
    m.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    idx = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1
    # pytorch_model.bin and a sharded .bin index, as MosaicML's hub checkpoints ship
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(m.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "binsh").mkdir()
    (tmp_path / "binsh" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    sd = m.state_dict()
    keys = list(sd)
    wm = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        torch.save({k: sd[k] for k in part}, tmp_path / "binsh" / f"pytorch_model-{i}.bin")
        wm.update({k: f"pytorch_model-{i}.bin" for k in part})
    (tmp_path / "binsh" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    for d in ("sharded", "bin", "binsh"):
        back = MPTForCausalLM.from_pretrained(tmp_path / d)
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, ref, atol=0, rtol=0)
    bf = MPTForCausalLM.from_pretrained(tmp_path / "bin", dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in bf.parameters())
    # transformers reads the sharded safetensors too
    hf = HFModel.from_pretrained(tmp_path / "sharded").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref, atol=ATOL, rtol=0)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        MPTForCausalLM.from_pretrained(tmp_path / "nope")
    m = MPTForCausalLM(small())
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing"):
        MPTForCausalLM.from_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError):
        MPTForCausalLM.from_pretrained(tmp_path)


def test_untied_head_round_trip(tmp_path):
    cfg = small()
    cfg.tie_word_embeddings = False
    m = MPTForCausalLM(MPTConfig.from_dict(cfg.to_dict()))
    assert "lm_head.weight" in m.state_dict()
    m.save_pretrained(tmp_path)
    back = MPTForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(back.lm_head.weight, m.lm_head.weight)


# ---------------------------------------------------------------------------------------------------
# HF patch
# ---------------------------------------------------------------------------------------------------
def test_apply_to_hf_static_cache_error_names_the_static_cache(tmp_path):
    """The README's documented refusal: the message says the static cache is the problem (it used to
    blame the attention mask)."""
    hf = apply_to_hf(to_hf(MPTForCausalLM(small()).eval(), tmp_path))
    ids = torch.randint(1, 101, (2, 5))
    with pytest.raises(ValueError, match=r'apply_to_hf: a static KV cache \(cache_implementation="static"\).*'
                                         r"use the default dynamic cache"):
        hf.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static", pad_token_id=0)
    hf.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)  # the dynamic cache still works


def test_apply_to_hf_reads_an_inference_mode_mask_once_per_forward(tmp_path, monkeypatch):
    """Under torch.inference_mode (transformers' pipelines) the 4-D mask has no version counter, so each
    layer read it back again (a GPU sync per layer and token). Now once per model forward; a forward
    after an in-place change of the same mask reads it anew. Logits as without the cache."""
    from mpt_kernels.model import hf_patch

    ours = MPTForCausalLM(small(n_layers=3)).eval()
    hf = apply_to_hf(to_hf(ours, tmp_path))
    calls = []
    real = hf_patch._compute_mask_rows
    monkeypatch.setattr(hf_patch, "_compute_mask_rows", lambda m, sk: calls.append(1) or real(m, sk))
    ids = torch.randint(1, 101, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    with torch.inference_mode():
        a = hf(ids, attention_mask=mask).logits
        assert len(calls) == 1  # 3 layers, one read
        mask[1, :3] = 0  # the same mask object, changed between forwards
        b = hf(ids, attention_mask=mask).logits
        assert len(calls) == 2
    ref = ours(ids, attention_mask=mask.bool()).logits
    torch.testing.assert_close(b[1, 3:], ref[1, 3:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a[0, 2:], b[0, 2:])


def test_apply_to_hf_with_attention_dropout_runs_in_eval_and_refuses_training(tmp_path):
    """attn_pdrop > 0: patched, the eval logits equal transformers' own; a training-mode forward raises
    (the kernel has no attention dropout). (transformers 5's config declares attn_pdrop an int and
    refuses 0.1, so the attention modules get their dropout directly.)"""
    from transformers.models.mpt import modeling_mpt

    hf = to_hf(MPTForCausalLM(small()).eval(), tmp_path)
    for m in hf.modules():
        if isinstance(m, modeling_mpt.MptAttention):
            m.attn_dropout_p = 0.1
    ids = torch.randint(1, 101, (2, 7))
    with torch.no_grad():
        before = hf(ids).logits
        apply_to_hf(hf)
        torch.testing.assert_close(hf(ids).logits, before, atol=ATOL, rtol=0)
    hf.train()
    with pytest.raises(ValueError, match="attn_pdrop"):
        hf(ids)


def test_apply_to_hf_logits_and_generate(tmp_path):
    ours = perturb_norms(MPTForCausalLM(small(n_heads=12, d_model=192, clip_qkv=0.5))).eval()
    hf = to_hf(ours, tmp_path)
    ids = torch.randint(1, 101, (2, 15))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        before = hf(ids, attention_mask=mask).logits
    gen_before = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    apply_to_hf(hf)
    assert hf.transformer.blocks[0].attn.forward.__func__.__module__ == "mpt_kernels.model.hf_patch"
    with torch.no_grad():
        after = hf(ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)  # pad positions too
    gen_after = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(gen_after, gen_before)
    assert torch.equal(gen_after, ours.generate(ids, 10, temperature=0, attention_mask=mask))
    # The mask is read back once per forward (every layer gets the same tensor), not once per layer;
    # a different padding in the next call is read anew.
    from mpt_kernels.model import hf_patch

    reads = []
    real = hf_patch._compute_mask_rows
    monkeypatch_rows = lambda m, sk: reads.append(sk) or real(m, sk)  # noqa: E731
    hf_patch._compute_mask_rows = monkeypatch_rows
    try:
        with torch.no_grad():
            again = hf(ids, attention_mask=mask).logits
            mask2 = torch.ones_like(ids)
            mask2[0, :3] = 0
            other = hf(ids, attention_mask=mask2).logits
    finally:
        hf_patch._compute_mask_rows = real
    assert len(reads) == 2, reads  # two forwards of a 2-layer model
    assert torch.equal(again, after)
    apply_ref = to_hf(ours, tmp_path / "ref")
    with torch.no_grad():
        other_ref = apply_ref(ids, attention_mask=mask2).logits
    torch.testing.assert_close(other[mask2.bool()], other_ref[mask2.bool()], atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_apply_to_hf_padded_batch_training_loss_and_gradients(tmp_path, dtype):
    """A padded training batch (left- and right-padded rows, a row of padding only; labels -100 at the
    pads, so the last left pad still predicts the first real token, as in transformers): the patched
    model's logits at every position, loss and every parameter's gradient are transformers' own.
    transformers' pad queries see either no key (left padding: every score at the dtype's minimum, a
    plain mean of the values) or the real keys before them (right padding)."""
    torch.manual_seed(0)
    ours = perturb_norms(MPTForCausalLM(small(n_heads=4, d_model=64))).eval()
    ids = torch.randint(1, 101, (4, 13))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0   # left padding
    mask[1, 9:] = 0   # right padding
    mask[2, :] = 0    # padding only
    mask[3, :12] = 0  # one real token
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for patched in (False, True):
        hf = to_hf(ours, tmp_path / str(patched)).to(dtype)
        hf.train()
        if patched:
            apply_to_hf(hf)
        out = hf(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.logits.detach().float(), out.loss.detach().float(),
                        {n: p.grad.float() for n, p in hf.named_parameters() if p.grad is not None}))
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results
    tol = dict(atol=ATOL, rtol=0) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(logits, ref_logits, **tol)
    torch.testing.assert_close(loss, ref_loss, **(dict(atol=1e-5, rtol=0) if dtype == torch.float32 else tol))
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **(dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32
                                                               else dict(atol=0.02, rtol=0.05)), msg=n)


def test_float32_gemm_linear_for_low_precision_on_cpu(monkeypatch):
    """The CPU bf16/fp16 Linear path (float32 GEMMs): forward and gradients against float64, to the
    bf16 rounding of the result (rel 2**-8) -- tighter than torch's own bf16 GEMM, which accumulates
    in bf16 blocks."""
    from mpt_kernels.model import modeling

    monkeypatch.setattr(modeling, "_FP32_GEMM_ON_CPU", True)
    pooled = []

    def poisoned_empty(shape, dtype, device):  # the pooled float32 copies/products: NaN until written
        pooled.append(tuple(shape))
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(mk._ext, "empty", poisoned_empty)
    for dt in (torch.bfloat16, torch.float16):
        x = torch.randn(3, 37, 48, dtype=dt, requires_grad=True)
        w = torch.randn(29, 48, dtype=dt, requires_grad=True)
        b = torch.randn(29, dtype=dt, requires_grad=True)
        g = torch.randn(3, 37, 29, dtype=dt)
        y = modeling.linear(x, w, b)
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
        y64 = torch.nn.functional.linear(x64, w64, b64)
        rx, rw, rb = torch.autograd.grad(y64, (x64, w64, b64), g.double())
        for got, ref in ((y, y64), (gx, rx), (gw, rw), (gb, rb)):
            assert got.dtype == dt
            scale = ref.abs().max().item()
            torch.testing.assert_close(got.double(), ref, atol=scale * 2**-8, rtol=0)
        assert len(pooled) >= 8  # eager: copies and products came from the (poisoned) pool
        # up to 8 rows without gradients (decode steps): the few-row kernel (tests/test_linear.py),
        # float32 accumulation, same bound; 9 rows and more take the float32 GEMM again
        with torch.no_grad():
            for x1 in (x[:1, :1], x[1, 5], x[0, :8], x[2, 3:12], x[:, ::7].transpose(0, 1)):
                y1 = modeling.linear(x1, w, b)
                ref = torch.nn.functional.linear(x1.double(), w.double(), b.double())
                assert y1.dtype == dt and y1.shape == ref.shape
                torch.testing.assert_close(y1.double(), ref, atol=ref.abs().max().item() * 2**-8, rtol=0)
    # CPU autocast: float32 weights, float32 input; the output has autocast's dtype, the GEMM runs in
    # float32 on the bf16-rounded input (autocast's input cast) and the float32 weight
    x = torch.randn(2, 19, 48, requires_grad=True)
    w = torch.randn(29, 48, requires_grad=True)
    g = torch.randn(2, 19, 29)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = modeling.linear(x, w)
    assert y.dtype == torch.bfloat16
    gx, gw = torch.autograd.grad(y, (x, w), g.bfloat16())
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32
    xr = x.detach().bfloat16().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = torch.nn.functional.linear(xr, w64)
    rx, rw = torch.autograd.grad(y64, (xr, w64), g.bfloat16().double())
    torch.testing.assert_close(y.double(), y64, atol=y64.abs().max().item() * 2**-8, rtol=0)
    torch.testing.assert_close(gw.double(), rw, atol=rw.abs().max().item() * 2**-8, rtol=0)
    torch.testing.assert_close(gx.double(), rx, atol=rx.abs().max().item() * 2**-8, rtol=0)  # bf16 gx, cast up
    # a whole bf16 model on this path matches the float32 model to bf16 accuracy
    m = perturb_norms(MPTForCausalLM(small()))
    ids = torch.randint(0, 101, (2, 16))
    ref = m(ids, labels=ids).loss
    m16 = MPTForCausalLM(m.config)
    m16.load_state_dict(m.state_dict())
    m16 = m16.to(torch.bfloat16)
    torch.testing.assert_close(m16(ids, labels=ids).loss.float(), ref, atol=0.05, rtol=0)


def test_bf16_autocast_forward_backward():
    """Under CPU bf16 autocast the branch outputs are bf16 while the residual stream stays float32."""
    m = perturb_norms(MPTForCausalLM(small()))
    ids = torch.randint(0, 101, (2, 16))
    ref = m(ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    torch.testing.assert_close(loss.float(), ref, atol=0.05, rtol=0)  # bf16 rounding of the branch outputs


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias_and_qk_ln"])
def test_autocast_mixed_layer_norm_equals_float32_layer_norm(monkeypatch, with_bias):
    """Under autocast the LayerNorms read the bf16 branch and the float32 stream and write bf16 (no
    float32 copy of the branch, no bf16 copy of the output). It must change nothing: loss, logits and
    every gradient equal, bit for bit, the model whose LayerNorms ran in float32 with autocast's
    casts around them, and the LayerNorm outputs are bf16 there."""
    from mpt_kernels.model import modeling

    cfg = small(qk_ln=with_bias)
    cfg.no_bias = not with_bias
    m = perturb_norms(MPTForCausalLM(cfg))
    ids = torch.randint(0, 101, (2, 16))
    seen = []
    handles = [mod.register_forward_hook(lambda mod, inp, out: seen.append(out[0].dtype if isinstance(out, tuple)
                                                                            else out.dtype))
               for mod in m.modules() if isinstance(mod, modeling.LayerNorm)]

    def run():
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), out.logits.detach(), [p.grad.clone() for p in m.parameters()]

    loss, logits, grads = run()
    assert len(seen) == len(handles) and all(dt == torch.bfloat16 for dt in seen)
    for h in handles:
        h.remove()
    monkeypatch.setattr(modeling, "_MIXED_LAYER_NORM", False)
    loss_ref, logits_ref, grads_ref = run()
    assert torch.equal(loss, loss_ref) and torch.equal(logits, logits_ref)
    for (name, _), g, r in zip(m.named_parameters(), grads, grads_ref):
        assert torch.equal(g, r), name


def test_cache_and_generate_under_autocast():
    """float32 weights under bf16 autocast make bf16 keys: the cache new_cache() makes there holds
    bf16 (it held float32, and the attention refused the mix: bf16 training died in its end-of-run
    sample). A cache made outside the region and used inside it is named in a clear error."""
    m = MPTForCausalLM(small()).eval()
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        full = m(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(ids[:, :5], use_cache=True)
            assert out.past_key_values.dtype == torch.bfloat16
            step = m(ids[:, 5:], past_key_values=out.past_key_values, use_cache=True)
            gen = m.generate(ids, max_new_tokens=4, top_k=1)
        torch.testing.assert_close(step.logits.float(), full[:, 5:].float(), atol=0.1, rtol=0)
        assert gen.shape == (2, 13) and torch.equal(gen[:, :9], ids)
        cache = m.new_cache(2, capacity=16)
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="^past_key_values: .*autocast"):
            m(ids, past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("autocast", [False, True])
def test_torch_compile_fullgraph_training_step(autocast):
    """The whole model (embedding, blocks with the custom attention/LayerNorm ops, loss) traces as one
    graph forward and backward (the id-range check is skipped while compiling), and the compiled
    step gives the eager loss and gradients. aot_eager: dynamo + AOT autograd without inductor.
    AOT autograd traces the backward under the forward's autocast state, so the eager reference
    runs its backward inside the autocast region too (outside it, a few backward products stay
    float32: bf16-sized differences, 0.2-0.7% in gradient norm)."""
    torch._dynamo.reset()
    m = perturb_norms(MPTForCausalLM(small()))
    ids = torch.randint(0, 101, (2, 16))

    def step(model):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=ids).loss
            loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    ref_loss, ref_grads = step(m)
    loss, grads = step(torch.compile(m, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()


def test_pooled_cpu_training_ops_match_torch(monkeypatch):
    """CPU float32 training runs the Linear GEMMs, the GELU and the embedding's weight gradient with
    their large buffers in the host pool (no per-step page faults). Same values and gradients as
    F.linear / F.gelu / F.embedding, on NaN-poisoned pool memory, with repeated ids. (The loss: tests/test_loss.py.)"""
    from mpt_kernels import _ext
    from mpt_kernels.model import modeling

    real_empty = _ext.empty
    monkeypatch.setattr(_ext, "empty", lambda shape, dtype, device: real_empty(shape, dtype, device).fill_(float("nan")))
    torch.manual_seed(3)
    # embedding weight gradient with repeated ids
    w = torch.randn(3000, 256, requires_grad=True)
    ids = torch.randint(0, 40, (4, 300))  # many repeats
    g = torch.randn(4, 300, 256)
    w_ref = w.detach().clone().requires_grad_()
    F.embedding(ids, w_ref).backward(g)
    out = modeling.embedding(ids, w)
    torch.testing.assert_close(out, F.embedding(ids, w_ref))
    out.backward(g)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
    # Linear: output and both gradients
    x = torch.randn(3, 700, 512, requires_grad=True)
    lw = torch.randn(1024, 512, requires_grad=True)
    x_ref, lw_ref = x.detach().clone().requires_grad_(), lw.detach().clone().requires_grad_()
    y, y_ref = modeling.linear(x, lw), F.linear(x_ref, lw_ref)
    torch.testing.assert_close(y, y_ref)
    gy = torch.randn_like(y)
    y.backward(gy), y_ref.backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(lw.grad, lw_ref.grad)
    # GELU (the FFN's hidden activation): output and input gradient bit for bit torch's, with and
    # without autograd, float32 and bfloat16 (CPU autocast's dtype)
    for dt in (torch.float32, torch.bfloat16):
        h = torch.randn(5, 300, 1024, dtype=dt, requires_grad=True)
        h_ref = h.detach().clone().requires_grad_()
        y, y_ref = modeling.gelu(h), F.gelu(h_ref)
        assert torch.equal(y, y_ref) and y.requires_grad
        gy = torch.randn_like(y)
        y.backward(gy), y_ref.backward(gy)
        assert torch.equal(h.grad, h_ref.grad)
        with torch.no_grad():
            assert torch.equal(modeling.gelu(h), y_ref)
    # a backward with create_graph=True stays differentiable (torch's op, not the pooled out= one)
    h = torch.randn(3, 1024, requires_grad=True)
    h_ref = h.detach().clone().requires_grad_()
    (g1,), (g1_ref,) = (torch.autograd.grad(f(t).sum(), t, create_graph=True)
                        for f, t in ((modeling.gelu, h), (F.gelu, h_ref)))
    assert torch.equal(torch.autograd.grad(g1.sum(), h)[0], torch.autograd.grad(g1_ref.sum(), h_ref)[0])
    assert _ext.host_cache_info()["hits"] + _ext.host_cache_info()["misses"] > 0


def test_out_of_range_ids_raise():
    m = MPTForCausalLM(small())
    for bad in (torch.tensor([[1, 101]]), torch.tensor([[-1, 3]])):
        with pytest.raises(ValueError, match="ids must be in"):
            m(bad)


def test_apply_to_hf_right_padding_and_non_mpt(tmp_path):
    """Right padding (no cache): the real tokens' logits are transformers' own; a mask with a hole in
    the middle, or a model that is not transformers' MPT, is a ValueError."""
    ours = MPTForCausalLM(small()).eval()
    hf = to_hf(ours, tmp_path)
    ids = torch.randint(1, 101, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 1:] = 0
    with torch.no_grad():
        before = hf(ids, attention_mask=mask).logits
        apply_to_hf(hf)
        after = hf(ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)  # pad positions too
    hole = torch.ones_like(ids)
    hole[0, 4:6] = 0
    with pytest.raises(ValueError, match="one block"), torch.no_grad():
        hf(ids, attention_mask=hole)
    with pytest.raises(ValueError, match="expected a transformers MPT model"):
        apply_to_hf(torch.nn.Linear(2, 2))


def test_from_pretrained_strict_false_initialises_missing_weights_and_takes_dtype_names(tmp_path):
    import warnings

    from safetensors.torch import load_file, save_file

    m = MPTForCausalLM(small())
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["transformer.blocks.1.ffn.up_proj.weight"], sd["transformer.blocks.0.norm_1.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        MPTForCausalLM.from_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = MPTForCausalLM.from_pretrained(tmp_path, strict=False, dtype="bfloat16")
    assert any("initialised anew" in str(x.message) for x in w)
    assert all(not p.is_meta and p.dtype == torch.bfloat16 for p in got.parameters())
    assert torch.equal(got.transformer.blocks[0].norm_1.weight, torch.ones_like(got.transformer.blocks[0].norm_1.weight))
    up = got.transformer.blocks[1].ffn.up_proj.weight.float()
    assert up.std() > 0 and not torch.equal(up, m.transformer.blocks[1].ffn.up_proj.weight)
    assert torch.equal(got.transformer.blocks[1].ffn.down_proj.weight, m.transformer.blocks[1].ffn.down_proj.weight.bfloat16())
    assert torch.isfinite(got(torch.randint(0, 100, (1, 6))).logits).all()
    with pytest.raises(ValueError, match="unknown dtype"):
        MPTForCausalLM.from_pretrained(tmp_path, strict=False, dtype="bfloat17")


def test_config_refuses_what_it_would_silently_ignore():
    with pytest.raises(ValueError, match="ffn_act_fn"):
        MPTConfig(extra={"ffn_config": {"ffn_type": "mptmlp", "ffn_act_fn": {"name": "silu"}}}).validate()
    MPTConfig(extra={"ffn_config": {"ffn_type": "mptmlp", "ffn_act_fn": {"name": "gelu", "approximate": "none"}}}).validate()
    with pytest.raises(ValueError, match="must be positive"):
        MPTConfig(n_heads=0).validate()


@pytest.mark.parametrize("key, value", [("qk_gn", True), ("attn_logit_softcapping", 30.0), ("kv_dim", 32),
                                        ("flex_attn_mod_list", [{"mod_name": "sequence_id"}]),
                                        ("sliding_window_size", 128), ("rope", True)])
def test_config_json_with_an_llm_foundry_option_switched_on_raises(key, value):
    """These change the model: a config.json that switches one on must not load as a plain MPT (they
    were dropped without a word before). At their off value they load."""
    d = small().to_dict()
    with pytest.raises(ValueError, match=f"attn_config.{key}"):
        MPTConfig.from_dict({**d, "attn_config": {**d["attn_config"], key: value}})
    off = {"qk_gn": False, "attn_logit_softcapping": None, "kv_dim": None, "flex_attn_mod_list": [],
           "sliding_window_size": -1, "rope": False}[key]
    cfg = MPTConfig.from_dict({**d, "attn_config": {**d["attn_config"], key: off}})
    assert MPTConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_config_json_unknown_attn_key_warns_bookkeeping_does_not(recwarn):
    d = small().to_dict()
    bookkeeping = {"_name_or_path": "", "return_dict": True, "id2label": {"0": "LABEL_0"}, "model_type": ""}
    MPTConfig.from_dict({**d, "attn_config": {**d["attn_config"], **bookkeeping}})
    assert not [w for w in recwarn if "attn_config" in str(w.message)]
    with pytest.warns(UserWarning, match=r"unknown keys \['wobble'\] are ignored"):
        cfg = MPTConfig.from_dict({**d, "attn_config": {**d["attn_config"], "wobble": 3}})
    assert "wobble" not in cfg.attn_config
    with pytest.raises(ValueError, match="unknown keys"):  # built directly: a typo is an error
        MPTConfig(attn_config={"wobble": 3})
    # llm-foundry's current fc_type form
    assert MPTConfig.from_dict({**d, "fc_type": {"name": "torch"}}).extra["fc_type"] == {"name": "torch"}
    with pytest.raises(ValueError, match="fc_type"):
        MPTConfig.from_dict({**d, "fc_type": {"name": "te"}})


@pytest.mark.filterwarnings("ignore:.*transformers' MptForCausalLM loads this checkpoint")
@pytest.mark.parametrize("no_bias", [True, False])
def test_from_pretrained_fuses_separate_qkv(tmp_path, no_bias):
    """An llm-foundry checkpoint saved with fused_qkv=False (attn.Wq / Wk / Wv) loads into Wqkv and
    computes the same logits; the loaded config says fused_qkv=True (its weights are fused now)."""
    from safetensors.torch import load_file, save_file

    cfg = dataclasses.replace(small(), no_bias=no_bias, attn_config={**small().attn_config,
                                                                   "attn_type": "grouped_query_attention",
                                                                   "kv_n_heads": 2})
    m = perturb_norms(MPTForCausalLM(cfg)).eval()
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    H, Hkv, D = cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
    for name in [k for k in sd if ".Wqkv." in k]:
        q, k, v = sd.pop(name).split([H * D, Hkv * D, Hkv * D], dim=0)
        for part, t in zip(("Wq", "Wk", "Wv"), (q, k, v)):
            sd[name.replace("Wqkv", part)] = t.clone()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    d = json.loads((tmp_path / "config.json").read_text())
    d["attn_config"]["fused_qkv"] = False
    (tmp_path / "config.json").write_text(json.dumps(d))
    got = MPTForCausalLM.from_pretrained(tmp_path, attn_impl=None).eval()
    assert got.config.attn_config["fused_qkv"] is True
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, m(ids).logits, atol=0, rtol=0)
    # one of the three missing: a clear error
    del sd[next(k for k in sd if ".Wv." in k)]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="cannot form"):
        MPTForCausalLM.from_pretrained(tmp_path)


def test_generate_argument_checks_and_top_p_zero_is_greedy():
    from mpt_kernels.model.generation import sample_next

    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=0.0), logits.argmax(-1))
    m = MPTForCausalLM(small()).eval()
    x = torch.randint(0, 100, (2, 5))
    assert m.generate(x, 3, top_p=0.0).shape == (2, 8)
    assert torch.equal(m.generate(x, 3, temperature=0, eos_token_id=np.int64(7)),
                       m.generate(x, 3, temperature=0, eos_token_id=torch.tensor(7)))
    for kw, name in ((dict(temperature=float("nan")), "temperature"), (dict(top_p=1.5), "top_p"),
                     (dict(top_k=-1), "top_k"), (dict(max_new_tokens=2.5), "max_new_tokens")):
        with pytest.raises(ValueError, match=name):
            m.generate(x, **{"max_new_tokens": 2, **kw})
    with pytest.raises(ValueError, match="input_ids"):
        m.generate(torch.zeros(0, 3, dtype=torch.long), 2)


def test_reorder_of_an_empty_cache():
    m = MPTForCausalLM(small())
    cache = m.new_cache(3)
    cache.reorder(torch.tensor([0, 2]))
    assert cache.batch_size == 2
    out = m(torch.randint(0, 100, (2, 4)), past_key_values=cache, use_cache=True)
    assert out.past_key_values.length == 4


@pytest.mark.cuda
def test_cuda_cache_reorder_takes_a_host_index():
    """A CUDA cache reordered with a host index tensor (or a list), as the CPU tests do it: index_select
    on CUDA refuses a host index, so the rows are moved to the cache's device first. The reordered
    cache then decodes as the cache of the kept rows alone."""
    m = MPTForCausalLM(small()).to("cuda", torch.bfloat16).eval()
    x = torch.randint(0, 100, (3, 5), device="cuda")
    with torch.no_grad():
        caches = [m(x, use_cache=True).past_key_values for _ in range(3)]
        caches[0].reorder(torch.tensor([2, 0]))
        caches[1].reorder([2, 0])
        caches[2].reorder(torch.tensor([2, 0], device="cuda"))
        for c in caches:
            assert c.batch_size == 2 and len(c) == 5
            for i in range(c.n_layers):
                assert torch.equal(c.k[i][:, :5], caches[2].k[i][:, :5])
        nxt = torch.randint(0, 100, (2, 1), device="cuda")
        outs = [m(nxt, past_key_values=c, use_cache=True).logits for c in caches]
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])


def test_from_pretrained_strict_false_keeps_the_checkpoint_dtype(tmp_path):
    """An untied bf16 checkpoint without its lm_head: the new head is bf16 like the rest."""
    import warnings

    from safetensors.torch import load_file, save_file

    m = MPTForCausalLM(dataclasses.replace(small(), tie_word_embeddings=False)).to(torch.bfloat16)
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = MPTForCausalLM.from_pretrained(tmp_path, strict=False)
    assert {p.dtype for p in got.parameters()} == {torch.bfloat16}


def test_save_pretrained_warns_when_transformers_would_ignore_settings(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MPT's own settings: no warning
        MPTForCausalLM(small()).save_pretrained(tmp_path / "plain")
    with pytest.warns(UserWarning, match=r"ignores alibi_bias_max=16 .*; qk_ln=True"):
        MPTForCausalLM(small(alibi_bias_max=16, qk_ln=True)).save_pretrained(tmp_path / "odd")
    # shapes transformers' MPT cannot hold: it refuses the checkpoint (found by test_fuzz_inputs.py)
    cfg = small(attn_type="grouped_query_attention", kv_n_heads=2)
    cfg.expansion_ratio = 3
    with pytest.warns(UserWarning, match=r"cannot load this checkpoint \(expansion_ratio=3 .*; 2 key/value heads"):
        MPTForCausalLM(MPTConfig.from_dict(cfg.to_dict())).save_pretrained(tmp_path / "shapes")


def test_forward_mode_ad_raises_instead_of_dropping_the_tangent():
    """The custom ops define no JVP, and torch then returns a zero tangent without a word: every public
    op (and so the model) raises NotImplementedError under torch.func.jvp and forward_ad dual tensors
    instead. Plain calls inside a dual level, and vmap, still work."""
    import torch.autograd.forward_ad as fwAD

    from mpt_kernels.ops.loss import cross_entropy

    torch.manual_seed(5)
    x, w, targets = torch.randn(3, 8, 64), torch.randn(64), torch.randint(0, 64, (24,))
    ops = {
        "layer_norm": lambda t: mk.layer_norm(t, w),
        "alibi_attention": lambda t: mk.alibi_attention(*(t.view(3, 8, 2, 32),) * 3),
        "alibi_attention_qkvpacked": lambda t: mk.alibi_attention_qkvpacked(t[..., :48], 1, 1),
        "cross_entropy": lambda t: cross_entropy(t.reshape(-1, 64), targets),
    }
    for name, f in ops.items():
        with pytest.raises(NotImplementedError, match=f"{name}: forward-mode AD"):
            torch.func.jvp(f, (x,), (torch.randn_like(x),))
        with fwAD.dual_level():
            with pytest.raises(NotImplementedError, match=f"{name}: forward-mode AD"):
                f(fwAD.make_dual(x.clone(), torch.randn_like(x)))
            torch.testing.assert_close(f(x), f(x.clone()))  # no tangent: runs
    torch.testing.assert_close(torch.func.vmap(ops["layer_norm"])(x[None].repeat(2, 1, 1, 1))[1], ops["layer_norm"](x))
    m = MPTForCausalLM(small()).eval()
    ids = torch.randint(0, 100, (2, 5))
    emb = m.transformer.wte.weight.detach()
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda e: torch.func.functional_call(m, {"transformer.wte.weight": e}, (ids,)).logits,
                       (emb,), (torch.randn_like(emb),))


def test_attention_dropout_with_the_kernel_runs_in_eval_and_refuses_training(tmp_path):
    """A checkpoint trained with attn_pdrop > 0 loads on the kernel (from_pretrained's default) and runs
    in eval mode, where dropout is off: the logits equal the dense reference's; a training-mode forward
    raises, in the module path and in the direct decode step alike."""
    torch.manual_seed(0)
    cfg = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=100, max_seq_len=32)
    ref = MPTForCausalLM(MPTConfig(**cfg, attn_config=dict(attn_impl="torch", attn_pdrop=0.1))).eval()
    ref.save_pretrained(tmp_path)
    m = MPTForCausalLM.from_pretrained(tmp_path)
    assert m.config.attn_config["attn_pdrop"] == 0.1 and m.config.uses_kernel_attention
    m.eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, ref(ids).logits, atol=1e-4)
        out = m.generate(ids, 4, temperature=0)
        assert torch.equal(out, ref.generate(ids, 4, temperature=0))
    m.train()
    with pytest.raises(ValueError, match="attn_pdrop"):
        m(ids, labels=ids)
    cache = m.new_cache(2)
    with torch.no_grad():
        m.eval()
        m(ids, past_key_values=cache, use_cache=True)
        m.train()
        with pytest.raises(ValueError, match="attn_pdrop"):  # a decode step in training mode: not the direct one
            m(ids[:, :1], past_key_values=cache, use_cache=True)


def test_varlen_offsets_built_under_inference_mode_are_checked_once(monkeypatch):
    """The model's cu_seqlens under torch.inference_mode (generate, pipelines): built as a tensor with a
    version counter, so the attention op's device-offset check (a GPU read-back) is remembered across
    layers (_ext.LastResult) instead of repeated in each layer; inference tensors have no counter."""
    from mpt_kernels.ops import attention as attn_op

    m = MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=101, max_seq_len=32,
                                 attn_config={"attn_impl": "flash"})).eval()
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False
    calls = []
    real = attn_op._check_cu_seqlens_values
    monkeypatch.setattr(attn_op, "_check_cu_seqlens_values", lambda *a: calls.append(1) or real(*a))
    attn_op._CHECKED_CU.clear()
    with torch.inference_mode():
        plan = m._plan(2, 8, mask, None, None, torch.device("cpu"))
        assert plan.kind == "varlen" and not plan.cu_seqlens.is_inference()
        cu, T = plan.cu_seqlens, int(plan.cu_seqlens[-1])
        for _ in range(3):  # as three layers would (CPU offsets skip this check in the op itself)
            attn_op._check_cu_seqlens_once(cu, cu, plan.max_seqlen, plan.max_seqlen, True, T, T)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------
# an independent float64 reference of the whole forward (catches what the kernel and torch paths share)
# ---------------------------------------------------------------------------------------------------
def mpt_forward_float64(model, ids, sequence_id=None):
    """MPT's forward written out from the config and the state dict in float64, with llm-foundry's
    formulas rather than this package's code: gen_slopes, classic ALiBi -slope * (i - j) (equal to the
    key-position form after the softmax), a dense causal mask, same-id attention for packed documents,
    clip_qkv, q/k LayerNorm, softmax_scale, logit_scale. Logits (B, S, vocab) float64."""
    c = model.config
    a = c.attn_config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    H, Hkv, D, d = c.n_heads, c.kv_n_heads, c.d_model // c.n_heads, c.d_model
    B, S = ids.shape
    # llm-foundry's gen_slopes
    Hp = 2 ** math.ceil(math.log2(H))
    s = 1.0 / torch.pow(2.0, torch.arange(1, Hp + 1, dtype=torch.float64) * (float(a["alibi_bias_max"]) / Hp))
    slopes = torch.cat([s[1::2], s[::2]])[:H] if Hp != H else s
    i = torch.arange(S, dtype=torch.float64)
    bias = -slopes.view(H, 1, 1) * (i.view(S, 1) - i.view(1, S))  # (H, S, S)
    allowed = torch.ones(B, 1, S, S, dtype=torch.bool).tril()
    if sequence_id is not None:
        allowed = allowed & (sequence_id[:, None, :, None] == sequence_id[:, None, None, :])
    scale = a["softmax_scale"] if a["softmax_scale"] is not None else 1.0 / math.sqrt(D)

    def ln(x, name):
        return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd.get(name + ".bias"), c.layer_norm_epsilon)

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))

    x = sd["transformer.wte.weight"][ids]  # embedding_fraction changes only the gradient
    for n in range(c.n_layers):
        p = f"transformer.blocks.{n}."
        qkv = lin(ln(x, p + "norm_1"), p + "attn.Wqkv")
        if a["clip_qkv"] is not None:
            qkv = qkv.clamp(-a["clip_qkv"], a["clip_qkv"])
        q, k, v = qkv.split([d, Hkv * D, Hkv * D], dim=-1)
        if a["qk_ln"]:
            q, k = ln(q, p + "attn.q_ln"), ln(k, p + "attn.k_ln")
        q = q.view(B, S, H, D).transpose(1, 2)  # (B, H, S, D)
        k = k.view(B, S, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        v = v.view(B, S, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) * scale + bias  # (B, H, S, S)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        y = (probs @ v).transpose(1, 2).reshape(B, S, d)
        x = x + lin(y, p + "attn.out_proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm_2"), p + "ffn.up_proj")), p + "ffn.down_proj")
    x = ln(x, "transformer.norm_f")
    head = sd["transformer.wte.weight"] if c.tie_word_embeddings else sd["lm_head.weight"]
    ls = c.logit_scale
    ls = 1.0 if ls is None else (1.0 / math.sqrt(d) if ls == "inv_sqrt_d_model" else float(ls))
    return (x @ head.T) * ls


REFERENCE_CONFIGS = {
    # 6 heads: not a power of two (interleaved slopes); alibi_bias_max 16 as StoryWriter
    "bias_max16-inv_sqrt_logits": dict(kw=dict(alibi_bias_max=16), top=dict(logit_scale="inv_sqrt_d_model")),
    "softmax_scale-clip-qk_ln-gqa-bias": dict(
        kw=dict(softmax_scale=0.31, clip_qkv=0.4, qk_ln=True, attn_type="grouped_query_attention", kv_n_heads=2),
        top=dict(no_bias=False, logit_scale=0.7)),
    "mqa-untied-bias_max4": dict(kw=dict(alibi_bias_max=4, attn_type="multiquery_attention"),
                                 top=dict(tie_word_embeddings=False, embedding_fraction=0.25)),
}


@pytest.mark.parametrize("attn_impl", ["flash", "torch"])
@pytest.mark.parametrize("name", list(REFERENCE_CONFIGS))
def test_forward_equals_an_independent_float64_reference(name, attn_impl):
    """Both attention paths against MPT's formulas in float64: the settings transformers does not have
    (alibi_bias_max, softmax_scale, clip_qkv, qk_ln, logit_scale, GQA/MQA, biases) could otherwise be
    read wrongly by a part the kernel and torch paths share (the slopes, the config) unnoticed."""
    spec = REFERENCE_CONFIGS[name]
    cfg = small(attn_impl=attn_impl, **spec["kw"]).replace(**spec["top"])
    m = perturb_norms(MPTForCausalLM(cfg)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    ids = torch.randint(0, 101, (2, 23))
    seq = torch.tensor([[7] * 9 + [3] * 6 + [5] * 8, [2] * 23])  # packed documents, ids not in order
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits.double(), mpt_forward_float64(m, ids), atol=ATOL, rtol=0)
        torch.testing.assert_close(m(ids, sequence_id=seq).logits.double(), mpt_forward_float64(m, ids, seq),
                                   atol=ATOL, rtol=0)


def test_embedding_fraction_scales_only_the_embedding_gradient():
    """MPT's x = x * f + x.detach() * (1 - f): the forward is unchanged, the gradient reaching the
    embedding through the lookup is f times the one at f = 1 (untied head: the lookup is its only path);
    every other gradient is unchanged."""
    cfg = small().replace(tie_word_embeddings=False)
    a = perturb_norms(MPTForCausalLM(cfg))
    b = MPTForCausalLM(cfg.replace(embedding_fraction=0.3))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 101, (2, 17))
    la, lb = a(ids, labels=ids), b(ids, labels=ids)
    torch.testing.assert_close(la.logits, lb.logits, atol=ATOL, rtol=0)  # (x*f + x*(1-f): rounding only)
    la.loss.backward()
    lb.loss.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        want = pa.grad * 0.3 if n == "transformer.wte.weight" else pa.grad
        torch.testing.assert_close(pb.grad, want, atol=1e-6, rtol=1e-3, msg=n)
    assert a.transformer.wte.weight.grad.abs().sum() > 0


def test_right_padding_with_a_kv_cache_is_refused():
    """With a cache the kernel reads keys [row start, end) of each row: right padding would be read as
    real keys by every later decode step, so it is refused up front (without a cache it is fine)."""
    m = MPTForCausalLM(small()).eval()
    ids = torch.randint(1, 101, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        m(ids, attention_mask=mask)  # no cache: right padding is fine
        with pytest.raises(ValueError, match="left padding"):
            m(ids, attention_mask=mask, use_cache=True)
        with pytest.raises(ValueError, match="left padding"):
            m.generate(ids, 3, temperature=0, attention_mask=mask)


@pytest.mark.parametrize("attn_impl,fast_step", [("flash", True), ("flash", False), ("torch", False)])
def test_padded_decode_steps_equal_each_rows_own_forward(attn_impl, fast_step, monkeypatch):
    """Left-padded rows decoded with a cache (the "rows" plan of the module path: CUDA, attn_impl torch, or
    the CPU with the fast decode step off; and the fast step itself): each step's logits equal a fresh
    forward over that row's real tokens alone."""
    from mpt_kernels.model import decode

    monkeypatch.setattr(decode, "ENABLED", fast_step)
    m = perturb_norms(MPTForCausalLM(small(attn_impl=attn_impl))).eval()
    ids = torch.randint(1, 101, (3, 14))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    P = 8  # prompt length (padding included), then one token per step
    with torch.no_grad():
        cache = m.new_cache(3)
        steps = [m(ids[:, :P], attention_mask=mask[:, :P], past_key_values=cache, use_cache=True).logits[:, -1]]
        for t in range(P, 14):
            steps.append(m(ids[:, t:t + 1], past_key_values=cache).logits[:, -1])
        got = torch.stack(steps, 1)  # (3, 7, V): logits after positions P-1 .. 13
        for b in range(3):
            s = int((mask[b] == 0).sum())
            want = m(ids[b:b + 1, s:]).logits[0, P - 1 - s:]
            torch.testing.assert_close(got[b], want, atol=ATOL, rtol=0, msg=f"row {b}")


@pytest.mark.parametrize("fast_step", [True, False])
def test_decode_across_cache_growths_equals_full_forward(fast_step, monkeypatch):
    """A cache that grows many times (chunk of 4 positions) keeps every earlier key and value: the decode
    logits at every step equal a full forward, the steps right after each growth included."""
    from mpt_kernels.model import KVCache, decode

    monkeypatch.setattr(decode, "ENABLED", fast_step)
    m = perturb_norms(MPTForCausalLM(small())).eval()
    c = m.config
    ids = torch.randint(0, 101, (2, 30))
    cache = KVCache(c.n_layers, 2, c.kv_n_heads, c.head_dim, dtype=m.dtype, device="cpu", chunk=4)
    with torch.no_grad():
        full = m(ids).logits
        steps = [m(ids[:, :3], past_key_values=cache).logits[:, -1]]
        caps = {cache.capacity}
        for t in range(3, 30):
            steps.append(m(ids[:, t:t + 1], past_key_values=cache).logits[:, -1])
            caps.add(cache.capacity)
    assert len(caps) >= 3  # it grew more than once
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 2:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn_impl", ["flash", "torch"])
def test_reordered_padded_cache_keeps_each_rows_padding(attn_impl):
    """KVCache.reorder (beam search, dropping finished rows) moves each row's padding start with it: the
    next step's logits equal those of a cache prefilled with the rows in the new order."""
    m = perturb_norms(MPTForCausalLM(small(attn_impl=attn_impl))).eval()
    ids = torch.randint(1, 101, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[1, :1] = 0
    order = torch.tensor([2, 0, 1])
    with torch.no_grad():
        cache = m.new_cache(3)
        m(ids[:, :9], attention_mask=mask[:, :9], past_key_values=cache, use_cache=True)
        cache.reorder(order)
        got = m(ids[order, 9:], past_key_values=cache).logits
        cache2 = m.new_cache(3)
        m(ids[order, :9], attention_mask=mask[order, :9], past_key_values=cache2, use_cache=True)
        want = m(ids[order, 9:], past_key_values=cache2).logits
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        cache.reorder([1])  # one row left: the original row 0, with six pad positions
        nxt = torch.randint(1, 101, (1, 1))
        got1 = m(nxt, past_key_values=cache).logits[0, -1]
        want1 = m(torch.cat([ids[:1, 6:], nxt], 1)).logits[0, -1]
        torch.testing.assert_close(got1, want1, atol=ATOL, rtol=0)


def test_tied_checkpoint_that_also_stores_the_head_loads(tmp_path):
    """A tied model's checkpoint that also holds lm_head.weight (the tied copy, as some exporters and older
    transformers write it) loads strictly: the copy is dropped and the head stays wte."""
    from safetensors.torch import load_file, save_file

    m = perturb_norms(MPTForCausalLM(small())).eval()
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in sd
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    back = MPTForCausalLM.from_pretrained(tmp_path).eval()
    assert "lm_head.weight" not in back.state_dict()
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, m(ids).logits, atol=0, rtol=0)
