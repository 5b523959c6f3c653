"""Trainer: resumption and several processes beyond what test_training.py covers (dropout across a
resume, a rank killed mid-save, ...). Same micro model, corpus and helpers as test_training.py."""
import shutil

import pytest
import torch

from test_training import _micro_cfg, corpus, final_params, losses, micro_args, run_train, why  # noqa: F401 (corpus: a fixture)


def _fork_at(src, dst, step: int, last: int) -> None:
    """``dst``: ``src`` as a kill right after its step-``step`` checkpoint would have left it."""
    shutil.copytree(src, dst)
    for ck in (dst / "checkpoints").glob("step_*"):
        if int(ck.name.split("_")[1]) > step:
            shutil.rmtree(ck)
    assert (dst / "checkpoints" / f"step_{step:08d}").is_dir() and last > step


def test_resume_with_dropout_is_exact(tmp_path, corpus):
    """Dropout draws from torch's default generator, and so did the start-up MFU measurement, the
    step-0 evaluation and the train loader's creation (a DataLoader iterator takes its base seed from
    it): a resumed run, which does those at another point of the stream, trained on other masks."""
    from mpt_kernels.train import Trainer

    kw = {"model.overrides": "{d_model: 64, n_heads: 2, n_layers: 2, resid_pdrop: 0.2, emb_pdrop: 0.2}",
          "checkpoint.save_every": 3, "eval.every": 2, "eval.sample_tokens": 0, "checkpoint.save_hf": False}
    Trainer(_micro_cfg(tmp_path, corpus, run_name="straight", max_steps=6, **kw)).fit()
    _fork_at(tmp_path / "runs/straight", tmp_path / "runs/resumed", 3, 6)
    Trainer(_micro_cfg(tmp_path, corpus, run_name="resumed", max_steps=6,
                       **{**kw, "checkpoint.autoresume": True})).fit()
    a, b = losses(tmp_path / "runs/straight"), losses(tmp_path / "runs/resumed")
    assert sorted(b) == list(range(1, 7))
    assert [b[s] for s in range(4, 7)] == [a[s] for s in range(4, 7)]
    pa, pb = final_params(tmp_path / "runs/straight", 6), final_params(tmp_path / "runs/resumed", 6)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=0, atol=0)


@pytest.mark.slow
def test_rank_killed_in_the_middle_of_a_sharded_save(tmp_path, corpus):
    """fault.during_save on a rank other than 0 (it killed nobody: only rank 0 ran the hook): rank 1
    dies with its shard of step 6 written, torchrun restarts both, and the run continues from step 3
    (the half-written step 6 is ignored) to the same losses as one process."""
    common = dict(max_steps=8, global_batch_size=4, **{"checkpoint.save_every": 3, "eval.sample_tokens": 0})
    one = run_train(micro_args(tmp_path, corpus, run_name="one", micro_batch_size=4, **common))
    assert one.returncode == 0, why(one)
    marker = tmp_path / "killed.marker"
    hit = run_train(micro_args(tmp_path, corpus, run_name="hit", micro_batch_size=2, parallel="fsdp", **common, **{
        "checkpoint.autoresume": True, "fault.kill_at_step": 6, "fault.rank": 1, "fault.during_save": True,
        "fault.marker": str(marker)}), torchrun=2, extra=["--max-restarts=1"])
    assert hit.returncode == 0, why(hit)
    assert "SIGKILL in the middle of saving step 6 (rank 1)" in hit.stderr
    assert "resumed from" in hit.stderr and "step_00000003" in hit.stderr
    a, b = losses(tmp_path / "runs/one"), losses(tmp_path / "runs/hit")
    assert sorted(b) == list(range(1, 9))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=2e-6 if s <= 3 else 1e-3), s
    assert not list((tmp_path / "runs/hit/checkpoints").glob(".tmp-*"))


def test_a_step_is_saved_once(tmp_path, corpus, monkeypatch):
    """A max_minutes stop on a save step, and a finished run started again with autoresume, do not
    write the same checkpoint a second time (a whole save, and a swap of step_N's folder during
    which no complete step_N exists: with keep_last=1, no checkpoint at all)."""
    from mpt_kernels.train import Trainer

    kw = {"checkpoint.save_every": 2, "checkpoint.keep_last": 1, "checkpoint.autoresume": True,
          "checkpoint.save_hf": False, "eval.sample_tokens": 0, "eval.every": -1}
    saved = []

    def trainer(**extra):
        tr = Trainer(_micro_cfg(tmp_path, corpus, max_steps=4, **{**kw, **extra}))
        real = tr.save
        monkeypatch.setattr(tr, "save", lambda step, consumed, **k: saved.append(step) or real(step, consumed, **k))
        return tr

    assert trainer(max_minutes=1e-9).fit()["steps"] == 1  # (stops after its first step)
    assert trainer(max_minutes=1e-9).fit()["steps"] == 2  # a save step
    assert saved == [1, 2]
    trainer().fit()
    assert saved == [1, 2, 4]
    trainer().fit()  # finished: nothing to train, nothing to save
    assert saved == [1, 2, 4]
    assert [p.name for p in (tmp_path / "runs/micro/checkpoints").iterdir()] == ["step_00000004"]


def test_summary_losses_leave_out_skipped_steps(tmp_path, corpus, monkeypatch):
    """A skipped step's loss is NaN: the summary's first/last-steps averages read nan with it."""
    import math

    from mpt_kernels.train import Trainer

    tr = Trainer(_micro_cfg(tmp_path, corpus, max_steps=3, **{
        "checkpoint.save_every": 0, "checkpoint.save_hf": False, "eval.sample_tokens": 0, "eval.every": -1}))
    real, calls = tr._forward_loss, []

    def poisoned(batch):
        calls.append(1)
        return real(batch) * (float("nan") if len(calls) == 1 else 1.0)

    monkeypatch.setattr(tr, "_forward_loss", poisoned)
    s = tr.fit()
    assert s["skipped_steps"] == 1 and math.isnan(losses(tmp_path / "runs/micro")[1])
    assert math.isfinite(s["loss_first"]) and math.isfinite(s["loss_last"])
