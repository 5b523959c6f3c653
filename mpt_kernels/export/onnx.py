"""MPT -> ONNX, one graph for prefill and decode with an explicit KV cache.

Why a graph module instead of tracing the model's own forward:

* ONNX needs the KV cache as plain tensors in and out of the graph. A model's cache object (ours or
  transformers' ``Cache``) is Python state that exporters cannot carry across calls.
* Our attention is the custom op ``mk.alibi_attention`` backed by compiled CPU/CUDA kernels. Those
  are opaque to every ONNX runtime; shipping them as an ONNX custom op would tie the graph to our
  library. The graph instead spells ALiBi attention in standard operators: ``MatMul`` for the scores,
  the ALiBi bias and causal mask built from ``Shape``/``Range`` of the inputs (so nothing is sized at
  export time), ``Softmax``, ``MatMul``. ``alibi_attention_onnx`` below is that decomposition; it is
  the same function as ``mk.alibi_attention`` (MPT's key-position bias, bottom-right causal rows).
* The graph module reads only the config and the weights under MPT's Hugging Face names, so it
  exports our ``MPTForCausalLM`` and transformers' ``MptForCausalLM`` alike, and the tests hold it to
  the source model's own forward and ``generate``.

Graph interface (names are stable; batch, sequence and past lengths are dynamic):
    inputs : input_ids int64 (batch, seq); attention_mask int64 (batch, past + seq), 1 = real token,
             0 = left padding; past_key_values.{i}.key / .value (batch, kv_heads, past, head_dim)
    outputs: logits (batch, seq, vocab); present.{i}.key / .value (batch, kv_heads, past + seq, head_dim)
Prefill passes past tensors with ``past = 0``; each decode step feeds ``present`` back as ``past`` and
the mask grown by a column of ones. Left-padded rows compute exactly what the unpadded row computes
(MPT's ALiBi bias depends only on the distance to the last key); logits at padding positions are
meaningless.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ._source import check_out_dir, check_required_weights, default_softmax_scale, kv_heads, open_source


def _alibi_slopes(n_heads: int, alibi_bias_max: float) -> torch.Tensor:
    # MPT's gen_slopes (see mpt_kernels.ops.reference.alibi_slopes); constant-folded into the graph.
    padded = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, padded + 1, dtype=torch.float32) * (alibi_bias_max / padded)
    s = 1.0 / torch.pow(2, m)
    if padded != n_heads:
        s = torch.cat([s[1::2], s[::2]])[:n_heads]
    return s


def alibi_attention_onnx(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None,
                         softmax_scale: float, key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """Causal ALiBi attention from standard operators. q (B, H, Sq, D); k, v (B, Hkv, Sk, D) with
    Sk >= Sq, query rows aligned to the last Sq keys; slopes (H,) float32 or None; key_padding
    (B, Sk) bool, True = masked key. Returns (B, H, Sq, D). The score bias is MPT's
    ``-slope * (Sk - 1 - j)``; scores and softmax run in float32."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hkv != H:
        # repeat each k/v head for the H // Hkv query heads that share it (Expand + Reshape in ONNX)
        k = k[:, :, None].expand(B, Hkv, H // Hkv, Sk, D).reshape(B, H, Sk, D)
        v = v[:, :, None].expand(B, Hkv, H // Hkv, Sk, D).reshape(B, H, Sk, D)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * softmax_scale  # (B, H, Sq, Sk)
    j = torch.arange(Sk, device=q.device)  # key positions
    i = torch.arange(Sq, device=q.device) + (Sk - Sq)  # absolute query positions
    if slopes is not None:
        dist = (Sk - 1 - j).to(torch.float32)  # (Sk,)
        scores = scores - slopes[:, None, None] * dist  # (H, 1, Sk) broadcast
    masked = j[None, :] > i[:, None]  # (Sq, Sk)
    if key_padding is not None:
        masked = masked | key_padding[:, None, None, :]  # (B, 1, Sq, Sk)
    # A finite fill, not -inf: a padding query row sees no key at all and must give a finite (ignored)
    # output, because NaN there would reach real rows through 0 * NaN in the next layer's probs @ v.
    # Rows with a visible key are unchanged: exp(min - max) is exactly 0.
    scores = scores.masked_fill(masked, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


class MPTGraph(torch.nn.Module):
    """MPT's causal-LM forward with the KV cache as tensors: the module ``export_onnx`` exports.

    ``forward(input_ids, attention_mask, *past)`` with ``past = (k_0, v_0, k_1, v_1, ...)`` returns
    ``(logits, k_0', v_0', ...)``; ``attention_mask`` may be None (no padding) in torch. Built from an MPT model (weights shared, not copied) or a
    Hugging Face MPT checkpoint directory."""

    def __init__(self, model_or_dir):
        super().__init__()
        cfg, src = open_source(model_or_dir)
        check_required_weights(cfg, src)
        self.cfg = cfg
        attn = cfg["attn_config"]
        self.d_model, self.n_heads, self.n_layers = int(cfg["d_model"]), int(cfg["n_heads"]), int(cfg["n_layers"])
        self.head_dim = self.d_model // self.n_heads
        self.n_kv = kv_heads(cfg)
        self.eps = float(cfg["layer_norm_epsilon"])
        self.clip_qkv = attn.get("clip_qkv")
        self.qk_ln = bool(attn.get("qk_ln"))
        scale = attn.get("softmax_scale")  # 0 is a scale (the model's), not "unset"
        self.softmax_scale = float(scale) if scale is not None else default_softmax_scale(cfg)
        if not attn.get("alibi", True):
            raise ValueError("model_or_dir: attn_config.alibi=False is not supported by the ONNX export (MPT is ALiBi)")
        ls = cfg.get("logit_scale")
        self.logit_scale = 1.0 / math.sqrt(self.d_model) if ls == "inv_sqrt_d_model" else (
            float(ls) if ls is not None else None)
        act = (cfg.get("ffn_config") or {}).get("ffn_act_fn") or {}
        if act and act.get("name", "gelu") != "gelu":
            raise ValueError(f"model_or_dir: ffn activation {act} is not supported by the ONNX export (MPT uses gelu)")
        self.gelu_approximate = act.get("approximate", "none") if act else "none"

        # Parameters by their MPT names with '.' -> '_' (module attribute names cannot hold dots);
        # registered as buffers of the same storage so exporting never copies a model's weights.
        self._names = {}
        for name in sorted(src.names):
            if name == "lm_head.weight" and cfg.get("tie_word_embeddings", True):
                continue
            t = src[name]
            key = name.replace(".", "_")
            self._names[name] = key
            self.register_buffer(key, t.detach(), persistent=False)
        # on the weights' device: a CUDA model's graph (and its export) must not mix in a CPU tensor
        slopes = _alibi_slopes(self.n_heads, float(attn.get("alibi_bias_max", 8)))
        self.register_buffer("alibi_slopes", slopes.to(self.w("transformer.wte.weight").device), persistent=False)

    @property
    def _names_by_key(self):
        return {key: name for name, key in self._names.items()}

    def w(self, name):
        key = self._names.get(name)
        return None if key is None else getattr(self, key)

    def _ln(self, x, prefix):
        # MPT's low-precision LayerNorm in our model's form: float32 statistics, output in x's dtype.
        w, b = self.w(prefix + ".weight"), self.w(prefix + ".bias")
        y = F.layer_norm(x.float(), (x.shape[-1],), w.float(), None if b is None else b.float(), self.eps)
        return y.to(x.dtype)

    def _linear(self, x, prefix):
        return F.linear(x, self.w(prefix + ".weight"), self.w(prefix + ".bias"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *past: torch.Tensor):
        B, S = input_ids.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        key_padding = None if attention_mask is None else attention_mask == 0  # (B, past + S)
        x = F.embedding(input_ids, self.w("transformer.wte.weight"))  # (B, S, d)
        presents = []
        for li in range(self.n_layers):
            p = f"transformer.blocks.{li}."
            h = self._ln(x, p + "norm_1")
            qkv = self._linear(h, p + "attn.Wqkv")  # (B, S, (H + 2*Hkv) * D)
            if self.clip_qkv:
                qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            if self.qk_ln:
                q, k = self._ln(q, p + "attn.q_ln"), self._ln(k, p + "attn.k_ln")
            q = q.reshape(B, S, H, D).transpose(1, 2)  # (B, H, S, D)
            k = k.reshape(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv, S, D)
            v = v.reshape(B, S, Hkv, D).transpose(1, 2)
            k = torch.cat([past[2 * li], k], dim=2)  # (B, Hkv, P + S, D)
            v = torch.cat([past[2 * li + 1], v], dim=2)
            presents += [k, v]
            a = alibi_attention_onnx(q, k, v, self.alibi_slopes, self.softmax_scale, key_padding)  # (B, H, S, D)
            a = a.transpose(1, 2).reshape(B, S, H * D)
            x = x + self._linear(a, p + "attn.out_proj")
            h = self._ln(x, p + "norm_2")
            h = F.gelu(self._linear(h, p + "ffn.up_proj"), approximate=self.gelu_approximate)
            x = x + self._linear(h, p + "ffn.down_proj")
        x = self._ln(x, "transformer.norm_f")
        head = self.w("lm_head.weight")
        logits = F.linear(x, head if head is not None else self.w("transformer.wte.weight"))
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        return (logits, *presents)

    def empty_past(self, batch: int = 1, dtype=None, device=None):
        """Past tensors of length 0, the prefill input (default: the weights' dtype and device)."""
        dtype = dtype or self.w("transformer.wte.weight").dtype
        device = device or self.w("transformer.wte.weight").device
        return [torch.zeros(batch, self.n_kv, 0, self.head_dim, dtype=dtype, device=device)
                for _ in range(2 * self.n_layers)]

    def input_names(self):
        return ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kv}" for i in range(self.n_layers)
                                                  for kv in ("key", "value")]

    def output_names(self):
        return ["logits"] + [f"present.{i}.{kv}" for i in range(self.n_layers) for kv in ("key", "value")]


class _NoCache(torch.nn.Module):
    """``(input_ids, attention_mask) -> logits`` only: the graph for runtimes that keep no cache."""

    def __init__(self, graph: MPTGraph):
        super().__init__()
        self.mpt = graph  # not "graph": that name is GraphModule's own attribute after export

    def forward(self, input_ids, attention_mask):
        B = input_ids.shape[0]
        g = self.mpt
        empty = torch.zeros(B, g.n_kv, 0, g.head_dim, dtype=g.w("transformer.wte.weight").dtype,
                            device=input_ids.device)
        return g(input_ids, attention_mask, *([empty] * (2 * g.n_layers)))[0]


_ONNX_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _onnx_weight_dtype(model_dtype: torch.dtype, dtype: str | None) -> torch.dtype:
    """The weight dtype of the exported graph: ``dtype`` when given, else the model's when ONNX
    runtimes run it (fp32, fp16), else fp32 (bfloat16 MatMul is rare outside of GPUs' providers)."""
    if dtype is not None:
        return _ONNX_DTYPES[dtype]
    return model_dtype if model_dtype in _ONNX_DTYPES.values() else torch.float32


def _require(*modules: str) -> None:
    """Fail early and say what to install (torch's dynamo exporter needs onnx and onnxscript; running
    the graph needs onnxruntime): all in the package's ``export`` extra."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"ONNX export/run needs {', '.join(missing)}: pip install 'mpt_kernels[export]' "
                          f"(or pip install {' '.join(missing)})")


def _onnx_target(path) -> Path:
    """Where ``export_onnx`` writes: ``path`` itself when it names a ``.onnx`` file, else
    ``<path>/model.onnx``."""
    path = Path(path)
    return path if path.suffix == ".onnx" else path / "model.onnx"


def find_onnx_model(path) -> Path:
    """The ``.onnx`` file to load for ``path``: the file itself, or in a directory the file
    ``export_onnx`` writes there (``model.onnx``), else its only ``.onnx`` file. Raises
    ``FileNotFoundError`` naming what was looked for."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"path: {path} does not exist (expected an .onnx file or the directory "
                                f"export_onnx wrote into)")
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return path / "model.onnx"
        found = sorted(p for p in path.glob("*.onnx") if p.is_file())
        if len(found) == 1:
            return found[0]
        if found:
            raise FileNotFoundError(f"path: {path} holds no model.onnx and several .onnx files "
                                    f"({', '.join(p.name for p in found)}); pass one of them")
        raise FileNotFoundError(f"path: {path} holds no .onnx file (export_onnx(model, {str(path)!r}) "
                                f"writes {path / 'model.onnx'})")
    raise FileNotFoundError(f"path: {path} is neither a file nor a directory")


def export_onnx(model, path, opset: int = 18, with_kv_cache: bool = True, dtype: str | None = None,
                external_data: bool | None = None, progress: bool = False, overwrite: bool = False) -> Path:
    """Export an MPT (our ``MPTForCausalLM``, transformers' ``MptForCausalLM`` or a Hugging Face MPT
    checkpoint directory) to ONNX with torch's dynamo exporter and return the ``.onnx`` path.

    ``path``: a ``.onnx`` file, or a directory (then ``<path>/model.onnx``). ``with_kv_cache=True``
    exports the one graph that does prefill (past length 0) and decode (see the module docstring for
    its inputs and outputs); ``False`` exports ``(input_ids, attention_mask) -> logits``. Batch and sequence (and past)
    axes are dynamic. ``dtype`` ("fp32"/"fp16", default: the model's) sets the weight dtype; scores
    and softmax run in float32 either way; a bfloat16 model exports as fp32 unless told otherwise, since
    ONNX runtimes rarely run bfloat16 MatMul. ``external_data``: store the weights in
    ``<name>.onnx.data`` beside the graph (default: when they pass ~1.8 GB, protobuf's limit being 2 GB).
    An existing ``.onnx`` file (or its ``.onnx.data``) at the target raises ``FileExistsError`` before
    anything is exported, unless ``overwrite=True``, which replaces both (as the FasterTransformer export).
    """
    if not isinstance(opset, int) or opset < 18:
        # LayerNormalization needs 17; the dynamo exporter's own translations target 18 and newer.
        raise ValueError(f"opset: expected an int >= 18, got {opset!r}")
    if dtype is not None and dtype not in _ONNX_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_ONNX_DTYPES)} or None, got {dtype!r}")
    check_out_dir(Path(path).parent if Path(path).suffix == ".onnx" else path, "path")
    path = _onnx_target(path)
    if path.is_dir():
        raise IsADirectoryError(f"path: {path} is a directory, not an .onnx file")
    data = path.with_name(path.name + ".data")
    existing = [p for p in (path, data) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"path: {existing[0]} exists (pass overwrite=True, --overwrite on the command line, "
                              "to replace it)")
    _require("onnx", "onnxscript")
    from tqdm.auto import tqdm

    bar = tqdm(total=3, desc="ONNX export", unit="stage", disable=not progress)
    made: list[Path] = []
    saving = False
    try:
        # all before creating any directory: a wrong model_or_dir or dtype leaves nothing behind
        graph = MPTGraph(model).eval()
        target = _onnx_weight_dtype(graph.w("transformer.wte.weight").dtype, dtype)
        if target != graph.w("transformer.wte.weight").dtype:
            before = {graph._names_by_key[k]: b for k, b in graph.named_buffers() if k in graph._names_by_key}
            graph = graph.to(target)  # converts the graph module's buffers, never the model's
            for name, b in before.items():
                if target == torch.float16 and b.is_floating_point() and not torch.isfinite(graph.w(name)).all() \
                        and torch.isfinite(b).all():
                    # fp16 tops out at 65504: a larger weight would be inf in the graph, and the logits NaN
                    raise ValueError(f"dtype: {name} holds values beyond float16's range (max |x| = "
                                     f"{b.abs().max().item():.6g} > 65504); export with dtype='fp32'")
        made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # removed again on failure
        path.parent.mkdir(parents=True, exist_ok=True)
        wdtype, device = graph.w("transformer.wte.weight").dtype, graph.w("transformer.wte.weight").device
        bar.update(1)
        bar.set_postfix_str("torch.export + ONNX translation")

        from torch.export import Dim

        batch, seq, past = Dim("batch"), Dim("seq"), Dim("past")
        # Example sizes are distinct and > 1 so torch.export does not specialise (0/1) or tie the axes;
        # the graph itself runs at past = 0 (prefill) and seq = 1 (decode).
        B, S, P = 2, 3, 4
        ids = torch.randint(0, int(graph.cfg["vocab_size"]), (B, S), device=device)
        if with_kv_cache:
            past_t = tuple(torch.zeros(B, graph.n_kv, P, graph.head_dim, dtype=wdtype, device=device)
                           for _ in range(2 * graph.n_layers))
            mask = torch.ones(B, P + S, dtype=torch.int64, device=device)
            module, args = graph, (ids, mask, *past_t)
            # The mask's length is past + seq: Dim.AUTO lets torch.export derive that relation.
            dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: Dim.AUTO}, tuple({0: batch, 2: past} for _ in past_t))
            input_names, output_names = graph.input_names(), graph.output_names()
        else:
            mask = torch.ones(B, S, dtype=torch.int64, device=device)
            module, args = _NoCache(graph), (ids, mask)
            dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
            input_names, output_names = ["input_ids", "attention_mask"], ["logits"]

        nbytes = sum(b.numel() * b.element_size() for b in graph.buffers())
        with warnings.catch_warnings(), _quiet_torchvision_notice():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not about this model
            program = torch.onnx.export(
                module, args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
                output_names=output_names, opset_version=opset, optimize=True, verbose=False,
            )
        bar.update(1)
        bar.set_postfix_str("saving")
        import onnx

        meta = {
            "mpt_kernels.interface": "kv_cache" if with_kv_cache else "logits",
            "mpt_kernels.n_layers": str(graph.n_layers),
            "mpt_kernels.kv_heads": str(graph.n_kv),
            "mpt_kernels.head_dim": str(graph.head_dim),
            "mpt_kernels.vocab_size": str(graph.cfg["vocab_size"]),
        }
        proto = program.model_proto
        if with_kv_cache:
            _rename_dim(proto, "attention_mask", 1, "past + seq")  # Dim.AUTO's generated name, e.g. "s53"
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        if external_data is None:
            external_data = nbytes > 1_800_000_000
        for p in existing:
            p.unlink()  # overwrite=True: a stale .onnx.data must not outlive the graph it belonged to
        saving = True  # from here a failure leaves a partial file: removed below
        if external_data:
            onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data")
        else:
            onnx.save_model(proto, str(path))
        bar.update(1)
    except BaseException:  # an error or Ctrl-C at any stage
        bar.close()  # end the bar's line: the command line's message then starts a line of its own
        if saving:
            for p in (path, data):
                p.unlink(missing_ok=True)
        for d in made:  # the directories this export created, deepest first, if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    bar.close()
    return path


@contextlib.contextmanager
def _quiet_torchvision_notice():
    """Without torchvision installed, torch's ONNX exporter logs a warning for each of torchvision's ops
    it skips registering (nms, roi_align, ...): about a package this graph never uses. Drop those records
    while exporting; anything else the exporter logs still shows."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")

    def keep(record):
        return not record.getMessage().startswith("torchvision is not installed")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _rename_dim(proto, input_name: str, axis: int, new: str) -> None:
    """Give the symbolic axis ``axis`` of input ``input_name`` the name ``new`` everywhere it appears."""
    old = next(i for i in proto.graph.input if i.name == input_name).type.tensor_type.shape.dim[axis].dim_param
    if not old or old == new:
        return
    for coll in (proto.graph.input, proto.graph.output, proto.graph.value_info):
        for vi in coll:
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param == old:
                    d.dim_param = new


class OnnxMPT:
    """A minimal onnxruntime driver for the KV-cache graph: ``logits, past = run(ids, past)`` and
    greedy generation. Used by the tests and the CLI's --verify; a template for serving code."""

    def __init__(self, path, providers=("CPUExecutionProvider",)):
        """``path``: the ``.onnx`` file, or the directory ``export_onnx`` wrote it into."""
        _require("onnxruntime")
        import onnxruntime as ort

        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph, InvalidProtobuf

        path = find_onnx_model(path)
        try:
            self.session = ort.InferenceSession(str(path), providers=list(providers))
        except (InvalidProtobuf, InvalidGraph) as exc:
            raise ValueError(f"path: {path} is not a valid ONNX model ({exc})") from exc
        self.path = path
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("mpt_kernels.interface") != "kv_cache":
            raise ValueError(f"path: {path} is not an mpt_kernels KV-cache graph (metadata {meta})")
        self.n_layers = int(meta["mpt_kernels.n_layers"])
        self.kv_heads = int(meta["mpt_kernels.kv_heads"])
        self.head_dim = int(meta["mpt_kernels.head_dim"])
        self.vocab_size = int(meta["mpt_kernels.vocab_size"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.past_dtype = {"tensor(float)": "float32", "tensor(float16)": "float16"}[self.session.get_inputs()[2].type]

    def empty_past(self, batch):
        import numpy as np

        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.past_dtype)
                for _ in range(2 * self.n_layers)]

    def run(self, input_ids, past=None, attention_mask=None):
        """One graph call. ``attention_mask`` (batch, past + seq), default all ones."""
        import numpy as np

        input_ids = np.asarray(input_ids, dtype=np.int64)
        past = self.empty_past(input_ids.shape[0]) if past is None else past
        if attention_mask is None:
            attention_mask = np.ones((input_ids.shape[0], past[0].shape[2] + input_ids.shape[1]), dtype=np.int64)
        feed = [input_ids, np.asarray(attention_mask, dtype=np.int64), *past]
        out = self.session.run(None, dict(zip(self.input_names, feed)))
        return out[0], out[1:]

    def greedy(self, input_ids, max_new_tokens: int, attention_mask=None, *, eos_token_id=None,
               pad_token_id=None):
        """Prefill then up to ``max_new_tokens`` decode steps; returns prompt + new tokens (batch, S + n).
        ``attention_mask`` (batch, S) marks left padding of a batch of unequal prompts.

        ``eos_token_id`` (an id or a list of ids) stops as ``MPTForCausalLM.generate`` does: a row that
        has produced one is filled with ``pad_token_id`` (default: the first EOS id) and fed it on the
        next step, and generation ends once every row has, so n <= max_new_tokens. The tokens equal
        ``model.generate(..., temperature=0, eos_token_id=...)``'s."""
        import numbers

        import numpy as np

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be an integer >= 0, got {max_new_tokens!r}")
        vocab = self.vocab_size
        eos = [] if eos_token_id is None else [int(e) for e in np.asarray(eos_token_id).reshape(-1).tolist()]
        for name, val in [("eos_token_id", e) for e in eos] + [("pad_token_id", pad_token_id)]:
            if val is not None and not 0 <= int(val) < vocab:  # a finished row is fed its pad id
                raise ValueError(f"{name}: ids must be in [0, {vocab}) (the model's vocab_size), got {int(val)}")
        pad = int(pad_token_id) if pad_token_id is not None else (eos[0] if eos else 0)
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones(ids.shape, np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        out = [ids]
        if max_new_tokens == 0:
            return ids.copy()
        logits, past = self.run(ids, None, mask)
        finished = np.zeros(ids.shape[0], dtype=bool)
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1).astype(np.int64)
            if eos:
                nxt = np.where(finished, pad, nxt)
                finished |= np.isin(nxt, eos)
            out.append(nxt[:, None])
            if step + 1 == max_new_tokens or (eos and finished.all()):
                break
            mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
            logits, past = self.run(nxt[:, None], past, mask)
        return np.concatenate(out, axis=1)
