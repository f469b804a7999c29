"""Reconstruction pictures and the ``mae-visualize`` command on real MNIST shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.checkpoint import TRAINER_FILE, CheckpointManager, save_file
from launch.config import save_config
from launch.data import DataConfig
from launch.data.prepare import prepare
from pretrain.config import PretrainConfig
from pretrain.export import export_full
from pretrain.objective import normalize_patches
from pretrain.pictures import PANELS, reconstruction_grid, reconstruction_panels
from pretrain.presets import MAEConfig, create_mae
from pretrain.task import MAETask
from pretrain.visualize import main

SMALL = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
MEAN, STD = (0.1307,), (0.3081,)
SCALE = 4  # 28-px images are drawn at 112 px per cell (MIN_CELL_PX), nearest-neighbour
CELL = 28 * SCALE
TILE = CELL + 2  # make_grid: 2-px gaps


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_mae("mae_vit_mnist_p7", **SMALL).eval()


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vis") / "mnist"
    prepare("mnist", out)
    return out


def test_pasted_visible_patches_equal_the_input_exactly(model) -> None:
    imgs, noise = torch.randn(3, 1, 28, 28), torch.rand(3, 16)
    panels = reconstruction_panels(model, imgs, 0.75, True, mean=MEAN, std=STD, noise=noise)
    removed = model.unpatchify(model.forward_encoder(imgs, 0.75, noise)[1][..., None].expand(-1, -1, 49)) > 0
    shown = (imgs * STD[0] + MEAN[0]).clamp(0, 1)
    assert torch.equal(panels["original"], shown)
    assert torch.equal(panels["pasted"][~removed], shown[~removed])
    assert torch.equal(panels["pasted"][removed], panels["reconstruction"][removed])
    assert torch.all(panels["masked"][removed] == 0.5) and torch.equal(panels["masked"][~removed], shown[~removed])
    assert removed.flatten(1).sum(1).tolist() == [12 * 49] * 3  # 12 of 16 patches removed


def test_normalized_prediction_is_mapped_back_with_each_patch_mean_and_std(model, monkeypatch) -> None:
    imgs = torch.rand(2, 1, 28, 28) * 2
    perfect = normalize_patches(model.patchify(imgs))[0]  # what a perfect norm_pix_loss model predicts
    monkeypatch.setattr(model, "forward_decoder", lambda latent, ids: perfect)
    panels = reconstruction_panels(model, imgs, 0.75, True)
    torch.testing.assert_close(panels["reconstruction"], panels["original"], rtol=0, atol=1e-5)


def test_grid_layout_and_unknown_normalization(model) -> None:
    grid = reconstruction_grid(model, torch.randn(5, 1, 28, 28) * 3, 0.75, False)
    assert grid.shape == (3, 5 * TILE + 2, len(PANELS) * TILE + 2)
    assert grid.min() >= 0 and grid.max() <= 1
    assert torch.all(grid[:, :2] == 1.0)  # white gaps


def test_small_images_are_drawn_with_whole_nearest_neighbour_pixels(model) -> None:
    imgs = torch.randn(2, 1, 28, 28)
    grid = reconstruction_grid(model, imgs, 0.75, False, mean=MEAN, std=STD)
    original = grid[0, 2 : 2 + CELL, 2 : 2 + CELL]  # first row, first column
    shown = (imgs[0, 0] * STD[0] + MEAN[0]).clamp(0, 1)
    assert torch.equal(original, shown.repeat_interleave(SCALE, 0).repeat_interleave(SCALE, 1))
    big = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        mae224 = create_mae("mae_vit_tiny", depth=1, decoder_depth=1, decoder_embed_dim=16, decoder_num_heads=1)
        assert reconstruction_grid(mae224.eval(), big, 0.75, True).shape == (3, 224 + 4, 4 * 226 + 2)  # no upscale


def _png_tile(png: np.ndarray, row: int, col: int) -> np.ndarray:
    top, left = 2 + row * TILE, 2 + col * TILE
    return png[top : top + CELL, left : left + CELL]


def test_cli_draws_a_checkpoint_on_real_digits(model, mnist, tmp_path) -> None:
    ckpt = tmp_path / "mae.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    data = tmp_path / "data.yaml"
    data.write_text(f"source: {mnist}\n")
    out = tmp_path / "pics" / "grid.png"
    assert main([str(ckpt), "--data", str(data), "--num-images", "4", "--seed", "3", "--out", str(out)]) == 0
    png = np.asarray(Image.open(out).convert("L"))
    assert png.shape == (4 * TILE + 2, 4 * TILE + 2)
    keep_noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(3))
    visible = torch.argsort(keep_noise, dim=1)[:, :4]  # int(16 * 0.25) lowest-noise patches
    for row in range(4):
        original, masked, pasted = (_png_tile(png, row, c) for c in (0, 1, 3))
        assert original.max() > 200  # a real digit, not a blank tile
        for patch in visible[row].tolist():
            r, c = divmod(patch, 4)
            block = np.s_[7 * SCALE * r : 7 * SCALE * (r + 1), 7 * SCALE * c : 7 * SCALE * (c + 1)]
            assert np.array_equal(pasted[block], original[block]) and np.array_equal(masked[block], original[block])
        assert (masked == 128).sum() >= 12 * 49 * SCALE**2  # removed patches drawn gray


def test_cli_reads_an_export_inside_a_run_dir(model, mnist, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    cfg = PretrainConfig(
        run_dir=str(run), data=DataConfig(source=str(mnist)), model=MAEConfig(preset="mae_vit_mnist_p7", **SMALL)
    )
    save_config(cfg, run / "config.yaml")
    export_full(model, run / "export" / "full", mean=MEAN, std=STD, extra={"mask_ratio": 0.5, "norm_pix_loss": False})
    out = tmp_path / "grid.png"
    assert main([str(run), "--split", "train", "--num-images", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (4 * TILE + 2, 2 * TILE + 2)
    assert "mask ratio 0.5, norm_pix_loss False" in capsys.readouterr().out


def test_cli_reads_the_folder_mae_export_writes(model, mnist, tmp_path) -> None:
    """``mae-export RUN --out DIR`` writes DIR/timm and DIR/full; ``mae-visualize DIR`` draws DIR/full."""
    export_full(model, tmp_path / "export" / "full", mean=MEAN, std=STD)
    (tmp_path / "data.yaml").write_text(f"source: {mnist}\n")
    out = tmp_path / "grid.png"
    assert (
        main([str(tmp_path / "export"), "--data", str(tmp_path / "data.yaml"), "--num-images", "2", "--out", str(out)])
        == 0
    )
    assert Image.open(out).size == (4 * TILE + 2, 2 * TILE + 2)


def test_cli_reads_the_latest_checkpoint_of_a_run_without_export(model, mnist, tmp_path) -> None:
    run = tmp_path / "run"
    cfg = PretrainConfig(
        run_dir=str(run), data=DataConfig(source=str(mnist)), model=MAEConfig(preset="mae_vit_mnist_p7", **SMALL)
    )
    save_config(cfg, run / "config.yaml")
    state = MAETask(model).state_dict()  # the trainer saves the task: keys "model.*"
    CheckpointManager(run / "checkpoints", keep=1, rank=0).save(
        5, lambda tmp: save_file({"model": state}, tmp / TRAINER_FILE)
    )
    out = tmp_path / "grid.png"
    assert main([str(run), "--num-images", "3", "--out", str(out)]) == 0
    assert Image.open(out).size == (4 * TILE + 2, 3 * TILE + 2)
    # the same weights given as a plain state_dict draw the very same picture
    torch.save(model.state_dict(), tmp_path / "mae.pth")
    (tmp_path / "data.yaml").write_text(f"source: {mnist}\n")
    argv = [
        str(tmp_path / "mae.pth"),
        "--data",
        str(tmp_path / "data.yaml"),
        "--num-images",
        "3",
        "--arch",
        "num_heads=2",
        "--arch",
        "decoder_num_heads=2",
        "--out",
        str(tmp_path / "ref.png"),
    ]
    assert main(argv) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "ref.png")))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{ckpt}", "--mask-ratio", "1.0"], "mask_ratio 1.0 is outside the allowed range [0, 1)"),
        (["{ckpt}"], "no data to draw from: pass --data FILE"),
        (["{ckpt}", "--data", "{data}", "--split", "test"], "split 'test' is not in the data (available: train, val)"),
        (
            ["{ckpt}", "--data", "{data}", "shufle_buffer=3"],
            "unknown config key 'shufle_buffer' (did you mean 'shuffle_buffer'?)",
        ),
        (["{tmp}/nothing.pth", "--data", "{data}"], "checkpoint file not found"),
        (["{tmp}", "--data", "{data}"], "is neither a checkpoint file, an export folder"),
        (["{ckpt}", "--data", "{data}", "--num-images", "0"], "--num-images 0 must be at least 1"),
    ],
)
def test_cli_bad_input_is_one_line_and_keeps_the_old_picture(model, mnist, tmp_path, capsys, args, message) -> None:
    ckpt, data, out = tmp_path / "mae.pth", tmp_path / "data.yaml", tmp_path / "old.png"
    torch.save(model.state_dict(), ckpt)
    data.write_text(f"source: {mnist}\n")
    out.write_bytes(b"previous picture")
    argv = [a.format(ckpt=ckpt, data=data, tmp=tmp_path) for a in args] + ["--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mae-visualize: error: ") and message in err[0]
    assert out.read_bytes() == b"previous picture"
