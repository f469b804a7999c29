"""What every rank saves for itself (its random states and its data-loader position), and rank 0 for all:
the trainer's state."""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launch.checkpoint.files import TRAINER_FILE, load_file, rank_file, save_file
from launch.errors import CheckpointError


def rng_state() -> dict[str, Any]:
    """This process's random states: python, numpy, torch CPU and (if in use) CUDA."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) != torch.cuda.device_count():
            raise CheckpointError(
                f"checkpoint has CUDA RNG states of {len(cuda)} devices, this process sees {torch.cuda.device_count()}"
            )
        torch.cuda.set_rng_state_all(cuda)


def _as_tuples(x: Any) -> Any:
    """``random.setstate`` wants tuples; a round trip through a file may give lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def nonfinite_keys(state: Any, prefix: str = "") -> list[str]:
    """Dotted keys of floating tensors in a (nested) state dict holding NaN or inf."""
    if isinstance(state, torch.Tensor):
        bad = state.is_floating_point() and not bool(torch.isfinite(state).all())
        return [prefix.rstrip(".")] if bad else []
    items: Iterable[tuple[Any, Any]] = (
        state.items() if isinstance(state, dict) else (enumerate(state) if isinstance(state, (list, tuple)) else ())
    )
    return [k for key, value in items for k in nonfinite_keys(value, f"{prefix}{key}.")]


def rank_state(loader_state: dict[str, Any] | None) -> dict[str, Any]:
    """What every rank saves for itself: RNG states and the data-loader position."""
    return {"rng": rng_state(), "loader": loader_state}


def write_trainer_state(tmp: Path, state: dict[str, Any], loader_state: dict[str, Any] | None, rank: int) -> None:
    """Into the checkpoint being written in ``tmp``: ``trainer.pt`` (rank 0: ``state``, shared by all
    ranks) and this rank's ``rank-NNNNN.pt`` (:func:`rank_state`)."""
    if rank == 0:
        bad = nonfinite_keys(state)  # skipped steps keep weights finite; never save otherwise
        if bad:
            raise ValueError(f"refusing to save NaN/inf in {bad[0]} ({len(bad)} tensors)")
        save_file(state, tmp / TRAINER_FILE)
    save_file(rank_state(loader_state), rank_file(tmp, rank))


def restore_rank_state(ckpt: Path, rank: int, *, rng: bool = True) -> dict[str, Any] | None:
    """Restore the RNG states of ``rank`` from ``ckpt`` (unless ``rng`` is False: a resume on another
    world size, whose ranks are not the checkpoint's); return its data-loader state."""
    state = load_file(rank_file(ckpt, rank))
    if rng:
        set_rng_state(state["rng"])
    return state["loader"]
