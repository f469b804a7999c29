"""Where a run starts, and how a resumed run takes up its checkpoint.

The trainer calls :func:`resolve_start` before the backend wraps the task (``checkpoint.resume``, or
``checkpoint.weights_only`` when starting fresh), then, inside the run, :func:`check_resumable`
(fingerprint, world size), :func:`load_state` (engine / shards / ``trainer.pt``), :func:`restore_rank`
(this rank's RNG and the global loader position) and, when the global batch changed, :func:`recount`.

A run resumes on another number of processes (DDP, FSDP): the loader position is counted in samples of
the epoch's global order, so it serves every world size; only DeepSpeed's per-rank optimizer partitions
tie a checkpoint to its world size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from torch import nn
from torch.optim import Optimizer

from launch.backend import Backend
from launch.checkpoint import (
    TRAINER_FILE,
    CheckpointManager,
    check_compatible,
    load_file,
    load_weights,
    read_meta,
    restore_rank_state,
)
from launch.config import CheckpointConfig
from launch.errors import CheckpointError

log = logging.getLogger(__name__)


def resolve_start(checkpoints: CheckpointManager, cfg: CheckpointConfig, task: nn.Module) -> Path | None:
    """The checkpoint ``cfg.resume`` names (every rank takes rank 0's answer), or None: then
    ``cfg.weights_only`` is loaded into ``task`` here, before the backend wraps it (DeepSpeed copies its
    fp32 masters from the module at initialization, and ZeRO-3 partitions the module)."""
    checkpoints.prepare()
    path = checkpoints.resolve_agreed(cfg.resume)
    if path is None and cfg.weights_only:  # only when starting fresh: a requeued run resumes instead
        load_weights(task, cfg.weights_only)
    return path


def check_resumable(path: Path, fingerprint: dict[str, Any], backend: Backend, world: int) -> int:
    """One-line CheckpointError for what this run (its ``fingerprint``, on ``world`` processes) cannot
    resume from ``path``; returns the checkpoint's world size."""
    meta = read_meta(path)
    saved_world = int(meta.get("world_size", world))
    saved, current = dict(meta.get("fingerprint", {})), dict(fingerprint)
    if "optimizers" not in saved:  # written before elastic resume: it recorded the world size (and batch), not
        saved.pop("world_size", None)  # the optimizers
        saved.pop("trainer", None)
        current.pop("optimizers")
    check_compatible(path, saved, current)
    # ZeRO's files hold each rank's partition of the optimizer state; FSDP's DCP checkpoint is keyed by
    # global tensor and reshards on load (launch/fsdp.load), so only DeepSpeed needs its world size
    if backend.deepspeed and saved_world != world:
        raise CheckpointError(
            f"cannot resume the {backend.cfg.backend} checkpoint {path} of {saved_world} processes "
            f"on {world}: relaunch with {saved_world} processes"
        )
    return saved_world


def load_state(path: Path, backend: Backend, model: nn.Module, optimizers: list[Optimizer]) -> dict[str, Any]:
    """The trainer's state of checkpoint ``path``; DeepSpeed's engine and FSDP's shards load their model
    and optimizers here, into ``model`` / ``optimizers``, and leave them out of the returned state."""
    if backend.deepspeed:
        backend.load_engine(path)
    if backend.fsdp:
        backend.load_sharded(path, model, optimizers)
    state = load_file(path / TRAINER_FILE)
    if "model" not in state and not (backend.deepspeed or backend.fsdp):
        raise CheckpointError(
            f"{path} holds sharded model state (trainer.backend=deepspeed or fsdp) but this run has "
            f"trainer.backend={backend.cfg.backend}: resume with the backend that wrote it"
        )
    return state


def restore_rank(loader: Any, path: Path, *, rank: int, world: int, saved_world: int, seed: int, step: int) -> None:
    """This rank's RNG streams and ``loader``'s position. On another world size the ranks' RNG streams do
    not map onto the new ranks (the ones that matter, augmentation and masks, follow the samples), so each
    rank reseeds; the loader position is global, so rank 0's serves all. The skipped-sample counts are
    per rank and summed when logged: rank 0 carries the old ranks' total, the others start from 0."""
    if saved_world == world:
        loader.load_state_dict(restore_rank_state(path, rank))
        return
    state = restore_rank_state(path, 0, rng=False)
    if state is not None and "corrupt" in state:
        old = (restore_rank_state(path, r, rng=False) or {} for r in range(saved_world))
        state = {**state, "corrupt": sum(int(s.get("corrupt", 0)) for s in old) if rank == 0 else 0}
    loader.load_state_dict(state)
    set_seed((seed + 1000 * rank + 7919 * step) % 2**32)


def recount(
    *,
    step: int,
    epoch: int,
    batches_left: int,
    steps_per_epoch: int,
    total_steps: int,
    accum_steps: int,
    batches: tuple[int, int],
) -> tuple[int, int]:
    """``(step, epoch_step)`` of a run resumed at its checkpoint's sample with another global batch
    (``batches``: the checkpoint's and this run's, in images per step), counted in steps of the new batch;
    ``batches_left`` is what the restored loader still yields in ``epoch``."""
    epoch_step = max(steps_per_epoch - batches_left // accum_steps, 0)
    new_step = epoch * steps_per_epoch + epoch_step
    log.warning(
        "global batch %d -> %d images per step since the checkpoint: continuing epoch %d at the same "
        "sample, as step %d of %d (was step %d), lr for the new batch",
        *batches,
        epoch,
        new_step,
        total_steps,
        step,
    )
    return new_step, epoch_step
