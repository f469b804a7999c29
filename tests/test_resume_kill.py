"""Real processes killed and resumed: the final weights equal an uninterrupted run's, bit for bit.

One process is stopped three ways in a row (SIGTERM, a SIGKILL inside a checkpoint write, a
SIGKILL at a random step) and resumed with ``resume=auto`` each time; two processes under
``torchrun`` lose a worker to SIGKILL and the relaunched group resumes from the latest
checkpoint, and so does the group ``torchrun --max-restarts`` restarts by itself. The task
draws random masks from the torch RNG and reads real shards
with 2 DataLoader workers, so loader position and RNG states must both be restored exactly.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from faults_driver import assert_same_weights, final_weights, finish, start, wait_for

from launch.checkpoint import latest, read_meta, resolve
from launch.preemption import EXIT_REQUEUE


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root) -> dict:
    run = tmp_path_factory.mktemp("reference") / "run"
    code, log = finish(start(run, data_root=data_root), run)
    assert code == 0, log[-3000:]
    return final_weights(run)


def test_sigterm_kill_in_save_and_kill9_resume_bit_identical(tmp_path, data_root, reference):
    rng = random.Random()
    run = tmp_path / "run"

    # 1. SIGTERM: the step in flight finishes, every rank saves, exit status 75 (requeue)
    proc = start(run, "--step-delay=0.1", data_root=data_root)
    wait_for(_ckpt(run, 4), proc)
    proc.send_signal(signal.SIGTERM)
    code, log = finish(proc, run)
    assert code == EXIT_REQUEUE, log[-3000:]
    stopped = latest(run / "checkpoints")
    meta = read_meta(stopped)
    assert meta["reason"] == "preempted" and 4 < meta["step"] < 30, meta
    assert (
        log.strip().splitlines()[-1].startswith(f"faults_driver: error: stopped by SIGTERM after step {meta['step']}")
    )

    # 2. resumed, then SIGKILLed inside the next checkpoint write: that one stays partial
    doomed = (meta["step"] // 4 + 1) * 4
    code, log = finish(start(run, f"--fault=kill-in-save@{doomed}", data_root=data_root), run)
    assert code == -signal.SIGKILL, log[-3000:]
    assert (run / "checkpoints" / f".tmp-step-{doomed:08d}").is_dir()
    assert resolve("auto", run / "checkpoints") == stopped

    # 3. resumed from the previous complete checkpoint; SIGKILL at a random step after a new one
    proc = start(run, "--step-delay=0.1", data_root=data_root)
    wait_for(_ckpt(run, doomed), proc)
    time.sleep(rng.uniform(0.0, 1.2))
    proc.kill()
    code, log = finish(proc, run)
    assert code == -signal.SIGKILL and not (run / "final.pt").exists(), "the run ended before the kill"
    assert f"resumed from {stopped}" in log and "removing partial checkpoint" in log

    # 4. resumed to the end
    code, log = finish(start(run, data_root=data_root), run)
    assert code == 0, log[-3000:]
    assert_same_weights(final_weights(run), reference)


@pytest.fixture(scope="module")
def reference2(tmp_path_factory, data_root) -> dict:
    run = tmp_path_factory.mktemp("reference2") / "run"
    code, log = finish(start(run, data_root=data_root, nproc=2), run)
    assert code == 0, log[-3000:]
    return final_weights(run)


def _process_tree(pid: int) -> list[int]:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [p for child in children for p in _process_tree(int(child))]


@pytest.mark.dist
def test_two_processes_kill9_resume_bit_identical(tmp_path, data_root, reference2):

    run = tmp_path / "run"
    proc = start(run, "--step-delay=0.1", data_root=data_root, nproc=2)
    wait_for(_ckpt(run, 8), proc)
    time.sleep(random.uniform(0.0, 1.0))
    os.kill(int((run / "pid-1").read_text()), signal.SIGKILL)  # one worker dies: torchrun stops the other
    code, log = finish(proc, run)
    assert code != 0 and not (run / "final.pt").exists(), "the run ended before the kill"
    code, log = finish(start(run, data_root=data_root, nproc=2), run)
    assert code == 0, log[-3000:]
    assert "resumed from" in log
    assert_same_weights(final_weights(run), reference2)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(420)
def test_torchrun_max_restarts_resumes_bit_identical(tmp_path, data_root, reference2):
    """``torchrun --max-restarts 1``: rank 1 SIGKILLs itself mid-run in the first attempt;
    torchrun stops rank 0, restarts both, they rebuild the gloo group (``launch.dist``
    namespaces its store keys per attempt) and resume from the latest checkpoint."""
    crash = random.randint(5, 29)  # the forward of this step dies; step 4's checkpoint exists
    run = tmp_path / "run"
    code, log = finish(start(run, f"--fault=crash@{crash}", data_root=data_root, nproc=2, max_restarts=1), run)
    latest = _ckpt(run, (crash - 1) // 4 * 4)
    assert code == 0, f"crash at step {crash}: {log[-3000:]}"
    assert "exitcode: -9" in log, log[-3000:]
    assert sorted(f.name for f in run.glob("attempt-*")) == [f"attempt-{a}-rank-{r}" for a in (0, 1) for r in (0, 1)]
    assert log.count(f"resumed from {latest} ") == 2, f"crash at step {crash}: {log[-3000:]}"
    assert_same_weights(final_weights(run), reference2)


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_preemption_like_slurm(tmp_path, data_root, reference2):
    """What pretrain.sbatch does: SIGUSR1 to every process of the step (torchrun, workers,
    loader workers). torchrun shuts down instead of restarting, both ranks save the same
    step and exit 75; the relaunch ends with the uninterrupted weights."""
    run = tmp_path / "run"
    flags = ["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=120"]
    proc = start(run, "--step-delay=0.1", data_root=data_root, nproc=2, max_restarts=1, torchrun_flags=flags)
    wait_for(_ckpt(run, 4), proc)
    for pid in _process_tree(proc.pid):
        os.kill(pid, signal.SIGUSR1)
    code, log = finish(proc, run)
    assert code != 0 and log.count("exit status 75 = requeue") == 2, log[-3000:]
    meta = read_meta(latest(run / "checkpoints"))
    assert meta["reason"] == "preempted" and log.count("phase main") == 2  # no restart
    code, log = finish(start(run, data_root=data_root, nproc=2), run)
    assert code == 0, log[-3000:]
    assert_same_weights(final_weights(run), reference2)
