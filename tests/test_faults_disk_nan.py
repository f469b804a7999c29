"""Real processes: a poisoned batch is skipped on every rank and never reaches a checkpoint;
a full checkpoint disk gives one clear line and leaves the earlier checkpoints loadable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults_driver import COMMON, finish, start

from launch.checkpoint import TRAINER_FILE, checkpoints, latest, load_file, nonfinite_keys, read_meta


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits")


def _model(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:08d}" / TRAINER_FILE)


@pytest.mark.parametrize("fused", [False, True], ids=["host-guard", "fused-on-device"])
def test_poisoned_batches_are_skipped_then_the_run_stops(tmp_path, data_root, fused):
    """Step 3 alone is poisoned (skipped, weights unchanged), then steps 6-8 in a row: with
    max_bad_steps=3 the run stops naming step 8. Every checkpoint holds finite values.
    A fused AdamW skips inside its kernel (no host sync per step); the counters are read
    at log points, so it reports "by step 8" and no per-step warning."""
    run = tmp_path / "run"
    code, log = finish(
        start(
            run,
            "--fault=nan@3,6,7,8",
            "checkpoint.every_steps=1",
            "checkpoint.keep=100",
            "max_bad_steps=3",
            "log.every_steps=1",
            f"optim.fused={str(fused).lower()}",
            data_root=data_root,
        ),
        run,
    )
    assert code == 2, log[-3000:]
    assert log.strip().splitlines()[-1] == (
        f"faults_driver: error: loss or gradients were NaN/inf for 3 consecutive steps {'by' if fused else 'up to'} "
        "step 8 (trainer.max_bad_steps=3): lower the lr, enable trainer.optim.clip_grad or check the data; "
        f"{run / 'checkpoints' / 'step-00000007'} holds finite weights"
    )
    assert fused or "step 3: non-finite loss or gradients, step skipped (1 in a row)" in log
    skipped = {
        r["step"]: r.get("skipped_steps")
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if r.get("skipped_steps")
    }
    assert skipped == {3: 1.0, 6: 1.0, 7: 1.0}  # the run stopped inside step 8, before logging it
    states = {step: _model(run, step) for step in range(1, 8)}
    assert all(not nonfinite_keys(s) for s in states.values())
    for same in [(2, 3), (5, 6), (5, 7)]:  # a skipped step changes neither weights nor optimizer state
        a, b = (states[s] for s in same)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), same
        assert torch.equal(a["optimizers"][0]["state"][0]["exp_avg"], b["optimizers"][0]["state"][0]["exp_avg"])
        assert torch.equal(a["optimizers"][0]["state"][0]["step"], b["optimizers"][0]["state"][0]["step"])
    assert not torch.equal(states[3]["model"]["decoder.weight"], states[4]["model"]["decoder.weight"])


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare + tmpfs (user namespaces) for a really full disk")
def test_full_disk_is_one_line_error_and_earlier_checkpoints_load(tmp_path, data_root):
    """The checkpoint directory is a tmpfs in a private mount namespace; once checkpoint 8 is
    published a ballast file fills it, so the save of step 12 runs out of space mid-write."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    driver = " ".join(
        [
            sys.executable,
            str(Path(__file__).with_name("faults_driver.py")),
            str(run),
            *COMMON,
            "--step-delay=0.1",
            "log.every_steps=100",
            f"data.root={data_root}",
        ]
    )
    script = f"""
        mount -t tmpfs -o size=4m tmpfs {ckpts} || exit 9
        OMP_NUM_THREADS=1 {driver} &
        pid=$!
        until grep -qs step-00000008 {ckpts}/latest; do kill -0 $pid || break; sleep 0.02; done
        dd if=/dev/zero of={ckpts}/.ballast bs=4k 2>/dev/null
        wait $pid; echo exit=$?
        rm {ckpts}/.ballast; cp -a {ckpts} {run}/after
    """
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines() + proc.stderr.strip().splitlines()
    assert "exit=2" in lines, proc.stderr[-3000:]
    error = next(line for line in lines if line.startswith("faults_driver: error:"))
    assert error.startswith(
        f"faults_driver: error: cannot write checkpoint {ckpts}/step-00000012: No space left on device"
    ), error
    assert error.endswith("earlier checkpoints are intact (latest: step-00000008)"), error
    assert [p.name for p in checkpoints(run / "after")] == ["step-00000004", "step-00000008"]
    assert not list((run / "after").glob(".tmp-*"))
    newest = latest(run / "after")
    assert read_meta(newest)["step"] == 8 and load_file(newest / TRAINER_FILE)["step"] == 8
