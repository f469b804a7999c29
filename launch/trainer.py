"""The one training loop, shared by pretraining, probing, fine-tuning and every baseline.

A stage hands :func:`fit` a :class:`~launch.task.Task`; the trainer owns the rest:

    resume? -> for each optimizer step: k micro-batches -> per phase: forward, backward
    (all-reduce on the last micro-batch only), non-finite guard, clip, step, schedule
    -> log every N steps -> eval / pictures at epoch ends -> checkpoint -> FitResult

Distribution lives in :mod:`launch.backend`; checkpoint files and preemption in
:mod:`launch.checkpoint`. The only host syncs are at log intervals, eval, checkpoints,
and the one scalar of the non-finite guard per optimizer step.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import Tensor

from launch import dist
from launch.backend import Backend
from launch.checkpoint import (
    TRAINER_FILE,
    CheckpointManager,
    check_compatible,
    fingerprint,
    load_file,
    load_weights,
    nonfinite_keys,
    rank_file,
    rank_state,
    read_meta,
    restore_rank_state,
    save_file,
)
from launch.config import TrainerConfig, save_config
from launch.errors import CheckpointError, ConfigError, DataError
from launch.flops import peak_flops
from launch.guard import NonFiniteGuard
from launch.logger import RunLogger, check_available
from launch.meter import StepMeter
from launch.optim import build_optimizer, build_scheduler, peak_lr, phase_config, resume_schedule
from launch.preemption import EXIT_REQUEUE, Preempted, RunControl
from launch.task import Batch, Task

log = logging.getLogger(__name__)

LoaderFactory = Callable[..., Any]


@dataclass
class FitResult:
    """What a finished run reports; ``task`` is the task passed to ``fit``, trained, unwrapped and
    whole (under DeepSpeed: holding the fp32 masters again, DeepSpeed's hooks and partitions removed)."""

    steps: int
    epochs: int
    final_loss: float | None
    eval: dict[str, float]
    images_per_s: float
    flops_per_s: float | None
    mfu: float | None
    checkpoint: Path | None
    run_dir: Path
    task: Task | None = field(default=None, repr=False)
    skipped_samples: int = 0  # training samples skipped (corrupt, unreadable, unreachable), all ranks, whole run


def fit(
    task: Task,
    cfg: TrainerConfig,
    data: Any,
    run_dir: Path,
    *,
    seed: int,
    img_size: int,
    train_preset: str = "pretrain",
    eval_preset: str = "eval",
    train_split: str = "train",
    eval_split: str = "val",
    loader_factory: LoaderFactory | None = None,
    config: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``task`` on ``data`` (a ``DataConfig``) into ``run_dir``; see :class:`Trainer`.

    ``loader_factory`` defaults to ``launch.data.build_loader``; ``config`` is the full run
    config, recorded by W&B and in the checkpoint fingerprint.
    """
    trainer = Trainer(
        task,
        cfg,
        data,
        Path(run_dir),
        seed=seed,
        img_size=img_size,
        presets=(train_preset, eval_preset),
        splits=(train_split, eval_split),
        loader_factory=loader_factory,
        config=config,
    )
    return trainer.fit()


class Trainer:
    """One run: backend, loaders, optimizers and schedules per phase, logger, checkpoints."""

    def __init__(
        self,
        task: Task,
        cfg: TrainerConfig,
        data: Any,
        run_dir: Path,
        *,
        seed: int,
        img_size: int,
        presets: tuple[str, str] = ("pretrain", "eval"),
        splits: tuple[str, str] = ("train", "val"),
        loader_factory: LoaderFactory | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.seed, self.config = cfg, run_dir, seed, config or {}
        self.phases = tuple(task.phases)
        check_available(cfg.log)
        if cfg.activation_checkpointing:
            if not hasattr(task, "set_grad_checkpointing"):
                raise ConfigError(
                    f"trainer.activation_checkpointing=true: {type(task).__name__} has no set_grad_checkpointing()"
                )
            task.set_grad_checkpointing(True)
        self.backend = Backend(cfg, multi_phase=len(self.phases) > 1)
        self.rank, self.world = dist.rank(), dist.world_size()
        self._build_loaders(data, loader_factory, img_size, presets, splits)
        self.global_batch = cfg.batch_size * cfg.accum_steps * self.world
        self.steps_per_epoch = len(self.train_loader) // cfg.accum_steps
        self._check_batch_split(splits[0])
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self._init_checkpoints()
        self._resume_path = self._resolve_resume(task)
        # FSDP shards a copy: the caller's task stays whole and receives the trained weights at the
        # end, as under DDP (the baselines keep using it for pictures, probes, the next stage);
        # DeepSpeed hands the task itself back, whole (Backend.release)
        self._whole = task if self.backend.fsdp else None
        if self._whole is not None:
            task = copy.deepcopy(task)
        optimizers, self.schedulers = self._build_optimizers(task)
        # FSDP moves the task to the device one unit at a time as it shards it: never whole
        self.model, self.optimizers = self.backend.prepare(
            task if self.backend.fsdp else task.to(self.backend.device), optimizers
        )
        self.task: Task = self.backend.unwrap(self.model)
        # after prepare: FSDP replaces the parameters
        self.phase_params = {
            p: [q for q in self.task.phase_module(p).parameters() if q.requires_grad] for p in self.phases
        }
        self.step = self.epoch = self.epoch_step = 0
        self.guard = NonFiniteGuard(cfg.max_bad_steps, last_checkpoint=lambda: self.checkpoint_path)
        self.meter = self._build_meter()
        self.eval_metrics: dict[str, float] = {}
        self.last_loss: float | None = None
        self.skipped_samples = 0  # all ranks, as of the last log point
        self.checkpoint_path: Path | None = None

    # ------------------------------------------------------------------ setup

    def _build_loaders(
        self, data: Any, factory: LoaderFactory | None, img_size: int, presets: tuple[str, str], splits: tuple[str, str]
    ) -> None:
        if factory is None:
            from launch.data import build_loader as factory
        common = dict(
            batch_size=self.cfg.batch_size, img_size=img_size, seed=self.seed, rank=self.rank, world_size=self.world
        )
        # training always shuffles, whatever the preset (a probe trains on the unshuffled "eval" transform),
        # and drops each rank's short last batch (Mixup needs even batches; DDP weighs every batch alike)
        self.train_loader = factory(data, splits[0], preset=presets[0], shuffle=True, drop_last=True, **common)
        self.max_skipped_fraction: float | None = getattr(data, "max_skipped_fraction", None)
        planned = len(self.train_loader) * self.cfg.batch_size * self.world  # resampled streams without counts
        self.epoch_samples = getattr(self.train_loader.info, "splits", {}).get(splits[0]) or planned
        has_eval = splits[1] in getattr(self.train_loader.info, "splits", {})
        self.eval_loader = factory(data, splits[1], preset=presets[1], **common) if has_eval else None

    def _check_batch_split(self, split: str) -> None:
        """One optimizer step must fit in one epoch, on every rank."""
        cfg, samples = self.cfg, getattr(self.train_loader.info, "splits", {}).get(split)
        what = (
            f"trainer.batch_size={cfg.batch_size} x trainer.accum_steps={cfg.accum_steps} x {self.world} ranks "
            f"= {self.global_batch} images per step"
        )
        if samples is not None and self.global_batch > samples:
            raise ConfigError(
                f"{what}, more than the {samples} samples of split '{split}': lower the batch size or accum_steps"
            )
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{what}, but each rank gets only {len(self.train_loader)} batches per epoch: lower accum_steps"
            )

    def _build_optimizers(self, task: Task) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        optimizers, schedulers, self.optimizer_names = [], [], []
        fused = self.cfg.optim.fused if self.cfg.optim.fused is not None else self.backend.device.type == "cuda"
        for phase in self.phases:
            pcfg = phase_config(self.cfg.optim, task.phase_optim(phase))
            lr = peak_lr(pcfg, self.global_batch)
            opt = build_optimizer(task.phase_module(phase), pcfg, lr, fused=fused and not self.backend.deepspeed)
            optimizers.append(opt)
            self.optimizer_names.append(pcfg.name)
            schedulers.append(
                build_scheduler(opt, pcfg, lr, steps_per_epoch=self.steps_per_epoch, total=self.total_steps)
            )
            log.info("phase %s: %s, peak lr %.3g (global batch %d)", phase, pcfg.name, lr, self.global_batch)
        return optimizers, schedulers

    def _build_meter(self) -> StepMeter:
        flops = self.task.flops_per_image() if hasattr(self.task, "flops_per_image") else None
        override = self.cfg.peak_tflops * 1e12 if self.cfg.peak_tflops else None
        peak = peak_flops(self.backend.device, self.backend.cfg.precision, override=override)
        return StepMeter(
            self.backend,
            global_batch=self.global_batch,
            flops_per_image=flops,
            peak_flops=peak * self.world if peak else None,
        )

    # ------------------------------------------------------------------ the loop

    def fit(self) -> FitResult:
        set_seed(self.seed + 1000 * self.rank)  # distinct per rank (masks, noise); a resume restores its RNG
        with self.control:  # SIGTERM / SIGUSR1 mean "save and stop" until the run is over, however it ends
            self._maybe_resume()
            if dist.is_main() and self.config:  # after every check that can fail on bad input
                save_config(self.config, self.run_dir / "config.yaml")
            self.logger = RunLogger(
                self.run_dir,
                self.cfg.log,
                total_steps=self.total_steps,
                enabled=dist.is_main(),
                config=self.config,
                initial_step=self.step,
            )
            self.meter.restart(self.step)
            try:
                while self.step < self.total_steps:
                    self._train_epoch()
                self._finish()
            finally:
                self.logger.close()
        return self._result()

    def _train_epoch(self) -> None:
        self.model.train()
        for micro_batches in self._epoch_batches():
            self._optimizer_step(micro_batches)
            self.step += 1
            self.task.on_step_end(self.step)
            self.epoch_step += 1
            self.logger.advance()
            if self.step % self.cfg.log.every_steps == 0 or self.step == self.total_steps:
                self._log_train()
            if self.epoch_step == self.steps_per_epoch:
                self._end_epoch()
            self._maybe_checkpoint()

    def _epoch_batches(self) -> Iterator[list[Batch]]:
        """Groups of ``accum_steps`` device batches until the epoch (or the run) ends."""
        if self.epoch_step == 0:
            self.train_loader.set_epoch(self.epoch)
        todo = min(self.steps_per_epoch - self.epoch_step, self.total_steps - self.step)
        batches = iter(self.train_loader)
        for _ in range(todo):
            group = [next(batches, None) for _ in range(self.cfg.accum_steps)]
            if any(b is None for b in group):
                raise DataError(f"the training loader ended early in epoch {self.epoch}: fewer batches than its len()")
            yield [self.backend.to_device(b) for b in group]

    def _optimizer_step(self, micro_batches: list[Batch]) -> None:
        """One optimizer step per phase over ``micro_batches`` (k of them, accumulated)."""
        k = len(micro_batches)
        for phase, optimizer, scheduler in zip(self.phases, self.optimizers, self.schedulers):
            if len(self.phases) > 1:  # an earlier phase's backward may have reached these params
                self.task.zero_grad(set_to_none=True)
            sums: dict[str, Tensor] = {}
            for i, batch in enumerate(micro_batches):
                with self.backend.micro_step(self.model, is_last=i == k - 1):
                    out = self.model(batch, phase)
                    self.backend.backward(out["loss"])
                for name, value in out.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float() / k
            grad_norm = self.backend.clip(self.phase_params[phase])
            bad = self.guard.flag(sums["loss"], self._guarded_grads(grad_norm))
            if self.backend.skips_on_device(optimizer):  # no host sync: the fused kernel skips
                self.backend.step(optimizer, found_inf=bad)
                self.guard.count_on_device(bad)
                self._accumulate_metrics({"skipped_steps": bad}, prefix="")
            elif self.guard.step_is_finite(bad, self.step + 1):
                self.backend.step(optimizer)
            else:
                self.backend.discard_grads(self.model, optimizer)
                self._accumulate_metrics({"skipped_steps": torch.ones((), device=bad.device)}, prefix="")
            scheduler.step()
            if grad_norm is not None:
                sums["grad_norm"] = grad_norm.detach().float()
            self._accumulate_metrics(sums, prefix="" if len(self.phases) == 1 else f"{phase}_")

    def _guarded_grads(self, grad_norm: Tensor | None) -> list[Tensor | None]:
        """What the guard checks besides the loss: the clipped norm if there is one, else the
        local gradients; none under fp16, whose overflow is the GradScaler's to skip."""
        if self.backend.scaler is not None:
            return []
        return [grad_norm] if grad_norm is not None else self.backend.local_grads(self.task.parameters())

    # ------------------------------------------------------------------ metrics

    def _accumulate_metrics(self, metrics: dict[str, Tensor], prefix: str) -> None:
        self.meter.add(metrics, prefix)

    def _log_train(self) -> None:
        """Interval means over steps and ranks, throughput, lr: the host sync point."""
        self.guard.check(self.step)
        metrics = self.meter.read(self.step, counts={"skipped_samples": self.train_loader.corrupt_samples()})
        metrics.update(lr=self.schedulers[0].get_last_lr()[0], epoch=self.epoch)
        self.last_loss = metrics.get("loss", next(iter(metrics.values())))
        self.skipped_samples = metrics["skipped_samples"] = int(metrics["skipped_samples"])
        self.logger.scalars(self.step, {k: v for k, v in metrics.items() if v is not None})
        self._check_skipped()

    def _check_skipped(self) -> None:
        """Stop when more than ``data.max_skipped_fraction`` of an epoch's samples per epoch begun was
        lost; the count is summed over ranks, so every rank stops here together."""
        fraction = self.max_skipped_fraction
        if fraction is None or self.skipped_samples <= fraction * self.epoch_samples * (self.epoch + 1):
            return
        last = self.train_loader.last_skip() or "on another rank (see its warnings)"
        raise DataError(
            f"data.max_skipped_fraction={fraction}: {self.skipped_samples} training samples skipped "
            f"by step {self.step} (more than {fraction:.1%} of {self.epoch_samples} per epoch, "
            f"{self.epoch + 1} epoch(s) begun); last: {last}. Fix the shards, or raise "
            f"data.max_skipped_fraction; {self.checkpoint_path or 'no checkpoint yet'} is intact"
        )

    # ------------------------------------------------------------------ epoch ends

    def _end_epoch(self) -> None:
        done = self.epoch + 1
        every = self.cfg.eval_every_epochs
        if every and done % every == 0 and self.eval_loader is not None:
            self.evaluate()
        every = self.cfg.log.images_every_epochs
        if every and done % every == 0:
            self._log_pictures()
        self.epoch, self.epoch_step = done, 0

    def _finish(self) -> None:
        """Final eval and pictures (unless an epoch end just did them), the final checkpoint."""
        if self.eval_loader is not None and self.eval_metrics.get("step") != self.step:
            self.evaluate()
            if self.cfg.log.images_every_epochs:
                self._log_pictures()
        if self.checkpoint_path is None or not self.checkpoint_path.name.endswith(f"{self.step:08d}"):
            self._save_checkpoint(reason="final")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean of the task's ``eval_step`` sums over the whole eval split (all ranks).

        Runs under a forked RNG with a fixed seed: the same masks every time, and the
        training RNG stream is untouched (a resumed run stays bit-identical)."""
        self.model.eval()
        sums: dict[str, Tensor] = {}
        # ZeRO-3 / FSDP: eval_step and on_eval_end (e.g. a best-weights export) read weights outside the forward
        with (
            self.backend.outside_forward(self.model),
            torch.random.fork_rng(devices=self._rng_devices()),
            self.backend.autocast(),
        ):
            torch.manual_seed(self.seed + self.rank)
            self.eval_loader.restart(0)
            for batch in itertools.islice(self.eval_loader, self.cfg.eval_batches):
                for name, value in self.task.eval_step(self.backend.to_device(batch)).items():
                    sums[name] = sums.get(name, 0.0) + value.float()
        self.model.train()
        totals = {k: v.item() for k, v in self.backend.all_reduce(sums).items()}
        count = totals.pop("count", 0.0) or 1.0
        self.eval_metrics = {k: v / count for k, v in totals.items()}
        self.logger.scalars(self.step, self.eval_metrics, prefix="eval")
        with self.backend.outside_forward(self.model):
            self.task.on_eval_end(dict(self.eval_metrics), self.step)
        self.eval_metrics["step"] = self.step
        return self.eval_metrics

    @torch.no_grad()
    def _log_pictures(self) -> None:
        loader = self.eval_loader or self.train_loader
        if loader is self.train_loader:
            return  # iterating the train loader here would move its resumable position
        self.model.eval()
        with (
            self.backend.outside_forward(self.model),
            torch.random.fork_rng(devices=self._rng_devices()),
            self.backend.autocast(),
        ):
            torch.manual_seed(self.seed)
            loader.restart(0)
            pictures = self.task.pictures(self.backend.to_device(next(iter(loader))))
        self.model.train()
        self.logger.images(self.step, pictures)

    def _rng_devices(self) -> list[int]:
        return [self.backend.device.index or 0] if self.backend.device.type == "cuda" else []

    def _result(self) -> FitResult:
        speed = self.meter.summary()
        if self._whole is not None:  # FSDP trained a sharded copy: the caller's task takes its weights
            self._whole.load_state_dict(self.backend.full_state_dict(self.model))
            task = self._whole
        else:
            task = self.backend.release(self.model)  # DeepSpeed: the fp32 masters, gathered on every rank
        return FitResult(
            steps=self.step,
            epochs=self.epoch,
            final_loss=self.last_loss,
            eval={k: v for k, v in self.eval_metrics.items() if k != "step"},
            images_per_s=speed["images_per_s"],
            flops_per_s=speed["flops_per_s"],
            mfu=speed["mfu"],
            checkpoint=self.checkpoint_path,
            run_dir=self.run_dir,
            task=task,
            skipped_samples=self.skipped_samples,
        )

    # ------------------------------------------------------------------ state (checkpointed)

    def state_dict(self) -> dict[str, Any]:
        """Everything shared by all ranks (called on every rank: collective under DeepSpeed). Under
        DeepSpeed the engine saves model + optimizer, under FSDP every rank its shards of them; for
        DeepSpeed exports, ``"frozen"`` adds the frozen parameters, which DeepSpeed's consolidation to
        fp32 omits below ZeRO stage 2, and at stage 0 (which it cannot consolidate) ``"model"`` holds
        the fp32 masters."""
        state: dict[str, Any] = {
            "step": self.step,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            **self.guard.state_dict(),
            "global_batch": self.global_batch,
            "schedulers": [s.state_dict() for s in self.schedulers],
        }
        if self.backend.deepspeed and self.cfg.zero_stage == 0:
            state["model"] = self.backend.full_state_dict(self.model)
        elif self.backend.deepspeed:
            state["frozen"] = self.backend.full_state_dict(self.model, frozen_only=True)
        elif not self.backend.fsdp:
            state["model"] = self.task.state_dict()
            state["optimizers"] = [o.state_dict() for o in self.optimizers]
        if self.backend.scaler is not None:
            state["scaler"] = self.backend.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.epoch_step = state["step"], state["epoch"], state["epoch_step"]
        self.guard.load_state_dict(state)
        if "model" in state and not self.backend.deepspeed:  # DeepSpeed's engine restored model and optimizer
            self.task.load_state_dict(state["model"])
            for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(s)
        # this run's warmup, length and lr win (extending or shortening a run), at the saved step
        for sched, s in zip(self.schedulers, state["schedulers"], strict=True):
            resume_schedule(sched, s["last_epoch"])
        if "scaler" in state and self.backend.scaler is not None:
            self.backend.scaler.load_state_dict(state["scaler"])

    def _continue_with_global_batch(self, old: int) -> None:
        """Resume at the checkpoint's sample with another global batch: the step counter, epoch step and
        schedule position are re-counted in steps of the new batch, and the lr follows its scaling rule."""
        self.epoch_step = max(self.steps_per_epoch - self.train_loader.batches_left() // self.cfg.accum_steps, 0)
        step, self.step = self.step, self.epoch * self.steps_per_epoch + self.epoch_step
        for sched in self.schedulers:
            resume_schedule(sched, self.step)
        log.warning(
            "global batch %d -> %d images per step since the checkpoint: continuing epoch %d at the same "
            "sample, as step %d of %d (was step %d), lr for the new batch",
            old,
            self.global_batch,
            self.epoch,
            self.step,
            self.total_steps,
            step,
        )

    # ------------------------------------------------------------------ checkpoints

    def _init_checkpoints(self) -> None:
        ckpt = self.cfg.checkpoint
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep=ckpt.keep)
        # stop requests and the wall clock are agreed at log steps, where the trainer syncs anyway
        self.control = RunControl(
            every_steps=ckpt.every_steps, every_minutes=ckpt.every_minutes, check_every=self.cfg.log.every_steps
        )

    def _fingerprint(self) -> dict[str, Any]:
        """What a resume must share; not the world size nor the batch: the data position is global (in
        samples) and DDP's state whole; another global batch is re-counted (``_continue_with_global_batch``)."""
        settings = {
            "model": self.config.get("model", {}),
            "phases": list(self.phases),
            "optimizers": self.optimizer_names,
        }
        # the whole task, if kept: FSDP renames the sharded one's class (FSDPMAETask)
        return fingerprint(self._whole if self._whole is not None else self.task, settings)

    def _maybe_checkpoint(self) -> None:
        """Step / wall-clock / preemption saves, decided by all ranks together; after a
        SIGTERM or SIGUSR1 every rank saves after the same step and raises :class:`Preempted`
        (exit status 75: requeue). The end of the run saves in ``_finish``."""
        decision = self.control.poll(self.step)
        if self.step % self.cfg.log.every_steps == 0:  # an asynchronous save is published once on disk
            self.checkpoint_path = self.checkpoints.poll() or self.checkpoint_path
        if self.step >= self.total_steps:
            return
        if decision.save:
            self._save_checkpoint(reason="preempted" if decision.stop else "periodic")
        if decision.stop:
            raise Preempted(
                f"stopped by {self.control.received} after step {self.step}, saved {self.checkpoint_path}; "
                f"the same command continues it (trainer.checkpoint.resume=auto); exit status {EXIT_REQUEUE} = requeue"
            )

    def _save_checkpoint(self, reason: str) -> None:
        """Every rank writes its part into the checkpoint manager's temporary directory."""

        def write(tmp: Path) -> Future | None:
            if self.backend.deepspeed:
                self.backend.save_engine(tmp)
            shards = self.backend.save_sharded(tmp, self.model, self.optimizers) if self.backend.fsdp else None
            state = self.state_dict()  # every rank: collective under ZeRO-3
            if self.rank == 0:
                bad = nonfinite_keys(state)  # skipped steps keep weights finite; never save otherwise
                if bad:
                    raise ValueError(f"refusing to save NaN/inf in {bad[0]} ({len(bad)} tensors)")
                save_file(state, tmp / TRAINER_FILE)
            save_file(rank_state(self.train_loader.state_dict()), rank_file(tmp, self.rank))
            return shards

        meta = {"epoch": self.epoch, "reason": reason, "fingerprint": self._fingerprint()}
        self.checkpoint_path = self.checkpoints.poll(block=True) or self.checkpoint_path  # an earlier async save first
        self.checkpoint_path = self.checkpoints.save(self.step, write, meta) or self.checkpoint_path
        if reason != "periodic":  # the run ends here: the shards must be on disk and the checkpoint complete
            self.checkpoint_path = self.checkpoints.poll(block=True) or self.checkpoint_path
        self.control.saved()

    def _resolve_resume(self, task: Task) -> Path | None:
        """The checkpoint ``checkpoint.resume`` names, or None: then ``checkpoint.weights_only``
        is loaded into ``task`` here, before the backend wraps it (DeepSpeed copies its fp32
        masters from the module at initialization, and ZeRO-3 partitions the module)."""
        self.checkpoints.prepare()
        path = self.checkpoints.resolve_agreed(self.cfg.checkpoint.resume)
        if (
            path is None and self.cfg.checkpoint.weights_only
        ):  # only when starting fresh: a requeued run resumes instead
            load_weights(task, self.cfg.checkpoint.weights_only)
        return path

    def _check_resumable(self, path: Path) -> int:
        """One-line CheckpointError for what cannot be resumed; returns the checkpoint's world size."""
        meta = read_meta(path)
        saved_world = int(meta.get("world_size", self.world))
        saved, current = dict(meta.get("fingerprint", {})), self._fingerprint()
        if "optimizers" not in saved:  # written before elastic resume: it recorded the world size (and batch), not
            saved.pop("world_size", None)  # the optimizers
            saved.pop("trainer", None)
            current.pop("optimizers")
        check_compatible(path, saved, current)
        # ZeRO's files hold each rank's partition of the optimizer state; FSDP's DCP checkpoint is keyed by
        # global tensor and reshards on load (launch/fsdp.load), so only DeepSpeed needs its world size
        if self.backend.deepspeed and saved_world != self.world:
            raise CheckpointError(
                f"cannot resume the {self.cfg.backend} checkpoint {path} of {saved_world} processes "
                f"on {self.world}: relaunch with {saved_world} processes"
            )
        return saved_world

    def _maybe_resume(self) -> None:
        """``checkpoint.resume``: continue from a complete checkpoint (model, optimizers, schedules,
        scaler, step, loader position; this rank's RNG on the same world size) or start fresh."""
        path = self._resume_path
        if path is None:
            return
        saved_world = self._check_resumable(path)
        if self.backend.deepspeed:
            self.backend.load_engine(path)
        if self.backend.fsdp:
            self.backend.load_sharded(path, self.model, self.optimizers)
        state = load_file(path / TRAINER_FILE)
        if "model" not in state and not (self.backend.deepspeed or self.backend.fsdp):
            raise CheckpointError(
                f"{path} holds sharded model state (trainer.backend=deepspeed or fsdp) but this run has "
                f"trainer.backend={self.cfg.backend}: resume with the backend that wrote it"
            )
        self.load_state_dict(state)
        # another world size: the ranks' RNG streams do not map onto the new ranks (the ones that matter,
        # augmentation and masks, follow the samples); the loader position is global, rank 0's serves all
        same_world = saved_world == self.world
        self.train_loader.load_state_dict(restore_rank_state(path, self.rank if same_world else 0, rng=same_world))
        if not same_world:
            set_seed((self.seed + 1000 * self.rank + 7919 * self.step) % 2**32)
        if self.epoch_step == 0:  # saved at an epoch's end, the loader may still be in the epoch before (the
            self.train_loader.set_epoch(self.epoch)  # steps leave its last len % accum_steps batches unread)
        if state.get("global_batch", self.global_batch) != self.global_batch:
            self._continue_with_global_batch(state["global_batch"])
        if self.epoch_step >= self.steps_per_epoch:  # this layout has no full step left in the epoch
            self.epoch, self.epoch_step = self.epoch + 1, 0
        self.checkpoint_path = path
        log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)
