"""Export an MPT for serving: FasterTransformer's GPT checkpoint layout (any tensor-parallel size)
and ONNX graphs with a KV cache. See docs/export.md for the formats and what each runtime needs.

    from mpt_kernels.export import export_fastertransformer, load_fastertransformer, export_onnx
    export_fastertransformer(model, "ft", tensor_parallel=2, dtype="fp16")   # -> ft/2-gpu/
    export_onnx(model, "onnx")                                              # -> onnx/model.onnx
"""
from .fastertransformer import export_fastertransformer, load_fastertransformer, read_fastertransformer
from .onnx import export_onnx  # (imports onnx / onnxscript only when called)

__all__ = ["export_fastertransformer", "load_fastertransformer", "read_fastertransformer", "export_onnx"]
