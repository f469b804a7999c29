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

Modules, one job each: :mod:`.files` (the layout's names, fsync'd writes, reading),
:mod:`.state` (every rank's RNG and data-loader state, the trainer's file), :mod:`.fingerprint` (what a resume
must share with its checkpoint), :mod:`.manager` (the save protocol, keep-k, resolving a
path), :mod:`.weights` (weights-only loading; the one checked ``load_state_dict``).
"""

from launch.checkpoint.files import (
    COMPLETE,
    LATEST,
    META,
    TMP_PREFIX,
    TRAINER_FILE,
    is_complete,
    load_file,
    rank_file,
    read_meta,
    save_file,
    step_dir_name,
)
from launch.checkpoint.fingerprint import check_compatible, fingerprint
from launch.checkpoint.manager import CheckpointManager, checkpoints, latest, resolve
from launch.checkpoint.state import (
    nonfinite_keys,
    rank_state,
    restore_rank_state,
    rng_state,
    set_rng_state,
    write_trainer_state,
)
from launch.checkpoint.weights import checkpoint_model, load_checked, load_weights

__all__ = [
    "COMPLETE",
    "LATEST",
    "META",
    "TMP_PREFIX",
    "TRAINER_FILE",
    "CheckpointManager",
    "check_compatible",
    "checkpoint_model",
    "checkpoints",
    "fingerprint",
    "is_complete",
    "latest",
    "load_checked",
    "load_file",
    "load_weights",
    "nonfinite_keys",
    "rank_file",
    "rank_state",
    "read_meta",
    "resolve",
    "restore_rank_state",
    "rng_state",
    "save_file",
    "set_rng_state",
    "step_dir_name",
    "write_trainer_state",
]
