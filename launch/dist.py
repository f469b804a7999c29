"""Process-group facts that are right under every launcher.

Accelerate's ``process_index`` / ``num_processes`` read 0 / 1 on every rank when it
drives DeepSpeed on CPU, so rank-0-only writes and per-rank data splits use these
instead (``torch.distributed`` first, the launcher's environment before init).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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
