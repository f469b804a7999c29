"""mae-bench runs end to end on a tiny config and writes the documented JSON fields (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import main
from benchmarks.hf_compare import build_hf_model
from benchmarks.model_step import count_params
from benchmarks.project import Workload
from benchmarks.visible_only import MaskTokensInEncoder

TINY = [
    "img_size=32",
    "batch_size=2",
    "warmup=1",
    "steps=1",
    "repeats=2",
    "threads=1",
    "model_overrides={depth: 1, decoder_depth: 1}",
]
MEASUREMENT = {
    "name",
    "images_per_s",
    "images_per_cpu_s",
    "step_ms",
    "runs_images_per_s",
    "warmup_s",
    "peak_memory_mb",
    "flops_per_image",
    "achieved_tflops",
    "mfu",
    "params_m",
    "info",
}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    code = main(
        [
            *TINY,
            "presets=[mae_vit_tiny]",
            "visible_presets=[mae_vit_tiny]",
            "levers=[bf16,boolean,item,where-masked]",
            "loader_workers=[0]",
            "loader_images=32",
            f"out={out}",
        ]
    )
    assert code == 0
    return json.loads(out.read_text())


def test_meta_records_machine_and_load(result: dict) -> None:
    meta = result["meta"]
    assert {
        "time_utc",
        "torch",
        "device",
        "torch_threads",
        "loadavg_start",
        "loadavg_end",
        "memory_kind",
        "config",
    } <= set(meta)
    assert meta["torch_threads"] == 1 and meta["memory_kind"] == "process_peak_rss"


def test_presets_rows_hold_throughput_flops_and_memory(result: dict) -> None:
    (row,) = result["presets"]
    assert MEASUREMENT | {"preset", "settings", "batch_size"} <= set(row)
    assert row["images_per_s"] > 0 and row["peak_memory_mb"] > 0 and len(row["runs_images_per_s"]) == 2
    assert row["flops_per_image"] > 0 and row["mfu"] is None  # no peak FLOP/s known for a CPU


def test_hf_comparison_pairs_identical_architectures(result: dict) -> None:
    hf = result["hf"]
    assert {"eager_fp32", "defaults", "both_bf16_eager"} <= set(hf["speedups"])
    assert all(v["speedup"] > 0 and v["speedup_cpu_time"] > 0 for v in hf["speedups"].values())
    params = {r["info"]["impl"]: r["params_m"] for r in hf["rows"]}
    assert params["project"] == pytest.approx(params["hf"])
    assert all(MEASUREMENT <= set(r) for r in hf["rows"])


def test_visible_only_and_levers_sections(result: dict) -> None:
    (vis,) = result["visible_only"]
    assert vis["flops_ratio"] > 1 and vis["wallclock_speedup"] > 0
    levers = result["levers"]["rows"]
    assert levers[0]["lever"].startswith("baseline") and levers[0]["speedup"] == 1.0
    assert {
        "bf16 autocast",
        "boolean-mask loss",
        "loss.item() every step",
        "predict all patches, where-masked loss",
    } <= {r["lever"] for r in levers}
    assert all({"speedup", "pays", "images_per_s", "settings"} <= set(r) for r in levers)


def test_loader_section_relates_loader_to_model_demand(result: dict) -> None:
    loader = result["loader"]
    (row,) = loader["rows"]
    assert row["workers"] == 0 and row["images_per_s_per_worker"] > 0
    where = {d["where"] for d in loader["demand"]}
    assert any(w.startswith("measured") for w in where) and any("computed" in w for w in where)
    assert all(d["ratio"] > 0 and d["workers_needed"] >= 1 for d in loader["demand"])


def test_gpu_table_is_labelled_computed(result: dict) -> None:
    rows = result["gpu"]
    assert {r["preset"] for r in rows} == {"mae_vit_base", "mae_vit_large", "mae_vit_huge"}
    assert all(r["computed_not_measured"] and r["expected_images_per_s"] > 0 for r in rows)


def test_hf_model_has_the_project_architecture() -> None:
    work = Workload("mae_vit_tiny", batch_size=2, img_size=32, overrides=(("depth", 2),))
    ours, theirs = work.build(), build_hf_model(work)
    assert count_params(ours) == count_params(theirs)
    assert theirs.config.norm_pix_loss and theirs.config.mask_ratio == 0.75


def test_mask_tokens_in_encoder_variant_matches_shapes_and_trains() -> None:
    model = Workload("mae_vit_tiny", batch_size=2, img_size=32, overrides=(("depth", 1),)).build()
    ablation = MaskTokensInEncoder(model)
    imgs = torch.randn(2, 3, 32, 32)
    pred, ids = ablation(imgs, 0.75)
    ref_pred, ref_mask = model(imgs, 0.75)
    assert pred.shape == (2, int(ref_mask[0].sum()), ref_pred.shape[-1]) and ids.shape == pred.shape[:2]
    pred.sum().backward()
    assert ablation.encoder_mask_token.grad is not None


def test_bad_device_is_a_one_line_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cuda", f"out={tmp_path / 'x.json'}"])
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_op_profile_tables_both_steps_per_operator() -> None:
    from benchmarks.hf_compare import hf_contender
    from benchmarks.model_step import Settings
    from benchmarks.op_profile import profile_steps, render
    from benchmarks.project import project_contender

    work, cpu = Workload("mae_vit_tiny", 2, 32, overrides=(("depth", 1), ("decoder_depth", 1))), torch.device("cpu")
    steps = {"project": project_contender(work, Settings(), cpu).step, "hf": hf_contender(work, Settings(), cpu).step}
    tables = profile_steps(steps, rounds=2)
    for table in tables.values():  # every step multiplies matrices and takes one AdamW step
        assert table["aten::mm"][0] > 0 and table["Optimizer.step#AdamW.step"][1] == 1
    text = render(tables, rows=5)
    assert len(text.splitlines()) == 2 + 5 + 1 and "project" in text and "hf" in text
