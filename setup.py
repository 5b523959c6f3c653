"""Thin setuptools driver of CMakeLists.txt: builds the private module mpt_kernels._C.

Build switches (environment variables):
  MPT_KERNELS_CUDA        auto (default) | 0 | 1   build the CUDA kernels (auto: when nvcc is found)
  MPT_KERNELS_CUDA_ARCHS  "80;90a" (default)       CUDA architectures compiled in
  MPT_KERNELS_NATIVE      1 (default) | 0          tune the CPU kernels for this host (-march=native)
  MPT_KERNELS_DEBUG       0 (default) | 1          -O0 -g build
  MPT_KERNELS_PTXAS_VERBOSE 0 (default) | 1        print ptxas' register/spill/shared-memory report
  MPT_KERNELS_SANITIZE    "" (default) | e.g. address,undefined   sanitizers over the CPU code
                                                   (tests/run_sanitized.sh builds and runs them)
  MAX_JOBS                parallel compile jobs (default: CPU count)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _drop_stale_cache(build_dir: Path) -> None:
    """pip builds in a throw-away environment: a second `pip install .` of the same checkout finds a
    CMakeCache.txt naming the ninja/cmake of an environment that no longer exists, and CMake fails
    before configuring. Start that build directory's configuration afresh (objects are rebuilt)."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return
    keys = ("CMAKE_MAKE_PROGRAM", "CMAKE_COMMAND", "CMAKE_CXX_COMPILER", "CMAKE_CUDA_COMPILER")
    for line in cache.read_text(errors="replace").splitlines():
        name, _, value = line.partition("=")
        if name.split(":")[0] in keys and value.startswith("/") and not Path(value).exists():
            print(f"[mpt_kernels] {cache} names {value}, which is gone: configuring afresh", flush=True)
            cache.unlink()
            shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)
            return


def _tool(name: str, bin_dir_attr: str):
    """The executable of the pip package ``name`` (cmake, ninja) when it is installed in this Python,
    else the one on PATH. A build run as `venv/bin/python setup.py ...` without activating the venv
    would otherwise pick up an older system CMake (CMakeLists.txt needs >= 3.26)."""
    try:
        import importlib

        bin_dir = getattr(importlib.import_module(name), bin_dir_attr, None)
        exe = Path(bin_dir) / name if bin_dir else None
        if exe is not None and exe.is_file():
            return str(exe)
    except Exception:  # noqa: BLE001 - a broken or partial package: fall back to PATH
        pass
    return shutil.which(name)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = ext_path.parent
        build_dir = Path(os.environ.get("MPT_KERNELS_BUILD_DIR", Path(self.build_temp) / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)

        cuda_mode = os.environ.get("MPT_KERNELS_CUDA", "auto").lower()
        nvcc = _find_nvcc()
        if cuda_mode in ("1", "on", "true", "yes"):
            if nvcc is None:
                raise RuntimeError("MPT_KERNELS_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
            with_cuda = True
        elif cuda_mode in ("0", "off", "false", "no"):
            with_cuda = False
        else:
            with_cuda = nvcc is not None
        debug = os.environ.get("MPT_KERNELS_DEBUG", "0") == "1"

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if debug else 'Release'}",
            f"-DMPT_KERNELS_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DMPT_KERNELS_CUDA_ARCHS={os.environ.get('MPT_KERNELS_CUDA_ARCHS', '80;90a')}",
            f"-DMPT_KERNELS_NATIVE={'OFF' if os.environ.get('MPT_KERNELS_NATIVE', '1') == '0' else 'ON'}",
            f"-DMPT_KERNELS_VERSION={self.distribution.get_version()}",
            f"-DMPT_KERNELS_PTXAS_VERBOSE={'ON' if os.environ.get('MPT_KERNELS_PTXAS_VERBOSE', '0') == '1' else 'OFF'}",
            f"-DMPT_KERNELS_SANITIZE={os.environ.get('MPT_KERNELS_SANITIZE', '')}",
        ]
        if with_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        cmake = _tool("cmake", "CMAKE_BIN_DIR") or "cmake"
        ninja = _tool("ninja", "BIN_DIR")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        _drop_stale_cache(build_dir)
        print(f"[mpt_kernels] cmake configure in {build_dir} (cuda={with_cuda})", flush=True)
        subprocess.run([cmake, str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("mpt_kernels._C")], cmdclass={"build_ext": CMakeBuild})
