"""Process-group facts that are right under every launcher.

Accelerate's ``process_index`` / ``num_processes`` read 0 / 1 on every rank when it
drives DeepSpeed on CPU, so rank-0-only writes and per-rank data splits use these
instead (``torch.distributed`` first, the launcher's environment before init).
"""

from __future__ import annotations

import os

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
