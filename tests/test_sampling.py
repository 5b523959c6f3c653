"""Sampling: the top-p nucleus (``generation.top_p_drop``) against a float64 reference, ties, both CPU
paths (the top candidates and the whole row), the torch ranking the GPU uses, and transformers' warper.
"""
import numpy as np
import pytest
import torch

import mpt_kernels.model.generation as gen
from mpt_kernels.model.generation import sample_next, top_p_drop

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_drop(logits, top_p):
    """float64: rank by probability (equal ones by id, lower first); a token stays when the probability
    ranked above it is < top_p (the top one always stays). Also returns that probability per token."""
    p = torch.softmax(logits.double(), dim=-1).numpy()
    lg = logits.numpy()
    B, V = p.shape
    drop = np.ones((B, V), dtype=bool)
    above = np.empty((B, V))
    for b in range(B):
        order = np.lexsort((np.arange(V), -lg[b]))  # float32 logits: the exact ranking, ties by id
        acc = np.concatenate([[0.0], np.cumsum(p[b, order])[:-1]])
        above[b, order] = acc
        drop[b, order] = acc >= top_p
        drop[b, order[0]] = False
    drop, above = torch.from_numpy(drop), torch.from_numpy(above)
    return drop, above


def check(logits, top_p):
    got = top_p_drop(logits, top_p)
    want, above = reference_drop(logits, top_p)
    diff = got != want
    # only a token right at the boundary may land on the other side (float32 exponentials, float64
    # sums: a float32 softmax and running sum drifted by 1e-6-1e-5 over 27k tokens, dropping tens)
    assert bool(((above[diff] - top_p).abs() < 1e-8).all()), (above[diff], top_p)
    assert int(diff.sum()) <= 1, int(diff.sum())
    return got


def paths(monkeypatch):
    """Record the k of each ranking (the CPU's candidate pass, then the whole row when needed)."""
    ks = []
    ranked = gen._ranked

    def spy(keys, k):
        ks.append(k)
        return ranked(keys, k)

    monkeypatch.setattr(gen, "_ranked", spy)
    return ks


@pytest.mark.parametrize("V", [1, 2, 37, 256, 257, 300, 50432])
@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
def test_nucleus_equals_the_float64_reference(V, scale):
    logits = torch.randn(3, V) * scale
    for top_p in (0.0, 0.2, 0.5, 0.9, 0.95, 0.999):
        got = check(logits, top_p)
        assert not bool(got.all(dim=-1).any())  # a row always keeps its top token


def test_small_nucleus_takes_the_candidates_and_a_large_one_the_whole_row(monkeypatch):
    V = 5000
    sharp = torch.randn(2, V) * 8  # nucleus of a few tokens
    flat = torch.randn(2, V) * 0.1  # nucleus of ~90% of the tokens
    ks = paths(monkeypatch)
    kept = (~check(sharp, 0.9)).sum(-1)
    assert ks == [256] and bool((kept < 256).all())
    ks.clear()
    kept = (~check(flat, 0.9)).sum(-1)
    assert ks == [256, V] and bool((kept > 256).all())
    # one row of each: both rows go through the whole-row ranking, each still its own answer
    ks.clear()
    mixed = torch.stack([sharp[0], flat[0]])
    assert torch.equal(check(mixed, 0.9), torch.stack([top_p_drop(sharp[:1], 0.9)[0], top_p_drop(flat[:1], 0.9)[0]]))
    assert ks[0] == 256 and ks[-1] == V


def test_nucleus_of_exactly_the_candidates(monkeypatch):
    """A nucleus of 255/256/257 tokens: the last candidate kept or not decides whether the row is ranked
    in full."""
    V = 1000
    for n in (255, 256, 257):
        logits = torch.full((1, V), -30.0)
        logits[0, torch.randperm(V)[:n]] = torch.rand(n) * 0.01  # n near-equal tokens hold ~all the mass
        ks = paths(monkeypatch)
        kept = ~check(logits, 0.999999)
        assert int(kept.sum()) == n
        assert ks == ([256] if n < 256 else [256, V]), (n, ks)
        monkeypatch.undo()


def test_ties_rank_by_id_whichever_path(monkeypatch):
    """Equal logits (bf16 logits have many): the lower id ranks first, on the candidate path, the
    whole-row path and the torch ranking alike."""
    logits = torch.randint(0, 6, (2, 3000)).float()  # six values, ~500 tokens each
    for top_p in (0.3, 0.5, 0.8):
        a = check(logits, top_p)
        monkeypatch.setattr(gen, "TOP_P_CANDIDATES", 10**9)
        b = top_p_drop(logits, top_p)
        monkeypatch.undo()
        assert torch.equal(a, b)
    bf16 = (torch.randn(2, 50432) * 4).bfloat16().float()
    for top_p in (0.2, 0.6, 0.9):
        check(bf16, top_p)
    # within a tie group cut by top_p, the lowest ids stay
    logits = torch.zeros(1, 10)
    kept = ~top_p_drop(logits, 0.35)  # ten tokens of 0.1: above = 0, .1, .2, .3 < .35 -> ids 0-3
    assert kept[0].nonzero().flatten().tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("V", [7, 300, 50432])
def test_the_torch_ranking_equals_numpys(V):
    """The ranking other devices use (torch.topk on the int64 keys) is the CPU's (numpy's partition
    and sort), candidates and whole rows, ties, negative values, -0.0 and infinities included."""
    logits = (torch.randint(-40, 40, (3, V)).float() * 0.25)
    logits[0, :3] = torch.tensor([0.0, -0.0, float("-inf")])[: min(3, V)]
    if V > 5:
        logits[1, 4] = float("inf")
    order = sorted(range(V), key=lambda i: (-float(logits[2, i]), i))
    for k in sorted({1, min(5, V), min(256, V), V}):
        idn = gen._ranked(gen._rank_keys(logits, True), k)
        idt = gen._ranked(gen._rank_keys(logits, False), k)
        assert torch.equal(idn, idt)
        vals = logits.gather(-1, idn)
        assert bool((vals[:, 1:] <= vals[:, :-1]).all())
        ties = vals[:, 1:] == vals[:, :-1]
        assert bool((idn[:, 1:][ties] > idn[:, :-1][ties]).all())
        assert idn[2].tolist() == order[:k]


def test_infinite_logits_from_top_k_and_nan():
    logits = torch.randn(2, 500)
    logits[:, 20:] = float("-inf")  # as top-k leaves them
    for top_p in (0.5, 0.999, 1 - 1e-9):
        drop = top_p_drop(logits, top_p)
        assert bool(drop[:, 20:].all() | (top_p > 0.9999))  # zero-probability tokens never matter
        check(logits[:, :20], top_p)
        assert torch.equal(drop[:, :20], top_p_drop(logits[:, :20], top_p))
    bad = torch.randn(1, 300)
    bad[0, 5] = float("nan")
    with pytest.raises(RuntimeError):
        sample_next(bad, 1.0, top_p=0.9)


def test_top_p_sampling_draws_from_the_nucleus_only():
    logits = torch.randn(4, 2000) * 3
    drop = top_p_drop(logits / 0.8, 0.7)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        tok = sample_next(logits, 0.8, top_p=0.7, generator=g)
        assert not bool(drop.gather(-1, tok[:, None]).any())


def test_equals_transformers_top_p_warper_and_draw():
    """transformers' TopPLogitsWarper drops the same tokens (away from float ties at the boundary), and
    with the same generator the draw is the same token."""
    transformers = pytest.importorskip("transformers")
    warper = transformers.TopPLogitsWarper(0.9)
    for scale in (1.0, 4.0):
        logits = torch.randn(3, 50432) * scale
        theirs = torch.isinf(warper(None, logits.clone()))
        ours = top_p_drop(logits, 0.9)
        _, above = reference_drop(logits, 0.9)
        diff = ours != theirs
        assert bool(((above[diff] - 0.9).abs() < 1e-5).all())
        probs = torch.softmax(logits.masked_fill(theirs, float("-inf")), dim=-1)
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1)).squeeze(-1)
        got = sample_next(logits, 1.0, top_p=0.9, generator=torch.Generator().manual_seed(1))
        if not bool(diff.any()):
            assert torch.equal(got, want)


def test_a_token_exactly_at_top_p_is_dropped():
    """The boundary itself, on exactly representable probabilities (four equal tokens of 0.25): a token
    stays only when the tokens ranked above it hold less than top_p, so at top_p = 0.5 two tokens stay,
    not three. transformers' warper (drop where the ascending cumulative probability is <= 1 - top_p)
    keeps the same number."""
    logits = torch.zeros(2, 4)
    for top_p, kept in ((0.25, 1), (0.5, 2), (0.75, 3), (0.2500001, 2), (0.4999999, 2), (1.0 - 1e-9, 4)):
        drop = top_p_drop(logits, top_p)
        assert (~drop).sum(-1).tolist() == [kept, kept], top_p
        assert torch.equal(drop, reference_drop(logits, top_p)[0])
        try:
            import transformers
        except ImportError:
            continue
        theirs = torch.isinf(transformers.TopPLogitsWarper(top_p)(None, logits.clone()))
        assert (~theirs).sum(-1).tolist() == [kept, kept], top_p
