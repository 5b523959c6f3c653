"""Command line: export a Hugging Face MPT checkpoint directory for serving.

    python -m mpt_kernels.export fastertransformer --model DIR --out DIR [--tp N] [--dtype fp16] [--force]
    python -m mpt_kernels.export onnx --model DIR --out DIR [--opset 18] [--dtype fp16] [--no-kv-cache]

Both refuse to replace an earlier export in --out unless given --overwrite. Errors a user can fix (a
missing checkpoint, an existing output, an option the format cannot hold) print ``prog: error: ...``
and exit with status 2.

Both read the checkpoint's config.json and weights directly (no model is built for the
FasterTransformer export; weights are read one tensor at a time). ``--verify`` reads the export back
and compares logits on random tokens against the checkpoint.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch


def _random_ids(vocab_size, batch=2, seq=8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, int(vocab_size), (batch, seq), generator=g)


def _reference_logits(model_dir, ids):
    """Logits of the checkpoint: our MPTForCausalLM when it can load it, else the export's graph module
    (e.g. a checkpoint option our model refuses)."""
    try:
        from ..model import MPTForCausalLM

        model = MPTForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(ids).logits, "MPTForCausalLM"
    except (ImportError, ValueError) as exc:
        from .onnx import MPTGraph

        print(f"verify: our model cannot load {model_dir} ({exc}); comparing with the graph module")
        g = MPTGraph(model_dir).eval()
        with torch.no_grad():
            return g(ids, None, *g.empty_past(ids.shape[0]))[0].float(), "graph module"


def _verify_ft(model_dir, out):
    from ._source import open_source
    from .fastertransformer import read_fastertransformer, unsupported_features
    from .onnx import MPTGraph

    cfg, sd = read_fastertransformer(out)
    ids = _random_ids(cfg["vocab_size"])
    ref, name = _reference_logits(model_dir, ids)
    back = MPTGraph((cfg, sd)).eval()
    with torch.no_grad():
        got = back(ids, None, *back.empty_past(ids.shape[0]))[0]
    diff = (got - ref).abs().max().item()
    print(f"verify: max |logits({name} from the checkpoint) - logits(FasterTransformer files)| = {diff:.3g}")
    dropped = unsupported_features(open_source(model_dir)[0], dropped_only=True)
    if dropped:
        print(f"verify: the files are without what --force dropped, so a difference is expected: {'; '.join(dropped)}")
    return diff


def _verify_onnx(model_dir, path):
    """Logits of the exported graph in onnxruntime against the checkpoint's; for the KV-cache graph also
    the last tokens decoded one at a time through the cache (present fed back as past)."""
    import numpy as np

    from .onnx import OnnxMPT, _require

    _require("onnxruntime")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    ids = _random_ids(meta["mpt_kernels.vocab_size"])
    ref, name = _reference_logits(model_dir, ids)
    if meta.get("mpt_kernels.interface") != "kv_cache":  # (input_ids, attention_mask) -> logits
        logits = session.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones(ids.shape, np.int64)})[0]
        diff = (torch.from_numpy(logits).float() - ref).abs().max().item()
        print(f"verify: max |logits({name}) - logits(onnxruntime)| = {diff:.3g}")
        return diff
    runner = OnnxMPT(path)
    logits, _ = runner.run(ids.numpy())
    diff = (torch.from_numpy(logits).float() - ref).abs().max().item()
    n = 3  # prefill all but the last n tokens, then decode those one at a time through the cache
    out, past = runner.run(ids[:, :-n].numpy())
    steps = []
    for t in range(ids.shape[1] - n, ids.shape[1]):
        out, past = runner.run(ids[:, t:t + 1].numpy(), past)
        steps.append(out)
    cached = (torch.from_numpy(np.concatenate(steps, axis=1)).float() - ref[:, -n:]).abs().max().item()
    print(f"verify: max |logits({name}) - logits(onnxruntime)| = {diff:.3g} (prefill), {cached:.3g} "
          f"(last {n} tokens decoded through the KV cache)")
    return max(diff, cached)


# The library names its Python arguments in messages; the command line names its flags.
_FLAG_OF_ARGUMENT = {"model_or_dir": "--model", "out_dir": "--out", "path": "--out", "tensor_parallel": "--tp",
                     "dtype": "--dtype", "opset": "--opset"}
# What a user can fix (a missing or wrong checkpoint, an existing output, an option the format cannot
# hold, a missing optional package): reported as argparse errors. Anything else keeps its traceback.
_USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError, KeyError,
                ImportError)


def _cli_message(exc: BaseException) -> str:
    msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    msg = msg.replace("overwrite=True, --overwrite on the command line,", "--overwrite")
    msg = msg.replace("force=True (--force)", "--force")
    msg = msg.replace("export with dtype='fp32'", "export with --dtype fp32")
    name, sep, rest = msg.partition(": ")
    if sep and name in _FLAG_OF_ARGUMENT:
        msg = f"{_FLAG_OF_ARGUMENT[name]}: {rest}"
    if isinstance(exc, KeyError):
        msg = f"--model: {msg}"
    return msg


def _export(args):
    if args.format == "fastertransformer":
        from .fastertransformer import export_fastertransformer

        return export_fastertransformer(args.model, args.out, tensor_parallel=args.tp, dtype=args.dtype,
                                        force=args.force, overwrite=args.overwrite, progress=True)
    from .onnx import _require, export_onnx

    if args.verify:
        _require("onnx", "onnxscript", "onnxruntime")  # before the export, not after it
    return export_onnx(args.model, args.out, opset=args.opset, with_kv_cache=not args.no_kv_cache,
                       dtype=args.dtype, progress=True, overwrite=args.overwrite)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpt_kernels.export", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="format", required=True)
    ft = sub.add_parser("fastertransformer", help="FasterTransformer GPT checkpoint (<out>/<tp>-gpu/)")
    ft.add_argument("--tp", type=int, default=1, help="tensor-parallel size (GPUs FasterTransformer will use)")
    ft.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="weight_data_type of the files")
    ft.add_argument("--force", action="store_true", help="export even with options FasterTransformer ignores")
    ft.add_argument("--overwrite", action="store_true",
                    help="replace an existing non-empty <out>/<tp>-gpu/ (default: refuse)")
    on = sub.add_parser("onnx", help="ONNX graph with a KV cache (<out>/model.onnx)")
    on.add_argument("--opset", type=int, default=18)
    on.add_argument("--dtype", choices=["fp32", "fp16"], default=None, help="weight dtype (default: the checkpoint's)")
    on.add_argument("--no-kv-cache", action="store_true", help="export input_ids -> logits only")
    on.add_argument("--overwrite", action="store_true",
                    help="replace an existing <out>/model.onnx (and model.onnx.data) (default: refuse)")
    for p in (ft, on):
        p.add_argument("--model", required=True, help="Hugging Face MPT checkpoint directory (config.json + weights)")
        p.add_argument("--out", required=True, help="output directory (or, for onnx, a .onnx file name)")
        p.add_argument("--verify", action="store_true", help="read the export back and compare logits")
    args = ap.parse_args(argv)
    parser = ft if args.format == "fastertransformer" else on

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            out = _export(args)
    except _USER_ERRORS as exc:
        parser.error(_cli_message(exc))  # exits with status 2
    except KeyboardInterrupt:
        # Ctrl-C during a long export: no traceback. Neither export leaves a partial output behind
        # (FasterTransformer removes the files it had written; ONNX writes its file only at the end).
        print(f"{parser.prog}: interrupted; nothing was exported", file=sys.stderr)
        return 130
    for w in caught:  # e.g. what --force drops: one line each, not Python's warning with a source line
        if w.category is UserWarning:
            print(f"{parser.prog}: warning: {_cli_message(w.message)}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(f"wrote {out}")
    if args.verify:
        if args.format == "fastertransformer":
            _verify_ft(args.model, out)
        else:
            _verify_onnx(args.model, out)
    return 0


if __name__ == "__main__":
    from ..generate import run_command  # `... --verify | head`: no BrokenPipeError traceback

    sys.exit(run_command(main))
