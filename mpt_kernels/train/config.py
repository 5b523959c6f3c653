"""Training configuration: dataclasses, read from YAML, changed by dotted ``key=value`` overrides.

    cfg = load_config("training/configs/tiny.yaml", ["max_steps=100", "optim.lr=3e-3"])

Every key is a dataclass field, so a typo fails loudly with the list of valid keys instead of being
silently ignored; values are parsed as YAML scalars (``1e-3``, ``true``, ``null``, ``[0.9, 0.95]``)
and checked against the field's type. No ``exec``: a config is data, never code.
"""
from __future__ import annotations

import dataclasses
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
    every: int = 0                           # steps between held-out evaluations (0: only at the end)
    batches: int = 8                         # held-out batches per evaluation (per rank)
    sample_prompt: str = "def "
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
            raise ValueError(f"config key {where}{key}: expected {tp}, got {value!r}")
        setattr(obj, key, _coerce(value, tp))


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected key=value (e.g. optim.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {item!r}: empty key")
    value = _fix_yaml_floats(yaml.safe_load(raw) if raw.strip() else None)
    return key.split("."), value


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
        keys, value = parse_override(item)
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
