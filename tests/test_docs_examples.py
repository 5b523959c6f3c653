"""The examples of README.md, docs/training.md and docs/export.md, run as a user would copy them, the
docs' other checkable statements, and DESIGN.md section 3's public API.

Every ```python block of these docs is executed (``exec`` of the block's own text, in a fresh
namespace, from a fresh temporary working directory, compiled with the doc's file name and line
numbers so a traceback points at the doc's line) and every command line of their ```bash blocks (a
line ending in a backslash continued on the next) is either run (from the directory the doc implies) or
skipped here with the reason; a command written alike in two docs is one entry, run once.
Unlabelled blocks (file layouts) are held to what the code writes. ``test_every_doc_example_is_covered``
fails when a doc gains, loses or changes an example this file does not know, so a new example cannot
go untested.

What a block may get that is not written in it, and nothing else:

* **Substitutions** (exact strings, each must occur in the block, so a doc edit that removes one
  fails loudly instead of running something else): only what a CPU-only machine with no downloaded
  checkpoint must change. ``device="cuda"`` -> ``device="cpu"``; ``"path/to/mpt-7b"`` -> a tiny MPT
  saved with ``save_pretrained`` in a temporary folder (its max_seq_len is 64, so "goes past
  max_seq_len" is exercised by the 200 new tokens); ``DIR`` of the generate CLI -> such a folder with
  a ``tokenizer.json`` (a small byte-level BPE with ChatML's tokens); ``gpt-neox-20b/tokenizer.json``
  and ``/path/to/gpt-neox-20b/tokenizer.json`` -> the shared GPT-NeoX-20B tokenizer
  (../shared/tokenizers; the test skips without it); the ``...`` of ``train.py --print-config ...``
  (the other arguments) -> none; the command ``python`` -> this test's interpreter, with
  OMP_NUM_THREADS=1 (the README's advice for a shared machine). Commands that only parse arguments and
  print, the converter, and where a CLI already runs as a subprocess (generate --prompt, export
  fastertransformer; train.py in tests/test_training.py) its other lines (generate --chat, export onnx,
  the shrunk main job and finetune), run in this process through ``runpy``, one thread: a subprocess
  spends seconds importing torch.
* **Inputs**: data the block's prose and comments describe but leave to the reader (``q``, ``x``,
  ``model``, ``prompt_ids`` ...), made to the shapes the comments state, and the files a command reads
  (``corpus.jsonl``, ``ckpt/`` ...). Inputs must be exactly the block's free names (read before the
  block binds them) and never modules: a block that uses ``torch`` or ``mk`` must import it itself.

The commands that take minutes (training, the full test suite, benchmarks that rewrite
benchmarks/results/), install packages, or need 8 GPUs are skipped with that reason; where a cheap
check of the same command line exists it runs instead (``--print-config`` for a training command line,
checking the config file's values and each override; ``--help`` listing every flag of a benchmark
command; ``pyproject.toml`` declaring an installed extra). The main job, ``python training/train.py``,
also runs shrunk (``MAIN_JOB_SHRUNK``: a 2-layer model for 3 steps, seconds), against the outputs its
section and the checkpoint layout describe, and so does the shipped instruct finetune after it
(``FINETUNE_SHRUNK``: 2 steps in ChatML), against the Finetuning section.

Runtime: ~35-40 s on 2 shared cores, three ONNX exports (~5-9 s each) and the subprocess runs of the
generate, export and convert CLIs (~3-4 s each) being most of it.
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
import typing
from pathlib import Path
from typing import Callable

import pytest
import torch

import mpt_kernels as mk
from _subproc import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TRAINING_MD = ROOT / "docs" / "training.md"
EXPORT_MD = ROOT / "docs" / "export.md"
DOCS = (README, TRAINING_MD, EXPORT_MD)
NEOX_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
CLI_TIMEOUT = 180

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors; the CI box has 2 shared cores


# ----------------------------------------------------------------------------------------------
# Reading the docs


@dataclasses.dataclass
class Block:
    lang: str  # "" for an unlabelled block (a layout listing)
    line: int  # 1-based line of the opening fence
    code: str
    doc: Path = README

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def doc_blocks(doc: Path, lang: str | None = None) -> list[Block]:
    """The fenced blocks of ``doc`` in the language ``lang`` (None: all of them)."""
    text = doc.read_text()
    blocks = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if lang is None or m.group(1) == lang:
            blocks.append(Block(m.group(1), text[: m.start()].count("\n") + 1, m.group(2), doc))
    return blocks


def readme_blocks(lang: str) -> list[Block]:
    return doc_blocks(README, lang)


def python_block(marker: str, doc: Path = README) -> Block:
    found = [b for b in doc_blocks(doc, "python") if marker in b.code]
    assert len(found) == 1, (f"{doc.relative_to(ROOT)}: expected one ```python block containing {marker!r}, "
                             f"found {len(found)}")
    return found[0]


def doc_commands(doc: Path) -> list[str]:
    """Every command line of ``doc``'s bash blocks, comments dropped, as written (quotes kept); a line
    ending in a backslash continues on the next, joined with one space as the shell reads it."""
    commands = []
    for block in doc_blocks(doc, "bash"):
        pending = ""
        for line in block.code.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1].strip() + " "
                continue
            line, pending = pending + line.strip(), ""
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(_strip_comment(line))
        assert not pending, f"{block.where}: a bash block ends in a line continuation"
    return commands


def readme_commands() -> list[str]:
    return doc_commands(README)


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
        assert old in code, f"{block.where}: the documented substitution target {old!r} is gone"
        code = code.replace(old, new)
    inputs = dict(inputs or {})
    assert not [n for n, v in inputs.items() if isinstance(v, types.ModuleType)], "inputs must not be modules"
    assert set(inputs) == free_names(code), (
        f"{block.where}: the block reads {sorted(free_names(code))} without defining them; the test "
        f"provides {sorted(inputs)} (a module must be imported by the block itself)")
    ns = {"__name__": "__doc_example__", "__builtins__": builtins, **inputs}
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile("\n" * block.line + code, str(block.doc), "exec"), ns)
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
    return run_cli_here(argv, cwd, capsys).stdout


def run_cli_here(argv: list[str], cwd: Path, capsys, stdin: str | None = None) -> subprocess.CompletedProcess:
    """run_cli's counterpart in this process, through runpy (the module or script run as ``__main__``), for a
    command whose CLI has a subprocess run elsewhere in this file or in tests/test_training.py: ``stdin`` as
    its standard input, stdout and stderr as captured by ``capsys``, the exit status asserted 0 (an exception
    it does not turn into an exit propagates, with its traceback); torch's thread count is restored (the
    module runs with one thread, as OMP_NUM_THREADS=1 gives run_cli's commands)."""
    import io
    import runpy
    import warnings

    assert argv[0] == "python", argv
    old_argv, old_cwd, old_path, old_stdin = sys.argv, os.getcwd(), list(sys.path), sys.stdin
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        os.chdir(cwd)
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        if argv[1] == "-m":
            sys.argv = [argv[2], *argv[3:]]
            sys.path.insert(0, str(cwd))  # python -m puts the working directory first
            run = lambda: runpy.run_module(argv[2], run_name="__main__", alter_sys=True)  # noqa: E731
        else:
            sys.argv = argv[1:]
            run = lambda: runpy.run_path(argv[1], run_name="__main__")  # noqa: E731
        try:
            with warnings.catch_warnings():
                # `-m` of a module an earlier test imported: runpy runs a fresh copy of it as __main__, as
                # python -m does; its "found in sys.modules" warning says only that
                warnings.filterwarnings("ignore", "'.*' found in sys.modules after import of package", RuntimeWarning)
                run()
            code = 0
        except SystemExit as exc:
            code = exc.code
    finally:
        sys.argv, sys.path[:], sys.stdin = old_argv, old_path, old_stdin
        os.chdir(old_cwd)
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert code in (0, None), f"{shlex.join(argv)} exited with {code}\n{out}\n{err}"
    return subprocess.CompletedProcess(argv, 0, out, err)


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
    ns0 = run_python_block(dataclasses.replace(block, code="\n".join(lines[:2])), tmp_path,
                           inputs={n: inputs[n] for n in ("q", "k", "v")})
    assert ns0["out"].shape == q.shape
    torch.testing.assert_close(d(ns0["out"]), dense_alibi_attention(d(q), d(k), d(v), causal=True),
                               atol=1e-5, rtol=1e-5)
    ns1 = run_python_block(dataclasses.replace(block, code="\n".join(lines[:3])), tmp_path,
                           inputs={n: inputs[n] for n in ("q", "k", "v", "slopes")})
    torch.testing.assert_close(d(ns1["out"]), dense_alibi_attention(d(q), d(k), d(v), causal=False,
                                                                   slopes=d(inputs["slopes"])), atol=1e-5, rtol=1e-5)
    ns2 = run_python_block(dataclasses.replace(block, code="\n".join(lines[:4])), tmp_path,
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
        ns = run_python_block(dataclasses.replace(block, code="\n".join(lines[:n])), tmp_path,
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
# The ```bash command lines of every doc. A command written the same way in two docs (the export CLI
# lines of README.md and docs/export.md) is one entry, run once, its check holding both docs' claims.

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
     "installs the package (network, a rebuild) and trains for minutes; pyproject is checked in "
     "test_readme_pip_extras, the main job's config by the `python training/train.py` --print-config run, and the "
     "job itself, shrunk, by test_training_main_job")
skip('pip install torch==2.13.0 ".[test]" && pytest -q tests',
     "installs (network) and runs the whole suite; the [test] extra is checked in test_readme_pip_extras")
skip('pip install ".[export]"', "installs (network); the [export] extra is checked in test_readme_pip_extras")
skip("torchrun --nproc_per_node=8 training/train.py --config training/configs/mpt-1b.yaml parallel=fsdp",
     "8 GPUs and an mpt-1b; its config is resolved by test_torchrun_configs_resolve")
skip("torchrun --nproc_per_node=8 training/train.py --config training/configs/mpt-1b.yaml data.tokenizer=...",
     "8 GPUs, an mpt-1b and a tokenizer; its config is resolved by test_torchrun_configs_resolve")
skip("python -m venv .venv && . .venv/bin/activate", "creates a virtual environment (setup, not an example)")
skip("pip install torch==2.13.0 numpy pybind11 cmake ninja pytest safetensors tokenizers tqdm pyyaml",
     "installs packages (network)")
skip("MPT_KERNELS_CUDA=0 python setup.py build_ext --inplace",
     "rebuilds the extension in place (minutes, and other processes import that build)")
skip("python -m pytest -q tests", "the whole suite (many minutes)")
skip("bash tests/run_sanitized.sh", "~10 min sanitizer build and run")
skip("python -m pytest -q tests/test_cuda_emulated.py", "~4 min on the host emulator")
skip("MPTK_EMU_RACECHECK=1 python -m pytest -q tests/test_cuda_emulated.py",
     "~8 min: the whole emulated file on the racecheck build (its self-tests and every kernel path under it "
     "run in the suite: test_cuda_emulated.py -k racecheck)")


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
    # in this process (the --prompt line runs the generate CLI in a subprocess)
    r = run_cli_here(argv, tmp_path, request.getfixturevalue("capsys"),
                     stdin="Hello, who are you?\nAnd what can you do?\n")
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
    assert_benchmark_flags(argv, request.getfixturevalue("capsys"))


def assert_benchmark_flags(argv: list[str], capsys):
    out = run_cli_in_process(argv + ["--help"], ROOT, capsys)
    assert f"options of {argv[3]}:" in out  # the benchmark exists and printed its own options
    for flag in [a for a in argv if a.startswith("--")]:
        assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", out), f"{flag} is not an option:\n{out}"


@runs("python training/train.py")
@runs("python training/train.py --config training/configs/tiny.yaml max_steps=100 optim.lr=5e-4")
@runs("python training/train.py --config training/configs/tiny.yaml max_steps=100 optim.lr=3e-3")
@runs("python training/train.py --config training/configs/mpt-125m.yaml max_steps=1000 optim.lr=3e-4 "
      "data.streams='[{path: data/a, proportion: 0.8}, {path: data/b, proportion: 0.2}]' "
      "model.overrides.alibi_bias_max=16 checkpoint.autoresume=true")
@runs("python training/train.py --print-config ...")
def _train_print_config(argv, tmp_path, request):
    """Training takes minutes (the main job runs shrunk in test_training_main_job): resolve the same
    command line with --print-config, from the repository root where the docs' relative paths point, and
    check that the config file's YAML and every dotted override landed. In `--print-config ...` the
    `...` stands for a command line's other arguments: none here (the main job's config)."""
    yaml = pytest.importorskip("yaml")
    argv = [a for a in argv if a != "..."]
    if "--print-config" not in argv:
        argv.append("--print-config")
    cfg = yaml.safe_load(run_cli_in_process(argv, ROOT, request.getfixturevalue("capsys")))
    assert_config_resolved(cfg, [a for a in argv[2:] if a != "--print-config"])


def assert_config_resolved(cfg: dict, args: list[str]):
    """``cfg`` (train.py's --print-config YAML for ``args``) holds every value of the config file
    (training/configs/tiny.yaml without --config: "With no arguments, `python training/train.py` runs
    `training/configs/tiny.yaml`") except where an override replaced it, and every override's value."""
    yaml = pytest.importorskip("yaml")
    args = list(args)
    path = ROOT / "training" / "configs" / "tiny.yaml"
    if "--config" in args:
        i = args.index("--config")
        path = ROOT / args[i + 1]
        del args[i:i + 2]

    def flatten(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out

    expected = flatten(yaml.safe_load(path.read_text()))
    for item in args:
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:  # data.tokenizer=... (YAML's end of document): a text field takes it as typed
            value = raw
        if isinstance(value, str):
            try:
                value = float(value)  # PyYAML reads 3e-4 as text; the config takes it as a number
            except ValueError:
                value = raw  # a text field: the text as typed
        expected = {k: v for k, v in expected.items() if k != key and not k.startswith(key + ".")}
        expected[key] = value
    for key, value in expected.items():
        got = cfg
        for part in key.split("."):
            got = got[part]
        assert got == value, f"{key}: {got!r} in the resolved config, {value!r} expected ({path.name} {args})"


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


@runs("python -m mpt_kernels.data.convert corpus.jsonl notes.txt src/ --out data/my_corpus "
      "--tokenizer /path/to/gpt-neox-20b/tokenizer.json --seq-len 2048 --val-fraction 0.01")
def _convert_with_val(argv, tmp_path, request):
    """docs/training.md's converter line, in this process (the converter parses, tokenizes with the Rust
    tokenizer and writes; a subprocess would add seconds of imports), on inputs made for it: 100 .jsonl
    records of 2000 words (1% of them, by the stable hash, is one record: one 2048-token val sample), a
    .txt file and a folder of code. Its output is held to the layout block under it."""
    import random

    from mpt_kernels.data import Stream, StreamingTokenDataset, TokenShards

    if not NEOX_TOKENIZER.exists():
        pytest.skip(f"the GPT-NeoX-20B tokenizer is not at {NEOX_TOKENIZER}")
    argv = [str(NEOX_TOKENIZER) if a == "/path/to/gpt-neox-20b/tokenizer.json" else a for a in argv]
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum".split()
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for _ in range(100):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(2000))}) + "\n")
    (tmp_path / "notes.txt").write_text("Some notes.\n" * 50)
    (tmp_path / "src").mkdir()
    for i in range(3):
        (tmp_path / "src" / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 40)
    run_cli_in_process(argv, tmp_path, request.getfixturevalue("capsys"))
    out = tmp_path / "data" / "my_corpus"
    layout = next(b.code for b in doc_blocks(TRAINING_MD, "") if "<out>/train/index.json" in b.code)
    documented_keys = re.search(r"index\.json\s+(.*?)\n<out>/train/shard", layout, re.S).group(1)
    documented_keys = [k.strip() for k in documented_keys.replace("\n", " ").split(",")]
    assert "tokenizer_vocab_sha256" in documented_keys
    indexes = {}
    for split in ("train", "val"):  # "<out>/val/...  the same, only with --val-fraction"
        index = indexes[split] = json.loads((out / split / "index.json").read_text())
        for key in documented_keys:
            if key == "counts":
                assert {"num_samples", "num_tokens", "num_documents"} <= set(index), index.keys()
            else:
                assert key in index, f"index.json has no {key!r}: {sorted(index)}"
        assert index["seq_len"] == 2048 and index["dtype"] == "uint16" and index["vocab_size"] == 50277
        assert index["eos_id"] == 0 and Path(index["tokenizer"]).is_absolute()  # "as an absolute path"
        assert index["num_samples"] >= 1, f"{split}: no sample ({index['num_documents']} documents)"
        assert [s["file"] for s in index["shards"]] == [f"shard_{i:05d}.bin" for i in range(len(index["shards"]))]
        for s in index["shards"]:  # raw uint16 (samples, seq_len), no header
            assert (out / split / s["file"]).stat().st_size == s["num_samples"] * 2048 * 2
        TokenShards(out / split).verify()  # the sha256 of each shard is in the index
    assert indexes["train"]["num_documents"] + indexes["val"]["num_documents"] == 100 + 1 + 3
    assert 1 <= indexes["val"]["num_documents"] <= 3  # 1% of 104 documents, by hash
    assert not (out / "tokenizer.json").exists()  # "the trained BPE, only without --tokenizer"
    assert not list(out.glob(".tmp-convert-*"))  # the staging folder was moved into place
    # "Point data.streams at <out>/train": the streaming dataset reads it
    ds = StreamingTokenDataset([Stream(str(out / "train"), 1.0)], seed=0, batch_size=2)
    sample = next(iter(ds))
    assert sample["input_ids"].shape == (2048,) and int(sample["input_ids"].max()) < 50277


@runs("python -m mpt_kernels.export fastertransformer --model ckpt/ --out ft/ --tp 2 --dtype fp16 --verify")
def _export_ft_cli(argv, tmp_path, request):
    """README.md and docs/export.md: the files are held to export.md's file table and `config.ini` keys
    (a tied head and MPT's no_bias: no lm_head file, zero bias files) and read back as documented."""
    from mpt_kernels.export import load_fastertransformer, read_fastertransformer

    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    r = run_cli(argv, tmp_path)
    err = float(re.search(r"verify: max \|.*\| = ([\d.e+-]+)", r.stdout + r.stderr).group(1))
    assert err < 5e-2  # fp16 weights
    ft = tmp_path / "ft" / "2-gpu"
    cfg = model.config
    files = assert_ft_files(ft, cfg, tp=2, np_dtype="float16")
    assert "model.lm_head.weight.bin" not in files  # "only when tie_word_embeddings=False"
    assert all(not a.any() for n, a in files.items() if ".bias" in n)  # "no_bias=True becomes zero files"
    gpt = assert_ft_config_ini(ft, cfg, tp=2, dtype="fp16")
    assert gpt["start_id"] == gpt["end_id"] == "0"  # the config has no bos/eos ids
    # "`path` is `<out>/<TP>-gpu` or an `<out>` holding exactly one such directory"
    rcfg, sd = read_fastertransformer(tmp_path / "ft")
    assert rcfg["no_bias"] is True and rcfg["n_layers"] == cfg.n_layers  # no_bias inferred: all bias files zero
    torch.testing.assert_close(sd["transformer.wte.weight"], model.transformer.wte.weight.detach().half().float())
    loaded = load_fastertransformer(ft)
    probe = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe).logits, model(probe).logits, atol=2e-2, rtol=2e-2)


@runs("python -m mpt_kernels.export onnx --model ckpt/ --out onnx/ --verify")
def _export_onnx_cli(argv, tmp_path, request):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    tiny_model().save_pretrained(tmp_path / "ckpt")
    r = run_cli_here(argv, tmp_path, request.getfixturevalue("capsys"))  # (the fastertransformer line: a subprocess)
    # export.md: "for the KV-cache graph two numbers, the prefill logits and the last 3 tokens decoded one at a
    # time through the cache"
    m = re.search(r"verify: max \|.*\| = ([\d.e+-]+) \(prefill\), ([\d.e+-]+) \(last 3 tokens decoded through "
                  r"the KV cache\)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) < 1e-3 and float(m.group(2)) < 1e-3
    assert (tmp_path / "onnx" / "model.onnx").stat().st_size > 0


# Each ```python block of each doc, by a string only it contains (the test that runs it is named beside)
PYTHON_BLOCKS = {
    README: {
        "out = mk.alibi_attention(q, k, v, causal=True)": "test_readme_intro_example",
        'MPTForCausalLM.from_pretrained("path/to/mpt-7b"': "test_readme_model_example",
        "mk.alibi_attention_qkvpacked(": "test_readme_alibi_attention_example",
        "mk.nn.LPLayerNorm(d_model)": "test_readme_layer_norm_example",
        "cross_entropy(logits, targets": "test_readme_cross_entropy_example",
        "mk.optim.Lion(model.parameters()": "test_readme_lion_example",
        "export_fastertransformer(model": "test_readme_export_python_example",
    },
    TRAINING_MD: {},
    EXPORT_MD: {'export_onnx(model, "onnx/")': "test_export_onnx_example"},
}
# Each unlabelled block (a file layout), by a string only it contains, and the test holding the code to it
LAYOUT_BLOCKS = {
    README: {},
    TRAINING_MD: {"<out>/train/index.json": "test_doc_command[...convert corpus.jsonl ...]",
                  "runs/<name>/checkpoints/step_00000050/": "test_training_main_job"},
    EXPORT_MD: {},
}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_doc_example_is_covered(doc):
    """Every command of ``doc`` is run or skipped here, every ```python block is run by a test, every
    unlabelled (layout) block is checked, and no block is in another language."""
    name = doc.relative_to(ROOT)
    documented = doc_commands(doc)
    known = set(SKIPS) | set(RUNS)
    assert not set(SKIPS) & set(RUNS)
    assert sorted(set(documented) - known) == [], f"{name}: commands this test neither runs nor skips"
    for lang, markers in (("python", PYTHON_BLOCKS[doc]), ("", LAYOUT_BLOCKS[doc])):
        blocks = doc_blocks(doc, lang)
        for b in blocks:
            assert sum(m in b.code for m in markers) == 1, f"{b.where}: a ```{lang} block no test knows"
        assert len(blocks) == len(markers), f"{name}: {len(blocks)} ```{lang} blocks, {len(markers)} known"
    langs = {b.lang for b in doc_blocks(doc)}
    assert langs <= {"python", "bash", ""}, f"{name}: blocks in languages this test does not run: {langs}"
    tests = set(globals())
    for test in [*PYTHON_BLOCKS[doc].values(), *LAYOUT_BLOCKS[doc].values()]:
        assert test.split("[")[0] in tests, test


def test_every_known_command_is_documented():
    documented = {c for doc in DOCS for c in doc_commands(doc)}
    assert sorted((set(SKIPS) | set(RUNS)) - documented) == [], "commands in this test that no doc has any more"


@pytest.mark.parametrize("command", sorted(set(SKIPS) | set(RUNS)),
                         ids=lambda c: re.sub(r"[^A-Za-z0-9_.=-]+", "_", c)[:80])
def test_doc_command(command, tmp_path, request):
    assert any(command in doc_commands(doc) for doc in DOCS), f"in no doc: {command}"
    if command in SKIPS:
        pytest.skip(SKIPS[command])
    RUNS[command](shlex.split(command), tmp_path, request)


@pytest.mark.parametrize("command", sorted({c for doc in DOCS for c in doc_commands(doc) if c.startswith("torchrun ")}),
                         ids=lambda c: re.sub(r"[^A-Za-z0-9_.=-]+", "_", c)[:80])
def test_torchrun_configs_resolve(command, capsys):
    """The skipped torchrun lines: their config file and overrides resolve (--print-config, one process)."""
    yaml = pytest.importorskip("yaml")
    argv = shlex.split(command)
    script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    cfg = yaml.safe_load(run_cli_in_process(["python", *argv[script:], "--print-config"], ROOT, capsys))
    assert_config_resolved(cfg, argv[script + 1:])
    if "mpt-1b.yaml" in command:
        assert cfg["parallel"] == "fsdp" and cfg["model"]["preset"] == "mpt-1b"  # "mpt-1b (FSDP)"


# Dotted names in the docs that are not Python attributes, and what they are instead (checked where named)
NOT_ATTRIBUTES = {
    "mpt_kernels.n_layers": "ONNX metadata key (test_export_onnx_example)",
    "mpt_kernels.alibi_attention_fwd": "the custom op's torch name (test_export_doc_claims)",
}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_doc_names_resolve(doc):
    """Every ``mk.x.y`` / ``mpt_kernels.x.y`` the doc names exists, every file it names or links, and every
    test function it names."""
    import importlib

    text = doc.read_text()
    names = set(re.findall(r"\b(?:mk|mpt_kernels)(?:\.[A-Za-z_]\w*)+", text)) - set(NOT_ATTRIBUTES)
    assert len(names) > 3
    for name in sorted(names):
        parts = name.replace("mk.", "mpt_kernels.", 1).split(".")
        obj = importlib.import_module(parts[0])
        for i, part in enumerate(parts[1:], 1):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                obj = importlib.import_module(".".join(parts[:i + 1]))  # a submodule (mpt_kernels.data.convert)
        assert obj is not None, name
    links = {p for p in re.findall(r"\]\(([^)#\s]+)\)", text) if not p.startswith("http")}  # markdown links
    missing = sorted(p for p in links if not (doc.parent / p).exists())  # relative to the doc
    paths = set(re.findall(r"`([\w./-]+/[\w.-]+\.(?:py|md|sh|cu|cpp|h|yaml|jsonl))`", text))  # `dir/file.ext`
    paths |= set(re.findall(r"\((tests/test_\w+\.py)\)", text))
    paths = {p for p in paths if not p.startswith("runs/")}  # the main job's outputs: test_training_main_job
    stdlib = Path(__import__("sysconfig").get_paths()["stdlib"])
    missing += sorted(p for p in paths if not (ROOT / p).exists() and not (stdlib / p).exists())
    assert len(links | paths) >= (5 if doc == README else 1)
    assert not missing, f"{doc.name} names files that do not exist: {missing}"
    test_sources = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    tests = set(re.findall(r"`(test_\w+)`", text))
    assert not [t for t in tests if not re.search(rf"^def {t}\(", test_sources, re.M)], tests


def test_readme_pip_extras():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    names = lambda reqs: {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}  # noqa: E731
    assert {"pytest"} <= names(extras["test"])
    assert {"onnx", "onnxscript", "onnxruntime"} <= names(extras["export"])  # "# onnx, onnxscript, onnxruntime"


# ----------------------------------------------------------------------------------------------
# docs/training.md: the main job (shrunk) and the claims a test can check cheaply

# The main job's documented command line, `python training/train.py`, with only its size changed: seconds
# instead of minutes (a 2-layer d_model-64 model, 32-token samples, a 512-token BPE on 150 kB of the
# standard library, 3 steps, a checkpoint after each (tiny.yaml keeps the last 2), evaluations every 2).
MAIN_JOB_SHRUNK = [
    "threads=1", "progress=false", "max_steps=3", "global_batch_size=4", "micro_batch_size=4", "data.seq_len=32",
    "data.bpe_vocab_size=512", "data.max_code_bytes=150000", "model.overrides={d_model: 64, n_heads: 2, n_layers: 2}",
    "checkpoint.save_every=1", "eval.every=2", "eval.batches=1", "eval.sample_tokens=8",
]


def test_training_main_job(tmp_path, capsys):
    """"The main job" section and the checkpoint layout block, on `python training/train.py` shrunk
    (MAIN_JOB_SHRUNK), run from a temporary directory standing for the repository root, so the default
    run_root `runs` puts everything under tmp_path/runs/tiny/; then the shipped instruct finetune from its
    output (FINETUNE_SHRUNK, ChatML), held to the Finetuning section's saved folder and sample."""
    yaml = pytest.importorskip("yaml")
    from mpt_kernels.data import load_tokenizer
    from mpt_kernels.model import MPTForCausalLM
    from mpt_kernels.train import read_metrics

    # in this process (tests/test_training.py runs train.py in subprocesses, and under torchrun)
    r = run_cli_here(["python", str(ROOT / "training" / "train.py"), *MAIN_JOB_SHRUNK], tmp_path, capsys)
    run = tmp_path / "runs" / "tiny"
    # 1. the bundled corpus under runs/tiny/corpus/, its BPE cached next to the shards
    corpus = run / "corpus"
    tok = load_tokenizer(corpus / "tokenizer.json")
    assert tok.vocab_size == 512
    for source in ("code", "text"):
        for split in ("train", "val"):
            index = json.loads((corpus / source / split / "index.json").read_text())
            assert index["seq_len"] == 32 and index["num_samples"] > 0, (source, split)
    # 2. metrics.jsonl: a start record, one per step, evaluations before training, every eval.every steps and at
    # the end, a summary; loss.png
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "start" and records[-1]["kind"] == "summary"
    assert [r_["step"] for r_ in read_metrics(run / "metrics.jsonl", "train")] == [1, 2, 3]
    evals = read_metrics(run / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [0, 2, 3]
    for e in evals:
        assert e["ppl"] == pytest.approx(math.exp(e["loss"]))
    start = records[0]
    # "MFU: llm-foundry's formula, model FLOPs per token 3 * (2 * n_params + 4 * n_layers * d_model * seq_len)"
    assert start["flops_per_token"] == 3 * (2 * start["n_params"] + 4 * 2 * 64 * 32)
    # "the GPU when torch sees one (bf16 autocast there), the CPU otherwise"; on a CPU bf16 only where native
    from mpt_kernels.train.metrics import cpu_has_native_bf16

    if not torch.cuda.is_available():
        assert start["device"] == "cpu" and start["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    try:
        import matplotlib  # noqa: F401
        assert (run / "loss.png").stat().st_size > 0
    except ImportError:
        pass
    # 3. checkpoints (the layout block), the final HF model with its tokenizer.json, the summary and a sample
    layout = next(b.code for b in doc_blocks(TRAINING_MD, "") if "checkpoints/step_00000050/" in b.code)
    one_process = ["trainer.json", "model.pt", "optim.pt", "rng_rank0.pt"]
    for name in ["trainer.json", "model.pt, optim.pt", "dcp/", "rng_rank<r>.pt"]:
        assert name in layout
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step_00000002", "step_00000003"]  # "The newest keep_last are kept" (tiny.yaml: 2)
    for step in steps:
        assert sorted(p.name for p in (run / "checkpoints" / step).iterdir()) == sorted(one_process)  # no dcp/
    state = json.loads((run / "checkpoints" / "step_00000003" / "trainer.json").read_text())
    # "step, samples consumed, data order, scheduler, world size"
    assert state["step"] == 3 and state["consumed_samples"] == 12 and state["world_size"] == 1
    assert {"data", "scheduler"} <= set(state)
    hf = run / "hf"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= \
        {p.name for p in hf.iterdir()}
    # training.md, Finetuning: tokenizer_config.json names "the generic PreTrainedTokenizerFast ... <|endoftext|> as
    # eos, <|padding|> as pad ... no added BOS/EOS, no space clean-up"; a chat template only for a finetune
    tok_cfg = json.loads((hf / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["eos_token"] == "<|endoftext|>"
    assert tok_cfg["pad_token"] == "<|padding|>" and tok_cfg["add_bos_token"] is False
    assert tok_cfg["add_eos_token"] is False and tok_cfg["clean_up_tokenization_spaces"] is False
    assert "chat_template" not in tok_cfg
    # "eos_token_id in config.json and a generation_config.json, so transformers' generate stops at <|endoftext|>"
    eos = tok.backend.token_to_id("<|endoftext|>")
    assert json.loads((hf / "config.json").read_text())["eos_token_id"] == eos
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] in (eos, [eos])
    assert list(hf.glob("*.safetensors"))
    model = MPTForCausalLM.from_pretrained(hf)
    assert model.config.vocab_size == 512 and model.config.d_model == 64  # 512 is a multiple of 128 already
    assert load_tokenizer(hf / "tokenizer.json").vocab_sha256() == tok.vocab_sha256()
    assert yaml.safe_load((run / "config.yaml").read_text())["run_name"] == "tiny"
    assert "runs/tiny/hf" in r.stdout and "sample" in r.stdout  # the summary names the model folder; a sample
    # "held-out loss and perplexity before training, every eval.every steps and at the end (on the console too
    # with progress=false)"
    assert "held-out before training" in r.stderr and re.search(r"step 2: held-out loss [\d.]+, ppl", r.stderr)

    # "instruct-finetune (runs as shipped after the main job: finetunes runs/tiny/hf on
    # training/data/instruct_example.jsonl)", shrunk, with data.finetune_format=chatml (as the config's comment
    # suggests); tmp_path stands for the repository root, so its training/ is the repository's
    (tmp_path / "training").symlink_to(ROOT / "training", target_is_directory=True)
    r = run_cli_here(["python", str(ROOT / "training" / "train.py"), "--config",
                      "training/configs/instruct-finetune.yaml", *FINETUNE_SHRUNK], tmp_path, capsys)
    assert_finetune_hf_folder(tmp_path / "runs" / "instruct", r.stdout)


# instruct-finetune.yaml after the main job, with only its size changed and the ChatML format: seconds
FINETUNE_SHRUNK = ["threads=1", "progress=false", "max_steps=2", "global_batch_size=2", "micro_batch_size=2",
                   "eval.every=-1", "eval.sample_tokens=4", "data.finetune_format=chatml"]


def assert_finetune_hf_folder(run: Path, stdout: str):
    """training.md, Finetuning, on a ChatML finetune's output: the saved folder's files, its chat template
    rendering the training format character for character, generation_config.json stopping at <|im_end|> and
    <|endoftext|>, and the end-of-run sample of a plain eval.sample_prompt put in the run's format."""
    from mpt_kernels.data import load_tokenizer
    from mpt_kernels.data.finetune import INSTRUCT_INTRO, IM_END, chat_template, format_chatml, format_mpt_instruct
    from mpt_kernels.train import load_config

    hf = run / "hf"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= \
        {p.name for p in hf.iterdir()}
    ours = load_tokenizer(hf / "tokenizer.json")
    tok_cfg = json.loads((hf / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["chat_template"] == chat_template("chatml")
    gen = json.loads((hf / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ours.token_to_id(IM_END), ours.eos_id]  # "lists both"
    # "(instruct-finetune.yaml's is the question alone)", and the sample put it in ChatML (markers are special
    # tokens, left out when the sample is decoded)
    prompt = load_config(ROOT / "training" / "configs" / "instruct-finetune.yaml").eval.sample_prompt
    assert prompt == "What does len() return?" and not prompt.startswith(INSTRUCT_INTRO)
    assert f"user\n{prompt}\nassistant\n" in stdout, stdout
    try:
        import transformers
    except ImportError:
        return
    theirs = transformers.AutoTokenizer.from_pretrained(hf)
    assert (len(theirs), theirs.eos_token_id, theirs.pad_token_id) == (ours.vocab_size, ours.eos_id, ours.pad_id)
    msgs = [{"role": "user", "content": "Say cat."}, {"role": "assistant", "content": "cat"}]
    rec = {"prompt": "Say cat.", "response": "cat"}
    chatml = format_chatml(rec)
    assert theirs.apply_chat_template(msgs, tokenize=False) == "".join(t for t, _ in chatml)
    # "add_generation_prompt=True ends with the assistant turn's opening"
    assert theirs.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == \
        "".join(t for t, _ in chatml[:-2])
    # the mpt-instruct template, as a mpt-instruct finetune saves it: "one user message and optionally the response"
    instruct = format_mpt_instruct(rec)
    kw = {"tokenize": False, "chat_template": chat_template("mpt-instruct")}
    assert theirs.apply_chat_template(msgs, **kw) == "".join(t for t, _ in instruct)
    assert theirs.apply_chat_template(msgs[:1], add_generation_prompt=True, **kw) == instruct[0][0]
    with pytest.raises(Exception, match="single-turn"):
        theirs.apply_chat_template([{"role": "system", "content": "S"}, *msgs], **kw)


def _top_level_items(cell: str) -> list[str]:
    """A table cell's comma-separated items, commas inside parentheses kept."""
    items, depth, cur = [], 0, ""
    for ch in cell:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [i for i in items + [cur.strip()] if i]


def test_training_doc_claims(capsys, tmp_path):
    """docs/training.md's checkable statements: the main job's sizes, the configuration table, the
    override rules with their examples, the shipped configs, tokenizer and corpus facts, the MFU peak
    table, and the API its prose spells out."""
    from mpt_kernels.data import FinetuneDataset, Stream, StreamingTokenDataset, TokenShards, padded_vocab_size
    from mpt_kernels.model import MPTConfig, MPTForCausalLM
    from mpt_kernels.model.config import PRESETS
    from mpt_kernels.train import config as train_config
    from mpt_kernels.train import gpu_peak_flops, load_config, main
    from mpt_kernels.train.checkpoint import step_dir

    text = TRAINING_MD.read_text()
    flat = " ".join(text.split())  # the prose with its line breaks folded
    configs = ROOT / "training" / "configs"
    # The main job: "a 4096-token byte-level BPE ... 128-token samples"; "the tiny preset (4 layers, d_model 256,
    # 4 heads, ALiBi; 4.2M parameters with the 4096 vocabulary) with fused Lion for 240 steps of 8 x 128 tokens,
    # code and text mixed 70/30, held-out perplexity every 50 steps"; "max_minutes: 6"
    tiny = load_config(configs / "tiny.yaml")
    assert (tiny.data.bpe_vocab_size, tiny.data.seq_len, tiny.max_steps, tiny.global_batch_size) == (4096, 128, 240, 8)
    assert tiny.optim.name == "lion" and tiny.data.bundled_proportions == {"code": 0.7, "text": 0.3}
    assert tiny.eval.every == 50 and tiny.max_minutes == 6 and tiny.run_name == "tiny" and tiny.run_root == "runs"
    assert tiny.data.val_fraction == 0.05  # the bundled corpus: "5% of the documents of each ... are held out"
    cfg = MPTConfig.from_preset(tiny.model.preset, vocab_size=4096)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.attn_config["alibi"]) == (4, 256, 4, True)
    with torch.device("meta"):
        assert round(MPTForCausalLM(cfg).num_parameters() / 1e6, 1) == 4.2
    for claim in ("4 layers, d_model 256, 4 heads, ALiBi; 4.2M parameters", "240 steps of 8 x 128 tokens",
                  "mixed 70/30", "every 50 steps", "`max_minutes: 6`", "4096-token byte-level BPE",
                  "128-token samples"):
        assert claim in flat, claim

    # The configuration table: every key it lists is a field of its section, and the listed choices are the valid ones
    defaults = train_config.Config()
    sections = {"top level": defaults, **{f"`{f.name}`": getattr(defaults, f.name) for f in dataclasses.fields(defaults)
                                          if dataclasses.is_dataclass(getattr(defaults, f.name))}}
    rows = dict(re.findall(r"^\| (top level|`\w+`) \| (.*) \|$", text, re.M))
    assert set(rows) == set(sections) - {"`fault`"}, rows.keys()  # fault: "a test hook", described below the table
    assert "The `fault` config section is a test hook" in text and hasattr(train_config.Config(), "fault")
    for row, cell in rows.items():
        fields = {f.name for f in dataclasses.fields(sections[row])}
        keys = [re.match(r"`(\w+)`", item).group(1) for item in _top_level_items(cell)]
        assert len(keys) >= 4 or row in ("`scheduler`", "`checkpoint`"), (row, keys)
        assert set(keys) <= fields, f"{row}: {sorted(set(keys) - fields)} are not config keys"
    for key, choices in [("device", "auto/cpu/cuda"), ("precision", "auto/bf16/fp32"), ("parallel", "ddp/fsdp"),
                         ("optim.name", "lion/adamw")]:
        assert f"`{key.split('.')[-1]}` ({choices})" in text, key
        for choice in choices.split("/"):
            load_config(None, [f"{key}={choice}"])
        with pytest.raises(ValueError, match=key):
            load_config(None, [f"{key}=bogus"])
    presets = re.search(r"`preset` \(([^)]*)\)", text).group(1)
    assert sorted(presets.split(", ")) == sorted(PRESETS)
    assert "`kind` (bundled/shards/finetune)" in text
    with pytest.raises(ValueError, match="bundled, shards or finetune"):
        load_config(None, ["data.kind=web"])

    # Overrides of text fields are the text as typed; the examples of the prose, as the shell passes them
    examples = [  # (as written in the doc, the argument the shell passes, field, value)
        ("eval.sample_prompt=$'<|im_start|>user\\nhi'", "eval.sample_prompt=<|im_start|>user\nhi", "eval.sample_prompt",
         "<|im_start|>user\nhi"),
        ("eval.sample_prompt='def '", "eval.sample_prompt=def ", "eval.sample_prompt", "def "),
        ("'x = 1  # note'", "eval.sample_prompt=x = 1  # note", "eval.sample_prompt", "x = 1  # note"),
        ("run_name=123", "run_name=123", "run_name", "123"),
        ("run_name=2024-06-01", "run_name=2024-06-01", "run_name", "2024-06-01"),
        ("data.tokenizer=no", "data.tokenizer=no", "data.tokenizer", "no"),
        ("eval.sample_prompt='Q: what'", "eval.sample_prompt=Q: what", "eval.sample_prompt", "Q: what"),
        ("data.tokenizer=\"'null'\"", "data.tokenizer='null'", "data.tokenizer", "null"),
        ("`./null`", "data.tokenizer=./null", "data.tokenizer", "./null"),
    ] + [(f"`{w}`", f"data.tokenizer={w}", "data.tokenizer", None) for w in ("null", "None", "~")] + [
        ("or nothing means unset", "data.tokenizer=", "data.tokenizer", None),
        ("`1e-3`", "optim.lr=1e-3", "optim.lr", 1e-3),
        ("`true`", "checkpoint.autoresume=true", "checkpoint.autoresume", True),
        ("`null`", "optim.max_grad_norm=null", "optim.max_grad_norm", None),
        ("`[0.9, 0.95]`", "optim.betas=[0.9, 0.95]", "optim.betas", [0.9, 0.95]),
    ]
    for written, arg, field, value in examples:
        assert written in text, written
        if "=" in written and "$'" not in written and not written.startswith(("`", "'")):
            assert shlex.split(written) == [arg], (written, arg)  # what the shell passes for the doc's spelling
        got = load_config(None, [arg])
        for part in field.split("."):
            got = getattr(got, part)
        assert got == value, (written, got)
    # "In the optional text fields (those that can be unset: ...)": exactly the str | None fields
    listed = re.search(r"In the optional text fields \(those\s+that can be unset: (.*?)\)", text, re.S).group(1)
    listed = set(re.findall(r"`([\w.]+)`", listed))

    def text_fields(obj, prefix=""):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                out.update(text_fields(v, f"{prefix}{f.name}."))
            else:
                out[prefix + f.name] = train_config._is_text_field(typing.get_type_hints(type(obj))[f.name])
        return out

    fields = text_fields(train_config.Config())
    optional = {k for k, (is_text, opt) in fields.items() if is_text and opt and not k.startswith("fault.")}
    assert listed == optional, (listed, optional)
    for name in ("run_name", "eval.sample_prompt", "data.tokenizer", "model.init_from"):  # "text fields (...)"
        assert fields[name][0], name
    # "Unknown keys (the error names the valid keys) and wrongly typed values (it names the expected type) are
    # errors, printed as a usage error (exit status 2)"
    for bad, says in [("optim.lrr=1", "valid keys: ['betas', 'lr',"), ("max_steps=many", "expected an integer"),
                      ("data.streams=[{path:data/x}]", "space after a colon"),
                      ("data.bundled_proportions={code: 1, web: 1}", "code"),
                      ("model.overrides.alibi_bias=16", "valid keys")]:
        with pytest.raises(SystemExit) as exc:
            main(["--print-config", bad])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "error: config:" in err and says in err and "Traceback" not in err, (bad, err)

    # Shipped configs
    shipped = re.search(r"Shipped configs \(`training/configs/`\): (.*?)\. Relative", flat).group(1)
    shipped = [re.match(r"`([\w-]+)`", item).group(1) for item in _top_level_items(shipped)]
    assert sorted(shipped) == sorted(p.stem for p in configs.glob("*.yaml"))
    assert load_config(configs / "mpt-1b.yaml").parallel == "fsdp"  # "mpt-1b (FSDP)"
    c7 = load_config(configs / "mpt-7b.yaml")  # "(FSDP, activation checkpointing, four sources mixed)"
    assert c7.parallel == "fsdp" and c7.model.activation_checkpointing and len(c7.data.streams) == 4
    sw = load_config(configs / "storywriter-finetune.yaml")  # "max_seq_len 65536, alibi_bias_max 16, 65,536-token
    # samples"
    assert sw.model.init_from and sw.model.overrides == {"max_seq_len": 65536, "alibi_bias_max": 16}
    assert sw.data.seq_len == 65536
    # "finetunes runs/tiny/hf on training/data/instruct_example.jsonl"
    inst = load_config(configs / "instruct-finetune.yaml")
    assert inst.model.init_from == "runs/tiny/hf" and inst.data.finetune_path == "training/data/instruct_example.jsonl"
    assert inst.data.kind == "finetune" and (ROOT / inst.data.finetune_path).is_file()
    assert tiny.run_dir / "hf" == Path(inst.model.init_from)  # the main job's output, as both run from the root
    # "The MPT configs therefore set model.vocab_size: 50432" (NeoX's 50277: next multiple of 256, not of 128)
    for name in ("mpt-125m", "mpt-1b", "mpt-7b"):
        assert load_config(configs / f"{name}.yaml").model.vocab_size == 50432, name
    assert padded_vocab_size(50277) == 50304 and padded_vocab_size(50277, 256) == 50432
    assert padded_vocab_size(4096) == 4096 and "50432" in text and "(50304)" in text

    # Tokenizer: the trained BPE's special ids; GPT-NeoX-20B's size and end-of-text id
    pytest.importorskip("tokenizers")
    from mpt_kernels.data import load_tokenizer, train_bpe_tokenizer

    bpe = train_bpe_tokenizer(["def f(x):\n    return x\n", "Some text, some more text."] * 20, vocab_size=300)
    assert bpe.backend.token_to_id("<|endoftext|>") == 0 and bpe.backend.token_to_id("<|padding|>") == 1
    # "Tokenizer.encode(text) and encode_batch(texts) read a special token's text ... as that token's id ...; with
    # special_tokens_as_text=True it is encoded as the characters it is made of"
    spelled = 'EOS = "<|endoftext|>"'
    assert bpe.eos_id in bpe.encode(spelled) and bpe.encode_batch([spelled]) == [bpe.encode(spelled)]
    as_text = bpe.encode(spelled, special_tokens_as_text=True)
    assert bpe.eos_id not in as_text and bpe.decode(as_text) == spelled
    assert bpe.encode_batch([spelled], special_tokens_as_text=True) == [as_text]
    # The converter: "A document's own text that spells a special token ... stays text: the only end-of-text ids
    # are the separators"
    from mpt_kernels.data.convert import convert

    docs = [spelled, "plain text", "a <|endoftext|><|padding|> b"] * 4
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    convert([tmp_path / "d.jsonl"], tmp_path / "conv", tokenizer=bpe, seq_len=4, show_progress=False)
    shards = TokenShards(tmp_path / "conv" / "train")
    ids = [int(i) for k in range(len(shards)) for i in shards[k]]
    stream = [i for d in docs for i in bpe.encode(d, special_tokens_as_text=True) + [bpe.eos_id]]
    assert ids == stream[:len(ids)] and stream.count(bpe.eos_id) == len(docs)
    if NEOX_TOKENIZER.exists():
        neox = load_tokenizer(NEOX_TOKENIZER)
        assert neox.vocab_size == 50277 and neox.backend.token_to_id("<|endoftext|>") == 0

    # Bundled corpus: "9.6 MB in 511 files on CPython 3.11", the reference text "0.5 MB, cut ... into ~4 kB documents"
    from mpt_kernels.data.corpus import reference_text_documents, stdlib_code_documents

    if sys.version_info[:2] == (3, 11):  # (patch releases move a file or two: a few files' slack)
        code = list(stdlib_code_documents())
        assert abs(len(code) - 511) <= 5 and abs(sum(len(d.text.encode()) for d in code) / 1e6 - 9.6) < 0.1
    topics = list(reference_text_documents())
    assert round(sum(len(d.text.encode()) for d in topics) / 1e6, 1) == 0.5
    assert 2000 < sum(len(d.text) for d in topics) / len(topics) < 6000

    # MFU peaks: "A100 312, H100 SXM 989, H100 PCIe 756, H200 989 TFLOP/s"; "fp32 runs count TF32 at half that"
    for card, tflops in [("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                         ("NVIDIA H200", 989)]:
        assert gpu_peak_flops(card, "bf16") == tflops * 1e12 and gpu_peak_flops(card, "fp32") == tflops * 1e12 / 2
    assert "A100 312, H100 SXM 989, H100 PCIe 756, H200 989 TFLOP/s" in flat
    assert gpu_peak_flops("Some Unknown Card", "bf16") is None  # "unknown cards are measured"

    # The API the prose spells out
    assert_signature_extends(Stream, "(path, proportion=None)")
    assert_signature_extends(StreamingTokenDataset, "(streams, *, seed=0, batch_size=1, sequence_id=False, "
                                                    "allow_tokenizer_mismatch=False)")
    assert callable(TokenShards.verify) and callable(MPTForCausalLM.resize_token_embeddings)
    assert list(inspect.signature(StreamingTokenDataset.state_dict).parameters) == ["self", "num_samples"]
    assert callable(StreamingTokenDataset.load_state_dict)
    params = inspect.signature(FinetuneDataset).parameters
    assert list(params)[1] == "tokenizer" and {"max_seq_len", "fmt"} <= set(params)
    # The finetuning formats: 'fmt="mpt-instruct"|"chatml"', MPT-7B-Instruct's and MPT-7B-Chat's templates
    from mpt_kernels.data.finetune import FORMATS, format_chatml, format_mpt_instruct

    assert 'fmt="mpt-instruct"|"chatml"' in text and set(FORMATS) == {"mpt-instruct", "chatml"}
    template = re.search(r"MPT-7B-Instruct's format \(`(.*?)`", text).group(1)
    intro, rest = template.split(" ...", 1)
    segs = format_mpt_instruct({"prompt": "P?", "response": "R."})
    assert [t for _, t in segs] == [False, True] and segs[1][0] == "R.<|endoftext|>"  # "followed by <|endoftext|>"
    assert segs[0][0].startswith(intro) and segs[0][0].endswith(rest.replace("\\n", "\n").replace("{prompt}", "P?"))
    with pytest.raises(ValueError, match="system"):  # "a record with a non-empty "system" ... is refused there"
        format_mpt_instruct({"prompt": "P?", "response": "R.", "system": "Be brief."})
    chat = format_chatml({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                       {"role": "assistant", "content": "A"}]})
    assert "".join(t for t, _ in chat) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n" \
        "<|im_start|>assistant\nA<|im_end|>\n"
    assert [t for t, train in chat if train] == ["A<|im_end|>"]  # "every assistant turn, with its end marker"
    # "Point data.streams at <out>/train and data.val_streams at <out>/val": the converter line's --out is the
    # folder the mpt-125m and mpt-1b configs read
    convert_line = next(c for c in doc_commands(TRAINING_MD) if "mpt_kernels.data.convert" in c)
    out = shlex.split(convert_line)[shlex.split(convert_line).index("--out") + 1]
    for name in ("mpt-125m", "mpt-1b"):
        c = load_config(configs / f"{name}.yaml")
        assert [s["path"] for s in c.data.streams] == [f"{out}/train"], name
        assert [s["path"] if isinstance(s, dict) else s for s in c.data.val_streams] == [f"{out}/val"], name
    assert {"residual", "out_dtype"} <= set(inspect.signature(mk.layer_norm).parameters)
    assert step_dir(Path("runs/x/checkpoints"), 50).name == "step_00000050"  # the layout block's name
    # "in `python -m benchmarks train --device cuda`"
    assert_benchmark_flags(["python", "-m", "benchmarks", "train", "--device", "cuda"], capsys)


# ----------------------------------------------------------------------------------------------
# docs/export.md: the ```python block and the claims a test can check cheaply


def test_export_onnx_example(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import numpy as np

    from mpt_kernels.export.onnx import OnnxMPT

    model = tiny_model()
    cfg = model.config
    prompt_ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 5))  # numpy int64 (batch, seq)
    ns = run_python_block(python_block('export_onnx(model, "onnx/")', EXPORT_MD), tmp_path,
                          inputs={"model": model, "prompt_ids": prompt_ids})
    target = (tmp_path / "onnx" / "model.onnx").resolve()
    path, tokens, runner = ns["path"], ns["tokens"], ns["runner"]
    assert (tmp_path / path).resolve() == target  # "-> onnx/model.onnx"
    # "numpy int64 (batch, seq + 32)", greedy: the model's own greedy tokens
    assert isinstance(tokens, np.ndarray) and tokens.dtype == np.int64 and tokens.shape == (2, 5 + 32)
    with torch.no_grad():
        expected = model.generate(torch.as_tensor(prompt_ids), 32, temperature=0)
    assert np.array_equal(tokens, expected.numpy())
    assert (tmp_path / runner.path).resolve() == target  # "the directory works too"

    # The graph's table: names, shapes with their dynamic axes, metadata, standard operators only
    proto = onnx.load(str(target))
    n, kv, hd = cfg.n_layers, cfg.attn_config.get("kv_n_heads") or cfg.n_heads, cfg.d_model // cfg.n_heads

    def dims(value_info):
        return tuple(d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim)

    ins = {i.name: dims(i) for i in proto.graph.input}
    outs = {o.name: dims(o) for o in proto.graph.output}
    cache = [f"{i}.{kv_}" for i in range(n) for kv_ in ("key", "value")]
    assert list(ins) == ["input_ids", "attention_mask", *[f"past_key_values.{c}" for c in cache]]
    assert list(outs) == ["logits", *[f"present.{c}" for c in cache]]
    assert ins["input_ids"] == ("batch", "seq") and ins["attention_mask"] == ("batch", "past + seq")
    assert ins["past_key_values.0.key"] == ("batch", kv, "past", hd)
    assert outs["logits"] == ("batch", "seq", cfg.vocab_size)
    assert len(set(outs["present.0.key"])) == 4 and outs["present.0.key"][1::2] == (kv, hd)  # (batch, kv, past+seq, hd)
    meta = {p.key: p.value for p in proto.metadata_props}
    keys = re.search(r"Metadata \((.*?)\) tells", EXPORT_MD.read_text(), re.S).group(1)
    keys = re.findall(r"`(\.?[\w.]+)`", keys)
    assert keys[0] == "mpt_kernels.n_layers"
    documented = {k if k.startswith("mpt_kernels.") else "mpt_kernels" + k for k in keys}
    assert set(meta) == documented
    assert (meta["mpt_kernels.n_layers"], meta["mpt_kernels.kv_heads"], meta["mpt_kernels.head_dim"]) == \
        (str(n), str(kv), str(hd))
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}

    # "Each decode step feeds present back as past_key_values and the mask grown by one column of ones"
    logits, present = runner.run(prompt_ids)
    assert logits.shape == (2, 5, cfg.vocab_size) and present[0].shape == (2, kv, 5, hd)
    nxt = logits[:, -1].argmax(-1)[:, None]
    logits2, present2 = runner.run(nxt, present, np.ones((2, 6), np.int64))
    assert present2[0].shape == (2, kv, 6, hd)
    with torch.no_grad():
        full = model(torch.as_tensor(np.concatenate([prompt_ids, nxt], 1))).logits[:, -1]
    np.testing.assert_allclose(logits2[:, -1], full.numpy(), atol=1e-4, rtol=1e-4)

    # The errors documented under the block, and "An existing output is refused"
    from mpt_kernels.export import export_onnx

    with pytest.raises(FileNotFoundError, match="does not exist"):
        OnnxMPT(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .onnx file"):
        OnnxMPT(tmp_path / "empty")
    (tmp_path / "two").mkdir()
    for name in ("a.onnx", "b.onnx"):
        (tmp_path / "two" / name).write_bytes(target.read_bytes())
    with pytest.raises(FileNotFoundError, match="several"):
        OnnxMPT(tmp_path / "two")
    (tmp_path / "bad.onnx").write_text("not a graph")
    with pytest.raises(ValueError, match="bad.onnx"):
        OnnxMPT(tmp_path / "bad.onnx")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_onnx(model, tmp_path / "onnx")
    with pytest.raises(ValueError, match="opset"):  # "export_onnx accepts 18 and newer"
        export_onnx(model, tmp_path / "onnx17", opset=17)
    assert not (tmp_path / "onnx17").exists()


def _ft_dim(expr: str, env: dict) -> int:
    num, _, den = expr.strip().partition("/")
    value = lambda t: int(t) if t.isdigit() else env[t]  # noqa: E731
    return value(num) // value(den) if den else value(num)


def assert_ft_files(ft_dir: Path, cfg, tp: int, np_dtype: str) -> dict:
    """The files of a FasterTransformer export are exactly docs/export.md's file table (names expanded over
    {weight,bias}, layers N and ranks R), each holding the table's shape in ``np_dtype`` with no header.
    Returns the arrays by file name, shaped as the table says."""
    import numpy as np

    rows = re.findall(r"^\| `(model\.[^`]+)` \| `\(([^`]*)\)` \|(.*?)\|$", EXPORT_MD.read_text(), re.M)
    assert len(rows) == 13, rows
    env = {"d": cfg.d_model, "I": cfg.d_model * cfg.expansion_ratio, "TP": tp, "vocab": cfg.vocab_size}
    expected = {}
    for pattern, shape, source in rows:
        if "only when `tie_word_embeddings=False`" in source and cfg.tie_word_embeddings:
            continue
        dims = tuple(_ft_dim(s, env) for s in shape.split(",") if s.strip())
        names = [pattern]
        m = re.search(r"\{(\w+),(\w+)\}", pattern)
        if m:
            names = [pattern.replace(m.group(0), m.group(1)), pattern.replace(m.group(0), m.group(2))]
        if ".N." in pattern:
            names = [x.replace(".N.", f".{i}.") for x in names for i in range(cfg.n_layers)]
        if ".R." in pattern:
            names = [x.replace(".R.", f".{r}.") for x in names for r in range(tp)]
        expected.update((x, dims) for x in names)
    assert sorted(p.name for p in ft_dir.iterdir() if p.name != "config.ini") == sorted(expected)
    arrays = {}
    for name, dims in expected.items():
        a = np.fromfile(ft_dir / name, dtype=np_dtype)
        assert a.size == math.prod(dims), f"{name}: {a.size} values, the table says {dims}"
        arrays[name] = a.reshape(dims)
    return arrays


def assert_ft_config_ini(ft_dir: Path, cfg, tp: int, dtype: str):
    """config.ini's [gpt] section holds exactly the keys export.md lists, with the model's values."""
    para = re.search(r"`config.ini`, section `\[gpt\]`:(.*?)\n\n", EXPORT_MD.read_text(), re.S).group(1)
    written = dict(re.findall(r"`(\w+) = (\w+)`", para))  # has_positional_encoding = False, ...
    # the backticked names, less the values and the MPT config name the paragraph also mentions
    documented = set(re.findall(r"`(\w+)(?: = \w+)?`", para)) - {"fp32", "fp16", "layer_norm_epsilon"}
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ft_dir / "config.ini")
    assert ini.sections() == ["gpt"]
    gpt = ini["gpt"]
    assert set(gpt) == documented, sorted(set(gpt) ^ documented)
    assert {"has_positional_encoding": "False", "use_attention_linear_bias": "True"}.items() <= written.items()
    for key, value in written.items():
        assert gpt[key] == value
    assert (int(gpt["head_num"]), int(gpt["size_per_head"]), int(gpt["num_layer"])) == \
        (cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.n_layers)
    assert (int(gpt["inter_size"]), int(gpt["max_pos_seq_len"]), int(gpt["vocab_size"])) == \
        (cfg.d_model * cfg.expansion_ratio, cfg.max_seq_len, cfg.vocab_size)
    assert gpt["weight_data_type"] == dtype and gpt["tensor_para_size"] == str(tp)
    assert float(gpt["layernorm_eps"]) == cfg.layer_norm_epsilon
    return gpt


def test_export_doc_claims(tmp_path, capsys):
    """docs/export.md's checkable statements: the signatures of its table and of reading back, the
    FasterTransformer file table's "from MPT" column on a model that has every optional file, config.ini,
    overwrite, the refusals and their messages (also on the command line), and the GELU bound."""
    import numpy as np

    from mpt_kernels.export import export_fastertransformer, load_fastertransformer, read_fastertransformer
    from mpt_kernels.export import onnx as onnx_export
    from mpt_kernels.export.__main__ import main

    text = EXPORT_MD.read_text()
    sigs = dict(re.findall(r"`(export_fastertransformer|export_onnx|read_fastertransformer|load_fastertransformer)"
                           r"(\([^`]*\))`", text))
    assert len(sigs) == 4, sigs
    assert_signature_extends(export_fastertransformer, sigs["export_fastertransformer"])
    from mpt_kernels.export import export_onnx  # the public name the table gives, not only the module's

    assert_signature_extends(export_onnx, sigs["export_onnx"])
    assert_signature_extends(read_fastertransformer, sigs["read_fastertransformer"])
    assert_signature_extends(load_fastertransformer, sigs["load_fastertransformer"])
    for kw in ("force", "start_id", "end_id"):  # "unless force=True", "override with start_id=/end_id="
        assert kw in inspect.signature(export_fastertransformer).parameters
    for kw in ("dtype", "external_data"):  # 'dtype="fp32"|"fp16" to choose', "or when external_data=True"
        assert kw in inspect.signature(export_onnx).parameters
    # "The exported graph holds the custom op itself (`mpt_kernels.alibi_attention_fwd`)"
    assert hasattr(torch.ops.mpt_kernels, "alibi_attention_fwd")

    # The file table's "from MPT" column, on a model with biases, an untied head and expansion_ratio=3, TP=2
    model = tiny_model(no_bias=False, tie_word_embeddings=False, expansion_ratio=3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # no zero bias anywhere: a misplaced file would show
    cfg = model.config
    out = export_fastertransformer(model, tmp_path / "ft", tensor_parallel=2, start_id=5, end_id=7)
    assert out == tmp_path / "ft" / "2-gpu"
    f = assert_ft_files(out, cfg, tp=2, np_dtype="float32")
    gpt = assert_ft_config_ini(out, cfg, tp=2, dtype="fp32")
    assert (gpt["start_id"], gpt["end_id"]) == ("5", "7")
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d, H, I, TP = cfg.d_model, cfg.n_heads, cfg.d_model * 3, 2
    eq = np.testing.assert_array_equal
    eq(f["model.wte.bin"], sd["transformer.wte.weight"])
    eq(f["model.lm_head.weight.bin"], sd["lm_head.weight"])
    eq(f["model.final_layernorm.weight.bin"], sd["transformer.norm_f.weight"])
    eq(f["model.final_layernorm.bias.bin"], sd["transformer.norm_f.bias"])
    for i in range(cfg.n_layers):
        p, o = f"transformer.blocks.{i}.", f"model.layers.{i}."
        for ft_name, mpt_name in [("input_layernorm", "norm_1"), ("post_attention_layernorm", "norm_2")]:
            for wb in ("weight", "bias"):
                eq(f[f"{o}{ft_name}.{wb}.bin"], sd[f"{p}{mpt_name}.{wb}"])
        qkv = sd[p + "attn.Wqkv.weight"].T.reshape(d, 3, H, d // H)  # (in, q|k|v, heads, head_dim)
        for r in range(TP):  # "rank R holds heads R*H/TP .. of q, k and v"
            heads = slice(r * H // TP, (r + 1) * H // TP)
            cols, inter = slice(r * d // TP, (r + 1) * d // TP), slice(r * I // TP, (r + 1) * I // TP)
            eq(f[f"{o}attention.query_key_value.weight.{r}.bin"], qkv[:, :, heads].reshape(d, 3, d // TP))
            eq(f[f"{o}attention.query_key_value.bias.{r}.bin"], sd[p + "attn.Wqkv.bias"].reshape(3, d)[:, cols])
            eq(f[f"{o}attention.dense.weight.{r}.bin"], sd[p + "attn.out_proj.weight"].T[cols])
            eq(f[f"{o}mlp.dense_h_to_4h.weight.{r}.bin"], sd[p + "ffn.up_proj.weight"].T[:, inter])
            eq(f[f"{o}mlp.dense_h_to_4h.bias.{r}.bin"], sd[p + "ffn.up_proj.bias"][inter])
            eq(f[f"{o}mlp.dense_4h_to_h.weight.{r}.bin"], sd[p + "ffn.down_proj.weight"].T[inter])
        eq(f[f"{o}attention.dense.bias.bin"], sd[p + "attn.out_proj.bias"])
        eq(f[f"{o}mlp.dense_4h_to_h.bias.bin"], sd[p + "ffn.down_proj.bias"])
    # Reading back: "(config, state_dict) under MPT's names"; fp32 files reproduce every weight bit for bit
    rcfg, rsd = read_fastertransformer(out)
    assert rcfg["no_bias"] is False and rcfg["tie_word_embeddings"] is False
    assert sorted(rsd) == sorted(sd)
    for k in sd:
        eq(rsd[k].numpy(), sd[k])

    # overwrite=True: "a stale model.lm_head.weight.bin cannot untie a tied head"; "other files stay"
    (out / "notes.txt").write_text("mine")
    tied = tiny_model()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_fastertransformer(tied, tmp_path / "ft", tensor_parallel=2)
    export_fastertransformer(tied, tmp_path / "ft", tensor_parallel=2, overwrite=True)
    assert not (out / "model.lm_head.weight.bin").exists() and (out / "notes.txt").read_text() == "mine"
    assert read_fastertransformer(out)[0]["tie_word_embeddings"] is True

    # Refusals, before anything is written
    with pytest.raises(ValueError, match="tensor_parallel"):  # "Heads and FFN width divisible by TP"
        export_fastertransformer(tied, tmp_path / "ft3", tensor_parallel=3)
    clip = tiny_model(clip_qkv=6.0)
    with pytest.raises(ValueError, match="clip_qkv.*force=True"):  # "raises ValueError naming them unless force=True"
        export_fastertransformer(clip, tmp_path / "ft4")
    with pytest.warns(UserWarning, match="clip_qkv"):  # "which warns and exports"
        export_fastertransformer(clip, tmp_path / "ft4", force=True)
    tied.save_pretrained(tmp_path / "ckpt")
    rms = tmp_path / "rms"
    rms.mkdir()
    for p in (tmp_path / "ckpt").iterdir():
        (rms / p.name).write_bytes(p.read_bytes())
    conf = json.loads((rms / "config.json").read_text())
    (rms / "config.json").write_text(json.dumps({**conf, "norm_type": "rmsnorm"}))
    refused = "model_or_dir: the export cannot compute this MPT: .*norm_type"  # "with or without force=True"
    with pytest.raises(ValueError, match=refused):
        export_fastertransformer(rms, tmp_path / "ft5", force=True)
    if importlib_util_find_spec("onnx") and importlib_util_find_spec("onnxscript"):
        with pytest.raises(ValueError, match=refused):
            onnx_export.export_onnx(rms, tmp_path / "onnx5")
    assert not [p for p in ("ft3", "ft5", "onnx5") if (tmp_path / p).exists()]  # "creates no output directory"

    # The command line: "python -m mpt_kernels.export <format>: error: <flag>: <cause>", exit status 2, no traceback
    for argv, says in [
        (["--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ft"), "--tp", "2"],
         r"error: --out: .* exists .*\(pass --overwrite .*\)"),  # "error: --out: ... exists ... (pass --overwrite ...)"
        (["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "ft6")], r"error: --model: .*does not exist"),
        (["--model", str(rms), "--out", str(tmp_path / "ft6"), "--force"],
         r"error: --model: the export cannot compute"),
        (["--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ft6"), "--tp", "3"], r"error: --tp: "),
        (["--model", str(tmp_path / "ckpt"), "--out", str(out / "config.ini" / "x")], r"error: --out: "),  # a file
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["fastertransformer", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert re.match(rf"python -m mpt_kernels\.export fastertransformer: {says}", last), last
    assert not (tmp_path / "ft6").exists()

    # "a missing optional package (pip install 'mpt_kernels[export]')"
    assert "pip install 'mpt_kernels[export]'" in text
    with pytest.raises(ImportError, match=re.escape("pip install 'mpt_kernels[export]'")):
        onnx_export._require("no_such_module_for_this_test")

    # "The two differ by at most 5e-4 absolute (near x = -2.7)"
    x = torch.linspace(-8, 8, 160001, dtype=torch.float64)
    diff = (torch.nn.functional.gelu(x) - torch.nn.functional.gelu(x, approximate="tanh")).abs()
    assert 4e-4 < diff.max() <= 5e-4 and abs(abs(float(x[diff.argmax()])) - 2.7) < 0.05
    assert "by at most 5e-4 absolute (near x = -2.7)" in " ".join(text.split())


def test_export_doc_input_checks(tmp_path, capsys, monkeypatch):
    """docs/export.md's rules for what an export reads and how it fails: wrapped models, weights held to the
    config (names, shapes, defaults for left-out fields), transformers objects that ignore their config, fp16's
    range, unreadable weight files, an interrupted export, --force's warning and what --verify says after it,
    and zero scales in the graph module."""
    import shutil

    from safetensors.torch import load_file, save_file

    import mpt_kernels.export.fastertransformer as ftmod
    from mpt_kernels.export import export_fastertransformer
    from mpt_kernels.export.__main__ import main
    from mpt_kernels.export.onnx import MPTGraph
    from mpt_kernels.model import MPTConfig

    flat = " ".join(EXPORT_MD.read_text().split())
    model = tiny_model()
    reference = export_fastertransformer(model, tmp_path / "ref")
    files = sorted(p.name for p in reference.iterdir())

    def same_files(out):
        return sorted(p.name for p in out.iterdir()) == files and all(
            (out / f).read_bytes() == (reference / f).read_bytes() for f in files)

    # "a torch.compile'd model, or one wrapped in DataParallel / DistributedDataParallel, is read as the model
    # inside" (DataParallel here: DDP needs a process group, torch.compile seconds of imports; tests/test_export.py
    # exports a compiled one)
    assert "a `torch.compile`'d model, or one wrapped in `DataParallel` / `DistributedDataParallel`" in flat
    assert same_files(export_fastertransformer(torch.nn.DataParallel(model), tmp_path / "dp"))

    def checkpoint(name, config_changes=None, weights_changes=None):
        path = tmp_path / name
        model.save_pretrained(path)
        if config_changes is not None:
            cfg = json.loads((path / "config.json").read_text())
            (path / "config.json").write_text(json.dumps(config_changes(cfg)))
        if weights_changes is not None:
            f = path / "model.safetensors"
            save_file(weights_changes(load_file(f)), f, metadata={"format": "pt"})
        return path

    # "Fields a config.json leaves out get MPTConfig's defaults, which are MPT's (max_seq_len 2048, expansion_ratio
    # 4, no_bias=True, ...)"
    assert "(`max_seq_len` 2048, `expansion_ratio` 4, `no_bias=True`, ...)" in flat
    defaults = MPTConfig.__dataclass_fields__
    assert (defaults["max_seq_len"].default, defaults["expansion_ratio"].default, defaults["no_bias"].default) == \
        (2048, 4, True)
    short = checkpoint("short", lambda c: {k: c[k] for k in ("model_type", "d_model", "n_heads", "n_layers",
                                                             "vocab_size")})
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(export_fastertransformer(short, tmp_path / "ft_short") / "config.ini")
    assert ini["gpt"]["max_pos_seq_len"] == "2048" and ini["gpt"]["inter_size"] == str(4 * model.config.d_model)

    # "The weights must be the MPT the config describes": the messages the doc quotes, in both formats, with force
    example = "transformer.wte.weight has shape (512, 64), the config implies (500, 64)"
    assert f"`{example} ...`" in flat
    for path, says in [
        (checkpoint("vocab", lambda c: {**c, "vocab_size": 500}), re.escape(example)),
        (checkpoint("biased", lambda c: {**c, "no_bias": False}), r"the weights lack .*\.bias"),
        (checkpoint("bias_under_no_bias", None, lambda sd: {**sd, "transformer.norm_f.bias": torch.zeros(64)}),
         r"the weights hold transformer.norm_f.bias, which this config .* does not use"),
        (checkpoint("wpe", None, lambda sd: {**sd, "transformer.wpe.weight": torch.zeros(64, 64)}),
         r"the weights hold transformer.wpe.weight"),
    ]:
        with pytest.raises(ValueError, match="model_or_dir: " + says):
            export_fastertransformer(path, tmp_path / "refused", force=True)
        with pytest.raises(ValueError, match="model_or_dir: " + says):
            MPTGraph(path)
    assert not (tmp_path / "refused").exists()

    # transformers' MptForCausalLM: refused "when its config holds any of: ..."
    listed = "`alibi_bias_max` other than 8, `qk_ln`, `logit_scale`, `no_bias=False`, `expansion_ratio` other than 4, " \
             "multi-query attention."
    assert listed in flat
    if importlib_util_find_spec("transformers"):
        import transformers

        for kw, named in [({"attn_config": {"alibi_bias_max": 16}}, "alibi_bias_max=16"),
                          ({"attn_config": {"qk_ln": True}}, "qk_ln"), ({"logit_scale": 0.5}, "logit_scale"),
                          ({"no_bias": False}, "no_bias=False"), ({"expansion_ratio": 3}, "expansion_ratio=3"),
                          ({"attn_config": {"attn_type": "multiquery_attention"}}, "1 key/value heads")]:
            hf = transformers.MptForCausalLM(transformers.MptConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=64,
                                                                    vocab_size=97, **kw))
            with pytest.raises(ValueError, match=r"model_or_dir: this MptForCausalLM \(transformers\) does not compute "
                                                 rf"the MPT its config describes: {re.escape(named)}"):
                MPTGraph(hf)
        MPTGraph(transformers.MptForCausalLM(transformers.MptConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=64,
                                                                    vocab_size=97)))  # a plain one exports

    # "fp16 exports refuse weights beyond float16's range": the file named, nothing left behind; fp32 holds it
    big = tiny_model()
    with torch.no_grad():
        big.transformer.blocks[1].ffn.down_proj.weight[3, 5] = 1e5
    example = "dtype: model.layers.1.mlp.dense_4h_to_h.weight.0.bin holds values beyond float16's range"
    assert f"`{example} ...`" in flat
    with pytest.raises(ValueError, match=re.escape(example) + r" .*export with dtype='fp32'"):
        export_fastertransformer(big, tmp_path / "ft16", dtype="fp16")
    assert not (tmp_path / "ft16").exists()
    export_fastertransformer(big, tmp_path / "ft32")
    if importlib_util_find_spec("onnx") and importlib_util_find_spec("onnxscript"):
        from mpt_kernels.export import export_onnx

        with pytest.raises(ValueError, match="dtype: transformer.blocks.1.ffn.down_proj.weight holds values beyond"):
            export_onnx(big, tmp_path / "onnx16", dtype="fp16")
        assert not (tmp_path / "onnx16").exists()

    # Unreadable weight files: "error: --model: <cause>", exit status 2, the file named; in Python a ValueError
    # naming it, a missing shard FileNotFoundError
    cut = checkpoint("cut")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:-100])
    junk = tmp_path / "junk"
    junk.mkdir()
    shutil.copy(cut / "config.json", junk)
    (junk / "pytorch_model.bin").write_bytes(b"junk" * 100)
    shard, index = tmp_path / "shard", tmp_path / "index"
    for d, index_text in ((shard, json.dumps({"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}})),
                          (index, "{")):
        d.mkdir()
        shutil.copy(cut / "config.json", d)
        (d / "model.safetensors.index.json").write_text(index_text)
    for path, named, exc in [(cut, cut / "model.safetensors", ValueError), (junk, junk / "pytorch_model.bin", ValueError),
                             (shard, shard / "model-00001-of-00002.safetensors", FileNotFoundError),
                             (index, index / "model.safetensors.index.json", ValueError)]:
        with pytest.raises(exc, match=re.escape(str(named))):
            export_fastertransformer(path, tmp_path / "unread")
        with pytest.raises(SystemExit) as info:
            main(["fastertransformer", "--model", str(path), "--out", str(tmp_path / "unread")])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("python -m mpt_kernels.export fastertransformer: error: --model: ")
        assert str(named) in err
    assert not (tmp_path / "unread").exists()

    # "Ctrl-C during an export exits with status 130 and one line"; "A FasterTransformer export that fails or is
    # interrupted removes the files and folders it created"; "config.ini is written last"
    real_write, written = ftmod._write, []

    def write_then_interrupt(path, *args):
        assert not (path.parent / "config.ini").exists()  # written after every array
        written.append(path)
        if len(written) == 5:
            raise KeyboardInterrupt
        real_write(path, *args)

    monkeypatch.setattr(ftmod, "_write", write_then_interrupt)
    argv = ["fastertransformer", "--model", str(checkpoint("ckpt")), "--out", str(tmp_path / "ft_int" / "sub")]
    assert main(argv) == 130
    out, err = capsys.readouterr()
    line = "python -m mpt_kernels.export <format>: interrupted; nothing was exported"
    assert f"(`{line}`)" in flat
    assert err.strip().splitlines()[-1] == line.replace("<format>", "fastertransformer") and "Traceback" not in err
    assert not (tmp_path / "ft_int").exists()  # the folders it created are gone too
    monkeypatch.setattr(ftmod, "_write", real_write)
    assert main(argv) == 0  # no --overwrite needed
    capsys.readouterr()

    # --force's warning is one line; --verify then names what --force dropped
    clip = tmp_path / "clip"
    tiny_model(clip_qkv=0.3).save_pretrained(clip)
    assert main(["fastertransformer", "--model", str(clip), "--out", str(tmp_path / "ft_clip"), "--force",
                 "--verify"]) == 0
    out, err = capsys.readouterr()
    warning = [ln for ln in err.splitlines() if "clip_qkv" in ln]
    assert len(warning) == 1 and warning[0].startswith("python -m mpt_kernels.export fastertransformer: warning: ")
    assert "UserWarning" not in err
    assert "verify: the files are without what --force dropped, so a difference is expected: clip_qkv=0.3" in out
    assert "`verify: the files are without what --force dropped, so a difference is expected: clip_qkv=...`" in flat

    # "--verify ... on 2 x 8 random tokens"
    from mpt_kernels.export.__main__ import _random_ids

    assert "on 2 x 8 random tokens" in flat and tuple(_random_ids(100).shape) == (2, 8)

    # softmax_scale=0 / logit_scale=0 are scales in the graph module, as in the model
    ids = torch.randint(0, 512, (2, 7))
    for kw in ({"softmax_scale": 0.0}, {"logit_scale": 0.0}):
        m = tiny_model(**kw)
        g = MPTGraph(m).eval()
        with torch.no_grad():
            torch.testing.assert_close(g(ids, None, *g.empty_past(2))[0], m(ids).logits, rtol=0, atol=1e-5)


def importlib_util_find_spec(name: str):
    import importlib.util

    return importlib.util.find_spec(name)


# ----------------------------------------------------------------------------------------------
# DESIGN.md section 3: the public API contract


def _expected(stub: str) -> inspect.Signature:
    ns: dict = {"torch": torch}  # defaults such as torch.float32
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
