"""Atomic, resumable checkpoints that survive kills, preemption and full disks.

Layout of ``run_dir/checkpoints``::

    step-00000040/          a complete checkpoint, never modified after its rename
        trainer.pt          rank 0: the trainer's state_dict (model, optimizers, schedulers, scaler, step, epoch)
        rank-00000.pt ...   every rank: its RNG states and data-loader position (global: the same on every rank)
        sharded/            backend=fsdp: model + optimizer shards of every rank (torch.distributed.checkpoint)
        meta.json           step, epoch, world size, why it was saved, fingerprint of the run
        COMPLETE            the completion marker, written last, before the rename
    latest                  names the newest complete checkpoint; replaced atomically, after the rename
    .tmp-step-00000060/     a checkpoint being written: never loaded, removed on the next start

A save is: every rank writes its own files into the temporary directory (flushed and
fsync'd), the ranks agree that every write succeeded, then global rank 0 writes
``meta.json`` and ``COMPLETE``, renames the directory, replaces ``latest`` and only then
deletes checkpoints beyond ``keep``. A kill at any point leaves the previous complete
checkpoint loadable. Under DeepSpeed the trainer's ``write`` callback calls the engine's
``save_checkpoint(tmp_dir)`` on every rank, so the same protocol covers it.

An asynchronous write (FSDP's ``dcp.async_save``) returns a future from the trainer's
``write``: the save then stays *pending* in its temporary directory while training goes on,
and is published (the same agreement, ``COMPLETE``, rename, ``latest``, keep-k) only when
every rank's future has finished: at a :meth:`CheckpointManager.poll` that finds them all
done, or before the next save and at the end of the run (``poll(block=True)``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from launch import dist, fsdp
from launch.config import flatten
from launch.errors import CheckpointError

log = logging.getLogger(__name__)

COMPLETE, META, LATEST, TRAINER_FILE = "COMPLETE", "meta.json", "latest", "trainer.pt"
TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"^step-(\d{8,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / f"rank-{rank:05d}.pt"


# ----------------------------------------------------------------------------- files


def save_file(obj: Any, path: Path) -> None:
    """``torch.save`` that reaches the disk before returning (flush + fsync). A failed
    write raises the ``OSError`` itself ("No space left on device"), not torch's
    "unexpected pos" from its C++ writer."""
    with open(path, "wb") as f:
        sink = _Sink(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise
        f.flush()
        os.fsync(f.fileno())


class _Sink:
    """A file wrapper that remembers the ``OSError`` torch's writer swallows."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def load_file(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers, no code runs."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file: the message is the story
        raise CheckpointError(f"cannot read checkpoint file {path}: {str(err).splitlines()[0]}") from None


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Files written by other code (DeepSpeed) may still sit in the page cache."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in sorted({p.parent for p in root.rglob("*")} | {root}):
        _fsync_dir(path)


def is_complete(ckpt: Path) -> bool:
    return (ckpt / COMPLETE).is_file() and (ckpt / META).is_file() and _STEP_RE.match(ckpt.name) is not None


def read_meta(ckpt: Path) -> dict[str, Any]:
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker); use a step-* directory")
    return json.loads((ckpt / META).read_text())


# ----------------------------------------------------------------------------- RNG


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
            raise CheckpointError(f"checkpoint has CUDA RNG states of {len(cuda)} devices, this process sees {torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(cuda)


def _as_tuples(x: Any) -> Any:
    """``random.setstate`` wants tuples; a round trip through a file may give lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------- compatibility


def fingerprint(model: nn.Module, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint must share with a run to resume it: the task class, every
    parameter and buffer shape (ZeRO-3's full ``ds_shape``, not the local shard), and
    ``settings`` (dotted keys such as ``model.embed_dim``, ``world_size``)."""
    fp: dict[str, Any] = {"task": type(model).__name__}
    fp.update(flatten(settings or {}))
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        fp[f"shape of {name}"] = list(getattr(tensor, "ds_shape", tensor.shape))
    return fp


def check_compatible(ckpt: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise a one-line :class:`CheckpointError` naming what differs (settings first)."""
    keys = sorted(saved.keys() | current.keys(), key=lambda k: (k.startswith("shape of "), k))
    diffs = [k for k in keys if saved.get(k, _ABSENT) != current.get(k, _ABSENT)]
    if not diffs:
        return
    shown = "; ".join(f"checkpoint has {k}={_show(saved.get(k, _ABSENT))}, this run has {_show(current.get(k, _ABSENT))}" for k in diffs[:3])
    more = f" (and {len(diffs) - 3} more differences)" if len(diffs) > 3 else ""
    raise CheckpointError(
        f"cannot resume from {ckpt}: {shown}{more}. To start from its weights only, use a new run_dir "
        f"with trainer.checkpoint.weights_only={ckpt}"
    )


_ABSENT = object()


def _show(value: Any) -> str:
    return "<absent>" if value is _ABSENT else json.dumps(value)


def nonfinite_keys(state: Any, prefix: str = "") -> list[str]:
    """Dotted keys of floating tensors in a (nested) state dict holding NaN or inf."""
    if isinstance(state, torch.Tensor):
        bad = state.is_floating_point() and not bool(torch.isfinite(state).all())
        return [prefix.rstrip(".")] if bad else []
    items: Iterable[tuple[Any, Any]] = state.items() if isinstance(state, dict) else (
        enumerate(state) if isinstance(state, (list, tuple)) else ())
    return [k for key, value in items for k in nonfinite_keys(value, f"{prefix}{key}.")]


def rank_state(loader_state: dict[str, Any] | None) -> dict[str, Any]:
    """What every rank saves for itself: RNG states and the data-loader position."""
    return {"rng": rng_state(), "loader": loader_state}


def restore_rank_state(ckpt: Path, rank: int, *, rng: bool = True) -> dict[str, Any] | None:
    """Restore the RNG states of ``rank`` from ``ckpt`` (unless ``rng`` is False: a resume on another
    world size, whose ranks are not the checkpoint's); return its data-loader state."""
    state = load_file(rank_file(ckpt, rank))
    if rng:
        set_rng_state(state["rng"])
    return state["loader"]


# ----------------------------------------------------------------------------- manager


class CheckpointManager:
    """Writes and finds complete checkpoints in ``directory``; every rank makes the same calls.

    ``agree(ok) -> bool`` must return True on every rank iff ``ok`` is True on every rank
    (it doubles as the barrier); ``share(obj)`` returns rank 0's ``obj`` on every rank. The
    defaults use the process group through :mod:`launch.dist`.
    """

    def __init__(self, directory: str | Path, *, keep: int, rank: int | None = None,
                 agree: Callable[[bool], bool] = dist.all_true, share: Callable[[Any], Any] = dist.broadcast_object) -> None:
        if keep < 1:
            raise CheckpointError(f"checkpoint keep={keep} must be >= 1")
        self.directory, self.keep = Path(directory), keep
        self.rank = dist.rank() if rank is None else rank
        self._agree, self._share = agree, share
        self._pending: _Pending | None = None

    # -- finding

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and is_complete(p)]
        return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))

    def latest(self) -> Path | None:
        """The newest complete checkpoint; a newer one than ``latest`` names can only exist
        if a kill fell between the rename and the pointer update, and it is complete."""
        found = self.checkpoints()
        return found[-1] if found else None

    def resolve(self, resume: str, setting: str = "trainer.checkpoint.resume") -> Path | None:
        """``resume``: ``"none"``, ``"auto"`` (newest complete, or None) or a checkpoint path
        (a ``step-*`` directory, the ``latest`` file, a checkpoints or run directory)."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if path.is_file() and path.name == LATEST:  # the pointer file
            path = path.parent / path.read_text().strip()
        elif path.is_dir() and not _STEP_RE.match(path.name):
            inner = CheckpointManager(path / "checkpoints" if (path / "checkpoints").is_dir() else path, keep=1, rank=self.rank)
            path = inner.latest() or path
        if not path.exists():
            raise CheckpointError(f"{setting}={resume}: no such checkpoint")
        if not is_complete(path):
            raise CheckpointError(f"{setting}={resume}: not a complete checkpoint (no {COMPLETE} marker in a step-* directory)")
        return path

    def resolve_agreed(self, resume: str, setting: str = "trainer.checkpoint.resume") -> Path | None:
        """:meth:`resolve` decided by rank 0 for every rank (call it on every rank): ranks that each
        looked for themselves could pick different checkpoints, or some none, and silently diverge."""
        answer: tuple[str | None, str | None] = (None, None)
        if self.rank == 0:
            try:
                path = self.resolve(resume, setting)
                answer = (str(path) if path is not None else None, None)
            except CheckpointError as err:
                answer = (None, str(err))
        found, error = self._share(answer)
        if error is not None:
            raise CheckpointError(error)
        path = Path(found) if found is not None else None
        if not self._agree(path is None or is_complete(path)):
            raise CheckpointError(f"{setting}={resume}: {path} is not visible on every rank: "
                                  f"checkpoints must be on a file system all nodes share")  # fmt: skip
        return path

    # -- writing

    def prepare(self) -> None:
        """At the start of a run, on every rank: create the directory, prove it writable and
        shared by all ranks, remove temporary directories left by a killed save. Fails early,
        before any training."""
        token = secrets.token_hex(8)  # rank 0's is the one that counts
        err = self._attempt(lambda: self._prepare_main(token)) if self.rank == 0 else None
        self._require(err, f"cannot use checkpoint directory {self.directory}")
        self._check_shared(self._share(token))

    def _check_shared(self, token: str) -> None:
        """Every rank must read the marker rank 0 wrote: a checkpoint holds every rank's files in
        one directory, and a node-local ``run_dir`` would let ranks resume from different steps."""
        marker = self._marker(token)
        try:
            seen = marker.read_text() == token
        except OSError:
            seen = False
        shared = self._agree(seen)
        if self.rank == 0:
            marker.unlink(missing_ok=True)
        if not shared:
            raise CheckpointError(
                f"checkpoint directory {self.directory} is not shared by all ranks (a file rank 0 wrote there "
                f"is missing on another rank): put run_dir on a file system every node mounts"
            )

    def _marker(self, token: str) -> Path:
        return self.directory / f"{TMP_PREFIX}shared-{token}"

    def save(self, step: int, write: Callable[[Path], Future | None], meta: dict[str, Any] | None = None) -> Path | None:
        """Write checkpoint ``step``. ``write(tmp_dir)`` runs on every rank and writes that
        rank's files (use :func:`save_file`); ``meta`` (JSON) goes into ``meta.json``.
        Returns the complete checkpoint, or None when ``write`` returned a future (every rank
        the same): the save is then pending, see :meth:`poll`. A pending save finishes first."""
        self.poll(block=True)
        tmp = self.directory / f"{TMP_PREFIX}{step_dir_name(step)}"
        final = self.directory / step_dir_name(step)
        what = f"cannot write checkpoint {final}"
        err = self._attempt(lambda: _fresh_dir(tmp)) if self.rank == 0 else None
        self._require(err, what, tmp)
        futures: list[Future | None] = []
        self._require(self._attempt(lambda: futures.append(write(tmp)), any_error=True), what, tmp)
        publish = {**(meta or {}), "step": step, "world_size": dist.world_size(), "time": time.time()}
        if futures[0] is not None:
            self._pending = _Pending(tmp, final, publish, futures[0])
            return None
        return self._complete(tmp, final, publish)

    def poll(self, *, block: bool = False) -> Path | None:
        """Publish the pending asynchronous save if every rank's write has finished (with
        ``block``, after waiting for them); returns it then, else None. Every rank calls this
        at the same step: it agrees across ranks."""
        pending = self._pending
        if pending is None or not (block or self._agree(pending.future.done())):
            return None
        self._pending = None
        self._require(self._attempt(pending.future.result, any_error=True), f"cannot write checkpoint {pending.final}", pending.tmp)
        return self._complete(pending.tmp, pending.final, pending.meta)

    def _complete(self, tmp: Path, final: Path, meta: dict[str, Any]) -> Path:
        err = self._attempt(lambda: self._publish(tmp, final, meta)) if self.rank == 0 else None
        self._require(err, f"cannot write checkpoint {final}", tmp)
        if self.rank == 0:
            log.info("checkpoint saved: %s", final)
        return final

    def _prepare_main(self, token: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f"{TMP_PREFIX}*"):
            log.warning("removing partial checkpoint %s (a save was interrupted)", stale)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:  # the marker of a start that was killed
                stale.unlink(missing_ok=True)
        _write_text(self._marker(token), token)  # proves the directory writable; every rank reads it

    def _publish(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        _fsync_tree(tmp)
        _write_text(tmp / META, json.dumps(meta, indent=1))
        _write_text(tmp / COMPLETE, f"{final.name}\n")
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. end of run right after a periodic save)
            _remove(final)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        pointer = self.directory / f"{TMP_PREFIX}{LATEST}"
        _write_text(pointer, f"{final.name}\n")
        os.replace(pointer, self.directory / LATEST)
        _fsync_dir(self.directory)
        for old in self.checkpoints()[: -self.keep]:
            _remove(old)

    def _attempt(self, fn: Callable[[], Any], any_error: bool = False) -> str | None:
        """Run ``fn``; an OS error (or, for foreign writers such as ``torch.save`` and
        DeepSpeed, any error) becomes a one-line description, so that the ranks can agree."""
        try:
            fn()
        except OSError as err:
            return f"{err.strerror or err} ({err.filename or self.directory})"
        except Exception as err:
            if not any_error:
                raise
            log.exception("rank %d failed to write its checkpoint files", self.rank)
            return str(err).splitlines()[0] if str(err) else type(err).__name__
        return None

    def _require(self, err: str | None, what: str, tmp: Path | None = None) -> None:
        if self._agree(err is None):
            return
        if tmp is not None and self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = self.latest()
        intact = f"; earlier checkpoints are intact (latest: {kept.name})" if kept else ""
        raise CheckpointError(f"{what}: {err or 'failed on another rank'}{intact}")


@dataclass
class _Pending:
    """An asynchronous save whose files are still being written into ``tmp``."""

    tmp: Path
    final: Path
    meta: dict[str, Any]
    future: Future


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _remove(path: Path) -> None:
    """Rename first, so a kill during the deletion never leaves a half-deleted ``step-*``."""
    doomed = path.with_name(f"{TMP_PREFIX}old-{path.name}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def load_weights(model: nn.Module, source: str | Path) -> tuple[list[str], list[str]]:
    """Model weights only (``trainer.checkpoint.weights_only``): from a complete checkpoint,
    a run directory, a ``.safetensors`` file or a torch file holding a state dict (or one
    under ``"model"``, as official MAE checkpoints do). Keys present in both must have equal
    shapes; returns ``(missing, unexpected)`` key lists, which are logged."""
    own = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}  # global shapes (FSDP: not shards)
    state = _weights_state(Path(source), like=own)
    mismatched = [k for k in state.keys() & own.keys() if tuple(state[k].shape) != tuple(own[k].shape)]
    if mismatched:
        k = sorted(mismatched)[0]
        raise CheckpointError(f"trainer.checkpoint.weights_only={source}: {k} has shape {list(state[k].shape)} there, "
                              f"{list(own[k].shape)} in this model ({len(mismatched)} mismatched tensors)")
    if not state.keys() & own.keys():
        raise CheckpointError(f"trainer.checkpoint.weights_only={source}: no tensor name matches this model (e.g. {next(iter(state), '<empty>')})")
    if fsdp.is_sharded(model):
        missing, unexpected = fsdp.load_full_state_dict(model, state)
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
    log.info("loaded weights from %s (%d missing, %d unexpected keys)", source, len(missing), len(unexpected))
    return list(missing), list(unexpected)


def _weights_state(source: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if source.is_dir():
        ckpt = CheckpointManager(source, keep=1, rank=0).resolve(str(source), "trainer.checkpoint.weights_only")
        state = load_file(ckpt / TRAINER_FILE)
        if "model" not in state and (ckpt / fsdp.SHARDED_DIR).is_dir():
            return fsdp.read_model(ckpt / fsdp.SHARDED_DIR, like)
        if "model" not in state:
            raise CheckpointError(f"trainer.checkpoint.weights_only={source}: a DeepSpeed checkpoint holds no {TRAINER_FILE} model; export its weights first")
        return state["model"]
    if not source.is_file():
        raise CheckpointError(f"trainer.checkpoint.weights_only={source}: no such file or checkpoint")
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(str(source))
    state = load_file(source)
    return state.get("model", state) if isinstance(state, dict) else state
