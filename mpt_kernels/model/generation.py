"""Autoregressive generation with a preallocated KV cache.

One prefill call over the whole prompt (padded rows go through the varlen path), then one decode step
per token: seqlen_q = 1 against the cache, written in place in the layout the attention kernel reads.
Nothing caps the length at ``max_seq_len``: ALiBi extrapolates, as MPT-7B-StoryWriter does.
"""
from __future__ import annotations

import numpy as np
import torch


# A nucleus is usually a few to a few hundred tokens: on the CPU the top TOP_P_CANDIDATES tokens are
# ranked first (numpy's partition, ~0.06 ms at 50k tokens), and the whole row only when its nucleus
# reaches past them (numpy's vectorised sort, ~0.5 ms; torch.sort takes ~3-5 ms here).
TOP_P_CANDIDATES = 256


def _rank_keys(logits: torch.Tensor, use_numpy: bool):
    """One int64 key per token of float32 ``logits`` (B, V) that ranks value and id at once (``_ranked``),
    and the id's bit count: a float's bit pattern, its low 31 bits flipped when negative, orders as the
    float does; the id sits in the low ``shift`` bits. All keys differ."""
    V = logits.shape[-1]
    shift = max(V - 1, 1).bit_length()  # <= 31: the key stays below 2**63
    if use_numpy:  # (the CPU: numpy's integer ops and vectorised sort are several times torch's here)
        b = (logits + 0.0).numpy().view(np.int32)  # (+ 0.0: -0.0 becomes 0.0, its equal)
        b = b ^ ((b >> 31) & 0x7FFFFFFF)  # now ordered as the floats
        # ascending: value down, then id up
        return ((0x7FFFFFFF - b.astype(np.int64)) << shift) | np.arange(V, dtype=np.int64), shift
    b = (logits + 0.0).view(torch.int32)
    b = b ^ ((b >> 31) & 0x7FFFFFFF)
    return ((0x7FFFFFFF - b.to(torch.int64)) << shift) | torch.arange(V, device=logits.device), shift


def _ranked(keys, k: int) -> torch.Tensor:
    """Ids (B, k) of each row's ``k`` largest logits, largest first, equal ones by id (lower first), from
    ``_rank_keys``'s answer. All keys differ, so the order is the same on every device and for every ``k``."""
    key, shift = keys
    if isinstance(key, np.ndarray):
        if k < key.shape[-1]:
            key = np.partition(key, k - 1, axis=-1)[:, :k]
        return torch.from_numpy(np.sort(key, axis=-1) & ((1 << shift) - 1))
    return torch.topk(key, k, dim=-1, largest=False).values & ((1 << shift) - 1)


def top_p_drop(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) bool: the tokens nucleus (top-p) sampling drops from logits (B, V). Ranked by probability
    (equal ones by id, lower first), a token stays when the tokens ranked above it hold less than
    ``top_p`` of the probability, so the top one always stays (``top_p = 0`` is greedy). The rule of
    transformers' TopPLogitsWarper ("drop when the ascending cumulative probability is <= 1 - top_p"),
    up to float rounding at the boundary and the order of ties, which its unstable sort leaves open.
    The probabilities are float32 exponentials over a float64 normaliser, summed in float64: a float32
    softmax and running sum drift by ~1e-6-1e-5 over tens of thousands of tokens (at top_p 0.999 that
    dropped 18 tokens the exact rule keeps)."""
    logits = logits.detach().float()
    e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))  # (+-inf or nan in a row: nan, below)
    z = e.sum(dim=-1, keepdim=True, dtype=torch.float64)
    V = logits.shape[-1]
    cpu = logits.device.type == "cpu"
    k = min(TOP_P_CANDIDATES, V) if cpu else V
    keys = _rank_keys(logits, cpu)  # (built once: the whole row's ranking, if needed, reuses them)
    while True:
        ids = _ranked(keys, k)
        vals = e.gather(-1, ids).double() / z
        # the probability ranked above each token: an exclusive cumulative sum, nondecreasing, so the
        # tokens kept are a prefix of the ranking
        above = torch.zeros_like(vals)
        above[:, 1:] = vals.cumsum(dim=-1)[:, :-1]
        drop = above >= top_p  # (nan, from nan logits: nothing dropped, and the draw raises)
        drop[:, 0] = False
        # done when every row drops one of its top k (the prefix ends there), or they are all its tokens
        if k == V or bool(drop[:, -1].all()):
            return torch.ones_like(logits, dtype=torch.bool).scatter_(-1, ids, drop)
        k = V


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab). ``temperature <= 0`` is greedy (argmax).
    Otherwise transformers' order: temperature, then top-k, then top-p (``top_p_drop``), then one
    multinomial draw over the whole vocabulary (so the same seed draws the same tokens as its sampling)."""
    if temperature is None or temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = logits.masked_fill(top_p_drop(logits, top_p), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling_args(temperature, top_k, top_p) -> None:
    """``generate``'s checks of its sampling settings (also run by the CLI before it prints anything):
    ValueError naming the argument."""
    import math
    import numbers

    if temperature is not None and not (isinstance(temperature, numbers.Real) and not math.isnan(temperature)):
        raise ValueError(f"temperature: must be a number (<= 0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
        raise ValueError(f"top_k: must be None or an integer >= 0 (0: off), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0.0 <= top_p <= 1.0):
        raise ValueError(f"top_p: must be None or a number in [0, 1], got {top_p!r}")


def _explain_sampling_error(logits: torch.Tensor, temperature, exc: Exception) -> None:
    """Raise a ValueError naming ``temperature`` when the draw failed because finite logits divided by
    a tiny temperature overflowed float32 (e.g. 1e-40); anything else keeps torch's own error."""
    lg = logits.float()
    if (temperature and temperature > 0 and bool(torch.isfinite(lg).all())
            and not bool(torch.isfinite(lg / temperature).all())):
        raise ValueError(f"temperature: {temperature!r} is too small: the logits divided by it overflow float32 "
                         "(use temperature=0 for greedy decoding, which is its limit)") from exc


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature=1.0, top_k=None, top_p=None,
             eos_token_id=None, attention_mask=None, streamer=None, pad_token_id=None, generator=None,
             past_key_values=None):
    """Returns (B, prompt_len + n_generated) token ids (n_generated <= max_new_tokens; fewer when every
    row has produced an EOS). Rows that finished early are filled with ``pad_token_id`` (default: the
    first EOS id) and, as in transformers, fed it on the next step: it and the EOS ids must be in
    ``[0, vocab_size)`` (ValueError up front otherwise). A positive ``temperature`` so small that the
    logits divided by it overflow float32 (1e-40) raises ValueError naming it (0 is greedy).
    ``streamer`` follows transformers' protocol: ``put(ids)`` with the prompt, then with each new (B,)
    token tensor, and ``end()``.

    ``past_key_values``: a ``KVCache`` (``model.new_cache(B)``) to continue from and extend in place.
    It holds the keys and values of the first ``len(cache)`` positions of ``input_ids`` (from an earlier
    ``generate`` or forward with it): only the positions after them are prefilled. After the call it
    holds every position of the returned ids but the last (all of them when nothing was generated), so
    a chat can pass the returned ids plus its next turn, with the same cache. Rows that finished early
    hold their padding tokens, as in the returned ids. ``attention_mask`` then covers all of
    ``input_ids`` (its padding must match the cache's; the new positions are real tokens)."""
    import numbers

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be an integer >= 0, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    check_sampling_args(temperature, top_k, top_p)
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids: expected int64 or int32 ids, got {input_ids.dtype} (convert with .long())")
    if input_ids.dim() not in (1, 2) or input_ids.numel() == 0:
        raise ValueError(f"input_ids: expected a non-empty (batch, length) or (length,) integer tensor, got "
                         f"{tuple(input_ids.shape)} {input_ids.dtype}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            attention_mask = torch.as_tensor(attention_mask)
        if input_ids.dim() == 1 and attention_mask.dim() == 1:  # (length,) prompt, (length,) mask
            attention_mask = attention_mask[None]
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    model._check_ids(input_ids)
    input_ids = input_ids.to(model.device)
    B, L = input_ids.shape
    if eos_token_id is None:
        eos = []
    elif isinstance(eos_token_id, torch.Tensor):
        eos = [int(e) for e in eos_token_id.reshape(-1).tolist()]
    elif isinstance(eos_token_id, numbers.Integral):  # int, numpy integers
        eos = [int(eos_token_id)]
    else:
        eos = [int(e) for e in eos_token_id]
    # A finished row is fed its pad token on the next step, as transformers does (so the cache holds
    # it): a pad (or EOS, the default pad) outside the vocabulary would fail in the embedding midway.
    vocab = int(model.config.vocab_size)
    bad = [e for e in eos if not 0 <= e < vocab]
    if bad:
        raise ValueError(f"eos_token_id: ids must be in [0, {vocab}) (the model's vocab_size), got {bad[0]}")
    if pad_token_id is not None:
        if isinstance(pad_token_id, torch.Tensor) and pad_token_id.numel() == 1:
            pad_token_id = pad_token_id.item()
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral) or \
                not 0 <= pad_token_id < vocab:
            raise ValueError(f"pad_token_id: must be None or an id in [0, {vocab}) (the model's vocab_size; a "
                             f"finished row is fed its pad token, as in transformers), got {pad_token_id!r}")
        pad_token_id = int(pad_token_id)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    eos_t = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype)

    past = 0
    if past_key_values is not None:
        from .modeling import KVCache

        cache = past_key_values
        if not isinstance(cache, KVCache):
            raise ValueError(f"past_key_values: expected a KVCache (model.new_cache(batch_size)), got "
                             f"{type(cache).__name__}")
        c = model.config
        if (cache.n_layers, cache.kv_heads, cache.head_dim) != (c.n_layers, c.kv_n_heads, c.head_dim):
            raise ValueError(f"past_key_values: a cache of {cache.n_layers} layers x {cache.kv_heads} heads x "
                             f"{cache.head_dim} does not fit this model ({c.n_layers} x {c.kv_n_heads} x {c.head_dim})")
        if cache.batch_size != B:
            raise ValueError(f"past_key_values: the cache holds {cache.batch_size} rows, input_ids {B}")
        cd, md = cache.device, input_ids.device
        if cd.type != md.type or (cd.index is not None and md.index is not None and cd.index != md.index):
            raise ValueError(f"past_key_values: the cache is on {cache.device}, the model on {input_ids.device}")
        past = len(cache)
        if past >= L:
            raise ValueError(f"past_key_values: the cache already holds {past} positions; input_ids ({L}) must "
                             "extend them by at least one token (the ids it was filled with, then new ones)")
        cache.reserve(L + max_new_tokens)
    else:
        cache = model.new_cache(B, capacity=L + max_new_tokens)

    was_training = model.training
    model.eval()
    try:
        if streamer is not None:
            streamer.put(input_ids.cpu())
        # prefill (the positions the cache does not hold yet), last logits only
        out = model._forward(input_ids[:, past:], attention_mask, None, None, cache, True, 1)
        tokens = [input_ids]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            try:
                nxt = sample_next(out.logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
            except RuntimeError as exc:  # torch's "probability tensor contains either inf, nan ..."
                _explain_sampling_error(out.logits[:, -1], temperature, exc)
                raise
            if eos:
                nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
                finished |= torch.isin(nxt, eos_t)
            tokens.append(nxt[:, None])
            if streamer is not None:
                streamer.put(nxt.cpu())
            if step + 1 == max_new_tokens or (eos and bool(finished.all())):
                break
            out = model._forward(nxt[:, None], None, None, None, cache, True, 1)  # decode: one token per row
        if streamer is not None:
            streamer.end()
    finally:
        model.train(was_training)
    return torch.cat(tokens, dim=1)
