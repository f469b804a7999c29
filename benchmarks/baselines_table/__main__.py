"""``python -m benchmarks.baselines_table``: run what is missing, read the rows, rewrite the table block."""

from __future__ import annotations

import argparse
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.baselines_table import PIXELS, ROOT, SWEEP, TABLE
from benchmarks.baselines_table import __doc__ as about
from benchmarks.baselines_table.jobs import probe_overlay, run_baseline, run_mae, run_pixels
from benchmarks.baselines_table.render import render, update_block
from benchmarks.baselines_table.rows import mae_row, present, probe_protocol


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baselines_table", description=about.split("\n\n")[0])
    parser.add_argument("--names", nargs="*", default=TABLE, help="baselines in the table")
    parser.add_argument("--run-root", type=Path, default=ROOT / "runs" / "baselines")
    parser.add_argument("--mae-run", type=Path, default=ROOT / "runs" / "mae-mnist")
    parser.add_argument("--finetune-run", type=Path, default=ROOT / "runs" / "finetune")
    parser.add_argument("--jobs", type=int, default=1, help="baselines trained at once")
    parser.add_argument("--rerun", action="store_true", help="train again even when results.json exists")
    parser.add_argument("--no-sweep", action="store_true", help="skip the latent-size sweep")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "baselines.md",
        help="the page whose table block is rewritten",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="key=value",
        help="overrides for every baseline (e.g. trainer.max_steps=100)",
    )
    parser.add_argument(
        "--render-only", action="store_true", help="train nothing: tabulate the results.json files present"
    )
    parser.add_argument("--no-mae-run", action="store_true", help="do not pretrain MAE when its summary is missing")
    parser.add_argument(
        "--mae-set", nargs="*", default=[], metavar="key=value", help="overrides for mae-pretrain when it has to run"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    names = list(args.names) + ([] if args.no_sweep else [SWEEP])
    if not args.render_only:
        run_all(args, names)
    done = {n: present(args.run_root, n) for n in [PIXELS, *names]}
    return write_table(args, done, mae_row(args.mae_run, args.finetune_run))


def run_all(args: argparse.Namespace, names: list[str]) -> None:
    """The raw-pixel probe, then the MAE run (if wanted) beside ``--jobs`` baselines at a time."""
    overlay = probe_overlay(args.run_root)
    run_pixels(args.run_root, overlay, args.rerun)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        mae = pool.submit(run_mae, args.mae_run, args.mae_set) if not args.no_mae_run else None
        list(pool.map(lambda n: run_baseline(n, args.run_root, overlay, args.rerun, args.set), names))
        if mae is not None:
            mae.result()


def write_table(args: argparse.Namespace, done: dict[str, Any], mae: dict[str, Any]) -> int:
    """Rows: the raw-pixel probe, every baseline of ``--names``, MAE; then the sweep."""
    sweep = done.pop(SWEEP, None)
    names = [PIXELS, *args.names]
    rows = [done.get(n) or {"name": n, "eval": {}, "missing": True} for n in names] + [mae]
    for row, run_dir in zip(rows, [args.run_root / n for n in names] + [args.mae_run]):
        row["probe_protocol"] = probe_protocol(run_dir)
    block = render(rows, sweep)
    update_block(args.out, block)
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
