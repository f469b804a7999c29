"""``trainer.backend=fsdp`` in one process (a 1-rank group: FSDP2's DTensors, hooks and
checkpoints all run): units, bf16 policy, multi-phase parity with DDP, sharded checkpoints
read back without a group, and the asynchronous-save protocol of the checkpoint manager."""

from __future__ import annotations

import itertools
import json
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.distributed.tensor import DTensor
from trainer_tiny import TinyTask, run, synthetic_factory

from launch.checkpoint import CheckpointManager, load_weights
from launch.config import TrainerConfig, load_config
from launch.errors import CheckpointError, ConfigError
from launch.fsdp import SHARDED_DIR, read_model, units
from launch.trainer import Trainer
from pretrain.presets import create_mae

COMMON = [
    "epochs=1",
    "optim.warmup_steps=1",
    "optim.clip_grad=1.0",
    "log.every_steps=1",
    "batch_size=8",
    "accum_steps=2",
]


def test_units_are_the_encoder_and_decoder_blocks():
    mae = create_mae("mae_vit_mnist_p7", depth=2, decoder_depth=1)
    assert units(mae) == [*mae.blocks, *mae.decoder_blocks]

    class Holder(nn.Module):  # no forward: its encoder / decoder are called directly
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 2)

    stack = nn.ModuleList([Holder()])
    assert units(nn.Sequential(stack)) == [stack[0].encoder[0]]  # the bare decoder belongs to the root


def test_each_units_whole_weights_are_freed_as_soon_as_it_is_sharded(tmp_path, monkeypatch):
    """The optimizers are built on the whole task: if they held its parameters while ``fully_shard`` swaps
    them for shards, every unit's whole weights would stay allocated (on a GPU: the whole model at once,
    the memory FSDP is there to save) until the last unit is done."""
    import gc
    import weakref

    from launch import fsdp as fsdp2

    alive: list[int] = []

    def fully_shard(module: nn.Module, **kwargs):
        whole = [weakref.ref(p) for p in module.parameters() if not isinstance(p, DTensor)]
        sharded = real(module, **kwargs)
        gc.collect()
        alive.append(sum(ref() is not None for ref in whole))
        return sharded

    real = fsdp2.fully_shard
    monkeypatch.setattr(fsdp2, "fully_shard", fully_shard)
    cfg = load_config(TrainerConfig, None, ["log.progress=false", *COMMON, "backend=fsdp", "max_steps=1"])
    trainer = Trainer(TinyTask(), cfg, None, tmp_path, seed=0, img_size=4, loader_factory=synthetic_factory())
    assert alive == [0, 0, 0, 0]  # 3 layers of the net, then the root (cls_token)
    held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in trainer.task.parameters()}  # the optimizers hold the shards


def test_gradients_are_reduce_scattered_on_the_last_micro_step_only(tmp_path):
    """A sharded gradient exists only once FSDP reduce-scattered: not after a non-final micro-step (its
    gradients stay local and unsharded), then the sum of both micro-steps after the last one."""
    cfg = load_config(TrainerConfig, None, ["log.progress=false", *COMMON, "backend=fsdp", "max_steps=1"])
    trainer = Trainer(TinyTask(), cfg, None, tmp_path, seed=0, img_size=4, loader_factory=synthetic_factory())
    batches = [trainer.backend.to_device(b) for b in itertools.islice(trainer.train_loader, 2)]
    params = list(trainer.task.parameters())
    for i, batch in enumerate(batches):
        with trainer.backend.micro_step(trainer.model, is_last=i == 1):
            trainer.backend.backward(trainer.model(batch)["loss"])
        assert all((p.grad is not None) == (i == 1) for p in params), f"micro-step {i}"


def test_the_last_unit_stays_gathered_after_forward_and_accumulation_gathers_once_per_step(tmp_path):
    """A unit's registered weight is whole (not a DTensor) while gathered. The last unit (net[4]), whose
    backward runs first, is not freed after the forward (torchtitan's default); between micro-steps every
    unit stays gathered, so the next forward gathers nothing; the last micro-step frees them all."""
    cfg = load_config(TrainerConfig, None, ["log.progress=false", *COMMON, "backend=fsdp", "max_steps=1"])
    trainer = Trainer(TinyTask(), cfg, None, tmp_path, seed=0, img_size=4, loader_factory=synthetic_factory())
    batches = [trainer.backend.to_device(b) for b in itertools.islice(trainer.train_loader, 2)]
    layers = [trainer.task.net[k] for k in (1, 2, 4)]  # the units: Linear, LayerNorm, Linear

    def gathered() -> list[bool]:
        return [not isinstance(layer.weight, DTensor) for layer in layers]

    after_forward, after_backward = [], []
    for i, batch in enumerate(batches):
        with trainer.backend.micro_step(trainer.model, is_last=i == 1):
            loss = trainer.model(batch)["loss"]
            after_forward.append(gathered())
            trainer.backend.backward(loss)
        after_backward.append(gathered())
    assert after_forward == [[False, False, True]] * 2
    assert after_backward == [[True, True, True], [False, False, False]]


def test_bf16_policy_computes_in_bf16_and_keeps_fp32_shards(tmp_path):
    cfg = load_config(
        TrainerConfig, None, ["log.progress=false", *COMMON, "backend=fsdp", "precision=bf16", "max_steps=2"]
    )
    torch.manual_seed(0)
    trainer = Trainer(TinyTask(), cfg, None, tmp_path, seed=0, img_size=4, loader_factory=synthetic_factory())
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    linear = trainer.task.net[1]
    # prepend: before FSDP's own post-forward hook reshards the weight
    linear.register_forward_hook(lambda m, args, out: seen.append((m.weight.dtype, out.dtype)), prepend=True)
    result = trainer.fit()
    assert seen and all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in seen)  # 2 steps x 2 micro + eval
    assert isinstance(linear.weight, DTensor) and linear.weight.dtype == torch.float32  # sharded master weights
    state = trainer.optimizers[0].state[linear.weight]
    assert state["exp_avg"].dtype == torch.float32  # gradients reduced in fp32
    assert all(p.dtype == torch.float32 and not isinstance(p, DTensor) for p in result.task.parameters())


def test_fsdp_equals_ddp_with_several_optimizers_and_exports_whole_weights(tmp_path):
    ddp = run(str(tmp_path / "ddp"), COMMON, two_phase=True)
    fsdp = run(str(tmp_path / "fsdp"), [*COMMON, "backend=fsdp"], two_phase=True)
    for name, value in ddp.task.state_dict().items():
        torch.testing.assert_close(fsdp.task.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # the sharded checkpoint, read in this process with a fresh model's names and shapes
    ckpt = fsdp.checkpoint
    assert (ckpt / SHARDED_DIR / ".metadata").is_file()
    whole = read_model(ckpt / SHARDED_DIR, TinyTask().state_dict())
    assert all(torch.equal(whole[k], v) for k, v in fsdp.task.state_dict().items())
    fresh = TinyTask()
    load_weights(fresh, tmp_path / "fsdp")  # trainer.checkpoint.weights_only=<fsdp run>
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in fsdp.task.state_dict().items())


def test_resuming_a_sharded_checkpoint_needs_the_fsdp_backend(tmp_path):
    run(str(tmp_path), [*COMMON, "backend=fsdp", "max_steps=2"])
    with pytest.raises(CheckpointError, match="trainer.backend=ddp: resume with the backend that wrote it"):
        run(str(tmp_path), [*COMMON, "max_steps=4"])


def test_settings_fsdp_cannot_honour_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no fp16 loss scaling"):
        run(str(tmp_path), [*COMMON, "backend=fsdp", "precision=fp16"])
    with pytest.raises(ConfigError, match="async_save=true needs trainer.backend=fsdp"):
        run(str(tmp_path), [*COMMON, "checkpoint.async_save=true"])


def _write(future: Future | None):
    def write(tmp: Path) -> Future | None:
        (tmp / "part.bin").write_bytes(b"x")
        return future

    return write


def test_async_save_is_complete_only_after_every_write_finished(tmp_path):
    agreed: list[bool] = []
    manager = CheckpointManager(tmp_path, keep=2, rank=0, agree=lambda ok: agreed.append(ok) or ok)
    manager.prepare()
    first = manager.save(1, _write(None))
    pending: Future = Future()
    assert manager.save(2, _write(pending)) is None
    assert manager.latest() == first and (tmp_path / ".tmp-step-00000002" / "part.bin").is_file()
    assert manager.poll() is None and agreed[-1] is False  # still writing: nothing published
    pending.set_result(None)
    assert manager.poll() == tmp_path / "step-00000002" == manager.latest()
    assert (tmp_path / "latest").read_text().strip() == "step-00000002" and manager.poll() is None


def test_failed_async_write_keeps_the_previous_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2, rank=0, agree=lambda ok: ok)
    manager.prepare()
    first = manager.save(1, _write(None))
    failed: Future = Future()
    manager.save(2, _write(failed))
    failed.set_exception(OSError(28, "No space left on device"))
    with pytest.raises(CheckpointError, match="No space left on device.*latest: step-00000001"):
        manager.save(3, _write(None))  # a new save first finishes the pending one
    assert manager.checkpoints() == [first] and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_compiled_units_train_like_eager(tmp_path):
    eager = run(str(tmp_path / "eager"), [*COMMON, "backend=fsdp"])
    cfg = load_config(TrainerConfig, None, ["log.progress=false", *COMMON, "backend=fsdp", "compile=true"])
    torch.manual_seed(0)
    trainer = Trainer(
        TinyTask(), cfg, None, tmp_path / "compiled", seed=0, img_size=4, loader_factory=synthetic_factory()
    )
    assert all(unit._compiled_call_impl is not None for unit in units(trainer.task))
    compiled = trainer.fit()
    for name, value in eager.task.state_dict().items():
        torch.testing.assert_close(compiled.task.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("clip", [True, False])
def test_nonfinite_step_is_skipped_on_sharded_gradients(tmp_path, clip):
    """Batch 2 holds a NaN pixel: with or without clipping (total norm vs per-shard check) the
    step is skipped, the weights stay finite and the next steps train on."""
    opts = [o for o in COMMON if not o.startswith("optim.clip_grad")] + ([] if clip else ["optim.clip_grad=null"])
    cfg = load_config(
        TrainerConfig, None, ["log.progress=false", *opts, "backend=fsdp", "accum_steps=1", "max_steps=4"]
    )
    torch.manual_seed(0)
    trainer = Trainer(TinyTask(), cfg, None, tmp_path, seed=0, img_size=4, loader_factory=synthetic_factory(poison=2))
    result = trainer.fit()
    assert trainer.guard.bad_steps == 0 and result.steps == 4  # the skip counter was reset by the finite steps after it
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_steps", 0) for r in records) == 1
    assert all(torch.isfinite(v).all() for v in result.task.state_dict().values())


class EmaTinyTask(TinyTask):
    """TinyTask with a timm EMA of its net, as ``FinetuneTask`` keeps one (a frozen submodule)."""

    def __init__(self) -> None:
        super().__init__()
        self.ema = ModelEmaV3(self.net, decay=0.5).requires_grad_(False)

    def on_step_end(self, step: int) -> None:
        self.ema.update(self.net, step=step)


def test_ema_is_sharded_and_equals_the_ddp_one(tmp_path):
    results = {}
    for backend in ("ddp", "fsdp"):
        cfg = load_config(TrainerConfig, None, ["log.progress=false", *COMMON, f"backend={backend}", "max_steps=3"])
        torch.manual_seed(0)
        trainer = Trainer(
            EmaTinyTask(), cfg, None, tmp_path / backend, seed=0, img_size=4, loader_factory=synthetic_factory()
        )
        results[backend] = trainer.fit().task
    assert isinstance(trainer.task.ema.module[1].weight, DTensor)
    torch.manual_seed(0)
    initial = EmaTinyTask().net[1].weight  # the weights both runs started from
    assert not torch.equal(results["fsdp"].ema.module[1].weight, initial)  # the EMA moved
    for name, value in results["ddp"].ema.state_dict().items():
        torch.testing.assert_close(results["fsdp"].ema.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_whole_weights_load_into_a_sharded_model_and_ddp_checkpoints_do_not_resume(tmp_path):
    ddp = run(str(tmp_path / "ddp"), [*COMMON, "max_steps=2"])
    cfg = load_config(TrainerConfig, None, ["log.progress=false", *COMMON, "backend=fsdp", "max_steps=4"])
    trainer = Trainer(TinyTask(), cfg, None, tmp_path / "ddp", seed=0, img_size=4, loader_factory=synthetic_factory())
    load_weights(trainer.task, tmp_path / "ddp")  # trainer.checkpoint.weights_only=<ddp run>, into shards
    whole = trainer.backend.full_state_dict(trainer.model)
    assert all(torch.equal(whole[k], v) for k, v in ddp.task.state_dict().items())
    with pytest.raises(CheckpointError, match="not written with trainer.backend=fsdp"):
        trainer.fit()  # resume=auto finds the DDP run's checkpoint
