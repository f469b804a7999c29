"""Model cards of the exports: a Hub YAML header that parses, the figures of ``summary.json`` (the
probe's top-1 included, written once the probe is done), a loading example that runs as printed,
and fine-tune exports with their top-1 / top-5."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from finetune.finetune import FinetuneConfig, run_finetune
from launch.card import CARD_FILE
from launch.data import DataConfig
from pretrain.__main__ import main as pretrain_main
from pretrain.export import main as export_main
from pretrain.presets import create_mae

#: a one-block MAE on scikit-learn's 8x8 digits: the pipeline's code path in seconds
TINY = [
    "data.source=digits",
    "data.workers=0",
    "model.img_size=8",
    "model.depth=1",
    "model.decoder_depth=1",
    "trainer.max_steps=3",
    "trainer.batch_size=16",
    "trainer.log.progress=false",
    "trainer.log.tensorboard=false",
    "probe.trainer.max_steps=2",
    "probe.trainer.batch_size=16",
    "probe.trainer.eval_batches=2",
    "probe.trainer.log.progress=false",
    "probe.trainer.log.tensorboard=false",
    "picture=false",
]


def header(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("card") / "run"
    pretrain_main([f"run_dir={run_dir}", f"data.root={run_dir.parent / 'data'}", *TINY])
    return run_dir


def test_pretrain_card_parses_and_names_every_summary_figure(run: Path) -> None:
    card = (run / "export" / "timm" / CARD_FILE).read_text()
    meta = header(card)
    assert meta["library_name"] == "timm" and meta["license"] and meta["datasets"] == ["digits"]
    assert {"timm", "mae", "image-feature-extraction"} <= set(meta["tags"])
    assert ModelCard.load(run / "export" / "timm" / CARD_FILE).data.library_name == "timm"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["probe_top1"] is not None  # the card was rewritten once the probe added it
    assert f"linear-probe top-1 (%): {summary['probe_top1']:.2f}" in card
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(summary["probe_top1"], abs=1e-3)
    assert f"final training loss: {summary['final_loss']:.4f}" in card
    assert f"validation loss: {summary['eval_loss']:.4f}" in card
    assert f"optimizer steps: {summary['steps']}\n" in card and f"images seen: {summary['images_seen']:,}\n" in card
    assert summary["images_seen"] == 3 * 16
    for line in (
        "patch size: 4 px; input size: 1 x 8 x 8",
        "mask ratio 0.75",
        "optimizer: adamw",
        "normalization: mean",
    ):
        assert line in card


def test_loading_example_runs_as_printed(run: Path) -> None:
    card = (run / "export" / "timm" / CARD_FILE).read_text()
    code = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    assert len(code.strip().splitlines()) == 3
    scope: dict = {}
    exec(code.replace("hf-hub:<user>/<repo>", f"local-dir:{run / 'export' / 'timm'}"), scope)  # noqa: S102
    from PIL import Image

    features = scope["model"](scope["transform"](Image.new("L", (8, 8))).unsqueeze(0))
    assert features.shape == (1, 128)


def test_mae_export_writes_the_card_of_the_checkpoint(run: Path, tmp_path: Path) -> None:
    assert export_main([str(run), "--out", str(tmp_path / "same"), "--license", "cc-by-4.0"]) == 0
    card = (tmp_path / "same" / "timm" / CARD_FILE).read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert header(card)["license"] == "cc-by-4.0" and f"final training loss: {summary['final_loss']:.4f}" in card
    # a run without summary.json (interrupted, or an intermediate checkpoint): the step and metrics.jsonl
    shutil.copytree(run, tmp_path / "bare", ignore=shutil.ignore_patterns("summary.json", "export", "probe"))
    assert export_main([str(tmp_path / "bare")]) == 0
    bare = (tmp_path / "bare" / "export" / "timm" / CARD_FILE).read_text()
    assert f"final training loss: {summary['final_loss']:.4f}" in bare and "optimizer steps: 3\n" in bare
    assert "linear-probe" not in bare


def test_finetune_exports_carry_top1_and_top5(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mae = create_mae("mae_vit_mnist_p4", img_size=8, depth=1)
    cfg = FinetuneConfig.model_validate(
        {
            "trainer": {
                "max_steps": 2,
                "batch_size": 16,
                "eval_batches": 2,
                "log": {"progress": False, "tensorboard": False},
            }
        }
    )
    data = DataConfig(source="digits", root=str(tmp_path / "data"), workers=0, hflip=0.0)
    result = run_finetune(cfg, backbone=mae, data=data, run_dir=tmp_path / "run", seed=0)
    card = (tmp_path / "run" / "export" / CARD_FILE).read_text()
    meta = header(card)
    assert meta["pipeline_tag"] == "image-classification"
    assert f"top-1 (%): {result.eval['top1']:.2f}" in card and f"top-5 (%): {result.eval['top5']:.2f}" in card
    assert "classifier head: 10 classes" in card and "layer decay 0.65" in card and "mixup 0.8 / cutmix 1.0" in card
    names = {m["name"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert names == {"top-1", "top-5"}
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert f"top-1 (%): {best['top1']:.2f}" in (tmp_path / "run" / "best" / CARD_FILE).read_text()
