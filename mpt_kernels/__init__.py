"""mpt_kernels: fast kernels and a thin model for training and serving MPT-style language models.

    import mpt_kernels as mk
    out = mk.alibi_attention(q, k, v)                 # ALiBi flash attention, O(seqlen) memory
    y = mk.layer_norm(x, weight)                      # low-precision LayerNorm, float32 statistics
    opt = mk.optim.Lion(model.parameters(), lr=1e-4)  # fused multi-tensor Lion
"""
from ._ext import (build_info, cuda_available, empty_host_cache, host_cache_info, set_flush_denormal,
                   set_host_cache_limit)
from .ops.attention import alibi_attention, alibi_attention_qkvpacked, alibi_slopes
from .ops.layernorm import layer_norm
from . import nn, optim

__version__ = build_info()["version"]

# Heavier subpackages load on first use (mk.model.apply_to_hf, mk.export.export_onnx, ...), so a
# plain `import mpt_kernels` stays light.
_LAZY_SUBPACKAGES = ("model", "export", "data", "train")


def __getattr__(name):
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mpt_kernels' has no attribute {name!r}")

__all__ = [
    "alibi_attention",
    "alibi_attention_qkvpacked",
    "alibi_slopes",
    "layer_norm",
    "nn",
    "optim",
    "build_info",
    "cuda_available",
    "host_cache_info",
    "set_flush_denormal",
    "empty_host_cache",
    "set_host_cache_limit",
    *_LAZY_SUBPACKAGES,
]
