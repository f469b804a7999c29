"""The config loader: defaults <- YAML <- overrides, one-line errors naming the key."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
import yaml
from pydantic import Field

from launch.cli import config_parser, parse_config
from launch.config import Schema, TrainerConfig, flatten, load_config, over_defaults, parse_overrides, save_config
from launch.errors import ConfigError
from pretrain.config import DEFAULT_CONFIG, PretrainConfig


def test_precedence_defaults_file_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  epochs: 3\n  batch_size: 32\n  optim: {base_lr: 0.01}\n")
    cfg = load_config(PretrainConfig, path, ["trainer.epochs=5", "model.mask_ratio=0.6"])
    assert cfg.trainer.epochs == 5  # override beats file
    assert cfg.trainer.batch_size == 32  # file beats default
    assert cfg.trainer.optim.base_lr == 0.01
    assert cfg.trainer.optim.betas == (0.9, 0.95)  # default kept inside a partially given section
    assert cfg.model.mask_ratio == 0.6


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.epoch=3", "unknown config key 'trainer.epoch' (did you mean 'trainer.epochs'?)"),
        (
            "trainer.optim.wieght_decay=0",
            "unknown config key 'trainer.optim.wieght_decay' (did you mean 'trainer.optim.weight_decay'?)",
        ),
        ("traner.epochs=3", "unknown config key 'traner' (did you mean 'trainer'?)"),
    ],
)
def test_unknown_key_names_closest(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, None, [override])
    assert str(err.value) == expected


def test_unknown_key_in_file_lists_valid_keys_when_nothing_is_close(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  log:\n    zzz: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.log.zzz' \(valid keys: every_steps, "):
        load_config(PretrainConfig, path)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.epochs=many", "trainer.epochs"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.optim.betas=[0.9]", "trainer.optim.betas"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("seed=1.5", "seed"),
    ],
)
def test_wrong_type_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, None, [override])
    message = str(err.value)
    assert message.startswith(f"config key '{key}': ") and "\n" not in message
    assert "got" in message or "missing" in message


def test_override_values_are_yaml():
    tree = parse_overrides(["a.b=1", "a.c=[1, 2]", "d=true", "e=null", "f=1e-3", "g=text", "h="])
    assert tree == {"a": {"b": 1, "c": [1, 2]}, "d": True, "e": None, "f": 1e-3, "g": "text", "h": None}


def test_override_without_equals_or_below_a_value():
    with pytest.raises(ConfigError, match="is not key=value"):
        parse_overrides(["trainer.epochs"])
    with pytest.raises(ConfigError, match="below the value of 'a'"):
        parse_overrides(["a=1", "a.b=2"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainerConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(TrainerConfig, bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(TrainerConfig, bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(PretrainConfig, DEFAULT_CONFIG, ["trainer.optim.clip_grad=1.0"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(PretrainConfig, tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["trainer"]["optim"]["clip_grad"] == 1.0


def test_every_shipped_config_validates():
    root = DEFAULT_CONFIG.parents[1]
    files = sorted(root.glob("pretrain/*.yaml")) + sorted(root.glob("debug/*.yaml"))
    assert DEFAULT_CONFIG in files
    for path in files:
        load_config(PretrainConfig, path)


def test_help_lists_every_setting(capsys):
    parser = config_parser("mae-pretrain", PretrainConfig, "test")
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    for key in ("trainer.optim.base_lr", "trainer.checkpoint.resume", "model.mask_ratio", "data.source", "probe.pool"):
        assert f"  {key} (" in out
    cfg, _ = parse_config(parser, PretrainConfig, ["trainer.epochs=2"])
    assert cfg.trainer.epochs == 2


class _Leaf(Schema):
    kind: Literal["leaf"] = "leaf"
    size: int = Field(4, ge=1, le=8)


class _Twig(Schema):
    kind: Literal["twig"] = "twig"
    length: int = 1


class _Tree(Schema):
    part: Annotated[_Leaf | _Twig, Field(discriminator="kind")] = _Leaf()
    extra: TrainerConfig | None = None
    tuned: Annotated[TrainerConfig, over_defaults(lambda: {"epochs": 3, "optim": {"name": "sgd"}})] = TrainerConfig()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["extra.epoch=2"], "unknown config key 'extra.epoch' (did you mean 'extra.epochs'?)"),  # through `X | None`
        (
            ["part.kind=leaf", "part.sise=2"],
            "unknown config key 'part.sise' for part.kind=leaf (did you mean 'part.size'?)",
        ),
        (["part.kind=leaf", "part.zzz=2"], "unknown config key 'part.zzz' for part.kind=leaf (valid keys: kind, size)"),
        (
            ["part.kind=leaf", "part.size=9"],
            "config key 'part.size': Input should be less than or equal to 8 (got 9; allowed: 1 <= size <= 8)",
        ),
        (["part.kind=bud"], "config key 'part.kind': unknown kind 'bud'; allowed: leaf, twig"),
    ],
)
def test_errors_inside_optional_sections_and_tagged_unions(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(_Tree, None, overrides)
    assert str(err.value) == expected


def test_a_partial_section_starts_from_its_stage_defaults():
    cfg = load_config(_Tree, None, ["tuned.batch_size=8"], defaults={"extra": {"epochs": 2}})
    assert (cfg.tuned.epochs, cfg.tuned.optim.name, cfg.tuned.batch_size) == (3, "sgd", 8)
    assert cfg.extra.epochs == 2 and cfg.extra.optim.name == "adamw"  # the defaults layer, then the schema's


def test_flatten_gives_dotted_keys():
    assert flatten({"a": {"b": 1, "c": (1, 2)}, "d": "x"}) == {"a.b": 1, "a.c": [1, 2], "d": "x"}
