"""Builds ``_C_emu``: the extension's bindings and the real CUDA sources (csrc/*/*.cu), compiled by the
host C++ compiler against the emulator in this folder, so CPU tensors handed to the bindings as
"device 0" run the CUDA kernels on the host (README.md here). Cached under build/cuda_emu/<hash>.

    python tests/cuda_emu/build.py            # build (or find) it and print its path

The .cu files are rewritten on the way, keeping their line numbers: ``kernel<<<cfg>>>(args)`` becomes
``::mptk_emu::launcher(kernel, cfg)(args)``, ``extern __shared__ ... name[];`` the block's dynamic
shared memory, and each static ``__shared__ T name[N];`` a per-block variable of the emulator.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FLAGS = ["-std=c++17", "-O1", "-g1", "-fPIC", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas",
         "-Wno-unused-variable", "-Wno-unused-function"]


def _angle_start(text: str, end: int) -> int:
    """Index of the identifier that starts the kernel expression ending at ``end`` (exclusive):
    ``name``, ``ns::name`` or ``name<...>`` with balanced template arguments."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if text[i - 1] == ">":
        depth = 0
        while True:
            i -= 1
            if text[i] == ">":
                depth += 1
            elif text[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def transform_cu(text: str) -> str:
    out, pos = [], 0
    for m in re.finditer(r"<<<", text):
        if m.start() < pos:
            continue
        start = _angle_start(text, m.start())
        close = text.index(">>>", m.end())
        kernel = text[start:m.start()].strip()
        cfg = text[m.end():close]
        out.append(text[pos:start])
        out.append(f"::mptk_emu::launcher({kernel}, {cfg})")
        pos = close + 3
    out.append(text[pos:])
    text = "".join(out)
    text = re.sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\[\]\s*;",
                  r"\1* \2 = reinterpret_cast<\1*>(::mptk_emu::dynamic_smem());", text)
    site = iter(range(1, 1 << 30))

    def shared(m):  # __shared__ T a[N], b[M];  ->  auto& a = ...<T[N]>(site); auto& b = ...;
        decls = re.findall(r"(\w+)\s*((?:\[[^\]]*\])+)", m.group(2))
        return " ".join(f"auto& {name} = ::mptk_emu::static_smem_var<{m.group(1)}{dims}>({next(site)});"
                        for name, dims in decls)

    text = re.sub(r"__shared__\s+([\w:]+)\s+((?:\w+\s*(?:\[[^\]]*\])+\s*,?\s*)+);", shared, text)
    if "__shared__" in text:
        raise RuntimeError("cuda_emu: a __shared__ declaration the rewrite does not handle")
    return text


def _sources():
    cpu = sorted(ROOT.glob("csrc/*/*.cpp")) + sorted(ROOT.glob("python/*.cpp"))
    cu = sorted(ROOT.glob("csrc/*/*.cu"))
    headers = sorted(ROOT.glob("csrc/*/*.h")) + sorted(ROOT.glob("csrc/*/*.cuh")) + sorted(ROOT.glob("python/*.h"))
    emu = [HERE / "cuda_emu.cpp", HERE / "cuda_emu.h", HERE / "build.py"] + sorted((HERE / "include").glob("*.h"))
    return cpu, cu, headers + emu


def _compiler():
    return os.environ.get("CXX", "g++")


def _flags():
    import pybind11

    flags = list(FLAGS)
    machine = os.uname().machine
    if machine in ("x86_64", "AMD64"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    sanitize = os.environ.get("MPTK_EMU_SANITIZE", "")  # e.g. address,undefined (tests/run_sanitized.sh)
    if sanitize:
        flags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
    flags += ["-I", str(ROOT / "csrc"), "-I", str(ROOT / "python"), "-I", str(HERE), "-I", str(HERE / "include"), "-I",
              pybind11.get_include(), "-I", sysconfig.get_paths()["include"],
              "-DMPTK_WITH_CUDA=1", "-DMPTK_CUDA_EMU=1", '-DMPTK_CUDA_ARCHS="emu"', '-DMPTK_CUDA_VERSION="emu"',
              '-DMPTK_VERSION="emu"', '-DMPTK_CXX_FLAGS="emu"', '-DMPTK_CXX_COMPILER="emu"']
    return flags


def racecheck_requested() -> bool:
    return os.environ.get("MPTK_EMU_RACECHECK", "") not in ("", "0")


def module_name(racecheck: bool) -> str:
    # another name for the racecheck variant: Python keeps one extension module per name, so both
    # variants can be loaded in one process
    return "_C_emu_race" if racecheck else "_C_emu"


def build(verbose: bool = False, racecheck: bool | None = None) -> Path:
    """Path of the built module (built now when its sources changed). ``racecheck`` (default: the
    MPTK_EMU_RACECHECK environment variable) builds the variant ``_C_emu_race``, whose kernels check
    every shared- and global-memory access for hazards between threads (README.md, "Racecheck")."""
    if racecheck is None:
        racecheck = racecheck_requested()
    cpu, cu, deps = _sources()
    cu = cu + [HERE / "selftest.cu"]  # the emulator's own checks, each with a planted bug (test_cuda_emulated.py)
    cpu = cpu + [HERE / "selftest_bind.cpp"]
    flags = _flags()
    # Racecheck: the CUDA units are instrumented by GCC's ThreadSanitizer pass, whose callbacks
    # cuda_emu.cpp defines (ThreadSanitizer's runtime is not linked); the CPU units are the plain build's.
    emu_flags = flags + (["-DMPTK_EMU_RACECHECK=1"] if racecheck else [])
    cu_flags = emu_flags + (["-fsanitize=thread"] if racecheck else [])
    if racecheck and any(f.startswith("-fsanitize=") for f in flags):
        raise RuntimeError("cuda_emu: MPTK_EMU_RACECHECK cannot be combined with MPTK_EMU_SANITIZE "
                           "(GCC's thread instrumentation excludes the address sanitizer)")
    h = hashlib.sha256()
    for p in cpu + cu + deps:
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes())
    h.update(" ".join([_compiler()] + cu_flags).encode())
    out_dir = ROOT / "build" / "cuda_emu" / h.hexdigest()[:16]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    name = module_name(racecheck)
    target = out_dir / f"{name}{suffix}"
    if target.exists():
        return target
    gen = out_dir / "src"
    gen.mkdir(parents=True, exist_ok=True)
    units = []
    for p in cpu:
        text = p.read_text()
        if p.name == "module.cpp":
            # (one line: the .cpp's line numbers stay the real file's)
            head = "PYBIND11_MODULE(_C, m) {"
            if head not in text:
                raise RuntimeError("cuda_emu: python/module.cpp no longer opens with " + head)
            text = text.replace(head, "void mptk_emu_bind_selftest(pybind11::module_&); "
                                      f"PYBIND11_MODULE({name}, m) {{ mptk_emu_bind_selftest(m);")
            q = gen / "module.cpp"
            q.write_text(f'#line 1 "{p}"\n' + text)
            units.append((q, flags))
        else:
            units.append((p, flags))
    for p in cu:
        q = gen / (p.stem + "_cu.cpp")
        q.write_text('#include "cuda_emu.h"\n' + f'#line 1 "{p}"\n' + transform_cu(p.read_text()))
        units.append((q, cu_flags))
    units.append((HERE / "cuda_emu.cpp", emu_flags))

    header_hash = hashlib.sha256(b"".join(p.read_bytes() for p in deps)).hexdigest()
    obj_dir = ROOT / "build" / "cuda_emu" / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)

    def compile_one(unit) -> Path:
        # objects cached by unit text + every header + flags: a one-file edit recompiles one file
        src, flags = unit
        key = hashlib.sha256(src.read_bytes() + header_hash.encode() + " ".join(flags).encode()).hexdigest()[:20]
        obj = obj_dir / f"{src.stem}-{key}.o"
        if obj.exists():
            return obj
        cmd = [_compiler(), *flags, "-c", str(src), "-o", str(obj)]
        cmd[-1] = str(obj) + ".tmp"
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cuda_emu: compiling {src} failed:\n{r.stderr[-6000:]}")
        os.replace(str(obj) + ".tmp", obj)
        if verbose:
            print("compiled", src, file=sys.stderr)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objs = list(pool.map(compile_one, units))
    tmp = target.with_suffix(".tmp")
    link = [f for f in flags if f.startswith("-fsanitize=")]
    r = subprocess.run([_compiler(), "-shared", "-fopenmp", *link, *map(str, objs), "-o", str(tmp)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cuda_emu: linking failed:\n{r.stderr[-6000:]}")
    os.replace(tmp, target)
    return target


def load(verbose: bool = False, racecheck: bool | None = None):
    """The ``_C_emu`` module, or ``_C_emu_race`` (built first when needed); ``racecheck`` as for ``build``."""
    if racecheck is None:
        racecheck = racecheck_requested()
    path = build(verbose, racecheck)
    spec = importlib.util.spec_from_file_location(module_name(racecheck), path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    print(build(verbose=True, racecheck="--racecheck" in sys.argv[1:] or None))
