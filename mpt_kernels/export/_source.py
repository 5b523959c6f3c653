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
    # A config.json may leave out what has MPT's default (d_model 2048, max_seq_len 2048, no_bias, ...):
    # the model applies the defaults (MPTConfig's, which are MPT's), so the exports must too.
    from ..model.config import MPTConfig

    for f in dataclasses.fields(MPTConfig):
        if f.default is not dataclasses.MISSING:
            cfg.setdefault(f.name, f.default)
    return cfg


# Settings that change how a model trains or which implementation runs, not the function an export
# computes: neutralised before the model's own config rules judge an export's input.
_TRAINING_ONLY_ATTN = {"attn_impl": "torch", "attn_pdrop": 0}
_TRAINING_ONLY = {"resid_pdrop": 0.0, "emb_pdrop": 0.0}
_TRAINING_ONLY_DROPPED = ("init_config", "fc_type")  # fc_type: the Linear's implementation (same weights)


def check_computable(cfg: dict):
    """Raise ``ValueError`` (naming ``model_or_dir`` and the setting) when ``cfg`` describes an MPT the
    exports cannot compute: the rules of ``MPTConfig`` (those ``MPTForCausalLM.from_pretrained``
    applies: rmsnorm, a GLU or non-GELU FFN, prefix_lm, alibi=False, ...), minus the settings that only
    matter to training (attn_impl, dropouts, initialisation, fc_type). One addition to the model's
    rules: the tanh-approximated GELU, which both exports compute (FasterTransformer's GELU is that).
    Returns the ``MPTConfig`` that judged it."""
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
            return MPTConfig.from_dict(d)
    except ValueError as exc:
        raise ValueError(f"model_or_dir: the export cannot compute this MPT: {exc} (MPTForCausalLM.from_pretrained "
                         "refuses it too)") from None


def expected_weights(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every weight an MPT with config ``cfg`` has, by Hugging Face name, with its shape: the names and
    shapes ``MPTForCausalLM.from_pretrained`` requires (a tied head has no ``lm_head.weight``). Biases
    (every Linear and LayerNorm) exist only under ``no_bias=False``; ``attn.q_ln`` / ``k_ln`` only under
    ``qk_ln`` (q's over d_model, k's over the key/value heads)."""
    d, n_heads, vocab = int(cfg["d_model"]), int(cfg["n_heads"]), int(cfg["vocab_size"])
    head_dim, n_kv = d // n_heads, kv_heads(cfg)
    ffn = float(cfg.get("expansion_ratio", 4)) * d
    inter = int(ffn) if ffn.is_integer() else ffn  # a fractional width matches no weight: refused by shape
    with_bias = not cfg.get("no_bias", True)
    out: dict[str, tuple] = {}

    def norm(prefix, size):
        out[prefix + ".weight"] = (size,)
        if with_bias:
            out[prefix + ".bias"] = (size,)

    def linear(prefix, n_out, n_in):
        out[prefix + ".weight"] = (n_out, n_in)
        if with_bias:
            out[prefix + ".bias"] = (n_out,)

    out["transformer.wte.weight"] = (vocab, d)
    for i in range(int(cfg["n_layers"])):
        p = f"transformer.blocks.{i}."
        norm(p + "norm_1", d)
        linear(p + "attn.Wqkv", (n_heads + 2 * n_kv) * head_dim, d)
        if cfg["attn_config"].get("qk_ln"):
            norm(p + "attn.q_ln", d)
            norm(p + "attn.k_ln", n_kv * head_dim)
        linear(p + "attn.out_proj", d, d)
        norm(p + "norm_2", d)
        linear(p + "ffn.up_proj", inter, d)
        linear(p + "ffn.down_proj", d, inter)
    norm("transformer.norm_f", d)
    if not cfg.get("tie_word_embeddings", True):
        out["lm_head.weight"] = (vocab, d)
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

    def __init__(self, getter: Callable[[str], torch.Tensor], names,
                 shape_getter: Callable[[str], tuple[int, ...]] | None = None):
        names = set(names)
        shape_getter = shape_getter or (lambda name: tuple(getter(name).shape))
        if names and all(n.startswith("model.") for n in names):
            # Composer checkpoints wrap the HF model as ``model.`` (as from_pretrained reads them)
            inner, inner_shape = getter, shape_getter
            getter = lambda name: inner("model." + name)  # noqa: E731
            shape_getter = lambda name: inner_shape("model." + name)  # noqa: E731
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

        def shape(name):
            if name in self._separate:
                parts = [tuple(shape_getter(p)) for p in self._separate[name]]
                return (sum(p[0] for p in parts), *parts[0][1:])
            return tuple(shape_getter(name))

        self._get, self._shape = get, shape
        # the fused name stands for its parts: they are not weights of their own to the exports
        consumed = {p for parts in self._separate.values() for p in parts}
        self.names = (names - consumed) | set(self._separate)

    def __contains__(self, name):
        return name in self.names

    def __getitem__(self, name) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"checkpoint has no weight named {name!r}")
        return self._get(name)

    def get(self, name, default=None):
        return self[name] if name in self else default

    def shape(self, name) -> tuple[int, ...]:
        """The shape of weight ``name``, without reading its data from a safetensors checkpoint."""
        if name not in self.names:
            raise KeyError(f"checkpoint has no weight named {name!r}")
        return self._shape(name)


def _open_safetensors(file: Path, named_by: str):
    """``safe_open(file)``, with a missing, cut-short or foreign file reported as the user's problem
    (``FileNotFoundError`` / ``ValueError`` naming ``model_or_dir`` and the file), not a SafetensorError."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise FileNotFoundError(f"model_or_dir: {file} is missing ({named_by} names it)")
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"model_or_dir: cannot read {file} ({exc}): cut short, or not a safetensors file?") from None


def _dir_weights(path: Path) -> WeightSource:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists() or single.exists():
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                weight_map = exc
            if not isinstance(weight_map, dict):
                raise ValueError(f"model_or_dir: {index} is not a safetensors index (a JSON object whose "
                                 f"'weight_map' maps weight names to files; {type(weight_map).__name__}: "
                                 f"{weight_map})")
            named_by = index.name
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).is_file():  # before any other complaint: the weights are not all here
                    raise FileNotFoundError(f"model_or_dir: {path / shard} is missing ({named_by} names it)")
        else:
            with _open_safetensors(single, "the checkpoint") as f:
                weight_map = {k: single.name for k in f.keys()}
            named_by = "the checkpoint"

        def get(name):
            with _open_safetensors(path / weight_map[name], named_by) as f:
                return f.get_tensor(name)

        def shape(name):
            with _open_safetensors(path / weight_map[name], named_by) as f:
                return tuple(f.get_slice(name).get_shape())

        return WeightSource(get, weight_map, shape)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for b in bins:
            try:
                state.update(torch.load(b, map_location="cpu", weights_only=True))
            except Exception as exc:  # torch.load's errors for a foreign or cut-short file vary (pickle, zip, KeyError)
                raise ValueError(f"model_or_dir: cannot read {b} ({type(exc).__name__}: {exc}): cut short, or not "
                                 "a PyTorch state dict?") from None
        return WeightSource(state.__getitem__, state)
    raise FileNotFoundError(
        f"model_or_dir: {path} holds no model.safetensors, model.safetensors.index.json or pytorch_model*.bin"
    )


def _unwrap(model):
    """The model inside ``torch.compile``'s wrapper (state dict names under ``_orig_mod.``) and DataParallel /
    DistributedDataParallel (``module.``): the same weights, which the exports read under MPT's names."""
    for _ in range(8):
        if isinstance(model, torch.nn.Module) and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            break
    return model


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
    model_or_dir = _unwrap(model_or_dir)
    if isinstance(model_or_dir, torch.nn.Module) and hasattr(model_or_dir, "config"):
        state = model_or_dir.state_dict()
        cfg = config_to_dict(model_or_dir.config)
        config = check_computable(cfg)
        if type(model_or_dir).__module__.startswith("transformers."):
            _check_transformers_model(model_or_dir, config)
        return cfg, WeightSource(state.__getitem__, state)
    raise TypeError(
        f"model_or_dir: expected an MPT model (with .config) or a checkpoint directory, got {type(model_or_dir).__name__}"
    )


def _check_transformers_model(model, config) -> None:
    """transformers' MptForCausalLM loads some MPT settings without applying them (a fixed ALiBi maximum
    of 8, no q/k LayerNorm, no logit scale, no biases, a 4x FFN): such an object computes another function
    than its config describes, and an export, which reads the config, would match neither it nor MPT
    silently. Raise ``ValueError`` naming the settings."""
    from ..model.checkpoint import transformers_cannot_load, transformers_ignores

    problems = transformers_ignores(config) + transformers_cannot_load(config)
    if problems:
        raise ValueError(f"model_or_dir: this {type(model).__name__} (transformers) does not compute the MPT its "
                         f"config describes: {'; '.join(problems)}. Export the checkpoint directory or mpt_kernels' "
                         "MPTForCausalLM (MPTForCausalLM.from_pretrained), which apply these settings; or set them "
                         "in model.config to what transformers computes (alibi_bias_max=8, logit_scale=None, ...)")


def check_required_weights(cfg: dict, src: WeightSource) -> None:
    """Raise ``ValueError`` before an export writes anything when the weights in ``src`` are not those
    of the MPT ``cfg`` describes (``expected_weights``, the rule ``from_pretrained`` applies): a weight
    it lacks (e.g. a bias under ``no_bias=False``, ``attn.q_ln`` under ``qk_ln``), one no export reads
    (a GLU's ``ffn.gate_proj``, a block past ``n_layers``, a bias under ``no_bias=True``: exporting it
    or dropping it would both write a function the checkpoint's model does not compute), or one whose
    shape differs from the config's (``vocab_size``, ``d_model``, heads, FFN width): FasterTransformer's
    config.ini would describe files of other sizes, and the ONNX graph would fail or compute another
    model. (A tied head's ``lm_head.weight``, which transformers may store, is allowed and unused.)"""
    expected = expected_weights(cfg)
    missing = [n for n in expected if n not in src]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"model_or_dir: the weights lack {', '.join(missing[:5])}{more} "
                         f"(config: n_layers={cfg['n_layers']}, no_bias={bool(cfg.get('no_bias', True))}, "
                         f"qk_ln={bool(cfg['attn_config'].get('qk_ln'))}); is it an MPT checkpoint matching its "
                         "config.json?")
    tied = cfg.get("tie_word_embeddings", True)
    unused = sorted(n for n in src.names if n not in expected and not (tied and n == "lm_head.weight"))
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise ValueError(f"model_or_dir: the weights hold {', '.join(unused[:5])}{more}, which this config "
                         f"(n_layers={cfg['n_layers']}, no_bias={bool(cfg.get('no_bias', True))}, "
                         f"qk_ln={bool(cfg['attn_config'].get('qk_ln'))}) does not use and no export computes "
                         "with; is it an MPT checkpoint matching its config.json?")
    for name, want in expected.items():
        got = src.shape(name)
        if tuple(got) != tuple(want):
            raise ValueError(f"model_or_dir: {name} has shape {tuple(got)}, the config implies {tuple(want)} "
                             f"(d_model={cfg['d_model']}, n_heads={cfg['n_heads']}, kv heads={kv_heads(cfg)}, "
                             f"vocab_size={cfg['vocab_size']}, expansion_ratio={cfg.get('expansion_ratio', 4)}); "
                             "is it an MPT checkpoint matching its config.json?")
