"""Process-group facts that are right under every launcher.

Accelerate's ``process_index`` / ``num_processes`` read 0 / 1 on every rank when it
drives DeepSpeed on CPU, so rank-0-only writes and per-rank data splits use these
instead (``torch.distributed`` first, the launcher's environment before init).

:func:`init_process_group` joins the group before Accelerate does when torchrun's
restarts need it (see there); otherwise Accelerate / DeepSpeed create it as usual.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import importlib.util
import logging
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# They take the default group as a default argument value (``group=GroupMember.WORLD``), read when they
# are imported: imported once the group exists, they hold it until the interpreter's own teardown.
_PIN_GROUP_AT_IMPORT = ("torch.distributed.nn", "deepspeed")


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def agreement_device() -> torch.device:
    """Where small agreement tensors live: the current CUDA device under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks, in place (identity in one process). Stays on the
    tensor's device: reading the result is the caller's one host sync."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_true(flag: bool) -> bool:
    """True on every rank iff ``flag`` is true on every rank (also a barrier)."""
    failed = torch.tensor([0.0 if flag else 1.0], device=agreement_device())
    return all_reduce_max(failed).item() == 0.0


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (picklable; identity in one process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=agreement_device())
    return box[0]


def init_process_group() -> None:
    """Create the default process group in a namespace of this torchrun attempt, when needed.

    torchrun's agent hosts one TCPStore for the whole job (``TORCHELASTIC_USE_AGENT_STORE=True``:
    static and c10d rendezvous, torch 2.14) and keeps it across ``--max-restarts``. gloo and
    NCCL publish each rank's address / unique id there under fixed keys
    (``default_pg/0//cpu//0/RANK``), so after a restart a rank can read the *dead* attempt's
    entry and fail (``Gloo connectFullMesh failed ... Connection refused``) or wait until the
    timeout. Keys therefore go under ``attempt-{TORCHELASTIC_RESTART_COUNT}/``, a count that is
    exact for one agent (one node). Several agents count restarts each on its own (a node that
    restarts for a membership change does not count it), so multi-node runs need a fresh store
    per attempt from torchrun: ``--rdzv-backend c10d`` with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
    (``launch/slurm/pretrain.sbatch`` sets it); Accelerate then creates the group as usual.
    """
    if world_size() == 1 or dist.is_initialized():
        return
    _before_group()  # whoever creates it: this function or Accelerate
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    agents, restarts = int(os.environ.get("GROUP_WORLD_SIZE", 1)), int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
    if agents > 1:
        if restarts and is_main():
            log.warning(
                "torchrun --max-restarts %d on %d nodes keeps one rendezvous store across restarts, so a restarted "
                "group can read the dead group's addresses and fail to connect: launch torchrun with "
                "--rdzv-backend c10d and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
                restarts,
                agents,
            )
        return
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=dist.default_pg_timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    backend = dist.get_default_backend_for_device(accelerator or torch.device("cpu"))
    # the backend's default timeout, as when Accelerate creates the group
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"attempt-{attempt}/", store), rank=rank(), world_size=world_size()
    )


def init_single_process_group() -> None:
    """A process group of this one process when no launcher made one (FSDP2 and
    ``torch.distributed.checkpoint`` need a group even then); no-op otherwise."""
    if dist.is_initialized() or world_size() > 1:
        return
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    backend = dist.get_default_backend_for_device(accelerator or torch.device("cpu"))
    _before_group()
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _before_group() -> None:
    """Before this process's group exists: import the modules that would pin it, and have it torn
    down at exit (once, however many fits create a Backend)."""
    for name in _PIN_GROUP_AT_IMPORT:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    atexit.unregister(_destroy_process_group)
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    """Tear the group down while the interpreter still runs.

    A gloo worker thread drops each finished collective's tensors itself, which takes the GIL; if it
    comes to that once interpreter finalization has begun, CPython ends the thread inside a C++
    destructor and the process aborts after a complete run ("terminate called without an active
    exception", exit -6). The group's threads are joined only when its last reference goes:
    torch's own (``destroy_process_group``), DeepSpeed's (its cached subgroups: its own
    ``destroy_process_group`` drops them), a pinning import's (see ``_PIN_GROUP_AT_IMPORT``) and the
    finished trainer's reference cycles (DDP model, Accelerator, DeepSpeed engine), which would
    otherwise wait for the garbage collection inside finalization.
    """
    if dist.is_initialized():
        deepspeed_comm = sys.modules.get("deepspeed.comm")
        if deepspeed_comm is not None and deepspeed_comm.is_initialized():
            deepspeed_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
    # at exit already: DataLoader iterators this collection frees skip their graceful worker shutdown
    # (~5 s per worker), as they do once torch's own exit handler, which runs after this one, has run
    torch.utils.data._utils._set_python_exit_flag()
    gc.collect()
