"""Where export reads an MPT from: a model object or a Hugging Face checkpoint directory.

Both exporters work on the pair (config as a plain dict with Hugging Face MPT field names, weights
under Hugging Face MPT parameter names). Keeping them on that pair, rather than on one model class,
lets them export our ``MPTForCausalLM``, transformers' ``MptForCausalLM`` or a checkpoint directory
without loading a model at all (a large checkpoint is read one tensor at a time).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Callable

import torch

# Attention options we need to read, with MPT's defaults, so that a config written by any version of
# MPT (or ours) reads the same.
ATTN_DEFAULTS = {
    "attn_type": "multihead_attention",
    "clip_qkv": None,
    "qk_ln": False,
    "alibi": True,
    "alibi_bias_max": 8,
    "softmax_scale": None,
    "kv_n_heads": None,
}


def _to_plain(obj):
    if obj is None or isinstance(obj, (int, float, str, bool)):
        return obj
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if hasattr(obj, "to_dict"):
        return _to_plain(obj.to_dict())
    if dataclasses.is_dataclass(obj):
        return _to_plain({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if hasattr(obj, "__dict__"):
        return _to_plain({k: v for k, v in vars(obj).items() if not k.startswith("_")})
    return obj


def config_to_dict(config) -> dict:
    """An MPT config (ours, transformers' MptConfig, or a dict) as a plain dict with every attention
    option present. llm-foundry's options that change the model (qk_gn, logit soft-capping, RoPE,
    sliding windows...) raise ValueError when switched on: no exporter computes them."""
    from ..model.config import _FOUNDRY_ATTN_OFF, foundry_options_on

    cfg = dict(_to_plain(config))
    attn = dict(ATTN_DEFAULTS)
    attn.update(cfg.get("attn_config") or {})
    on = foundry_options_on(attn, cfg.get("d_model"))
    if on:
        key, v = on[0]
        raise ValueError(f"model_or_dir: attn_config.{key}={v!r}: the export cannot compute this llm-foundry "
                         f"option (only {key}={_FOUNDRY_ATTN_OFF[key]!r})")
    cfg["attn_config"] = attn
    cfg.setdefault("no_bias", True)
    cfg.setdefault("layer_norm_epsilon", 1e-5)
    cfg.setdefault("logit_scale", None)
    cfg.setdefault("tie_word_embeddings", True)
    return cfg


# Settings that change how a model trains or which implementation runs, not the function an export
# computes: neutralised before the model's own config rules judge an export's input.
_TRAINING_ONLY_ATTN = {"attn_impl": "torch", "attn_pdrop": 0}
_TRAINING_ONLY = {"resid_pdrop": 0.0, "emb_pdrop": 0.0}
_TRAINING_ONLY_DROPPED = ("init_config", "fc_type")  # fc_type: the Linear's implementation (same weights)


def check_computable(cfg: dict) -> None:
    """Raise ``ValueError`` (naming ``model_or_dir`` and the setting) when ``cfg`` describes an MPT the
    exports cannot compute: the rules of ``MPTConfig`` (those ``MPTForCausalLM.from_pretrained``
    applies: rmsnorm, a GLU or non-GELU FFN, prefix_lm, alibi=False, ...), minus the settings that only
    matter to training (attn_impl, dropouts, initialisation, fc_type). One addition to the model's
    rules: the tanh-approximated GELU, which both exports compute (FasterTransformer's GELU is that)."""
    from ..model.config import MPTConfig

    d = {k: v for k, v in cfg.items() if k not in _TRAINING_ONLY_DROPPED}
    d.update(_TRAINING_ONLY)
    d["attn_config"] = {**(cfg.get("attn_config") or {}), **_TRAINING_ONLY_ATTN}
    ffn = dict(d.get("ffn_config") or {})
    if ffn.get("ffn_act_fn") == {"name": "gelu", "approximate": "tanh"}:
        ffn["ffn_act_fn"] = {"name": "gelu"}
        d["ffn_config"] = ffn
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown attn_config keys: the export reads only known ones
            MPTConfig.from_dict(d)
    except ValueError as exc:
        raise ValueError(f"model_or_dir: the export cannot compute this MPT: {exc} (MPTForCausalLM.from_pretrained "
                         "refuses it too)") from None


_BLOCK_WEIGHT = re.compile(r"^transformer\.blocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = ("norm_1", "norm_2", "attn.Wqkv", "attn.Wq", "attn.Wk", "attn.Wv", "attn.out_proj",
                "ffn.up_proj", "ffn.down_proj")


def unused_weights(cfg: dict, names) -> list[str]:
    """The weight names an export would not read (so the function it writes would lack them): e.g. a
    GLU's ``ffn.gate_proj``, a block past ``n_layers``, q/k LayerNorms without ``qk_ln``."""
    parts = _BLOCK_PARTS + (("attn.q_ln", "attn.k_ln") if cfg["attn_config"].get("qk_ln") else ())
    allowed_block = {f"{p}.{w}" for p in parts for w in ("weight", "bias")}
    top = {"transformer.wte.weight", "transformer.norm_f.weight", "transformer.norm_f.bias", "lm_head.weight"}
    out = []
    for n in sorted(names):
        m = _BLOCK_WEIGHT.match(n)
        if n in top or m and int(m.group(1)) < int(cfg["n_layers"]) and m.group(2) in allowed_block:
            continue
        out.append(n)
    return out


def check_out_dir(path, arg: str) -> None:
    """Raise ``NotADirectoryError`` naming ``arg`` when ``path`` or a folder above it exists as a file, so
    an export fails before its work rather than at ``mkdir`` with a bare ``[Errno 17] File exists``."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                but = "" if q == p else f", so {p} cannot be created"
                raise NotADirectoryError(f"{arg}: {q} exists and is not a directory{but}")
            return


def kv_heads(cfg: dict) -> int:
    """Number of key/value heads, by MPT's rule: 1 for multi-query, kv_n_heads for grouped-query,
    else n_heads (kv_n_heads is ignored for multi-head attention, as llm-foundry does)."""
    attn = cfg["attn_config"]
    if attn.get("attn_type") == "multiquery_attention":
        return 1
    if attn.get("attn_type") == "grouped_query_attention":
        return int(attn.get("kv_n_heads") or cfg["n_heads"])
    return int(cfg["n_heads"])


def default_softmax_scale(cfg: dict) -> float:
    return 1.0 / math.sqrt(cfg["d_model"] // cfg["n_heads"])


class WeightSource:
    """Lazy access to an MPT's weights by Hugging Face name: ``src[name]``, ``name in src``. A checkpoint
    saved with llm-foundry's ``fused_qkv=False`` (``attn.Wq`` / ``Wk`` / ``Wv``) also answers for
    ``attn.Wqkv``: the three concatenated, q rows first."""

    def __init__(self, getter: Callable[[str], torch.Tensor], names):
        names = set(names)
        if names and all(n.startswith("model.") for n in names):
            # Composer checkpoints wrap the HF model as ``model.`` (as from_pretrained reads them)
            inner = getter
            getter = lambda name: inner("model." + name)  # noqa: E731
            names = {n[len("model."):] for n in names}
        self._separate = {}
        for n in names:
            if ".attn.Wq." in n:
                parts = [n.replace(".Wq.", f".{w}.") for w in ("Wq", "Wk", "Wv")]
                fused = n.replace(".Wq.", ".Wqkv.")
                if all(p in names for p in parts) and fused not in names:
                    self._separate[fused] = parts

        def get(name):
            if name in self._separate:
                return torch.cat([getter(p) for p in self._separate[name]], dim=0)
            return getter(name)

        self._get = get
        self.names = names | set(self._separate)

    def __contains__(self, name):
        return name in self.names

    def __getitem__(self, name) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"checkpoint has no weight named {name!r}")
        return self._get(name)

    def get(self, name, default=None):
        return self[name] if name in self else default


def _dir_weights(path: Path) -> WeightSource:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists() or single.exists():
        from safetensors import safe_open

        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(str(single), framework="pt") as f:
                weight_map = {k: single.name for k in f.keys()}

        def get(name):
            with safe_open(str(path / weight_map[name]), framework="pt") as f:
                return f.get_tensor(name)

        return WeightSource(get, weight_map)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for b in bins:
            state.update(torch.load(b, map_location="cpu", weights_only=True))
        return WeightSource(state.__getitem__, state)
    raise FileNotFoundError(
        f"model_or_dir: {path} holds no model.safetensors, model.safetensors.index.json or pytorch_model*.bin"
    )


def open_source(model_or_dir) -> tuple[dict, WeightSource]:
    """(config dict, weights) from a model object (anything with ``.config`` and ``.state_dict()``
    using MPT's parameter names), a Hugging Face checkpoint directory, or a (config, state dict) pair."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        path = Path(model_or_dir)
        if not path.is_dir():
            raise FileNotFoundError(
                f"model_or_dir: {path} {'is not a directory' if path.exists() else 'does not exist'} (expected a "
                "Hugging Face MPT checkpoint directory: config.json + model.safetensors or pytorch_model*.bin)"
            )
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"model_or_dir: {path} has no config.json (expected a Hugging Face MPT checkpoint)")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"model_or_dir: {cfg_file} is not valid JSON ({exc})") from exc
        cfg = config_to_dict(raw)
        check_computable(cfg)
        return cfg, _dir_weights(path)
    if isinstance(model_or_dir, tuple) and len(model_or_dir) == 2 and isinstance(model_or_dir[1], dict):
        cfg, state = model_or_dir  # (config, state dict), e.g. read_fastertransformer's result
        cfg = config_to_dict(cfg)
        check_computable(cfg)
        return cfg, WeightSource(state.__getitem__, state)
    if isinstance(model_or_dir, torch.nn.Module) and hasattr(model_or_dir, "config"):
        state = model_or_dir.state_dict()
        cfg = config_to_dict(model_or_dir.config)
        check_computable(cfg)
        return cfg, WeightSource(state.__getitem__, state)
    raise TypeError(
        f"model_or_dir: expected an MPT model (with .config) or a checkpoint directory, got {type(model_or_dir).__name__}"
    )


def check_required_weights(cfg: dict, src: WeightSource) -> None:
    """Raise ``ValueError`` listing the weights every MPT has (embedding, LayerNorm gains, attention and
    FFN matrices of each layer) that ``src`` lacks, or the weights it holds that no export reads
    (``unused_weights``), before an export writes anything."""
    names = ["transformer.wte.weight", "transformer.norm_f.weight"]
    for i in range(int(cfg["n_layers"])):
        p = f"transformer.blocks.{i}."
        names += [p + n for n in ("norm_1.weight", "norm_2.weight", "attn.Wqkv.weight", "attn.out_proj.weight",
                                  "ffn.up_proj.weight", "ffn.down_proj.weight")]
    if not cfg.get("tie_word_embeddings", True):
        names.append("lm_head.weight")
    missing = [n for n in names if n not in src]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"model_or_dir: the weights lack {', '.join(missing[:5])}{more} "
                         f"(config: n_layers={cfg['n_layers']}); is it an MPT checkpoint matching its config.json?")
    unused = unused_weights(cfg, src.names)
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise ValueError(f"model_or_dir: the weights hold {', '.join(unused[:5])}{more}, which this config "
                         f"(n_layers={cfg['n_layers']}, qk_ln={bool(cfg['attn_config'].get('qk_ln'))}) does not "
                         "use and no export computes with; is it an MPT checkpoint matching its config.json?")
