"""Typed, validated configuration: defaults <- YAML file <- ``key=value`` overrides.

Every stage declares its config as a pydantic model built from :class:`Schema`
(unknown keys are rejected). :func:`load_config` merges the three layers and turns
any validation failure into one :class:`ConfigError` line that names the key and,
for a typo, the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from launch.errors import ConfigError
from launch.fileio import write_atomic

S = TypeVar("S", bound="Schema")


class Schema(BaseModel):
    """Base of every config section: unknown keys fail, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class OptimConfig(Schema):
    name: Literal["adamw", "sgd", "momentum", "lars", "lamb"] = Field(
        "adamw", description="optimizer (timm's create_optimizer_v2 name; sgd is Nesterov, momentum is not)"
    )
    base_lr: float = Field(1.5e-4, gt=0, description="lr per 256 images; lr = base_lr * effective_batch / 256")
    lr: float | None = Field(None, gt=0, description="absolute lr; overrides base_lr when set")
    min_lr: float = Field(0.0, ge=0, description="floor of the cosine schedule")
    weight_decay: float = Field(0.05, ge=0, description="not applied to norms, biases, tokens, position embeddings")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (MAE paper: 0.9, 0.95)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD / LARS momentum")
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise lr decay (fine-tuning), None = off")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warmup length in epochs (per-step)")
    warmup_steps: int | None = Field(
        None, ge=0, description="linear warmup in optimizer steps; overrides warmup_epochs"
    )
    schedule: Literal["cosine", "constant"] = Field("cosine", description="lr after warmup")
    clip_grad: float | None = Field(None, gt=0, description="max global grad norm, None = no clipping")
    fused: bool | None = Field(None, description="fused AdamW kernel; None = on for CUDA")


class CheckpointConfig(Schema):
    every_steps: int | None = Field(None, ge=1, description="save every N optimizer steps")
    every_minutes: float | None = Field(None, gt=0, description="save every N minutes of wall time")
    keep: int = Field(2, ge=1, description="complete checkpoints kept; older ones deleted after a new one is complete")
    resume: str = Field("auto", description="'auto' (newest complete in run_dir), 'none', or a checkpoint path")
    weights_only: str | None = Field(None, description="load model weights from this checkpoint/export, nothing else")
    async_save: bool = Field(
        False,
        description="backend=fsdp: write the shards in the background while training goes on; "
        "the checkpoint is marked complete once they are on disk",
    )


class LogConfig(Schema):
    every_steps: int = Field(
        10, ge=1, description="metrics to console/JSONL/TensorBoard every N steps (host sync only here)"
    )
    images_every_epochs: int = Field(1, ge=0, description="image grids to TensorBoard every N epochs, 0 = never")
    tensorboard: bool = Field(True, description="write TensorBoard event files")
    wandb: bool = Field(False, description="log to Weights & Biases (needs `pip install wandb`)")
    wandb_mode: Literal["online", "offline"] = Field("offline", description="W&B mode")
    progress: bool = Field(True, description="console progress bar")


class TrainerConfig(Schema):
    epochs: int = Field(10, ge=1, description="passes over the data (or fixed-length epochs in resampled mode)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: int = Field(64, ge=1, description="micro-batch per process")
    accum_steps: int = Field(1, ge=1, description="gradient accumulation micro-steps per optimizer step")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="autocast dtype; fp16 uses loss scaling; auto = bf16 where the device computes it "
        "natively (CUDA with bf16, CPUs with AVX512-BF16 / AMX), else fp32",
    )
    compile: bool = Field(False, description="torch.compile the task")
    backend: Literal["ddp", "deepspeed", "fsdp"] = Field(
        "ddp",
        description="Accelerate DDP (also single process), DeepSpeed, "
        "or FSDP2 (fully_shard per block, sharded checkpoints)",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (backend=deepspeed)")
    deepspeed_config: str | None = Field(None, description="DeepSpeed JSON; must agree with this config")
    activation_checkpointing: bool = Field(False, description="recompute block activations in backward")
    eval_every_epochs: int = Field(1, ge=0, description="run validation every N epochs, 0 = only at the end")
    eval_batches: int | None = Field(
        None, ge=1, description="validate on at most N batches per rank (None = the whole split)"
    )
    max_bad_steps: int = Field(20, ge=1, description="stop after this many consecutive non-finite steps")
    peak_tflops: float | None = Field(
        None, gt=0, description="peak TFLOP/s per device for MFU; None = GPU table (CPU: no MFU)"
    )
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()


# ----------------------------------------------------------------------------- loading


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}``; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not key=value (e.g. trainer.epochs=5)")
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' sets a key below the value of '{part}'")
        node[leaf] = _yaml_value(raw) if raw.strip() else None
    return tree


def _yaml_value(raw: str) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; a user typing it means a number."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            return value
    return value


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: dicts merge key by key, anything else in ``top`` replaces ``base``."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"embed_dim": 192}}`` -> ``{"model.embed_dim": 192}`` (JSON-safe leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def over_defaults(defaults: Callable[[], Schema | dict[str, Any]]) -> BeforeValidator:
    """Validator of a section with stage defaults of its own (``Annotated[TrainerConfig,
    over_defaults(_probe_trainer)]``): a partial section given as a dict starts from
    ``defaults()``, so ``probe.trainer.epochs=5`` changes the epochs, not the probe's optimizer
    back to the bare schema's. Anything else (``None``, a built section) passes unchanged."""

    def fill(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        base = defaults()
        return merge(base.model_dump() if isinstance(base, BaseModel) else base, value)

    return BeforeValidator(fill)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(
    schema: type[S],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    defaults: dict[str, Any] | None = None,
) -> S:
    """``defaults`` (a stage's layer over the schema's own, e.g. a recipe) <- YAML at ``path``
    <- dotted ``overrides``; validated, any failure one :class:`ConfigError` line."""
    data = merge(defaults or {}, read_yaml(path) if path else {})
    data = merge(data, parse_overrides(overrides or []))
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_error(schema, err)) from None


def describe_error(schema: type[BaseModel], err: ValidationError) -> str:
    """One line for the first validation error: the dotted key, what is wrong, a suggestion.

    Inside a discriminated union (``model.family`` selects the schema) the key is written
    without pydantic's tag (``model.latent_dim``, not ``model.vae.latent_dim``) and the
    selected member's keys and bounds are the ones offered.
    """
    first = err.errors()[0]
    where = _locate(schema, [str(p) for p in first["loc"]])
    key = ".".join(where.loc)
    if first["type"] == "extra_forbidden":
        valid = list(where.parent.model_fields) if where.parent else []
        close = difflib.get_close_matches(where.loc[-1], valid, n=1, cutoff=0.5)
        suggestion = ".".join(where.loc[:-1] + close)
        hint = f" (did you mean '{suggestion}'?)" if close else f" (valid keys: {', '.join(valid)})"
        return f"unknown config key '{key}'{where.selected}{hint}"
    if first["type"] == "union_tag_invalid" and where.tags:
        tag = first["ctx"]["discriminator"].strip("'")
        return f"config key '{key}.{tag}': unknown {tag} {first['input'].get(tag)!r}; allowed: {', '.join(where.tags)}"
    if first["type"] == "missing" and where.loc and where.loc[-1].isdigit():  # a short tuple, e.g. betas=[0.9]
        parent = ".".join(where.loc[:-1])
        return f"config key '{parent}': needs more values (value {int(where.loc[-1]) + 1} is missing)"
    if first["type"] == "value_error":  # our validators' own messages name the values they refuse
        message = first["msg"].removeprefix("Value error, ")
        got = "" if isinstance(first.get("input"), dict) else f" (got {first.get('input')!r})"
        return f"config key '{key}': {message}{got}" if key else message
    bounds = _bounds(where.parent, where.loc[-1]) if where.parent and where.loc else ""
    return f"config key '{key}': {first['msg']} (got {first.get('input')!r}{bounds})"


@dataclasses.dataclass
class _Location:
    loc: list[str]  # the dotted key as the user writes it (union tags dropped)
    parent: type[BaseModel] | None  # the schema holding the last key, if known
    selected: str = ""  # " for model.family=vae" when the key lies inside a discriminated union
    tags: list[str] = dataclasses.field(default_factory=list)  # a union's allowed tags, for a bad tag


def _locate(schema: type[BaseModel], loc: list[str]) -> _Location:
    """Walk ``loc`` down the schema's fields, through ``X | None`` and discriminated unions."""
    model: type[BaseModel] | None = schema
    out = _Location([], schema)
    parts = iter(loc)
    for part in parts:
        out.loc.append(part)
        out.parent = model
        field = model.model_fields.get(part) if model else None
        members = _models_in(field.annotation) if field else []
        if field is not None and field.discriminator and members:
            tags = {_tag(m, field.discriminator): m for m in members}
            out.tags = list(tags)
            tag = next(parts, None)
            model = tags.get(tag)
            if model is not None:
                out.selected = f" for {'.'.join(out.loc)}.{field.discriminator}={tag}"
            continue
        model = members[0] if len(members) == 1 else None
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The schemas a field holds: ``X`` / ``X | None`` -> [X]; a union of schemas -> all of them."""
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if is_union else (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _tag(member: type[BaseModel], discriminator: str) -> str:
    return str(member.model_fields[discriminator].default)


def _bounds(schema: type[BaseModel], field: str) -> str:
    """``"; allowed: 1 <= latent_dim <= 1024"`` from a numeric field's constraints ('' if none)."""
    info = schema.model_fields.get(field)
    metadata = info.metadata if info else []
    bound = {k: getattr(m, k) for m in metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}
    low = f"{bound['ge']} <= " if "ge" in bound else f"{bound['gt']} < " if "gt" in bound else ""
    high = f" <= {bound['le']}" if "le" in bound else f" < {bound['lt']}" if "lt" in bound else ""
    return f"; allowed: {low}{field}{high}" if low or high else ""


def describe_fields(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Lines ``key (type, default): description`` for every leaf setting, for ``--help``."""
    lines = []
    for name, field in schema.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines += describe_fields(ann, f"{prefix}{name}.")
            continue
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        lines.append(f"  {prefix}{name} ({type_name}, {default}): {field.description or ''}")
    return lines


def save_config(cfg: Schema | dict[str, Any], path: str | Path) -> None:
    """Write the resolved config (a schema or its tree) as YAML, atomically, so the run can be reproduced."""
    tree = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    write_atomic(path, yaml.safe_dump(tree, sort_keys=False))
