"""Downstream at any resolution: a folder of photos of different sizes through the whole
pretrain -> export -> probe pipeline, a 28-px backbone fine-tuned at 56 px (position embeddings
resampled, the export rebuilt by plain timm at 56 px), and sizes that cannot work refused in one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.layers import resample_abs_pos_embed

from finetune.backbone import build_vit, resolve_backbone, set_input_size
from finetune.finetune import FinetuneConfig, run_finetune
from finetune.finetune import main as finetune_main
from launch.data import DataConfig
from launch.data.prepare import prepare
from launch.export import export_timm
from pretrain.__main__ import main as pretrain_main
from pretrain.presets import create_mae

QUIET = {"log": {"progress": False, "tensorboard": False}}
#: a 32-px MAE with one block: the pipeline's code path at a size the CPU runs in seconds
TINY_MAE = [
    "model.preset=mae_vit_tiny",
    "model.img_size=32",
    "model.patch_size=8",
    "model.depth=1",
    "model.decoder_depth=1",
    "model.decoder_embed_dim=32",
    "model.decoder_num_heads=1",
]
SHORT = [
    "trainer.max_steps=2",
    "trainer.batch_size=4",
    "trainer.log.progress=false",
    "trainer.log.tensorboard=false",
    "probe.trainer.max_steps=2",
    "probe.trainer.batch_size=4",
    "probe.trainer.log.progress=false",
    "probe.trainer.log.tensorboard=false",
    "data.workers=0",
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of an ImageFolder of real photo crops, every one of its own size (38-71 px a side)."""
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    sources = [skimage.data.astronaut(), skimage.data.coffee()]
    for split, count in (("train", 9), ("val", 4)):
        for i in range(count):
            photo = sources[i % 2]
            h, w = (int(v) for v in rng.integers(38, 72, size=2))
            y, x = (int(rng.integers(0, photo.shape[d] - s)) for d, s in ((0, h), (1, w)))
            folder = root / "folder" / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo[y : y + h, x : x + w]).save(folder / f"{i}.jpg", quality=90)
    return prepare(str(root / "folder"), root / "shards").parent


def test_pipeline_probes_photos_of_different_sizes(photos: Path, tmp_path: Path, capsys) -> None:
    """Issue 13 row 3: the probe compared the manifest's median size with the backbone's and stopped."""
    manifest = json.loads((photos / "dataset.json").read_text())
    assert manifest["img_size_min"] != manifest["img_size_max"] and manifest["img_size"] != [32, 32]
    pretrain_main([f"run_dir={tmp_path / 'run'}", f"data.source={photos}", *TINY_MAE, *SHORT])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["probe_top1"] is not None and summary["steps"] == 2
    assert "probe top-1" in capsys.readouterr().out


def test_probe_size_that_is_no_patch_multiple_stops_before_pretraining(photos: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        pretrain_main([f"run_dir={tmp_path / 'run'}", f"data.source={photos}", "probe.img_size=36", *TINY_MAE, *SHORT])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        (
            "mae-pretrain: error: probe.img_size=36 is not a multiple of the patch size 8: "
            "set probe.img_size=32 or 40, or leave it unset for the backbone's own size"
        )
    ]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def mae() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_mae("mae_vit_mnist_p4", depth=1).eval()  # 28 px, 7x7 patches of 4 px


def test_resampled_position_embeddings_keep_the_class_token(mae, caplog) -> None:
    source = resolve_backbone(mae)
    with caplog.at_level(logging.INFO):
        vit = set_input_size(build_vit(source, num_classes=0), 56)
    assert [r.getMessage() for r in caplog.records if "position embedding" in r.getMessage().lower()] == [
        "position embeddings resampled (bicubic) from a 7x7 to a 14x14 patch grid for 56 px images"
    ]  # logged once
    native = source.state["pos_embed"]  # (1, 1 + 7 * 7, D)
    assert vit.pos_embed.shape == (1, 1 + 14 * 14, native.shape[-1])
    assert torch.equal(vit.pos_embed[:, :1], native[:, :1])
    want = resample_abs_pos_embed(
        native, new_size=[14, 14], old_size=[7, 7], num_prefix_tokens=1, interpolation="bicubic"
    )
    assert torch.equal(vit.pos_embed.detach(), want)
    with torch.no_grad():
        assert vit.forward_features(torch.randn(2, 1, 56, 56)).shape == (2, 1 + 14 * 14, native.shape[-1])


def test_backbone_features_at_its_own_size_are_unchanged(mae, tmp_path: Path) -> None:
    """Resampling for 56 px happens on the built copy: the same export still gives the encoder's
    exact 28-px features, and at its own size no resampling happens at all."""
    export_timm(mae, tmp_path / "timm", mean=(0.13,), std=(0.31,))
    source = resolve_backbone(tmp_path / "timm")
    set_input_size(build_vit(source, num_classes=0), 56)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = mae.forward_features(x)
        assert torch.equal(set_input_size(build_vit(source, num_classes=0), 28).eval().forward_features(x), want)
        assert torch.equal(
            build_vit(resolve_backbone(tmp_path / "timm"), num_classes=0).eval().forward_features(x), want
        )


def test_28px_backbone_finetunes_at_56px_and_timm_rebuilds_it_there(mae, tmp_path: Path) -> None:
    cfg = FinetuneConfig.model_validate({"img_size": 56, "trainer": {"max_steps": 2, "batch_size": 8, **QUIET}})
    data = DataConfig(source="digits", root=str(tmp_path / "data"), workers=0, hflip=0.0)
    result = run_finetune(cfg, backbone=mae, data=data, run_dir=tmp_path / "run", seed=0)
    assert result.steps == 2 and int(result.task.model.patch_embed.img_size[0]) == 56
    export = tmp_path / "run" / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [1, 56, 56] and config["model_args"]["img_size"] == [56, 56]
    rebuilt = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    x = torch.randn(3, 1, 56, 56)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), result.task.model.eval()(x), atol=1e-5)
    assert int(resolve_backbone(export).model_args["img_size"][0]) == 56  # a later probe uses it at 56 px too


def test_finetune_size_that_is_no_patch_multiple_is_one_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        finetune_main(
            [
                "backbone=vit_tiny_patch16_224",
                f"run_dir={tmp_path / 'run'}",
                "data.source=digits",
                f"data.root={tmp_path / 'data'}",
                "finetune.img_size=100",
                "finetune.model_args.in_chans=1",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        (
            "mae-finetune: error: finetune.img_size=100 is not a multiple of the patch size 16: "
            "set finetune.img_size=96 or 112, or leave it unset for the backbone's own size"
        )
    ]
    assert not (tmp_path / "run").exists()
