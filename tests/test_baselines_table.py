"""The baselines comparison table: rows from results.json files, the raw-pixel probe row, the
cost of each run (CPU seconds of the child, load average), and the rewrite of its block in the results page."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.baselines_table import COST as COST_FILE
from benchmarks.baselines_table import PIXELS, jobs, render
from benchmarks.baselines_table.__main__ import main


def write_run(root: Path, name: str, results: dict, cost: dict | None = None) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(results))
    if cost is not None:
        (root / name / COST_FILE).write_text(json.dumps(cost))


COST = {"cpu_seconds": 90.0, "wall_seconds": 150.0, "load_start": 1.5, "load_end": 3.25}


def test_render_only_fills_the_table_block_with_pixels_baselines_mae_and_cost(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root, PIXELS, {"name": "raw pixels", "params": 0, "eval": {}, "probe": {"top1": 85.4}}, COST)
    write_run(
        root,
        "ae",
        {
            "name": "ae",
            "params": 419120,
            "eval": {"mse": 0.0104, "bce": 0.0969},
            "steps": 2500,
            "train_seconds": 68.1,
            "probe": {"top1": 89.0},
        },
        COST,
    )
    page = tmp_path / "baselines.md"
    page.write_text(f"# x\n\n## Baselines\n\n{render.START}\nold table\n{render.END}\n\n## Next\nkept\n")
    assert (
        main(
            [
                "--render-only",
                "--names",
                "ae",
                "cae",
                "--no-sweep",
                "--run-root",
                str(root),
                "--mae-run",
                str(tmp_path / "no-mae"),
                "--out",
                str(page),
            ]
        )
        == 0
    )
    text = page.read_text()
    assert "old table" not in text and text.endswith("## Next\nkept\n")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len({line.count("|") for line in rows}) == 1, "every row has the header's columns"
    assert rows[1].startswith("| raw pixels | — | 85.4 | — | —")
    assert rows[2].startswith("| ae | 0.0104 / 0.097 | 89.0 | — | 0.42 M | 2500 | 68 | 90 |")
    assert rows[3].startswith("| cae (not run yet) |") and rows[4].startswith("| mae (mnist_tiny) (not run yet) |")
    # two measured runs: 3.0 CPU-minutes, 5.0 wall-minutes, the load range over both
    assert "3.0 CPU-minutes, 5.0 wall-minutes, 1-minute load average 1.5-3.2 on 2 cores" in text


def test_mae_recon_is_converted_to_unit_pixels_only_without_norm_pix() -> None:
    row = {"name": "mae (mnist_tiny)", "params": 10**6, "eval": {"mae_loss": 0.58, "mae_unit_mse": 0.0551}}
    assert "| 0.0551 / —* |" in render.table_row(row)
    row["eval"]["mae_unit_mse"] = None  # per-patch-normalized targets: no [0, 1] equivalent
    assert "| 0.580** |" in render.table_row(row)


def test_child_cpu_seconds_are_measured_and_failures_raise(tmp_path: Path) -> None:
    with (tmp_path / "log").open("w") as out:
        cost = jobs.measured(
            lambda: jobs._run_child([sys.executable, "-c", "sum(i * i for i in range(3 * 10**6))"], out)
        )
        assert cost["cpu_seconds"] > 0.05 and cost["wall_seconds"] >= cost["cpu_seconds"] * 0.5
        with pytest.raises(subprocess.CalledProcessError):
            jobs._run_child([sys.executable, "-c", "raise SystemExit(3)"], out)


def test_rerun_sets_the_previous_run_aside_instead_of_resuming_it(tmp_path: Path) -> None:
    """A rerun with changed budgets must not resume the old run's checkpoints (resume=auto)."""
    for generation in ("first", "second"):
        old = tmp_path / "ae" / "train" / "checkpoints" / "latest"
        old.parent.mkdir(parents=True)
        old.write_text(generation)
        jobs.set_aside(tmp_path / "ae")
        assert not (tmp_path / "ae").exists()
        assert (tmp_path / ".previous" / "ae" / "train" / "checkpoints" / "latest").read_text() == generation
    jobs.set_aside(tmp_path / "never-run")  # nothing to move
