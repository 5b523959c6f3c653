"""ALiBi attention op. TEMPORARY: reference-backed until the kernel op lands (issue 3)."""
from __future__ import annotations

import torch

from . import reference
from .reference import alibi_slopes  # noqa: F401


def alibi_attention(q, k, v, *, causal=True, softmax_scale=None, alibi_slopes=None, alibi_bias_max=8.0,
                    cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    H = q.shape[-2]
    if alibi_slopes is None:
        alibi_slopes = reference.alibi_slopes(H, alibi_bias_max, device=q.device)
    if cu_seqlens_q is not None:
        return reference.attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                                    softmax_scale=softmax_scale, alibi_slopes=alibi_slopes,
                                                    compute_dtype=torch.float32)
    return reference.attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                         alibi_slopes=alibi_slopes, compute_dtype=torch.float32)
