"""Fault injection for the rehearsal's fp16 cell (never in the product):

    torchrun --nproc_per_node 2 tests/rehearsal_poison.py --step N MODULE ARGS...

runs ``python -m MODULE ARGS`` unchanged except that rank 0's batch of the N-th training
forward of the MAE task is turned to NaN, as a corrupt batch or an fp16 overflow would.
"""

from __future__ import annotations

import runpy
import sys

from launch import dist
from pretrain.task import MAETask


def poison(step: int) -> None:
    forward, calls = MAETask.forward, [0]

    def poisoned(self: MAETask, batch: dict, phase: str = "main") -> dict:
        if self.training:
            calls[0] += 1
            if calls[0] == step and dist.rank() == 0:
                batch = {**batch, "image": batch["image"] * float("nan")}
        return forward(self, batch, phase)

    MAETask.forward = poisoned


if __name__ == "__main__":
    flag, step, module, *args = sys.argv[1:]
    assert flag == "--step", "usage: rehearsal_poison.py --step N MODULE ARGS..."
    poison(int(step))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
