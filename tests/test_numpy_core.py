"""The compiled core needs no torch: drive the CPU LayerNorm forward and backward (and the fused
cross-entropy) from numpy arrays alone through mpt_kernels._C and mpt_kernels._ext.numpy_view,
against a float64 numpy reference.

The same checks run twice: in this process, and in a subprocess where importing torch fails and
the package's __init__ (which imports the torch ops) is bypassed, so only _C and _ext load.
Outputs, statistics, gradients and the workspace are NaN-filled before each call.
Tolerances as in test_layernorm.py: one ulp of the output dtype (float32 1e-5, bfloat16 2^-7)
relative, plus 1e-5 (outputs) or 1e-4 (gradients) of the largest expected magnitude.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np



def to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def from_bf16_bits(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def check_close(actual, expected, rtol, atol_frac, what):
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, what
    if e.size == 0:
        return
    bound = rtol * np.abs(e) + atol_frac * np.abs(e).max() + 1e-300
    ok = np.abs(a - e) <= bound  # False for NaN
    assert ok.all(), f"{what}: {int((~ok).sum())}/{a.size} out of tolerance, max err {np.nanmax(np.abs(a - e))}"


def run_numpy_layernorm_checks(_C, _ext):
    rng = np.random.default_rng(1234)
    for dtype in ("float32", "bfloat16"):
        code = _ext.FLOAT32 if dtype == "float32" else _ext.BFLOAT16
        rtol = 1e-5 if dtype == "float32" else 2.0 ** -7

        def enc(a):  # float64 values -> (storage array, exact float64 values it holds)
            if dtype == "float32":
                s = a.astype(np.float32)
                return s, s.astype(np.float64)
            s = to_bf16_bits(a)
            return s, from_bf16_bits(s).astype(np.float64)

        def dec(s):
            return s.astype(np.float64) if dtype == "float32" else from_bf16_bits(s).astype(np.float64)

        def empty(shape):
            if dtype == "float32":
                return np.full(shape, np.nan, np.float32)
            return np.full(shape, 0x7FC0, np.uint16)  # bfloat16 NaN

        def v(a, name):
            return _ext.numpy_view(a, name, None if a.dtype == np.float32 else code)

        for rows, hidden in [(0, 16), (3, 1), (37, 768), (5, 1023)]:
            x, xd = enc(rng.standard_normal((rows, hidden)) * 2 + 0.5)
            r, rd = enc(rng.standard_normal((rows, hidden)))
            w, wd = enc(rng.standard_normal(hidden) * 0.5 + 1)
            b, bd = enc(rng.standard_normal(hidden))
            y, hsum = empty((rows, hidden)), empty((rows, hidden))
            mean, rstd = np.full(rows, np.nan, np.float32), np.full(rows, np.nan, np.float32)
            _C.layer_norm_fwd(v(x, "x"), v(w, "weight"), v(b, "bias"), v(r, "residual"), v(y, "y"),
                              v(hsum, "residual_out"), _ext.numpy_view(mean), _ext.numpy_view(rstd), 1e-5, 0)
            h_exp, _ = enc(xd + rd)  # the sum rounded to dtype, as the kernel returns it
            assert np.array_equal(hsum, h_exp), f"{dtype} {rows}x{hidden}: residual sum"
            hd = dec(h_exp)
            mu = hd.mean(-1, keepdims=True)
            rs = 1 / np.sqrt(((hd - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
            xhat = (hd - mu) * rs
            check_close(dec(y), xhat * wd + bd, rtol, 1e-5, f"{dtype} {rows}x{hidden}: y")
            check_close(mean, mu[:, 0], 1e-6, 1e-6, f"{dtype} {rows}x{hidden}: mean")
            check_close(rstd, rs[:, 0], 1e-5, 0, f"{dtype} {rows}x{hidden}: rstd")

            dy, dyd = enc(rng.standard_normal((rows, hidden)))
            dres, dresd = enc(rng.standard_normal((rows, hidden)))
            dh, dw, db = empty((rows, hidden)), empty(hidden), empty(hidden)
            n = _C.layer_norm_bwd_workspace_numel(rows, hidden, code, code, True, -1)
            ws = np.full(n, np.nan, np.float32)
            _C.layer_norm_bwd(v(dy, "dy"), v(dres, "dresidual_out"), v(hsum, "h"), v(w, "weight"),
                              _ext.numpy_view(mean), _ext.numpy_view(rstd), v(dh, "dh"), v(dw, "dweight"),
                              v(db, "dbias"), _ext.numpy_view(ws), 0)
            # d/dh of (h - mu) * rs * w + b, float64, with the saved float32 statistics' exact values.
            g = dyd * wd
            dx_exp = rs * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True)) + dresd
            check_close(dec(dh), dx_exp, rtol, 1e-4, f"{dtype} {rows}x{hidden}: dx")
            check_close(dec(dw), (dyd * xhat).sum(0), rtol, 1e-4, f"{dtype} {rows}x{hidden}: dweight")
            check_close(dec(db), dyd.sum(0), rtol, 1e-4, f"{dtype} {rows}x{hidden}: dbias")


def run_numpy_cross_entropy_checks(_C, _ext):
    """The fused cross-entropy core from numpy: float32 and bfloat16 logits, an ignored row, a vocab
    with no 16-byte packs; per-row loss and logsumexp, then the gradient, against float64."""
    rng = np.random.default_rng(7)
    for dtype in ("float32", "bfloat16"):
        for rows, vocab in [(0, 10), (4, 7), (9, 1000), (3, 4097)]:
            x = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
            if dtype == "bfloat16":
                xs = to_bf16_bits(x)
                xd = from_bf16_bits(xs).astype(np.float64)
                lv = _ext.numpy_view(xs, "logits", _ext.BFLOAT16)
            else:
                xs, xd = x, x.astype(np.float64)
                lv = _ext.numpy_view(xs, "logits")
            t = rng.integers(0, vocab, rows).astype(np.int64)
            if rows > 1:
                t[1] = -100
            loss, lse = np.full(rows, np.nan, np.float32), np.full(rows, np.nan, np.float32)
            _C.cross_entropy_fwd(lv, _ext.numpy_view(t, "targets"), _ext.numpy_view(loss, "loss"),
                                 _ext.numpy_view(lse, "lse"), -100, 0)
            m = xd.max(1, keepdims=True) if rows else np.zeros((0, 1))
            lse_exp = (m + np.log(np.exp(xd - m).sum(1, keepdims=True)))[:, 0]
            valid = t != -100
            loss_exp = np.where(valid, lse_exp - xd[np.arange(rows), np.where(valid, t, 0)], 0.0)
            check_close(loss, loss_exp, 1e-5, 1e-6, f"{dtype} {rows}x{vocab}: loss")
            check_close(lse[valid], lse_exp[valid], 1e-5, 0, f"{dtype} {rows}x{vocab}: lse")
            drow = np.full(rows, 0.25, np.float32)
            d = np.full((rows, vocab), np.nan, np.float32) if dtype == "float32" else np.full((rows, vocab), 0x7FC0, np.uint16)
            dv = _ext.numpy_view(d, "dlogits", None if dtype == "float32" else _ext.BFLOAT16)
            _C.cross_entropy_bwd(lv, _ext.numpy_view(t, "targets"), _ext.numpy_view(lse, "lse"),
                                 _ext.numpy_view(drow, "drow"), dv, -100, 0)
            p = np.exp(xd - lse_exp[:, None]) if rows else np.zeros((0, vocab))
            p[np.arange(rows), np.where(valid, t, 0)] -= valid
            g_exp = np.where(valid[:, None], p * 0.25, 0.0)
            got = d.astype(np.float64) if dtype == "float32" else from_bf16_bits(d).astype(np.float64)
            rtol = 1e-5 if dtype == "float32" else 2.0 ** -8
            check_close(got, g_exp, rtol, 1e-5, f"{dtype} {rows}x{vocab}: dlogits")


def test_numpy_layernorm_in_process():
    from mpt_kernels import _ext
    from mpt_kernels._ext import _C

    run_numpy_layernorm_checks(_C, _ext)
    run_numpy_cross_entropy_checks(_C, _ext)


def test_numpy_layernorm_without_torch(tmp_path):
    # The package directory this test run imports (the checkout for an in-place build, site-packages
    # for an installed one), never the unbuilt source tree; the child runs from a neutral cwd.
    import mpt_kernels

    PKG_DIR = os.path.dirname(os.path.abspath(mpt_kernels.__file__))
    script = textwrap.dedent(f"""
        import importlib, sys, types
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        pkg = types.ModuleType("mpt_kernels")  # the package without its __init__ (torch ops)
        pkg.__path__ = [{PKG_DIR!r}]
        sys.modules["mpt_kernels"] = pkg
        _ext = importlib.import_module("mpt_kernels._ext")
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_numpy_core import run_numpy_cross_entropy_checks, run_numpy_layernorm_checks
        run_numpy_layernorm_checks(_ext._C, _ext)
        run_numpy_cross_entropy_checks(_ext._C, _ext)
        assert sys.modules["torch"] is None
        print("numpy-only LayerNorm OK")
    """)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "numpy-only LayerNorm OK" in out.stdout


def test_bad_pointers_and_shapes_raise_instead_of_crashing():
    """The framework-free path takes raw (pointer, dtype, shape, strides, device) tuples: a null pointer
    for a non-empty tensor, a negative size or a shape whose product overflows is a ValueError for
    every op, never a dereference (these used to segfault or abort with a double free)."""
    import numpy as np
    import pytest

    from mpt_kernels import _ext
    from mpt_kernels._ext import _C

    x, y, w = (np.ones(s, np.float32) for s in ((4, 8), (4, 8), (8,)))

    def ln(xv, yv):
        _C.layer_norm_fwd(xv, _ext.numpy_view(w), None, None, yv, None, None, None, 1e-5, 0)

    null = (0,) + tuple(_ext.numpy_view(x))[1:]
    with pytest.raises(ValueError, match="null data pointer"):
        ln(null, _ext.numpy_view(y))
    with pytest.raises(ValueError, match="null data pointer"):
        _C.sum_squares([null], _ext.numpy_view(np.zeros(4096, np.float32)), 0)
    v = list(_ext.numpy_view(x))
    with pytest.raises(ValueError, match="negative size"):
        ln(tuple(v[:2] + [(-4, 8)] + v[3:]), _ext.numpy_view(y))
    with pytest.raises(ValueError, match="too many elements"):
        ln(tuple(v[:2] + [(2**32, 2**31 + 1, 8)] + [(8 * (2**31 + 1), 8, 1)] + v[4:]), _ext.numpy_view(y))
    with pytest.raises(ValueError, match="too many elements"):
        _C.host_empty([2**62 + 1, 4], 0)
    empty = np.ones((0, 8), np.float32)
    ln((0,) + tuple(_ext.numpy_view(empty))[1:], (0,) + tuple(_ext.numpy_view(empty))[1:])  # empty: null is fine
