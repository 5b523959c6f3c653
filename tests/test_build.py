"""The package imports without a GPU and reports how it was built."""
import mpt_kernels as mk


def test_build_info_fields():
    info = mk.build_info()
    for key in ("version", "cxx_compiler", "cxx_flags", "cpu_features", "cuda", "cuda_archs", "ops"):
        assert key in info
    assert info["version"] == mk.__version__
    assert isinstance(info["cpu_features"], list)
    if info["cuda"]:
        assert "80" in info["cuda_archs"] or "90" in info["cuda_archs"]


def test_cpu_avx512_switch():
    """The 512-bit CPU paths are chosen at run time: on where the CPU has AVX-512 F/VL/BW/DQ (GCC's
    check, which includes the OS's XCR0 state), off with MPTK_CPU_AVX512=0, never on without the CPU."""
    import subprocess
    import sys

    from _subproc import NEUTRAL_CWD, subprocess_env

    flags = open("/proc/cpuinfo").read().split("\n\nprocessor")[0] if sys.platform == "linux" else ""
    has = all(f" {f} " in flags.replace("\n", " ") + " " for f in ("avx512f", "avx512vl", "avx512bw", "avx512dq"))
    info = mk.build_info()
    assert info["cpu_avx512_kernels"] == has
    code = "import mpt_kernels as mk; print(mk.build_info()['cpu_avx512_kernels'], mk._ext._C._set_cpu_avx512(True), mk._ext._C._cpu_avx512())"
    for env, want in (("0", f"False False {has}"), ("1", f"{has} {has} {has}")):
        r = subprocess.run([sys.executable, "-c", code], env={**subprocess_env(), "MPTK_CPU_AVX512": env},
                           cwd=NEUTRAL_CWD, capture_output=True, text=True, check=True)
        assert r.stdout.split() == want.split(), (env, r.stdout, r.stderr)


def test_set_flush_denormal_reaches_the_pool_threads():
    """mk.set_flush_denormal: flush-to-zero + denormals-are-zero on the caller and every OpenMP pool
    thread (a 1M-element torch product runs on all of them), returns the previous setting, restores
    cleanly; anything but a bool is a ValueError."""
    import platform

    import pytest
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("MXCSR (x86) only")
    x = torch.full((1 << 20,), 1e-38)
    try:
        was = mk.set_flush_denormal(True)
        assert bool(((x * 0.1) == 0).all()) and bool((x * 1.0 == 0).all())  # outputs and inputs
        assert mk.set_flush_denormal(True) is True
        assert mk.set_flush_denormal(False) is True
        assert bool(((x * 0.1) != 0).all())
        assert mk.set_flush_denormal(False) is False
    finally:
        mk.set_flush_denormal(bool(was))
    with pytest.raises(ValueError, match="on: expected True or False"):
        mk.set_flush_denormal(1)


def test_cuda_available_is_bool():
    assert isinstance(mk.cuda_available(), bool)


def test_subpackages_load_lazily():
    assert callable(mk.model.apply_to_hf)
    assert callable(mk.export.export_fastertransformer)
    import pytest

    with pytest.raises(AttributeError):
        mk.no_such_thing


def test_unbuilt_checkout_uses_the_installed_core(tmp_path):
    """`python -m mpt_kernels.generate` from a repository root after `pip install .`: the checkout
    (no _C of its own) comes first on sys.path. It borrows the installed copy's compiled core when
    that copy's bridge (_ext.py) is byte-identical, and refuses with the build hint otherwise."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    pkg = Path(mk.__file__).parent
    site, src = tmp_path / "site", tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(pkg, site / "mpt_kernels", ignore=ignore)
    shutil.copytree(pkg, src / "mpt_kernels", ignore=shutil.ignore_patterns("__pycache__", "_C.*"))
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import torch, mpt_kernels as mk; "
            "y = mk.layer_norm(torch.randn(3, 8), torch.ones(8)); "
            "print(mk.__file__, mk._ext._C.__file__, float(y.pow(2).mean()))")
    run = lambda: subprocess.run([sys.executable, "-c", code, str(src), str(site)], capture_output=True,  # noqa: E731
                                 text=True, timeout=120, cwd=tmp_path)
    r = run()
    assert r.returncode == 0, r.stderr[-2000:]
    mod_file, core_file, ms = r.stdout.split()
    assert mod_file.startswith(str(src)) and core_file.startswith(str(site)) and abs(float(ms) - 1) < 1e-3
    (src / "mpt_kernels" / "_ext.py").write_text((src / "mpt_kernels" / "_ext.py").read_text() + "\n# edited\n")
    r = run()
    assert r.returncode != 0 and "build the package" in r.stderr


def test_ops_on_a_second_gpu_leave_gpu0_without_a_context():
    """Every op run on cuda:1, in the main thread and then (a Lion step, which allocates nothing
    first, so only our own device guard switches devices) in a fresh thread whose default device is
    0: nothing may create a context on GPU 0. Restoring a fresh thread's device 0 after a launch would
    (since CUDA 12, cudaSetDevice creates the context): hundreds of MB on GPU 0 from every process of
    a multi-GPU job. Needs 2 GPUs; runs in a fresh process."""
    import subprocess
    import sys

    import pytest
    import torch

    if not (mk.cuda_available() and torch.cuda.is_available() and torch.cuda.device_count() >= 2):
        pytest.skip("needs a CUDA build and 2 GPUs")
    from _subproc import NEUTRAL_CWD, subprocess_env

    code = """
import threading, torch, mpt_kernels as mk
dev = torch.device("cuda:1")
q, k, v = (torch.randn(1, 40, 2, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
o = mk.alibi_attention(q, k, v, causal=True)
o.float().sum().backward()
x = torch.randn(5, 64, device=dev, requires_grad=True)
mk.layer_norm(x, torch.ones(64, device=dev)).sum().backward()
loss = mk.ops.loss.cross_entropy(torch.randn(4, 33, device=dev), torch.randint(0, 33, (4,), device=dev))
p = torch.nn.Parameter(torch.randn(64, device=dev))
p.grad = torch.randn(64, device=dev)
opt = mk.optim.Lion([p], lr=1e-3)
opt.step()
before = p.detach().clone()
t = threading.Thread(target=opt.step)
t.start(); t.join()
torch.cuda.synchronize(dev)
ok = bool(torch.isfinite(loss)) and bool(torch.isfinite(o).all()) and not torch.equal(before, p.detach())
print(ok, torch._C._cuda_hasPrimaryContext(0), torch._C._cuda_hasPrimaryContext(1))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=NEUTRAL_CWD, env=subprocess_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "False", "True"], r.stdout
