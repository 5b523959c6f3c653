"""Export tests: FasterTransformer layout (round trip at TP 1/2/4 and an independent tensor-parallel
forward computed straight from the rank files) and ONNX (onnxruntime prefill logits and greedy decode
against the torch model). Models are tiny and random (weights drawn with a large std so logits are
far from ties and a layout mistake cannot hide)."""
from __future__ import annotations

import configparser
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpt_kernels.export import export_fastertransformer, load_fastertransformer, read_fastertransformer
from mpt_kernels.export.onnx import MPTGraph
from mpt_kernels.model import MPTConfig, MPTForCausalLM

VOCAB = 97


def _randomize(model, std=0.15):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") or name.endswith("_ln.weight"):
                p.copy_(1 + std * torch.randn_like(p))  # LayerNorm gains near 1
            else:
                p.normal_(0, std)
    return model.eval()


def mpt(d_model=32, n_heads=4, n_layers=2, attn_impl="flash", **kw):
    """Our MPTForCausalLM (attention on mpt_kernels' kernel), random weights. ``kw``: top-level config
    fields or attn_config keys."""
    attn = {k: kw.pop(k) for k in list(kw) if k in ("clip_qkv", "qk_ln", "alibi_bias_max", "softmax_scale",
                                                      "attn_type", "kv_n_heads")}
    cfg = MPTConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers, max_seq_len=64, vocab_size=VOCAB,
                    attn_config=dict(attn_impl=attn_impl, **attn), **kw)
    return _randomize(MPTForCausalLM(cfg))


def hf_mpt(d_model=32, n_heads=4, n_layers=2, **attn):
    """transformers' MptForCausalLM: an independent implementation to cross-check against."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MptConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers, max_seq_len=64,
                                 vocab_size=VOCAB, attn_config=dict(attn) if attn else None)
    return _randomize(transformers.MptForCausalLM(cfg))


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------------
# An independent FasterTransformer forward: reads config.ini and the rank files with the shapes
# FasterTransformer documents, runs each rank's share of heads / FFN columns and sums the row-parallel
# partial outputs as the all-reduce does. It shares no code with read_fastertransformer, so a layout
# mistake that round-trips (written and read back the same wrong way) still fails here.


def _paper_alibi_slopes(n):
    # The ALiBi paper's slopes (FasterTransformer's formula), not MPT's interleaved form.
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return pow2(n)
    closest = 2 ** math.floor(math.log2(n))
    return pow2(closest) + _paper_alibi_slopes(2 * closest)[0::2][: n - closest]


def ft_forward(ft_dir, ids):
    ini = configparser.ConfigParser()
    ini.read(os.path.join(ft_dir, "config.ini"))
    g = ini["gpt"]
    H, hd, L, I, V, TP = (g.getint(k) for k in ("head_num", "size_per_head", "num_layer", "inter_size",
                                                   "vocab_size", "tensor_para_size"))
    d, eps = H * hd, g.getfloat("layernorm_eps")
    npdt = {"fp32": np.float32, "fp16": np.float16}[g["weight_data_type"]]
    assert g["use_attention_linear_bias"] == "True" and g["has_positional_encoding"] == "False"
    # the block structure this forward computes (FasterTransformer's defaults when a key is absent)
    assert g.get("layernorm_type", "pre_layernorm") == "pre_layernorm" and g.get("activation_type", "Gelu") == "Gelu"
    assert g.getboolean("has_post_decoder_layernorm", True) and not g.getboolean("has_pre_decoder_layernorm", False)

    def ld(name, shape):
        a = np.fromfile(os.path.join(ft_dir, f"model.{name}.bin"), dtype=npdt)
        assert a.size == math.prod(shape), name
        return torch.from_numpy(a.astype(np.float64).reshape(shape))

    B, S = ids.shape
    slopes = torch.tensor(_paper_alibi_slopes(H), dtype=torch.float64)
    rel = torch.arange(S)[None, :] - torch.arange(S)[:, None]  # j - i
    causal = rel > 0
    x = ld("wte", (V, d))[ids]
    for li in range(L):
        o = f"layers.{li}."
        h = F.layer_norm(x, (d,), ld(o + "input_layernorm.weight", (d,)), ld(o + "input_layernorm.bias", (d,)), eps)
        attn_sum = 0
        for r in range(TP):
            hr = H // TP
            qkv = h @ ld(o + f"attention.query_key_value.weight.{r}", (d, 3, d // TP)).reshape(d, 3 * d // TP)
            qkv = qkv + ld(o + f"attention.query_key_value.bias.{r}", (3, d // TP)).reshape(-1)
            q, k, v = qkv.reshape(B, S, 3, hr, hd).permute(2, 0, 3, 1, 4)  # each (B, hr, S, hd)
            sc = q @ k.transpose(-1, -2) / math.sqrt(hd)
            sc = sc + slopes[r * hr:(r + 1) * hr, None, None] * rel.clamp(max=0)  # slope * (j - i)
            sc = sc.masked_fill(causal, float("-inf"))
            a = (sc.softmax(-1) @ v).transpose(1, 2).reshape(B, S, hr * hd)
            attn_sum = attn_sum + a @ ld(o + f"attention.dense.weight.{r}", (d // TP, d))
        x = x + attn_sum + ld(o + "attention.dense.bias", (d,))
        h = F.layer_norm(x, (d,), ld(o + "post_attention_layernorm.weight", (d,)),
                         ld(o + "post_attention_layernorm.bias", (d,)), eps)
        mlp_sum = 0
        for r in range(TP):
            u = h @ ld(o + f"mlp.dense_h_to_4h.weight.{r}", (d, I // TP)) + ld(o + f"mlp.dense_h_to_4h.bias.{r}", (I // TP,))
            # MPT's exact GELU; FasterTransformer's kernel uses the tanh form (see docs/export.md).
            mlp_sum = mlp_sum + F.gelu(u) @ ld(o + f"mlp.dense_4h_to_h.weight.{r}", (I // TP, d))
        x = x + mlp_sum + ld(o + "mlp.dense_4h_to_h.bias", (d,))
    x = F.layer_norm(x, (d,), ld("final_layernorm.weight", (d,)), ld("final_layernorm.bias", (d,)), eps)
    untied = os.path.exists(os.path.join(ft_dir, "model.lm_head.weight.bin"))
    return x @ ld("lm_head.weight" if untied else "wte", (V, d)).T


def expected_ft_files(L, TP, lm_head=False):
    files = {"config.ini", "model.wte.bin", "model.final_layernorm.weight.bin", "model.final_layernorm.bias.bin"}
    if lm_head:
        files.add("model.lm_head.weight.bin")
    for i in range(L):
        o = f"model.layers.{i}."
        for n in ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
                  "post_attention_layernorm.bias", "attention.dense.bias", "mlp.dense_4h_to_h.bias"):
            files.add(o + n + ".bin")
        for r in range(TP):
            for n in ("attention.query_key_value.weight", "attention.query_key_value.bias", "attention.dense.weight",
                      "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight"):
                files.add(f"{o}{n}.{r}.bin")
    return files


# ---------------------------------------------------------------------------------------------------
# FasterTransformer


def test_ft_layout_and_config(tmp_path):
    model = mpt(d_model=48, n_heads=6, n_layers=3)
    out = export_fastertransformer(model, tmp_path, tensor_parallel=2)
    assert out == tmp_path / "2-gpu"
    assert set(os.listdir(out)) == expected_ft_files(3, 2)
    ini = configparser.ConfigParser()
    ini.read(out / "config.ini")
    assert dict(ini["gpt"]) == {
        "model_name": "mpt", "head_num": "6", "size_per_head": "8", "inter_size": "192",
        "max_pos_seq_len": "64", "num_layer": "3", "vocab_size": str(VOCAB), "start_id": "0", "end_id": "0",
        "weight_data_type": "fp32", "tensor_para_size": "2", "layernorm_eps": "1e-05",
        "layernorm_type": "pre_layernorm", "activation_type": "Gelu", "has_pre_decoder_layernorm": "False",
        "has_post_decoder_layernorm": "True", "has_positional_encoding": "False", "use_attention_linear_bias": "True",
    }
    # QKV rank 1 holds heads 3..5 of q, k and v: check one element of each against Wqkv directly.
    wqkv = model.transformer.blocks[1].attn.Wqkv.weight.detach()  # (3d, d) rows [q; k; v]
    shard = np.fromfile(out / "model.layers.1.attention.query_key_value.weight.1.bin", dtype=np.float32).reshape(48, 3, 24)
    for part in range(3):
        assert shard[5, part, 7] == wqkv[part * 48 + 24 + 7, 5].item()
    # MPT has no biases: FasterTransformer's bias files are zeros of the right size.
    b = np.fromfile(out / "model.layers.0.mlp.dense_h_to_4h.bias.0.bin", dtype=np.float32)
    assert b.shape == (96,) and not b.any()


@pytest.mark.parametrize("edit, match", [
    (lambda t: "head_num = 4\n" + t, "not a FasterTransformer config.ini"),       # no section header
    (lambda t: t.replace("[gpt]", "[gpt]\nnum_layer = 2"), "not a FasterTransformer config.ini"),  # twice
    (lambda t: t.replace("head_num = 4\n", ""), r"\[gpt\] has no head_num"),
    (lambda t: t.replace("max_pos_seq_len = 64\n", ""), r"\[gpt\] has no max_pos_seq_len"),
    (lambda t: t.replace("inter_size = 128", "inter_size = 12x"), "inter_size = '12x' is not a valid int"),
    (lambda t: t.replace("head_num = 4", "head_num = 0"), "head_num = 0 is out of range"),
    (lambda t: t.replace("use_attention_linear_bias = True", "use_attention_linear_bias = maybe"),
     "is not a valid bool"),
    (lambda t: t.replace("activation_type = Gelu", "activation_type = Relu"), "only MPT's 'gelu'"),
    (lambda t: t.replace("layernorm_type = pre_layernorm", "layernorm_type = post_layernorm"),
     "only MPT's 'pre_layernorm'"),
    (lambda t: t.replace("has_pre_decoder_layernorm = False", "has_pre_decoder_layernorm = True"), "MPT has False"),
    (lambda t: t.replace("[gpt]", "[opt]"), r"has no \[gpt\] section"),
])
def test_ft_reader_refuses_a_foreign_or_broken_config_ini(tmp_path, edit, match):
    """read_fastertransformer on a config.ini not written for an MPT raised configparser's errors or a
    TypeError (a missing key read as None), or read another architecture (post-LayerNorm, ReLU, an
    embedding LayerNorm) as MPT. Each now raises ValueError naming the file and key."""
    export_fastertransformer(mpt(), tmp_path)
    ini = tmp_path / "1-gpu" / "config.ini"
    text = ini.read_text()
    assert edit(text) != text, "the edit must change the file"
    ini.write_text(edit(text))
    with pytest.raises(ValueError, match=match):
        read_fastertransformer(tmp_path)
    ini.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="not a FasterTransformer config.ini"):
        read_fastertransformer(tmp_path)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_ft_roundtrip_fp32_exact(tmp_path, tp):
    model = mpt()
    ids = torch.randint(0, VOCAB, (2, 11))
    export_fastertransformer(model, tmp_path, tensor_parallel=tp)
    cfg, sd = read_fastertransformer(tmp_path)
    assert cfg["no_bias"] and cfg["n_heads"] == 4 and cfg["expansion_ratio"] == 4
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k  # fp32 files are the weights bit for bit
    back = load_fastertransformer(tmp_path)
    assert isinstance(back, MPTForCausalLM)
    torch.testing.assert_close(logits_of(back, ids), logits_of(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_ft_roundtrip_fp16(tmp_path, tp):
    model = mpt()
    ids = torch.randint(0, VOCAB, (2, 11))
    export_fastertransformer(model, tmp_path, tensor_parallel=tp, dtype="fp16")
    back = load_fastertransformer(tmp_path)
    # Exact against the same model with its weights rounded to fp16 (the only change fp16 files make)...
    rounded = mpt()
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    torch.testing.assert_close(logits_of(back, ids), logits_of(rounded, ids), rtol=0, atol=0)
    # ...and close to the fp32 model: fp16 rounding (2^-11 relative) of every weight through 2 layers
    # moves logits of magnitude ~5 by a few 1e-3.
    torch.testing.assert_close(logits_of(back, ids), logits_of(model, ids), rtol=0, atol=2e-2)
    # Loading in fp16 itself runs (CPU fp16 kernels): same tokens' logits within fp16 activations' error.
    half = load_fastertransformer(tmp_path, torch_dtype=torch.float16)
    torch.testing.assert_close(logits_of(half, ids).float(), logits_of(rounded, ids), rtol=0, atol=5e-2)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_ft_tensor_parallel_forward_from_files(tmp_path, tp):
    """Runs FasterTransformer's tensor-parallel GPT math on the exported rank files (float64)."""
    model = mpt(d_model=48, n_heads=12 if tp != 4 else 4, n_layers=2)  # 12 heads: non-power-of-2 ALiBi
    ids = torch.randint(0, VOCAB, (2, 13))
    out = export_fastertransformer(model, tmp_path, tensor_parallel=tp)
    # float64 forward vs the float32 model: float32 rounding through 2 layers, logits ~5 -> 1e-5.
    torch.testing.assert_close(ft_forward(out, ids).float(), logits_of(model, ids), rtol=0, atol=2e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's, raised while importing torch.compile
def test_exports_read_wrapped_models(tmp_path):
    """A torch.compile'd model (state dict under '_orig_mod.') or a DataParallel one ('module.') was
    refused with 'the weights lack transformer.wte.weight, ...'."""
    model = mpt()
    ids = torch.randint(0, VOCAB, (1, 6))
    for i, wrapped in enumerate((torch.compile(model), torch.nn.DataParallel(model))):
        out = export_fastertransformer(wrapped, tmp_path / str(i))
        torch.testing.assert_close(logits_of(load_fastertransformer(out), ids), logits_of(model, ids), rtol=0, atol=0)
        assert MPTGraph(wrapped).w("transformer.wte.weight") is not None


def test_ft_transformers_model_into_ours(tmp_path):
    """Export transformers' MptForCausalLM, load as ours: two implementations, one function."""
    model = hf_mpt(d_model=48, n_heads=6)
    ids = torch.randint(0, VOCAB, (2, 10))
    export_fastertransformer(model, tmp_path, tensor_parallel=2)
    ours = load_fastertransformer(tmp_path)
    # float32, different kernels (flash tiles vs dense softmax) -> ~1e-6 on logits ~5.
    torch.testing.assert_close(logits_of(ours, ids), logits_of(model, ids), rtol=0, atol=1e-5)


def test_ft_biases_untied_head_expansion(tmp_path):
    model = mpt(d_model=48, n_heads=4, no_bias=False, tie_word_embeddings=False, expansion_ratio=3)
    ids = torch.randint(0, VOCAB, (2, 9))
    out = export_fastertransformer(model, tmp_path, tensor_parallel=4)
    assert set(os.listdir(out)) == expected_ft_files(2, 4, lm_head=True)
    cfg, sd = read_fastertransformer(out)
    assert cfg["no_bias"] is False and cfg["tie_word_embeddings"] is False and cfg["expansion_ratio"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k
    torch.testing.assert_close(logits_of(load_fastertransformer(out), ids), logits_of(model, ids), rtol=0, atol=0)
    torch.testing.assert_close(ft_forward(out, ids).float(), logits_of(model, ids), rtol=0, atol=2e-5)


def test_load_fastertransformer_any_tp(tmp_path):
    model = mpt()
    ids = torch.randint(0, VOCAB, (2, 7))
    for tp in (1, 2, 4):
        export_fastertransformer(model, tmp_path, tensor_parallel=tp)
    for tp in (1, 2, 4):
        back = load_fastertransformer(tmp_path / f"{tp}-gpu", attn_impl="torch")
        torch.testing.assert_close(logits_of(back, ids), logits_of(model, ids), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="several FasterTransformer exports"):
        load_fastertransformer(tmp_path)  # ambiguous: three exports side by side


def test_ft_rejects_bad_arguments(tmp_path):
    model = mpt()  # 4 heads, d_model 32
    with pytest.raises(ValueError, match="n_heads=4 is not divisible by tensor_parallel=3"):
        export_fastertransformer(model, tmp_path, tensor_parallel=3)
    with pytest.raises(ValueError, match="n_heads=4 is not divisible by tensor_parallel=8"):
        export_fastertransformer(model, tmp_path, tensor_parallel=8)
    for bad in (0, -2, 1.0, True):
        with pytest.raises(ValueError, match="tensor_parallel"):
            export_fastertransformer(model, tmp_path, tensor_parallel=bad)
    with pytest.raises(ValueError, match="dtype"):
        export_fastertransformer(model, tmp_path, dtype="bf16")
    with pytest.raises(TypeError, match="model_or_dir"):
        export_fastertransformer(object(), tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_fastertransformer(tmp_path / "nowhere", tmp_path)
    assert not (tmp_path / "3-gpu").exists() and not (tmp_path / "8-gpu").exists()
    export_fastertransformer(model, tmp_path)
    with pytest.raises(FileExistsError, match="out_dir"):
        export_fastertransformer(model, tmp_path)
    export_fastertransformer(model, tmp_path, overwrite=True)


def test_ft_rejects_ffn_width_not_divisible(tmp_path):
    model = mpt(d_model=32, n_heads=4, expansion_ratio=1.5)  # FFN width 48: heads split by 4, FFN by 4, not 32
    export_fastertransformer(model, tmp_path, tensor_parallel=4)
    wide = mpt(d_model=40, n_heads=8, expansion_ratio=1.25)  # FFN width 50: 8 heads divide by 4, 50 does not
    with pytest.raises(ValueError, match="FFN width 50 is not divisible by tensor_parallel=4"):
        export_fastertransformer(wide, tmp_path / "w", tensor_parallel=4)


def test_ft_read_rejects_truncated_file(tmp_path):
    out = export_fastertransformer(mpt(), tmp_path, tensor_parallel=2)
    f = out / "model.layers.1.mlp.dense_4h_to_h.weight.1.bin"
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(ValueError, match="dense_4h_to_h.weight.1.bin holds"):
        read_fastertransformer(out)
    (out / "model.wte.bin").unlink()
    with pytest.raises(FileNotFoundError, match="model.wte.bin"):
        read_fastertransformer(out)


@pytest.mark.parametrize("option", [{"clip_qkv": 4.0}, {"qk_ln": True}, {"alibi_bias_max": 16},
                                    {"softmax_scale": 0.5}, {"logit_scale": 0.5}])
def test_ft_unsupported_options_need_force(tmp_path, option):
    model = mpt(**option)
    name = next(iter(option))
    with pytest.raises(ValueError, match=name):
        export_fastertransformer(model, tmp_path)
    assert not (tmp_path / "1-gpu").exists()
    with pytest.warns(UserWarning, match=name):
        out = export_fastertransformer(model, tmp_path, force=True)
    assert set(os.listdir(out)) == expected_ft_files(2, 1)


@pytest.mark.parametrize("attn", [{"attn_type": "grouped_query_attention", "kv_n_heads": 2},
                                  {"attn_type": "multiquery_attention"}])
def test_ft_grouped_query_attention_force_repeats_kv(tmp_path, attn):
    model = mpt(**attn)
    ids = torch.randint(0, VOCAB, (2, 9))
    with pytest.raises(ValueError, match="grouped/multi-query"):
        export_fastertransformer(model, tmp_path, tensor_parallel=2)
    with pytest.warns(UserWarning, match="repeated"):
        out = export_fastertransformer(model, tmp_path, tensor_parallel=2, force=True)
    back = load_fastertransformer(out)
    assert back.config.kv_n_heads == 4
    # Repeating k/v heads is exact: the multi-head model FasterTransformer runs is the GQA model.
    ref = logits_of(model, ids)
    torch.testing.assert_close(logits_of(back, ids), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ft_forward(out, ids).float(), ref, rtol=0, atol=2e-5)


def test_ft_from_checkpoint_dir_matches_model(tmp_path):
    model = mpt()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size=20_000)  # several safetensors shards + index
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    a = export_fastertransformer(model, tmp_path / "a", tensor_parallel=2)
    b = export_fastertransformer(tmp_path / "ckpt", tmp_path / "b", tensor_parallel=2, progress=True)
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for f in sorted(os.listdir(a)):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.filterwarnings("ignore:FasterTransformer cannot run this MPT exactly")
def test_ft_from_separate_qkv_checkpoint_dir_and_foundry_options(tmp_path):
    """A checkpoint with llm-foundry's fused_qkv=False layout (attn.Wq / Wk / Wv) exports the same
    bytes as the fused one; a config that switches on an option no exporter computes (qk_gn) raises
    before anything is written."""
    import json

    from safetensors.torch import load_file, save_file

    model = mpt(attn_type="grouped_query_attention", kv_n_heads=2)
    model.save_pretrained(tmp_path / "ckpt")
    sd = load_file(tmp_path / "ckpt" / "model.safetensors")
    for name in [k for k in sd if ".Wqkv." in k]:
        for part, t in zip(("Wq", "Wk", "Wv"), sd.pop(name).split([32, 16, 16], dim=0)):
            sd[name.replace("Wqkv", part)] = t.clone()
    save_file(sd, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    a = export_fastertransformer(model, tmp_path / "a", tensor_parallel=2, force=True)
    b = export_fastertransformer(tmp_path / "ckpt", tmp_path / "b", tensor_parallel=2, force=True)
    for f in sorted(os.listdir(a)):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    cfg_file = tmp_path / "ckpt" / "config.json"
    d = json.loads(cfg_file.read_text())
    d["attn_config"]["qk_gn"] = True
    cfg_file.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="qk_gn"):
        export_fastertransformer(tmp_path / "ckpt", tmp_path / "c", force=True)
    assert not (tmp_path / "c").exists()


def test_cli_fastertransformer(tmp_path, capsys):
    from mpt_kernels.export.__main__ import main

    mpt().save_pretrained(tmp_path / "ckpt")
    assert main(["fastertransformer", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ft"),
                 "--tp", "2", "--dtype", "fp16", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "2-gpu" in out
    diff = float(out.split("=")[-1])
    assert 0 < diff < 2e-2  # fp16 files: nonzero, small
    assert (tmp_path / "ft" / "2-gpu" / "model.layers.1.attention.query_key_value.weight.1.bin").exists()


# ---------------------------------------------------------------------------------------------------
# ONNX graph module (torch only, cheap): the decomposition equals the model it was built from.


@pytest.mark.parametrize("kw", [
    {},
    {"clip_qkv": 0.3, "qk_ln": True, "alibi_bias_max": 16, "softmax_scale": 0.2},
    {"attn_type": "grouped_query_attention", "kv_n_heads": 2, "no_bias": False},
    {"attn_type": "multiquery_attention", "tie_word_embeddings": False, "logit_scale": "inv_sqrt_d_model",
     "expansion_ratio": 3},
])
def test_graph_module_matches_model_prefill_and_cached(kw):
    model = mpt(d_model=48, n_heads=6, n_layers=2, **kw)  # 6 heads: non-power-of-2 ALiBi slopes
    g = MPTGraph(model).eval()
    ids = torch.randint(0, VOCAB, (3, 10))
    ref = logits_of(model, ids)
    with torch.no_grad():
        full = g(ids, None, *g.empty_past(3))
        torch.testing.assert_close(full[0], ref, rtol=0, atol=1e-5)
        # prefill 6 tokens, then 4 one at a time through the cache
        out = g(ids[:, :6], None, *g.empty_past(3))
        steps = [out[0]]
        for t in range(6, 10):
            out = g(ids[:, t:t + 1], None, *out[1:])
            steps.append(out[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), ref, rtol=0, atol=1e-5)
    assert out[1].shape == (3, model.config.kv_n_heads, 10, 8)
    # Left padding: row 1 padded by 4 computes what its unpadded 6 tokens compute, also through the cache.
    mask = torch.ones(3, 10, dtype=torch.int64)
    mask[1, :4] = 0
    with torch.no_grad():
        padded = g(ids, mask, *g.empty_past(3))[0]
        torch.testing.assert_close(padded[1, 4:], logits_of(model, ids[1:2, 4:])[0], rtol=0, atol=1e-5)
        out = g(ids[:, :7], mask[:, :7], *g.empty_past(3))
        out = g(ids[:, 7:], mask, *out[1:])
        torch.testing.assert_close(out[0][1], logits_of(model, ids[1:2, 4:])[0, 3:], rtol=0, atol=1e-5)


def test_graph_module_keeps_to_the_weights_device():
    """The ALiBi slopes were made on the CPU whatever the model's device: MPTGraph (and export_onnx) of a
    CUDA model failed with a device mismatch. Checked on the meta device, which needs no GPU."""
    with torch.device("meta"):
        model = mpt()
    g = MPTGraph(model)
    assert g.alibi_slopes.device.type == "meta"
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    out = g(ids, None, *g.empty_past(2))  # the empty cache defaults to the weights' device too
    assert out[0].shape == (2, 5, VOCAB) and out[0].device.type == "meta"


@pytest.mark.parametrize("kw", [{"softmax_scale": 0.0}, {"logit_scale": 0.0}])
def test_graph_module_zero_scales_are_scales(kw):
    """softmax_scale=0 / logit_scale=0 are the model's (uniform attention, zero logits); the graph module
    took 0 for "unset" and used 1/sqrt(head_dim) / no scaling (logits off by 2 and 3.4)."""
    model = mpt(**kw)
    g = MPTGraph(model).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(g(ids, None, *g.empty_past(2))[0], logits_of(model, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", [{}, {"clip_qkv": 0.3}, {"softmax_scale": 0.2}])
def test_graph_module_matches_transformers_model(attn):
    model = hf_mpt(d_model=48, n_heads=6, n_layers=2, **attn)
    g = MPTGraph(model).eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(g(ids, None, *g.empty_past(2))[0], logits_of(model, ids), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# ONNX through onnxruntime


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(1234)
    model = mpt(d_model=48, n_heads=6, n_layers=2)
    from mpt_kernels.export import export_onnx

    path = export_onnx(model, tmp_path_factory.mktemp("onnx"))
    return model, path


def test_onnx_graph_is_standard_ops_with_dynamic_axes(onnx_export):
    import onnx

    _, path = onnx_export
    proto = onnx.load(str(path))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, "custom-domain operators in the graph"
    ops = {n.op_type for n in proto.graph.node}
    assert {"MatMul", "Softmax"} <= ops
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["attention_mask"] == ["batch", "past + seq"]
    assert dims["past_key_values.1.value"] == ["batch", 6, "past", 8]
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert outs["logits"][0] == "batch" and outs["logits"][2] == VOCAB and isinstance(outs["logits"][1], str)


def test_onnx_prefill_logits_match_torch(onnx_export):
    from mpt_kernels.export.onnx import OnnxMPT

    model, path = onnx_export
    runner = OnnxMPT(path)
    for shape in [(1, 1), (3, 17)]:  # neither is the traced example shape (2, 3)
        ids = torch.randint(0, VOCAB, shape)
        logits, present = runner.run(ids.numpy())
        # float32 on both sides; different matmul/softmax kernels -> ~1e-6, bound from the issue.
        torch.testing.assert_close(torch.from_numpy(logits), logits_of(model, ids), rtol=0, atol=1e-4)
        assert present[0].shape == (shape[0], 6, shape[1], 8)


def test_onnx_left_padded_prefill_matches_unpadded_rows(onnx_export):
    from mpt_kernels.export.onnx import OnnxMPT

    model, path = onnx_export
    ids = torch.randint(0, VOCAB, (3, 12))
    pads = [0, 4, 11]  # the last row is a single real token
    mask = torch.ones(3, 12, dtype=torch.int64)
    for r, n in enumerate(pads):
        mask[r, :n] = 0
    logits, _ = OnnxMPT(path).run(ids.numpy(), attention_mask=mask.numpy())
    assert np.isfinite(logits).all()  # padding rows see no key: finite fill, no NaN leaking into real rows
    for r, n in enumerate(pads):
        ref = logits_of(model, ids[r:r + 1, n:])[0]
        torch.testing.assert_close(torch.from_numpy(logits[r, n:]), ref, rtol=0, atol=1e-4)


def test_onnx_greedy_decode_matches_generate(onnx_export):
    from mpt_kernels.export.onnx import OnnxMPT

    model, path = onnx_export
    ids = torch.randint(0, VOCAB, (2, 5))
    ref = model.generate(ids, max_new_tokens=10, temperature=0)
    got = OnnxMPT(path).greedy(ids.numpy(), max_new_tokens=10)
    assert got.shape == (2, 15)
    assert len(set(got[:, 5:].ravel().tolist())) > 3, "degenerate generation would make this check weak"
    np.testing.assert_array_equal(got, ref.numpy())


def test_onnx_greedy_decode_left_padded_batch(onnx_export):
    from mpt_kernels.export.onnx import OnnxMPT

    model, path = onnx_export
    ids = torch.randint(0, VOCAB, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, :5] = 0  # prompts of 8 and 3 tokens
    got = OnnxMPT(path).greedy(ids.numpy(), max_new_tokens=10, attention_mask=mask.numpy())
    np.testing.assert_array_equal(got, model.generate(ids, 10, temperature=0, attention_mask=mask).numpy())
    np.testing.assert_array_equal(got[1:, 5:], model.generate(ids[1:, 5:], 10, temperature=0).numpy())


def test_onnx_greedy_stops_at_eos_like_generate(onnx_export):
    """With eos_token_id, a finished row is padded and fed its pad id, and decoding ends once every row
    has finished: the same tokens and length as model.generate."""
    from mpt_kernels.export.onnx import OnnxMPT

    model, path = onnx_export
    runner = OnnxMPT(path)
    torch.manual_seed(7)
    ids = torch.randint(0, VOCAB, (3, 6))
    free = model.generate(ids, 12, temperature=0)[:, 6:]
    # an EOS row 0 produces at its 3rd new token, and one row 1 produces at its 5th: the rows finish
    # at different steps, the third row (if it never emits either) runs to max_new_tokens
    eos = [int(free[0, 2]), int(free[1, 4])]
    for pad in (None, 5):
        ref = model.generate(ids, 12, temperature=0, eos_token_id=eos, pad_token_id=pad)
        got = runner.greedy(ids.numpy(), 12, eos_token_id=eos, pad_token_id=pad)
        np.testing.assert_array_equal(got, ref.numpy())
        assert (got[0, 6 + 3:] == (eos[0] if pad is None else pad)).all()  # filled after its EOS
    # every row finished early: fewer than max_new_tokens columns, as generate returns
    first = int(free[0, 0])
    ref = model.generate(ids[:1], 12, temperature=0, eos_token_id=first)
    got = runner.greedy(ids[:1].numpy(), 12, eos_token_id=np.int64(first))
    assert got.shape == (1, 7)
    np.testing.assert_array_equal(got, ref.numpy())
    np.testing.assert_array_equal(runner.greedy(ids.numpy(), 0), ids.numpy())
    with pytest.raises(ValueError, match="eos_token_id.*vocab_size"):
        runner.greedy(ids.numpy(), 3, eos_token_id=VOCAB + 100)
    with pytest.raises(ValueError, match="pad_token_id"):
        runner.greedy(ids.numpy(), 3, eos_token_id=1, pad_token_id=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        runner.greedy(ids.numpy(), -1)


def test_onnx_verify_checks_the_kv_cache_path(onnx_export, tmp_path, capsys):
    """--verify on the KV-cache graph also decodes tokens through the cache (a prefill-only check would
    pass a graph whose past/present path is wrong)."""
    from mpt_kernels.export.__main__ import _verify_onnx

    model, path = onnx_export
    model.save_pretrained(tmp_path / "ckpt")
    assert _verify_onnx(tmp_path / "ckpt", path) < 1e-4
    out = capsys.readouterr().out
    assert "(prefill)" in out and "decoded through the KV cache" in out


def test_cli_onnx_no_kv_cache_verify(tmp_path, capsys):
    """--verify with --no-kv-cache verified nothing and printed nothing (exit status 0)."""
    from mpt_kernels.export.__main__ import main

    mpt(n_layers=1).save_pretrained(tmp_path / "ckpt")
    assert main(["onnx", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"), "--no-kv-cache",
                 "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify: max |logits(MPTForCausalLM) - logits(onnxruntime)| =" in out
    assert float(out.split("=")[-1]) < 1e-4


def test_onnx_weight_dtype_choice():
    from mpt_kernels.export.onnx import _onnx_weight_dtype

    assert _onnx_weight_dtype(torch.float32, None) == torch.float32
    assert _onnx_weight_dtype(torch.float16, None) == torch.float16
    assert _onnx_weight_dtype(torch.bfloat16, None) == torch.float32
    assert _onnx_weight_dtype(torch.bfloat16, "fp16") == torch.float16
    assert _onnx_weight_dtype(torch.float32, "fp16") == torch.float16


def test_onnx_rejects_bad_arguments(tmp_path):
    from mpt_kernels.export import export_onnx

    with pytest.raises(ValueError, match="opset"):
        export_onnx(mpt(), tmp_path, opset=11)
    with pytest.raises(ValueError, match="dtype"):
        export_onnx(mpt(), tmp_path, dtype="int8")


@pytest.mark.slow
def test_onnx_no_cache_graph_fp16_external_data(tmp_path):
    """The (input_ids, attention_mask) -> logits graph, fp16 weights stored as external data (the path
    a model over 2 GB takes), through onnxruntime's CPU provider."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from mpt_kernels.export import export_onnx

    model = mpt(d_model=32, n_heads=4, n_layers=1)
    path = export_onnx(model, tmp_path / "m.onnx", with_kv_cache=False, dtype="fp16", external_data=True)
    assert path == tmp_path / "m.onnx"
    assert (tmp_path / "m.onnx.data").stat().st_size >= 2 * sum(p.numel() for p in model.parameters())
    assert path.stat().st_size < 100_000  # the graph alone
    assert model.dtype == torch.float32  # the export casts its own copy, never the model
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    ids = torch.randint(0, VOCAB, (2, 9))
    logits = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 9), np.int64)})[0]
    assert logits.dtype == np.float16
    # fp16 weights and activations (scores/softmax in fp32) vs the fp32 model, logits ~5: a few 1e-3.
    torch.testing.assert_close(torch.from_numpy(logits).float(), logits_of(model, ids), rtol=0, atol=3e-2)


# ---------------------------------------------------------------------------------------------------
# Existing outputs, paths and command-line errors (from a user walkthrough)


def test_ft_overwrite_replaces_the_earlier_export(tmp_path):
    untied = mpt(tie_word_embeddings=False)
    export_fastertransformer(untied, tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_fastertransformer(mpt(), tmp_path)
    (tmp_path / "1-gpu" / "notes.txt").write_text("the user's own file")
    tied = mpt()
    out = export_fastertransformer(tied, tmp_path, overwrite=True)
    # The untied export's model.lm_head.weight.bin must not survive: read back, it would untie the head.
    assert set(os.listdir(out)) == expected_ft_files(2, 1) | {"notes.txt"}
    cfg, _ = read_fastertransformer(out)
    assert cfg["tie_word_embeddings"] is True
    ids = torch.randint(0, VOCAB, (1, 7))
    torch.testing.assert_close(logits_of(load_fastertransformer(out), ids), logits_of(tied, ids), rtol=0, atol=1e-5)


def test_ft_config_ini_holds_a_model_path_with_percent(tmp_path):
    """A checkpoint path with '%' (transformers' _name_or_path, the config.ini's model_name) failed with
    'invalid interpolation syntax', after overwrite=True had deleted the earlier export."""
    model = mpt()
    cfg = {**model.config.to_dict(), "_name_or_path": "/ckpts/run-50%/step-100"}
    export_fastertransformer(model, tmp_path)
    out = export_fastertransformer((cfg, model.state_dict()), tmp_path, overwrite=True)
    assert set(os.listdir(out)) == expected_ft_files(2, 1)
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(out / "config.ini")
    assert ini["gpt"]["model_name"] == "/ckpts/run-50%/step-100"
    ids = torch.randint(0, VOCAB, (1, 6))
    torch.testing.assert_close(logits_of(load_fastertransformer(out), ids), logits_of(model, ids), rtol=0, atol=0)


def test_onnx_refuses_an_existing_output_before_exporting(tmp_path):
    from mpt_kernels.export import export_onnx

    (tmp_path / "model.onnx").write_bytes(b"earlier export")
    with pytest.raises(FileExistsError, match="model.onnx exists.*overwrite=True"):
        export_onnx(mpt(), tmp_path)
    (tmp_path / "model.onnx").unlink()
    (tmp_path / "m.onnx.data").write_bytes(b"earlier weights")
    with pytest.raises(FileExistsError, match="m.onnx.data exists"):
        export_onnx(mpt(), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").read_bytes() == b"earlier weights"
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(IsADirectoryError, match="d.onnx is a directory"):
        export_onnx(mpt(), tmp_path / "d.onnx", overwrite=True)


def test_onnx_overwrite_replaces_graph_and_stale_external_data(tmp_path):
    import logging

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort
    from mpt_kernels.export import export_onnx

    (tmp_path / "model.onnx").write_bytes(b"earlier export")
    (tmp_path / "model.onnx.data").write_bytes(b"earlier weights")
    model = mpt(d_model=32, n_heads=4, n_layers=1)
    # torch's exporter logs four warnings per export about torchvision's ops when torchvision is absent:
    # noise about a package the graph never uses (the command line printed it between the progress bars)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    registration.addHandler(handler)
    try:
        path = export_onnx(model, tmp_path, with_kv_cache=False, overwrite=True)
    finally:
        registration.removeHandler(handler)
    assert not [r for r in records if "torchvision" in r.getMessage()]
    assert path == tmp_path / "model.onnx"
    assert not (tmp_path / "model.onnx.data").exists()  # weights are inside this graph: no stale file beside it
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, VOCAB, (1, 5))
    logits = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 5), np.int64)})[0]
    torch.testing.assert_close(torch.from_numpy(logits), logits_of(model, ids), rtol=0, atol=1e-4)


def test_onnx_runner_accepts_the_export_directory(onnx_export, tmp_path):
    from mpt_kernels.export.onnx import OnnxMPT

    model, path = onnx_export
    ids = np.array([[3, 1, 4, 1, 5]])
    by_dir = OnnxMPT(path.parent)  # what export_onnx(model, "onnx/") and the CLI's --out were given
    assert by_dir.path == path
    np.testing.assert_array_equal(by_dir.run(ids)[0], OnnxMPT(path).run(ids)[0])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OnnxMPT(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no .onnx file"):
        OnnxMPT(tmp_path)
    (tmp_path / "a.onnx").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="a.onnx is not a valid ONNX model"):
        OnnxMPT(tmp_path)  # the directory's only .onnx file
    (tmp_path / "b.onnx").write_bytes(b"not a graph either")
    with pytest.raises(FileNotFoundError, match="several .onnx files"):
        OnnxMPT(tmp_path)


def _cli_error(capsys, argv):
    """Run the export CLI expecting an argparse-style error: exit status 2, one clean message."""
    from mpt_kernels.export.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_cli_user_errors_are_clean_messages(tmp_path, capsys):
    err = _cli_error(capsys, ["fastertransformer", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "ft")])
    assert "fastertransformer: error: --model:" in err and "nope does not exist" in err
    err = _cli_error(capsys, ["onnx", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert "onnx: error: --model:" in err and "does not exist" in err
    assert not (tmp_path / "ft").exists() and not (tmp_path / "o").exists()  # a failed export creates nothing

    with pytest.warns(UserWarning, match="qk_ln"):  # save_pretrained: transformers would ignore qk_ln
        mpt(qk_ln=True).save_pretrained(tmp_path / "qkln")
    err = _cli_error(capsys, ["fastertransformer", "--model", str(tmp_path / "qkln"), "--out", str(tmp_path / "ft")])
    assert "qk_ln" in err and "--force" in err and "force=True" not in err

    from safetensors.torch import load_file, save_file

    mpt().save_pretrained(tmp_path / "broken")
    sd = load_file(tmp_path / "broken" / "model.safetensors")
    del sd["transformer.blocks.1.ffn.down_proj.weight"]
    save_file(sd, tmp_path / "broken" / "model.safetensors", metadata={"format": "pt"})
    for fmt in ("fastertransformer", "onnx"):
        err = _cli_error(capsys, [fmt, "--model", str(tmp_path / "broken"), "--out", str(tmp_path / "ft")])
        assert "error: --model: the weights lack transformer.blocks.1.ffn.down_proj.weight" in err
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "config.json").write_text("{n_layers: 2")
    err = _cli_error(capsys, ["onnx", "--model", str(tmp_path / "bad_json"), "--out", str(tmp_path / "ft")])
    assert "error: --model:" in err and "config.json is not valid JSON" in err
    assert not (tmp_path / "ft").exists()  # refused before writing anything

    mpt().save_pretrained(tmp_path / "ckpt")
    err = _cli_error(capsys, ["fastertransformer", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ft"),
                              "--tp", "3"])
    assert "error: --tp: n_heads=4 is not divisible by tensor_parallel=3" in err

    (tmp_path / "ft" / "1-gpu").mkdir(parents=True)
    (tmp_path / "ft" / "1-gpu" / "config.ini").write_text("[gpt]\n")
    err = _cli_error(capsys, ["fastertransformer", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ft")])
    assert "error: --out:" in err and "pass --overwrite" in err

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "model.onnx").write_bytes(b"earlier export")
    err = _cli_error(capsys, ["onnx", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o")])
    assert "error: --out:" in err and "model.onnx exists" in err and "pass --overwrite" in err


def test_unreadable_weight_files_are_user_errors(tmp_path, capsys):
    """A weights file cut short or not a checkpoint at all raised SafetensorError with a traceback; a
    foreign pytorch_model.bin (torch.load's KeyError with an int) crashed the CLI's own error message."""
    from mpt_kernels.export.__main__ import main

    mpt().save_pretrained(tmp_path / "cut")
    f = tmp_path / "cut" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "cut" / "config.json", tmp_path / "bin")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"junk" * 100)
    (tmp_path / "idx").mkdir()
    shutil.copy(tmp_path / "cut" / "config.json", tmp_path / "idx")
    (tmp_path / "idx" / "model.safetensors.index.json").write_text(
        '{"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}')
    with pytest.raises(ValueError, match=r"model_or_dir: cannot read .*model.safetensors .*cut short"):
        MPTGraph(tmp_path / "cut")
    with pytest.raises(FileNotFoundError, match=r"model-00001-of-00002.safetensors is missing"):
        export_fastertransformer(tmp_path / "idx", tmp_path / "ft")
    for text in ("{", '{"weight_map": 3}'):  # a JSONDecodeError / TypeError with a traceback before
        (tmp_path / "idx" / "model.safetensors.index.json").write_text(text)
        with pytest.raises(ValueError, match=r"model.safetensors.index.json is not a safetensors index"):
            export_fastertransformer(tmp_path / "idx", tmp_path / "ft")
    for ckpt, cause in (("cut", "model.safetensors"), ("bin", "pytorch_model.bin")):
        for fmt in ("fastertransformer", "onnx"):
            err = _cli_error(capsys, [fmt, "--model", str(tmp_path / ckpt), "--out", str(tmp_path / "out")])
            assert f"{fmt}: error: --model: cannot read {tmp_path / ckpt / cause}" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ft").exists()


def test_ft_interrupted_export_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """Ctrl-C half-way through printed a KeyboardInterrupt traceback and left a directory whose config.ini
    (written first) made it look complete: load_fastertransformer then failed on a missing rank file, or
    FasterTransformer on a server did, and the next export needed --overwrite. Now the files written are
    removed (config.ini is written last anyway), and the CLI exits 130 with one line."""
    import mpt_kernels.export.fastertransformer as ftmod
    from mpt_kernels.export.__main__ import main

    mpt().save_pretrained(tmp_path / "ckpt")
    real, calls = ftmod._write, []

    def write_then_interrupt(*args):
        calls.append(args)
        if len(calls) == 10:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(ftmod, "_write", write_then_interrupt)
    argv = ["fastertransformer", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ft")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted; nothing was exported" in err and "Traceback" not in err
    assert not (tmp_path / "ft").exists()
    (tmp_path / "mine" / "1-gpu").mkdir(parents=True)
    (tmp_path / "mine" / "1-gpu" / "notes.txt").write_text("the user's own file")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        export_fastertransformer(tmp_path / "ckpt", tmp_path / "mine", overwrite=True)
    assert os.listdir(tmp_path / "mine" / "1-gpu") == ["notes.txt"]  # the user's file and folder stay
    monkeypatch.setattr(ftmod, "_write", real)
    assert main(argv) == 0  # no --overwrite needed: nothing was left behind
    assert set(os.listdir(tmp_path / "ft" / "1-gpu")) == expected_ft_files(2, 1)


def test_fp16_exports_refuse_weights_beyond_fp16_range(tmp_path):
    """A weight above 65504 became inf in the fp16 files / graph (NaN logits at serving time), silently."""
    from mpt_kernels.export import export_onnx

    model = mpt()
    with torch.no_grad():
        model.transformer.blocks[1].ffn.down_proj.weight[3, 5] = 1e5
    with pytest.raises(ValueError, match=r"dtype: model.layers.1.mlp.dense_4h_to_h.weight.0.bin holds values beyond "
                                         r"float16's range \(max \|x\| = 100000"):
        export_fastertransformer(model, tmp_path / "ft", dtype="fp16")
    assert not (tmp_path / "ft").exists()  # the files written before are removed
    with pytest.raises(ValueError, match=r"dtype: transformer.blocks.1.ffn.down_proj.weight holds values beyond "
                                         r"float16's range"):
        export_onnx(model, tmp_path / "onnx", dtype="fp16")
    assert not (tmp_path / "onnx").exists()
    export_fastertransformer(model, tmp_path / "ft", dtype="fp32")  # fp32 holds it


def test_cli_force_warns_in_one_line_and_verify_names_what_was_dropped(tmp_path, capsys):
    """--force printed Python's UserWarning with a source line; --verify then reported a difference of ~1
    with no word that the dropped clip_qkv explains it."""
    from mpt_kernels.export.__main__ import main

    mpt(clip_qkv=0.3, attn_type="grouped_query_attention", kv_n_heads=2).save_pretrained(tmp_path / "ckpt")
    assert main(["fastertransformer", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ft"), "--force",
                 "--verify"]) == 0
    out, err = capsys.readouterr()
    assert "fastertransformer: warning: FasterTransformer cannot run this MPT exactly: clip_qkv=0.3" in err
    assert "UserWarning" not in err and "export_fastertransformer(" not in err
    assert "what --force dropped, so a difference is expected: clip_qkv=0.3" in out
    assert "grouped" not in out  # repeating k/v heads is exact: not a cause of a difference


def test_cli_fastertransformer_overwrite_flag(tmp_path, capsys):
    from mpt_kernels.export.__main__ import main

    mpt().save_pretrained(tmp_path / "ckpt")
    argv = ["fastertransformer", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ft")]
    assert main(argv) == 0
    _cli_error(capsys, argv)
    assert main(argv + ["--overwrite"]) == 0


# ---------------------------------------------------------------------------------------------------
# What no export computes: refused by the one check both exporters share (the model's config rules),
# never exported as a different function.

def test_exports_read_composer_prefixed_checkpoints(tmp_path):
    """A Composer checkpoint (every weight under ``model.``), which from_pretrained reads, exports the
    same bytes as the plain one, in both formats."""
    from safetensors.torch import load_file, save_file

    model = mpt()
    model.save_pretrained(tmp_path / "plain")
    shutil.copytree(tmp_path / "plain", tmp_path / "composer")
    sd = load_file(tmp_path / "plain" / "model.safetensors")
    save_file({"model." + k: v for k, v in sd.items()}, tmp_path / "composer" / "model.safetensors",
              metadata={"format": "pt"})
    ref = MPTForCausalLM.from_pretrained(tmp_path / "composer").state_dict()
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())
    a = export_fastertransformer(tmp_path / "plain", tmp_path / "ft_a")
    b = export_fastertransformer(tmp_path / "composer", tmp_path / "ft_b")
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for f in sorted(os.listdir(a)):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    from mpt_kernels.export.onnx import MPTGraph

    ga, gb = MPTGraph(tmp_path / "plain").eval(), MPTGraph(tmp_path / "composer").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        assert torch.equal(ga(ids, None, *ga.empty_past(1))[0], gb(ids, None, *gb.empty_past(1))[0])


def _edited_checkpoint(tmp_path, **changes):
    """A saved tiny MPT whose config.json gets ``changes`` (top-level keys; ``attn`` updates attn_config)."""
    import json

    model = mpt()
    model.save_pretrained(tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "config.json"
    d = json.loads(f.read_text())
    for k, v in changes.items():
        if k == "attn":
            d["attn_config"].update(v)
        else:
            d[k] = v
    f.write_text(json.dumps(d))
    return model, tmp_path / "ckpt"


@pytest.mark.parametrize("changes, setting", [
    (dict(norm_type="rmsnorm"), "norm_type"),
    (dict(norm_type="low_precision_rmsnorm"), "norm_type"),
    (dict(ffn_config={"ffn_type": "mptglu"}), "ffn_type"),
    (dict(ffn_config={"ffn_type": "mptmlp", "ffn_act_fn": {"name": "silu"}}), "ffn_act_fn"),
    (dict(attn={"prefix_lm": True}), "prefix_lm"),
    (dict(attn={"alibi": False}), "alibi"),
])
def test_exports_refuse_what_no_export_computes(tmp_path, changes, setting):
    _, ckpt = _edited_checkpoint(tmp_path, **changes)
    with pytest.raises(ValueError, match=rf"model_or_dir: the export cannot compute this MPT: .*{setting}"):
        MPTGraph(ckpt)
    with pytest.raises(ValueError, match=rf"model_or_dir: the export cannot compute this MPT: .*{setting}"):
        export_fastertransformer(ckpt, tmp_path / "ft", force=True)  # not a force-able approximation
    with pytest.raises(ValueError, match=setting):
        MPTForCausalLM.from_pretrained(ckpt)  # the same rule as the model's
    assert not (tmp_path / "ft").exists()


def test_exports_refuse_weights_they_do_not_read(tmp_path):
    """A GLU's gate weights under an mptmlp config (or a block past n_layers) would be dropped silently:
    refused, naming the weight."""
    from safetensors.torch import load_file, save_file

    _, ckpt = _edited_checkpoint(tmp_path)
    f = ckpt / "model.safetensors"
    clean = load_file(f)
    for extra in ("transformer.blocks.0.ffn.gate_proj.weight", "transformer.blocks.2.norm_1.weight",
                  "transformer.blocks.1.attn.q_ln.weight"):  # q_ln without qk_ln
        save_file({**clean, extra: torch.ones(128, 32)}, f, metadata={"format": "pt"})
        with pytest.raises(ValueError, match=rf"model_or_dir: the weights hold {re.escape(extra)}"):
            MPTGraph(ckpt)
        with pytest.raises(ValueError, match=re.escape(extra)):
            export_fastertransformer(ckpt, tmp_path / "ft", force=True)
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("changes, message", [
    # the config's sizes disagree with the weights: FasterTransformer's config.ini would describe other files
    (dict(vocab_size=90), r"transformer.wte.weight has shape \(97, 32\), the config implies \(90, 32\)"),
    (dict(expansion_ratio=3), r"transformer.blocks.0.ffn.up_proj.weight has shape \(128, 32\), the config implies \(96, 32\)"),
    (dict(attn={"attn_type": "grouped_query_attention", "kv_n_heads": 2}),
     r"transformer.blocks.0.attn.Wqkv.weight has shape \(96, 32\), the config implies \(64, 32\)"),
    # weights the config's MPT has and the checkpoint lacks (an ONNX graph crashed, FT wrote zeros)
    (dict(attn={"qk_ln": True}), r"the weights lack transformer.blocks.0.attn.q_ln.weight"),
    (dict(no_bias=False), r"the weights lack transformer.blocks.0.norm_1.bias"),
])
def test_exports_refuse_weights_that_disagree_with_the_config(tmp_path, changes, message):
    """A config.json that does not describe its weights (edited by hand, another model's) is refused, as
    from_pretrained refuses it, instead of exported as some other function or failing with a traceback."""
    _, ckpt = _edited_checkpoint(tmp_path, **changes)
    with pytest.raises(ValueError, match="model_or_dir: " + message):
        MPTGraph(ckpt)
    with pytest.raises(ValueError, match="model_or_dir: " + message):
        export_fastertransformer(ckpt, tmp_path / "ft", force=True)
    with pytest.raises(ValueError):
        MPTForCausalLM.from_pretrained(ckpt)  # the model refuses it too
    assert not (tmp_path / "ft").exists()


def test_exports_refuse_biases_under_no_bias(tmp_path):
    """no_bias=True with bias weights in the checkpoint: the model refuses it; the exports used the
    biases (the ONNX graph's logits moved by ~2 against the checkpoint's model)."""
    from safetensors.torch import load_file, save_file

    _, ckpt = _edited_checkpoint(tmp_path)
    f = ckpt / "model.safetensors"
    save_file({**load_file(f), "transformer.blocks.0.ffn.up_proj.bias": torch.randn(128)}, f, metadata={"format": "pt"})
    for export in (MPTGraph, lambda c: export_fastertransformer(c, tmp_path / "ft", force=True)):
        with pytest.raises(ValueError, match=r"the weights hold transformer.blocks.0.ffn.up_proj.bias, which this "
                                             r"config \(n_layers=2, no_bias=True"):
            export(ckpt)
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("kw", [
    {}, {"no_bias": False, "qk_ln": True, "attn_type": "grouped_query_attention", "kv_n_heads": 2},
    {"attn_type": "multiquery_attention", "tie_word_embeddings": False, "expansion_ratio": 1.5},
])
def test_expected_weights_are_the_models(kw):
    """The names and shapes the exports require are exactly our model's parameters."""
    from mpt_kernels.export._source import config_to_dict, expected_weights

    with torch.device("meta"):
        model = mpt(**kw)
    assert expected_weights(config_to_dict(model.config)) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("setting", ["alibi_bias_max", "qk_ln", "logit_scale"])
def test_exports_refuse_transformers_models_that_ignore_their_config(tmp_path, setting):
    """transformers' MptForCausalLM ignores alibi_bias_max (always 8), qk_ln and logit_scale: the exports,
    reading the config, computed another function than the object (ALiBi max 16: logits off by 0.6,
    logit_scale 0.5: by 1.7; qk_ln crashed in the graph module)."""
    transformers = pytest.importorskip("transformers")
    attn = {"alibi_bias_max": 16} if setting == "alibi_bias_max" else {"qk_ln": True} if setting == "qk_ln" else {}
    extra = {"logit_scale": 0.5} if setting == "logit_scale" else {}
    cfg = transformers.MptConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=64, vocab_size=VOCAB,
                                 attn_config=attn or None, **extra)
    model = transformers.MptForCausalLM(cfg).eval()
    for export in (MPTGraph, lambda m: export_fastertransformer(m, tmp_path / "ft", force=True)):
        with pytest.raises(ValueError, match=rf"model_or_dir: this MptForCausalLM \(transformers\) does not compute "
                                             rf"the MPT its config describes: {setting}"):
            export(model)
    assert not (tmp_path / "ft").exists()


def test_exports_apply_mpt_defaults_to_a_short_config(tmp_path):
    """A config.json that leaves MPT's defaults out (max_seq_len, expansion_ratio, attn_config, ...) loads
    in the model; the FasterTransformer export failed with 'error: --model: max_seq_len' (a KeyError)."""
    import json

    model, ckpt = _edited_checkpoint(tmp_path)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "mpt", "d_model": 32, "n_heads": 4, "n_layers": 2,
                                                  "vocab_size": VOCAB}))
    out = export_fastertransformer(ckpt, tmp_path / "ft")
    ini = configparser.ConfigParser()
    ini.read(out / "config.ini")
    assert ini["gpt"]["max_pos_seq_len"] == "2048" and ini["gpt"]["inter_size"] == "128"
    ids = torch.randint(0, VOCAB, (2, 7))
    torch.testing.assert_close(logits_of(load_fastertransformer(out), ids), logits_of(model, ids), rtol=0, atol=0)


def test_exports_ignore_training_only_settings(tmp_path):
    """attn_impl, attn_pdrop, dropouts and init_config do not change the function an export writes."""
    model, ckpt = _edited_checkpoint(tmp_path, attn={"attn_impl": "flash", "attn_pdrop": 0.1}, resid_pdrop=0.2,
                                     emb_pdrop=0.1, init_config={"name": "no_such_init"})
    ids = torch.randint(0, VOCAB, (2, 7))
    g = MPTGraph(ckpt).eval()
    with torch.no_grad():
        torch.testing.assert_close(g(ids, None, *g.empty_past(2))[0], logits_of(model, ids), rtol=0, atol=1e-5)
    out = export_fastertransformer(ckpt, tmp_path / "ft")
    torch.testing.assert_close(logits_of(load_fastertransformer(out), ids), logits_of(model, ids), rtol=0, atol=0)


def test_cli_errors_name_the_flag(tmp_path, capsys):
    """Every user error prints ``error: <flag>: <cause>``: an --out that is a file, an llm-foundry
    option no export computes, an option FasterTransformer needs --force for."""
    _, ckpt = _edited_checkpoint(tmp_path, attn={"rope": True})
    for fmt in ("fastertransformer", "onnx"):
        err = _cli_error(capsys, [fmt, "--model", str(ckpt), "--out", str(ckpt / "config.json")])
        assert f"{fmt}: error: --out: {ckpt / 'config.json'} exists and is not a directory" in err, err
        err = _cli_error(capsys, [fmt, "--model", str(ckpt), "--out", str(tmp_path / "out")])
        assert f"{fmt}: error: --model: attn_config.rope=True" in err, err
    with pytest.warns(UserWarning, match="alibi_bias_max"):
        mpt(alibi_bias_max=16).save_pretrained(tmp_path / "abm")
    err = _cli_error(capsys, ["fastertransformer", "--model", str(tmp_path / "abm"), "--out", str(tmp_path / "out")])
    assert "fastertransformer: error: --model: FasterTransformer cannot run this MPT exactly: alibi_bias_max" in err
    assert not (tmp_path / "out").exists()


def test_export_onnx_has_its_signature_and_imports_onnx_lazily():
    """`help(mpt_kernels.export.export_onnx)` showed (*args, **kwargs): a lazy wrapper hid the signature.
    Importing the package still loads no onnx / onnxscript / onnxruntime (they are needed only when
    an ONNX export runs)."""
    import inspect
    import subprocess
    import sys

    from _subproc import NEUTRAL_CWD, subprocess_env
    from mpt_kernels.export import export_onnx
    from mpt_kernels.export.onnx import export_onnx as impl

    assert export_onnx is impl
    assert list(inspect.signature(export_onnx).parameters)[:3] == ["model", "path", "opset"]
    code = ("import sys, mpt_kernels.export; "
            "print(sorted(m for m in ('onnx', 'onnxscript', 'onnxruntime') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=subprocess_env(), cwd=NEUTRAL_CWD)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_onnx_interrupted_or_failed_export_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """Ctrl-C during torch.onnx.export left the progress bar open (the CLI's "interrupted" line was
    printed onto the bar's line) and the output folders it had created; a failure while saving left
    a partial .onnx file. Now the bar's line ends, partial files and the folders the export created are
    removed, and the next export needs no --overwrite."""
    from pathlib import Path

    import onnx as onnx_pkg

    from mpt_kernels.export import export_onnx
    from mpt_kernels.export.__main__ import main

    pytest.importorskip("onnxscript")
    mpt().save_pretrained(tmp_path / "ckpt")

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", interrupt)
    out = tmp_path / "on" / "sub" / "m.onnx"
    assert main(["onnx", "--model", str(tmp_path / "ckpt"), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    line = "python -m mpt_kernels.export onnx: interrupted; nothing was exported"
    assert line in err.splitlines(), err  # on a line of its own, not after the bar's
    assert not (tmp_path / "on").exists()
    monkeypatch.undo()

    real_save = onnx_pkg.save_model

    def save_half_then_fail(proto, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError("No space left on device")

    (tmp_path / "keep").mkdir()
    monkeypatch.setattr(onnx_pkg, "save_model", save_half_then_fail)
    with pytest.raises(OSError, match="No space"):
        export_onnx(tmp_path / "ckpt", tmp_path / "keep" / "new" / "m.onnx")
    assert os.listdir(tmp_path / "keep") == []  # the partial file and the folder it made are gone
    monkeypatch.setattr(onnx_pkg, "save_model", real_save)
    assert export_onnx(tmp_path / "ckpt", tmp_path / "keep" / "new" / "m.onnx").is_file()


def test_cli_fp16_range_error_names_the_flag(tmp_path, capsys):
    from mpt_kernels.export.__main__ import _cli_message

    msg = _cli_message(ValueError("dtype: w holds values beyond float16's range (max |x| = 7e+04 > 65504); "
                                  "export with dtype='fp32'"))
    assert msg.endswith("export with --dtype fp32") and msg.startswith("--dtype: "), msg


def test_cli_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`python -m mpt_kernels.export fastertransformer ... --verify | head -1`: the reader leaving raised
    BrokenPipeError with a traceback. Now: exit status 1, no traceback; the export itself is complete."""
    import os
    import subprocess
    import sys

    from _subproc import NEUTRAL_CWD, subprocess_env

    mpt(n_layers=1).save_pretrained(tmp_path / "ckpt")
    rd, wr = os.pipe()
    os.close(rd)  # the reader is gone before the first line
    try:
        r = subprocess.run([sys.executable, "-m", "mpt_kernels.export", "fastertransformer", "--model",
                            str(tmp_path / "ckpt"), "--out", str(tmp_path / "ft"), "--verify"], stdout=wr,
                           stderr=subprocess.PIPE, text=True, timeout=180, env=subprocess_env(OMP_NUM_THREADS="1"),
                           cwd=NEUTRAL_CWD)
    finally:
        os.close(wr)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    assert (tmp_path / "ft" / "1-gpu" / "config.ini").is_file()
