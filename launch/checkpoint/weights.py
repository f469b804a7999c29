"""Model weights only: the one way this project loads a state dict into a module it did not save it from
(``trainer.checkpoint.weights_only``, exports, backbones), with one error line when it does not fit."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from launch import fsdp
from launch.checkpoint.files import TRAINER_FILE, load_file
from launch.checkpoint.manager import resolve
from launch.errors import CheckpointError

log = logging.getLogger(__name__)


def load_checked(
    module: nn.Module, state: dict[str, Tensor], *, what: str, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``module`` (whole or FSDP-sharded) once it fits, else one CheckpointError
    line naming ``what`` (where ``state`` came from) and the first offending keys. Shapes must agree
    on every shared key; ``strict``: no key may be missing or unexpected either, else at least one
    must match. Returns ``(missing, unexpected)`` key lists."""
    own = module.state_dict()  # global shapes (FSDP: DTensors, not shards)
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = sorted(k for k in own.keys() & state.keys() if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    if strict:
        problems += [f"missing keys: {_few(missing)}"] if missing else []
        problems += [f"unexpected keys: {_few(unexpected)}"] if unexpected else []
    if shapes:
        k = shapes[0]
        problems.append(
            f"{k} has shape {list(state[k].shape)} there, {list(own[k].shape)} in this model "
            f"({len(shapes)} mismatched tensors)"
        )
    if not strict and not own.keys() & state.keys():
        problems.append(f"no tensor name matches this model (e.g. {next(iter(state), '<empty>')})")
    if problems:
        raise CheckpointError(f"{what} does not fit {type(module).__name__}: {'; '.join(problems)}")
    if fsdp.is_sharded(module):
        missing, unexpected = fsdp.load_full_state_dict(module, state)
    else:
        missing, unexpected = module.load_state_dict(state, strict=strict)
    return list(missing), list(unexpected)


def load_weights(model: nn.Module, source: str | Path) -> tuple[list[str], list[str]]:
    """Model weights only (``trainer.checkpoint.weights_only``): from a complete checkpoint,
    a run directory, a ``.safetensors`` file or a torch file holding a state dict (or one
    under ``"model"``, as official MAE checkpoints do). Keys present in both must have equal
    shapes; returns ``(missing, unexpected)`` key lists, which are logged."""
    like = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}  # FSDP: not shards
    state = _weights_state(Path(source), like=like)
    missing, unexpected = load_checked(model, state, what=f"trainer.checkpoint.weights_only={source}", strict=False)
    log.info("loaded weights from %s (%d missing, %d unexpected keys)", source, len(missing), len(unexpected))
    return missing, unexpected


def checkpoint_model(ckpt: Path, like: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """The model weights of complete checkpoint ``ckpt`` from ``trainer.pt`` or FSDP's shards (read in
    this one process, whatever world size wrote them; ``like`` names the tensors), or None: a DeepSpeed
    checkpoint, whose weights are in its engine files."""
    state = load_file(ckpt / TRAINER_FILE)
    if "model" in state:
        return state["model"]
    if (ckpt / fsdp.SHARDED_DIR).is_dir():
        return fsdp.read_model(ckpt / fsdp.SHARDED_DIR, like)
    return None


def _weights_state(source: Path, like: dict[str, Tensor]) -> dict[str, Tensor]:
    if source.is_dir():
        ckpt = resolve(source, setting="trainer.checkpoint.weights_only")
        state = checkpoint_model(ckpt, like)
        if state is None:
            raise CheckpointError(
                f"trainer.checkpoint.weights_only={source}: a DeepSpeed checkpoint holds no {TRAINER_FILE} model; "
                "export its weights first"
            )
        return state
    if not source.is_file():
        raise CheckpointError(f"trainer.checkpoint.weights_only={source}: no such file or checkpoint")
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(str(source))
    state = load_file(source)
    return state.get("model", state) if isinstance(state, dict) else state


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" ... ({len(keys)} in all)" if len(keys) > 3 else "")
