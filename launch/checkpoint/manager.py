"""The save protocol (see :mod:`launch.checkpoint`): atomic publish, keep-k, pending asynchronous
saves, the shared-directory check, and resolving which checkpoint a run resumes from."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch import dist, fileio
from launch.checkpoint import files
from launch.checkpoint.files import COMPLETE, LATEST, META, STEP_RE, TMP_PREFIX, is_complete, step_dir_name
from launch.errors import CheckpointError

log = logging.getLogger(__name__)


def checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory``; a newer one than the ``latest`` file names can
    only exist if a kill fell between the rename and the pointer update, and it is complete."""
    found = checkpoints(directory)
    return found[-1] if found else None


def resolve(
    resume: str | Path, directory: Path | None = None, setting: str = "trainer.checkpoint.resume"
) -> Path | None:
    """``resume``: ``"none"``, ``"auto"`` (the newest complete checkpoint in ``directory``, or None)
    or a checkpoint path (a ``step-*`` directory, the ``latest`` file, a checkpoints or run directory)."""
    if resume == "none":
        return None
    if resume == "auto":
        if directory is None:
            raise ValueError("resolve('auto') needs the checkpoints directory")
        return latest(Path(directory))
    path = Path(resume)
    if path.is_file() and path.name == LATEST:  # the pointer file
        path = path.parent / path.read_text().strip()
    elif path.is_dir() and not STEP_RE.match(path.name):
        path = latest(path / "checkpoints" if (path / "checkpoints").is_dir() else path) or path
    if not path.exists():
        raise CheckpointError(f"{setting}={resume}: no such checkpoint")
    if not is_complete(path):
        raise CheckpointError(
            f"{setting}={resume}: not a complete checkpoint (no {COMPLETE} marker in a step-* directory)"
        )
    return path


class CheckpointManager:
    """Writes and finds complete checkpoints in ``directory``; every rank makes the same calls.

    ``agree(ok) -> bool`` must return True on every rank iff ``ok`` is True on every rank
    (it doubles as the barrier); ``share(obj)`` returns rank 0's ``obj`` on every rank. The
    defaults use the process group through :mod:`launch.dist`.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int,
        rank: int | None = None,
        agree: Callable[[bool], bool] = dist.all_true,
        share: Callable[[Any], Any] = dist.broadcast_object,
    ) -> None:
        if keep < 1:
            raise CheckpointError(f"checkpoint keep={keep} must be >= 1")
        self.directory, self.keep = Path(directory), keep
        self.rank = dist.rank() if rank is None else rank
        self._agree, self._share = agree, share
        self._pending: _Pending | None = None

    # -- finding

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints in this manager's directory, oldest first."""
        return checkpoints(self.directory)

    def latest(self) -> Path | None:
        return latest(self.directory)

    def resolve(self, resume: str, setting: str = "trainer.checkpoint.resume") -> Path | None:
        """:func:`resolve`, with ``"auto"`` meaning this manager's directory."""
        return resolve(resume, self.directory, setting)

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
            raise CheckpointError(
                f"{setting}={resume}: {path} is not visible on every rank: "
                f"checkpoints must be on a file system all nodes share"
            )
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

    def save(
        self, step: int, write: Callable[[Path], Future | None], meta: dict[str, Any] | None = None
    ) -> Path | None:
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
        self._require(
            self._attempt(pending.future.result, any_error=True),
            f"cannot write checkpoint {pending.final}",
            pending.tmp,
        )
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
        fileio.write_synced(self._marker(token), token)  # proves the directory writable; every rank reads it

    def _publish(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        files.fsync_tree(tmp)
        fileio.write_synced(tmp / META, json.dumps(meta, indent=1))
        fileio.write_synced(tmp / COMPLETE, f"{final.name}\n")
        fileio.fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. end of run right after a periodic save)
            _remove(final)
        os.rename(tmp, final)
        fileio.fsync_dir(self.directory)
        fileio.write_atomic(self.directory / LATEST, f"{final.name}\n")
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
