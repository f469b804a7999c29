"""``mae-baseline NAME [--config FILE] [key=value ...]`` (also ``python -m baselines``).

NAME is a recipe of ``configs/baselines/`` (e.g. ``ae``, ``ae_relu``, ``ae_sweep``, ``vae_conv``,
``aae_mog``) or a bare family (ae, dae, sdae, cae, vae, aae). Works under ``torchrun`` as is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from baselines.config import DEFAULTS, BaselineConfig, load_baseline_config, recipe_names
from baselines.families import FAMILIES
from launch import dist
from launch.cli import entry_point
from launch.config import describe_fields, flatten

PROG = "mae-baseline"


def build_parser() -> argparse.ArgumentParser:
    families = "\n".join(
        f"model settings of family {name}:\n" + "\n".join(describe_fields(schema, "model."))
        for name, (schema, _) in FAMILIES.items()
    )
    settings = [line for line in describe_fields(BaselineConfig) if not line.lstrip().startswith("model ")]
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train a classic autoencoder baseline on the shared run stack, probe its codes, "
        "optionally fine-tune it, and write run_root/NAME/results.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"names: {', '.join(recipe_names())}\n\nsettings (override any with key=value):\n"
        + "\n".join(settings)
        + "\n\nbaseline defaults replacing the schema's: "
        + " ".join(f"{k}={v}" for k, v in flatten(DEFAULTS).items())
        + "\n\n"
        + families,
    )
    parser.add_argument("name", help="recipe (configs/baselines/NAME.yaml) or model family")
    parser.add_argument("--config", type=Path, default=None, help="YAML applied on top of the recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.latent_dim=16")
    return parser


def run_cli(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    cfg = load_baseline_config(args.name, args.config, args.overrides)
    from baselines.run import run  # the run stack is imported only once the config is valid

    results = run(cfg)
    if dist.is_main():
        summary = {
            k: results[k] for k in ("name", "params", "train_seconds", "eval", "probe", "finetune") if k in results
        }
        print(json.dumps(summary if "sweep" not in results else results, default=str))
    return 0


main = entry_point(PROG, run_cli)

if __name__ == "__main__":
    raise SystemExit(main())
