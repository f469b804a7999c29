"""This project's MAE vs Hugging Face ``ViTMAEForPreTraining`` with the identical architecture.

Same widths, depths, heads, MLP ratio, decoder, patch size, mask ratio, ``norm_pix_loss``,
LayerNorm eps and qkv bias; same batch, optimizer, precision and thread count; timed in
one process in alternating turns. ``transformers`` is only needed here (``pip install
mae-pipeline[bench]``).
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.model_step import Contender, Measurement, Settings, count_params, default_settings, make_step, race
from benchmarks.project import Workload, project_contender
from launch.errors import ConfigError
from launch.flops import mae_flops


def hf_config(work: Workload) -> Any:
    """A ``ViTMAEConfig`` equal to the project's architecture for ``work``."""
    try:
        from transformers import ViTMAEConfig
    except ImportError:
        raise ConfigError("the Hugging Face comparison needs transformers: pip install 'mae-pipeline[bench]'") from None
    a = work.arch()
    return ViTMAEConfig(
        image_size=a["img_size"],
        patch_size=a["patch_size"],
        num_channels=a["in_chans"],
        hidden_size=a["embed_dim"],
        num_hidden_layers=a["depth"],
        num_attention_heads=a["num_heads"],
        intermediate_size=int(a["embed_dim"] * a["mlp_ratio"]),
        decoder_hidden_size=a["decoder_embed_dim"],
        decoder_num_hidden_layers=a["decoder_depth"],
        decoder_num_attention_heads=a["decoder_num_heads"],
        decoder_intermediate_size=int(a["decoder_embed_dim"] * a["mlp_ratio"]),
        mask_ratio=work.mask_ratio,
        norm_pix_loss=work.norm_pix_loss,
        qkv_bias=True,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )


def build_hf_model(work: Workload) -> torch.nn.Module:
    """Hugging Face's model with its default attention implementation (SDPA when available)."""
    from transformers import ViTMAEForPreTraining

    torch.manual_seed(work.seed)
    return ViTMAEForPreTraining(hf_config(work))


def hf_contender(work: Workload, settings: Settings, device: torch.device, name: str | None = None) -> Contender:
    model = build_hf_model(work).to(device)
    imgs = torch.randn(
        work.batch_size,
        model.config.num_channels,
        work.img_size,
        work.img_size,
        generator=torch.Generator().manual_seed(work.seed),
    ).to(device)

    def objective(x: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=x).loss

    run = torch.compile(objective) if settings.compile else objective
    return Contender(
        name=name or f"hf {settings.label()}",
        step=make_step(model, lambda: run(imgs), device, settings),
        batch_size=work.batch_size,
        flops_per_image=mae_flops(**work.arch(), mask_ratio=work.mask_ratio).train,
        params=count_params(model),
        info={"impl": "hf", "settings": settings.label(), "attn_implementation": model.config._attn_implementation},
    )


def compare(
    work: Workload,
    device: torch.device,
    *,
    warmup: int,
    steps: int,
    repeats: int,
    extra: tuple[Settings, ...] = (),
    peak: float | None = None,
) -> dict[str, Any]:
    """Both models at: eager fp32 (like for like), each one's defaults, and any ``extra`` settings.

    Returns the measurements and the speedups ``project / hf`` for each pairing.
    """
    eager = Settings()
    ours = default_settings(device)
    pairs = {"eager_fp32": (eager, eager), "defaults": (ours, eager)}
    pairs.update({f"both_{s.label().replace(' ', '_')}": (s, s) for s in extra})
    contenders: dict[str, Contender] = {}
    for mine, theirs in pairs.values():
        contenders.setdefault(f"project {mine.label()}", project_contender(work, mine, device))
        contenders.setdefault(f"hf {theirs.label()}", hf_contender(work, theirs, device))
    measured = {
        m.name: m
        for m in race(list(contenders.values()), warmup=warmup, steps=steps, repeats=repeats, device=device, peak=peak)
    }
    return {
        "preset": work.preset,
        "batch_size": work.batch_size,
        "img_size": work.img_size,
        "arch": work.arch(),
        "mask_ratio": work.mask_ratio,
        "norm_pix_loss": work.norm_pix_loss,
        "project_default_settings": ours.label(),
        "hf_default_settings": eager.label(),
        "rows": [m.as_dict() for m in measured.values()],
        "speedups": {key: _speedup(measured, mine, theirs) for key, (mine, theirs) in pairs.items()},
    }


def _speedup(measured: dict[str, Measurement], mine: Settings, theirs: Settings) -> dict[str, Any]:
    ours, hf = measured[f"project {mine.label()}"], measured[f"hf {theirs.label()}"]
    return {
        "project": ours.name,
        "hf": hf.name,
        "speedup": ours.images_per_s / hf.images_per_s,
        "speedup_cpu_time": ours.images_per_cpu_s / hf.images_per_cpu_s,
    }
