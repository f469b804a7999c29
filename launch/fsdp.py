"""PyTorch FSDP2 (``fully_shard``) for ``trainer.backend=fsdp``: sharding, clipping, the
root's weights outside ``forward`` and sharded ``torch.distributed.checkpoint`` state.

Why FSDP2 directly and not Accelerate's FSDP plugin (``fsdp_version: 2``): Accelerate 1.15
selects its FSDP mode only for GPU-like process types (``state.py``), never for
``MULTI_CPU``, so on CPU the plugin is silently dropped and the model wrapped in DDP: the
path could not be tested here, and the tests would pass on DDP. The trainer also needs the
FSDP calls themselves: units found by structure (transformer blocks, a baseline's layers,
not a class-name list), gradient sync and resharding per micro-step, ``unshard`` of the root
for evaluation, one ``get_optimizer_state_dict`` per phase optimizer (the AAE's share the
encoder), a dedicated group for asynchronous saves. Each is one torch call here.

Units: every parameter-owning element of an ``nn.ModuleList`` / ``nn.Sequential`` (the
outermost ones: MAE encoder and decoder blocks, a timm ViT's blocks, a baseline's layers),
then the task itself as the root, which holds the rest (embeddings, norms, heads).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

#: the DCP folder inside a checkpoint directory; its ``.metadata`` says it is complete
SHARDED_DIR = "sharded"


def units(module: nn.Module) -> list[nn.Module]:
    """The outermost parameter-owning elements of ``ModuleList`` / ``Sequential`` containers
    below ``module``, in module order (children before the root, as ``fully_shard`` wants).
    An element without a ``forward`` of its own (a holder of an encoder and a decoder, say) is
    never called, so its parameters would never be gathered: its own children are looked at."""
    found: list[nn.Module] = []
    for child in module.children():
        if not isinstance(child, (nn.ModuleList, nn.Sequential)):
            found += units(child)
            continue
        for item in child.children():
            if isinstance(item, (nn.ModuleList, nn.Sequential)) or type(item).forward is nn.Module.forward:
                found += units(nn.ModuleList([item]))
            elif any(True for _ in item.parameters()):
                found.append(item)
    return found


def shard(task: nn.Module, optimizers: Iterable[Optimizer], *, bf16: bool, compile: bool) -> nn.Module:
    """``fully_shard`` every unit, then ``task`` (the root, in place), and point ``optimizers``
    (built on the whole task, empty state) at the new DTensor parameters. With ``bf16`` the
    parameters are all-gathered and used in bf16 and gradients reduced in fp32; the root keeps
    its inputs (the batch, hence the loss targets) in fp32 under the trainer's autocast.
    ``compile`` compiles each unit (torchtitan's order: compile, then shard).

    ``fully_shard`` moves each unit to the device and frees its whole weights once sharded, as
    long as nothing else holds them: meanwhile the optimizers hold parameter names, so a device
    never holds more than one whole unit (give it ``task`` on the CPU)."""
    unit_mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    root_mp = MixedPrecisionPolicy(
        param_dtype=unit_mp.param_dtype, reduce_dtype=unit_mp.reduce_dtype, cast_forward_inputs=False
    )
    names = {id(p): n for n, p in task.named_parameters(remove_duplicate=False)}
    groups = [group for opt in optimizers for group in opt.param_groups]
    held = [[names[id(p)] for p in group["params"]] for group in groups]
    for group in groups:
        group["params"] = []
    found = units(task)
    for i, unit in enumerate(found):
        if compile:
            unit.compile()
        # the last unit's backward runs right after the forward: freeing its weights would only gather
        # them again at once (torchtitan's default; module order is the forward order of our tasks)
        fully_shard(unit, mp_policy=unit_mp, reshard_after_forward=i < len(found) - 1)
    # the root's weights, likewise: kept gathered until the backward
    fully_shard(task, mp_policy=root_mp, reshard_after_forward=False)
    new = dict(task.named_parameters(remove_duplicate=False))
    for group, params in zip(groups, held):
        group["params"] = [new[name] for name in params]
    return task


def accumulate(model: nn.Module, *, is_last: bool) -> None:
    """Set up the next micro-step of a gradient accumulation. Until the last one, gradients stay
    local and unsharded (no reduce-scatter) and the weights stay gathered after the backward, so
    the next forward gathers nothing; the last one reduce-scatters the summed gradients and frees
    the weights. Trades memory for communication: between micro-steps a rank holds the whole
    gradients (fp32) and the whole weights (in the compute dtype); ``accum_steps=1`` holds neither."""
    model.set_requires_gradient_sync(is_last)
    model.set_reshard_after_backward(is_last)


def clip_(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Clip the global gradient norm over sharded gradients; returns the pre-clip norm
    (a plain device scalar, the same on every rank)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):  # a partial norm per shard: reduce it once
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def local(tensor: Tensor | None) -> Tensor | None:
    """This rank's shard of a (possibly) sharded tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def outside_forward(model: nn.Module) -> Iterator[None]:
    """The root's own weights (embeddings, norms, heads) gathered until exit, so that code
    calling parts of the model outside the root's ``forward`` (eval steps, pictures) works.
    Each unit still gathers its weights when called and frees them after: evaluation needs no
    more memory than training (reading a unit's parameters without calling it is not supported)."""
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's weights on every rank, on the CPU (a collective). Gathered one tensor at
    a time, each moved to the CPU before the next: ``full_state_dict=True`` would gather them all
    on the device first (the whole model, which under FSDP need not fit there), and its
    ``cpu_offload`` leaves them to rank 0 only."""
    state = get_model_state_dict(model)
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}


def load_full_state_dict(model: nn.Module, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Whole (unsharded) weights into a sharded model, non-strict: ``(missing, unexpected)``."""
    result = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    return list(result.missing_keys), list(result.unexpected_keys)


def _state(model: nn.Module, optimizers: list[Optimizer]) -> dict[str, Any]:
    """Sharded state, one optimizer state per phase: the AAE's optimizers share parameters,
    so one merged, name-keyed optimizer state could not hold both."""
    return {
        "model": get_model_state_dict(model),
        "optimizers": {str(i): get_optimizer_state_dict(model, opt) for i, opt in enumerate(optimizers)},
    }


def save(
    directory: Path,
    model: nn.Module,
    optimizers: list[Optimizer],
    *,
    async_group: torch_dist.ProcessGroup | None = None,
) -> Future | None:
    """Every rank writes its shards of model + optimizers to ``directory`` (a collective).

    With ``async_group`` the state is first copied to host memory, then written by a
    background thread that coordinates over that group (never the training group, whose
    collectives it would interleave with); returns the future to wait on before the
    checkpoint may be marked complete."""
    state = _state(model, optimizers)
    if async_group is None:
        dcp.save(state, checkpoint_id=directory)
        return None
    return dcp.async_save(state, checkpoint_id=directory, process_group=async_group)


def load(directory: Path, model: nn.Module, optimizers: list[Optimizer]) -> None:
    """Read ``directory`` (written by :func:`save`) into the sharded model and optimizers."""
    state = _state(model, optimizers)
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"])
    for i, opt in enumerate(optimizers):
        set_optimizer_state_dict(model, opt, state["optimizers"][str(i)])


def read_model(directory: Path, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """The whole model state of a sharded checkpoint, whatever world size wrote it, also in
    ONE process without a group: the tensors of ``like`` (e.g. a freshly built task's
    ``state_dict()``) that the checkpoint holds, in their stored shapes (the caller compares)."""
    stored = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    shapes = {
        k.removeprefix("model."): m.size for k, m in stored.items() if k.startswith("model.") and hasattr(m, "size")
    }
    state = {"model": {k: torch.empty(shapes[k], dtype=v.dtype) for k, v in like.items() if k in shapes}}
    single = not (torch_dist.is_available() and torch_dist.is_initialized())
    with warnings.catch_warnings():  # DCP warns that it loads in one process: here that is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=directory, no_dist=single)
    return state["model"]
