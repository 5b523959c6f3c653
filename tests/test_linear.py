"""Few-row linear (mpt_kernels.ops.linear.few_rows_linear, the CPU decode-step product) against a
float64 reference, and its use by the model's Linear layers.

The output is NaN-filled before every call (autouse fixture), so an element the kernel forgets to
write fails. Every test runs on both CPU paths (512-bit where the CPU has AVX-512, and 256-bit).
Tolerance: each output is a float32 dot product over K terms (summed in 8 or 16 lanes, then
across them) plus the bias, rounded once to the dtype: bound = (|x| . |w| + |b|) * (K + 1) * 2^-24
(float32 sums) + |y| * one rounding of the dtype (float32 2^-24, bfloat16 2^-8, float16 2^-11) +
2^-25 (float16's subnormal spacing), checked per element.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import mpt_kernels as mk
from mpt_kernels.model import modeling
from mpt_kernels.ops import linear as lin
from mpt_kernels.ops.linear import few_rows_linear

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROUND = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
needs_avx2 = pytest.mark.skipif(not lin._AVX2, reason="the model uses the kernel only in AVX2 builds")


@pytest.fixture(autouse=True, params=["avx512", "avx2"])
def cpu_path(request):
    """Every test on both of the kernel's paths: the 512-bit one (where the CPU has AVX-512, chosen at
    run time) and the 256-bit one. They round differently (16 lanes vs 8); each meets the bound."""
    from mpt_kernels._ext import _C

    if request.param == "avx512" and not _C._set_cpu_avx512(True) and not _C._cpu_avx512():
        pytest.skip("this CPU has no AVX-512: the 256-bit path is the only one")
    _C._set_cpu_avx512(request.param == "avx512")
    yield request.param
    _C._set_cpu_avx512(True)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(lin, "_alloc",
                        lambda shape, dtype, device: torch.full(tuple(shape), float("nan"), dtype=dtype, device=device))


def assert_linear_close(y, x, w, b=None):
    x64, w64 = x.double(), w.double()
    ref = F.linear(x64, w64, None if b is None else b.double())
    assert y.dtype == x.dtype and y.shape == ref.shape
    mag = F.linear(x64.abs(), w64.abs(), None if b is None else b.double().abs())  # |x| . |w| + |b|
    K = x.shape[-1]
    # float32 sums (K products and the bias), one rounding to the dtype, and float16's subnormal spacing
    bound = mag * (K + 1) * 2.0 ** -24 + ref.abs() * ROUND[x.dtype] + 2.0 ** -25
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all(), "unwritten (NaN) outputs"
    assert (err <= bound).all(), f"max err / bound {(err / bound).max().item():.3g}"


def rand(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("K", [1, 7, 8, 15, 16, 17, 31, 32, 33, 48, 120, 200, 768])
def test_matches_float64_reference(dtype, M, K):
    """Every row count (each has its own register tile), K around the 8-, 16- and 32-element vector steps
    (bfloat16 reads 16 weights per load, 32 on the 512-bit path), N around the 2- and 4-row blocks
    and the threads' 8-row split."""
    torch.manual_seed(1000 * M + K)
    for N in (1, 3, 5, 13, 130):
        x, w, b = rand(M, K, dtype=dtype), rand(N, K, dtype=dtype), rand(N, dtype=dtype)
        assert_linear_close(few_rows_linear(x, w, b), x, w, b)
        assert_linear_close(few_rows_linear(x, w), x, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_feature_counts_across_threads(dtype):
    """MPT-125M's LM head and down_proj shapes: many threads' ranges, long rows."""
    torch.manual_seed(3)
    for M, N, K in ((1, 50432, 768), (4, 768, 3072), (8, 2304, 768)):
        x, w = rand(M, K, dtype=dtype), rand(N, K, dtype=dtype) * 0.05
        assert_linear_close(few_rows_linear(x, w), x, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [5, 6, 8])
def test_long_rows_walked_in_chunks(dtype, M):
    """5-8 rows over a long K, where the 512-bit path walks K in chunks of 512 over up to 8 blocks of W
    rows at a time once x passes 40 KiB (K = 2065 and 4096 here; 1057 stays below for 5-8 rows): K
    past several chunks with a partial last one and a tail below the vector step, N leaving a partial
    group of blocks and a last row. Each output feature must be bitwise what it is alone (a one-row
    slice of W takes the unchunked block of one row)."""
    torch.manual_seed(100 + M)
    for K, N in ((1057, 203), (2065, 37), (4096, 17)):
        x, w, b = rand(M, K, dtype=dtype), rand(N, K, dtype=dtype) * 0.05, rand(N, dtype=dtype)
        y = few_rows_linear(x, w, b)
        assert_linear_close(y, x, w, b)
        for a in (0, 1, N // 2, N - 1):
            assert torch.equal(few_rows_linear(x, w[a:a + 1], b[a:a + 1]), y[:, a:a + 1])


def test_output_columns_do_not_depend_on_the_split():
    """An output feature's value is the same whichever thread range and register block hold it: a
    slice of the weight gives bitwise the same columns."""
    torch.manual_seed(4)
    for dtype in DTYPES:
        x, w = rand(3, 100, dtype=dtype), rand(301, 100, dtype=dtype)
        y = few_rows_linear(x, w)
        for a, b in ((0, 1), (5, 6), (7, 300), (298, 301)):
            assert torch.equal(few_rows_linear(x, w[a:b]), y[:, a:b])


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_batched_inputs(dtype):
    torch.manual_seed(5)
    wide = rand(40, 90, dtype=dtype)
    w = wide[:, 3:67]  # row stride 90 > 64
    x_rows = rand(6, 100, dtype=dtype)[:, 10:74]  # row stride 100
    assert_linear_close(few_rows_linear(x_rows, w), x_rows, w)
    x3 = rand(2, 3, 64, dtype=dtype)
    assert few_rows_linear(x3, w).shape == (2, 3, 40)
    assert_linear_close(few_rows_linear(x3, w).reshape(6, 40), x3.reshape(6, 64), w)
    xt = rand(64, 4, dtype=dtype).t()  # last dim strided: copied
    assert_linear_close(few_rows_linear(xt, w), xt, w)
    wt = rand(64, 40, dtype=dtype).t()  # a transposed weight: copied too (the model never passes one)
    assert_linear_close(few_rows_linear(xt, wt), xt, wt)
    assert not lin.supported(xt, wt) and lin.supported(xt, w) == lin._AVX2


def test_empty_shapes():
    x, w, b = torch.randn(3, 0), torch.randn(5, 0), torch.randn(5)
    assert torch.equal(few_rows_linear(x, w, b), b.expand(3, 5))  # no terms: the bias
    assert torch.equal(few_rows_linear(x, w), torch.zeros(3, 5))
    assert few_rows_linear(torch.randn(0, 4), torch.randn(5, 4)).shape == (0, 5)
    assert few_rows_linear(torch.randn(2, 4), torch.randn(0, 4)).shape == (2, 0)
    assert not lin.supported(torch.randn(9, 0), torch.randn(5, 0))  # 9 rows, though no elements


@pytest.mark.parametrize("args,says", [
    ((torch.randn(9, 4), torch.randn(3, 4)), "at most 8 rows"),
    ((torch.randn(2, 4), torch.randn(3, 5)), "does not match"),
    ((torch.randn(2, 4), torch.randn(3, 4).double()), "dtype"),
    ((torch.randn(2, 4).double(), torch.randn(3, 4).double()), "dtype"),
    ((torch.randn(2, 4), torch.randn(3, 4), torch.randn(4)), "bias"),
    ((torch.randn(2, 4), torch.randn(3, 4), torch.randn(3).half()), "bias"),
    ((torch.randn(2, 4), torch.randn(12).as_strided((3, 4), (2, 1))), "rows overlap"),
    ((torch.randn(2, 4), torch.randn(3, 4, 1)), "two"),
])
def test_bad_arguments_raise_value_error(args, says):
    with pytest.raises(ValueError, match=says):
        few_rows_linear(*args)


@needs_avx2
def test_model_linear_uses_it_only_without_gradients(monkeypatch):
    """modeling.linear routes plain no-grad calls of up to 8 rows to the kernel (the decode step's
    products), up to CHUNKED_MAX_ROWS in passes of 8, and leaves everything with a gradient to record,
    autocast regions and more rows alone."""
    calls = []
    real = lin._C.few_rows_linear
    monkeypatch.setattr(lin._C, "few_rows_linear", lambda *a: calls.append(a[0][2][0]) or real(*a))  # x's rows
    monkeypatch.setattr(modeling, "_FP32_GEMM_ON_CPU", True)  # passes past 8 rows only on such CPUs (as this one)
    torch.manual_seed(6)
    for dtype in DTYPES:
        w, b = rand(29, 48, dtype=dtype), rand(29, dtype=dtype)
        x = rand(2, 4, 48, dtype=dtype)
        most = lin.CHUNKED_MAX_ROWS[dtype]
        with torch.no_grad():
            calls.clear()
            y = modeling.linear(x, w, b)
            assert calls == [8]
            assert_linear_close(y.reshape(8, 29), x.reshape(8, 48), w, b)
            for rows in (9, most):
                calls.clear()
                x9 = rand(rows, 48, dtype=dtype)
                y = modeling.linear(x9, w, b)
                assert calls == [min(8, rows - i) for i in range(0, rows, 8)]  # one pass per 8 rows
                assert_linear_close(y, x9, w, b)
            calls.clear()
            modeling.linear(rand(most + 1, 48, dtype=dtype), w, b)
            assert calls == []
        xg = x.clone().requires_grad_()
        y = modeling.linear(xg, w, b)
        assert calls == [] and y.requires_grad
        y.sum().backward()
        assert xg.grad is not None
        modeling.linear(x, w, b)  # grad mode on, nothing requires grad: nothing to record
        assert calls == [8]
        calls.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = modeling.linear(torch.randn(1, 48), torch.randn(29, 48))
    assert calls == [] and y.dtype == torch.bfloat16
    monkeypatch.setattr(modeling, "_FP32_GEMM_ON_CPU", False)  # a CPU with fast bf16 GEMMs: 8 rows at most
    with torch.no_grad():
        modeling.linear(torch.randn(8, 48), torch.randn(29, 48))
        modeling.linear(torch.randn(9, 48), torch.randn(29, 48))
    assert calls == [8]
    calls.clear()
    monkeypatch.setattr(modeling, "_FEW_ROWS_KERNEL", False)
    with torch.no_grad():
        modeling.linear(torch.randn(1, 48), torch.randn(29, 48))
        modeling.linear(torch.randn(12, 48), torch.randn(29, 48))
    assert calls == []


@needs_avx2
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [9, 15, 16, 17, 24, 33])
def test_rows_linear_is_passes_of_few_rows(dtype, rows):
    """rows_linear: every output element within the kernel's float64 bound (NaN-poisoned output), and
    each block of 8 rows bitwise what few_rows_linear gives for that block; a strided x and a bias."""
    torch.manual_seed(rows)
    K, N = 77, 45
    w, b = rand(N, K, dtype=dtype), rand(N, dtype=dtype)
    x = rand(rows, 2 * K, dtype=dtype)[:, ::2]  # every other column: a copy is made
    for bias in (None, b):
        y = lin.rows_linear(x.reshape(1, rows, K), w, bias)
        assert y.shape == (1, rows, N)
        y = y[0]
        assert_linear_close(y, x, w, bias)
        for i in range(0, rows, 8):
            assert torch.equal(y[i:i + 8], few_rows_linear(x[i:i + 8], w, bias))

def test_decode_steps_match_the_torch_linear_path(monkeypatch):
    """Greedy decoding of a bf16 model gives the same logits (to bf16 rounding of a product) with the
    kernel as with torch's products; the generated tokens of a float32 model are the same."""
    from mpt_kernels.model import MPTConfig, MPTForCausalLM

    torch.manual_seed(7)
    cfg = MPTConfig.from_preset("tiny", vocab_size=512, max_seq_len=64)
    model = MPTForCausalLM(cfg).eval()
    ids = torch.randint(0, 512, (2, 9))
    outs = {}
    for use in (True, False):
        monkeypatch.setattr(modeling, "_FEW_ROWS_KERNEL", use)
        outs[use] = model.generate(ids, max_new_tokens=12, temperature=0)
    assert torch.equal(outs[True], outs[False])
    m16 = MPTForCausalLM(cfg).to(torch.bfloat16).eval()
    logits = {}
    for use in (True, False):
        monkeypatch.setattr(modeling, "_FEW_ROWS_KERNEL", use)
        with torch.no_grad():
            cache = m16.new_cache(2, capacity=16)
            m16(ids, past_key_values=cache, use_cache=True)
            logits[use] = m16(ids[:, :1], past_key_values=cache, use_cache=True).logits.float()
    scale = logits[False].abs().max().item()
    assert math.isfinite(scale)
    torch.testing.assert_close(logits[True], logits[False], atol=scale * 2.0 ** -5, rtol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_training_outputs_are_not_views(autocast):
    """The float32-GEMM Linear writes its output in its final shape: module outputs (a block's branch,
    the logits) are tensors of their own, not views, which FSDP2 warns about on every forward ("returned
    a view tensor": an in-place op on one would skip its pre-backward hook). Values as F.linear."""
    from mpt_kernels.model import MPTConfig, MPTForCausalLM

    torch.manual_seed(3)
    m = MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=101, max_seq_len=32,
                                 attn_config={"attn_impl": "flash"}))
    ids = torch.randint(0, 101, (2, 16))
    seen = []
    for b in m.transformer.blocks:
        b.register_forward_hook(lambda mod, inp, out: seen.extend(out))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = m(ids, labels=ids)
    seen.append(out.logits)
    assert len(seen) == 5 and all(t._base is None for t in seen)
    x = torch.randn(2, 3, 16, requires_grad=True)
    w, bias = torch.randn(8, 16, requires_grad=True), torch.randn(8)
    for dt in (torch.float32, torch.bfloat16):
        y = modeling._Float32GemmLinear.apply(x.to(dt), w.to(dt), bias.to(dt))
        assert y._base is None and y.shape == (2, 3, 8) and y.dtype == dt
        torch.testing.assert_close(y.float(), F.linear(x.to(dt).float(), w.to(dt).float(), bias.to(dt).float()),
                                   rtol=1e-2 if dt == torch.bfloat16 else 1e-6, atol=1e-2 if dt == torch.bfloat16 else 1e-5)
