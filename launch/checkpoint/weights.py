"""Model weights only, from a checkpoint, a run directory or a weights file (``trainer.checkpoint.weights_only``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from launch import fsdp
from launch.checkpoint.files import TRAINER_FILE, load_file
from launch.checkpoint.manager import resolve
from launch.errors import CheckpointError

log = logging.getLogger(__name__)


def load_weights(model: nn.Module, source: str | Path) -> tuple[list[str], list[str]]:
    """Model weights only (``trainer.checkpoint.weights_only``): from a complete checkpoint,
    a run directory, a ``.safetensors`` file or a torch file holding a state dict (or one
    under ``"model"``, as official MAE checkpoints do). Keys present in both must have equal
    shapes; returns ``(missing, unexpected)`` key lists, which are logged."""
    own = {
        k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()
    }  # global shapes (FSDP: not shards)
    state = _weights_state(Path(source), like=own)
    mismatched = [k for k in state.keys() & own.keys() if tuple(state[k].shape) != tuple(own[k].shape)]
    if mismatched:
        k = sorted(mismatched)[0]
        raise CheckpointError(
            f"trainer.checkpoint.weights_only={source}: {k} has shape {list(state[k].shape)} there, "
            f"{list(own[k].shape)} in this model ({len(mismatched)} mismatched tensors)"
        )
    if not state.keys() & own.keys():
        raise CheckpointError(
            f"trainer.checkpoint.weights_only={source}: no tensor name matches this model "
            f"(e.g. {next(iter(state), '<empty>')})"
        )
    if fsdp.is_sharded(model):
        missing, unexpected = fsdp.load_full_state_dict(model, state)
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
    log.info("loaded weights from %s (%d missing, %d unexpected keys)", source, len(missing), len(unexpected))
    return list(missing), list(unexpected)


def _weights_state(source: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if source.is_dir():
        ckpt = resolve(source, setting="trainer.checkpoint.weights_only")
        state = load_file(ckpt / TRAINER_FILE)
        if "model" not in state and (ckpt / fsdp.SHARDED_DIR).is_dir():
            return fsdp.read_model(ckpt / fsdp.SHARDED_DIR, like)
        if "model" not in state:
            raise CheckpointError(
                f"trainer.checkpoint.weights_only={source}: a DeepSpeed checkpoint holds no {TRAINER_FILE} model; "
                "export its weights first"
            )
        return state["model"]
    if not source.is_file():
        raise CheckpointError(f"trainer.checkpoint.weights_only={source}: no such file or checkpoint")
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(str(source))
    state = load_file(source)
    return state.get("model", state) if isinstance(state, dict) else state
