"""The host caching pool (csrc/common/host_pool.h, python/bind_memory.cpp, _ext.empty): large CPU
outputs of the ops come from 2 MiB-aligned blocks that are reused once the last view of a tensor
dies, instead of being faulted in afresh on every call."""
import subprocess
import sys
import threading

import pytest
import torch

import mpt_kernels as mk
from mpt_kernels import _ext

from _subproc import NEUTRAL_CWD, subprocess_env

MiB = 1 << 20
# An AddressSanitizer build (tests/run_sanitized.sh) bypasses the pool: exact-size buffers, nothing cached.
pooled = pytest.mark.skipif("-fsanitize=address" in mk.build_info()["cxx_flags"],
                            reason="AddressSanitizer build: host buffers are not pooled")


@pytest.fixture(autouse=True)
def _fresh_pool():
    mk.empty_host_cache()
    yield
    mk.empty_host_cache()


@pooled
def test_large_tensor_comes_from_the_pool_and_is_reused():
    before = mk.host_cache_info()
    t = _ext.empty((513, 4097), torch.bfloat16, "cpu")  # odd sizes: capacity rounds up to 2 MiB
    assert t.shape == (513, 4097) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % (2 * MiB) == 0
    t.fill_(1.5)  # the whole block is writable
    assert float(t[-1, -1]) == 1.5
    ptr = t.data_ptr()
    info = mk.host_cache_info()
    assert info["misses"] == before["misses"] + 1
    assert info["in_use_bytes"] - before["in_use_bytes"] >= t.numel() * 2
    del t
    after_free = mk.host_cache_info()
    assert after_free["cached_bytes"] >= 513 * 4097 * 2
    u = _ext.empty((4097, 513), torch.bfloat16, "cpu")  # same size, other shape: the same block
    assert u.data_ptr() == ptr
    assert mk.host_cache_info()["hits"] == after_free["hits"] + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32,
                                   torch.int64, torch.uint8], ids=str)
def test_every_dtype(dtype):
    t = _ext.empty((3, MiB // 2), dtype, "cpu")
    assert t.dtype == dtype and t.shape == (3, MiB // 2) and t.stride() == (MiB // 2, 1)
    t.copy_(torch.arange(t.numel()).reshape(t.shape).to(dtype))
    assert torch.equal(t, torch.arange(t.numel()).reshape(t.shape).to(dtype))


def test_a_view_keeps_its_block_alive():
    t = _ext.empty((4 * MiB,), torch.float32, "cpu")
    ptr, cap = t.data_ptr(), mk.host_cache_info()["in_use_bytes"]
    v = t[MiB:]
    del t
    assert mk.host_cache_info()["in_use_bytes"] == cap  # not returned: the view still reads it
    v.fill_(2.0)
    w = _ext.empty((4 * MiB,), torch.float32, "cpu")
    assert w.data_ptr() != ptr
    del v
    assert mk.host_cache_info()["in_use_bytes"] == cap  # only w is in use now
    del w


def test_small_and_empty_tensors_stay_with_torch():
    before = mk.host_cache_info()
    small = _ext.empty((7, 11), torch.float32, "cpu")
    empty = _ext.empty((0, 4096), torch.float32, "cpu")
    assert small.shape == (7, 11) and empty.shape == (0, 4096)
    after = mk.host_cache_info()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


@pooled
def test_limit_and_empty_cache():
    old = mk.host_cache_info()["limit_bytes"]
    try:
        mk.set_host_cache_limit(4 * MiB)
        a = _ext.empty((8 * MiB,), torch.uint8, "cpu")
        b = _ext.empty((2 * MiB,), torch.uint8, "cpu")
        del a  # over the limit: unmapped rather than cached
        assert mk.host_cache_info()["cached_bytes"] == 0
        del b
        assert mk.host_cache_info()["cached_bytes"] == 2 * MiB
        mk.empty_host_cache()
        assert mk.host_cache_info()["cached_bytes"] == 0
        with pytest.raises(ValueError, match="nbytes"):
            mk.set_host_cache_limit(-1)
    finally:
        mk.set_host_cache_limit(old)


@pooled
def test_blocks_freed_from_other_threads():
    tensors = [_ext.empty((MiB,), torch.float32, "cpu") for _ in range(8)]
    in_use = mk.host_cache_info()["in_use_bytes"]

    def drop(ts):
        while ts:
            ts.pop().add_(1)

    threads = [threading.Thread(target=drop, args=(tensors[i::4],)) for i in range(4)]
    del tensors
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    info = mk.host_cache_info()
    assert info["in_use_bytes"] == in_use - 8 * 4 * MiB
    assert info["cached_bytes"] == 8 * 4 * MiB


@pooled
def test_layer_norm_outputs_and_gradients_use_the_pool():
    x = torch.randn(1024, 1024, requires_grad=True)
    w = torch.randn(1024, requires_grad=True)
    y = mk.layer_norm(x, w)
    assert y.data_ptr() % (2 * MiB) == 0
    y.backward(torch.randn_like(y))
    ref = torch.nn.functional.layer_norm(x.detach().double(), (1024,), w.detach().double())
    torch.testing.assert_close(y.detach().double(), ref, rtol=1e-5, atol=1e-5)
    assert x.grad.data_ptr() % (2 * MiB) == 0
    # the pool's blocks round-trip through torch's own ops and serialisation
    import io

    buf = io.BytesIO()
    torch.save(y.detach(), buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), y.detach())


def _child(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=NEUTRAL_CWD, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=120)


def test_env_turns_the_pool_off_or_sets_its_limit():
    code = ("import torch, mpt_kernels as mk; from mpt_kernels import _ext\n"
            "t = _ext.empty((1 << 22,), torch.float32, 'cpu'); i = mk.host_cache_info()\n"
            "print(i['misses'], i['limit_bytes'])")
    off = _child(code, MPT_KERNELS_HOST_CACHE_MB="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["0", "0"]
    on = _child(code, MPT_KERNELS_HOST_CACHE_MB="64")
    assert on.returncode == 0, on.stderr
    assert on.stdout.split() == ["1", str(64 * MiB)]
    bad = _child(code, MPT_KERNELS_HOST_CACHE_MB="lots")
    assert bad.returncode != 0 and "MPT_KERNELS_HOST_CACHE_MB" in bad.stderr


def test_bad_arguments_at_the_c_boundary():
    with pytest.raises(ValueError, match="dtype"):
        _ext._C.host_empty([4], 99)
    with pytest.raises(ValueError, match="shape"):
        _ext._C.host_empty([-1], 0)
    # an unconsumed capsule gives its block back when it dies
    in_use = mk.host_cache_info()["in_use_bytes"]
    cap = _ext._C.host_empty([MiB], 0)
    assert mk.host_cache_info()["in_use_bytes"] == in_use + 4 * MiB
    del cap
    assert mk.host_cache_info()["in_use_bytes"] == in_use
