"""``mae-export`` on a real (tiny) pretraining run: run dir -> newest checkpoint -> timm + full
folders with the trained weights; a checkpoint without an encoder -> one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import yaml

from launch.checkpoint import TRAINER_FILE, load_file, save_file
from pretrain.__main__ import main as pretrain_main
from pretrain.export import load_full, load_pretraining_mae, main

TINY = [
    "model.depth=1",
    "trainer.max_steps=2",
    "trainer.batch_size=16",
    "trainer.eval_every_epochs=0",
    "trainer.log.progress=false",
    "trainer.log.tensorboard=false",
    "linear_probe=false",
    "picture=false",
    "export=false",
    "data.workers=0",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    assert pretrain_main([f"run_dir={root / 'run'}", f"data.root={root / 'data'}", *TINY]) == 0
    return root / "run"


def test_export_run_dir_loads_in_timm_with_trained_weights(run_dir: Path, tmp_path: Path) -> None:
    assert main([str(run_dir), "--out", str(tmp_path / "out")]) == 0
    mae, meta = load_pretraining_mae(run_dir)
    assert meta["checkpoint"].name == "step-00000002"
    vit = timm.create_model(f"local-dir:{tmp_path / 'out' / 'timm'}", pretrained=True).eval()
    full, config = load_full(tmp_path / "out" / "full")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), mae.forward_features(x), atol=1e-6)
        assert torch.equal(full.forward_features(x), mae.forward_features(x))
    run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["norm_pix_loss"] is run_cfg["model"]["norm_pix_loss"] and len(vit.pretrained_cfg["mean"]) == 1


def test_checkpoint_without_encoder_is_one_line(run_dir: Path, tmp_path: Path, capsys) -> None:
    ckpt = run_dir / "checkpoints" / "step-00000002"
    state = load_file(ckpt / TRAINER_FILE)
    original = (ckpt / TRAINER_FILE).read_bytes()
    try:
        save_file({k: v for k, v in state.items() if k != "model"}, ckpt / TRAINER_FILE)
        with pytest.raises(SystemExit) as exit_info:
            main([str(ckpt), "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        assert "holds no model weights" in capsys.readouterr().err
        save_file({**state, "model": {"head.weight": torch.zeros(2, 2)}}, ckpt / TRAINER_FILE)
        with pytest.raises(SystemExit):
            main([str(ckpt), "--out", str(tmp_path / "out")])
        assert "holds no MAE encoder" in capsys.readouterr().err
    finally:
        (ckpt / TRAINER_FILE).write_bytes(original)
    assert not (tmp_path / "out").exists()


def test_missing_run_is_one_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no complete checkpoint" in capsys.readouterr().err
