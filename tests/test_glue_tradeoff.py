"""The GLUE trade-off study script: per-run evaluation on a tiny checkpoint and the seed aggregation."""

import copy
import json

import pytest

from benchmarks import glue_tradeoff
from benchmarks.glue_tradeoff import Run, ablation_table, aggregate, evaluate_run, markdown_table, plan, plot_task


def test_plans_cover_every_recipe_and_seed():
    main = plan("main")
    assert {r.recipe for r in main} == {"de3", "pabee", "deebert"}
    assert {r.seed for r in main if r.task == "rte"} == {42, 43, 44}
    assert len({r.name for r in main}) == len(main)
    assert all(r.recipe == "de3" and r.variant for r in plan("ablations"))
    mpnet = plan("mpnet")
    assert {(r.task, r.recipe) for r in mpnet} == {(t, m) for t in ("sst2", "rte") for m in ("de3", "pabee", "deebert")}
    assert all(r.backbone == "mpnet-base" for r in mpnet)
    assert {r.overrides["max_train_samples"] for r in mpnet if r.task == "sst2"} == {2000}  # subsampled, said in docs


def test_evaluate_run_and_aggregate_over_seeds(tiny_checkpoint, glue_dir, tmp_path):
    report = evaluate_run(Run("sst2", "tiny", "de3", 42), tiny_checkpoint, str(glue_dir))
    assert set(report["methods"]) == {label for label, _, _ in glue_tradeoff.METHODS["de3"]}
    assert set(report["separation"]) == {"edr", "entropy", "dr", "confidence"}
    assert len(report["layer_metrics"]) == 4
    (tmp_path / "runs").mkdir()
    second = copy.deepcopy(report)
    second["seed"], second["run"] = 43, "tiny-sst2-de3-s43"
    second["full_depth"] = report["full_depth"] - 0.1
    variant = copy.deepcopy(report)
    variant["variant"], variant["run"] = "cosine", "tiny-sst2-de3-cosine-s42"
    for data in (report, second, variant):
        (tmp_path / "runs" / f"{data['run']}.json").write_text(json.dumps(data))
    summary = aggregate(tmp_path)
    full = next(c for c in summary["cells"] if c["method"] == "full depth (de3)")
    assert full["metric"]["n"] == 2
    assert full["metric"]["mean"] == pytest.approx(report["full_depth"] - 0.05)
    assert full["metric"]["std"] == pytest.approx(0.0707, abs=1e-3)
    table = markdown_table(summary)
    assert "**tiny / sst2**" in table and "| full depth (de3) |" in table and "cosine" not in table
    variants = ablation_table(summary)
    row = next(line for line in variants.splitlines() if line.startswith("| tiny / sst2 / cosine |"))
    assert f"| {100 * report['full_depth']:.1f} |" in row
    auroc = [v for v in report["separation"]["edr"] if v is not None]
    assert f"{sum(auroc) / len(auroc):.3f}" in row
    plot_task(summary, "tiny", "sst2", tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
