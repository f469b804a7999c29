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

One job per module: :mod:`.jobs` runs what is missing into ``run_root``, :mod:`.rows` reads
the run folders into table rows (converting MAE's metrics), :mod:`.render` writes the Markdown
block into the results page, ``__main__`` is the command line.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLE = ["ae", "ae_relu", "ae2d", "dae", "dae_mask", "sdae", "cae", "vae", "vae_conv", "aae", "aae_mog"]
SWEEP = "ae_sweep"
#: the raw-pixel probe's folder under run_root, and each run's cost file (written by the jobs)
PIXELS, COST = "pixels", "table_cost.json"
