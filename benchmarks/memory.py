"""Peak memory of a benchmarked region: ``torch.cuda.max_memory_allocated`` on GPU, RSS on CPU.

On Linux the process's peak RSS (``VmHWM``) can be reset by writing ``5`` to
``/proc/self/clear_refs``, so each benchmarked model gets its own CPU peak; elsewhere the
lifetime peak from ``getrusage`` is reported instead (an upper bound).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window for ``device``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass  # not Linux or not permitted: peak_memory_mb falls back to the lifetime peak


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last ``reset_peak_memory``, in MiB (CUDA allocator or process RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_kib("VmHWM") / 1024 if _STATUS.exists() else _lifetime_peak_rss_mb()


def memory_kind(device: torch.device) -> str:
    return "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss"


def _status_kib(field: str) -> float:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return _lifetime_peak_rss_mb() * 1024


def _lifetime_peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
