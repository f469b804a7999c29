"""``mae-baseline`` bad input: one line on stderr naming the allowed values, exit code 2,
nothing written; plus the recipe layering (defaults <- recipe <- file <- overrides)."""

from __future__ import annotations

from pathlib import Path

import pytest

from baselines.__main__ import main
from baselines.config import load_baseline_config, recipe_names


def fails(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mae-baseline: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["autoencoder"], "unknown baseline 'autoencoder'; allowed: aae, aae_mog, ae, ae2d,"),
        (["ae", "model.latent_dim=0"], "allowed: 1 <= latent_dim <= 1024"),
        (["vae", "model.latent_dim=5000"], "allowed: 1 <= latent_dim <= 1024"),
        (["ae", "latent_sweep=[5, 10, 2000]"], "latent_sweep size 2000"),
        (["dae", "model.noise_level=1.5"], "noise_level 1.5 out of range for noise=gaussian; allowed: (0, 1]"),
        (["dae", "model.noise=mask", "model.noise_level=1.0"], "allowed: (0, 1)"),
        (["sdae", "model.noise_level=0"], "allowed: (0, 1)"),
        (["dae", "model.noise=salt"], "'gaussian' or 'mask'"),
        (
            ["ae", "model.beta=4"],
            "unknown config key 'model.beta' for model.family=ae (valid keys: family, latent_dim,",
        ),
        (["ae", "model.output=relu", "model.loss=bce"], "loss=bce needs output=sigmoid"),
        (["ae", "model.family=gan"], "unknown family 'gan'; allowed: ae, dae, sdae, cae, vae, aae"),
        (["aae", "model.prior=mog", "model.latent_dim=1"], "prior=mog needs latent_dim >= 2"),
        (["cae", "latent_sweep=[5]"], "latent_sweep needs a family with latent_dim (ae, vae, aae)"),
        (["ae", "trainer.epoch=3"], "did you mean 'trainer.epochs'"),
        (["ae", "probe.poo=1"], "did you mean 'probe.pool'"),
        (["ae", "model.latent=4"], "for model.family=ae (did you mean 'model.latent_dim'?)"),
    ],
)
def test_bad_config_is_one_line_naming_the_allowed_values(argv, expected, capsys) -> None:
    assert expected in fails(argv, capsys)


@pytest.mark.parametrize("name", ["cae", "dae", "vae_conv"])
def test_conv_model_rejects_an_image_size_and_writes_nothing(name, tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    data = tmp_path / "data"
    err = fails([name, "img_size=30", f"data.root={data}", f"run_root={runs}"], capsys)
    assert "image size 30" in err and "allowed: multiples of 4" in err
    assert not runs.exists() and not data.exists()  # refused before any data is prepared


def test_layers_merge_in_order(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("trainer:\n  epochs: 2\nmodel:\n  latent_dim: 12\n")
    cfg = load_baseline_config("vae_conv", extra, ["model.beta=0.5"])
    assert (cfg.model.arch, cfg.model.latent_dim, cfg.model.beta) == ("conv", 12, 0.5)  # recipe, file, override
    assert cfg.trainer.epochs == 2 and cfg.trainer.optim.lr == 3e-3  # file: epochs; recipe: lr
    assert (cfg.trainer.optim.name, cfg.trainer.optim.weight_decay, cfg.data.hflip) == (
        "adamw",
        0.0,
        0.0,
    )  # baseline defaults kept
    assert cfg.probe is not None and cfg.probe.trainer.optim.name == "momentum"  # the MAE probe's default
    assert load_baseline_config("sdae", None, ["finetune.epochs=1"]).finetune.optim.lr == 1e-3
    assert {"ae", "ae_relu", "ae_sweep", "dae", "dae_mask", "sdae", "cae", "vae", "vae_conv", "aae", "aae_mog"} <= set(
        recipe_names()
    )
    for name in recipe_names():
        load_baseline_config(name)  # every shipped recipe is valid
