"""Model cards: the ``README.md`` that makes a timm export folder publishable on the Hugging Face Hub.

The header is the Hub's YAML metadata (``library_name: timm``, tags, license, datasets, and a
``model-index`` with the measured accuracies), written by ``huggingface_hub.ModelCardData`` so
it always parses; the body says what the model is (read back from the folder's ``config.json``
and weights, so it describes exactly what timm will build), how it was trained (recipe lines of
the resolved config, steps, images seen), what it measured, and how to load it in three lines.
A stage calls :func:`write_card` after each export and again when a later stage (the probe)
adds a figure::

    write_card(run_dir / "export" / "timm", CardFacts("MAE ViT encoder", "...", "mnist", recipe, summary))
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
from huggingface_hub import EvalResult, ModelCardData

from launch.config import TrainerConfig
from launch.fileio import write_atomic
from launch.optim import peak_lr

CARD_FILE = "README.md"
#: summary key -> (label, format, section); values missing or None are left out of the card
FIGURES: dict[str, tuple[str, str, str]] = {
    "steps": ("optimizer steps", "{:d}", "Training"),
    "images_seen": ("images seen", "{:,d}", "Training"),
    "images_per_s": ("training images/s", "{:.1f}", "Training"),
    "mfu": ("model FLOPs utilization", "{:.1%}", "Training"),
    "final_loss": ("final training loss", "{:.4f}", "Results"),
    "eval_loss": ("validation loss", "{:.4f}", "Results"),
    "probe_top1": ("linear-probe top-1 (%)", "{:.2f}", "Results"),
    "top1": ("top-1 (%)", "{:.2f}", "Results"),
    "top5": ("top-5 (%)", "{:.2f}", "Results"),
}
#: figures that are accuracies, listed in the header's ``model-index`` too
_ACCURACIES = {"probe_top1": "linear-probe top-1", "top1": "top-1", "top5": "top-5"}


@dataclass
class CardFacts:
    """What the stage that made the weights knows about them (the folder tells the architecture)."""

    title: str  # e.g. "MAE ViT encoder (mae_vit_tiny)"
    description: str  # one paragraph: what the weights are for
    dataset: str  # training data name (a Hub dataset id if it is one)
    recipe: list[str] = field(default_factory=list)  # "optimizer: ..." lines
    figures: dict[str, Any] = field(default_factory=dict)  # FIGURES keys -> numbers (e.g. summary.json)
    license: str = "unknown"  # a Hub license id; the data's terms decide it


def trainer_recipe(cfg: TrainerConfig, world_size: int) -> list[str]:
    """Recipe lines of a resolved ``trainer`` section: optimizer, schedule, batch, length, precision."""
    o, batch = cfg.optim, cfg.batch_size * cfg.accum_steps * world_size
    moments = f"betas {tuple(o.betas)}" if o.name in ("adamw", "lamb") else f"momentum {o.momentum}"
    lr = f"lr {o.lr:g}" if o.lr is not None else f"lr {peak_lr(o, batch):.3g} (base lr {o.base_lr:g} x {batch}/256)"
    decay = f", layer decay {o.layer_decay}" if o.layer_decay else ""
    clip = f", gradient clipping {o.clip_grad}" if o.clip_grad else ""
    warmup = f"{o.warmup_steps} steps" if o.warmup_steps is not None else f"{o.warmup_epochs:g} epochs"
    length = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.epochs} epochs"
    return [
        f"optimizer: {o.name}, {lr}, weight decay {o.weight_decay:g}, {moments}{decay}{clip}",
        f"schedule: linear warmup {warmup}, then {o.schedule} (min lr {o.min_lr:g})",
        f"batch: {cfg.batch_size} per process x {cfg.accum_steps} accumulation x {world_size} processes"
        f" = {batch} images per step",
        f"length: {length}; precision {cfg.precision}; backend {cfg.backend}"
        + (f" ZeRO-{cfg.zero_stage}" if cfg.backend == "deepspeed" else ""),
    ]


def write_card(export_dir: str | Path, facts: CardFacts) -> Path:
    """(Re)write ``export_dir/README.md`` for the export in it; returns the card's path."""
    export_dir = Path(export_dir)
    card = render_card(export_dir, facts)
    path = export_dir / CARD_FILE
    write_atomic(path, card)  # a reader never sees half a card
    return path


def render_card(export_dir: Path, facts: CardFacts) -> str:
    config = json.loads((export_dir / "config.json").read_text())  # written by timm's save_for_hf
    dataset = dataset_id(facts.dataset)
    classifier = int(config.get("num_classes", 0)) > 0
    task = "image-classification" if classifier else "image-feature-extraction"
    results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type="accuracy",
            metric_name=name,
            metric_value=round(float(facts.figures[key]), 4),
        )
        for key, name in _ACCURACIES.items()
        if _known(facts.figures.get(key))
    ]
    header = ModelCardData(
        library_name="timm",
        license=facts.license,
        pipeline_tag=task,
        datasets=[dataset],
        tags=["timm", task, "vision-transformer", "mae", "masked-autoencoder"],
        model_name=facts.title,
        eval_results=results or None,
    )
    sections = [
        f"---\n{header.to_yaml()}\n---\n\n# {facts.title}\n\n{facts.description}\n",
        _section("Model", _model_lines(export_dir, config)),
        _section("Training", [f"data: {facts.dataset}", *facts.recipe, *_figure_lines(facts.figures, "Training")]),
        _section("Results", _figure_lines(facts.figures, "Results") or ["no evaluation recorded"]),
        _usage(classifier),
        f"## License\n\n`{facts.license}`: set it to what the training data's terms allow before publishing.\n",
    ]
    return "\n".join(sections)


def _model_lines(export_dir: Path, config: dict[str, Any]) -> list[str]:
    args, pcfg = config.get("model_args", {}), config.get("pretrained_cfg", {})
    with safetensors.safe_open(str(export_dir / "model.safetensors"), "pt") as weights:
        # safe_open is no dict: .keys() is its only listing
        params = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    size = pcfg.get("input_size", [args.get("in_chans", 3), *([args.get("img_size", 224)] * 2)])
    head = (
        f"{config['num_classes']} classes ({config.get('global_pool', 'token')} pooling)"
        if config.get("num_classes")
        else "none (features)"
    )
    return [
        f"architecture: timm `VisionTransformer` (`{config['architecture']}` with model_args {args})",
        f"parameters: {params / 1e6:.2f} M",
        f"patch size: {args.get('patch_size', 16)} px; input size: {size[0]} x {size[1]} x {size[2]} (C x H x W)",
        f"normalization: mean {pcfg.get('mean')}, std {pcfg.get('std')} (pixels in [0, 1])",
        f"classifier head: {head}",
    ]


def _figure_lines(figures: dict[str, Any], section: str) -> list[str]:
    return [
        f"{label}: {fmt.format(figures[key])}"
        for key, (label, fmt, where) in FIGURES.items()
        if where == section and _known(figures.get(key))
    ]


def _usage(classifier: bool) -> str:
    call = (
        "logits = model(transform(image).unsqueeze(0))  # (1, classes)"
        if classifier
        else "features = model(transform(image).unsqueeze(0))  # (1, embed_dim), pooled"
    )
    return (
        "## Usage\n\n```python\nimport timm\n"
        'model = timm.create_model("hf-hub:<user>/<repo>", pretrained=True).eval()  # or "local-dir:<this folder>"\n'
        "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n```\n\n"
        f"then, for a PIL `image`: `{call}`.\n"
    )


def _section(title: str, lines: list[str]) -> str:
    return f"## {title}\n\n" + "".join(f"- {line}\n" for line in lines)


def _known(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def dataset_id(name: str) -> str:
    """A dataset name or folder as the Hub spells ids: its last path part, lower case, no spaces."""
    return re.sub(r"[^a-z0-9._-]+", "-", Path(name).name.lower()).strip("-") or "unknown"
