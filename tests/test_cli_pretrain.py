"""``mae-pretrain``: the no-argument pipeline in short form, and bad input -> one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from pretrain.__main__ import main

#: the default run, shortened: a few steps of pretraining and of probing
SHORT = [
    "trainer.max_steps=3",
    "trainer.batch_size=32",
    "trainer.log.every_steps=1",
    "trainer.log.progress=false",
    "trainer.eval_every_epochs=0",
    "trainer.eval_batches=2",
    "probe.trainer.max_steps=2",
    "probe.trainer.batch_size=64",
    "probe.trainer.eval_batches=2",
    "probe.trainer.log.progress=false",
    "data.workers=0",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, data_root):
    """``mae-pretrain`` as a real process with only shortening overrides."""
    run_dir = tmp_path_factory.mktemp("run") / "mae"
    cmd = [sys.executable, "-m", "pretrain", f"run_dir={run_dir}", f"data.root={data_root}", *SHORT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_default_run_leaves_every_artifact(default_run):
    run_dir, proc = default_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["preset"] == "mae_vit_mnist_p4" and config["trainer"]["max_steps"] == 3
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert {"loss", "lr", "images_per_s", "flops_per_s", "skipped_samples"} <= set(records[0])
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "step-00000003" / "COMPLETE").is_file()
    assert (run_dir / "reconstruction.png").stat().st_size > 0
    assert (run_dir / "export" / "timm" / "model.safetensors").is_file()
    assert (run_dir / "export" / "timm" / "config.json").is_file()
    assert (run_dir / "probe" / "metrics.jsonl").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_loss"] > 0 and 0 <= summary["probe_top1"] <= 100
    assert summary["skipped_samples"] == 0
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("mae-pretrain: final loss ") and "probe top-1" in line and "images/s" in line


def test_resuming_a_finished_run_changes_nothing(default_run, data_root, capsys):
    run_dir, _ = default_run
    weights = (run_dir / "checkpoints" / "step-00000003" / "trainer.pt").read_bytes()
    assert main([f"run_dir={run_dir}", f"data.root={data_root}", *SHORT, "linear_probe=false"]) == 0
    assert (run_dir / "checkpoints" / "step-00000003" / "trainer.pt").read_bytes() == weights
    assert "3 steps" in capsys.readouterr().out


def _ds_json(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    return f"trainer.deepspeed_config={path}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.epoch=3"], "unknown config key 'trainer.epoch' (did you mean 'trainer.epochs'?)"),
        (["trainer.batch_size=abc"], "config key 'trainer.batch_size': "),
        (["data.source=/nonexistent/shards-{000..003}.tar"], "/nonexistent/shards-"),
        (["trainer.batch_size=5000"], "= 5000 images per step, more than the 4000 samples of split 'train'"),
        (
            ["trainer.backend=deepspeed", "DSJSON"],
            "sets zero_optimization.stage=3 but the run config gives 2 (trainer.zero_stage)",
        ),
    ],
    ids=["unknown-key", "wrong-type", "missing-shards", "batch-split", "deepspeed-json"],
)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(tmp_path, data_root, capsys, overrides, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("an earlier run's config\n")
    (run_dir / "metrics.jsonl").write_text("{}\n")
    overrides = [_ds_json(tmp_path) if o == "DSJSON" else o for o in overrides]
    with pytest.raises(SystemExit) as exit_:
        main([f"run_dir={run_dir}", f"data.root={data_root}", *SHORT, *overrides])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mae-pretrain: error: ") and message in err[0], err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert (run_dir / "config.yaml").read_text() == "an earlier run's config\n"


def test_console_script_exit_status_and_help(capsys):
    bad = subprocess.run(["mae-pretrain", "trainer.precision=fp8"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("mae-pretrain: error: config key 'trainer.precision'")
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "trainer.optim.base_lr" in out and "mnist_tiny.yaml" in out
