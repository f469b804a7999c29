"""The only module that knows Accelerate, DeepSpeed and DDP (FSDP2 through :mod:`launch.fsdp`).

:class:`Backend` prepares a task and its optimizers, runs micro-steps (autocast,
backward, ``no_sync`` on non-final accumulation steps), clips, steps, all-reduces
metrics and unwraps. The trainer stays identical for one CPU, DDP on many GPUs /
nodes, DeepSpeed ZeRO 1/2/3 and FSDP2. FSDP2's ``fully_shard`` is used directly, not through
Accelerate's FSDP plugin: Accelerate 1.15 drops that plugin on CPU (``MULTI_CPU``) and wraps
the model in DDP, so it could not be tested here, and the trainer needs FSDP's own calls per
micro-step, for evaluation and per phase optimizer (details in :mod:`launch.fsdp`).

Ranks come from :mod:`launch.dist`, never from Accelerate: under DeepSpeed on CPU
Accelerate reports rank 0 of 1 on every process.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as torch_dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs
from torch import Tensor, nn
from torch.optim import Optimizer

from launch import dist, launcher
from launch import fsdp as fsdp2
from launch.config import TrainerConfig
from launch.errors import CheckpointError, ConfigError
from launch.launcher import MIXED_PRECISION, check_launcher, deepspeed_config

log = logging.getLogger(__name__)

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str) -> str:
    """``auto`` -> bf16 where this process's device multiplies bf16 natively, else fp32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if not _has_accelerator() and cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (otherwise oneDNN emulates it, slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401  (Accelerate's DeepSpeed path reads its metadata)
    except ImportError:
        raise ConfigError(
            "trainer.backend=deepspeed needs transformers: pip install 'mae-pipeline[deepspeed]'"
        ) from None


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    return probe.is_available() if probe is not None else torch.cuda.is_available()


#: per-module attributes ZeRO-3 adds besides ``ds_*`` (they hold the partitioned Parameters)
_ZERO_MODULE_ATTRS = ("_original_parameters", "_external_params")


def _tensors(module: nn.Module) -> list[tuple[str, Tensor | None]]:
    """``module``'s own parameters and buffers (not its children's), by attribute name."""
    return [*module._parameters.items(), *module._buffers.items()]


class Backend:
    """Accelerate (+ DeepSpeed) for one run; built once, before the data loaders."""

    #: `accelerate launch` settings describe the stage the launcher started, checked by the first
    #: fit of the process; later fits (the probe after pretraining) follow their own config
    _launcher_checked: ClassVar[bool] = False

    def __init__(self, cfg: TrainerConfig, *, multi_phase: bool = False) -> None:
        self.cfg = cfg = cfg.model_copy(update={"precision": resolve_precision(cfg.precision)})
        self.deepspeed = cfg.backend == "deepspeed"
        self.fsdp = cfg.backend == "fsdp"
        if cfg.checkpoint.async_save and not self.fsdp:
            raise ConfigError(
                f"trainer.checkpoint.async_save=true needs trainer.backend=fsdp (got {cfg.backend}): "
                "set one or the other"
            )
        if self.fsdp and cfg.precision == "fp16":
            raise ConfigError("trainer.backend=fsdp has no fp16 loss scaling: use trainer.precision=bf16 (or fp32)")
        if self.deepspeed and multi_phase:
            raise ConfigError(
                "trainer.backend=deepspeed supports one optimizer; this task has several phases: use backend=ddp"
            )
        if not Backend._launcher_checked:
            check_launcher(cfg)
            Backend._launcher_checked = True
        # Accelerate's state is a per-process singleton that refuses new settings; one process
        # runs several fits (pretrain, then probe), each with its own precision and backend.
        # The process group itself survives the reset.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        launcher.restore_env(deepspeed=self.deepspeed)
        dist.init_process_group()  # before Accelerate / DeepSpeed, which then reuse it
        plugin = None
        if self.deepspeed:
            _require_transformers()
            plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, dist.world_size()))
        # several phases leave some parameters without gradients in each backward
        ddp = DistributedDataParallelKwargs(find_unused_parameters=multi_phase)
        self.accelerator = Accelerator(
            # without cpu=True Accelerate sees no accelerator and runs each torchrun rank alone;
            # with it, DeepSpeed would be silently dropped (DeepSpeed picks its CPU accelerator itself)
            cpu=not self.deepspeed and not _has_accelerator(),
            mixed_precision=MIXED_PRECISION[cfg.precision],
            deepspeed_plugin=plugin,
            # DeepSpeed counts micro-steps itself; elsewhere `backward` scales by 1 / accum_steps
            gradient_accumulation_steps=cfg.accum_steps if self.deepspeed else 1,
            dynamo_backend="inductor" if cfg.compile else "no",
            kwargs_handlers=[ddp],
            step_scheduler_with_optimizer=False,
        )
        self.device = self.accelerator.device
        if self.fsdp:
            dist.init_single_process_group()  # fully_shard needs a group, also for one process
        # DCP's background writer coordinates over its own gloo group, never the training one
        self._async_group = torch_dist.new_group(backend="gloo") if self.fsdp and cfg.checkpoint.async_save else None
        # DeepSpeed's bf16 / fp16 cast the module itself and add no autocast, so floating inputs
        # must arrive in the module's dtype (as the Hugging Face Trainer casts them for DeepSpeed)
        self.input_dtype = _HALF.get(cfg.precision) if self.deepspeed else None

    # ------------------------------------------------------------------ setup

    def prepare(self, task: nn.Module, optimizers: list[Optimizer]) -> tuple[nn.Module, list[Optimizer]]:
        """Wrap ``task`` (DDP / DeepSpeed engine / compiled) and its optimizers. Loaders are
        never prepared: each rank reads its own shards. FSDP shards ``task`` in place and
        points the optimizers at its new (DTensor) parameters."""
        if self.fsdp:
            model = fsdp2.shard(task, optimizers, bf16=self.cfg.precision == "bf16", compile=self.cfg.compile)
            self._autocast_forward(model)
            return model, optimizers
        if self.deepspeed:  # it casts the task's tensors in place: ``release`` gives them their dtypes
            # back, and non-persistent buffers (constants such as a normalization, in no checkpoint) their values
            self._dtypes = {(id(m), k): t.dtype for m in task.modules() for k, t in _tensors(m) if t is not None}
            self._constants = {
                (id(m), k): m._buffers[k].detach().clone()
                for m in task.modules()
                for k in m._non_persistent_buffers_set
                if m._buffers.get(k) is not None
            }
        prepared = self.accelerator.prepare(task, *optimizers)
        return prepared[0], list(prepared[1:])

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The task itself: no DDP / DeepSpeed / torch.compile wrapper (state-dict keys stay plain).
        Under FSDP it is the sharded task: use :meth:`outside_forward` to call its parts."""
        if self.fsdp:
            return model
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        return self.accelerator.scaler

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Tensors to the training device (asynchronous from pinned host memory on CUDA); floating
        ones in ``input_dtype`` under DeepSpeed bf16 / fp16. Tasks compute their losses in fp32."""
        return {k: self._move(v) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _move(self, tensor: Tensor) -> Tensor:
        dtype = self.input_dtype if tensor.is_floating_point() else None
        return tensor.to(self.device, dtype=dtype, non_blocking=True)

    # ------------------------------------------------------------------ steps

    @contextlib.contextmanager
    def micro_step(self, model: nn.Module, *, is_last: bool) -> Iterator[None]:
        """Forward + backward of one micro-batch; the gradient all-reduce runs only when
        ``is_last`` (DDP ``no_sync``; DeepSpeed's accumulation boundary)."""
        if self.deepspeed:
            self._engine.set_gradient_accumulation_boundary(is_last)
            yield
        elif self.fsdp:  # gradients and weights stay unsharded until the last micro-step's reduce-scatter
            fsdp2.accumulate(model, is_last=is_last)
            yield
        elif is_last:
            yield
        else:
            with self.accelerator.no_sync(model):
                yield

    def backward(self, loss: Tensor) -> None:
        """Backward of a micro-batch loss, scaled by ``1 / accum_steps`` (DeepSpeed scales itself)."""
        if self.deepspeed:
            self._engine.backward(loss)
        else:
            self.accelerator.backward(loss / self.cfg.accum_steps)

    def clip(self, params: list[nn.Parameter]) -> Tensor | None:
        """Clip the global grad norm to ``optim.clip_grad`` (DeepSpeed clips inside ``step``);
        returns the pre-clip norm as a device tensor, or None when not clipping."""
        if self.cfg.optim.clip_grad is None or self.deepspeed:
            return None
        if self.fsdp:
            return fsdp2.clip_(params, self.cfg.optim.clip_grad)
        return self.accelerator.clip_grad_norm_(params, self.cfg.optim.clip_grad)

    def skips_on_device(self, optimizer: Optimizer) -> bool:
        """Whether ``step(found_inf=...)`` can skip a non-finite step with no host sync: torch's
        fused Adam / AdamW / SGD kernels take the flag (the GradScaler protocol)."""
        inner = getattr(optimizer, "optimizer", optimizer)
        return not self.deepspeed and self.scaler is None and bool(inner.defaults.get("fused"))

    def step(self, optimizer: Optimizer, found_inf: Tensor | None = None) -> None:
        """Optimizer step (unscaled / skipped by the GradScaler under fp16), then zero grads.
        ``found_inf`` (1.0 = skip; a device scalar) goes to a fused optimizer's kernel."""
        if self.deepspeed:
            self._engine.step()
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper forwards step()
        if found_inf is not None:
            inner.found_inf = found_inf.detach().float().reshape(())
        try:
            optimizer.step()
        finally:
            if found_inf is not None:
                del inner.found_inf
        optimizer.zero_grad(set_to_none=True)

    def discard_grads(self, model: nn.Module, optimizer: Optimizer) -> None:
        """Drop accumulated gradients without an update (a skipped non-finite step)."""
        if self.deepspeed and self.cfg.precision == "fp16":
            self._engine.step()  # its loss scaler sees the overflow: skips, clears and backs off
        elif self.deepspeed:
            self._discard_deepspeed_grads()
        else:
            self._discard_grads(model, optimizer)

    def _discard_grads(self, model: nn.Module, optimizer: Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        if self.scaler is not None:  # as on an fp16 overflow: back off, and forget this step's unscale_ (clipping)
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())

    def _discard_deepspeed_grads(self) -> None:
        """Drop the step's gradients from DeepSpeed's own buffers (under ZeRO ``param.grad`` is
        None: the reduced partitions live in the optimizer), as its fp16 overflow branch does;
        without this they poison the next step. Its ``step()`` is not called: no update at all."""
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

        opt = self._engine.optimizer
        opt.zero_grad(set_to_none=True)  # parameter grads; BF16_Optimizer also its fp32 grads
        if hasattr(opt, "_overflow_clean_up"):  # ZeRO-3
            opt._overflow_clean_up(opt.loss_scale)
        elif hasattr(opt, "averaged_gradients"):  # ZeRO-1/2
            opt._release_preflattened_grad_buffers()
            if opt.cpu_offload:
                opt.reset_cpu_buffers()
            else:
                for key in opt.averaged_gradients:
                    opt.averaged_gradients[key] = opt.all_grad_tensors[key] = None
            opt.micro_step_id = INITIAL_MICRO_STEP_ID  # the next backward copies, not accumulates

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for calls that bypass the prepared forward (eval, pictures)."""
        return self.accelerator.autocast()

    def _autocast_forward(self, model: nn.Module) -> None:
        """What Accelerate's ``prepare`` does for the others: the forward runs under autocast,
        which picks each op's dtype as under DDP (FSDP's bf16 policy has cast the weights)."""
        forward = model.forward

        def autocast_forward(*args: Any, **kwargs: Any) -> Any:
            with self.autocast():
                return forward(*args, **kwargs)

        model.forward = autocast_forward

    def outside_forward(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """While calling the task outside its forward (eval, pictures, ``on_eval_end``): FSDP
        gathers the root's parameters (each block gathers its own when called), ZeRO-3 every
        parameter (:meth:`whole_weights`); elsewhere nothing is needed. Collective."""
        return fsdp2.outside_forward(model) if self.fsdp else self.whole_weights(model)

    def local_grads(self, params: Any) -> list[Tensor | None]:
        """Each parameter's gradient as held by this rank (FSDP: its shard)."""
        return [fsdp2.local(p.grad) for p in params]

    # ------------------------------------------------------------------ DeepSpeed state

    def save_engine(self, directory: Path) -> None:
        """DeepSpeed's own sharded save of model + optimizer (every rank calls it)."""
        self._engine.save_checkpoint(str(directory), tag="engine", save_latest=False)

    def load_engine(self, directory: Path) -> None:
        path, _ = self._engine.load_checkpoint(str(directory), tag="engine", load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"no DeepSpeed engine state in {directory}")

    def whole_weights(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Every parameter whole and read-only on every rank, for code that reads weights outside
        the engine's forward (``eval_step``, ``pictures``, ``on_eval_end``); collective under ZeRO-3.

        Gathering once per evaluation, rather than routing each eval batch through the engine's
        forward, costs one all-gather of the model instead of one per layer per batch, needs no
        change to any task, and fits: evaluation keeps no activations for backward, and the
        optimizer states stay partitioned."""
        if not (self.deepspeed and self.cfg.zero_stage == 3):
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.unwrap(model).parameters()), modifier_rank=None)

    def full_state_dict(self, model: nn.Module, *, frozen_only: bool = False) -> dict[str, Tensor]:
        """The whole task's weights on every rank (collective). FSDP gathers its shards; DeepSpeed
        gives fp32 copies on the CPU (or only its frozen parameters): trained parameters from its
        fp32 masters (the module holds bf16 / fp16 copies), frozen ones and buffers from the module,
        upcast (they have no master)."""
        if self.fsdp:
            return fsdp2.full_state_dict(model)
        from deepspeed.utils import safe_get_full_fp32_param  # None for a parameter without a master

        module, state = self.unwrap(model), {}
        with self.whole_weights(model):
            for name, value in module.state_dict(keep_vars=True).items():
                trained = isinstance(value, nn.Parameter) and value.requires_grad
                if frozen_only and (trained or not isinstance(value, nn.Parameter)):
                    continue
                master = safe_get_full_fp32_param(value) if trained else None
                value = (master if master is not None else value).detach()
                state[name] = (value.float() if value.is_floating_point() else value).cpu().clone()
        return state

    def release(self, model: nn.Module) -> nn.Module:
        """End of a fit: the task itself, whole, holding the trained weights in their original
        dtypes on every rank (collective), so that the caller can evaluate, export or fit it
        again as after DDP. Under DeepSpeed the weights come from its fp32 masters, and its
        hooks, partitions and casts are taken off the task."""
        task = self.unwrap(model)
        if not self.deepspeed:
            return task
        state = self.full_state_dict(model)
        engine = self._engine
        engine.destroy()  # ZeRO's module and gradient hooks
        # but not the engine's own forward hooks: through them the task would keep the engine (its
        # optimizer state, its process groups) alive for as long as the caller keeps the task
        for hook in (engine.module_forward_pre_hook, engine.module_forward_post_hook):
            if hook is not None:
                hook.remove()
        fresh: dict[int, nn.Parameter] = {}  # one new Parameter per old one: tied weights stay tied
        for prefix, module in task.named_modules():
            for key in [k for k in vars(module) if k.startswith("ds_") or k in _ZERO_MODULE_ATTRS]:
                delattr(module, key)
            # ZeRO-3 swaps in its own parameter dict and partitions the Parameters: new ones, whole
            module._parameters = dict(module._parameters)
            for key, value in _tensors(module):
                if value is None:
                    continue
                full = state.get(f"{prefix}.{key}" if prefix else key, self._constants.get((id(module), key), value))
                full = full.to(self.device, self._dtypes[id(module), key])
                if isinstance(value, nn.Parameter):
                    full = fresh.setdefault(id(value), nn.Parameter(full, requires_grad=value.requires_grad))
                    module._parameters[key] = full
                else:
                    module._buffers[key] = full
        return task

    # ------------------------------------------------------------------ FSDP state

    def save_sharded(self, ckpt: Path, model: nn.Module, optimizers: list[Optimizer]) -> Future | None:
        """Every rank writes its shards of model + optimizers into ``ckpt/sharded``
        (``torch.distributed.checkpoint``); with ``trainer.checkpoint.async_save``, returns a
        future that completes when they are on disk."""
        return fsdp2.save(ckpt / fsdp2.SHARDED_DIR, model, optimizers, async_group=self._async_group)

    def load_sharded(self, ckpt: Path, model: nn.Module, optimizers: list[Optimizer]) -> None:
        if not (ckpt / fsdp2.SHARDED_DIR).is_dir():
            raise CheckpointError(
                f"{ckpt} holds no sharded model state ({fsdp2.SHARDED_DIR}/): it was not written with "
                f"trainer.backend=fsdp; resume it with its own backend"
            )
        fsdp2.load(ckpt / fsdp2.SHARDED_DIR, model, optimizers)

    @property
    def _engine(self) -> Any:
        return self.accelerator.deepspeed_engine_wrapped.engine

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, tensors: dict[str, Tensor], op: str = "sum") -> dict[str, Tensor]:
        """Sum (or mean) scalar tensors across ranks in one collective."""
        if not tensors:
            return {}
        keys = sorted(tensors)
        flat = torch.stack([tensors[k].detach().float().reshape(()) for k in keys])
        if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            torch_dist.all_reduce(flat)
            if op == "mean":
                flat /= torch_dist.get_world_size()
        return dict(zip(keys, flat.unbind(0)))

    def wait(self) -> None:
        dist.barrier()
