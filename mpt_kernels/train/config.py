"""Training configuration: dataclasses, read from YAML, changed by dotted ``key=value`` overrides.

    cfg = load_config("training/configs/tiny.yaml", ["max_steps=100", "optim.lr=3e-3"])

Every key is a dataclass field, so a typo fails loudly with the list of valid keys instead of being
silently ignored; values are parsed as YAML scalars (``1e-3``, ``true``, ``null``, ``[0.9, 0.95]``)
and checked against the field's type, except that an override of a text field (``run_name``,
``eval.sample_prompt``, ``data.tokenizer`` ...) takes the text exactly as typed: YAML would drop a
trailing space, fold a newline, cut at `` #`` and read ``123``, ``no`` or ``Q: what`` as other types.
In an optional text field ``null`` / ``None`` / ``~`` (or nothing) means None, and the same word in
quotes (``'null'``) is the text. No ``exec``: a config is data, never code.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


@dataclass
class ModelConfig:
    preset: str = "tiny"                     # MPTConfig.from_preset name
    overrides: dict = field(default_factory=dict)  # MPTConfig fields / attn_config keys, e.g. alibi_bias_max
    vocab_size: int | None = None            # None: the tokenizer's size padded to a multiple of 128
    init_from: str | None = None             # a Hugging Face-format folder to start from (finetuning)
    activation_checkpointing: bool = False   # recompute each block in the backward pass
    compile: bool = False                    # torch.compile the model


@dataclass
class DataConfig:
    kind: str = "bundled"                    # bundled | shards | finetune
    seq_len: int = 256
    tokenizer: str | None = None             # tokenizer.json; None: train a byte-level BPE (bundled)
    bpe_vocab_size: int = 4096               # size of the BPE trained when tokenizer is None
    # bundled: the standard library's sources ("code") and pydoc topics ("text"), mixed by proportion
    bundled_proportions: dict = field(default_factory=lambda: {"code": 0.7, "text": 0.3})
    max_code_bytes: int | None = None
    val_fraction: float = 0.05
    cache_dir: str | None = None             # where the bundled corpus is built (default <run>/corpus)
    # shards: folders written by `python -m mpt_kernels.data.convert`
    streams: list = field(default_factory=list)       # [{path: ..., proportion: ...}, ...]
    val_streams: list = field(default_factory=list)
    epoch_size: int | None = None
    # finetune: prompt/response (or messages) JSONL, loss on responses only
    finetune_path: str | None = None
    finetune_val_path: str | None = None
    finetune_format: str = "mpt-instruct"    # mpt-instruct | chatml
    # the data's tokenizer must be the one of every stream and of model.init_from (same vocabulary):
    # true trains anyway (e.g. a deliberate move to a new tokenizer; the run saves the data's tokenizer)
    allow_tokenizer_mismatch: bool = False
    shuffle: bool = True
    sequence_id: bool = False                # attention stays within packed documents
    num_workers: int = 0


@dataclass
class OptimConfig:
    name: str = "lion"                       # lion (fused, mk.optim.Lion) | adamw (torch, for comparison)
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0        # fused clipping inside the Lion step


@dataclass
class SchedulerConfig:
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1                # cosine decays to lr * min_lr_ratio at max_steps


@dataclass
class CheckpointConfig:
    save_every: int = 0                      # steps between checkpoints (0: only at the end)
    keep_last: int = 2
    autoresume: bool = False                 # restart from the latest checkpoint of this run
    save_hf: bool = True                     # write the final model in Hugging Face format


@dataclass
class EvalConfig:
    every: int = 0                           # steps between held-out evaluations (0: before and after
                                             # training only; -1: after training only)
    batches: int = 8                         # held-out batches per evaluation (per rank); at most one
                                             # pass over a smaller val set, in whole batches
    sample_prompt: str = "def "              # a finetune puts a plain prompt in its format (user message)
    sample_tokens: int = 96
    temperature: float = 0.8
    top_k: int = 40


@dataclass
class FaultConfig:
    """Test hook: SIGKILL rank ``rank`` after step ``kill_at_step`` (after that step's checkpoint,
    or, with ``during_save``, in the middle of writing it: files written, not yet renamed). Only in
    the first attempt of a torchrun job (TORCHELASTIC_RESTART_COUNT == 0), and only while ``marker``
    does not exist (it is created just before the kill), so the restarted run goes through."""
    kill_at_step: int | None = None
    rank: int = 0
    during_save: bool = False
    marker: str | None = None


@dataclass
class Config:
    run_name: str = "tiny"
    run_root: str = "runs"
    seed: int = 17
    device: str = "auto"                     # auto | cpu | cuda
    precision: str = "auto"                  # auto (bf16 where the hardware has it, else fp32) | bf16 | fp32
    parallel: str = "ddp"                    # ddp | fsdp (with more than one process)
    max_steps: int = 300
    global_batch_size: int = 16              # samples per optimizer step, all ranks together
    micro_batch_size: int = 16               # samples per forward/backward on one rank
    max_minutes: float | None = None         # stop training after this much wall time (set-up included), then
                                             # evaluate, checkpoint and sample as at max_steps
    log_every: int = 10
    progress: bool = True
    plot: bool = True
    threads: int | None = None               # torch CPU threads (None: torch's default)
    flush_denormals: bool = True             # CPU: flush denormal floats to zero while training (mk.set_flush_denormal)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.run_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if not self.run_name:
            raise ValueError("run_name must not be empty (outputs go to run_root/run_name)")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("global_batch_size and micro_batch_size must be >= 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.data.kind not in ("bundled", "shards", "finetune"):
            raise ValueError(f"data.kind must be bundled, shards or finetune, got {self.data.kind!r}")
        if self.data.kind == "shards" and not self.data.streams:
            raise ValueError("data.kind=shards needs data.streams")
        if self.data.kind == "finetune" and not self.data.finetune_path:
            raise ValueError("data.kind=finetune needs data.finetune_path")
        if self.optim.name not in ("lion", "adamw"):
            raise ValueError(f"optim.name must be lion or adamw, got {self.optim.name!r}")
        if len(self.optim.betas) != 2:
            raise ValueError(f"optim.betas must have two values, got {self.optim.betas}")
        if self.checkpoint.keep_last < 1:
            raise ValueError("checkpoint.keep_last must be >= 1")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.data.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2 (a sample predicts its tokens after the first), got "
                             f"{self.data.seq_len}")
        if self.eval.batches < 1:
            raise ValueError(f"eval.batches must be >= 1, got {self.eval.batches}")
        _check_bundled_proportions(self.data.bundled_proportions)
        _check_streams("data.streams", self.data.streams)
        _check_streams("data.val_streams", self.data.val_streams)
        _check_model_overrides(self.model)


# ----------------------------------------------------------------------------------- checks

STREAM_KEYS = ("path", "proportion")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_bundled_proportions(props: Any) -> None:
    """Before anything is built: a misspelled source was only reported after the corpus build."""
    from ..data.corpus import SOURCES

    if not isinstance(props, dict):
        raise ValueError(f"data.bundled_proportions: expected a mapping like {{code: 0.7, text: 0.3}}, got {props!r}")
    unknown = [k for k in props if k not in SOURCES]
    if unknown:
        raise ValueError(f"data.bundled_proportions: unknown source(s) {unknown}; the bundled corpus has "
                         f"{list(SOURCES)}")
    bad = {k: v for k, v in props.items() if not _is_number(v) or v < 0}
    if bad:
        raise ValueError(f"data.bundled_proportions: proportions must be numbers >= 0, got {bad}")
    if not props or sum(props.values()) <= 0:
        raise ValueError(f"data.bundled_proportions: give at least one source a proportion > 0, got {props}")


def _check_streams(name: str, streams: Any) -> None:
    """Each entry is a path, or {path: ..., proportion: ...}; proportions for every entry or none."""
    if not isinstance(streams, list):
        raise ValueError(f"{name}: expected a list like [{{path: data/a/train, proportion: 0.7}}, ...], got {streams!r}")
    props = []
    for i, s in enumerate(streams):
        where = f"{name}[{i}]"
        if isinstance(s, str):
            if not s:
                raise ValueError(f"{where}: empty path")
            props.append(None)
            continue
        if not isinstance(s, dict):
            raise ValueError(f"{where}: expected a path or {{path: ..., proportion: ...}}, got {s!r}")
        unknown = [str(k) for k in s if k not in STREAM_KEYS]
        if unknown:
            hint = ""
            if any(":" in k for k in unknown):
                hint = " (YAML needs a space after a colon: {path: data/x}; {path:data/x} is one key)"
            raise ValueError(f"{where}: unknown key(s) {unknown}; a stream takes {list(STREAM_KEYS)}{hint}")
        path = s.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError(f"{where}: 'path' must be the text of a folder path, got {path!r}"
                             + (" (quote it)" if path is not None else " (missing)"))
        p = s.get("proportion")
        if p is not None and (not _is_number(p) or p < 0):
            raise ValueError(f"{where}: 'proportion' must be a number >= 0, got {p!r}")
        props.append(p)
    given = [p for p in props if p is not None]
    if given and len(given) != len(props):
        raise ValueError(f"{name}: give a proportion for every stream or for none (none: mixed by size)")
    if given and sum(given) <= 0:
        raise ValueError(f"{name}: the proportions sum to 0; give at least one stream a proportion > 0")


# attn_config keys MPTConfig takes at the top level of model.overrides, with their types
_ATTN_TYPES: dict[str, Any] = {
    "attn_type": str, "attn_pdrop": float, "attn_impl": str, "clip_qkv": float | None, "softmax_scale": float | None,
    "prefix_lm": bool, "qk_ln": bool, "attn_uses_sequence_id": bool, "alibi": bool, "alibi_bias_max": float,
    "kv_n_heads": int | None,
}


def _check_model_overrides(m: ModelConfig) -> None:
    """model.overrides: MPTConfig field names and attn_config keys, of the right types (coerced like the
    config's own fields: 2.0 -> 2). Without model.init_from the whole model config is built from the
    preset (a few dataclass checks, no weights), so a bad combination fails here, not in the trainer."""
    ov = m.overrides
    if not isinstance(ov, dict):
        raise ValueError(f"model.overrides: expected a mapping like {{alibi_bias_max: 16}}, got {ov!r}")
    if not ov:
        return
    from ..model import MPTConfig

    hints = typing.get_type_hints(MPTConfig)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(MPTConfig) if f.name != "extra"}
    attn = {k: _ATTN_TYPES.get(k, Any) for k in MPTConfig().attn_config}
    known = {**fields, **attn}
    for key, value in ov.items():
        if key not in known:
            raise ValueError(f"model.overrides: unknown key {key!r}; valid keys: MPTConfig's fields {sorted(fields)} "
                             f"and attn_config keys {sorted(attn)}")
        tp = known[key]
        if not _type_ok(value, tp):
            raise ValueError(f"model.overrides.{key}: expected {_type_name(tp)}, got {value!r}")
        ov[key] = _coerce(value, tp)
    for sub in ("attn_config", "init_config"):
        for key, value in (ov.get(sub) or {}).items():
            tp = _ATTN_TYPES.get(key, Any) if sub == "attn_config" else Any
            if not _type_ok(value, tp):
                raise ValueError(f"model.overrides.{sub}.{key}: expected {_type_name(tp)}, got {value!r}")
    if m.init_from is None:
        try:
            MPTConfig.from_preset(m.preset, **ov)
        except (TypeError, ValueError) as exc:
            if "unknown preset" in str(exc):
                return  # reported by the trainer, with the presets
            raise ValueError(f"model.overrides {ov}: {exc}") from None


# ----------------------------------------------------------------------------------- loading

def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)) or _int_like(value)
    if origin is not None:
        tp = origin
    return isinstance(value, tp)


def _coerce(value: Any, tp: Any) -> Any:
    if tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp)):
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    elif _int_like(value) and (tp is int or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                                            and int in typing.get_args(tp))):
        return int(value)  # max_steps=1e3 (YAML reads a float)
    return value


def _int_like(value: Any) -> bool:
    return isinstance(value, float) and value.is_integer() and abs(value) < 2**63


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    names = {str: "text", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             dict: "a mapping", type(None): "null", Any: "anything"}
    return names.get(typing.get_origin(tp) or tp, str(tp))


def _is_text_field(tp: Any) -> tuple[bool, bool]:
    """(whether the field holds text: str or str | None, whether None is allowed)."""
    if tp is str:
        return True, False
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {str, type(None)}:
        return True, True
    return False, False


def _apply(obj: Any, data: dict, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        if key not in names:
            raise ValueError(f"unknown config key '{where}{key}'; valid keys: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{key} is a section: give a mapping, got {value!r}")
            _apply(current, value, f"{where}{key}.")
            continue
        tp = hints[key]
        if not _type_ok(value, tp):
            hint = ""
            if _is_text_field(tp)[0] and value is not None:  # YAML read 123, 2024-06-01, no, {Q: what} ...
                hint = f" (YAML read it as {type(value).__name__}: put the text in quotes)"
            raise ValueError(f"config key {where}{key}: expected {_type_name(tp)}, got {value!r}{hint}")
        setattr(obj, key, _coerce(value, tp))


_NULL_WORDS = ("null", "Null", "NULL", "None", "~")


def _split_override(item: str) -> tuple[list[str], str]:
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected key=value (e.g. optim.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {item!r}: empty key")
    return key.split("."), raw


def _yaml_value(raw: str, where: str) -> Any:
    try:
        return _fix_yaml_floats(yaml.safe_load(raw) if raw.strip() else None)
    except yaml.YAMLError as exc:
        raise ValueError(f"override {where}: not a YAML value ({str(exc).splitlines()[0]})") from None


def _text_value(raw: str, optional: bool) -> str | None:
    """A text field's override, exactly as typed; in an optional one null/None/~ or nothing is None and
    the same word in quotes ('null', "None") is that word."""
    if optional:
        word = raw.strip()
        if word in _NULL_WORDS or not word:
            return None
        if len(word) >= 2 and word[0] == word[-1] and word[0] in "'\"" and word[1:-1] in _NULL_WORDS:
            return word[1:-1]
    return raw


def _override_field_type(cfg: "Config", keys: list[str]) -> Any:
    """The type of the dataclass field an override names (None: a section, a dict's sub-key or unknown)."""
    obj = cfg
    for k in keys[:-1]:
        obj = getattr(obj, k, None)
        if not dataclasses.is_dataclass(obj):
            return None
    if not dataclasses.is_dataclass(obj) or keys[-1] not in {f.name for f in dataclasses.fields(obj)}:
        return None
    return typing.get_type_hints(type(obj))[keys[-1]]


def parse_override(item: str, cfg: "Config | None" = None) -> tuple[list[str], Any]:
    """``key=value`` -> (key path, value). The value is YAML, except for a text field of ``cfg``
    (default: the defaults' fields), whose value is the text as typed (see the module's docstring)."""
    keys, raw = _split_override(item)
    is_text, optional = _is_text_field(_override_field_type(cfg if cfg is not None else Config(), keys))
    if is_text:
        return keys, _text_value(raw, optional)
    return keys, _yaml_value(raw, repr(item))


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def _fix_yaml_floats(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _fix_yaml_floats(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_fix_yaml_floats(v) for v in d]
    # YAML 1.1 (PyYAML) reads 3e-4 as a string (it wants 3.0e-4): accept the common spelling.
    if isinstance(d, str) and _FLOAT_RE.match(d):
        return float(d)
    return d


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides in order."""
    cfg = Config()
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must hold a mapping at the top level")
        _apply(cfg, _fix_yaml_floats(data), "")
    for item in overrides:
        keys, value = parse_override(item, cfg)
        # A dict-typed field (model.overrides) takes dotted sub-keys: model.overrides.alibi_bias_max=16
        obj, i = cfg, 0
        while i < len(keys) - 1 and dataclasses.is_dataclass(getattr(obj, keys[i], None)):
            obj, i = getattr(obj, keys[i]), i + 1
        if i < len(keys) - 1 and isinstance(getattr(obj, keys[i], None), dict):
            target = getattr(obj, keys[i])
            for part in keys[i + 1:-1]:
                target = target.setdefault(part, {})
            target[keys[-1]] = value
            continue
        _apply(cfg, _nest(keys, value), "")
    cfg.validate()
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
