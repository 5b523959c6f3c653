"""The README's examples, run as a user would copy them, and DESIGN.md section 3's public API.

Every ```python block of README.md is executed (``exec`` of the block's own text, in a fresh
namespace, from a fresh temporary working directory, compiled with README.md's file name and line
numbers so a traceback points at the README line) and every command line of its ```bash blocks is
either run (a subprocess, from the directory the README implies) or skipped here with the reason.
``test_every_readme_example_is_covered`` fails when the README gains, loses or changes an example this
file does not know, so a new example cannot go untested.

What a block may get that is not written in it, and nothing else:

* **Substitutions** (exact strings, each must occur in the block, so a README edit that removes one
  fails loudly instead of running something else): only what a CPU-only machine with no downloaded
  checkpoint must change. ``device="cuda"`` -> ``device="cpu"``; ``"path/to/mpt-7b"`` -> a tiny MPT
  saved with ``save_pretrained`` in a temporary folder (its max_seq_len is 64, so "goes past
  max_seq_len" is exercised by the 200 new tokens); ``DIR`` of the generate CLI -> such a folder with
  a ``tokenizer.json`` (a small byte-level BPE with ChatML's tokens); ``gpt-neox-20b/tokenizer.json`` ->
  the shared GPT-NeoX-20B tokenizer (../shared/tokenizers; the test skips without it); the command
  ``python`` -> this test's interpreter, with OMP_NUM_THREADS=1 (the README's advice for a shared
  machine). Commands that only parse arguments and print run in this process through ``runpy``.
* **Inputs**: data the block's prose and comments describe but leave to the reader (``q``, ``x``,
  ``model``, ``logits`` ...), made to the shapes the comments state. They must be exactly the block's
  free names (read before the block binds them) and never modules: a block that uses ``torch`` or
  ``mk`` must import it itself.

The commands that take minutes (training, the full test suite, benchmarks that rewrite
benchmarks/results/), install packages, or need 8 GPUs are skipped with that reason; where a cheap
check of the same command line exists it runs instead (``--print-config`` for a training command line,
``--help`` listing every flag of a benchmark command, ``pyproject.toml`` declaring an installed extra).

Runtime: ~60 s on 2 cores, two ONNX exports (~12 s each) being most of it.
"""
from __future__ import annotations

import ast
import builtins
import configparser
import dataclasses
import inspect
import json
import math
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path
from typing import Callable

import pytest
import torch

import mpt_kernels as mk
from _subproc import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NEOX_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
CLI_TIMEOUT = 180

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors; the CI box has 2 shared cores


# ----------------------------------------------------------------------------------------------
# Reading the README


@dataclasses.dataclass
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    code: str


def readme_blocks(lang: str) -> list[Block]:
    text = README.read_text()
    blocks = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) == lang:
            blocks.append(Block(lang, text[: m.start()].count("\n") + 1, m.group(2)))
    return blocks


def python_block(marker: str) -> Block:
    found = [b for b in readme_blocks("python") if marker in b.code]
    assert len(found) == 1, f"README.md: expected one ```python block containing {marker!r}, found {len(found)}"
    return found[0]


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks, comments dropped, as written (quotes kept)."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.code.splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(_strip_comment(line))
    return commands


def _strip_comment(line: str) -> str:
    # shlex knows where a comment starts outside quotes; cut the raw line there so quotes stay as written
    lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    end = 0
    for _ in lexer:
        end = lexer.instream.tell()
    return line[:end].strip()


# ----------------------------------------------------------------------------------------------
# Running a python block


def free_names(code: str) -> set[str]:
    """Names the code reads before binding them (top-level statements in order; loads of a statement
    before its stores), builtins excluded."""
    bound: set[str] = set()
    free: set[str] = set()
    for stmt in ast.parse(code).body:
        loads, stores = set(), set()
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name):
                (loads if isinstance(node.ctx, ast.Load) else stores).add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    stores.add((alias.asname or alias.name).split(".")[0])
        free |= loads - bound
        bound |= stores
    return {n for n in free if not hasattr(builtins, n)}


def run_python_block(block: Block, cwd: Path, substitutions=(), inputs=None) -> dict:
    code = block.code
    for old, new in substitutions:
        assert old in code, f"README.md:{block.line}: the documented substitution target {old!r} is gone"
        code = code.replace(old, new)
    inputs = dict(inputs or {})
    assert not [n for n, v in inputs.items() if isinstance(v, types.ModuleType)], "inputs must not be modules"
    assert set(inputs) == free_names(code), (
        f"README.md:{block.line}: the block reads {sorted(free_names(code))} without defining them; the test "
        f"provides {sorted(inputs)} (a module must be imported by the block itself)")
    ns = {"__name__": "__readme__", "__builtins__": builtins, **inputs}
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile("\n" * block.line + code, str(README), "exec"), ns)
    finally:
        os.chdir(old_cwd)
    return ns


# ----------------------------------------------------------------------------------------------
# Fixtures: tiny checkpoints


def tiny_config(**overrides):
    from mpt_kernels.model import MPTConfig

    kw = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=512)
    kw.update(overrides)
    return MPTConfig.from_preset("tiny", **kw)


def tiny_model(**overrides):
    from mpt_kernels.model import MPTForCausalLM

    torch.manual_seed(1234)
    return MPTForCausalLM(tiny_config(**overrides)).eval()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """Stands for "path/to/mpt-7b": a tiny MPT with vocab >= 101 (the example's ids go up to 100)."""
    path = tmp_path_factory.mktemp("mpt-7b")
    tiny_model().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """Stands for the generate CLI's DIR: a tiny MPT and a byte-level BPE (trained with
    mpt_kernels.data on this README) with ChatML's <|im_start|> / <|im_end|> tokens."""
    pytest.importorskip("tokenizers")
    from mpt_kernels.data.tokenizer import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("DIR")
    tok = train_bpe_tokenizer(README.read_text().split("\n\n"), vocab_size=400)
    tok.backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.backend.save(str(path / "tokenizer.json"))
    assert tok.backend.get_vocab_size() <= 512
    tiny_model().save_pretrained(path)
    return path


def run_cli(argv: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``python ...`` as a subprocess with this interpreter. OMP_NUM_THREADS=1 as the README advises for a
    shared machine: with spinning OpenMP threads a 2-core CI box decodes ~25x slower."""
    assert argv[0] == "python", argv
    r = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=subprocess_env(OMP_NUM_THREADS="1"), input=stdin,
                       capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert r.returncode == 0, f"{shlex.join(argv)} exited with {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def run_cli_in_process(argv: list[str], cwd: Path, capsys) -> str:
    """``python -m pkg ...`` / ``python script.py ...`` through runpy in this process (for commands that only
    parse arguments and print: a subprocess would spend seconds importing torch). Returns stdout."""
    import runpy

    assert argv[0] == "python", argv
    old_argv, old_cwd, old_path = sys.argv, os.getcwd(), list(sys.path)
    capsys.readouterr()
    try:
        os.chdir(cwd)
        if argv[1] == "-m":
            sys.argv = [argv[2], *argv[3:]]
            sys.path.insert(0, str(cwd))  # python -m puts the working directory first
            run = lambda: runpy.run_module(argv[2], run_name="__main__", alter_sys=True)  # noqa: E731
        else:
            sys.argv = argv[1:]
            run = lambda: runpy.run_path(argv[1], run_name="__main__")  # noqa: E731
        try:
            run()
            code = 0
        except SystemExit as exc:
            code = exc.code
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
        os.chdir(old_cwd)
    out, err = capsys.readouterr()
    assert code in (0, None), f"{shlex.join(argv)} exited with {code}\n{out}\n{err}"
    return out


# ----------------------------------------------------------------------------------------------
# The ```python blocks


def test_readme_intro_example(tmp_path):
    ns = run_python_block(python_block("out = mk.alibi_attention(q, k, v, causal=True)"), tmp_path)
    q, k, v, out = ns["q"], ns["k"], ns["v"], ns["out"]
    assert out.shape == q.shape == (2, 1024, 12, 64) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    # a slice against the dense key-position ALiBi definition (DESIGN.md section 3), float64
    ref = dense_alibi_attention(q[:1, -64:].double(), k[:1].double(), v[:1].double(), causal=True)
    torch.testing.assert_close(out[:1, -64:].double(), ref, atol=2e-2, rtol=2e-2)
    x, y = ns["x"], ns["y"]
    assert y.shape == x.shape == (4096, 768) and y.dtype == torch.bfloat16
    yf = y.float()
    assert yf.mean(-1).abs().max() < 0.05 and (yf.std(-1, unbiased=False) - 1).abs().max() < 0.05


def test_readme_model_example(tmp_path, checkpoint_dir):
    block = python_block('MPTForCausalLM.from_pretrained("path/to/mpt-7b"')
    ns = run_python_block(block, tmp_path, substitutions=[
        ('"path/to/mpt-7b"', repr(str(checkpoint_dir))),  # a local tiny checkpoint (no download here)
        ('device="cuda"', 'device="cpu"'),                 # CPU-only machine
    ])
    ids, out, loss = ns["ids"], ns["out"], ns["loss"]
    cfg = tiny_config()
    assert out.dtype == torch.int64 and out.shape == (1, 3 + 200)
    assert out.shape[1] > cfg.max_seq_len and torch.equal(out[:, :3], ids)
    assert 0 <= int(out.min()) and int(out.max()) < cfg.vocab_size
    # greedy: the same call again gives the same tokens
    loaded = type(ns["model"]).from_pretrained(checkpoint_dir, dtype=torch.bfloat16, device="cpu")
    assert torch.equal(loaded.generate(ids, max_new_tokens=200, temperature=0), out)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    assert 0.5 * math.log(cfg.vocab_size) < loss.item() < 3 * math.log(cfg.vocab_size)  # a random model
    # the last two lines: a fresh tiny-preset model saved to out/, which transformers' MptForCausalLM loads
    model = ns["model"]
    assert model.config.d_model == 256 and model.config.n_layers == 4  # MPTConfig.from_preset("tiny")
    saved = tmp_path / "out"
    assert (saved / "config.json").exists() and list(saved.glob("*.safetensors"))
    transformers = pytest.importorskip("transformers")
    hf = transformers.MptForCausalLM.from_pretrained(saved).eval()
    probe = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(probe).logits, model.eval()(probe).logits, atol=1e-4, rtol=1e-4)


def test_readme_alibi_attention_example(tmp_path):
    B, Sq, Sk, H, Hkv, D = 2, 5, 9, 8, 2, 32
    lens = [5, 11, 3]
    total = sum(lens)
    inputs = {
        "q": torch.randn(B, Sq, H, D), "k": torch.randn(B, Sk, Hkv, D), "v": torch.randn(B, Sk, Hkv, D),
        "slopes": torch.rand(B, H) / 4,                                   # (B, H) float32
        "qp": torch.randn(total, H, D), "kp": torch.randn(total, Hkv, D), "vp": torch.randn(total, Hkv, D),
        "cu": torch.tensor([0, 5, 16, 19], dtype=torch.int32), "m": max(lens),
        "qkv": torch.randn(B, Sq, (H + 2 * Hkv) * D), "n_heads": H, "kv_heads": Hkv,
    }
    block = python_block("mk.alibi_attention_qkvpacked(")
    # the whole block, then its prefixes (each line overwrites `out`), each against the dense definition
    ns = run_python_block(block, tmp_path, inputs=inputs)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    d = lambda t: t.double()  # noqa: E731
    lines = _statements(block.code)
    assert len(lines) == 5 and lines[0].startswith("import") and "mk.alibi_attention(q, k, v)" in lines[1]
    ns0 = run_python_block(Block("python", block.line, "\n".join(lines[:2])), tmp_path,
                           inputs={n: inputs[n] for n in ("q", "k", "v")})
    assert ns0["out"].shape == q.shape
    torch.testing.assert_close(d(ns0["out"]), dense_alibi_attention(d(q), d(k), d(v), causal=True),
                               atol=1e-5, rtol=1e-5)
    ns1 = run_python_block(Block("python", block.line, "\n".join(lines[:3])), tmp_path,
                           inputs={n: inputs[n] for n in ("q", "k", "v", "slopes")})
    torch.testing.assert_close(d(ns1["out"]), dense_alibi_attention(d(q), d(k), d(v), causal=False,
                                                                   slopes=d(inputs["slopes"])), atol=1e-5, rtol=1e-5)
    ns2 = run_python_block(Block("python", block.line, "\n".join(lines[:4])), tmp_path,
                           inputs={n: inputs[n] for n in ("q", "k", "v", "slopes", "qp", "kp", "vp", "cu", "m")})
    qp, kp, vp, cu = inputs["qp"], inputs["kp"], inputs["vp"], inputs["cu"]
    assert ns2["out"].shape == qp.shape
    for b in range(len(lens)):
        s, e = int(cu[b]), int(cu[b + 1])
        ref = dense_alibi_attention(d(qp[None, s:e]), d(kp[None, s:e]), d(vp[None, s:e]), causal=True)[0]
        torch.testing.assert_close(d(ns2["out"][s:e]), ref, atol=1e-5, rtol=1e-5)
    out = ns["out"]  # the qkvpacked line: q, k, v as (H, Hkv, Hkv) heads of the last dim
    qkv = inputs["qkv"].view(B, Sq, H + 2 * Hkv, D)
    ref = dense_alibi_attention(d(qkv[:, :, :H]), d(qkv[:, :, H:H + Hkv]), d(qkv[:, :, H + Hkv:]), causal=True)
    assert out.shape == (B, Sq, H, D)
    torch.testing.assert_close(d(out), ref, atol=1e-5, rtol=1e-5)


def test_readme_layer_norm_example(tmp_path):
    N, d_model = 6, 48
    inputs = {
        "x": torch.randn(N, d_model, dtype=torch.bfloat16), "weight": torch.rand(d_model, dtype=torch.bfloat16) + 0.5,
        "r": torch.randn(N, d_model, dtype=torch.bfloat16),
        "x_bf16": torch.randn(N, d_model, dtype=torch.bfloat16), "w_f32": torch.rand(d_model) + 0.5,
        "r_f32": torch.randn(N, d_model), "x_f32": torch.randn(N, d_model), "d_model": d_model,
    }
    block = python_block("mk.nn.LPLayerNorm(d_model)")
    lines = _statements(block.code)
    ref = lambda h, w: torch.nn.functional.layer_norm(h.float(), (d_model,), w.float(), None, 1e-5)  # noqa: E731
    results = []
    for n in range(2, len(lines) + 1):  # each statement overwrites y (and h): run the prefixes
        ns = run_python_block(Block("python", block.line, "\n".join(lines[:n])), tmp_path,
                              inputs={k: v for k, v in inputs.items() if k in free_names("\n".join(lines[:n]))})
        results.append(ns)
    x, w, r = inputs["x"], inputs["weight"], inputs["r"]
    y = results[0]["y"]
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    torch.testing.assert_close(y.float(), ref(x, w), atol=3e-2, rtol=2e-2)
    y, h = results[1]["y"], results[1]["h"]
    assert h.dtype == torch.bfloat16 and torch.equal(h, (x.float() + r.float()).bfloat16())
    torch.testing.assert_close(y.float(), ref(h, w), atol=3e-2, rtol=2e-2)
    y, h = results[2]["y"], results[2]["h"]  # mixed: h float32, y bf16
    assert h.dtype == torch.float32 and y.dtype == torch.bfloat16
    torch.testing.assert_close(h, inputs["x_bf16"].float() + inputs["r_f32"])
    torch.testing.assert_close(y.float(), ref(h, inputs["w_f32"]), atol=3e-2, rtol=2e-2)
    y = results[3]["y"]  # float32 in, bf16 out
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref(inputs["x_f32"], inputs["w_f32"]), atol=3e-2, rtol=2e-2)
    norm = results[4]["norm"]
    assert isinstance(norm, mk.nn.LPLayerNorm) and isinstance(norm, torch.nn.Module)
    assert norm.weight.shape == (d_model,) and norm.bias is None  # bias=False by default, as MPT
    assert mk.nn.LPLayerNorm(d_model, bias=True).bias.shape == (d_model,)


def test_readme_cross_entropy_example(tmp_path):
    N, V = 10, 37
    targets = torch.randint(0, V, (N,))
    targets[[2, 7]] = -100
    logits = torch.randn(N, V, requires_grad=True)
    ns = run_python_block(python_block("cross_entropy(logits, targets"), tmp_path,
                          inputs={"logits": logits, "targets": targets})
    loss = ns["loss"]
    expected = torch.nn.functional.cross_entropy(logits.detach(), targets, ignore_index=-100)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert logits.grad.shape == (N, V) and (logits.grad[[2, 7]] == 0).all()


def test_readme_lion_example(tmp_path):
    model = tiny_model()
    model.train()
    ids = torch.randint(0, 512, (2, 16))
    model(ids, labels=ids).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ns = run_python_block(python_block("mk.optim.Lion(model.parameters()"), tmp_path, inputs={"model": model})
    opt = ns["opt"]
    assert isinstance(opt, torch.optim.Optimizer) and opt.skipped_steps == 0
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every parameter had a gradient and moved
    # a Lion step moves each weight by lr (sign of the update) plus the decoupled decay weight_decay * |w|
    for n, p in model.named_parameters():
        bound = 1e-4 + 1e-5 * before[n].abs() + 1e-6 * (1 + before[n].abs())  # + float32 rounding
        assert ((p - before[n]).abs() <= bound).all(), n
    # the non-finite case of the comment: the step is skipped and counted
    next(model.parameters()).grad[0] = float("nan")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters())


def test_readme_export_python_example(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = tiny_model()
    ns = run_python_block(python_block("export_fastertransformer(model"), tmp_path, inputs={"model": model})
    ft = tmp_path / "ft" / "2-gpu"
    ini = configparser.ConfigParser()
    ini.read(ft / "config.ini")
    assert ini.sections() and any(ini.has_option(s, "tensor_para_size") for s in ini.sections())
    assert list(ft.glob("model.*.bin")) and list(ft.glob("*.1.bin"))  # rank-1 shards of the 2-way split
    model2 = ns["model2"]
    probe = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model2(probe).logits, model(probe).logits, atol=2e-2, rtol=2e-2)  # fp16 weights
    assert (tmp_path / "onnx" / "model.onnx").exists()
    from mpt_kernels.export.onnx import OnnxMPT  # the README's prose: runs the exported folder

    # "Both exports refuse to replace an earlier export unless overwrite=True"
    from mpt_kernels.export import export_fastertransformer, export_onnx

    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_fastertransformer(model, tmp_path / "ft", tensor_parallel=2, dtype="fp16")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_onnx(model, tmp_path / "onnx")
    assert export_fastertransformer(model, tmp_path / "ft", tensor_parallel=2, dtype="fp16", overwrite=True).exists()
    runner = OnnxMPT(tmp_path / "onnx")
    got = runner.greedy(probe.numpy(), 5)
    with torch.no_grad():
        expected = model.generate(probe, 5, temperature=0)
    assert torch.equal(torch.as_tensor(got), expected)


def test_readme_prose_generation_calls():
    """The calls the Model section's prose spells out inline: temperature 0 or None is greedy, and
    multi-turn generation through one cache (the next call passes out plus the next turn) gives the
    tokens of a fresh prefill."""
    model = tiny_model()
    ids = torch.tensor([[5, 6, 7]])
    n = 4
    assert torch.equal(model.generate(ids, n, temperature=0), model.generate(ids, n, temperature=None))
    cache = model.new_cache(1)
    out = model.generate(ids, n, past_key_values=cache, temperature=0)
    turn2 = torch.cat([out, torch.tensor([[9, 10]])], dim=1)
    out2 = model.generate(turn2, n, past_key_values=cache, temperature=0)
    assert torch.equal(out2, model.generate(turn2, n, temperature=0)) and out2.shape == (1, 3 + n + 2 + n)


def _statements(code: str) -> list[str]:
    """The block's top-level statements as source text (a statement's continuation lines kept)."""
    lines = code.splitlines()
    return ["\n".join(lines[s.lineno - 1:s.end_lineno]) for s in ast.parse(code).body]


def dense_alibi_attention(q, k, v, causal=True, slopes=None):
    """DESIGN.md section 3, written out: scores + (-slope * (seqlen_k - 1 - j)), causal rows aligned to
    the bottom right, GQA by repeating KV heads. q (B, Sq, H, D), k/v (B, Sk, Hkv, D)."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if slopes is None:
        slopes = mk.alibi_slopes(H).to(q.dtype)
    slopes = slopes.expand(B, H) if slopes.dim() == 1 else slopes
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    j = torch.arange(Sk, dtype=q.dtype)
    scores = scores - slopes[:, :, None, None] * (Sk - 1 - j)
    if causal:
        i = torch.arange(Sq)[:, None] + (Sk - Sq)
        scores = scores.masked_fill(torch.arange(Sk)[None, :] > i, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


# ----------------------------------------------------------------------------------------------
# The ```bash command lines

SKIPS = {}  # command -> reason
RUNS: dict[str, Callable] = {}  # command -> check(argv, tmp_path, request)


def skip(command: str, reason: str):
    SKIPS[command] = reason


def runs(command: str):
    def register(fn):
        RUNS[command] = fn
        return fn
    return register


skip("pip install torch==2.13.0 . && python training/train.py",
     "installs the package (network, a rebuild) and trains for minutes; pyproject is checked below and the "
     "training command line by the --print-config runs")
skip('pip install torch==2.13.0 ".[test]" && pytest -q tests',
     "installs (network) and runs the whole suite; the [test] extra is checked in test_readme_pip_extras")
skip('pip install ".[export]"', "installs (network); the [export] extra is checked in test_readme_pip_extras")
skip("torchrun --nproc_per_node=8 training/train.py --config training/configs/mpt-1b.yaml parallel=fsdp",
     "8 GPUs and an mpt-1b; its config is resolved by test_readme_torchrun_config")
skip("python -m venv .venv && . .venv/bin/activate", "creates a virtual environment (setup, not an example)")
skip("pip install torch==2.13.0 numpy pybind11 cmake ninja pytest safetensors tokenizers tqdm pyyaml",
     "installs packages (network)")
skip("MPT_KERNELS_CUDA=0 python setup.py build_ext --inplace",
     "rebuilds the extension in place (minutes, and other processes import that build)")
skip("python -m pytest -q tests", "the whole suite (many minutes)")
skip("bash tests/run_sanitized.sh", "~10 min sanitizer build and run")
skip("python -m pytest -q tests/test_cuda_emulated.py", "~4 min on the host emulator")


@runs('python -m mpt_kernels.generate --model DIR --prompt "Once upon a time" --max-new-tokens 100')
def _generate_prompt(argv, tmp_path, request):
    from tokenizers import Tokenizer

    from mpt_kernels.model import MPTForCausalLM

    model_dir = request.getfixturevalue("chat_model_dir")
    r = run_cli([str(model_dir) if a == "DIR" else a for a in argv], tmp_path)
    prompt = "Once upon a time"
    assert r.stdout.startswith(prompt)
    n = int(re.search(r"\[(\d+) tokens in [\d.]+ s", r.stderr).group(1))
    # the same sampling in-process (the CLI's defaults: temperature 0.8, seed 0, float32 on the CPU)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = MPTForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device="cpu")
    ids = torch.tensor([tok.encode(prompt).ids])
    out = model.generate(ids, 100, temperature=0.8, eos_token_id=tok.token_to_id("<|endoftext|>"),
                         generator=torch.Generator().manual_seed(0))
    new = out[0, ids.shape[1]:].tolist()
    assert n == len(new) and 1 <= n <= 100
    assert r.stdout[len(prompt):].rstrip("\n") == tok.decode(ids[0].tolist() + new)[len(tok.decode(ids[0].tolist())):]


@runs('python -m mpt_kernels.generate --model DIR --chat --system "You are helpful."')
def _generate_chat(argv, tmp_path, request):
    model_dir = request.getfixturevalue("chat_model_dir")
    argv = [str(model_dir) if a == "DIR" else a for a in argv]
    r = run_cli(argv, tmp_path, stdin="Hello, who are you?\nAnd what can you do?\n")
    turns = re.findall(r"\[turn (\d+): prefilled (\d+) of (\d+) tokens; (\d+) tokens in", r.stderr)
    assert [t[0] for t in turns] == ["1", "2"], r.stderr
    (_, pre1, len1, _), (_, pre2, len2, _) = turns
    assert pre1 == len1  # the first turn prefills the system message and the user's
    assert int(len2) > int(len1) and int(pre2) < int(len2)  # the second only its own tokens: one KV cache


@runs("python -m benchmarks model --device cpu --quick")
@runs("python -m benchmarks layernorm --device cpu")
def _benchmark_help(argv, tmp_path, request):
    """~1.5 min (model --quick) and ~1 min (layernorm), and both rewrite the committed
    benchmarks/results/: run `<command> --help` from the repository root instead and check that every
    flag the README uses is one of the benchmark's options."""
    out = run_cli_in_process(argv + ["--help"], ROOT, request.getfixturevalue("capsys"))
    assert f"options of {argv[3]}:" in out  # the benchmark exists and printed its own options
    for flag in [a for a in argv if a.startswith("--")]:
        assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", out), f"{flag} is not an option:\n{out}"


@runs("python training/train.py")
@runs("python training/train.py --config training/configs/tiny.yaml max_steps=100 optim.lr=5e-4")
def _train_print_config(argv, tmp_path, request):
    """Training takes minutes: resolve the same command line with --print-config (from the repository
    root, where the README's relative paths point) and check the YAML and the dotted overrides landed."""
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load(run_cli_in_process(argv + ["--print-config"], ROOT, request.getfixturevalue("capsys")))
    assert cfg["model"]["preset"] == "tiny" and cfg["data"]["kind"] == "bundled"  # the bundled corpus
    if "max_steps=100" in argv:
        assert cfg["max_steps"] == 100 and cfg["optim"]["lr"] == pytest.approx(5e-4)
    else:
        tiny = yaml.safe_load((ROOT / "training" / "configs" / "tiny.yaml").read_text())
        assert cfg["max_steps"] == tiny["max_steps"]


@runs("python -m mpt_kernels.data.convert my.jsonl src/ --out data/mine --tokenizer gpt-neox-20b/tokenizer.json "
      "--seq-len 2048")
def _convert(argv, tmp_path, request):
    if not NEOX_TOKENIZER.exists():
        pytest.skip(f"the GPT-NeoX-20B tokenizer is not at {NEOX_TOKENIZER}")
    argv = [str(NEOX_TOKENIZER) if a == "gpt-neox-20b/tokenizer.json" else a for a in argv]
    # my.jsonl and src/: enough text for one 2048-token sample
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum".split()
    g = torch.Generator().manual_seed(0)
    with open(tmp_path / "my.jsonl", "w") as f:
        for _ in range(40):
            f.write(json.dumps({"text": " ".join(words[int(i)] for i in torch.randint(0, len(words), (60,), generator=g))}) + "\n")
    (tmp_path / "src").mkdir()
    for i in range(3):
        (tmp_path / "src" / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 40)
    run_cli(argv, tmp_path)
    index = json.loads((tmp_path / "data" / "mine" / "train" / "index.json").read_text())
    assert index["seq_len"] == 2048 and index["num_samples"] >= 1 and index["num_documents"] == 43
    assert index["vocab_size"] == 50277 and index["dtype"] == "uint16"
    shard = tmp_path / "data" / "mine" / "train" / index["shards"][0]["file"]
    assert shard.stat().st_size == index["shards"][0]["num_samples"] * 2048 * 2
    assert not (tmp_path / "data" / "mine" / "val").exists()  # only with --val-fraction


@runs("python -m mpt_kernels.export fastertransformer --model ckpt/ --out ft/ --tp 2 --dtype fp16 --verify")
def _export_ft_cli(argv, tmp_path, request):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    r = run_cli(argv, tmp_path)
    err = float(re.search(r"verify: max \|.*\| = ([\d.e+-]+)", r.stdout + r.stderr).group(1))
    assert err < 5e-2  # fp16 weights
    ini = configparser.ConfigParser()
    ini.read(tmp_path / "ft" / "2-gpu" / "config.ini")
    gpt = ini[ini.sections()[0]]
    assert gpt["tensor_para_size"] == "2" and gpt["weight_data_type"] == "fp16"
    assert list((tmp_path / "ft" / "2-gpu").glob("model.*.bin"))


@runs("python -m mpt_kernels.export onnx --model ckpt/ --out onnx/ --verify")
def _export_onnx_cli(argv, tmp_path, request):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    tiny_model().save_pretrained(tmp_path / "ckpt")
    r = run_cli(argv, tmp_path)
    err = float(re.search(r"verify: max \|.*\| = ([\d.e+-]+)", r.stdout + r.stderr).group(1))
    assert err < 1e-3
    assert (tmp_path / "onnx" / "model.onnx").stat().st_size > 0


def test_every_readme_example_is_covered():
    documented = readme_commands()
    known = set(SKIPS) | set(RUNS)
    assert not set(SKIPS) & set(RUNS)
    assert sorted(set(documented) - known) == [], "README commands this test neither runs nor skips"
    assert sorted(known - set(documented)) == [], "commands in this test that the README no longer has"
    tested = {
        "out = mk.alibi_attention(q, k, v, causal=True)", 'MPTForCausalLM.from_pretrained("path/to/mpt-7b"',
        "mk.alibi_attention_qkvpacked(", "mk.nn.LPLayerNorm(d_model)", "cross_entropy(logits, targets",
        "mk.optim.Lion(model.parameters()", "export_fastertransformer(model",
    }
    blocks = readme_blocks("python")
    for b in blocks:
        assert sum(m in b.code for m in tested) == 1, f"README.md:{b.line}: a ```python block no test runs"
    assert len(blocks) == len(tested)
    langs = set(re.findall(r"^```(\w+)", README.read_text(), re.M))
    assert langs <= {"python", "bash"}, f"README blocks in languages this test does not run: {langs}"


@pytest.mark.parametrize("command", sorted(set(SKIPS) | set(RUNS)),
                         ids=lambda c: re.sub(r"[^A-Za-z0-9_.=-]+", "_", c)[:80])
def test_readme_command(command, tmp_path, request):
    assert command in readme_commands(), f"not in README.md: {command}"
    if command in SKIPS:
        pytest.skip(SKIPS[command])
    RUNS[command](shlex.split(command), tmp_path, request)


def test_readme_names_resolve():
    """Every ``mk.x.y`` / ``mpt_kernels.x.y`` the README names exists, and every file it names or links."""
    import importlib

    text = README.read_text()
    names = set(re.findall(r"\b(?:mk|mpt_kernels)(?:\.[A-Za-z_]\w*)+", text))
    assert len(names) > 10
    for name in sorted(names):
        parts = name.replace("mk.", "mpt_kernels.", 1).split(".")
        obj = importlib.import_module(parts[0])
        for i, part in enumerate(parts[1:], 1):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                obj = importlib.import_module(".".join(parts[:i + 1]))  # a submodule (mpt_kernels.data.convert)
        assert obj is not None, name
    paths = set(re.findall(r"\]\(([^)#\s]+)\)", text))  # markdown links
    paths |= set(re.findall(r"`([\w./-]+/[\w.-]+\.(?:py|md|sh|cu|cpp|h|yaml))`", text))  # `dir/file.ext`
    assert len(paths) > 5
    missing = sorted(p for p in paths if not p.startswith("http") and not (ROOT / p).exists())
    assert not missing, f"README.md names files that do not exist: {missing}"


def test_readme_pip_extras():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    names = lambda reqs: {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}  # noqa: E731
    assert {"pytest"} <= names(extras["test"])
    assert {"onnx", "onnxscript", "onnxruntime"} <= names(extras["export"])  # "# onnx, onnxscript, onnxruntime"


def test_readme_torchrun_config(capsys):
    """The skipped torchrun line's config and override resolve (mpt-1b, FSDP)."""
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load(run_cli_in_process(["python", "training/train.py", "--config", "training/configs/mpt-1b.yaml",
                                             "parallel=fsdp", "--print-config"], ROOT, capsys))
    assert cfg["parallel"] == "fsdp" and cfg["model"]["preset"] == "mpt-1b"


# ----------------------------------------------------------------------------------------------
# DESIGN.md section 3: the public API contract


def _expected(stub: str) -> inspect.Signature:
    ns: dict = {}
    exec(f"def f{stub}: pass", ns)
    return inspect.signature(ns["f"])


def assert_signature_extends(fn, stub: str):
    """fn takes the contract's parameters, in order, with the same kinds and defaults; anything more it
    takes is optional (so every call written against the contract works)."""
    expected = list(_expected(stub).parameters.values())
    actual = list(inspect.signature(fn).parameters.values())
    if actual and actual[0].name in ("self", "cls"):
        actual = actual[1:]
    names = [p.name for p in actual]
    for p in expected:
        assert p.name in names, f"{fn.__qualname__}: no parameter {p.name!r}"
        a = actual[names.index(p.name)]
        assert a.kind == p.kind, f"{fn.__qualname__}({p.name}): {a.kind} instead of {p.kind}"
        assert a.default == p.default, f"{fn.__qualname__}({p.name}): default {a.default!r}, contract {p.default!r}"
    positional = [p.name for p in actual if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert positional[:len([p for p in expected if p.kind == p.POSITIONAL_OR_KEYWORD])] == \
        [p.name for p in expected if p.kind == p.POSITIONAL_OR_KEYWORD], f"{fn.__qualname__}: positional order"
    for a in actual:
        if a.name not in {p.name for p in expected}:
            assert a.default is not a.empty or a.kind in (a.VAR_POSITIONAL, a.VAR_KEYWORD), \
                f"{fn.__qualname__}: extra parameter {a.name!r} must be optional"


def test_design_api_alibi_slopes():
    assert_signature_extends(mk.alibi_slopes, "(n_heads, alibi_bias_max=8.0)")
    for H, bias_max in [(8, 8.0), (12, 8.0), (6, 4.0)]:
        s = mk.alibi_slopes(H, bias_max)
        assert isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.shape == (H,)
        H2 = 2 ** math.ceil(math.log2(H))
        full = torch.tensor([1 / 2 ** (i * bias_max / H2) for i in range(1, H2 + 1)], dtype=torch.float32)
        expected = full if H2 == H else torch.cat([full[1::2], full[::2]])[:H]
        torch.testing.assert_close(s, expected)
    torch.testing.assert_close(mk.alibi_slopes(4), mk.alibi_slopes(4, alibi_bias_max=8.0))


def test_design_api_alibi_attention():
    assert_signature_extends(mk.alibi_attention, "(q, k, v, *, causal=True, softmax_scale=None, alibi_slopes=None, "
                             "alibi_bias_max=8.0, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, "
                             "max_seqlen_k=None)")
    q, k, v = torch.randn(2, 3, 6, 16), torch.randn(2, 7, 2, 16), torch.randn(2, 7, 2, 16)  # GQA, Sq < Sk
    for causal in (True, False):
        out = mk.alibi_attention(q, k, v, causal=causal)
        assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.dtype == q.dtype
        torch.testing.assert_close(out.double(), dense_alibi_attention(q.double(), k.double(), v.double(), causal),
                                   atol=1e-5, rtol=1e-5)
    # MQA, decode (seqlen_q = 1), alibi_bias_max and softmax_scale as keywords
    q1, k1, v1 = torch.randn(1, 1, 4, 16), torch.randn(1, 9, 1, 16), torch.randn(1, 9, 1, 16)
    out = mk.alibi_attention(q1, k1, v1, alibi_bias_max=4.0, softmax_scale=0.25)
    ref = dense_alibi_attention(q1.double() * (0.25 * 4), k1.double(), v1.double(), True,
                                slopes=mk.alibi_slopes(4, 4.0).double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_design_api_layer_norm():
    assert_signature_extends(mk.layer_norm, "(x, weight, bias=None, eps=1e-5, residual=None)")
    x, r = torch.randn(3, 5, 32, dtype=torch.bfloat16), torch.randn(3, 5, 32, dtype=torch.bfloat16)
    w, b = torch.randn(32, dtype=torch.bfloat16), torch.randn(32, dtype=torch.bfloat16)
    y = mk.layer_norm(x, w, b, 1e-5)
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype and y.shape == x.shape
    ref = torch.nn.functional.layer_norm(x.float(), (32,), w.float(), b.float(), 1e-5)
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=2e-2)
    pair = mk.layer_norm(x, w, residual=r)
    assert isinstance(pair, tuple) and len(pair) == 2
    y, h = pair
    torch.testing.assert_close(h.float(), (x.float() + r.float()), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(y, mk.layer_norm(h, w))


def test_design_api_lion_and_cuda_available():
    assert_signature_extends(mk.optim.Lion, "(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, "
                                            "decoupled_weight_decay=True)")
    p = torch.nn.Parameter(torch.randn(10))
    opt = mk.optim.Lion([p])
    assert isinstance(opt, torch.optim.Optimizer)
    g = opt.param_groups[0]
    assert (g["lr"], tuple(g["betas"]), g["weight_decay"]) == (1e-4, (0.9, 0.99), 0.0)
    assert_signature_extends(mk.cuda_available, "()")
    assert isinstance(mk.cuda_available(), bool)
    if not torch.cuda.is_available():
        assert mk.cuda_available() is False


def test_design_api_model_and_export_names():
    from mpt_kernels.export import export_fastertransformer, export_onnx
    from mpt_kernels.model import MPTConfig, MPTForCausalLM

    assert callable(export_fastertransformer) and callable(export_onnx)
    assert isinstance(MPTForCausalLM(tiny_config()), torch.nn.Module)
    # "HF MPT config names and weight names"
    cfg = tiny_config()
    for field in ("d_model", "n_heads", "n_layers", "expansion_ratio", "max_seq_len", "vocab_size", "attn_config",
                  "no_bias", "emb_pdrop", "resid_pdrop", "norm_type", "learned_pos_emb", "logit_scale"):
        assert hasattr(cfg, field), field
    for key in ("alibi", "alibi_bias_max", "attn_impl", "clip_qkv", "qk_ln", "softmax_scale", "attn_pdrop"):
        assert key in cfg.attn_config, key
    names = set(MPTForCausalLM(cfg).state_dict())
    assert {"transformer.wte.weight", "transformer.norm_f.weight", "transformer.blocks.0.norm_1.weight",
            "transformer.blocks.0.attn.Wqkv.weight", "transformer.blocks.0.attn.out_proj.weight",
            "transformer.blocks.0.norm_2.weight", "transformer.blocks.0.ffn.up_proj.weight",
            "transformer.blocks.0.ffn.down_proj.weight"} <= names
    assert MPTConfig.from_dict(cfg.to_dict()).d_model == cfg.d_model
