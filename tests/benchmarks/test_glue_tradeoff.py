"""The GLUE trade-off study script: per-run evaluation on a tiny checkpoint and the seed aggregation."""

import copy
import json

import pytest

from benchmarks import glue_tradeoff
from benchmarks.glue_tradeoff import Run, ablation_table, aggregate, evaluate_run, markdown_table, plan, plot_task
from de3bert.apps.cli import main


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
    stsb = plan("stsb")
    assert {(r.recipe, r.seed) for r in stsb} == {(m, s) for m in ("pabee", "deebert") for s in (42, 43, 44)}
    prototypes = plan("prototypes")
    assert len({r.name for r in prototypes}) == len(prototypes) and {r.recipe for r in prototypes} == {"de3"}
    side_by_side = {(r.backbone, r.task, r.seed) for r in prototypes if r.variant == "ema"}
    assert side_by_side == {(r.backbone, r.task, r.seed) for r in prototypes if r.variant == "learned"}
    assert {(t, s) for b, t, s in side_by_side if b == "minilm-l6"} == {(r.task, r.seed) for r in main}
    assert {t for b, t, _ in side_by_side if b == "mpnet-base"} == {"sst2", "rte"}
    assert len({r.overrides["prototype_momentum"] for r in prototypes if "prototype_momentum" in r.overrides}) >= 3


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
    assert {row["layer"] for row in summary["geometry"]["tiny-sst2"]} == {1, 2, 3}  # no prototypes on layer 4


def test_the_prototypes_plan_reports_both_kinds_side_by_side(tiny_checkpoint, glue_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(glue_tradeoff, "RESULTS", tmp_path)  # no earlier study to set beside it
    report = evaluate_run(Run("sst2", "tiny", "de3", 42, "ema"), tiny_checkpoint, str(glue_dir))
    learned = copy.deepcopy(report) | {"variant": "learned", "run": "tiny-sst2-de3-learned-s42", "full_depth": 0.25}
    (tmp_path / "runs").mkdir()
    for data in (report, learned):
        (tmp_path / "runs" / f"{data['run']}.json").write_text(json.dumps(data))
    tables = glue_tradeoff.prototype_tables(aggregate(tmp_path))
    assert "| DE³ (EDR) | running means |" in tables and "| DE³ (EDR) | learned |" in tables
    assert "| full depth / oracle | learned | 25.0 (1.00x)" in tables
    assert "| running means | 3 |" in tables and "| learned | 4 |" not in tables  # geometry of layers 1–3
    glue_tradeoff.plot_prototypes(aggregate(tmp_path), "tiny", "sst2", tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def write_stsb(folder, size: int = 48):
    """A tiny STS-B in the official layout: the score is 5 for identical sentences, 0 for unrelated ones."""
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    task = folder / "STS-B"
    task.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        rows = [header] + [f"{i}\tg\tf\ty\t{i}\tnone\tnone\ta cat sat\t{'a cat sat' if i % 2 else 'stocks fell'}"
                           f"\t{5.0 * (i % 2):.3f}" for i in range(size)]
        (task / name).write_text("\n".join(rows) + "\n")
    return folder


def test_regression_run_is_evaluated_with_regression_patience(tiny_backbone_dir, tmp_path, capsys):
    glue = write_stsb(tmp_path / "glue")
    folder = tmp_path / "stsb-pabee"
    assert main(["train", "--task", "stsb", "--model", str(tiny_backbone_dir), "--recipe", "pabee", "--output",
                 str(folder), "--epochs", "1", "--batch-size", "16", "--data-dir", str(glue), "--no-progress"]) == 0
    # 4 layers, patience 2: the 2x default target is out of reach, and training says so once, with the range
    assert "cannot reach a layer speed-up of 2x on this model; reachable range is 1.00x to 1.33x; the default exit " \
           "policy is the fastest reachable one\n" in capsys.readouterr().out
    report = evaluate_run(Run("stsb", "tiny", "pabee", 42), folder, str(glue))
    assert report["metric"] == "pearson" and report["oracle"] is None and "separation" not in report
    assert set(report["methods"]) == {label for label, _, _ in glue_tradeoff.REGRESSION_METHODS["pabee"]}
    # 4 layers: patience 1 can exit at layer 2 (up to 2x), patience 2 at layer 3 at the earliest (1.33x)
    patience_one = report["methods"]["PABEE (regression patience t=1)"]
    assert {r["criterion"] for r in patience_one if "error" not in r} == {"regression-patience"}
    assert all(r["patience"] == 1 and r["speedup"] <= 2.0 for r in patience_one if "error" not in r)
    assert all("cannot reach" in r["error"] for r in report["methods"]["PABEE (regression patience t=2)"])
    (tmp_path / "study" / "runs").mkdir(parents=True)
    (tmp_path / "study" / "runs" / "tiny-stsb-pabee-s42.json").write_text(json.dumps(report))
    summary = aggregate(tmp_path / "study")
    assert "| PABEE (regression patience t=1) |" in markdown_table(summary)
    plot_task(summary, "tiny", "stsb", tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
