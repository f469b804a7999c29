"""The baselines-vs-MAE comparison table on the shipped MNIST, written into ``benchmarks/results/baselines.md``.

    python -m benchmarks.baselines_table                              # run what is missing, then rewrite the table
    OMP_NUM_THREADS=1 python -m benchmarks.baselines_table --rerun --jobs 1   # train every row again

Each baseline is ``mae-baseline NAME`` (its recipe in ``configs/baselines/``) with the MAE
run's own linear-probe settings (``probe:`` of ``configs/pretrain/mnist_tiny.yaml``), so the
probe protocol is identical; the first row is that probe on the raw pixels (no model). The MAE
row reads ``runs/mae-mnist/summary.json`` (written by ``mae-pretrain``; run here if absent,
unless ``--no-mae-run``) and, if present, the fine-tune helper's ``runs/finetune/best/best.json``.
Existing ``results.json`` files are reused unless ``--rerun``, which first moves each previous
run to ``run_root/.previous/``. Every run this script starts records its CPU seconds, wall
seconds and load average in ``run_root/NAME/table_cost.json``; the table sums them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import yaml

log = logging.getLogger("baselines_table")

ROOT = Path(__file__).resolve().parents[1]
TABLE = ["ae", "ae_relu", "ae2d", "dae", "dae_mask", "sdae", "cae", "vae", "vae_conv", "aae", "aae_mog"]
SWEEP = "ae_sweep"
MAE_PRETRAIN_CONFIG = ROOT / "configs" / "pretrain" / "mnist_tiny.yaml"
START, END = "<!-- baselines-table:start -->", "<!-- baselines-table:end -->"
#: the raw-pixel probe's folder under run_root, and each run's cost file (written by this script)
PIXELS, COST = "pixels", "table_cost.json"

#: the public Keras study on full MNIST (60,000 training digits) quoted in the issue
REFERENCE = {
    "ae2d": "784→2 AE (tanh): MSE ≈ 0.0685",
    "cae": "conv AE: BCE ≈ 0.07; + classifier ≈ 99 %",
    "sdae": "stacked DAE + classifier ≈ 95 %",
    "vae": "VAE, 2-D latent: BCE + KL ≈ 145",
}


def probe_overlay(run_root: Path) -> Path:
    """A ``--config`` file holding the MAE run's probe section (same protocol for every row).
    Data is read in the training process (``workers: 0``): a table job gets one core, and
    28 x 28 digits decode faster there than they travel from a worker process."""
    probe = yaml.safe_load(MAE_PRETRAIN_CONFIG.read_text()).get("probe", {})
    path = run_root / "probe_protocol.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"probe": probe, "data": {"workers": 0}}, sort_keys=False))
    return path


def run_baseline(name: str, run_root: Path, overlay: Path, rerun: bool, overrides: list[str]) -> dict[str, Any]:
    """``mae-baseline name`` in a subprocess (unless its results exist); results + what the run cost."""
    results = run_root / name / "results.json"
    if rerun or not results.is_file():
        set_aside(run_root / name)
        extra = ["probe=null"] if name == SWEEP else []  # the sweep reports reconstruction only
        cmd = [sys.executable, "-m", "baselines", name, "--config", str(overlay), f"run_root={run_root}", *overrides, *extra]
        log.info("running %s", " ".join(cmd))
        with (run_root / f"{name}.log").open("w") as out:
            cost = measured(lambda: _run_child(cmd, out))
        (run_root / name / COST).write_text(json.dumps(cost) + "\n")
    return json.loads(results.read_text()) | {"cost": read_cost(run_root / name)}


def set_aside(run_dir: Path) -> None:
    """Move a previous run of this row to ``run_root/.previous/NAME`` (replacing an older one),
    so the new run starts from scratch instead of resuming the old run's checkpoints."""
    if run_dir.exists():
        previous = run_dir.parent / ".previous" / run_dir.name
        shutil.rmtree(previous, ignore_errors=True)
        previous.parent.mkdir(parents=True, exist_ok=True)
        run_dir.rename(previous)
        log.info("previous run moved to %s", previous)


def _run_child(cmd: list[str], out: IO[str]) -> float:
    """Run ``cmd``; its CPU seconds (user + system, including its waited-for children)."""
    child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, cmd)
    return usage.ru_utime + usage.ru_stime


def measured(work: Callable[[], float]) -> dict[str, float]:
    """Wall seconds, CPU seconds (returned by ``work``) and the 1-minute load average before / after."""
    load_start, start = os.getloadavg()[0], time.perf_counter()
    cpu = work()
    return {"cpu_seconds": round(cpu, 1), "wall_seconds": round(time.perf_counter() - start, 1),
            "load_start": round(load_start, 2), "load_end": round(os.getloadavg()[0], 2)}


def read_cost(run_dir: Path) -> dict[str, float] | None:
    path = run_dir / COST
    return json.loads(path.read_text()) if path.is_file() else None


def pixels_row(run_root: Path, overlay: Path, rerun: bool) -> dict[str, Any]:
    """The same linear probe on the raw pixels (in this process: no model to train)."""
    run_dir = run_root / PIXELS
    if rerun or not (run_dir / "results.json").is_file():
        set_aside(run_dir)
        from baselines.config import load_baseline_config
        from baselines.run import probe_pixels

        cfg = load_baseline_config("ae", overlay, [f"run_root={run_root}", "probe.trainer.log.progress=false"])
        cfg = cfg.model_copy(update={"name": PIXELS})

        def work() -> float:
            before = resource.getrusage(resource.RUSAGE_SELF)
            probe_pixels(cfg, run_dir)
            after = resource.getrusage(resource.RUSAGE_SELF)
            return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

        (run_dir / COST).write_text(json.dumps(measured(work)) + "\n")
    return json.loads((run_dir / "results.json").read_text()) | {"cost": read_cost(run_dir)}


def mae_row(run_dir: Path, finetune_dir: Path, overrides: list[str], train: bool = True) -> dict[str, Any]:
    """The MAE numbers from the shared pipeline's own outputs (pretraining run if absent)."""
    summary = run_dir / "summary.json"
    if not summary.is_file() and not train:
        return {"name": "mae (mnist_tiny)", "eval": {}, "missing": True}
    if not summary.is_file():
        log.info("no %s: running mae-pretrain (the shared pipeline's MNIST run)", summary)
        with (run_dir.parent / f"{run_dir.name}.log").open("w") as out:
            subprocess.run([sys.executable, "-m", "pretrain", f"run_dir={run_dir}", *overrides], check=True, cwd=ROOT,
                           stdout=out, stderr=subprocess.STDOUT)
    s = json.loads(summary.read_text())
    steps = s.get("steps")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = max((r["time"] for r in records if r.get("split") == "train"), default=None)
    best = finetune_dir / "best" / "best.json"
    cfg = _mae_config(run_dir)
    return {
        "name": "mae (mnist_tiny)", "params": _mae_params(cfg), "train_seconds": seconds, "steps": steps,
        "eval": {"mae_loss": s.get("eval_loss"), "mae_unit_mse": _unit_mse(cfg, s.get("eval_loss"))},
        "probe": {"top1": s.get("probe_top1")},
        "finetune": {"top1": json.loads(best.read_text())["top1"]} if best.is_file() else None,
    }


def _mae_config(run_dir: Path) -> Any:
    from pretrain.config import PretrainConfig

    return PretrainConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))


def _mae_params(cfg: Any) -> int:
    from pretrain.task import build_task

    chans = cfg.model.model_args()["in_chans"]
    task = build_task(cfg.model, image_mean=(0.5,) * chans, image_std=(0.5,) * chans)
    return sum(p.numel() for p in task.model.parameters())


def _unit_mse(cfg: Any, loss: float | None) -> float | None:
    """MAE's val loss in [0, 1] pixels: without ``norm_pix_loss`` it is the MSE of the
    dataset-normalized masked patches, so it scales by the variance of the normalization
    (mean over channels); a per-patch-normalized loss has no such conversion (None)."""
    if loss is None or cfg.model.norm_pix_loss:
        return None
    from launch.data import dataset_info

    info = dataset_info(cfg.data)
    std = cfg.data.std or info.std
    return loss * sum(v * v for v in std) / len(std)


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def probe_protocol(run_dir: Path) -> str | None:
    """``LARS, 5 epochs, batch 256, base lr 0.1`` from a run's saved config (None if not probed)."""
    path = run_dir / "config.yaml"
    probe = (yaml.safe_load(path.read_text()) or {}).get("probe") if path.is_file() else None
    if not probe:
        return None
    t = probe["trainer"]
    lr = f"lr {t['optim']['lr']}" if t["optim"].get("lr") else f"base lr {t['optim']['base_lr']}"
    return f"{t['optim']['name'].upper()}, {t['epochs']} epochs, batch {t['batch_size']}, {lr}"


def table_row(r: dict[str, Any], mark: str = "") -> str:
    ev, probe, ft = r.get("eval", {}), r.get("probe") or {}, r.get("finetune") or {}
    if not ev:
        recon = "—"
    elif "mae_loss" in ev and ev.get("mae_unit_mse") is not None:
        recon = f"{ev['mae_unit_mse']:.4f} / —*"
    elif "mae_loss" in ev:
        recon = f"{_num(ev['mae_loss'], '.3f')}**"
    else:
        recon = f"{_num(ev.get('mse'), '.4f')} / {_num(ev.get('bce'), '.3f')}"
        if "kl" in ev:
            recon += f" (ELBO {ev['recon'] + ev['kl']:.1f})"
    params = f"{r['params'] / 1e6:.2f} M" if r.get("params") else "—"
    seconds, cpu = r.get("train_seconds"), (r.get("cost") or {}).get("cpu_seconds")
    name = r["name"]
    shown = f"{name} (not run yet)" if r.get("missing") else name
    return (f"| {shown} | {recon} | {_num(probe.get('top1'), '.1f')}{mark} | {_num(ft.get('top1'), '.1f')} | {params} "
            f"| {r.get('steps', '—')} | {_num(seconds, '.0f')} | {_num(cpu, '.0f')} | {REFERENCE.get(name, '')} |")


def sweep_lines(sweep: dict[str, Any]) -> list[str]:
    rows = sweep["sweep"]
    return [
        "", "Latent-size sweep (`mae-baseline ae_sweep`, MLP AE; curve in "
        "`runs/baselines/ae_sweep/pictures/recon_vs_latent.png`):", "",
        "| latent size | " + " | ".join(str(r["latent_dim"]) for r in rows) + " |",
        "|---|" + "---|" * len(rows),
        "| val MSE | " + " | ".join(f"{r['eval']['mse']:.4f}" for r in rows) + " |",
    ] + (["| probe top-1 % | " + " | ".join(_num((r.get("probe") or {}).get("top1"), ".1f") for r in rows) + " |"]
         if any(r.get("probe") for r in rows) else [])


def render(rows: list[dict[str, Any]], sweep: dict[str, Any] | None) -> str:
    protocols = [r.get("probe_protocol") for r in rows]
    letters = {p: chr(ord("a") + i) for i, p in enumerate(dict.fromkeys(p for p in protocols if p))}
    marks = [f" ({letters[p]})" if p and r.get("probe") and len(letters) > 1 else "" for p, r in zip(protocols, rows)]
    lines = [
        START,
        "| model | val recon: MSE / BCE per pixel | linear probe top-1 % | fine-tune top-1 % | params | train steps "
        "| train s | run CPU s | reference (Keras, full MNIST) |",
        "|---|---|---|---|---|---|---|---|---|",
        *[table_row(r, m) for r, m in zip(rows, marks)],
    ]
    lines += [""] + [f"Probe ({letter}): {p}." if len(letters) > 1 else f"Linear probe (every row): {p}."
                     for p, letter in letters.items()]
    lines += sweep_lines(sweep) if sweep else []
    lines += cost_lines([*rows, *([sweep] if sweep else [])])
    return "\n".join([*lines, END])


def cost_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What the rows measured by this script cost: CPU and wall minutes, the load they ran under."""
    costs = [r["cost"] for r in rows if r.get("cost")]
    if not costs:
        return []
    loads = [c[k] for c in costs for k in ("load_start", "load_end")]
    return ["", f"Cost of the {len(costs)} runs above measured by this script: "
            f"{sum(c['cpu_seconds'] for c in costs) / 60:.1f} CPU-minutes, "
            f"{sum(c['wall_seconds'] for c in costs) / 60:.1f} wall-minutes, "
            f"1-minute load average {min(loads):.1f}-{max(loads):.1f} on 2 cores."]


def update_block(page: Path, block: str) -> None:
    """Replace the START ... END block of ``page``; the text around it is the page's own."""
    text = page.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{page} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    page.write_text(head + block + rest.split(END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="baselines_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", nargs="*", default=TABLE, help="baselines in the table")
    parser.add_argument("--run-root", type=Path, default=ROOT / "runs" / "baselines")
    parser.add_argument("--mae-run", type=Path, default=ROOT / "runs" / "mae-mnist")
    parser.add_argument("--finetune-run", type=Path, default=ROOT / "runs" / "finetune")
    parser.add_argument("--jobs", type=int, default=1, help="baselines trained at once")
    parser.add_argument("--rerun", action="store_true", help="train again even when results.json exists")
    parser.add_argument("--no-sweep", action="store_true", help="skip the latent-size sweep")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "baselines.md",
                        help="the page whose table block is rewritten")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every baseline (e.g. trainer.max_steps=100)")
    parser.add_argument("--render-only", action="store_true", help="train nothing: tabulate the results.json files present")
    parser.add_argument("--no-mae-run", action="store_true", help="do not pretrain MAE when its summary is missing")
    parser.add_argument("--mae-set", nargs="*", default=[], metavar="key=value", help="overrides for mae-pretrain when it has to run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    names = list(args.names) + ([] if args.no_sweep else [SWEEP])
    if args.render_only:
        done = {n: present(args.run_root, n) for n in [PIXELS, *names]}
        return write_table(args, done, mae_row(args.mae_run, args.finetune_run, [], train=False))
    overlay = probe_overlay(args.run_root)
    done = {PIXELS: pixels_row(args.run_root, overlay, args.rerun)}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        mae = pool.submit(mae_row, args.mae_run, args.finetune_run, args.mae_set, not args.no_mae_run)
        done |= dict(zip(names, pool.map(lambda n: run_baseline(n, args.run_root, overlay, args.rerun, args.set), names)))
        return write_table(args, done, mae.result())


def present(run_root: Path, name: str) -> dict[str, Any] | None:
    path = run_root / name / "results.json"
    return json.loads(path.read_text()) | {"cost": read_cost(run_root / name)} if path.is_file() else None


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
