"""Swap mpt_kernels' attention and LayerNorm into a transformers MptForCausalLM instance.

    from transformers import MptForCausalLM
    import mpt_kernels as mk
    hf = MptForCausalLM.from_pretrained(path)
    mk.model.apply_to_hf(hf)          # same weights, same logits, generate() keeps working

The Liger-Kernel convention: the instance's modules keep their parameters; only their ``forward`` is
replaced. Attention then runs the ALiBi flash kernel on views of the Wqkv output and of transformers'
own KV cache (no dense (S, S) bias or score matrix), which also lifts transformers' max_seq_len limit.
Padding comes in as transformers' 4-D boolean mask; its last query row tells which keys are real
(left padding), and padded rows are attended one by one over their real keys. Pad positions get
transformers' own outputs too (a query that sees no key: the plain mean of every value; a query
after right padding: attention over the real keys), so logits and a padded batch's loss match at
every position.
"""
from __future__ import annotations

import threading
import types
import weakref

import torch

import mpt_kernels as mk


def _layer_norm_forward(self, x):
    return mk.layer_norm(x, self.weight, self.bias, self.eps)


_LAST_MASK = mk._ext.LastResult()  # the last attention mask read back, and its rows


def _compute_mask_rows(attention_mask, Sk):
    valid = ~attention_mask[:, 0, -1, :].to(torch.bool)  # (B, Sk): keys the last query may see
    pos = torch.arange(Sk, device=valid.device)
    starts = torch.where(valid, pos, Sk).amin(1)
    counts = valid.sum(1)
    # a row whose real keys are not one block (a hole) gets count -1: refused below
    ends = torch.where(valid, pos, -1).amax(1)
    counts = torch.where((counts == 0) | (ends - starts + 1 == counts), counts, -1)
    vals = torch.cat([valid.all().view(1).long(), starts.long(), counts.long()]).tolist()  # one read-back
    B = valid.shape[0]
    return None if vals[0] else (vals[1:1 + B], vals[1 + B:])


# Within one forward of a patched MptModel (hooks that apply_to_hf adds): an inference-mode mask, which
# has no version counter for _LAST_MASK to check, is remembered by identity until that forward ends.
_FORWARD = threading.local()


def _forward_begins(module, args, kwargs=None):
    _FORWARD.inside = True
    _FORWARD.last = None


def _forward_ends(module, args, output):
    _FORWARD.inside = False
    _FORWARD.last = None


def _mask_rows(attention_mask, Sk):
    """None when every key is real, else the (start, count) of each row's real keys. transformers
    hands every layer of a forward the same mask tensor: it is read back to the host once for all of
    them (one GPU sync per forward, not one or two per layer); a new or modified mask is read anew.
    Under torch.inference_mode (transformers' pipelines) the mask keeps no version counter: there it
    is remembered only within the running model forward (a mask is not changed between layers)."""
    if attention_mask.is_inference():
        if not getattr(_FORWARD, "inside", False):
            return _compute_mask_rows(attention_mask, Sk)
        last = _FORWARD.last
        if last is not None and last[0]() is attention_mask and last[1] == Sk:
            return last[2]
        rows = _compute_mask_rows(attention_mask, Sk)
        _FORWARD.last = (weakref.ref(attention_mask), Sk, rows)
        return rows
    return _LAST_MASK((attention_mask,), Sk, lambda: _compute_mask_rows(attention_mask, Sk))


def _is_static(cache) -> bool:
    """Whether transformers' ``cache`` is preallocated (StaticCache, or a Cache of static layers)."""
    layers = getattr(cache, "layers", None) or []
    return "Static" in type(cache).__name__ or any("Static" in type(layer).__name__ for layer in layers)


def _unattended(v, n):
    """transformers' output for ``n`` query rows whose every key is masked (left-padding positions,
    rows of padding only): the mask sets all their scores to the dtype's minimum, so the float32
    softmax weighs every key alike, 1 / Sk rounded to v's dtype. v (1, Sk, H, D) -> (1, n, H, D)."""
    Sk = v.shape[1]
    w = torch.full((Sk,), 1.0 / Sk, dtype=torch.float32, device=v.device).to(v.dtype)
    return torch.einsum("j,bjhd->bhd", w, v).unsqueeze(1).expand(-1, n, -1, -1)


def _attention_forward(self, hidden_states, position_bias=None, cache=None, attention_mask=None, **kwargs):
    if self.training and getattr(self, "attn_dropout_p", 0):
        raise ValueError(f"apply_to_hf: attn_pdrop={self.attn_dropout_p} in training mode: the flash kernel has no "
                         "attention dropout (in eval mode, where dropout is off, the patched attention runs)")
    if cache is None:  # transformers before the rename (e.g. 5.17) passes the layer cache as past_key_values
        cache = kwargs.pop("past_key_values", None)
    B, S, _ = hidden_states.shape
    H, D = self.n_heads, self.head_dim
    qkv = self.Wqkv(hidden_states)  # (B, S, 3 * H * D)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = qkv.chunk(3, dim=2)
    q = q.unflatten(-1, (H, D))  # (B, S, H, D) view
    if cache is not None:
        # transformers' cache layout is (B, H, S, D); hand it that, read back transposed views.
        k, v = cache.update(k.unflatten(-1, (H, D)).transpose(1, 2), v.unflatten(-1, (H, D)).transpose(1, 2),
                            self.layer_idx)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Sk, H, D), last dim contiguous
    else:
        k, v = k.unflatten(-1, (H, D)), v.unflatten(-1, (H, D))
    Sk = k.shape[1]
    slopes = self._mk_slopes.get(q.device)
    if slopes is None:
        slopes = self._mk_slopes[q.device] = mk.alibi_slopes(H, 8.0).to(q.device)  # transformers fixes 8
    kw = dict(causal=True, softmax_scale=self.softmax_scale, alibi_slopes=slopes)

    rows = _mask_rows(attention_mask, Sk) if attention_mask is not None else None
    if rows is None:
        out = mk.alibi_attention(q, k, v, **kw)  # (B, S, H, D)
    else:
        out = q.new_empty(B, S, H, D)
        starts, counts = rows
        for b, (start, count) in enumerate(zip(starts, counts)):
            if count == 0:  # no real token in the row: every query sees no key
                out[b:b + 1] = _unattended(v[b:b + 1], S)
            elif count > 0 and start + count == Sk:  # left padding (or none in this row)
                q_start = max(0, start - (Sk - S))
                out[b:b + 1, q_start:] = mk.alibi_attention(q[b:b + 1, q_start:], k[b:b + 1, start:],
                                                             v[b:b + 1, start:], **kw)
                if q_start:  # queries at pad positions see no key
                    out[b:b + 1, :q_start] = _unattended(v[b:b + 1], q_start)
            elif count > 0 and start == 0 and S == Sk:  # right padding, no cached past: the real tokens are a prefix
                out[b:b + 1, :count] = mk.alibi_attention(q[b:b + 1, :count], k[b:b + 1, :count],
                                                           v[b:b + 1, :count], **kw)
                if count < S:  # pad queries see every real key (all before them): MPT's key-position bias
                    out[b:b + 1, count:] = mk.alibi_attention(q[b:b + 1, count:], k[b:b + 1, :count],
                                                               v[b:b + 1, :count], **{**kw, "causal": False})
            elif cache is not None and _is_static(cache):
                raise ValueError("apply_to_hf: a static KV cache (cache_implementation=\"static\") is not supported "
                                 "by the patched attention: its unused positions look like right padding, which it "
                                 "cannot tell apart; use the default dynamic cache")
            else:
                raise ValueError("apply_to_hf: the attention mask must hold each row's real tokens in one block, "
                                 "padded on the left (or on the right without a KV cache)")
    attn_output = self.out_proj(out.reshape(B, S, H * D))
    return attn_output, None


def apply_to_hf(model, attention: bool = True, layer_norm: bool = True):
    """Patch every MptAttention and MPT LayerNorm module of ``model`` (a transformers MptForCausalLM or
    MptModel) in place; returns ``model``. Attention dropout is not supported by the kernel: a model
    with attn_pdrop > 0 in training mode raises."""
    from transformers.models.mpt import modeling_mpt

    if not isinstance(getattr(model, "config", None), modeling_mpt.MptConfig):
        raise ValueError(f"apply_to_hf: expected a transformers MPT model (MptForCausalLM, MptModel), got "
                         f"{type(model).__name__}")
    n = 0
    for module in model.modules():
        if attention and isinstance(module, modeling_mpt.MptAttention):
            module._mk_slopes = {}
            module.forward = types.MethodType(_attention_forward, module)
            n += 1
        elif layer_norm and isinstance(module, torch.nn.LayerNorm):
            module.forward = types.MethodType(_layer_norm_forward, module)
            n += 1
    if n == 0:
        raise ValueError("apply_to_hf: no MPT attention or LayerNorm module found in the model")
    if attention:
        for module in model.modules():  # (_mask_rows: one mask read-back per forward under inference_mode)
            if isinstance(module, modeling_mpt.MptModel) and not getattr(module, "_mk_forward_hooks", False):
                module.register_forward_pre_hook(_forward_begins)
                module.register_forward_hook(_forward_ends, always_call=True)
                module._mk_forward_hooks = True
    model._mpt_kernels_patched = True
    return model
