"""Checkpoints need one directory that every rank sees: checked at the start, resume agreed by rank 0."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from distrun import TORCHRUN

from launch.checkpoint import TRAINER_FILE, CheckpointManager, save_file
from launch.errors import CheckpointError

SCRIPT = Path(__file__).with_name("trainer_tiny.py")


def _checkpoint(directory: Path, step: int) -> Path:
    mgr = CheckpointManager(directory, keep=3, rank=0, agree=lambda ok: ok)
    mgr.prepare()
    return mgr.save(step, lambda tmp: save_file({"w": torch.ones(1)}, tmp / TRAINER_FILE))


def test_every_rank_takes_rank_0s_resume_choice(tmp_path: Path) -> None:
    """Rank 1's own view holds a newer checkpoint; it still resumes the one rank 0 picked."""
    chosen = _checkpoint(tmp_path / "shared", 4)
    _checkpoint(tmp_path / "shared", 2)
    _checkpoint(tmp_path / "rank1-view", 9)
    rank1 = CheckpointManager(
        tmp_path / "rank1-view", keep=3, rank=1, agree=lambda ok: ok, share=lambda obj: (str(chosen), None)
    )
    assert rank1.resolve_agreed("auto") == chosen
    fresh = CheckpointManager(
        tmp_path / "rank1-view", keep=3, rank=1, agree=lambda ok: ok, share=lambda obj: (None, None)
    )
    assert fresh.resolve_agreed("auto") is None  # rank 0 starts fresh: so does every rank


def test_a_checkpoint_missing_on_a_rank_stops_every_rank(tmp_path: Path) -> None:
    votes: list[bool] = []
    rank1 = CheckpointManager(
        tmp_path / "local",
        keep=3,
        rank=1,
        agree=lambda ok: votes.append(ok) or all(votes),
        share=lambda obj: (str(tmp_path / "elsewhere" / "step-00000004"), None),
    )
    with pytest.raises(CheckpointError, match="not visible on every rank"):
        rank1.resolve_agreed("auto")
    assert votes == [False]


def test_rank_0s_resume_error_reaches_every_rank(tmp_path: Path) -> None:
    rank1 = CheckpointManager(
        tmp_path,
        keep=3,
        rank=1,
        agree=lambda ok: ok,
        share=lambda obj: (None, "trainer.checkpoint.resume=/x: no such checkpoint"),
    )
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        rank1.resolve_agreed("/x")


def test_a_directory_rank_1_does_not_see_is_refused(tmp_path: Path) -> None:
    """Rank 0 wrote its marker into its own directory; rank 1's view is elsewhere."""
    rank0 = CheckpointManager(tmp_path / "node0", keep=1, rank=0, agree=lambda ok: ok)
    rank0._prepare_main("abc")
    rank1 = CheckpointManager(tmp_path / "node1", keep=1, rank=1, agree=lambda ok: ok, share=lambda obj: "abc")
    with pytest.raises(CheckpointError, match="not shared by all ranks.*every node mounts"):
        rank1.prepare()


@pytest.mark.dist
def test_node_local_run_dirs_stop_both_ranks_before_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "rank{rank}"
    cmd = [
        *TORCHRUN,
        str(SCRIPT),
        str(run_dir),
        "max_steps=2",
        "batch_size=8",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert proc.stderr.count("is not shared by all ranks") >= 2, proc.stderr[-3000:]  # both ranks, one line each
    for rank in (0, 1):  # stopped before the first step: no metrics, no checkpoint
        assert not (tmp_path / f"rank{rank}" / "metrics.jsonl").exists()
        assert not list((tmp_path / f"rank{rank}").rglob("step-*"))
