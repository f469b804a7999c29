"""The rehearsal: every shipped config and launch file, in miniature, through the commands a user runs.

A *cell* is one pipeline started the way the docs say: ``python -m pretrain`` (its default
pipeline: pretrain -> export -> linear probe -> picture) -> ``mae-export`` of the last
checkpoint -> (``mae-probe``) -> ``mae-finetune`` (the config's recipe, mixup on) ->
``mae-visualize``, with 2 processes and tiny widths / depths / epochs given as command-line
overrides. :data:`CELLS` names every cell and the shipped files it runs;
``tests/test_rehearsal.py`` runs them (``pytest -m rehearsal``) and checks that no file under
``configs/`` and no launch file under ``launch/`` is left out of this table.

Launchers, each the real one: ``torchrun``; ``accelerate launch --config_file <file>``, where
only the topology is overridden on the command line (``--num_processes 2``, one machine, a
free local port) because a CPU machine has no 8 GPUs. ``accelerate launch --cpu`` would start
one process, but a MULTI_GPU / DEEPSPEED file on a CPU-only machine makes accelerate itself
run ``torch.distributed.run`` with 2 gloo processes and export the ``ACCELERATE_*`` variables
of the file (mixed precision, DeepSpeed config file, ZeRO stage) that ``launch/backend.py``
reads: the same code path as on the cluster. The Slurm batch script runs as is under
``bash`` with the ``SLURM_*`` variables Slurm sets and stand-ins for ``srun`` (execs its
command), ``scontrol`` and ``scancel`` on ``PATH``, in a private network namespace when one
can be made (the script's rendezvous port 29500 is fixed).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from distrun import TORCHRUN

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TIMEOUT = 900  # seconds per command; a hung collective fails the cell instead of the whole run
POISON_STEP = 3  # the "poison" launcher's NaN step (rehearsal_poison.py --step)

# ----------------------------------------------------------------------------- miniature settings

#: ViT-MAE at 224 px, 49 patches of 32 px, width 32: the shipped recipe's code path at toy cost
TINY_MAE = [
    "model.patch_size=32",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.decoder_embed_dim=32",
    "model.decoder_depth=1",
    "model.decoder_num_heads=2",
]
#: one epoch of every training stage (the last, odd-sized batch included), logged every step
SHORT = [
    "epochs=1",
    "max_steps=null",
    "batch_size=4",
    "eval_batches=1",
    "log.every_steps=1",
    "log.progress=false",
    "optim.warmup_steps=1",
]
#: pretraining runs 3 epochs at a higher lr: the loss of norm_pix_loss starts at ~1.0 (the
#: variance of a normalized patch) and falls below it only once the tiny model learns something
PRETRAIN = ["epochs=3", "optim.lr=0.002"]


def trainer_overrides(prefix: str, settings: list[str]) -> list[str]:
    """``["epochs=1"]`` -> ``["trainer.epochs=1"]`` for ``prefix`` "trainer."."""
    return [f"{prefix}{s}" for s in settings]


# ----------------------------------------------------------------------------- the cells


@dataclass(frozen=True)
class Cell:
    """One pipeline. ``launcher``: "torchrun", "poison" (torchrun + a NaN batch, see
    ``rehearsal_poison.py``), a ``launch/accelerate/*.yaml`` or ``launch/slurm/pretrain.sbatch``.
    ``trainer``: settings of every training stage (pretrain, probe, fine-tune), without prefix."""

    launcher: str
    pretrain: str
    finetune: str | None = None
    trainer: tuple[str, ...] = ()
    deepspeed_json: str | None = None  # a shipped DeepSpeed JSON (ZeRO-3: persistence threshold set to 0)
    data: str = "photos"  # "photos" (real-photo ImageFolder shards, 224 px) or "mnist" (the shipped digits)
    probe: bool = False  # also run `mae-probe` on the `mae-export` folder (the pipeline probes in-process)
    fast: bool = False  # in the default suite (one per backend); the others run under `-m rehearsal`

    @property
    def files(self) -> set[str]:
        named = {self.pretrain, self.finetune, self.deepspeed_json, self.launcher}
        return {f for f in named if f and "/" in f}


def _ds(stage: int, precision: str) -> tuple[str, ...]:
    return ("backend=deepspeed", f"zero_stage={stage}", f"precision={precision}")


PHOTO_PRETRAIN, PHOTO_FINETUNE = "configs/pretrain/vit_base_in1k.yaml", "configs/finetune/vit_base_in1k.yaml"
ZERO2, ZERO3 = "launch/deepspeed/zero2.json", "launch/deepspeed/zero3.json"

CELLS: dict[str, Cell] = {
    "ddp-fp32": Cell("launch/slurm/pretrain.sbatch", PHOTO_PRETRAIN, PHOTO_FINETUNE, ("precision=fp32",)),
    "ddp-bf16": Cell("launch/accelerate/8gpu.yaml", PHOTO_PRETRAIN, PHOTO_FINETUNE, ("precision=bf16",), probe=True),
    "zero1-fp32": Cell("torchrun", PHOTO_PRETRAIN, PHOTO_FINETUNE, _ds(1, "fp32")),
    "zero1-bf16": Cell("torchrun", PHOTO_PRETRAIN, PHOTO_FINETUNE, _ds(1, "bf16")),
    "zero2-fp32": Cell("torchrun", PHOTO_PRETRAIN, PHOTO_FINETUNE, _ds(2, "fp32"), ZERO2),
    "zero2-bf16": Cell("launch/accelerate/zero2.yaml", PHOTO_PRETRAIN, PHOTO_FINETUNE, _ds(2, "bf16"), ZERO2),
    "zero3-fp32": Cell("torchrun", PHOTO_PRETRAIN, PHOTO_FINETUNE, _ds(3, "fp32"), ZERO3),
    "zero3-bf16": Cell("launch/accelerate/zero3.yaml", PHOTO_PRETRAIN, PHOTO_FINETUNE, _ds(3, "bf16"), ZERO3),
    # fp16 + clipping, and one poisoned (NaN) step that must be skipped, not crash. On a CPU-only
    # machine Accelerate runs fp16 without autocast or GradScaler (fp32 math): the GradScaler's
    # side of this cell (unscale, skip, update) runs only where CUDA is present.
    "fp16-clip-nan": Cell("poison", PHOTO_PRETRAIN, PHOTO_FINETUNE, ("precision=fp16", "optim.clip_grad=1.0")),
    # the shipped MNIST recipes over two machines' launch file (one machine here)
    "mnist": Cell(
        "launch/accelerate/multinode.yaml",
        "configs/pretrain/mnist_tiny.yaml",
        "configs/finetune/mnist.yaml",
        data="mnist",
        probe=True,
    ),
    "smoke-1gpu": Cell("launch/accelerate/1gpu.yaml", "configs/debug/smoke.yaml", data="mnist"),
    # the default suite's cells, one per backend: the debug configs run as their comments say
    "smoke-ddp": Cell("torchrun", "configs/debug/smoke.yaml", data="mnist", fast=True),
    "smoke-deepspeed": Cell("torchrun", "configs/debug/deepspeed_cpu.yaml", data="mnist", fast=True),
}

#: every baseline recipe (one 2-process launch runs them all) -> overrides keeping it tiny
BASELINES: dict[str, list[str]] = {
    "ae": ["model.hidden=[32]", "model.latent_dim=4"],
    "ae2d": ["model.hidden=[32,16]"],
    "ae_relu": ["model.hidden=[32]", "model.latent_dim=4"],
    "ae_sweep": ["model.hidden=[32]", "latent_sweep=[2,4]"],
    "aae": ["model.hidden=[32]", "model.disc_hidden=[16]"],
    "aae_mog": ["model.hidden=[32]", "model.disc_hidden=[16]"],
    "cae": ["model.widths=[4,4]", "finetune.max_steps=2"],
    "dae": ["model.widths=[4,4]"],
    "dae_mask": ["model.widths=[4,4]"],
    "sdae": ["model.layers=[32,8]", "finetune.max_steps=2"],
    "vae": ["model.hidden=[32]"],
    "vae_conv": ["model.widths=[4,4]", "model.latent_dim=4"],
}
BASELINE_COMMON = [
    "trainer.max_steps=2",
    "trainer.batch_size=16",
    "trainer.log.tensorboard=false",
    "probe.trainer.max_steps=2",
    "probe.trainer.batch_size=16",
    "data.workers=0",
]


def rehearsed_files() -> set[str]:
    """Every shipped file some cell (or the baselines launch) runs."""
    files = set().union(*(c.files for c in CELLS.values()))
    return files | {f"configs/baselines/{name}.yaml" for name in BASELINES}


def shipped_files() -> set[str]:
    """What a cell must run: every file under ``configs/`` and every launch file under ``launch/``
    (all but its Python code, e.g. ``accelerate/*.yaml``, ``deepspeed/*.json``, ``slurm/*.sbatch``)."""
    configs = [p for p in (ROOT / "configs").rglob("*") if p.is_file()]
    launch_files = [p for p in (ROOT / "launch").rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")]
    return {str(p.relative_to(ROOT)) for p in configs + launch_files}


# ----------------------------------------------------------------------------- launching


@dataclass
class Runner:
    """Runs one cell's commands from the repository root (configs name launch files relative to it)."""

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **self.env}

    def run(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> str:
        """Run ``cmd``; its output goes to ``workdir/<name>.log`` and the command, exit status and
        seconds to ``workdir/commands.txt``; a non-zero exit fails with the output's tail."""
        out, start = self.workdir / f"{name}.log", time.monotonic()
        with out.open("w") as stream:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                env={**self.env, **(env or {})},
                stdout=stream,
                stderr=subprocess.STDOUT,
                timeout=TIMEOUT,
                check=False,
            )
        line = f"{name}: exit {proc.returncode} after {time.monotonic() - start:.0f} s: {shlex.join(cmd)}"
        with (self.workdir / "commands.txt").open("a") as record:
            record.write(line + "\n")
        text = out.read_text()
        assert proc.returncode == 0, f"{line}\n{text[-4000:]}"
        return text


def console_script(name: str, args: list[str]) -> list[str]:
    """``mae-export ARGS`` exactly as the installed console script runs it (its entry point)."""
    (script,) = entry_points(group="console_scripts", name=name)
    return [
        sys.executable,
        "-c",
        f"import sys; from {script.module} import {script.attr}; sys.exit({script.attr}())",
        *args,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    cell: Cell, module: str, args: list[str], workdir: Path, deepspeed_json: Path | None
) -> tuple[list[str], dict[str, str]]:
    """The command (and extra environment) starting ``python -m module args`` with the cell's launcher."""
    torchrun = [*TORCHRUN]
    if cell.launcher == "torchrun":
        return [*torchrun, "-m", module, *args], {}
    if cell.launcher == "poison":
        return [*torchrun, str(TESTS / "rehearsal_poison.py"), "--step", str(POISON_STEP), module, *args], {}
    if cell.launcher.endswith(".sbatch"):
        if module != "pretrain":  # the script launches pretraining only; the other stages use torchrun
            return [*torchrun, "-m", module, *args], {}
        return slurm(cell.launcher, args, workdir)
    return accelerate(cell.launcher, module, args, deepspeed_json), {}


def accelerate(config_file: str, module: str, args: list[str], deepspeed_json: Path | None) -> list[str]:
    """``accelerate launch --config_file FILE``; only the topology (and the ZeRO-3 JSON) overridden."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file]
    if "1gpu" not in config_file:
        cmd += [
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--machine_rank",
            "0",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(free_port()),
        ]
    if deepspeed_json is not None:
        cmd += ["--deepspeed_config_file", str(deepspeed_json)]
    return [*cmd, "-m", module, *args]


#: ``srun [--options] cmd ...``: run the step's command in place (one task on this node); every
#: option the script passes takes a value, as ``--opt=value`` or ``--opt value``
SRUN_EXEC = 'while [ "${1#--}" != "$1" ]; do case "$1" in *=*) shift ;; *) shift 2 ;; esac; done; exec "$@"'


def slurm(script: str, args: list[str], workdir: Path, srun: str = SRUN_EXEC) -> tuple[list[str], dict[str, str]]:
    """``sbatch SCRIPT ARGS`` on one node with 2 "GPUs" and 2 CPUs, as Slurm would start the batch
    shell; ``srun``: the body of the ``srun`` stand-in."""
    bin_dir = workdir / "slurm-bin"
    bin_dir.mkdir(exist_ok=True)
    calls = workdir / "slurm-calls.txt"
    stand_ins = {
        "srun": srun,
        "scontrol": f'echo "scontrol $*" >> {calls}; [ "$1 $2" = "show hostnames" ] && echo localhost; exit 0',
        "scancel": f'echo "scancel $*" >> {calls}',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_GPUS_ON_NODE": "2",
        "SLURM_CPUS_PER_TASK": "2",
    }
    cmd = ["bash", script, *args]
    if _private_network():  # the script's rendezvous port is fixed: keep other jobs on this machine out
        cmd = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]
    return cmd, env


def _private_network() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return (
        subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, check=False).returncode
        == 0
    )


def zero3_json(workdir: Path) -> Path:
    """The shipped ZeRO-3 JSON with ``stage3_param_persistence_threshold`` 0: every parameter is
    partitioned, as at ViT-L scale (the tiny model's parameters are all below the shipped 1e5)."""
    config = json.loads((ROOT / ZERO3).read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = workdir / "zero3-partition-all.json"
    path.write_text(json.dumps(config, indent=1))
    return path


# ----------------------------------------------------------------------------- results


def records(run_dir: Path, split: str = "train") -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == split]


def losses(run_dir: Path) -> list[float]:
    """The training loss of every logged step; fails unless there is one and each is finite."""
    values = [r["loss"] for r in records(run_dir) if "loss" in r]
    assert values, f"{run_dir}: no training loss logged"
    assert all(math.isfinite(v) for v in values), f"{run_dir}: non-finite training loss {values}"
    return values


def load_timm(folder: Path, img_size: int, chans: int) -> None:
    """The export loads in plain timm (no project code) and maps an image to finite outputs."""
    import timm
    import torch

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        out = model(torch.randn(2, chans, img_size, img_size))
    assert torch.isfinite(out).all(), f"{folder}: non-finite output"


#: crops of real photos are cut around this side (tests/test_rehearsal.py builds the data)
CROP = 224


# ----------------------------------------------------------------------------- one cell

#: the MNIST recipes run a few steps (an epoch of 4,000 digits in batches of 8 is 250 steps)
SHORT_MNIST = [
    "max_steps=9",
    "batch_size=8",
    "eval_batches=1",
    "log.every_steps=1",
    "log.progress=false",
    "optim.warmup_steps=1",
]


@dataclass(frozen=True)
class Miniature:
    """What makes a cell small: its data, and the overrides of its stages (without prefix)."""

    data: list[str]
    model: list[str]
    stages: list[str]  # every training stage: pretrain, probe, fine-tune
    pretrain: list[str]  # pretraining only, after ``stages``
    image: tuple[int, int]  # (side, channels) the exports take


def miniature(cell: Cell, photos: Path | None, mnist: Path) -> Miniature:
    if cell.data == "photos":
        # the photo set loses ~10 of its 81 training samples by design (a corrupt JPEG, a truncated
        # shard): allow that, as a user with known damage would, instead of the default 1 %
        data = [f"data.source={photos}", "data.workers=1", "data.max_skipped_fraction=0.25"]
        return Miniature(data, TINY_MAE, SHORT, PRETRAIN, (CROP, 3))
    if cell.pretrain.startswith("configs/debug/"):  # a few steps already: run as the file's comment says
        return Miniature([f"data.root={mnist}"], [], [], [], (28, 1))
    return Miniature([f"data.root={mnist}", "data.workers=1"], [], SHORT_MNIST, ["optim.lr=0.002"], (28, 1))


def run_cell(name: str, photos: Path | None, mnist: Path, workdir: Path) -> None:
    """Every stage of cell ``name`` into ``workdir``, each checked as soon as it has run."""
    cell, runner, mini = CELLS[name], Runner(workdir), miniature(CELLS[name], photos, mnist)
    settings = [*mini.stages, *cell.trainer]
    ds_json = zero3_json(workdir) if cell.deepspeed_json == ZERO3 else cell.deepspeed_json
    via_accelerate = cell.launcher.endswith(".yaml")
    if ds_json and not via_accelerate:
        settings.append(f"deepspeed_config={ds_json}")  # accelerate passes its config file's JSON itself

    def stage(label: str, module: str, args: list[str]) -> None:
        override = Path(ds_json) if via_accelerate and cell.deepspeed_json == ZERO3 else None
        runner.run(label, *launch(cell, module, args, workdir, override))

    pre, export = workdir / "pretrain", workdir / "export"
    stage(
        "pretrain",
        "pretrain",
        [
            "--config",
            cell.pretrain,
            f"run_dir={pre}",
            *mini.data,
            *mini.model,
            *trainer_overrides("trainer.", settings + mini.pretrain),
            *trainer_overrides("probe.trainer.", settings),
        ],
    )
    check_pretraining(pre, mini.image, poisoned=cell.launcher == "poison")
    if cell.launcher.endswith(".sbatch"):  # the script exits 0 after a requeue too
        assert "requeue" not in (workdir / "slurm-calls.txt").read_text(), "the Slurm script requeued a finished run"

    runner.run("mae-export", console_script("mae-export", [str(pre), "--out", str(export)]))
    load_timm(export / "timm", *mini.image)
    same_weights(pre / "export" / "timm", export / "timm")

    if cell.probe:
        stage(
            "mae-probe",
            "finetune.probe",
            [
                f"backbone={export / 'timm'}",
                f"run_dir={workdir / 'probe'}",
                *mini.data,
                *trainer_overrides("probe.trainer.", settings),
            ],
        )
        losses(workdir / "probe")
    if cell.finetune:
        stage(
            "mae-finetune",
            "finetune.finetune",
            [
                "--config",
                cell.finetune,
                f"backbone={export / 'timm'}",
                f"run_dir={workdir / 'finetune'}",
                *mini.data,
                *trainer_overrides("finetune.trainer.", settings),
            ],
        )
        losses(workdir / "finetune")
        load_timm(workdir / "finetune" / "export", *mini.image)

    runner.run(
        "mae-visualize",
        console_script(
            "mae-visualize",
            [str(export), "--data", str(pre / "config.yaml"), "--num-images", "2", "--out", str(workdir / "grid.png")],
        ),
    )
    assert (workdir / "grid.png").stat().st_size > 0


def check_pretraining(run_dir: Path, image: tuple[int, int], *, poisoned: bool) -> None:
    """A finite training loss that falls (mean of the last third of the logged steps below the
    first third's: single steps are noisy; the poisoned cell skipped exactly its NaN step), a
    finite probe loss, and the pipeline's export loads in plain timm."""
    logged = records(run_dir)
    skipped = [r["step"] for r in logged if r.get("skipped_steps")]
    assert skipped == ([POISON_STEP] if poisoned else []), f"skipped steps {skipped}"
    values = [r["loss"] for r in logged if not r.get("skipped_steps")]
    assert values and all(math.isfinite(v) for v in values), f"{run_dir}: training loss {values}"
    third = max(1, len(values) // 3)
    assert sum(values[-third:]) < sum(values[:third]), f"{run_dir}: the training loss did not fall: {values}"
    if json.loads((run_dir / "summary.json").read_text())["probe_top1"] is not None:
        losses(run_dir / "probe")
    load_timm(run_dir / "export" / "timm", *image)


def same_weights(a: Path, b: Path) -> None:
    """The pipeline's own export and ``mae-export`` of the final checkpoint hold the same weights."""
    import torch
    from safetensors.torch import load_file

    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys(), f"{a} vs {b}: keys differ: {sorted(first.keys() ^ second.keys())[:5]}"
    for key in first:
        assert torch.equal(second[key], first[key]), (
            f"{a} vs {b}: {key} differs by up to {(second[key] - first[key]).abs().max()}"
        )
