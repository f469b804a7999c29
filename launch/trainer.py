"""The one training loop, shared by pretraining, probing, fine-tuning and every baseline.

A stage hands :func:`fit` a :class:`~launch.task.Task`; the trainer owns the rest:

    resume? -> for each optimizer step: k micro-batches -> per phase: forward, backward
    (all-reduce on the last micro-batch only), non-finite guard, clip, step, schedule
    -> log every N steps -> eval / pictures at epoch ends -> checkpoint -> FitResult

Distribution lives in :mod:`launch.backend`; the loaders in :mod:`launch.run_data`; when to save
in :mod:`launch.checkpointer`, how a run resumes in :mod:`launch.resume`, the checkpoint format in
:mod:`launch.checkpoint`; validation and pictures in :mod:`launch.evaluate`. The only host syncs are
at log intervals, eval, checkpoints, and the one scalar of the non-finite guard per optimizer step.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import Tensor

from launch import dist
from launch.backend import Backend
from launch.checkpoint import fingerprint, write_trainer_state
from launch.checkpointer import Checkpointer
from launch.config import TrainerConfig, save_config
from launch.errors import ConfigError, DataError
from launch.evaluate import evaluate, pictures
from launch.flops import peak_flops
from launch.guard import NonFiniteGuard
from launch.logger import RunLogger, check_available
from launch.meter import StepMeter
from launch.optim import build_phases, resume_schedule
from launch.resume import check_resumable, load_state, recount, restore_rank
from launch.run_data import LoaderFactory, RunData
from launch.task import Batch, Task

log = logging.getLogger(__name__)


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


def fit(task: Task, cfg: TrainerConfig, data: Any, run_dir: Path, **options: Any) -> FitResult:
    """Train ``task`` on ``data`` (a ``DataConfig``) into ``run_dir``; ``options`` are :class:`Trainer`'s
    keywords (``seed`` and ``img_size`` required)."""
    return Trainer(task, cfg, data, Path(run_dir), **options).fit()


class Trainer:
    """One run: backend, loaders, optimizers and schedules per phase, logger, checkpoints.

    ``loader_factory`` defaults to ``launch.data.build_loader`` (tests pass a synthetic one); the train
    split is built with the ``train_preset`` transform, shuffled, the eval split with ``eval_preset``.
    ``config`` is the full run config: saved as ``run_dir/config.yaml``, recorded by W&B and in the
    checkpoint fingerprint."""

    def __init__(
        self,
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
        self.data = RunData(
            data,
            loader_factory,
            cfg,
            img_size=img_size,
            presets=(train_preset, eval_preset),
            splits=(train_split, eval_split),
            seed=seed,
            rank=self.rank,
            world=self.world,
        )
        self.train_loader, self.eval_loader = self.data.train, self.data.eval
        self.global_batch, self.steps_per_epoch = self.data.global_batch, self.data.steps_per_epoch
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.checkpointer = Checkpointer(run_dir, cfg, task)  # before the backend wraps the task: weights_only
        self._prepare(task)
        self.step = self.epoch = self.epoch_step = 0
        self.guard = NonFiniteGuard(cfg.max_bad_steps, last_checkpoint=lambda: self.checkpointer.path)
        self.meter = self._build_meter()
        self.eval_metrics: dict[str, float] = {}
        self.last_loss: float | None = None
        self.skipped_samples = 0  # all ranks, as of the last log point

    # ------------------------------------------------------------------ setup

    def _prepare(self, task: Task) -> None:
        """The backend wraps ``task`` with one optimizer and schedule per phase."""
        cfg = self.cfg
        # FSDP shards a copy: the caller's task stays whole and receives the trained weights at the
        # end, as under DDP (the baselines keep using it for pictures, probes, the next stage);
        # DeepSpeed hands the task itself back, whole (Backend.release)
        self._whole = task if self.backend.fsdp else None
        if self._whole is not None:
            task = copy.deepcopy(task)
        fused = cfg.optim.fused if cfg.optim.fused is not None else self.backend.device.type == "cuda"
        optimizers, self.schedulers, self.optimizer_names = build_phases(
            task,
            cfg.optim,
            global_batch=self.global_batch,
            steps_per_epoch=self.steps_per_epoch,
            total=self.total_steps,
            fused=fused and not self.backend.deepspeed,
        )
        # FSDP moves the task to the device one unit at a time as it shards it: never whole
        self.model, self.optimizers = self.backend.prepare(
            task if self.backend.fsdp else task.to(self.backend.device), optimizers
        )
        self.task: Task = self.backend.unwrap(self.model)
        # after prepare: FSDP replaces the parameters
        self.phase_params = {
            p: [q for q in self.task.phase_module(p).parameters() if q.requires_grad] for p in self.phases
        }

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
        with self.checkpointer.control:  # SIGTERM / SIGUSR1 mean "save and stop" until the run is over, however it ends
            self._resume()
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
                self.meter.add({"skipped_steps": bad}, prefix="")
            elif self.guard.step_is_finite(bad, self.step + 1):
                self.backend.step(optimizer)
            else:
                self.backend.discard_grads(self.model, optimizer)
                self.meter.add({"skipped_steps": torch.ones((), device=bad.device)}, prefix="")
            scheduler.step()
            if grad_norm is not None:
                sums["grad_norm"] = grad_norm.detach().float()
            self.meter.add(sums, prefix="" if len(self.phases) == 1 else f"{phase}_")

    def _guarded_grads(self, grad_norm: Tensor | None) -> list[Tensor | None]:
        """What the guard checks besides the loss: the clipped norm if there is one, else the
        local gradients; none under fp16, whose overflow is the GradScaler's to skip."""
        if self.backend.scaler is not None:
            return []
        return [grad_norm] if grad_norm is not None else self.backend.local_grads(self.task.parameters())

    # ------------------------------------------------------------------ metrics

    def _log_train(self) -> None:
        """Interval means over steps and ranks, throughput, lr: the host sync point."""
        self.guard.check(self.step)
        metrics = self.meter.read(self.step, counts={"skipped_samples": self.train_loader.corrupt_samples()})
        metrics.update(lr=self.schedulers[0].get_last_lr()[0], epoch=self.epoch)
        self.last_loss = metrics.get("loss", next(iter(metrics.values())))
        self.skipped_samples = metrics["skipped_samples"] = int(metrics["skipped_samples"])
        self.logger.scalars(self.step, {k: v for k, v in metrics.items() if v is not None})
        self.data.check_skipped(
            self.skipped_samples, step=self.step, epoch=self.epoch, checkpoint=self.checkpointer.path
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
        if self.checkpointer.path is None or not self.checkpointer.path.name.endswith(f"{self.step:08d}"):
            self._save_checkpoint(reason="final")

    def evaluate(self) -> dict[str, float]:
        """Mean of the task's ``eval_step`` sums over the eval split (all ranks), logged and handed to
        ``task.on_eval_end``; the same masks every time (:mod:`launch.evaluate`)."""
        self.eval_metrics = evaluate(
            self.model,
            self.task,
            self.backend,
            self.eval_loader,
            batches=self.cfg.eval_batches,
            seed=self.seed + self.rank,
        )
        self.logger.scalars(self.step, self.eval_metrics, prefix="eval")
        with self.backend.outside_forward(self.model):  # e.g. a best-weights export reads the whole model
            self.task.on_eval_end(dict(self.eval_metrics), self.step)
        self.eval_metrics["step"] = self.step
        return self.eval_metrics

    def _log_pictures(self) -> None:
        if not self.eval_loader:  # never the train loader: iterating it here would move its resumable position
            return
        grids = pictures(self.model, self.task, self.backend, self.eval_loader, seed=self.seed)
        self.logger.images(self.step, grids)

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
            checkpoint=self.checkpointer.path,
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

    # ------------------------------------------------------------------ checkpoints

    def _fingerprint(self) -> dict[str, Any]:
        """What a resume must share; not the world size nor the batch: the data position is global (in
        samples) and DDP's state whole; another global batch is re-counted (``launch.resume.recount``)."""
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
        decision = self.checkpointer.decide(self.step)
        if self.step >= self.total_steps:
            return
        if decision.save:
            self._save_checkpoint(reason="preempted" if decision.stop else "periodic")
        if decision.stop:
            raise self.checkpointer.preempted(self.step)

    def _save_checkpoint(self, reason: str) -> None:
        """Every rank writes its part into the checkpoint manager's temporary directory."""

        def write(tmp: Path) -> Future | None:
            if self.backend.deepspeed:
                self.backend.save_engine(tmp)
            shards = self.backend.save_sharded(tmp, self.model, self.optimizers) if self.backend.fsdp else None
            # state_dict on every rank: collective under ZeRO-3
            write_trainer_state(tmp, self.state_dict(), self.train_loader.state_dict(), self.rank)
            return shards

        meta = {"epoch": self.epoch, "reason": reason, "fingerprint": self._fingerprint()}
        self.checkpointer.save(self.step, write, meta, last=reason != "periodic")

    def _resume(self) -> None:
        """``checkpoint.resume``: continue from a complete checkpoint (model, optimizers, schedules,
        scaler, step, loader position; this rank's RNG on the same world size) or start fresh."""
        path = self.checkpointer.start
        if path is None:
            return
        saved_world = check_resumable(path, self._fingerprint(), self.backend, self.world)
        state = load_state(path, self.backend, self.model, self.optimizers)
        self.load_state_dict(state)
        restore_rank(
            self.train_loader,
            path,
            rank=self.rank,
            world=self.world,
            saved_world=saved_world,
            seed=self.seed,
            step=self.step,
        )
        if self.epoch_step == 0:  # saved at an epoch's end, the loader may still be in the epoch before (the
            self.train_loader.set_epoch(self.epoch)  # steps leave its last len % accum_steps batches unread)
        saved_batch = state.get("global_batch", self.global_batch)
        if saved_batch != self.global_batch:  # the same sample, counted in steps of the new batch, its lr
            self.step, self.epoch_step = recount(
                step=self.step,
                epoch=self.epoch,
                batches_left=self.train_loader.batches_left(),
                steps_per_epoch=self.steps_per_epoch,
                total_steps=self.total_steps,
                accum_steps=self.cfg.accum_steps,
                batches=(saved_batch, self.global_batch),
            )
            for sched in self.schedulers:
                resume_schedule(sched, self.step)
        if self.epoch_step >= self.steps_per_epoch:  # this layout has no full step left in the epoch
            self.epoch, self.epoch_step = self.epoch + 1, 0
        self.checkpointer.path = path
        log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)
