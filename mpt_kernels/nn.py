"""torch.nn modules over the kernels."""
from __future__ import annotations

import math

import torch

from .ops.layernorm import layer_norm


class LPLayerNorm(torch.nn.LayerNorm):
    """Drop-in for MPT's low-precision LayerNorm (``norm_type="low_precision_layernorm"``).

    Same parameters and names as ``torch.nn.LayerNorm`` (``weight``, optional ``bias``), so MPT and
    torch checkpoints load unchanged -- but ``bias`` defaults to False, as in MPT (``no_bias=True``):
    pass ``bias=True`` for a ``torch.nn.LayerNorm`` state dict, which has one. Normalises in the input's dtype with float32 statistics.
    Like MPT's LPLayerNorm, under autocast the input, residual and parameters are cast to the
    autocast dtype first. ``forward(x, residual=r)`` returns ``(norm(x + r), x + r)`` from one pass.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, bias: bool = False, elementwise_affine: bool = True,
                 device=None, dtype=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != tuple(self.normalized_shape) or x.dim() < k:
            raise ValueError(f"x: trailing shape {tuple(x.shape)} does not end with normalized_shape "
                             f"{tuple(self.normalized_shape)}")
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x = x.to(dt)
            residual = residual.to(dt) if residual is not None else None
            weight = weight.to(dt) if weight is not None else None
            bias = bias.to(dt) if bias is not None else None
        if k > 1:  # normalise over several trailing dims: flatten them into one
            flat = math.prod(self.normalized_shape)
            shape = x.shape
            x = x.reshape(*shape[: x.dim() - k], flat)
            residual = residual.reshape(x.shape) if residual is not None else None
            weight = weight.reshape(flat) if weight is not None else None
            bias = bias.reshape(flat) if bias is not None else None
            out = layer_norm(x, weight, bias, self.eps, residual=residual)
            if residual is not None:
                return out[0].reshape(shape), out[1].reshape(shape)
            return out.reshape(shape)
        return layer_norm(x, weight, bias, self.eps, residual=residual)
