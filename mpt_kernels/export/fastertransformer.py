"""MPT -> FasterTransformer GPT checkpoint, and back.

FasterTransformer's GPT model (which serves MPT through its ALiBi switch) reads a directory
``<out>/<TP>-gpu/`` of raw little-endian arrays, one file per tensor and per tensor-parallel rank,
described by ``config.ini``. This is the layout llm-foundry's MPT converter writes; see
docs/export.md for every file and its shape. Layout facts that matter here:

* FT multiplies ``x @ W`` so every linear weight is stored transposed from torch's ``(out, in)``.
* The fused QKV weight is stored as ``(d_model, 3, d_model / TP)``: each rank gets its own heads of
  q, k and v, which works because heads are contiguous ``head_dim`` blocks of the output axis.
* Column-parallel layers (QKV, ``dense_h_to_4h``) split the output axis and carry per-rank biases;
  row-parallel layers (``attention.dense``, ``dense_4h_to_h``) split the input axis and carry one
  shared bias, added once after the all-reduce.
* FT always adds biases and always has LayerNorm biases: MPT's ``no_bias`` becomes zero files.
"""
from __future__ import annotations

import configparser
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from ._source import (check_out_dir, check_required_weights, config_to_dict, default_softmax_scale, kv_heads,
                      open_source)

_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}

# FasterTransformer computes its ALiBi slopes with the paper's maximum bias of 8 and scales scores by
# 1/sqrt(size_per_head); anything else is a different function there.
_FT_ALIBI_BIAS_MAX = 8


def _check_dtype(dtype: str) -> type:
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_NP_DTYPES)}, got {dtype!r}")
    return _NP_DTYPES[dtype]


def _check_tp(tensor_parallel, n_heads: int, d_model: int, inter_size: int) -> int:
    if not isinstance(tensor_parallel, int) or isinstance(tensor_parallel, bool) or tensor_parallel < 1:
        raise ValueError(f"tensor_parallel: expected a positive int, got {tensor_parallel!r}")
    if n_heads % tensor_parallel:
        raise ValueError(
            f"tensor_parallel: n_heads={n_heads} is not divisible by tensor_parallel={tensor_parallel} "
            "(FasterTransformer gives each rank whole heads)"
        )
    if d_model % tensor_parallel:
        raise ValueError(f"tensor_parallel: d_model={d_model} is not divisible by tensor_parallel={tensor_parallel}")
    if inter_size % tensor_parallel:
        raise ValueError(
            f"tensor_parallel: the FFN width {inter_size} is not divisible by tensor_parallel={tensor_parallel}"
        )
    return tensor_parallel


def unsupported_features(cfg: dict, dropped_only: bool = False) -> list[str]:
    """MPT options FasterTransformer's GPT cannot compute, each as a sentence: what ``force=True`` may
    drop (``dropped_only``: without grouped-query attention, which the export repeats exactly). What no
    export computes (rmsnorm, a GLU or SiLU FFN, prefix_lm, ...) is refused before, by ``open_source``
    (``_source.check_computable``), with or without force."""
    attn = cfg["attn_config"]
    out = []
    if attn.get("clip_qkv"):
        out.append(f"clip_qkv={attn['clip_qkv']} (FasterTransformer does not clamp q, k, v; the clamp is dropped)")
    if attn.get("qk_ln"):
        out.append("qk_ln=True (FasterTransformer has no LayerNorm on q and k; those weights are dropped)")
    if kv_heads(cfg) != cfg["n_heads"] and not dropped_only:
        out.append(
            f"grouped/multi-query attention (kv_n_heads={kv_heads(cfg)}, n_heads={cfg['n_heads']}): "
            "FasterTransformer's GPT needs one k/v head per query head; k and v are repeated to that "
            "(the same function, more memory)"
        )
    if attn.get("alibi") and float(attn.get("alibi_bias_max", 8)) != _FT_ALIBI_BIAS_MAX:
        out.append(f"alibi_bias_max={attn['alibi_bias_max']} (FasterTransformer's ALiBi slopes assume 8)")
    scale = attn.get("softmax_scale")
    if scale is not None and not math.isclose(scale, default_softmax_scale(cfg), rel_tol=1e-6):
        out.append(f"softmax_scale={scale} (FasterTransformer uses 1/sqrt(size_per_head))")
    if cfg.get("logit_scale") not in (None, 1, 1.0):
        out.append(f"logit_scale={cfg['logit_scale']} (FasterTransformer does not scale logits)")
    return out


def _token_id(*candidates) -> int:
    for c in candidates:
        if isinstance(c, (list, tuple)):
            c = c[0] if c else None
        if c is not None:
            return int(c)
    return 0


def _write(path: Path, t: torch.Tensor | np.ndarray, np_dtype) -> None:
    a = t.detach().to("cpu", torch.float32).numpy() if isinstance(t, torch.Tensor) else t
    with np.errstate(over="ignore"):  # an overflow is reported below, naming the file
        out = a.astype(np_dtype, copy=False)
    if np_dtype is np.float16 and not np.isfinite(out).all() and np.isfinite(a).all():
        # fp16 tops out at 65504: a larger weight would become inf in FasterTransformer, and NaN logits
        raise ValueError(f"dtype: {path.name} holds values beyond float16's range (max |x| = "
                         f"{float(np.abs(a).max()):.6g} > 65504); export with dtype='fp32'")
    # tofile always writes C order; make the (transposed) layout explicit rather than incidental.
    np.ascontiguousarray(out).tofile(path)


def export_fastertransformer(model_or_dir, out_dir, tensor_parallel: int = 1, dtype: str = "fp32",
                             force: bool = False, overwrite: bool = False, progress: bool = False,
                             start_id: int | None = None, end_id: int | None = None) -> Path:
    """Write ``model_or_dir`` (an MPT model or a Hugging Face MPT checkpoint directory) as a
    FasterTransformer GPT checkpoint in ``<out_dir>/<tensor_parallel>-gpu/`` and return that path.

    ``dtype`` ("fp32" or "fp16") is FasterTransformer's ``weight_data_type``. Options FasterTransformer
    cannot compute (clip_qkv, qk_ln, grouped-query attention, a non-default ALiBi maximum or softmax
    scale, logit_scale) raise ``ValueError`` unless ``force=True``, which warns and exports what
    FasterTransformer can run (grouped-query k/v heads are repeated, which is exact). ``start_id`` and
    ``end_id`` default to the config's bos/eos token ids (0 when it has none). A non-empty
    ``<out_dir>/<tensor_parallel>-gpu/`` raises ``FileExistsError`` unless ``overwrite=True``, which first
    removes the files an export writes there (``config.ini``, ``model.*.bin``) and nothing else.
    """
    np_dtype = _check_dtype(dtype)
    check_out_dir(out_dir, "out_dir")
    cfg, src = open_source(model_or_dir)
    check_required_weights(cfg, src)
    d, n_heads, n_layers = int(cfg["d_model"]), int(cfg["n_heads"]), int(cfg["n_layers"])
    if d % n_heads:
        raise ValueError(f"model_or_dir: d_model={d} is not divisible by n_heads={n_heads}")
    head_dim, n_kv = d // n_heads, kv_heads(cfg)
    inter = int(src.shape("transformer.blocks.0.ffn.up_proj.weight")[0])  # = expansion_ratio * d (checked above)
    tp = _check_tp(tensor_parallel, n_heads, d, inter)

    problems = unsupported_features(cfg)
    if problems:
        msg = "FasterTransformer cannot run this MPT exactly: " + "; ".join(problems)
        if not force:
            raise ValueError(f"model_or_dir: {msg}. Pass force=True (--force) to export anyway.")
        warnings.warn(msg, stacklevel=2)

    # (open_source refuses alibi=False and a wpe weight: every export uses ALiBi, no learned positions)
    # No interpolation: a '%' in a value (a model path like run-50%/) is text, not a reference.
    ini = configparser.ConfigParser(interpolation=None)
    ini["gpt"] = {
        "model_name": cfg.get("_name_or_path") or "mpt",
        "head_num": str(n_heads),
        "size_per_head": str(head_dim),
        "inter_size": str(inter),
        "max_pos_seq_len": str(cfg["max_seq_len"]),
        "num_layer": str(n_layers),
        "vocab_size": str(cfg["vocab_size"]),
        "start_id": str(_token_id(start_id, cfg.get("bos_token_id"), cfg.get("eos_token_id"))),
        "end_id": str(_token_id(end_id, cfg.get("eos_token_id"), cfg.get("bos_token_id"))),
        "weight_data_type": dtype,
        "tensor_para_size": str(tp),
        "layernorm_eps": str(cfg["layer_norm_epsilon"]),
        # MPT's block structure, spelled out rather than left to a reader's defaults (FasterTransformer's
        # GPT readers default to these, but other readers of this format, e.g. for OPT, do not):
        # LayerNorm before attention and FFN, a final LayerNorm, none after the embedding, GELU.
        "layernorm_type": "pre_layernorm",
        "activation_type": "Gelu",
        "has_pre_decoder_layernorm": "False",
        "has_post_decoder_layernorm": "True",
        "has_positional_encoding": "False",
        "use_attention_linear_bias": "True",
    }
    save_dir = Path(out_dir) / f"{tp}-gpu"
    if save_dir.exists() and any(save_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"out_dir: {save_dir} exists and is not empty (pass overwrite=True, --overwrite "
                                  "on the command line, to replace it)")
        # Remove the files an earlier export wrote, nothing else: a stale model.lm_head.weight.bin
        # would make a tied model read back as untied.
        for f in [save_dir / "config.ini", *save_dir.glob("model.*.bin")]:
            if f.is_file():
                f.unlink()
    new_dirs = [q for q in (save_dir, *save_dir.parents) if not q.exists()]  # deepest first
    save_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def w(name, t):
        f = save_dir / f"model.{name}.bin"
        written.append(f)
        _write(f, t, np_dtype)

    def bias_or_zeros(name, size):
        b = src.get(name)
        return b if b is not None else torch.zeros(size)

    from tqdm.auto import tqdm

    bar = tqdm(total=n_layers + 1, desc=f"FasterTransformer TP={tp}", unit="layer", disable=not progress)
    try:
        w("wte", src["transformer.wte.weight"])
        if not cfg.get("tie_word_embeddings", True) and "lm_head.weight" in src:
            w("lm_head.weight", src["lm_head.weight"])
        w("final_layernorm.weight", src["transformer.norm_f.weight"])
        w("final_layernorm.bias", bias_or_zeros("transformer.norm_f.bias", d))
        bar.update(1)

        for i in range(n_layers):
            p, o = f"transformer.blocks.{i}.", f"layers.{i}."
            w(o + "input_layernorm.weight", src[p + "norm_1.weight"])
            w(o + "input_layernorm.bias", bias_or_zeros(p + "norm_1.bias", d))
            w(o + "post_attention_layernorm.weight", src[p + "norm_2.weight"])
            w(o + "post_attention_layernorm.bias", bias_or_zeros(p + "norm_2.bias", d))

            wqkv = src[p + "attn.Wqkv.weight"]  # (d + 2*n_kv*head_dim, d): rows [q; k; v]
            bqkv = bias_or_zeros(p + "attn.Wqkv.bias", wqkv.shape[0])
            if n_kv != n_heads:
                wqkv, bqkv = _repeat_kv(wqkv, n_heads, n_kv, head_dim), _repeat_kv(bqkv, n_heads, n_kv, head_dim)
            qkv_w = wqkv.T.reshape(d, 3, d)  # (in, q|k|v, out)
            qkv_b = bqkv.reshape(3, d)
            for r, (wr, br) in enumerate(zip(qkv_w.chunk(tp, dim=-1), qkv_b.chunk(tp, dim=-1))):
                w(o + f"attention.query_key_value.weight.{r}", wr)  # (d, 3, d/TP)
                w(o + f"attention.query_key_value.bias.{r}", br)  # (3, d/TP)

            for r, wr in enumerate(src[p + "attn.out_proj.weight"].T.chunk(tp, dim=0)):
                w(o + f"attention.dense.weight.{r}", wr)  # (d/TP, d)
            w(o + "attention.dense.bias", bias_or_zeros(p + "attn.out_proj.bias", d))

            up_w = src[p + "ffn.up_proj.weight"].T  # (d, inter)
            up_b = bias_or_zeros(p + "ffn.up_proj.bias", inter)
            for r, (wr, br) in enumerate(zip(up_w.chunk(tp, dim=-1), up_b.chunk(tp, dim=-1))):
                w(o + f"mlp.dense_h_to_4h.weight.{r}", wr)  # (d, inter/TP)
                w(o + f"mlp.dense_h_to_4h.bias.{r}", br)  # (inter/TP,)
            for r, wr in enumerate(src[p + "ffn.down_proj.weight"].T.chunk(tp, dim=0)):
                w(o + f"mlp.dense_4h_to_h.weight.{r}", wr)  # (inter/TP, d)
            w(o + "mlp.dense_4h_to_h.bias", bias_or_zeros(p + "ffn.down_proj.bias", d))
            bar.update(1)
        # config.ini last: it marks a complete export (read_fastertransformer and FasterTransformer start
        # from it), so an export interrupted or failed half-way is not taken for one.
        written.append(save_dir / "config.ini")
        with open(save_dir / "config.ini", "w") as f:
            ini.write(f)
    except BaseException:
        # A failed or interrupted export leaves nothing behind (the user's own files stay): no half
        # directory to mistake for an export, none to --overwrite next time.
        for f in written:
            f.unlink(missing_ok=True)
        for q in new_dirs:
            try:
                q.rmdir()
            except OSError:  # not empty: something else lives there
                break
        raise
    finally:
        bar.close()
    return save_dir


def _repeat_kv(t: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """Grouped-query QKV rows [q (H*hd); k (Hkv*hd); v (Hkv*hd)] -> multi-head rows, each k/v head
    repeated for the H/Hkv query heads that share it (MPT's repeat_interleave order)."""
    q, k, v = t.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=0)
    rest = k.shape[1:]
    rep = n_heads // n_kv
    k = k.reshape(n_kv, head_dim, *rest).repeat_interleave(rep, dim=0).reshape(n_heads * head_dim, *rest)
    v = v.reshape(n_kv, head_dim, *rest).repeat_interleave(rep, dim=0).reshape(n_heads * head_dim, *rest)
    return torch.cat([q, k, v], dim=0)


# ---------------------------------------------------------------------------------------------------
# Reading back


def _find_ft_dir(path) -> Path:
    path = Path(path)
    if (path / "config.ini").exists():
        return path
    subs = sorted(p for p in path.glob("*-gpu") if (p / "config.ini").exists())
    if len(subs) == 1:
        return subs[0]
    if not subs:
        raise FileNotFoundError(f"path: {path} holds no config.ini nor a <N>-gpu/ directory with one")
    raise ValueError(f"path: {path} holds several FasterTransformer exports {[s.name for s in subs]}; pass one")


def read_fastertransformer(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a FasterTransformer GPT checkpoint of an MPT (``<out>/<N>-gpu`` or ``<out>`` holding one)
    written by any tensor-parallel size. Returns (Hugging Face MPT config dict, float32 state dict
    under MPT's parameter names). ``no_bias`` is inferred: all bias files zero -> True."""
    ft_dir = _find_ft_dir(path)
    ini_path = ft_dir / "config.ini"
    ini = configparser.ConfigParser(interpolation=None)
    try:
        with open(ini_path, encoding="utf-8") as f:
            ini.read_file(f)
    except (configparser.Error, UnicodeDecodeError) as exc:  # no section header, a key given twice, binary
        raise ValueError(f"path: {ini_path} is not a FasterTransformer config.ini ({exc})") from exc
    if "gpt" not in ini:
        raise ValueError(f"path: {ini_path} has no [gpt] section (not a FasterTransformer GPT checkpoint)")
    g = ini["gpt"]
    _MISSING = object()

    def val(key, kind, fallback=_MISSING):
        """[gpt] key as int / float / bool, with an error naming the file and key."""
        if key not in g:
            if fallback is _MISSING:
                raise ValueError(f"path: {ini_path} [gpt] has no {key} (not a FasterTransformer GPT checkpoint?)")
            return fallback
        get = {int: g.getint, float: g.getfloat, bool: g.getboolean}[kind]
        try:
            v = get(key)
        except ValueError as exc:
            raise ValueError(f"path: {ini_path} [gpt] {key} = {g[key]!r} is not a valid {kind.__name__}") from exc
        if kind is int and v < (0 if key in ("start_id", "end_id") else 1):
            raise ValueError(f"path: {ini_path} [gpt] {key} = {v} is out of range")
        return v

    n_heads, head_dim = val("head_num", int), val("size_per_head", int)
    n_layers, inter, vocab = val("num_layer", int), val("inter_size", int), val("vocab_size", int)
    max_seq_len = val("max_pos_seq_len", int)
    tp = val("tensor_para_size", int, 1)
    d = n_heads * head_dim
    _check_tp(tp, n_heads, d, inter)
    np_dtype = _check_dtype(g.get("weight_data_type", "fp32"))
    alibi = val("use_attention_linear_bias", bool, False)
    # MPT's block structure (what the writer spells out): another one would be read as MPT, wrongly
    for key, want in (("layernorm_type", "pre_layernorm"), ("activation_type", "gelu")):
        if key in g and g[key].strip().lower() != want:
            raise ValueError(f"path: {ini_path} [gpt] {key} = {g[key]!r}: only MPT's {want!r} can be read")
    for key, want in (("has_pre_decoder_layernorm", False), ("has_post_decoder_layernorm", True)):
        if val(key, bool, want) != want:
            raise ValueError(f"path: {ini_path} [gpt] {key} = {g[key]!r}: MPT has {want} (not an MPT checkpoint)")

    def rd(name, shape):
        f = ft_dir / f"model.{name}.bin"
        if not f.exists():
            raise FileNotFoundError(f"path: {f} is missing")
        a = np.fromfile(f, dtype=np_dtype)
        if a.size != math.prod(shape):
            raise ValueError(f"path: {f} holds {a.size} values, expected {math.prod(shape)} for shape {shape}")
        return torch.from_numpy(a.astype(np.float32).reshape(shape))

    sd: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    sd["transformer.wte.weight"] = rd("wte", (vocab, d))
    if val("has_positional_encoding", bool, False):
        sd["transformer.wpe.weight"] = rd("wpe", (max_seq_len, d))
    tied = not (ft_dir / "model.lm_head.weight.bin").exists()
    if not tied:
        sd["lm_head.weight"] = rd("lm_head.weight", (vocab, d))
    sd["transformer.norm_f.weight"] = rd("final_layernorm.weight", (d,))
    biases["transformer.norm_f.bias"] = rd("final_layernorm.bias", (d,))
    for i in range(n_layers):
        p, o = f"transformer.blocks.{i}.", f"layers.{i}."
        sd[p + "norm_1.weight"] = rd(o + "input_layernorm.weight", (d,))
        biases[p + "norm_1.bias"] = rd(o + "input_layernorm.bias", (d,))
        sd[p + "norm_2.weight"] = rd(o + "post_attention_layernorm.weight", (d,))
        biases[p + "norm_2.bias"] = rd(o + "post_attention_layernorm.bias", (d,))
        qkv_w = torch.cat([rd(o + f"attention.query_key_value.weight.{r}", (d, 3, d // tp)) for r in range(tp)], -1)
        qkv_b = torch.cat([rd(o + f"attention.query_key_value.bias.{r}", (3, d // tp)) for r in range(tp)], -1)
        sd[p + "attn.Wqkv.weight"] = qkv_w.reshape(d, 3 * d).T.contiguous()
        biases[p + "attn.Wqkv.bias"] = qkv_b.reshape(3 * d)
        dense = torch.cat([rd(o + f"attention.dense.weight.{r}", (d // tp, d)) for r in range(tp)], 0)
        sd[p + "attn.out_proj.weight"] = dense.T.contiguous()
        biases[p + "attn.out_proj.bias"] = rd(o + "attention.dense.bias", (d,))
        up_w = torch.cat([rd(o + f"mlp.dense_h_to_4h.weight.{r}", (d, inter // tp)) for r in range(tp)], -1)
        up_b = torch.cat([rd(o + f"mlp.dense_h_to_4h.bias.{r}", (inter // tp,)) for r in range(tp)], -1)
        sd[p + "ffn.up_proj.weight"] = up_w.T.contiguous()
        biases[p + "ffn.up_proj.bias"] = up_b
        down = torch.cat([rd(o + f"mlp.dense_4h_to_h.weight.{r}", (inter // tp, d)) for r in range(tp)], 0)
        sd[p + "ffn.down_proj.weight"] = down.T.contiguous()
        biases[p + "ffn.down_proj.bias"] = rd(o + "mlp.dense_4h_to_h.bias", (d,))

    no_bias = all(not bool(b.any()) for b in biases.values())
    if not no_bias:
        sd.update(biases)
    if tied:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]

    start_id, end_id = val("start_id", int, 0), val("end_id", int, 0)
    expansion = inter // d if inter % d == 0 else inter / d
    cfg = config_to_dict({
        "model_type": "mpt",
        "d_model": d,
        "n_heads": n_heads,
        "n_layers": n_layers,
        "expansion_ratio": expansion,
        "max_seq_len": max_seq_len,
        "vocab_size": vocab,
        "layer_norm_epsilon": val("layernorm_eps", float, 1e-5),
        "no_bias": no_bias,
        "learned_pos_emb": "transformer.wpe.weight" in sd,
        "tie_word_embeddings": tied,
        "bos_token_id": start_id,
        "eos_token_id": end_id,
        "attn_config": {"alibi": alibi, "alibi_bias_max": _FT_ALIBI_BIAS_MAX},
    })
    return cfg, sd


def load_fastertransformer(path, torch_dtype: torch.dtype = torch.float32, attn_impl: str = "flash"):
    """Rebuild our ``MPTForCausalLM`` from a FasterTransformer checkpoint of any tensor-parallel size:
    the model FasterTransformer would run (see ``read_fastertransformer``). ``attn_impl`` as in
    ``MPTForCausalLM.from_pretrained`` ("flash": mpt_kernels' attention kernel; "torch": reference)."""
    from ..model import MPTConfig, MPTForCausalLM

    cfg, sd = read_fastertransformer(path)
    cfg["attn_config"]["attn_impl"] = attn_impl
    model = MPTForCausalLM(MPTConfig.from_dict(cfg))
    if cfg["tie_word_embeddings"]:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}  # our tied model has no lm_head
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"path: weights do not match MPTForCausalLM (missing {missing}, unexpected {unexpected})")
    return model.to(torch_dtype).eval()
