"""DeepSpeed in one process (world size 1, gloo): what does not need two ranks to show."""

from __future__ import annotations

import gc
import os
import socket
import weakref

import pytest
import torch
from trainer_tiny import TinyTask, run, synthetic_factory

from launch.config import TrainerConfig, load_config
from launch.trainer import Trainer


@pytest.fixture
def one_rank(monkeypatch):
    """The environment torchrun gives a single process. The world-1 process group DeepSpeed
    creates outlives the test (DeepSpeed caches it: destroying it breaks the next engine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "OMP_NUM_THREADS": "1",
    }.items():
        monkeypatch.setenv(key, value)
    before = dict(os.environ)
    yield
    # Accelerate's DeepSpeed path writes ACCELERATE_* variables into this process's environment:
    # later tests' torchrun children would inherit them and take them for a DeepSpeed launcher
    os.environ.clear()
    os.environ.update(before)


@pytest.mark.parametrize(("stage", "precision"), [(2, "fp32"), (2, "bf16"), (3, "bf16")])
def test_weights_only_reaches_deepspeeds_fp32_masters(tmp_path, one_rank, stage, precision):
    """``checkpoint.weights_only`` is loaded before DeepSpeed copies the module into its fp32
    masters (ZeRO-2 overwrote the loaded weights with the initial ones at the first step; ZeRO-3
    refused the load, its parameters being partitioned to shape [0])."""
    source = run(str(tmp_path / "source"), ["max_steps=2", "batch_size=16", "optim.base_lr=0.5"])
    loaded = {k: v.clone() for k, v in source.task.state_dict().items()}
    result = run(
        str(tmp_path / "ds"),
        [
            "max_steps=1",
            "batch_size=16",
            "backend=deepspeed",
            f"zero_stage={stage}",
            f"precision={precision}",
            "optim.lr=1e-12",
            f"checkpoint.weights_only={source.checkpoint}",
        ],
    )
    for name, value in result.task.state_dict().items():  # DeepSpeed starts its masters from the bf16 copy
        torch.testing.assert_close(value, loaded[name], rtol=1e-2, atol=1e-2, msg=name)


def test_zero3_keeps_no_second_model_during_training(tmp_path, one_rank):
    """ZeRO-3 exists to avoid a whole model per rank: the trainer holds none besides the engine's
    partitioned one, and hands the task itself back whole at the end."""
    cfg = load_config(
        TrainerConfig,
        None,
        ["log.progress=false", "max_steps=2", "batch_size=16", "backend=deepspeed", "zero_stage=3", "precision=bf16"],
    )
    task = TinyTask()
    before = _tiny_tasks()
    trainer = Trainer(task, cfg, None, tmp_path, seed=0, img_size=4, loader_factory=synthetic_factory())
    assert _tiny_tasks() == before
    result = trainer.fit()
    assert result.task is task and all(p.numel() > 0 and p.dtype == torch.float32 for p in task.parameters())


def _tiny_tasks() -> int:
    gc.collect()
    return sum(isinstance(o, TinyTask) for o in gc.get_objects())


def test_returned_task_keeps_no_engine(tmp_path, one_rank):
    """The task a DeepSpeed fit hands back holds nothing of the engine (DeepSpeed's ``destroy()``
    leaves its forward hooks on the module): the engine, its optimizer state and its process groups
    go with the trainer, so a process can tear its groups down before interpreter finalization."""
    cfg = load_config(
        TrainerConfig, None, ["log.progress=false", "max_steps=1", "batch_size=16", "backend=deepspeed", "zero_stage=2"]
    )
    trainer = Trainer(TinyTask(), cfg, None, tmp_path, seed=0, img_size=4, loader_factory=synthetic_factory())
    engine = weakref.ref(trainer.model)
    task = trainer.fit().task
    del trainer
    gc.collect()
    assert task is not None and engine() is None
