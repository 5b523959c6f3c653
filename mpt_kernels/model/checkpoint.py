"""Hugging Face MPT checkpoint directories, read and written without network access.

Reads: config.json plus one of model.safetensors, model.safetensors.index.json (shards),
pytorch_model.bin, pytorch_model.bin.index.json (shards). Writes config.json plus model.safetensors
(or shards with an index above ``max_shard_size``) that transformers' MptForCausalLM.from_pretrained
loads. Parameter names are the same on both sides; a tied head is stored once (transformer.wte.weight).
"""
from __future__ import annotations

import json
import os
import re

import torch

from .config import MPTConfig

_SINGLE = ("model.safetensors", "pytorch_model.bin")
_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _load_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (on the CPU), with any ``model.`` wrapper prefix removed."""
    for name in _INDEX:
        index_path = os.path.join(directory, name)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            sd = {}
            for shard in sorted(set(weight_map.values())):
                sd.update(_load_file(os.path.join(directory, shard)))
            break
    else:
        for name in _SINGLE:
            p = os.path.join(directory, name)
            if os.path.exists(p):
                sd = _load_file(p)
                break
        else:
            raise FileNotFoundError(f"{directory}: no model.safetensors, pytorch_model.bin or shard index found")
    # Composer checkpoints wrap the HF model as ``model.``; the names below it are the same.
    if sd and all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    return sd


_SEPARATE_QKV = re.compile(r"^(.*\.attn\.)Wq\.(weight|bias)$")


def _fuse_separate_qkv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llm-foundry's ``fused_qkv=False`` stores attention inputs as ``attn.Wq`` / ``Wk`` / ``Wv``; this
    model has one ``attn.Wqkv`` whose rows are q, then k, then v (the fused layout): concatenate."""
    for name in [k for k in sd if _SEPARATE_QKV.match(k)]:
        prefix, kind = _SEPARATE_QKV.match(name).groups()
        parts = [f"{prefix}{w}.{kind}" for w in ("Wq", "Wk", "Wv")]
        if not all(p in sd for p in parts):
            raise ValueError(f"checkpoint has {name} but not all of {parts}: cannot form {prefix}Wqkv.{kind}")
        sd[f"{prefix}Wqkv.{kind}"] = torch.cat([sd.pop(p) for p in parts], dim=0)
    return sd


def load_pretrained(cls, path, dtype=None, device=None, attn_impl="flash", strict=True):
    """Build ``cls`` (MPTForCausalLM) from a local HF MPT directory. ``attn_impl`` overrides the
    checkpoint's (MosaicML's configs say "torch"; "flash" runs our kernel); None keeps it.
    ``dtype`` None keeps the stored dtype."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"from_pretrained: {path!r} is not a local directory (no network access is attempted)")
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for, but torch sees no CUDA device (a CPU-only torch build, or no GPU)")
    config = MPTConfig.load(path)
    if attn_impl is not None:
        config = config.replace(attn_impl=attn_impl)
    sd = _fuse_separate_qkv(load_state_dict(path))
    if config.attn_config.get("fused_qkv") is False:  # the weights are fused now: so is the config
        config = config.replace(attn_config={"fused_qkv": True})
    with torch.device("meta"):
        model = cls(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # transformers may store the tied copy; ours is wte itself
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: checkpoint does not match the config: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
    for k in expected & set(sd):
        want = model.state_dict()[k].shape
        if sd[k].shape != want:
            raise ValueError(f"{path}: {k} has shape {tuple(sd[k].shape)}, the config implies {tuple(want)}")
    if isinstance(dtype, str):  # "bfloat16", "torch.bfloat16", as config.json's torch_dtype
        name = dtype.removeprefix("torch.")
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"dtype: unknown dtype {dtype!r}")
        dtype = getattr(torch, name)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=strict, assign=True)
    if missing:  # strict=False: what the checkpoint lacks is initialised as a new model's would be
        import warnings

        from .modeling import init_weights

        warnings.warn(f"{path}: {len(missing)} weights not in the checkpoint were initialised anew: {missing[:8]}"
                      f"{'...' if len(missing) > 8 else ''}", stacklevel=3)
        owners = {model.get_submodule(name.rpartition(".")[0]) for name in missing}
        # the checkpoint's dtype (its floating weights'), unless dtype= asks for another
        stored = next((v.dtype for v in sd.values() if v.is_floating_point()), None)
        loaded = {}
        for mod in owners:
            loaded[mod] = {k: p for k, p in mod.named_parameters(recurse=False) if not p.is_meta}
            like = next(iter(loaded[mod].values()), None)
            mod.to_empty(device="cpu", recurse=False)
            target = dtype or (like.dtype if like is not None else stored)
            if target is not None:
                mod.to(target)
        with torch.no_grad():
            init_weights(model, modules=owners)
        for mod, params in loaded.items():  # a module's loaded weights stay as loaded
            for k, p in params.items():
                setattr(mod, k, p)
    model.to(device=device or "cpu")
    return model


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"max_shard_size: cannot parse {size!r}")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def transformers_ignores(config: MPTConfig) -> list[str]:
    """The settings of ``config`` that transformers' MptForCausalLM loads without error but does not
    apply (so its outputs differ from ours): hard-coded ALiBi bias max 8, no q/k LayerNorm, no logit
    scale, no biases (their weights are dropped as unexpected keys)."""
    a = config.attn_config
    out = []
    if float(a.get("alibi_bias_max", 8)) != 8:
        out.append(f"alibi_bias_max={a['alibi_bias_max']} (transformers always uses 8)")
    if a.get("qk_ln"):
        out.append("qk_ln=True (transformers has no q/k LayerNorm)")
    if config.logit_scale is not None:
        out.append(f"logit_scale={config.logit_scale} (transformers does not scale the logits)")
    if not config.no_bias:
        out.append("no_bias=False (transformers drops the bias weights)")
    return out


def transformers_cannot_load(config: MPTConfig) -> list[str]:
    """The settings of ``config`` that make transformers' MptForCausalLM refuse the checkpoint (its
    shapes are fixed: a 4x FFN and one key/value head per query head)."""
    out = []
    if config.expansion_ratio != 4:
        out.append(f"expansion_ratio={config.expansion_ratio} (transformers' FFN is always 4 x d_model)")
    if config.kv_n_heads != config.n_heads:
        out.append(f"{config.kv_n_heads} key/value heads for {config.n_heads} query heads (transformers' MPT "
                   "has no grouped-query attention)")
    return out


def save_pretrained(model, path, max_shard_size="5GB", *, eos_token_id=None, bos_token_id=None) -> None:
    import warnings

    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    refused = transformers_cannot_load(model.config)
    ignored = transformers_ignores(model.config)
    if refused:
        warnings.warn(f"{path}: transformers' MptForCausalLM cannot load this checkpoint ({'; '.join(refused)}); "
                      "load it with mpt_kernels' MPTForCausalLM.from_pretrained", stacklevel=3)
    elif ignored:
        warnings.warn(f"{path}: transformers' MptForCausalLM loads this checkpoint but ignores {'; '.join(ignored)}, "
                      "so its outputs differ from this model's; load it with mpt_kernels' "
                      "MPTForCausalLM.from_pretrained", stacklevel=3)
    cfg_dict = model.config.to_dict()
    cfg_dict["torch_dtype"] = str(model.dtype).replace("torch.", "")
    ids = {k: int(v) for k, v in (("eos_token_id", eos_token_id), ("bos_token_id", bos_token_id)) if v is not None}
    cfg_dict.update(ids)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2, sort_keys=True)
        f.write("\n")
    gen_cfg = os.path.join(path, "generation_config.json")
    if ids:  # what transformers' generate() reads: stop at the EOS (an existing one is left alone otherwise)
        with open(gen_cfg, "w") as f:
            json.dump({**ids, **({"pad_token_id": ids["eos_token_id"]} if "eos_token_id" in ids else {})}, f, indent=2)
            f.write("\n")

    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    for stale in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json"):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    n = len(shards)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
