"""Trainer: resumption and several processes beyond what test_training.py covers (dropout across a
resume, ...). Same micro model, corpus and helpers as test_training.py."""
import shutil

import pytest
import torch

from test_training import _micro_cfg, corpus, final_params, losses  # noqa: F401  (corpus: a fixture)


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
