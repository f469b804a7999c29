"""The one training loop in one process: accumulation, schedule, phases, artifacts, bad input."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from trainer_tiny import NUM_SAMPLES, TinyTask, TwoPhaseTask, run, synthetic_factory

from launch.config import TrainerConfig, load_config
from launch.data import DataConfig
from launch.errors import ConfigError, DataError
from launch.launcher import deepspeed_config
from launch.trainer import fit

BASE = ["optim.warmup_steps=2", "optim.base_lr=0.05", "optim.min_lr=0.001", "log.every_steps=1", "optim.clip_grad=1.0"]


@pytest.fixture(scope="module")
def big_batch(tmp_path_factory):
    """Reference run: one step = one batch of 32, three epochs."""
    out = tmp_path_factory.mktemp("big")
    return out, run(str(out), [*BASE, "epochs=3", "batch_size=32"])


def test_accumulation_equals_the_big_batch(big_batch, tmp_path):
    _, ref = big_batch
    acc = run(str(tmp_path), [*BASE, "epochs=3", "batch_size=8", "accum_steps=4"])
    assert acc.steps == ref.steps == 3 * NUM_SAMPLES // 32
    for (name, a), b in zip(ref.task.state_dict().items(), acc.task.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert acc.final_loss == pytest.approx(ref.final_loss, rel=1e-5)


def test_logged_lr_follows_warmup_and_cosine(big_batch):
    out, ref = big_batch
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in records if r["split"] == "train"}
    peak, floor, warmup, total = 0.05 * 32 / 256, 0.001, 2, ref.steps
    # the lr logged after step s is the one step s + 1 will use (0-based: s)
    assert lr[warmup - 1] == pytest.approx(peak)  # last warmup step runs at the peak
    s = 5
    cosine = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    assert lr[s] == pytest.approx(cosine)
    assert lr[total] == pytest.approx(floor)  # after the last step: min_lr


def test_run_artifacts_and_metrics(big_batch):
    out, ref = big_batch
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, ref.steps + 1))
    assert {"loss", "abs_err", "grad_norm", "lr", "images_per_s", "epoch"} <= set(train[-1])
    assert [r["step"] for r in records if r["split"] == "eval"] == [3, 6, 9]
    assert train[-1]["loss"] < train[0]["loss"]
    assert ref.eval["loss"] > 0 and ref.images_per_s > 0 and ref.mfu is None  # CPU: no peak, no MFU
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert ref.checkpoint == out / "checkpoints" / f"step-{ref.steps:08d}"
    assert (ref.checkpoint / "COMPLETE").is_file()


def test_two_phases_step_their_own_parameters(tmp_path):
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in TwoPhaseTask().state_dict().items()}
    result = run(str(tmp_path), [*BASE, "max_steps=3", "batch_size=16"], two_phase=True)
    after = result.task.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)  # both phases moved their part
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"first_loss", "second_loss"} <= set(records[0])


def _trainer_cfg(*overrides: str) -> TrainerConfig:
    return load_config(TrainerConfig, None, ["log.progress=false", *overrides])


def test_impossible_batch_split_fails_before_writing(tmp_path):
    (tmp_path / "config.yaml").write_text("precious: true\n")
    with pytest.raises(ConfigError) as err:
        fit(
            TinyTask(),
            _trainer_cfg("batch_size=64", "accum_steps=2"),
            None,
            tmp_path,
            seed=0,
            img_size=4,
            loader_factory=synthetic_factory(),
            config={"x": 1},
        )
    assert "trainer.batch_size=64 x trainer.accum_steps=2 x 1 ranks = 128 images per step, more than the 96" in str(
        err.value
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    assert (tmp_path / "config.yaml").read_text() == "precious: true\n"


def test_deepspeed_config_is_derived_and_checked(tmp_path):
    cfg = _trainer_cfg("backend=deepspeed", "batch_size=8", "accum_steps=2", "zero_stage=3", "optim.clip_grad=1.0")
    ds = deepspeed_config(cfg, world=4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        8,
        2,
        64,
    )
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 1.0
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 3, "overlap_comm": True}}))
    merged = deepspeed_config(cfg.model_copy(update={"deepspeed_config": str(user)}), world=4)
    assert merged["zero_optimization"] == {"stage": 3, "overlap_comm": True} and merged["train_batch_size"] == 64
    for bad, message in [
        (
            {"train_micro_batch_size_per_gpu": 16},
            "sets train_micro_batch_size_per_gpu=16 but the run config gives 8 (trainer.batch_size)",
        ),
        (
            {"zero_optimization": {"stage": 2}},
            "sets zero_optimization.stage=2 but the run config gives 3 (trainer.zero_stage)",
        ),
        ({"bf16": {"enabled": True}}, "sets bf16.enabled=True but the run config gives False (trainer.precision)"),
        ({"optimizer": {"type": "Adam"}}, "has an 'optimizer' section"),
    ]:
        user.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            deepspeed_config(cfg.model_copy(update={"deepspeed_config": str(user)}), world=4)


def test_deepspeed_refuses_several_optimizers(tmp_path):
    with pytest.raises(ConfigError, match="supports one optimizer; this task has several phases"):
        fit(
            TwoPhaseTask(),
            _trainer_cfg("backend=deepspeed"),
            None,
            tmp_path,
            seed=0,
            img_size=4,
            loader_factory=synthetic_factory(),
        )
    assert not any(tmp_path.iterdir())


def test_precision_can_change_between_fits_in_one_process(tmp_path):
    """pretrain then probe run in one process, each with its own precision (Accelerate's state is reset)."""
    fp32 = run(str(tmp_path / "fp32"), ["max_steps=2", "batch_size=16"])
    bf16 = run(str(tmp_path / "bf16"), ["max_steps=2", "batch_size=16", "precision=bf16"])
    assert math.isfinite(fp32.final_loss) and math.isfinite(bf16.final_loss)
    assert bf16.final_loss != fp32.final_loss  # autocast really ran in bf16


def test_pictures_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(str(tmp_path), ["max_steps=2", "batch_size=16"])  # ends mid-epoch: pictures come with the final eval
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert "images/input" in events.Tags()["images"] and "train/loss" in events.Tags()["scalars"]


def test_wandb_is_optional(tmp_path):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed: nothing to refuse")
    with pytest.raises(ConfigError, match=r"pip install 'mae-pipeline\[wandb\]'"):
        run(str(tmp_path), ["max_steps=1", "batch_size=16", "log.wandb=true"])
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.slow
def test_compiled_task_matches_eager(tmp_path):
    """trainer.compile=true (Accelerate's dynamo backend, inductor) trains the same weights."""
    eager = run(str(tmp_path / "eager"), ["max_steps=3", "batch_size=16"])
    compiled = run(str(tmp_path / "compiled"), ["max_steps=3", "batch_size=16", "compile=true"])
    assert type(compiled.task) is TinyTask  # unwrapped: checkpoint keys carry no _orig_mod prefix
    for name, value in eager.task.state_dict().items():
        torch.testing.assert_close(compiled.task.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_training_split_is_always_shuffled(tmp_path):
    """A probe trains with the (unshuffled) eval transform: the trainer must still ask for shuffling."""
    calls: list[tuple[str, str, bool | None]] = []
    inner = synthetic_factory()

    def recording(data, split, *, preset, shuffle=None, **kwargs):
        calls.append((split, preset, shuffle))
        return inner(data, split, preset=preset, shuffle=shuffle, **kwargs)

    fit(
        TinyTask(),
        _trainer_cfg("max_steps=1", "batch_size=16"),
        None,
        tmp_path,
        seed=0,
        img_size=4,
        train_preset="eval",
        loader_factory=recording,
    )
    assert calls == [("train", "eval", True), ("val", "eval", None)]


def test_skipped_samples_are_logged_and_too_many_stop_the_run(tmp_path):
    """Every train record, TensorBoard and the result carry the run's skipped-sample count; past
    data.max_skipped_fraction the run stops with one DataError, the last checkpoint intact."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["batch_size=16", "log.every_steps=1", "log.tensorboard=true"]
    result = run(str(tmp_path / "ok"), [*common, "max_steps=4"], data=DataConfig(max_skipped_fraction=0.5), skips=2)
    records = [json.loads(line) for line in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_samples"] for r in records if r["split"] == "train"] == [2, 4, 6, 8]
    assert result.skipped_samples == 8
    events = EventAccumulator(str(tmp_path / "ok" / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("train/skipped_samples")] == [2, 4, 6, 8]

    # 96 samples per epoch, 1 %: more than 0.96 skipped stops at the first log point after the checkpoint of step 2
    stop = tmp_path / "stop"
    with pytest.raises(DataError) as err:
        run(
            str(stop),
            ["batch_size=16", "log.every_steps=3", "checkpoint.every_steps=2", "max_steps=6"],
            data=DataConfig(max_skipped_fraction=0.01),
            skips=1,
        )
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        "data.max_skipped_fraction=0.01: 3 training samples skipped by step 3"
    )
    assert "last: synthetic skip, rank 0" in message and "step-00000002 is intact" in message
    assert (stop / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    assert not (stop / "checkpoints" / "step-00000004").exists()
