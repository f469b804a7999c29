"""Preemption flag, save triggers and the non-finite guard, alone and across 2 real ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distrun import TORCHRUN

from launch import preemption
from launch.guard import nonfinite_flag
from launch.preemption import EXIT_REQUEUE, Preempted, RunControl

NAN, INF = float("nan"), float("inf")


def test_signal_sets_flag_and_stops_at_next_poll():
    before = signal.getsignal(signal.SIGUSR1)
    with RunControl(check_every=1) as control:
        assert control.poll(1) == preemption.Decision(save=False, stop=False)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert control.received == "SIGUSR1"
        assert control.poll(2) == preemption.Decision(save=True, stop=True)
    assert signal.getsignal(signal.SIGUSR1) is before


def test_stop_is_checked_only_every_n_steps():
    with RunControl(check_every=4, every_steps=3) as control:
        os.kill(os.getpid(), signal.SIGTERM)
        assert [control.poll(s) for s in (1, 2, 3)] == [
            preemption.Decision(),
            preemption.Decision(),
            preemption.Decision(save=True),
        ]
        assert control.poll(4) == preemption.Decision(save=True, stop=True)


def test_signal_handlers_are_restored_when_the_resume_fails(tmp_path):
    """fit() owns the handlers on every path: a resume refused before the first step gives them back."""
    from trainer_tiny import run

    from launch.errors import CheckpointError

    run(str(tmp_path), ["max_steps=2", "batch_size=8"])
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with pytest.raises(CheckpointError, match="cannot resume"):
        run(str(tmp_path), ["max_steps=4", "batch_size=8"], two_phase=True)  # another task: not resumable
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before


def test_every_minutes_trigger(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: now[0])
    control = RunControl(every_minutes=2.0)
    now[0] += 119
    assert not control.poll(1).save
    now[0] += 2
    assert control.poll(2).save
    control.saved()
    assert not control.poll(3).save


def test_preempted_exit_status_is_the_requeue_code():
    assert Preempted("stopped").exit_code == EXIT_REQUEUE == 75


def test_nonfinite_flag():
    grads = [torch.ones(3), None, torch.zeros(2)]
    assert nonfinite_flag(torch.tensor(1.0), grads).item() == 0.0
    assert nonfinite_flag(torch.tensor(NAN), grads).item() == 1.0
    assert nonfinite_flag(torch.tensor(1.0), [torch.tensor([1.0, INF])]).item() == 1.0
    assert nonfinite_flag(torch.tensor(1.0), [torch.tensor([NAN], dtype=torch.bfloat16)]).item() == 1.0


_TWO_RANKS = r"""
import os, signal, sys, torch, torch.distributed as td
from pathlib import Path
from launch import dist
from launch.checkpoint import CheckpointManager, save_file, rank_file
from launch.errors import CheckpointError
from launch.guard import nonfinite_flag
from launch.preemption import RunControl
td.init_process_group("gloo")
rank = dist.rank()
out = []
# only rank 1 is signalled: both ranks stop after the same step
with RunControl(check_every=2) as control:
    for step in range(1, 7):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        if control.poll(step).stop:
            out.append(f"stop@{step}")
            break
# only rank 1 sees a NaN: both ranks skip
loss = torch.tensor(float("nan") if rank == 1 else 1.0)
out.append(f"bad={dist.all_reduce_max(nonfinite_flag(loss, [torch.ones(2)])).item()}")
# rank 1 cannot write: both ranks raise, nothing is published
mgr = CheckpointManager(Path(sys.argv[1]), keep=2)
mgr.prepare()
def write(tmp):
    if rank == 1:
        raise OSError(28, "No space left on device", str(tmp))
    save_file({"x": 1}, rank_file(tmp, rank))
try:
    mgr.save(1, write)
except CheckpointError as err:
    expected = "No space left on device" if rank == 1 else "failed on another rank"
    out.append("agreed" if expected in str(err) else str(err))
out.append(f"published={len(mgr.checkpoints())}")
# one write: torchrun runs workers unbuffered (python -u), and print writes its end separately
print(f"rank{rank} " + " ".join(map(str, out)) + "\n", end="", flush=True)
td.destroy_process_group()
"""


@pytest.mark.dist
def test_two_ranks_agree_on_stop_skip_and_failed_save(tmp_path: Path):
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    proc = subprocess.run(
        [
            *TORCHRUN,
            str(script),
            str(tmp_path / "ck"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank"))
    assert lines == ["rank0 stop@4 bad=1.0 agreed published=0", "rank1 stop@4 bad=1.0 agreed published=0"]


_GROUP_SIGNAL = r"""
import os, time, torch
from torch.utils.data import DataLoader, IterableDataset
from launch.preemption import RunControl

class Slow(IterableDataset):
    def __iter__(self):
        for i in range(40):
            time.sleep(0.05)
            yield torch.tensor(i)

with RunControl() as control:
    batches = iter(DataLoader(Slow(), batch_size=None, num_workers=2, persistent_workers=True))
    seen = [int(next(batches)) for _ in range(4)]
    print("ready", flush=True)
    while control.received is None:
        time.sleep(0.01)
    seen += [int(next(batches)) for _ in range(6)]
print(control.received, len(seen), flush=True)
# exit with the workers still running: multiprocessing's exit handler SIGTERMs them, which must work
"""


def test_signal_to_the_process_group_spares_loader_workers(tmp_path):
    """torchrun / Slurm signal every process: the step in flight still gets its batches, and
    the workers still end when their parent stops them."""
    script = tmp_path / "group.py"
    script.write_text(_GROUP_SIGNAL)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout.readline().strip() == "ready"
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert out.split() == ["SIGTERM", "10"]
