"""Every baseline family trains under ``torchrun --nproc_per_node 2`` (gloo) through the real
run outline: one launch runs them all (a few steps each), then one check per family."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from distrun import TORCHRUN

ROOT = Path(__file__).resolve().parents[1]

#: family -> overrides keeping it tiny; sdae also covers the probe and the fine-tune stage
RUNS = {
    "ae": ["model.hidden=[32]", "model.latent_dim=4"],
    "dae": ["model.widths=[4,4]", "model.noise=mask", "model.noise_level=0.2"],
    "sdae": [
        "model.layers=[32,8]",
        "finetune={max_steps: 2, batch_size: 16}",
        "probe={trainer: {max_steps: 2, batch_size: 16}}",
    ],
    "cae": ["model.widths=[4,4]"],
    "vae": ["model.arch=conv", "model.widths=[4,4]", "model.latent_dim=2"],
    "aae": ["model.hidden=[32]", "model.disc_hidden=[16]", "model.prior=mog"],
}

DRIVER = textwrap.dedent(
    """
    import json, sys
    from baselines.config import load_baseline_config
    from baselines.run import run

    runs, common = json.loads(sys.argv[1]), sys.argv[2:]
    for name, extra in runs.items():
        run(load_baseline_config(name, None, common + extra))
    """
)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One torchrun launch of every family; returns the run root."""
    tmp = tmp_path_factory.mktemp("dist")
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    common = [
        f"data.root={tmp / 'data'}",
        "data.workers=0",
        f"run_root={tmp / 'runs'}",
        "probe=null",
        "trainer.max_steps=2",
        "trainer.batch_size=16",
        "trainer.log.tensorboard=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        *TORCHRUN,
        str(driver),
        json.dumps(RUNS),
        *common,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "runs"


@pytest.mark.dist
@pytest.mark.parametrize("name", list(RUNS))
def test_baseline_trains_with_two_processes(name: str, launched: Path) -> None:
    run_dir = launched / name
    results = json.loads((run_dir / "results.json").read_text())
    stages = ["layer0", "layer1"] if name == "sdae" else ["train"]
    assert results["steps"] == 2 * len(stages)
    assert all(v == v and abs(v) < 1e6 for v in results["eval"].values()), results["eval"]  # finite
    assert 0 <= results["eval"]["mse"] <= 1
    for stage in stages:
        latest = (run_dir / stage / "checkpoints" / "latest").read_text().strip()
        checkpoint = run_dir / stage / "checkpoints" / latest
        assert {"rank-00000.pt", "rank-00001.pt"} <= {p.name for p in checkpoint.iterdir()}, "a rank did not take part"
    assert (run_dir / "pictures" / "recon.png").is_file()
    if name == "sdae":
        assert 0 <= results["probe"]["top1"] <= 100 and 0 <= results["finetune"]["top1"] <= 100
    if name == "aae":
        assert 0 <= results["eval"]["disc_acc"] <= 1 and (run_dir / "pictures" / "samples.png").is_file()
