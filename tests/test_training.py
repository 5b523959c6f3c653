"""Trainer: configs and overrides, schedule, MFU, atomic checkpoints, exact resumption after a kill
(also in the middle of a save), non-finite step skipping, finetuning, and 2-process DDP / FSDP2 on
the CPU (gloo) including a rank killed under torchrun --max-restarts=1.

Every run uses a "micro" model (the tiny preset shrunk to d_model 64, 2 layers) on a 150 kB slice of
the bundled corpus with a 512-token BPE, one thread per process: each run takes seconds."""
import contextlib
import io
import json
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _subproc import NEUTRAL_CWD, subprocess_env
from mpt_kernels.train import (Config, CosineWithWarmup, gpu_peak_flops, latest_checkpoint, list_checkpoints,
                               load_config, mfu, read_metrics, save_checkpoint)
from mpt_kernels.train import trainer as trainer_mod

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "training" / "train.py"
CONFIGS = sorted((ROOT / "training" / "configs").glob("*.yaml"))


def micro_args(tmp: Path, corpus: Path, **kw) -> list[str]:
    args = {
        "run_root": str(tmp / "runs"), "run_name": "micro", "seed": 3, "threads": 1, "progress": False,
        "device": "cpu",  # the gloo tests compare CPU runs; on a GPU machine "auto" would pick cuda
        "plot": False, "max_steps": 20, "global_batch_size": 4, "micro_batch_size": 4, "log_every": 1,
        "model.preset": "tiny", "model.overrides": "{d_model: 64, n_heads: 2, n_layers: 2}",
        "data.kind": "bundled", "data.seq_len": 32, "data.bpe_vocab_size": 512, "data.max_code_bytes": 150000,
        "data.val_fraction": 0.2, "data.cache_dir": str(corpus), "optim.lr": 3e-3, "scheduler.warmup_steps": 3,
        "checkpoint.save_every": 5, "checkpoint.keep_last": 3, "eval.every": 0, "eval.batches": 2,
        "eval.sample_tokens": 8,
    }
    args.update(kw)
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from mpt_kernels.data.corpus import build_default_corpus

    path = tmp_path_factory.mktemp("corpus")
    build_default_corpus(path, seq_len=32, vocab_size=512, val_fraction=0.2, max_code_bytes=150000, show_progress=False)
    return path


def run_train(args: list[str], *, torchrun: int = 0, extra: list[str] = (), timeout: int = 240) -> subprocess.CompletedProcess:
    env = subprocess_env(OMP_NUM_THREADS="1")
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               *extra, str(TRAIN), *args]
    else:
        cmd = [sys.executable, str(TRAIN), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=NEUTRAL_CWD)


def run_train_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """``python training/train.py ARGS`` in this process: the script itself, run as ``__main__`` through
    runpy from the same neutral working directory, its stdout and stderr captured and its exit status
    taken from its SystemExit (an exception it does not turn into one propagates, with its traceback).
    For command lines that need no process of their own: a subprocess spends seconds importing torch.
    torch's thread count (threads=1 sets it) is restored afterwards."""
    old_argv, old_cwd, threads = sys.argv, os.getcwd(), torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(NEUTRAL_CWD)
        sys.argv = [str(TRAIN), *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(TRAIN), run_name="__main__")
                code = 0
            except SystemExit as exc:
                code = 0 if exc.code is None else exc.code
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess([sys.executable, str(TRAIN), *args], code, out.getvalue(), err.getvalue())


def why(proc: subprocess.CompletedProcess) -> str:
    """The informative part of a failed run's output: error lines first, then the tail."""
    lines = (proc.stderr + proc.stdout).splitlines()
    errors = [ln for ln in lines if "Error" in ln or "error" in ln or "Traceback" in ln]
    return "\n".join(errors[-30:]) + "\n----- tail -----\n" + "\n".join(lines[-40:])


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", "train")}


def final_params(run_dir: Path, step: int) -> dict:
    ck = run_dir / "checkpoints" / f"step_{step:08d}"
    if (ck / "model.pt").is_file():
        return torch.load(ck / "model.pt", weights_only=True)
    from mpt_kernels.model import MPTForCausalLM

    return MPTForCausalLM.from_pretrained(run_dir / "hf").state_dict()


# --------------------------------------------------------------------------------------- config

def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("max_steps: 7\noptim:\n  lr: 3e-4\n  betas: [0.9, 0.95]\nmodel:\n  overrides: {alibi_bias_max: 16}\n")
    cfg = load_config(p, ["optim.lr=1e-3", "data.seq_len=64", "model.overrides.max_seq_len=4096", "eval.every=5",
                          "data.tokenizer=null", "checkpoint.autoresume=true"])
    assert cfg.max_steps == 7 and cfg.optim.lr == 1e-3 and cfg.optim.betas == [0.9, 0.95]
    assert cfg.model.overrides == {"alibi_bias_max": 16, "max_seq_len": 4096}
    assert cfg.data.seq_len == 64 and cfg.data.tokenizer is None and cfg.checkpoint.autoresume is True
    assert isinstance(load_config(p).optim.lr, float)  # YAML's "3e-4" string is read as a number
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="expected"):
        load_config(None, ["max_steps=many"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["max_steps"])
    with pytest.raises(ValueError, match="precision"):
        load_config(None, ["precision=fp8"])
    with pytest.raises(ValueError, match="section"):
        load_config(None, ["optim=3"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    from mpt_kernels.model import MPTConfig

    cfg = load_config(path)
    MPTConfig.from_preset(cfg.model.preset, **cfg.model.overrides)  # the model part is valid too
    assert cfg.global_batch_size % cfg.micro_batch_size == 0


def test_required_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "mpt-125m", "mpt-1b", "mpt-7b", "storywriter-finetune", "instruct-finetune"} <= names
    sw = load_config(ROOT / "training/configs/storywriter-finetune.yaml")
    assert sw.model.overrides["alibi_bias_max"] == 16 and sw.data.seq_len >= 65536


def test_schedule():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    s = CosineWithWarmup(opt, base_lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    lrs = [s.lr_at(i) for i in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert s.apply(5) == opt.param_groups[0]["lr"] == pytest.approx(0.6)


def test_mfu_and_peaks():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 156e12  # TF32
    assert gpu_peak_flops("Some Future GPU", "bf16") is None
    assert mfu(6e9, 1000.0, 12e12, world_size=1) == pytest.approx(0.5)
    assert mfu(6e9, 1000.0, 12e12, world_size=2) == pytest.approx(0.25)


def test_cpu_peak_is_measured_in_the_gemm_dtype(monkeypatch):
    """bf16 training on a CPU without bf16 dot products runs float32 GEMMs, so its MFU peak is float32's."""
    from mpt_kernels.model import modeling
    from mpt_kernels.train import metrics

    seen = []
    monkeypatch.setattr(metrics, "measure_cpu_peak_flops", lambda dt, seconds=0.5: seen.append((dt, seconds)) or 1e11)
    monkeypatch.setattr(modeling, "_FP32_GEMM_ON_CPU", True)
    cpu = torch.device("cpu")
    peak, source = metrics.peak_flops(cpu, "bf16", seconds=0.25)
    assert peak == 1e11 and "fp32 matmul (bf16" in source
    monkeypatch.setattr(modeling, "_FP32_GEMM_ON_CPU", False)
    assert "bf16 matmul (bf16" in metrics.peak_flops(cpu, "bf16")[1]
    metrics.peak_flops(cpu, "fp32")
    assert seen == [(torch.float32, 0.25), (torch.bfloat16, 0.5), (torch.float32, 0.5)]


# --------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_atomic_and_pruned(tmp_path):
    root = tmp_path / "ck"

    def writer(tag):
        return lambda d: (d / "model.pt").write_text(tag)

    for step in (1, 2, 3):
        save_checkpoint(root, step, rank=0, world_size=1, write=writer(f"s{step}"), trainer_state={}, keep_last=2)
    assert [s for s, _ in list_checkpoints(root)] == [2, 3]

    def crashing(d):
        (d / "model.pt").write_text("half")
        raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, 4, rank=0, world_size=1, write=crashing, trainer_state={}, keep_last=2)
    assert latest_checkpoint(root).name == "step_00000003"  # the half-written step 4 is invisible
    assert (root / ".tmp-step_00000004").exists()
    assert json.loads((latest_checkpoint(root) / "trainer.json").read_text())["step"] == 3
    save_checkpoint(root, 5, rank=0, world_size=1, write=writer("s5"), trainer_state={}, keep_last=2)
    assert not (root / ".tmp-step_00000004").exists()  # leftovers cleaned by the next save
    assert [s for s, _ in list_checkpoints(root)] == [3, 5]
    assert (root / "step_00000005" / "model.pt").read_text() == "s5"


# --------------------------------------------------------------------------------------- resume

@pytest.mark.slow
def test_resume_after_kill_is_exact(tmp_path, corpus):
    """20 steps straight == 10 steps + SIGKILL + 10 resumed; and a kill in the middle of the step-10
    save falls back to step 5 and still ends identically (losses and final parameters). The model has
    dropout, so the resumed run must also continue torch's RNG where the saved one was (its masks)."""
    drop = {"model.overrides": "{d_model: 64, n_heads: 2, n_layers: 2, resid_pdrop: 0.1, emb_pdrop: 0.1}"}
    straight = run_train(micro_args(tmp_path, corpus, run_name="straight", **drop))
    assert straight.returncode == 0, why(straight)

    killed = run_train(micro_args(tmp_path, corpus, run_name="killed", **{"fault.kill_at_step": 10}, **drop))
    assert killed.returncode == -signal.SIGKILL, why(killed)
    assert latest_checkpoint(tmp_path / "runs/killed/checkpoints").name == "step_00000010"
    again = run_train(micro_args(tmp_path, corpus, run_name="killed", **{"checkpoint.autoresume": True}, **drop))
    assert again.returncode == 0, why(again)
    assert "resumed from" in again.stderr

    mid = run_train(micro_args(tmp_path, corpus, run_name="midsave",
                               **{"fault.kill_at_step": 10, "fault.during_save": True}, **drop))
    assert mid.returncode == -signal.SIGKILL, why(mid)
    assert latest_checkpoint(tmp_path / "runs/midsave/checkpoints").name == "step_00000005"
    mid2 = run_train(micro_args(tmp_path, corpus, run_name="midsave", **{"checkpoint.autoresume": True}, **drop))
    assert mid2.returncode == 0, why(mid2)

    ref = losses(tmp_path / "runs/straight")
    assert sorted(ref) == list(range(1, 21))
    assert sum(list(ref.values())[-5:]) < sum(list(ref.values())[:5])  # it learns
    want = final_params(tmp_path / "runs/straight", 20)
    for name in ("killed", "midsave"):
        got = losses(tmp_path / "runs" / name)
        assert got == ref, name  # bit-identical: same data, same RNG, same arithmetic
        # the tokens count carries over the resume too (4 samples x 32 tokens a step)
        tokens = {r["step"]: r["tokens"] for r in read_metrics(tmp_path / "runs" / name / "metrics.jsonl", "train")}
        assert tokens == {s: s * 4 * 32 for s in range(1, 21)}, name
        params = final_params(tmp_path / "runs" / name, 20)
        for k in want:
            assert torch.equal(params[k], want[k]), (name, k)


# --------------------------------------------------------------------------------------- in-process

def _micro_cfg(tmp_path, corpus, **kw) -> Config:
    return load_config(None, micro_args(tmp_path, corpus, **{"threads": "null", **kw}))


@pytest.mark.parametrize("flush", [True, False])
def test_cpu_fit_flushes_denormals_and_restores_the_setting(tmp_path, corpus, monkeypatch, flush):
    """CPU training runs with denormals flushed to zero (on every pool thread: a parallel torch op
    inside a step sees them flushed), and the setting from before fit() is back afterwards, also
    when fit() raises. flush_denormals=false leaves it alone."""
    import mpt_kernels as mk
    from mpt_kernels.train import Trainer

    cfg = _micro_cfg(tmp_path, corpus, max_steps=2, flush_denormals=str(flush).lower(),
                     **{"checkpoint.save_every": 0, "checkpoint.save_hf": False, "eval.sample_tokens": 0,
                        "eval.every": -1})
    tr = Trainer(cfg)
    real = tr._forward_loss
    seen = []
    tiny = torch.full((1 << 20,), 1e-38)  # large enough for torch to split it across the pool

    def probe(batch):
        seen.append(bool(((tiny * 0.1) == 0).all()))  # 1e-39 is denormal: 0 when flushed
        return real(batch)

    monkeypatch.setattr(tr, "_forward_loss", probe)
    assert mk.set_flush_denormal(False) is False
    tr.fit()
    assert len(seen) >= 2 and set(seen) == {flush}  # every forward (micro-batches) of both steps
    assert mk.set_flush_denormal(False) is False  # restored: off, as before fit()
    assert ((tiny * 0.1) != 0).all()

    def boom(batch):
        raise RuntimeError("boom")

    tr2 = Trainer(_micro_cfg(tmp_path / "again", corpus, max_steps=2, flush_denormals=str(flush).lower(),
                             **{"checkpoint.save_every": 0, "checkpoint.save_hf": False, "eval.sample_tokens": 0,
                                "eval.every": -1}))
    monkeypatch.setattr(tr2, "_forward_loss", boom)
    with pytest.raises(RuntimeError, match="boom"):
        tr2.fit()
    assert mk.set_flush_denormal(False) is False


def test_nonfinite_step_is_skipped_and_logged(tmp_path, corpus, monkeypatch):
    from mpt_kernels.train import Trainer

    cfg = _micro_cfg(tmp_path, corpus, max_steps=4, **{"checkpoint.save_every": 0, "checkpoint.save_hf": False,
                                                       "eval.sample_tokens": 0, "eval.every": -1})
    tr = Trainer(cfg)
    real = tr._forward_loss
    calls = {"n": 0}
    snapshot = {}

    def poisoned(batch):
        calls["n"] += 1
        loss = real(batch)
        if calls["n"] == 3:  # third step: NaN gradients everywhere
            snapshot.update({k: v.detach().clone() for k, v in tr.raw_model.state_dict().items()})
            return loss * float("nan")
        return loss

    monkeypatch.setattr(tr, "_forward_loss", poisoned)
    after = {}
    real_step = tr.train_step

    def step_and_record(it):
        out = real_step(it)
        if calls["n"] == 3:
            after.update({k: v.detach().clone() for k, v in tr.raw_model.state_dict().items()})
        return out

    monkeypatch.setattr(tr, "train_step", step_and_record)
    summary = tr.fit()
    recs = read_metrics(cfg.run_dir / "metrics.jsonl")
    assert [r.get("skipped", False) for r in recs] == [False, False, True, False]
    assert summary["skipped_steps"] == 1
    for k in snapshot:
        assert torch.equal(snapshot[k], after[k]), k  # the poisoned step changed nothing
    assert all(torch.isfinite(p).all() for p in tr.raw_model.parameters())


def test_cpu_mfu_never_reads_above_100_percent_after_a_busy_startup(tmp_path, corpus, monkeypatch):
    """The start-up matmul can run on a busy machine and measure a peak far below what the cores do;
    the trainer re-measures at the first log step (and whenever MFU would read above 100%), before
    any evaluation, so no logged MFU exceeds 1."""
    from mpt_kernels.train import Trainer

    real = trainer_mod.peak_flops
    calls = []

    def peak(device, precision, seconds=0.5):
        calls.append(seconds)
        flops, src = real(device, precision, seconds=0.05)
        return (flops / 1000 if len(calls) == 1 else flops), src  # the first one "ran under load"

    monkeypatch.setattr(trainer_mod, "peak_flops", peak)
    cfg = _micro_cfg(tmp_path, corpus, max_steps=4, **{"checkpoint.save_every": 0, "checkpoint.save_hf": False,
                                                       "eval.sample_tokens": 0, "eval.every": 0, "log_every": 2})
    Trainer(cfg).fit()
    recs = [r for r in read_metrics(tmp_path / "runs" / "micro" / "metrics.jsonl", "train") if "mfu" in r]
    assert [r["step"] for r in recs] == [2, 4] and len(calls) >= 2
    assert all(0 < r["mfu"] <= 1 for r in recs), [r["mfu"] for r in recs]


def test_evaluation_and_checkpoints_stay_out_of_throughput(tmp_path, corpus, monkeypatch):
    """tokens/s (and MFU) measure training steps: the time of an evaluation or a checkpoint save taken
    between two log steps is not charged to the next window (it was: the window after each
    evaluation showed about half the throughput in the main job)."""
    import time as time_mod

    from mpt_kernels.train import Trainer

    cfg = _micro_cfg(tmp_path, corpus, max_steps=6, **{"checkpoint.save_every": 0, "checkpoint.save_hf": False,
                                                       "eval.sample_tokens": 0, "eval.every": 2, "log_every": 2})
    tr = Trainer(cfg)
    real, real_step = tr.evaluate, tr.train_step
    steps, slowed = {"done": 0}, []

    pause = 2.5  # far longer than two micro steps, even on a loaded machine

    def counted_step(it):
        out = real_step(it)
        steps["done"] += 1
        return out

    def slow_eval():
        # the evaluations between training steps (after steps 2 and 4); the one before training and the
        # final one fall in no throughput window, so they are not slowed down
        if 0 < steps["done"] < cfg.max_steps:
            slowed.append(steps["done"])
            time_mod.sleep(pause)
        return real()

    monkeypatch.setattr(tr, "train_step", counted_step)
    monkeypatch.setattr(tr, "evaluate", slow_eval)
    tr.fit()
    assert slowed == [2, 4]
    recs = {r["step"]: r for r in read_metrics(tmp_path / "runs" / "micro" / "metrics.jsonl", "train") if "tokens_per_s" in r}
    tokens = 2 * cfg.global_batch_size * cfg.data.seq_len  # per window of two steps
    for st in (4, 6):  # windows that follow an evaluation
        # charged with the evaluation, the window would take more than the pause itself (its two steps
        # take ~0.02 s, but over a second has been seen on a loaded 2-core machine: the bound is the pause)
        assert tokens / recs[st]["tokens_per_s"] < pause, (st, recs[st]["tokens_per_s"])


@pytest.mark.parametrize("optim", ["lion", "adamw"])
def test_skipped_step_count_survives_resume(tmp_path, corpus, monkeypatch, optim):
    from mpt_kernels.train import Trainer

    kw = {"optim.name": optim, "checkpoint.save_every": 3, "checkpoint.autoresume": True,
          "checkpoint.save_hf": False, "eval.sample_tokens": 0, "eval.every": -1}
    tr = Trainer(_micro_cfg(tmp_path, corpus, max_steps=3, **kw))
    real = tr._forward_loss
    calls = {"n": 0}

    def poisoned(batch):
        calls["n"] += 1
        return real(batch) * (float("nan") if calls["n"] == 2 else 1.0)

    monkeypatch.setattr(tr, "_forward_loss", poisoned)
    assert tr.fit()["skipped_steps"] == 1
    tr2 = Trainer(_micro_cfg(tmp_path, corpus, max_steps=5, **kw))
    summary = tr2.fit()  # resumes at step 3, two clean steps
    assert tr2.resume()[0] == 5 and summary["skipped_steps"] == 1


def test_finetune_instruct_and_hf_export(tmp_path, corpus):
    from mpt_kernels.model import MPTForCausalLM
    from mpt_kernels.train import Trainer

    rows = [{"prompt": f"Spell {w}.", "response": " ".join(w)} for w in ["cat", "dog", "tree", "lamp", "moon", "sun"]]
    data = tmp_path / "ft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _micro_cfg(tmp_path, corpus, run_name="ft", max_steps=12, **{
        "data.kind": "finetune", "data.finetune_path": str(data), "data.finetune_val_path": str(data),
        "data.tokenizer": str(corpus / "tokenizer.json"), "data.seq_len": 192, "data.finetune_format": "chatml",
        "checkpoint.save_every": 0, "eval.every": 0, "eval.batches": 1, "global_batch_size": 2,
        "micro_batch_size": 2})
    summary = Trainer(cfg).fit()
    assert summary["final_eval"]["loss"] < summary["first_eval"]["loss"]
    hf = Path(summary["hf_dir"])
    assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()
    ours = MPTForCausalLM.from_pretrained(hf)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.MptForCausalLM.from_pretrained(hf)
    x = torch.randint(0, 500, (1, 12))
    torch.testing.assert_close(theirs(x).logits, ours(x).logits, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("fmt", ["chatml", "mpt-instruct"])
def test_saved_tokenizer_loads_in_transformers_with_the_finetune_format(tmp_path, corpus, monkeypatch, fmt):
    """The saved folder's tokenizer_config.json: AutoTokenizer loads our tokenizer unchanged (length, eos,
    pad), its chat template renders exactly the text the finetune trained on, and a ChatML model's
    generation_config (and the end-of-run sample) stop at <|im_end|>, how its turns end."""
    transformers = pytest.importorskip("transformers")
    from mpt_kernels.data import load_tokenizer
    from mpt_kernels.data.finetune import IM_END, format_chatml, format_mpt_instruct, tokenize_example
    from mpt_kernels.train import Trainer

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": w}) + "\n" for w in ["cat", "dog"]))
    tr = Trainer(_micro_cfg(tmp_path, corpus, run_name="chat", max_steps=1, **{
        "data.kind": "finetune", "data.finetune_path": str(data), "data.tokenizer": str(corpus / "tokenizer.json"),
        "data.finetune_format": fmt, "data.seq_len": 160, "global_batch_size": 2, "micro_batch_size": 2,
        "checkpoint.save_every": 0, "eval.every": -1, "eval.sample_tokens": 4, "eval.sample_prompt": "Say dog."}))
    seen = {}
    real_generate = type(tr.raw_model).generate

    def generate(self, x, *a, **k):
        seen["eos"], seen["prompt"] = k.get("eos_token_id"), x[0].tolist()
        return real_generate(self, x, *a, **k)

    monkeypatch.setattr(type(tr.raw_model), "generate", generate)
    hf = Path(tr.fit()["hf_dir"])
    ours = load_tokenizer(hf)
    theirs = transformers.AutoTokenizer.from_pretrained(hf)
    assert len(theirs) == ours.vocab_size and theirs.pad_token_id == ours.pad_id == 1 and theirs.eos_token_id == 0
    rec = {"prompt": "Say cat.", "response": "cat"}
    segs = format_chatml(rec) if fmt == "chatml" else format_mpt_instruct(rec)
    msgs = [{"role": "user", "content": "Say cat."}, {"role": "assistant", "content": "cat"}]
    full = theirs.apply_chat_template(msgs, tokenize=False)
    assert full == "".join(t for t, _ in segs)
    assert theirs(full).input_ids == tokenize_example(segs, ours)[0].tolist()
    prompt = "".join(t for t, _ in (segs[:-2] if fmt == "chatml" else segs[:-1]))
    assert theirs.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == prompt
    gen = json.loads((hf / "generation_config.json").read_text())
    stops = [ours.token_to_id(IM_END), 0] if fmt == "chatml" else [0]
    assert seen["eos"] == stops and gen["eos_token_id"] == (stops if fmt == "chatml" else 0)
    # the end-of-run sample: eval.sample_prompt as the user's message, in the format, as training tokenizes it
    sample = format_chatml({"prompt": "Say dog.", "response": ""})[:-2] if fmt == "chatml" else \
        format_mpt_instruct({"prompt": "Say dog.", "response": ""})[:-1]
    assert seen["prompt"] == tokenize_example(sample, ours)[0].tolist()


# --------------------------------------------------------------------------------------- distributed

TWO_VS_ONE = dict(max_steps=8, global_batch_size=4, **{"checkpoint.save_every": 4, "eval.sample_tokens": 4})


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, corpus) -> Path:
    """The 1 rank x 4 reference of test_two_processes_match_one: the same command line for its ddp and
    fsdp cases, so it is run once for both (in this process; only the runs it is compared with need
    processes of their own). The tests only read its folder."""
    tmp = tmp_path_factory.mktemp("one_process")
    one = run_train_in_process(micro_args(tmp, corpus, run_name="one", micro_batch_size=4, **TWO_VS_ONE))
    assert one.returncode == 0, why(one)
    return tmp / "runs" / "one"


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, corpus, one_process_run, parallel):
    """Same global batch (4) as 2 ranks x 2 as 1 rank x 4: the same samples each step, so the same
    losses up to float summation order: the first steps to ~1e-7 relative. Later steps may drift
    further (docs/training.md, Distributed): a rounding difference in a gradient entry near zero can
    flip the sign of Lion's update there, and the difference grows from step to step (~4e-6 relative
    by step 6 with the 4.2M-parameter tiny model, 1e-4 by step 7 has been seen); in this micro config
    all 8 steps still agree to ~1e-7."""
    two = run_train(micro_args(tmp_path, corpus, run_name="two", micro_batch_size=2, parallel=parallel, **TWO_VS_ONE),
                    torchrun=2)
    assert two.returncode == 0, why(two)
    # FSDP2 warns on every forward when a wrapped module (a block, the model) returns a view
    assert "returned a view tensor" not in two.stderr + two.stdout
    a, b = losses(one_process_run), losses(tmp_path / "runs/two")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:
        # first steps: summation order only; later ones: the drift bound the docs give
        assert b[s] == pytest.approx(a[s], rel=2e-6 if s <= 3 else 1e-3), s
    assert (tmp_path / "runs/two/checkpoints/step_00000008/dcp").is_dir()  # sharded checkpoint
    pa, pb = final_params(one_process_run, 8), final_params(tmp_path / "runs/two", 8)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_rank_killed_under_torchrun_restarts_and_matches(tmp_path, corpus):
    common = dict(max_steps=10, global_batch_size=4, micro_batch_size=2, parallel="ddp",
                  **{"checkpoint.save_every": 3, "eval.sample_tokens": 0})
    calm = run_train(micro_args(tmp_path, corpus, run_name="calm", **common), torchrun=2)
    assert calm.returncode == 0, why(calm)
    marker = tmp_path / "killed.marker"
    hit = run_train(micro_args(tmp_path, corpus, run_name="hit", **common, **{
        "checkpoint.autoresume": True, "fault.kill_at_step": 7, "fault.rank": 1, "fault.marker": str(marker)}),
        torchrun=2, extra=["--max-restarts=1"])
    assert hit.returncode == 0, why(hit)
    assert marker.is_file() and "resumed from" in hit.stderr
    a, b = losses(tmp_path / "runs/calm"), losses(tmp_path / "runs/hit")
    assert b[10] == pytest.approx(a[10], rel=1e-6, abs=1e-6)
    assert sorted(b) == list(range(1, 11))


def test_activation_checkpointing_same_losses(tmp_path, corpus):
    """Recomputing blocks in backward changes nothing numerically (fp32, same kernels)."""
    from mpt_kernels.train import Trainer

    quiet = {"checkpoint.save_every": 0, "checkpoint.save_hf": False, "eval.sample_tokens": 0, "eval.every": -1}
    Trainer(_micro_cfg(tmp_path, corpus, run_name="plain", max_steps=4, **quiet)).fit()
    Trainer(_micro_cfg(tmp_path, corpus, run_name="ckpt", max_steps=4,
                       **{**quiet, "model.activation_checkpointing": True})).fit()
    assert losses(tmp_path / "runs/ckpt") == losses(tmp_path / "runs/plain")


def test_init_from_with_overrides_keeps_the_weights(tmp_path, corpus):
    """init_from + overrides (StoryWriter's alibi_bias_max 16, a longer max_seq_len) starts from the
    saved weights exactly; the changed model is built on the meta device (no second random init)."""
    from mpt_kernels.model import MPTForCausalLM
    from mpt_kernels.train import Trainer

    quiet = {"checkpoint.save_every": 0, "eval.sample_tokens": 0, "eval.every": -1}
    s = Trainer(_micro_cfg(tmp_path, corpus, run_name="base", max_steps=1, **quiet)).fit()
    saved = MPTForCausalLM.from_pretrained(s["hf_dir"]).state_dict()
    tr = Trainer(_micro_cfg(tmp_path, corpus, run_name="ft", max_steps=1, **quiet, **{
        "model.init_from": s["hf_dir"], "model.overrides": "{alibi_bias_max: 16, max_seq_len: 96}"}))
    assert tr.model_config.attn_config["alibi_bias_max"] == 16 and tr.model_config.max_seq_len == 96
    got = tr.raw_model.state_dict()
    assert got.keys() == saved.keys()
    for k in saved:
        assert got[k].device.type == "cpu" and torch.equal(got[k], saved[k]), k
    assert all(p.requires_grad for p in tr.raw_model.parameters())
    tr.fit()  # and it trains: every weight moves
    after = tr.raw_model.state_dict()
    assert all(not torch.equal(after[k], saved[k]) for k in saved)


def test_fp32_on_cuda_is_refused_up_front(tmp_path, corpus, monkeypatch):
    """The CUDA attention kernels take bf16/fp16: fp32 training on CUDA is refused when the trainer is
    made, not at the first attention call. (A GPU is faked: nothing reaches CUDA before the check.)"""
    from mpt_kernels.train import Trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: None)
    monkeypatch.setattr(trainer_mod, "_kernels_have_cuda", lambda: True)
    with pytest.raises(ValueError, match="^precision: fp32 training on CUDA"):
        Trainer(_micro_cfg(tmp_path, corpus, device="cuda", precision="fp32"))


def test_a_gpu_without_cuda_kernels_is_named_up_front(tmp_path, corpus, monkeypatch, capfd):
    """torch sees a GPU but mpt_kernels was built without CUDA kernels (no nvcc at install): device=cuda
    is refused when the trainer is made (it failed at the first LayerNorm, after the data and model were
    built); device=auto trains on the CPU and says why."""
    from mpt_kernels.train import Trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: None)
    monkeypatch.setattr(trainer_mod, "_kernels_have_cuda", lambda: False)
    with pytest.raises(ValueError, match="^device=cuda: torch sees a CUDA device, but this build of mpt_kernels has no CUDA"):
        Trainer(_micro_cfg(tmp_path, corpus, device="cuda", precision="bf16"))
    tr = Trainer(_micro_cfg(tmp_path, corpus, device="auto", run_name="auto"))
    assert tr.device.type == "cpu"
    assert "training on the CPU instead (device=auto)" in capfd.readouterr().err


def test_bf16_autocast_trains(tmp_path, corpus):
    """Forced bf16 autocast (emulated and slow on CPUs without native bf16, so only 3 steps)."""
    from mpt_kernels.train import Trainer

    quiet = {"checkpoint.save_every": 0, "checkpoint.save_hf": False, "eval.sample_tokens": 0, "eval.every": -1}
    Trainer(_micro_cfg(tmp_path, corpus, run_name="fp32", max_steps=1, **quiet)).fit()
    # with the end-of-run sample, which runs inside the autocast region (it died there: a float32 KV cache)
    bf16 = Trainer(_micro_cfg(tmp_path, corpus, run_name="bf16", max_steps=3, precision="bf16",
                              **{**quiet, "eval.sample_tokens": 6}))
    assert bf16.precision == "bf16"
    s = bf16.fit()
    assert s["sample"]
    got = losses(tmp_path / "runs/bf16")
    assert len(got) == 3 and all(torch.isfinite(torch.tensor(v)) for v in got.values())
    assert got[1] == pytest.approx(losses(tmp_path / "runs/fp32")[1], abs=0.05)  # bf16 rounding only
    assert s["final_eval"]["loss"] < 10


# --------------------------------------------------------------------------------------- reruns, finetuning

def test_rerun_without_autoresume_starts_clean(tmp_path, corpus):
    """The same command run again without autoresume is a new run: the earlier run's checkpoints (with
    higher steps, which keep_last would keep over the new ones and autoresume would continue) and its
    metrics (which would mix into the new summary) are removed, and a later autoresume continues the
    new run."""
    from mpt_kernels.train import Trainer

    quiet = {"eval.sample_tokens": 0, "eval.every": -1, "checkpoint.save_hf": False, "checkpoint.keep_last": 2,
             "checkpoint.save_every": 2}
    Trainer(_micro_cfg(tmp_path, corpus, run_name="same", max_steps=6, **quiet)).fit()
    run = tmp_path / "runs" / "same"
    first = losses(run)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4, 6]
    s = Trainer(_micro_cfg(tmp_path, corpus, run_name="same", max_steps=3, seed=4, **quiet)).fit()
    assert [st for st, _ in list_checkpoints(run / "checkpoints")] == [2, 3]
    second = losses(run)
    assert sorted(second) == [1, 2, 3] and second[1] != first[1]
    kinds = [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("start") == 1 and kinds.count("summary") == 1
    assert s["loss_first"] == pytest.approx(second[1]) and s["loss_last"] == pytest.approx(second[3])
    tr = Trainer(_micro_cfg(tmp_path, corpus, run_name="same", max_steps=4, seed=4,
                            **{**quiet, "checkpoint.autoresume": True}))
    assert tr.resume()[0] == 3


def _finetune_rows(tmp_path):
    words = ["cat", "dog", "tree", "lamp", "moon", "sun", "river", "mountain", "a", "keyboard"]
    rows = [{"prompt": f"Spell {w} {i}.", "response": " ".join(w) * (1 + i % 3)} for i, w in enumerate(words)]
    data = tmp_path / "ft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_finetune_loss_does_not_depend_on_the_micro_batch_split(tmp_path, corpus):
    """Responses differ in length: the step's loss is the mean over the global batch's target tokens,
    the same with one micro-batch of 4 as with 4 accumulated micro-batches of 1 (a mean of the
    micro-batches' means would weight a short response's tokens more)."""
    from mpt_kernels.train import Trainer

    data = _finetune_rows(tmp_path)
    common = {"data.kind": "finetune", "data.finetune_path": str(data), "data.tokenizer": str(corpus / "tokenizer.json"),
              "data.seq_len": 256, "checkpoint.save_every": 0, "checkpoint.save_hf": False, "eval.sample_tokens": 0,
              "eval.every": -1, "global_batch_size": 4}
    Trainer(_micro_cfg(tmp_path, corpus, run_name="one", max_steps=2, **common, micro_batch_size=4)).fit()
    Trainer(_micro_cfg(tmp_path, corpus, run_name="four", max_steps=2, **common, micro_batch_size=1)).fit()
    a, b = losses(tmp_path / "runs/one"), losses(tmp_path / "runs/four")
    assert a[1] == pytest.approx(b[1], rel=1e-5) and a[2] == pytest.approx(b[2], rel=1e-4)
    # tokens (and so tokens/s and MFU) count real tokens: the micro-batch of 4's right padding is
    # not counted, so both splits report the same, and less than samples x seq_len
    def tokens(run):
        return [r["tokens"] for r in read_metrics(tmp_path / "runs" / run / "metrics.jsonl", "train")]

    assert tokens("one") == tokens("four")
    assert 0 < tokens("one")[0] < tokens("one")[1] < 8 * 256


@pytest.mark.slow
def test_finetune_two_processes_match_one(tmp_path, corpus):
    """Finetuning under DDP with 2 ranks x 2 equals 1 rank x 4: the same losses (the target-count
    weighting across ranks) and the same real-token counts (each rank's padding differs: the
    counts are summed across ranks, not one rank's times two). The evaluation of a val set smaller
    than eval.batches x micro x ranks (10 < 8 x 4 x 1 = 8 x 2 x 2) reads the same 8 examples once
    either way (whole batches: 2 of 4, or 2 of 2 per rank) and gives the same loss."""
    data = _finetune_rows(tmp_path)
    common = {"max_steps": 3, "global_batch_size": 4, "data.kind": "finetune", "data.finetune_path": str(data),
              "data.tokenizer": str(corpus / "tokenizer.json"), "data.seq_len": 256, "checkpoint.save_every": 0,
              "checkpoint.save_hf": False, "eval.sample_tokens": 0, "eval.every": -1,
              "data.finetune_val_path": str(data), "eval.batches": 8}
    one = run_train_in_process(micro_args(tmp_path, corpus, run_name="one", micro_batch_size=4, **common))
    assert one.returncode == 0, why(one)
    two = run_train(micro_args(tmp_path, corpus, run_name="two", micro_batch_size=2, parallel="ddp", **common),
                    torchrun=2)
    assert two.returncode == 0, why(two)
    a, b = (read_metrics(tmp_path / "runs" / r / "metrics.jsonl", "train") for r in ("one", "two"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=2e-5, abs=2e-5)
        assert rb["tokens"] == ra["tokens"]
    assert a[-1]["tokens"] < 3 * 4 * 256
    ea, eb = (read_metrics(tmp_path / "runs" / r / "metrics.jsonl", "eval") for r in ("one", "two"))
    assert len(ea) == len(eb) == 1 and ea[0]["tokens"] == eb[0]["tokens"]
    assert eb[0]["loss"] == pytest.approx(ea[0]["loss"], rel=1e-5)
    assert "held-out evaluation reads 8 samples (2 batch(es) of 2 per process)" in two.stderr


def test_chatml_markers_grow_a_vocabulary_without_spare_rows(tmp_path, corpus):
    """A model whose vocabulary is exactly its tokenizer's (512, a multiple of 128) finetuned with
    ChatML, which adds two marker tokens: the embedding grows to the next multiple of 128, old rows
    unchanged, new rows at the mean embedding; the saved model has the new size, its EOS in
    config.json and a generation_config.json, and loads back."""
    from mpt_kernels.model import MPTForCausalLM
    from mpt_kernels.train import Trainer

    quiet = {"checkpoint.save_every": 0, "eval.sample_tokens": 0, "eval.every": -1}
    s = Trainer(_micro_cfg(tmp_path, corpus, run_name="base", max_steps=1, **quiet)).fit()
    base = MPTForCausalLM.from_pretrained(s["hf_dir"])
    assert base.config.vocab_size == 512
    cfg_json = json.loads((Path(s["hf_dir"]) / "config.json").read_text())
    gen_json = json.loads((Path(s["hf_dir"]) / "generation_config.json").read_text())
    assert cfg_json["eos_token_id"] == gen_json["eos_token_id"] == gen_json["pad_token_id"]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                     {"role": "assistant", "content": w}]}) + "\n"
                            for w in ["cat", "dog", "tree", "sun"]))
    tr = Trainer(_micro_cfg(tmp_path, corpus, run_name="chat", max_steps=2, **quiet, **{
        "model.init_from": s["hf_dir"], "data.kind": "finetune", "data.finetune_path": str(data),
        "data.finetune_format": "chatml", "data.seq_len": 64, "global_batch_size": 2, "micro_batch_size": 2}))
    assert tr.tokenizer.vocab_size == 514 and tr.model_config.vocab_size == 640
    w, w0 = tr.raw_model.transformer.wte.weight.detach(), base.transformer.wte.weight.detach()
    assert torch.equal(w[:512], w0) and torch.allclose(w[512:], w0.mean(0).expand(128, -1))
    out = tr.fit()
    again = MPTForCausalLM.from_pretrained(out["hf_dir"])
    assert again.config.vocab_size == 640 and again.transformer.wte.weight.shape == (640, 64)


def test_shards_seq_len_must_match_data_seq_len(tmp_path, corpus):
    from mpt_kernels.data.corpus import build_default_corpus
    from mpt_kernels.train import Trainer

    paths = build_default_corpus(corpus, seq_len=32, vocab_size=512, val_fraction=0.2, max_code_bytes=150000,
                                 show_progress=False)
    with pytest.raises(ValueError, match=r"data.seq_len=64, but the shards of data.streams hold 32-token samples"):
        Trainer(_micro_cfg(tmp_path, corpus, **{"data.kind": "shards", "data.seq_len": 64,
                                                 "data.streams": f"[{paths['code']['train']}]",
                                                 "data.tokenizer": str(corpus / "tokenizer.json")}))


def test_config_int_from_float_and_bad_values(tmp_path, corpus):
    assert load_config(None, ["max_steps=1e3"]).max_steps == 1000
    with pytest.raises(ValueError, match="expected"):
        load_config(None, ["max_steps=1.5"])
    with pytest.raises(ValueError, match="log_every must be >= 1"):
        load_config(None, ["log_every=0"])
    with pytest.raises(ValueError, match="data.seq_len must be >= 2"):
        load_config(None, ["data.seq_len=-1"])
    # the real script in a process of its own: a usage error is exit status 2 with no traceback
    r = subprocess.run([sys.executable, str(TRAIN), "log_every=0"], capture_output=True, text=True,
                       env=subprocess_env(), cwd=NEUTRAL_CWD, timeout=120)
    assert r.returncode == 2 and "error: config: log_every must be >= 1" in r.stderr and "Traceback" not in r.stderr
    # found by trying overrides: these passed the config checks and then raised a traceback in setup (run
    # in this process; the unknown preset on this module's corpus: the model is built after the data, and
    # tiny.yaml's own corpus would first be built, ~11 s)
    shared_corpus = [f"data.{k}={v}" for k, v in (("kind", "bundled"), ("seq_len", 32), ("bpe_vocab_size", 512),
                                                  ("max_code_bytes", 150000), ("val_fraction", 0.2),
                                                  ("cache_dir", corpus))]
    for override, says, data in (("model.preset=nope", "unknown preset 'nope'", shared_corpus),
                                 ("global_batch_size=7", "must be a multiple of micro_batch_size", [])):
        r = run_train_in_process([override, f"run_root={tmp_path}", *data])
        assert r.returncode == 2 and "error: setup:" in r.stderr and says in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr


@pytest.mark.parametrize("seed", range(4))
def test_random_trainer_combinations(tmp_path, corpus, seed):
    """Random combinations of what the trainer composes (optimizer, precision, accumulation, activation
    checkpointing, GQA/MQA, qk LayerNorm, untied head, eval/checkpoint cadence): every run trains
    (finite losses, every weight moves, metrics for every step, a loadable HF export), and splitting the
    global batch into micro-batches does not change the fp32 losses."""
    import math
    import random

    from mpt_kernels.model import MPTForCausalLM
    from mpt_kernels.train import Trainer

    rnd = random.Random(9000 + seed)
    heads = rnd.choice([2, 4])
    kv = rnd.choice([1, heads])
    overrides = (f"{{d_model: {16 * heads}, n_heads: {heads}, n_layers: {rnd.choice([1, 2])}, "
                 f"tie_word_embeddings: {rnd.choice(['true', 'false'])}, "
                 f"attn_config: {{attn_impl: flash, qk_ln: {rnd.choice(['true', 'false'])}"
                 + (f", attn_type: grouped_query_attention, kv_n_heads: {kv}" if kv != heads else "") + "}}")
    common = {"model.overrides": overrides, "optim.name": rnd.choice(["lion", "adamw"]),
              "model.activation_checkpointing": rnd.choice([True, False]), "global_batch_size": 4,
              "checkpoint.save_every": rnd.choice([0, 2]), "eval.every": rnd.choice([-1, 2]),
              "eval.sample_tokens": rnd.choice([0, 4]), "max_steps": 3}
    runs = {}
    for micro in (4, rnd.choice([1, 2])):
        cfg = _micro_cfg(tmp_path, corpus, run_name=f"m{micro}", micro_batch_size=micro, **common)
        s = Trainer(cfg).fit()
        got = losses(tmp_path / f"runs/m{micro}")
        assert sorted(got) == [1, 2, 3] and all(math.isfinite(v) for v in got.values()), (seed, micro, got)
        runs[micro] = got
        back = MPTForCausalLM.from_pretrained(s["hf_dir"])
        assert back.config.kv_n_heads == kv
    a, b = runs.values()
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=2e-4), (seed, common, a, b)
    # bf16 autocast on top of the same combination: trains, close to fp32 at step 1
    cfg = _micro_cfg(tmp_path, corpus, run_name="bf16", micro_batch_size=2, precision="bf16",
                     **{**common, "max_steps": 1, "eval.sample_tokens": 0, "eval.every": -1})
    Trainer(cfg).fit()
    assert losses(tmp_path / "runs/bf16")[1] == pytest.approx(runs[4][1], abs=0.05)


# --------------------------------------------------------------------------------------- user walkthrough

def test_text_overrides_are_taken_as_typed(tmp_path):
    """YAML parsing of every override mangled text fields: a newline became a space, a trailing space
    and a '# ...' went missing, and 123, 2024-06-01, no and 'Q: what' were refused as other types."""
    cases = {"eval.sample_prompt=<|im_start|>user\nhi<|im_end|>\n": ("eval", "sample_prompt", "<|im_start|>user\nhi<|im_end|>\n"),
             "eval.sample_prompt=def ": ("eval", "sample_prompt", "def "),
             "eval.sample_prompt=x = 1  # comment": ("eval", "sample_prompt", "x = 1  # comment"),
             "eval.sample_prompt=Q: what": ("eval", "sample_prompt", "Q: what"),
             "eval.sample_prompt=": ("eval", "sample_prompt", ""),
             "run_name=123": (None, "run_name", "123"), "run_name=2024-06-01": (None, "run_name", "2024-06-01"),
             "data.tokenizer=no": ("data", "tokenizer", "no"), "data.tokenizer=null": ("data", "tokenizer", None),
             "data.tokenizer=None": ("data", "tokenizer", None), "data.tokenizer=": ("data", "tokenizer", None),
             "data.tokenizer='null'": ("data", "tokenizer", "null"), 'model.init_from="None"': ("model", "init_from", "None"),
             "run_name=null": (None, "run_name", "null")}
    for override, (section, key, want) in cases.items():
        cfg = load_config(None, [override])
        got = getattr(getattr(cfg, section) if section else cfg, key)
        assert got == want, (override, got)
    # other fields still read YAML; a YAML file's text field given a number says to quote it
    assert load_config(None, ["max_steps=1e3", "data.streams=[a, b]"]).data.streams == ["a", "b"]
    (tmp_path / "c.yaml").write_text("run_name: 123\n")
    with pytest.raises(ValueError, match="run_name: expected text, got 123 .*put the text in quotes"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="run_name must not be empty"):
        load_config(None, ["run_name="])


@pytest.mark.parametrize("override, says", [
    ("data.streams=[{paht: data/x}]", r"data.streams\[0\]: unknown key\(s\) \['paht'\]; a stream takes \['path', 'proportion'\]"),
    ("data.streams=[{path:data/x}]", r"data.streams\[0\]: unknown key.*YAML needs a space after a colon"),
    ("data.streams=[{path: a, proportion: high}]", r"data.streams\[0\]: 'proportion' must be a number >= 0, got 'high'"),
    ("data.val_streams=[{path: a, proportions: 1}]", r"data.val_streams\[0\]: unknown key\(s\) \['proportions'\]"),
    ("data.streams=[{path: a, proportion: 1}, b]", "give a proportion for every stream or for none"),
    ("data.streams=[{path: a, proportion: 0}]", "the proportions sum to 0"),
    ("data.streams=[{proportion: 1}]", r"'path' must be the text of a folder path, got None \(missing\)"),
    ("data.streams=[[a]]", r"expected a path or \{path: ..., proportion: ...\}"),
    ("model.overrides.n_layer=2", "model.overrides: unknown key 'n_layer'; valid keys: .*'n_layers'"),
    ("model.overrides.n_layers=two", "model.overrides.n_layers: expected an integer, got 'two'"),
    ("model.overrides.attn_config.qk_ln=maybe", "model.overrides.attn_config.qk_ln: expected true or false"),
    ("model.overrides.n_heads=3", r"model.overrides .*d_model \(256\) must be divisible by n_heads \(3\)"),
    ("data.bundled_proportions.cod=0.5", r"data.bundled_proportions: unknown source\(s\) \['cod'\]"),
    ("data.bundled_proportions={code: 0, text: 0}", "at least one source a proportion > 0"),
])
def test_stream_entries_and_model_overrides_are_checked_up_front(override, says):
    """These passed load_config and then raised a KeyError/TypeError traceback in the trainer (or, for a
    misspelled bundled source, only after building a fresh corpus)."""
    with pytest.raises(ValueError, match=says):
        load_config(None, [override])


def test_bad_overrides_are_usage_errors_on_the_command_line(tmp_path):
    # train.py in this process (test_config_int_from_float_and_bad_values runs a usage error in a real one)
    for override, says in (("data.streams=[{paht: x}]", "unknown key(s) ['paht']"),
                           ("model.overrides.n_layer=2", "unknown key 'n_layer'")):
        r = run_train_in_process(["data.kind=shards", f"data.streams=[{tmp_path}/none]", override, f"run_root={tmp_path}"])
        assert r.returncode == 2 and "error: config:" in r.stderr and says in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def _other_tokenizer_shards(tmp_path, corpus, name="other"):
    """The code stream's documents converted with another BPE (a different vocabulary)."""
    from mpt_kernels.data import train_bpe_tokenizer
    from mpt_kernels.data.convert import convert
    from mpt_kernels.data.corpus import stdlib_code_documents

    texts = [d.text for d in stdlib_code_documents(max_bytes=60000)]
    tok = train_bpe_tokenizer(texts[::-1], 400, save_path=tmp_path / name / "tokenizer.json")
    src = tmp_path / f"{name}_src"
    src.mkdir()
    for i, t in enumerate(texts[:20]):
        (src / f"m{i}.py").write_text(t)
    convert([src], tmp_path / name, tokenizer=tok, seq_len=32, val_fraction=0.3, show_progress=False, log=lambda m: None)
    return tmp_path / name


def test_streams_and_init_from_of_another_tokenizer_are_refused(tmp_path, corpus):
    """Streams converted with different tokenizers were mixed silently (the trainer took the first
    stream's tokenizer), and model.init_from with data of another tokenizer trained without a word and
    saved the data's tokenizer beside weights trained with another. Each is refused naming both, also
    for an index written before the converter recorded the vocabulary hash; data.allow_tokenizer_mismatch
    overrides."""
    from mpt_kernels.train import Trainer

    other = _other_tokenizer_shards(tmp_path, corpus)
    code, text = corpus / "code", corpus / "text"
    quiet = {"checkpoint.save_every": 0, "eval.sample_tokens": 0, "eval.every": -1, "data.kind": "shards"}

    def cfg(**kw):
        return _micro_cfg(tmp_path, corpus, max_steps=1, **quiet, **kw)

    streams = f"[{{path: {code}/train, proportion: 0.5}}, {{path: {other}/train, proportion: 0.5}}]"
    with pytest.raises(ValueError, match=r"data.streams\[0\] \('.*code/train'\) and data.streams\[1\] \('.*other/train'\) "
                                         r"were tokenized with different tokenizers .*other/tokenizer.json"):
        Trainer(cfg(**{"data.streams": streams}))
    with pytest.raises(ValueError, match=r"data.streams\[0\] .* and data.val_streams\[0\] \('.*other/val'\)"):
        Trainer(cfg(**{"data.streams": f"[{code}/train]", "data.val_streams": f"[{other}/val]"}))
    for split in ("train", "val"):  # indexes from before the hash was recorded: the named tokenizer is read
        idx_path = other / split / "index.json"
        idx = json.loads(idx_path.read_text())
        del idx["tokenizer_vocab_sha256"]
        idx_path.write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="were tokenized with different tokenizers"):
        Trainer(cfg(**{"data.streams": f"[{code}/train]", "data.val_streams": f"[{other}/val]"}))
    with pytest.raises(ValueError, match=r"data.tokenizer=.* is not the tokenizer data.streams\[0\] .* was converted with"):
        Trainer(cfg(**{"data.streams": f"[{other}/train]", "data.tokenizer": str(corpus / "tokenizer.json")}))
    tr = Trainer(cfg(**{"data.streams": streams, "data.allow_tokenizer_mismatch": True}))
    assert tr.tokenizer.path == str((corpus / "tokenizer.json").resolve())
    # init_from: a model of the corpus tokenizer, data of the other one
    base = Trainer(cfg(run_name="base", **{"data.streams": f"[{code}/train]"})).fit()
    ft = {"run_name": "ft", "model.init_from": base["hf_dir"], "data.streams": f"[{other}/train]"}
    with pytest.raises(ValueError, match=r"model.init_from=.*base/hf' was trained with the tokenizer .*base/hf/"
                                         r"tokenizer.json' \(512 tokens\), but the data uses .*other/tokenizer.json' "
                                         r"\(400 tokens\).*data.allow_tokenizer_mismatch=true"):
        Trainer(cfg(**ft))
    assert not (tmp_path / "runs" / "ft").exists()  # a failed setup writes nothing (not even config.yaml)
    Trainer(cfg(**ft, **{"data.allow_tokenizer_mismatch": True, "checkpoint.save_hf": False}))
    # the same tokenizer re-saved beside the model (another file): accepted
    Trainer(cfg(**{**ft, "data.streams": f"[{code}/train]"}))


def test_zero_proportion_first_stream(tmp_path, corpus):
    """A first stream with proportion 0 was refused ("proportions must be >= 0 with a positive sum, got
    [0]"): the trainer built a dataset of the first stream alone to find the tokenizer."""
    from mpt_kernels.train import Trainer

    streams = f"[{{path: {corpus}/code/train, proportion: 0}}, {{path: {corpus}/text/train, proportion: 1}}]"
    tr = Trainer(_micro_cfg(tmp_path, corpus, **{"data.kind": "shards", "data.streams": streams}))
    assert tr.train_set.order.counts[0] == 0 and tr.train_set.order.counts[1] > 0
    assert tr.tokenizer.path == str((corpus / "tokenizer.json").resolve())


def test_resume_with_another_model_or_data_mix_is_a_usage_error(tmp_path, corpus, capsys):
    """checkpoint.autoresume=true with a changed model shape or stream mix raised a RuntimeError /
    ValueError traceback; it is an error that says to set checkpoint.autoresume=false or change run_name."""
    from mpt_kernels.train import Trainer, main

    quiet = {"eval.sample_tokens": 0, "eval.every": -1, "checkpoint.save_hf": False, "max_steps": 2,
             "checkpoint.save_every": 0}
    Trainer(_micro_cfg(tmp_path, corpus, **quiet)).fit()
    again = {**quiet, "checkpoint.autoresume": True}
    wider = "{d_model: 128, n_heads: 2, n_layers: 2}"
    with pytest.raises(ValueError, match=r"checkpoint.autoresume=true: the latest checkpoint of run 'micro' .* was "
                                          r"written with another model .*size mismatch.* Set checkpoint.autoresume=false"
                                          r" to start a new run .* or give this run a new run_name"):
        Trainer(_micro_cfg(tmp_path, corpus, **again, **{"model.overrides": wider})).fit()
    with pytest.raises(ValueError, match="written with another data mix"):
        Trainer(_micro_cfg(tmp_path, corpus, **again, **{"data.bundled_proportions": "{code: 0.5, text: 0.5}"})).fit()
    with pytest.raises(ValueError, match="written with optim.name=lion"):
        Trainer(_micro_cfg(tmp_path, corpus, **again, **{"optim.name": "adamw"})).fit()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(micro_args(tmp_path, corpus, **again, **{"model.overrides": wider}))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error: resume: checkpoint.autoresume=true" in err and "Traceback" not in err
    Trainer(_micro_cfg(tmp_path, corpus, **again)).fit()  # the unchanged config still resumes


def test_evaluation_reads_a_small_val_set_once(tmp_path, corpus, capfd):
    """A val set smaller than eval.batches x micro_batch_size x processes was read round and round (10
    examples evaluated as 32, some counted 4 times, some 3): now one pass, in whole batches, and the
    console says so. A val set smaller than one micro-batch is one smaller batch."""
    from mpt_kernels.data import FinetuneDataset, load_tokenizer
    from mpt_kernels.train import Trainer

    data = _finetune_rows(tmp_path)  # 10 examples
    common = {"data.kind": "finetune", "data.finetune_path": str(data), "data.finetune_val_path": str(data),
              "data.tokenizer": str(corpus / "tokenizer.json"), "data.seq_len": 256, "checkpoint.save_every": 0,
              "checkpoint.save_hf": False, "eval.sample_tokens": 0, "eval.every": 0, "eval.batches": 8,
              "global_batch_size": 4, "max_steps": 1}
    ref = FinetuneDataset(data, load_tokenizer(corpus / "tokenizer.json"), max_seq_len=256, shuffle=False)
    targets = [int((lab[1:] != -100).sum()) for _, lab in ref.examples]
    for micro, n_eval in ((4, 8), (16, 10)):
        tr = Trainer(_micro_cfg(tmp_path, corpus, run_name=f"m{micro}", micro_batch_size=micro,
                                **{**common, "global_batch_size": micro}))
        seen = []
        real = tr._forward_loss
        tr._forward_loss = lambda batch: seen.append(batch["input_ids"].shape[0]) or real(batch)
        ev = tr.evaluate()
        assert sum(seen) == n_eval and len(set(seen)) == 1, seen  # whole, equal batches
        assert ev["tokens"] == sum(targets[:n_eval])  # each example once
    out = capfd.readouterr().err
    assert "held-out evaluation reads 8 samples (2 batch(es) of 4 per process): the val set holds 10" in out


def test_console_shows_evaluations_without_the_progress_bar(tmp_path, corpus, capfd):
    """With progress=false the [eval] lines during training went only through the (absent) bar."""
    from mpt_kernels.train import Trainer

    Trainer(_micro_cfg(tmp_path, corpus, max_steps=4, **{"checkpoint.save_every": 0, "checkpoint.save_hf": False,
                                                           "eval.sample_tokens": 0, "eval.every": 2})).fit()
    err = capfd.readouterr().err
    assert "[eval] step 2: held-out loss" in err and "held-out before training" in err


def test_new_run_removes_the_earlier_runs_hf_export(tmp_path, corpus, capfd):
    """A new run (no autoresume) in an earlier run's folder kept that run's hf/ beside its own
    checkpoints when checkpoint.save_hf=false; it is removed with the rest (and the console says so),
    unless the new run reads from it."""
    from mpt_kernels.train import Trainer

    quiet = {"eval.sample_tokens": 0, "eval.every": -1, "checkpoint.save_every": 0, "max_steps": 1}
    Trainer(_micro_cfg(tmp_path, corpus, run_name="same", **quiet)).fit()
    hf = tmp_path / "runs" / "same" / "hf"
    assert (hf / "config.json").is_file()
    Trainer(_micro_cfg(tmp_path, corpus, run_name="same", **quiet, **{"checkpoint.save_hf": False})).fit()
    assert not hf.exists()
    assert "are removed; so is its Hugging Face export hf/" in capfd.readouterr().err
    # a run that starts from its own folder's export keeps it
    Trainer(_micro_cfg(tmp_path, corpus, run_name="same", **quiet)).fit()
    Trainer(_micro_cfg(tmp_path, corpus, run_name="same", **quiet, **{"checkpoint.save_hf": False,
                                                                    "model.init_from": str(hf)})).fit()
    assert (hf / "config.json").is_file() and "its hf/ is kept: this run reads from it" in capfd.readouterr().err


def test_failed_setup_writes_nothing_and_missing_files_name_the_directory(tmp_path, corpus):
    """config.yaml was written before the data was checked; a relative finetune path that does not
    exist said only '[Errno 2] No such file or directory'."""
    from mpt_kernels.train import Trainer

    with pytest.raises(FileNotFoundError, match=r"data.finetune_path='training/data/x.jsonl': no such file \(a "
                                                r"relative path is read from the current directory"):
        Trainer(_micro_cfg(tmp_path, corpus, **{"data.kind": "finetune", "data.finetune_path": "training/data/x.jsonl",
                                                 "data.tokenizer": str(corpus / "tokenizer.json")}))
    with pytest.raises(FileNotFoundError, match="no index.json"):
        Trainer(_micro_cfg(tmp_path, corpus, **{"data.kind": "shards", "data.streams": f"[{tmp_path}/nothing]"}))
    assert not (tmp_path / "runs").exists()


def test_print_config_into_a_closed_pipe_ends_quietly():
    """`python training/train.py --print-config | head -3` printed a BrokenPipeError traceback when
    head left before the dump was written. Here the pipe's reader is closed before the run starts."""
    root = Path(__file__).resolve().parents[1]
    rd, wr = os.pipe()
    os.close(rd)
    try:
        r = subprocess.run([sys.executable, "training/train.py", "--print-config"], cwd=root, stdout=wr,
                           stderr=subprocess.PIPE, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    finally:
        os.close(wr)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_pretraining_evaluation_is_the_mean_over_every_target_token(tmp_path, corpus):
    """evaluate(): the mean next-token loss over every target of the val samples it reads (seq_len - 1 per
    sample: a sample's first token is no target), and that count as "tokens"; recomputed here one sample
    at a time."""
    from mpt_kernels.train import Trainer

    tr = Trainer(_micro_cfg(tmp_path, corpus, max_steps=1, precision="fp32", micro_batch_size=2, global_batch_size=2,
                            **{"checkpoint.save_every": 0, "checkpoint.save_hf": False, "eval.sample_tokens": 0,
                               "eval.batches": 3}))
    ev = tr.evaluate()
    samples = [s["input_ids"] for s in tr.val_set]  # the samples evaluate() reads: 3 batches of 2
    assert len(samples) == 6
    with torch.no_grad():
        tr.raw_model.eval()
        total = sum(float(tr._forward_loss({"input_ids": x[None]})) * (x.numel() - 1) for x in samples)
    assert ev["tokens"] == 6 * 31
    assert ev["loss"] == pytest.approx(total / (6 * 31), rel=1e-5)
