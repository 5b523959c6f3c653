"""Drive the CUDA LayerNorm with no torch: device memory from the CUDA driver API, host data in
numpy, kernels through mpt_kernels._C (run by benchmarks/device_check.sh).

    python benchmarks/cuda_python_layernorm.py [--rows 16384] [--hidden 4096]

The driver API comes from cuda-python (`pip install cuda-python`) when it is installed, else from
libcuda.so.1 through ctypes (the driver ships it; nothing to install). `import torch` is blocked in
this process to prove the compiled core does not need it. Checks forward (with the fused residual
add) and backward against a float64 numpy reference, then times the forward. Exits 0 with a message
when there is no CUDA build or no GPU.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import sys
import time
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_core():
    """mpt_kernels._C and _ext without the package __init__ (which imports the torch ops)."""
    sys.modules["torch"] = None  # any `import torch` now fails
    pkg = types.ModuleType("mpt_kernels")
    pkg.__path__ = [os.path.join(ROOT, "mpt_kernels")]
    sys.modules["mpt_kernels"] = pkg
    _ext = importlib.import_module("mpt_kernels._ext")
    return _ext._C, _ext


class CtypesDriver:
    """The few CUDA driver calls needed, from libcuda.so.1."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")
        self._check(self.lib.cuInit(0), "cuInit")
        dev = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
        ctx = ctypes.c_void_p()
        # The primary context is the one the CUDA runtime inside _C uses too.
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        self._check(self.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        s = ctypes.c_void_p()
        self._check(self.lib.cuStreamCreate(ctypes.byref(s), 0), "cuStreamCreate")
        self.stream = s.value or 0
        self.name = "ctypes libcuda.so.1"

    @staticmethod
    def _check(err, what):
        if err != 0:
            raise RuntimeError(f"{what} failed with CUresult {err}")

    def alloc(self, nbytes):
        p = ctypes.c_uint64()
        self._check(self.lib.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(max(nbytes, 1))), "cuMemAlloc")
        return p.value

    def htod(self, dst, a):
        a = np.ascontiguousarray(a)
        self._check(self.lib.cuMemcpyHtoD_v2(ctypes.c_uint64(dst), a.ctypes.data_as(ctypes.c_void_p),
                                             ctypes.c_size_t(a.nbytes)), "cuMemcpyHtoD")

    def dtoh(self, a, src):
        self._check(self.lib.cuMemcpyDtoH_v2(a.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint64(src),
                                             ctypes.c_size_t(a.nbytes)), "cuMemcpyDtoH")

    def sync(self):
        self._check(self.lib.cuStreamSynchronize(ctypes.c_void_p(self.stream)), "cuStreamSynchronize")


class CudaPythonDriver:
    """The same calls through cuda-python's driver bindings."""

    def __init__(self):
        try:
            from cuda.bindings import driver
        except ImportError:
            from cuda import cuda as driver
        self.d = driver
        self._ok(driver.cuInit(0), "cuInit")
        dev = self._ok(driver.cuDeviceGet(0), "cuDeviceGet")
        ctx = self._ok(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        self._ok(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        self._stream = self._ok(driver.cuStreamCreate(0), "cuStreamCreate")
        self.stream = int(self._stream)
        self.name = "cuda-python"

    def _ok(self, res, what):
        err, *rest = res if isinstance(res, tuple) else (res,)
        if err != self.d.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"{what} failed: {err}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def alloc(self, nbytes):
        return int(self._ok(self.d.cuMemAlloc(max(nbytes, 1)), "cuMemAlloc"))

    def htod(self, dst, a):
        a = np.ascontiguousarray(a)
        self._ok(self.d.cuMemcpyHtoD(dst, a.ctypes.data, a.nbytes), "cuMemcpyHtoD")

    def dtoh(self, a, src):
        self._ok(self.d.cuMemcpyDtoH(a.ctypes.data, src, a.nbytes), "cuMemcpyDtoH")

    def sync(self):
        self._ok(self.d.cuStreamSynchronize(self._stream), "cuStreamSynchronize")


def bf16_bits(a):
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(b):
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=4096)
    args = ap.parse_args(argv)

    _C, _ext = load_core()
    if not _C.build_info()["cuda"]:
        print("cuda_python_layernorm: this build of mpt_kernels has no CUDA kernels; nothing to run.")
        return 0
    if not _C.cuda_available():
        print("cuda_python_layernorm: no usable CUDA device; nothing to run.")
        return 0
    try:
        drv = CudaPythonDriver()
    except Exception as exc:  # noqa: BLE001 - not installed, or an API this code does not know
        print(f"cuda-python driver unavailable ({type(exc).__name__}: {exc}); using ctypes")
        drv = CtypesDriver()
    print(f"driver API via {drv.name}; torch imported: {sys.modules.get('torch') is not None}")

    R, H = args.rows, args.hidden
    rng = np.random.default_rng(0)
    x = bf16_bits(rng.standard_normal((R, H)) * 2 + 0.5)
    res = bf16_bits(rng.standard_normal((R, H)))
    w = bf16_bits(rng.standard_normal(H) * 0.5 + 1)
    dy = bf16_bits(rng.standard_normal((R, H)))
    n_ws = _C.layer_norm_bwd_workspace_numel(R, H, _ext.BFLOAT16, _ext.BFLOAT16, False, 0)
    nb = R * H * 2
    ptr = {k: drv.alloc(n) for k, n in dict(x=nb, res=nb, w=H * 2, y=nb, h=nb, mean=R * 4, rstd=R * 4, dy=nb,
                                              dh=nb, dw=H * 2, ws=n_ws * 4).items()}
    for k, a in dict(x=x, res=res, w=w, dy=dy).items():
        drv.htod(ptr[k], a)

    def view(name, shape, code=_ext.BFLOAT16):
        strides = (shape[1], 1) if len(shape) == 2 else (1,)
        return (ptr[name], code, shape, strides, 0)

    def forward():
        _C.layer_norm_fwd(view("x", (R, H)), view("w", (H,)), None, view("res", (R, H)), view("y", (R, H)),
                          view("h", (R, H)), view("mean", (R,), _ext.FLOAT32), view("rstd", (R,), _ext.FLOAT32),
                          1e-5, drv.stream)

    forward()
    _C.layer_norm_bwd(view("dy", (R, H)), None, view("h", (R, H)), view("w", (H,)),
                      view("mean", (R,), _ext.FLOAT32), view("rstd", (R,), _ext.FLOAT32), view("dh", (R, H)),
                      view("dw", (H,)), None, (ptr["ws"], _ext.FLOAT32, (n_ws,), (1,), 0), drv.stream)
    drv.sync()
    y, h, dh = (np.empty((R, H), np.uint16) for _ in range(3))
    dw = np.empty(H, np.uint16)
    for a, k in ((y, "y"), (h, "h"), (dh, "dh"), (dw, "dw")):
        drv.dtoh(a, ptr[k])

    # float64 reference on the exact bfloat16 inputs (the sum rounded to bfloat16, as returned).
    h_ref = bf16_bits(bf16_values(x) + bf16_values(res))
    hd, wd, dyd = bf16_values(h_ref), bf16_values(w), bf16_values(dy)
    mu = hd.mean(-1, keepdims=True)
    rs = 1 / np.sqrt(((hd - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    xhat = (hd - mu) * rs
    y_ref = xhat * wd
    g = dyd * wd
    dx_ref = rs * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    dw_ref = (dyd * xhat).sum(0)

    failures = []

    def check(name, got, ref, atol_frac):
        bound = 2.0 ** -7 * np.abs(ref) + atol_frac * np.abs(ref).max()
        err = np.abs(got - ref)
        ok = bool((err <= bound).all())
        print(f"  {name:3s} max |err| {np.nanmax(err):.3g}  {'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(name)

    print(f"bfloat16, {R} x {H}:")
    if not np.array_equal(h, h_ref):
        failures.append("h")
    print(f"  h   {'exact' if 'h' not in failures else 'MISMATCH'}")
    check("y", bf16_values(y), y_ref, 1e-5)
    check("dx", bf16_values(dh), dx_ref, 1e-4)
    check("dw", bf16_values(dw), dw_ref, 1e-4)

    iters = 20
    drv.sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        forward()
    drv.sync()
    t = (time.perf_counter() - t0) / iters
    print(f"forward with residual: {t * 1e3:.3f} ms, {4 * nb / t / 1e9:.0f} GB/s (reads x, residual; writes y, h)")
    if failures:
        print("FAILED:", ", ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
