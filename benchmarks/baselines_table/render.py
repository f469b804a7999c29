"""The Markdown block: one row per run, the probe protocol(s), the latent sweep, what the runs
cost; and its replacement between ``START`` and ``END`` in the results page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launch.fileio import write_atomic

START, END = "<!-- baselines-table:start -->", "<!-- baselines-table:end -->"

#: the public Keras study on full MNIST (60,000 training digits) quoted in the issue
REFERENCE = {
    "ae2d": "784→2 AE (tanh): MSE ≈ 0.0685",
    "cae": "conv AE: BCE ≈ 0.07; + classifier ≈ 99 %",
    "sdae": "stacked DAE + classifier ≈ 95 %",
    "vae": "VAE, 2-D latent: BCE + KL ≈ 145",
}


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


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
    return (
        f"| {shown} | {recon} | {_num(probe.get('top1'), '.1f')}{mark} | {_num(ft.get('top1'), '.1f')} | {params} "
        f"| {r.get('steps', '—')} | {_num(seconds, '.0f')} | {_num(cpu, '.0f')} | {REFERENCE.get(name, '')} |"
    )


def sweep_lines(sweep: dict[str, Any]) -> list[str]:
    rows = sweep["sweep"]
    return [
        "",
        "Latent-size sweep (`mae-baseline ae_sweep`, MLP AE; curve in "
        "`runs/baselines/ae_sweep/pictures/recon_vs_latent.png`):",
        "",
        "| latent size | " + " | ".join(str(r["latent_dim"]) for r in rows) + " |",
        "|---|" + "---|" * len(rows),
        "| val MSE | " + " | ".join(f"{r['eval']['mse']:.4f}" for r in rows) + " |",
    ] + (
        ["| probe top-1 % | " + " | ".join(_num((r.get("probe") or {}).get("top1"), ".1f") for r in rows) + " |"]
        if any(r.get("probe") for r in rows)
        else []
    )


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
    lines += [""] + [
        f"Probe ({letter}): {p}." if len(letters) > 1 else f"Linear probe (every row): {p}."
        for p, letter in letters.items()
    ]
    lines += sweep_lines(sweep) if sweep else []
    lines += cost_lines([*rows, *([sweep] if sweep else [])])
    return "\n".join([*lines, END])


def cost_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What the rows measured by this script cost: CPU and wall minutes, the load they ran under."""
    costs = [r["cost"] for r in rows if r.get("cost")]
    if not costs:
        return []
    loads = [c[k] for c in costs for k in ("load_start", "load_end")]
    return [
        "",
        f"Cost of the {len(costs)} runs above measured by this script: "
        f"{sum(c['cpu_seconds'] for c in costs) / 60:.1f} CPU-minutes, "
        f"{sum(c['wall_seconds'] for c in costs) / 60:.1f} wall-minutes, "
        f"1-minute load average {min(loads):.1f}-{max(loads):.1f} on 2 cores.",
    ]


def update_block(page: Path, block: str) -> None:
    """Replace the START ... END block of ``page``; the text around it is the page's own."""
    text = page.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{page} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    write_atomic(page, head + block + rest.split(END, 1)[1])
