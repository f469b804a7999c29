"""Resume on another number of processes: real DDP and FSDP runs killed with SIGKILL mid-epoch and continued.

The driver (``faults_driver.py``) trains on the built-in digits shards with the real ``ShardLoader``
(2 DataLoader workers per rank) and masks drawn from the samples' seeds, and records the keys of
every optimizer step. 2 processes x batch 16 and 1 process x 2 micro-batches of 16 have the same
global batch (32): after a resume on either, every step holds exactly the uninterrupted run's
samples, and the final weights match it (bit for bit on the same world size). An FSDP checkpoint holds
each rank's shards of weights and AdamW state; ``torch.distributed.checkpoint`` re-splits them on load.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from faults_driver import assert_same_weights, final_weights, finish, start, wait_for

from launch.checkpoint import write_trainer_state
from launch.resume import restore_rank

SEEDED = "--masks=seeded"
ONE_PROC = "accum_steps=2"  # 1 process x 2 micro-batches of 16 = the 2-process global batch of 32
FSDP = "backend=fsdp"


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def _keys(run: Path, tags: list[str]) -> dict[int, list[str]]:
    """Keys per optimizer step over all ranks; a later launch's record wins for steps it re-did."""
    steps: dict[int, list[str]] = {}
    for tag in tags:
        launch: dict[int, list[str]] = {}
        for path in sorted(run.glob(f"keys-{tag}-rank-*.jsonl")):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                launch.setdefault(record["step"], []).extend(record["keys"])
        steps.update({step: sorted(keys) for step, keys in launch.items()})
    return steps


def _assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():  # another world size sums the same gradients in another order
        torch.testing.assert_close(value, b[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def _run(run: Path, *args: str, data_root: Path, nproc: int) -> str:
    code, log = finish(start(run, SEEDED, *args, data_root=data_root, nproc=nproc), run)
    assert code == 0, log[-3000:]
    return log


def _killed(run: Path, *args: str, data_root: Path, nproc: int) -> None:
    """Start a seeded run and SIGKILL its last rank at a random moment after the step-8 checkpoint."""
    proc = start(run, SEEDED, "--step-delay=0.1", "--record-keys=a", *args, data_root=data_root, nproc=nproc)
    wait_for(_ckpt(run, 8), proc)
    wait_for(run / f"pid-{nproc - 1}", proc)
    os.kill(int((run / f"pid-{nproc - 1}").read_text()), signal.SIGKILL)  # torchrun then stops the other rank
    code, _ = finish(proc, run)
    assert code != 0 and not (run / "final.pt").exists(), "the run ended before the kill"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits")


def _reference(run: Path, *args: str, data_root: Path) -> tuple[dict, dict[int, list[str]]]:
    """An uninterrupted 2-process run: final weights and keys per step."""
    _run(run, "--record-keys=a", *args, data_root=data_root, nproc=2)
    keys = _keys(run, ["a"])
    assert sorted(keys) == list(range(1, 31)) and all(len(k) == 32 for k in keys.values())
    return final_weights(run), keys


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root) -> tuple[dict, dict[int, list[str]]]:
    return _reference(tmp_path_factory.mktemp("reference") / "run", data_root=data_root)


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory, data_root) -> tuple[dict, dict[int, list[str]]]:
    return _reference(tmp_path_factory.mktemp("fsdp-reference") / "run", FSDP, data_root=data_root)


@pytest.fixture(scope="module")
def fsdp_killed(tmp_path_factory, data_root) -> Path:
    """A 2-process FSDP run killed mid-epoch (its sharded checkpoints hold 2 ranks' shards); tests copy it."""
    run = tmp_path_factory.mktemp("fsdp-killed") / "run"
    _killed(run, FSDP, data_root=data_root, nproc=2)
    latest = max((run / "checkpoints").glob("step-*"))  # the one a resume loads
    assert sorted(p.name for p in (latest / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    return run


@pytest.mark.dist
def test_two_processes_killed_resume_on_one_and_on_two(tmp_path, data_root, reference) -> None:
    weights, keys = reference
    run = tmp_path / "run"
    _killed(run, data_root=data_root, nproc=2)
    again = tmp_path / "again"
    shutil.copytree(run, again)

    log = _run(run, "--record-keys=b", ONE_PROC, data_root=data_root, nproc=1)
    assert "resumed from" in log and "since the checkpoint" not in log
    assert _keys(run, ["a", "b"]) == keys
    _assert_close_weights(final_weights(run), weights)

    log = _run(again, "--record-keys=b", data_root=data_root, nproc=2)
    assert "resumed from" in log
    assert _keys(again, ["a", "b"]) == keys
    assert_same_weights(final_weights(again), weights)


@pytest.mark.dist
def test_fsdp_two_processes_killed_resume_on_one(tmp_path, data_root, fsdp_reference, fsdp_killed) -> None:
    """The 2 ranks' shards of weights and AdamW state (moments, step) are re-read whole by 1 process."""
    weights, keys = fsdp_reference
    run = tmp_path / "run"
    shutil.copytree(fsdp_killed, run)
    log = _run(run, "--record-keys=b", FSDP, ONE_PROC, data_root=data_root, nproc=1)
    assert "resumed from" in log and "since the checkpoint" not in log
    assert _keys(run, ["a", "b"]) == keys
    _assert_close_weights(final_weights(run), weights)


@pytest.mark.slow
@pytest.mark.dist
def test_fsdp_two_processes_killed_resume_on_two(tmp_path, data_root, fsdp_reference, fsdp_killed) -> None:
    weights, keys = fsdp_reference
    run = tmp_path / "run"
    shutil.copytree(fsdp_killed, run)
    log = _run(run, "--record-keys=b", FSDP, data_root=data_root, nproc=2)
    assert "resumed from" in log
    assert _keys(run, ["a", "b"]) == keys
    assert_same_weights(final_weights(run), weights)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_one_process_killed_resumes_on_two(tmp_path, data_root, request, backend) -> None:
    weights, keys = request.getfixturevalue("fsdp_reference" if backend == "fsdp" else "reference")
    run = tmp_path / "run"
    proc = start(
        run, SEEDED, "--step-delay=0.1", "--record-keys=a", ONE_PROC, f"backend={backend}", data_root=data_root
    )
    wait_for(_ckpt(run, 8), proc)
    time.sleep(random.uniform(0.0, 1.0))
    proc.kill()
    code, _ = finish(proc, run)
    assert code == -signal.SIGKILL and not (run / "final.pt").exists(), "the run ended before the kill"
    log = _run(run, "--record-keys=b", f"backend={backend}", data_root=data_root, nproc=2)
    assert "resumed from" in log
    assert _keys(run, ["a", "b"]) == keys
    _assert_close_weights(final_weights(run), weights)


def test_another_global_batch_continues_at_the_same_sample_and_says_so(tmp_path, data_root, caplog) -> None:
    """Batch 16 for 4 steps, then batch 32: 64 samples are 2 steps of 32, so step 3 starts at sample 64."""
    from faults_driver import MaskedTiny

    from launch.config import TrainerConfig, load_config
    from launch.data import DataConfig, build_loader
    from launch.trainer import fit

    data = load_config(DataConfig, None, ["source=digits", f"root={data_root}", "workers=0", "hflip=0"])
    common = ["log.progress=false", "log.tensorboard=false", "eval_every_epochs=0", "log.images_every_epochs=0"]
    for tag, batch in (("a", 16), ("b", 32)):
        cfg = load_config(TrainerConfig, None, [*common, "max_steps=4", f"batch_size={batch}"])
        task = MaskedTiny(seeded=True, record=tmp_path / f"keys-{tag}-rank-0.jsonl")
        with caplog.at_level("WARNING", logger="launch.trainer"):
            fit(task, cfg, data, tmp_path / "run", seed=0, img_size=8)
    assert "global batch 16 -> 32 images per step since the checkpoint" in caplog.text
    assert "as step 2 of 4 (was step 4)" in caplog.text
    loader = build_loader(data, "train", preset="pretrain", batch_size=16, img_size=8, seed=0, shuffle=True)
    expected = [b["key"] for b in itertools.islice(loader, 8)]
    assert _keys(tmp_path, ["a"]) == {s + 1: sorted(expected[s]) for s in range(4)}
    assert _keys(tmp_path, ["b"]) == {3: sorted(expected[4] + expected[5]), 4: sorted(expected[6] + expected[7])}


@pytest.mark.timeout(120)
def test_a_resume_with_no_full_step_left_in_the_epoch_moves_to_the_next(tmp_path, data_root, caplog) -> None:
    """300 samples: 18 full batches of 16 (drop_last), stopped after 17; accum_steps=2 has no full step left."""
    result = _resume_with_two_by_sixteen(tmp_path, data_root, caplog, ["max_steps=17"])
    assert "as step 9 of 11 (was step 17)" in caplog.text
    assert result.steps == 11 and result.epochs == 1 and sorted(_keys(tmp_path, ["b"])) == [10, 11]


@pytest.mark.timeout(120)
def test_a_larger_batch_with_no_batch_left_in_the_epoch_moves_to_the_next(tmp_path, data_root, caplog) -> None:
    """300 samples, stopped after 17 steps of 16 (28 samples left): a resume with batch 32 has no batch of
    its own left in epoch 0, so it starts epoch 1 as step 9, not epoch 0 again from step 0."""
    result = _resume_with_two_by_sixteen(tmp_path, data_root, caplog, ["max_steps=17"], ["batch_size=32"])
    assert "as step 9 of 11 (was step 17)" in caplog.text
    assert result.steps == 11 and sorted(_keys(tmp_path, ["b"])) == [10, 11]


def _resume_with_two_by_sixteen(
    tmp_path, data_root, caplog, first: list[str], then: tuple[str, ...] = ("accum_steps=2",)
):
    """A single-process fit on the 300 digits with ``first`` (batch 16), then the same run resumed
    with ``then`` (default 2 x 16 per step) up to step 11; records each step's keys (tags "a", "b")."""
    from faults_driver import MaskedTiny

    from launch.config import TrainerConfig, load_config
    from launch.data import DataConfig
    from launch.trainer import fit

    data = load_config(DataConfig, None, ["source=digits", f"root={data_root}", "workers=0", "hflip=0"])
    common = ["log.progress=false", "log.tensorboard=false", "eval_every_epochs=0", "log.images_every_epochs=0"]
    for tag, overrides in (("a", first), ("b", ["max_steps=11", *then])):
        cfg = load_config(TrainerConfig, None, [*common, "batch_size=16", *overrides])
        task = MaskedTiny(seeded=True, record=tmp_path / f"keys-{tag}-rank-0.jsonl")
        with caplog.at_level("WARNING", logger="launch.trainer"):
            result = fit(task, cfg, data, tmp_path / "run", seed=0, img_size=8, train_split="val", eval_split="none")
    return result


@pytest.mark.timeout(120)
def test_a_resume_at_an_epoch_end_with_unread_batches_starts_the_next_epoch(tmp_path, data_root, caplog) -> None:
    """300 samples: 18 batches of 16; 4 steps of 4 leave 2 unread when epoch 0 ends (the loader is still in
    it). A resume with 2 x 16 per step starts epoch 1 at its first step (9 steps per epoch), not near its end."""
    result = _resume_with_two_by_sixteen(tmp_path, data_root, caplog, ["max_steps=4", "accum_steps=4"])
    assert "as step 9 of 11 (was step 4)" in caplog.text
    assert result.steps == 11 and result.epochs == 1 and sorted(_keys(tmp_path, ["b"])) == [10, 11]


def test_another_optimizer_is_refused_with_one_line(tmp_path) -> None:
    from trainer_tiny import run

    from launch.errors import CheckpointError

    run(str(tmp_path), ["max_steps=2", "batch_size=8"])
    with pytest.raises(CheckpointError, match=r'checkpoint has optimizers=\["adamw"\], this run has \["sgd"\]') as err:
        run(str(tmp_path), ["max_steps=4", "batch_size=8", "optim.name=sgd"])
    assert "\n" not in str(err.value)


@pytest.mark.dist
def test_a_deepspeed_checkpoint_of_another_world_size_is_refused_with_one_line(tmp_path) -> None:
    """ZeRO partitions the optimizer state per rank (FSDP's DCP checkpoint reshards: tests above):
    the world size must match; the checkpoint stays as it was."""
    import subprocess
    import sys

    def tiny(max_steps: int) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "1",
            str(Path(__file__).parent / "trainer_tiny.py"),
            str(tmp_path),
            f"max_steps={max_steps}",
            "batch_size=8",
            "backend=deepspeed",
        ]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )

    assert tiny(2).returncode == 0
    meta_file = _ckpt(tmp_path, 2) / "meta.json"
    meta_file.write_text(
        json.dumps({**json.loads(meta_file.read_text()), "world_size": 2})
    )  # as if 2 processes wrote it
    proc = tiny(4)
    assert proc.returncode != 0
    assert (
        f"CheckpointError: cannot resume the deepspeed checkpoint {_ckpt(tmp_path, 2)} of 2 processes on 1: "
        "relaunch with 2 processes\n"
    ) in proc.stderr
    assert (_ckpt(tmp_path, 2) / "COMPLETE").exists() and not _ckpt(tmp_path, 4).exists()


class _Loader:
    def load_state_dict(self, state: dict) -> None:
        self.state = state


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_skipped_sample_count_survives_a_resume_on_another_world_size(tmp_path, world) -> None:
    """Each rank counts its own skipped samples and the log sums them over ranks; on another world size
    the new ranks must together start from the old ranks' total (not each from rank 0's count)."""
    for rank, corrupt in enumerate([3, 5]):  # a checkpoint of 2 ranks: 8 samples skipped in all
        write_trainer_state(tmp_path, {"step": 4}, {"epoch": 0, "position": 64, "corrupt": corrupt}, rank)
    counts = []
    for rank in range(world):
        loader = _Loader()
        restore_rank(loader, tmp_path, rank=rank, world=world, saved_world=2, seed=0, step=4)
        assert loader.state["position"] == 64
        counts.append(loader.state["corrupt"])
    assert sum(counts) == 8
    if world == 2:
        assert counts == [3, 5]  # the same ranks keep their own counts
