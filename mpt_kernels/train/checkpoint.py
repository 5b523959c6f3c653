"""Atomic, resumable training checkpoints.

Layout under ``<run>/checkpoints/``::

    step_00000040/          a complete checkpoint (the directory only ever appears by rename)
        trainer.json        step, samples consumed, data-order and scheduler state, world size
        model.pt, optim.pt  one process: plain torch.save
        dcp/                several processes: torch.distributed.checkpoint, one file per rank
        rng_rank0.pt ...    each rank's torch / numpy / Python RNG states
    .tmp-step_00000050/     a save in progress, or the remains of one killed mid-save

A save writes everything into ``.tmp-step_N``, flushes it to disk, then ``os.rename``s it to
``step_N``: a kill -9 at any instant leaves either the old set of checkpoints or the new one, never
a half-written ``step_N``. Leftover ``.tmp-*`` folders are ignored by readers and removed by the next
save. Only the newest ``keep_last`` checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

_STEP_RE = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    ck = list_checkpoints(root)
    return ck[-1][1] if ck else None


def _fsync_tree(path: Path) -> None:
    """Flush file contents and the directory entries, so the rename cannot overtake the data."""
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | os.PathLike, step: int, *, rank: int, world_size: int,
                    write: Callable[[Path], None], trainer_state: dict, keep_last: int,
                    barrier: Callable[[], None] = lambda: None,
                    before_rename: Callable[[Path], None] | None = None) -> Path:
    """Collective: every rank calls it. ``write(tmp_dir)`` writes this rank's part (model, optimizer;
    with several ranks through torch.distributed.checkpoint). Rank 0 adds ``trainer.json``, renames
    the folder into place and prunes old checkpoints. Returns the final path."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    write(tmp)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step, "world_size": world_size},
                                                     indent=1))
        if before_rename is not None:
            before_rename(tmp)
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (after a resume): swap, still atomically
            old = root / f".tmp-old-{final.name}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        dfd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_trainer_state(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "trainer.json").read_text())


def load_rng(path: str | os.PathLike, rank: int) -> None:
    f = Path(path) / f"rng_rank{rank}.pt"
    if f.is_file():  # a run resumed on more ranks than it was saved with: new ranks keep their seeds
        set_rng_state(torch.load(f, weights_only=False))
