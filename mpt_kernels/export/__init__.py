"""Export an MPT for serving: FasterTransformer's GPT checkpoint layout (any tensor-parallel size)
and ONNX graphs with a KV cache. See docs/export.md for the formats and what each runtime needs.

    from mpt_kernels.export import export_fastertransformer, load_fastertransformer, export_onnx
    export_fastertransformer(model, "ft", tensor_parallel=2, dtype="fp16")   # -> ft/2-gpu/
    export_onnx(model, "onnx")                                              # -> onnx/model.onnx
"""
from .fastertransformer import export_fastertransformer, load_fastertransformer, read_fastertransformer


def export_onnx(*args, **kwargs):
    # onnx / onnxscript are only needed by this path; import them when it is used.
    from .onnx import export_onnx as _export_onnx

    return _export_onnx(*args, **kwargs)


export_onnx.__doc__ = "See mpt_kernels.export.onnx.export_onnx."

__all__ = ["export_fastertransformer", "load_fastertransformer", "read_fastertransformer", "export_onnx"]
