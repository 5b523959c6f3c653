"""MPTConfig: Hugging Face MPT's configuration (same field names, same defaults, same config.json).

What is supported, and what raises (checked in ``MPTConfig.validate``, called on construction):

- attention: ALiBi only (``attn_config.alibi=True``). ``learned_pos_emb`` is accepted and ignored when
  ALiBi is on, as MPT's own code does (no ``wpe`` parameter exists); ``alibi=False`` raises.
- ``attn_type``: multihead_attention, multiquery_attention (kv_n_heads = 1), grouped_query_attention
  (kv_n_heads must divide n_heads). ``kv_n_heads`` applies only with grouped_query_attention (as in
  llm-foundry): another value with the other two types is ignored, with one warning.
- ``attn_impl``: "torch" runs the readable reference (dense bias + softmax, like transformers);
  "flash" / "triton" / "mk" run mpt_kernels' ALiBi flash attention kernel.
- ``prefix_lm=True`` raises (no prefix mask in the kernel). ``attn_pdrop > 0`` with the kernel loads
  and runs in eval mode (where dropout is off); a training-mode forward raises (the kernel has no
  dropout): train such a model with attn_impl="torch". ``norm_type``: low_precision_layernorm / layernorm (both run
  ``mk.layer_norm``: statistics in float32, output in the activation dtype); rmsnorm variants raise.
- llm-foundry's newer attention options are accepted at their "off" value and refused otherwise:
  ``qk_gn``, ``attn_logit_softcapping``, ``kv_dim`` (other than d_model), ``flex_attn_mod_list``,
  ``sliding_window_size``, ``rope``. ``fused_qkv=False`` checkpoints (separate Wq/Wk/Wv) load: the
  three are concatenated into Wqkv. ``fc_type`` may be "torch" or {"name": "torch"}.
  ``attn_uses_sequence_id`` is accepted; it is a training-time option (pass ``sequence_id`` to
  ``forward`` to keep packed documents apart), inference needs nothing from it.
- ``from_dict`` (config.json) drops the bookkeeping keys transformers writes into attn_config and
  warns about, then drops, any other attn_config key it does not know; constructing ``MPTConfig``
  with an unknown attn_config key raises.
- ``no_bias=False`` is supported (biases on every Linear and LayerNorm, as MPT's original code; transformers
  cannot load such checkpoints). ``ffn_config.ffn_type`` must be "mptmlp" when given.

Where transformers' MptForCausalLM departs from MPT's original code, this config follows the original:
``alibi_bias_max`` is honoured (transformers hard-codes 8), the MLP width is ``expansion_ratio * d_model``
(transformers hard-codes 4x), and nothing stops attention past ``max_seq_len`` (transformers' bias
tensor is only ``max_seq_len`` long).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import Any

_ATTN_DEFAULTS: dict[str, Any] = {
    "attn_type": "multihead_attention",
    "attn_pdrop": 0,
    "attn_impl": "torch",
    "clip_qkv": None,
    "softmax_scale": None,
    "prefix_lm": False,
    "qk_ln": False,
    "attn_uses_sequence_id": False,
    "alibi": True,
    "alibi_bias_max": 8,
    "kv_n_heads": None,  # None: n_heads (MHA); llm-foundry's name for GQA/MQA
}

_INIT_DEFAULTS: dict[str, Any] = {
    "name": "kaiming_normal_",
    "fan_mode": "fan_in",
    "init_nonlinearity": "relu",
    "init_div_is_residual": True,
    "emb_init_std": None,
    "emb_init_uniform_lim": None,
    "init_std": None,
    "init_gain": 0.0,
}

# attn_config keys of llm-foundry's MPT that this model has no counterpart for, each with the value
# that switches it off: accepted at that value, refused otherwise (``validate``). ``fused_qkv=False``
# is the exception: only the checkpoint layout differs (Wq/Wk/Wv), and ``from_pretrained`` fuses it.
_FOUNDRY_ATTN_OFF: dict[str, Any] = {
    "qk_gn": False,
    "attn_logit_softcapping": None,
    "kv_dim": None,
    "flex_attn_mod_list": [],
    "sliding_window_size": -1,
    "rope": False,
}
_FOUNDRY_ATTN_ANY = ("fused_qkv", "rope_theta", "rope_impl", "rope_dail_config", "rope_hf_config")
_ATTN_KNOWN = set(_ATTN_DEFAULTS) | set(_FOUNDRY_ATTN_OFF) | set(_FOUNDRY_ATTN_ANY)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A UserWarning the first time this process sees ``message`` (a config is rebuilt by replace(),
    from_pretrained and save/load: one warning, not one per copy)."""
    if message not in _WARNED:
        _WARNED.add(message)
        import warnings

        warnings.warn(message, UserWarning, stacklevel=5)  # the caller of MPTConfig(...)


def foundry_options_on(attn: dict, d_model: int) -> list[tuple[str, Any]]:
    """The llm-foundry attention options (``_FOUNDRY_ATTN_OFF``) that ``attn`` switches on, as (key,
    value). None also means off for the list and the window; kv_dim equal to d_model is the default."""
    on = []
    for key, off in _FOUNDRY_ATTN_OFF.items():
        v = attn.get(key, off)
        if v == off or v is None and key in ("sliding_window_size", "flex_attn_mod_list") or \
                key == "kv_dim" and v == d_model:
            continue
        on.append((key, v))
    return on

# What transformers' PreTrainedConfig writes into every (sub-)config, 4.x and 5.x: bookkeeping that
# ``MptConfig.save_pretrained`` leaves inside attn_config. ``from_dict`` drops these there.
_HF_CONFIG_BOOKKEEPING = {
    "_name_or_path", "add_cross_attention", "architectures", "bad_words_ids", "begin_suppress_tokens",
    "bos_token_id", "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id",
    "diversity_penalty", "do_sample", "dtype", "early_stopping", "encoder_no_repeat_ngram_size",
    "eos_token_id", "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id",
    "forced_eos_token_id", "id2label", "is_decoder", "is_encoder_decoder", "label2id", "length_penalty",
    "max_length", "min_length", "model_type", "no_repeat_ngram_size", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_attentions", "output_hidden_states", "output_scores", "pad_token_id",
    "prefix", "problem_type", "pruned_heads", "remove_invalid_values", "repetition_penalty", "return_dict",
    "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params", "temperature",
    "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings", "tokenizer_class", "top_k", "top_p",
    "torch_dtype", "torchscript", "transformers_version", "typical_p", "use_bfloat16",
}


def _hf_bookkeeping_keys() -> set[str]:
    """The hard-coded set, plus what the installed transformers writes (a newer release may add keys)."""
    try:
        import transformers

        return _HF_CONFIG_BOOKKEEPING | set(transformers.PretrainedConfig().to_dict())
    except Exception:  # not installed, or a release whose base config cannot be built bare
        return set(_HF_CONFIG_BOOKKEEPING)


KERNEL_ATTN_IMPLS = ("flash", "triton", "mk")
SUPPORTED_INITS = ("kaiming_normal_", "kaiming_uniform_", "baseline_", "small_init_")

# Top-level keys transformers (or llm-foundry) write that carry no model semantics for us: kept verbatim
# in ``extra`` so a config.json round-trips.
_PASSTHROUGH = {"architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
                "init_device", "verbose", "use_cache", "initializer_range", "pad_token_id", "bos_token_id",
                "eos_token_id", "fc_type", "ffn_config", "return_dict", "output_hidden_states",
                "output_attentions", "id2label", "label2id", "problem_type", "use_pad_tok_in_ffn",
                "tokenizer_name", "hidden_size", "num_attention_heads", "num_hidden_layers"}


@dataclasses.dataclass
class MPTConfig:
    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    expansion_ratio: float = 4
    max_seq_len: int = 2048
    vocab_size: int = 50368
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    learned_pos_emb: bool = True
    attn_config: dict = dataclasses.field(default_factory=dict)
    no_bias: bool = True
    norm_type: str = "low_precision_layernorm"
    layer_norm_epsilon: float = 1e-5
    logit_scale: float | str | None = None
    embedding_fraction: float = 1.0
    init_config: dict = dataclasses.field(default_factory=dict)
    tie_word_embeddings: bool = True
    extra: dict = dataclasses.field(default_factory=dict)  # unknown/passthrough config.json keys

    def __post_init__(self):
        self.attn_config = {**_ATTN_DEFAULTS, **(self.attn_config or {})}
        self.init_config = {**_INIT_DEFAULTS, **(self.init_config or {})}
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_n_heads(self) -> int:
        t = self.attn_config["attn_type"]
        if t == "multiquery_attention":
            return 1
        if t == "grouped_query_attention":
            return int(self.attn_config["kv_n_heads"] or self.n_heads)
        return self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        return int(self.expansion_ratio * self.d_model)

    @property
    def softmax_scale(self) -> float:
        s = self.attn_config["softmax_scale"]
        return float(s) if s is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def uses_kernel_attention(self) -> bool:
        return self.attn_config["attn_impl"] in KERNEL_ATTN_IMPLS

    # ---- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        a = self.attn_config
        unknown = set(a) - _ATTN_KNOWN
        if unknown:
            raise ValueError(f"attn_config: unknown keys {sorted(unknown)}")
        on = foundry_options_on(a, self.d_model)
        if on:
            key, v = on[0]
            raise ValueError(f"attn_config.{key}={v!r} is not supported (llm-foundry's option; this model "
                             f"implements only {key}={_FOUNDRY_ATTN_OFF[key]!r})")
        if not isinstance(a.get("fused_qkv", True), bool):
            raise ValueError(f"attn_config.fused_qkv: expected a bool, got {a['fused_qkv']!r}")
        if self.n_heads < 1 or self.d_model < 1:
            raise ValueError(f"d_model ({self.d_model}) and n_heads ({self.n_heads}) must be positive")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_layers < 1 or self.vocab_size < 1:
            raise ValueError("n_layers and vocab_size must be positive")
        if a["attn_type"] not in ("multihead_attention", "multiquery_attention", "grouped_query_attention"):
            raise ValueError(f"attn_config.attn_type: unsupported {a['attn_type']!r}")
        if a["attn_type"] == "grouped_query_attention":
            kv = a["kv_n_heads"] or self.n_heads
            if kv < 1 or self.n_heads % kv != 0:
                raise ValueError(f"attn_config.kv_n_heads ({kv}) must divide n_heads ({self.n_heads})")
        elif a["kv_n_heads"] is not None and a["kv_n_heads"] != self.kv_n_heads:
            _warn_once(f"attn_config.kv_n_heads={a['kv_n_heads']} is ignored with attn_type={a['attn_type']!r}: "
                       f"the model has {self.kv_n_heads} key/value head(s) (kv_n_heads applies only with "
                       "attn_type='grouped_query_attention', as in llm-foundry); set that attn_type for "
                       "grouped-query attention")
        if a["attn_impl"] not in ("torch",) + KERNEL_ATTN_IMPLS:
            raise ValueError(f"attn_config.attn_impl: expected 'torch' or one of {KERNEL_ATTN_IMPLS}, "
                             f"got {a['attn_impl']!r}")
        if not a["alibi"]:
            raise ValueError("attn_config.alibi=False is not supported: this model is ALiBi-only "
                             "(learned positional embeddings and RoPE are not implemented)")
        if a["prefix_lm"]:
            raise ValueError("attn_config.prefix_lm=True is not supported (no prefix mask in the attention "
                             "kernel); use a causal model")
        if a["clip_qkv"] is not None and a["clip_qkv"] <= 0:
            raise ValueError(f"attn_config.clip_qkv must be positive or None, got {a['clip_qkv']}")
        if self.norm_type not in ("low_precision_layernorm", "layernorm"):
            raise ValueError(f"norm_type: only 'low_precision_layernorm' and 'layernorm' are supported, "
                             f"got {self.norm_type!r}")
        if isinstance(self.logit_scale, str) and self.logit_scale != "inv_sqrt_d_model":
            raise ValueError(f"logit_scale: expected a number, None or 'inv_sqrt_d_model', got "
                             f"{self.logit_scale!r}")
        if not 0 < self.embedding_fraction <= 1:
            raise ValueError(f"embedding_fraction must be in (0, 1], got {self.embedding_fraction}")
        ffn = self.extra.get("ffn_config") or {}
        if ffn.get("ffn_type", "mptmlp") != "mptmlp":
            raise ValueError(f"ffn_config.ffn_type: only 'mptmlp' (GELU MLP) is supported, got {ffn['ffn_type']!r}")
        act = ffn.get("ffn_act_fn")
        if act and not (isinstance(act, dict) and act.get("name") == "gelu"
                        and act.get("approximate", "none") == "none" and set(act) <= {"name", "approximate"}):
            raise ValueError(f"ffn_config.ffn_act_fn: only exact GELU ({{'name': 'gelu'}}, MPT's) is supported, got {act!r}")
        if ffn.get("ffn_hidden_size") not in (None, self.ffn_hidden_size):
            raise ValueError("ffn_config.ffn_hidden_size different from expansion_ratio * d_model is not supported")
        fc = self.extra.get("fc_type", "torch")
        if isinstance(fc, dict):  # llm-foundry now writes {"name": "torch"}
            fc = fc.get("name", "torch") if set(fc) <= {"name"} else fc
        if fc not in ("torch", None):
            raise ValueError(f"fc_type: only 'torch' is supported, got {self.extra['fc_type']!r}")
        if self.init_config["name"] not in SUPPORTED_INITS:
            raise ValueError(f"init_config.name: expected one of {SUPPORTED_INITS}, got {self.init_config['name']!r}")
        if self.ffn_hidden_size != self.expansion_ratio * self.d_model:
            raise ValueError("expansion_ratio * d_model must be an integer")

    # ---- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {**copy.deepcopy(self.extra), **d}
        # transformers 5's strict MptConfig types these as int; MPT's own configs write 0 and 8 too.
        for key in ("attn_pdrop", "alibi_bias_max"):
            v = d["attn_config"][key]
            if isinstance(v, float) and v.is_integer():
                d["attn_config"][key] = int(v)
        for key in ("clip_qkv", "softmax_scale"):  # typed float in transformers' strict config
            if d["attn_config"][key] is not None:
                d["attn_config"][key] = float(d["attn_config"][key])
        if isinstance(d["expansion_ratio"], float) and d["expansion_ratio"].is_integer():
            d["expansion_ratio"] = int(d["expansion_ratio"])
        if d["attn_config"]["kv_n_heads"] is None:
            d["attn_config"]["kv_n_heads"] = self.kv_n_heads
        d.setdefault("model_type", "mpt")
        d.setdefault("architectures", ["MptForCausalLM"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MPTConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: d.pop(k) for k in list(d) if k in names}
        attn = dict(kwargs.get("attn_config") or {})
        # transformers serialises its sub-config with PreTrainedConfig bookkeeping keys: drop those.
        # Anything else unknown is dropped with a warning (it may change the model: say so); the
        # known options of llm-foundry are kept, and validate() refuses the ones switched on.
        rest = [k for k in attn if k not in _ATTN_KNOWN and k not in _HF_CONFIG_BOOKKEEPING and not k.startswith("_")]
        # only then ask the installed transformers (a slow import) whether it writes them
        strange = sorted(set(rest) - _hf_bookkeeping_keys()) if rest else []
        if strange:
            import warnings

            warnings.warn(f"attn_config: unknown keys {strange} are ignored (not an MPT or llm-foundry option "
                          f"this version knows); the model is built without them", stacklevel=2)
        kwargs["attn_config"] = {k: v for k, v in attn.items() if k in _ATTN_KNOWN}
        extra = {k: v for k, v in d.items() if k in _PASSTHROUGH or k.startswith("_")}
        unknown = sorted(k for k in d if k not in extra)
        # Unknown top-level keys: keep them (round trip) -- transformers also keeps arbitrary keys.
        extra.update({k: d[k] for k in unknown})
        return cls(**kwargs, extra=extra)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (a config.json file, or a directory to write config.json into)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MPTConfig":
        """Read a config.json (or the config.json inside directory ``path``)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    from_json = load

    def replace(self, **changes) -> "MPTConfig":
        """A copy with top-level fields and/or ``attn_config`` keys changed (``attn_impl="torch"``)."""
        d = dataclasses.asdict(self)
        attn = dict(d.pop("attn_config"))
        for k in list(changes):
            if k in _ATTN_DEFAULTS:
                attn[k] = changes.pop(k)
        d.update(changes)
        d["attn_config"] = {**attn, **(changes.get("attn_config") or {})}
        return MPTConfig(**d)

    # ---- presets ----------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MPTConfig":
        """Presets: mpt-7b, mpt-7b-storywriter, mpt-1b, mpt-125m, tiny (CPU-sized, for tests and the
        bundled training run). Overrides take top-level fields and attn_config keys."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        base = copy.deepcopy(PRESETS[name])
        cfg = cls(**base)
        return cfg.replace(**overrides) if overrides else cfg


def _attn(**kw) -> dict:
    return {"attn_impl": "flash", **kw}


# Sizes from MosaicML's published configs (mpt-7b, mpt-7b-storywriter on the Hub; mpt-1b / mpt-125m from
# llm-foundry's yamls). attn_impl is "flash" (our kernel) in every preset; checkpoints on disk usually say
# "torch", which from_pretrained overrides unless told otherwise.
PRESETS: dict[str, dict] = {
    "mpt-7b": dict(d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4, max_seq_len=2048,
                   vocab_size=50432, attn_config=_attn(alibi_bias_max=8)),
    "mpt-7b-storywriter": dict(d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4, max_seq_len=65536,
                               vocab_size=50432, attn_config=_attn(alibi_bias_max=16, clip_qkv=6)),
    "mpt-1b": dict(d_model=2048, n_heads=16, n_layers=24, expansion_ratio=4, max_seq_len=2048,
                   vocab_size=50368, attn_config=_attn()),
    "mpt-125m": dict(d_model=768, n_heads=12, n_layers=12, expansion_ratio=4, max_seq_len=2048,
                     vocab_size=50368, attn_config=_attn()),
    # head_dim 64 (an instantiated CUDA kernel size), small enough to train on 2 CPU cores.
    "tiny": dict(d_model=256, n_heads=4, n_layers=4, expansion_ratio=4, max_seq_len=512,
                 vocab_size=8192, attn_config=_attn()),
}
