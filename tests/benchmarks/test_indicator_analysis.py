"""The indicator analysis script: per-layer separation, scales and prototype geometry of a DE³ checkpoint."""

import json
import math

import pytest
import torch

from benchmarks import indicator_analysis
from de3bert.data import encode_examples, load_split
from de3bert.evaluation.run_data import calibration_examples
from de3bert.evaluation.separation import indicator_auroc
from de3bert.exits.calibration import calibrated_table
from de3bert.exits.outputs import LayerOutputs, collect_layer_outputs
from de3bert.model.modeling import EarlyExitModel


def test_analysis_agrees_with_the_library_auroc_and_writes_results(tiny_checkpoint, glue_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(indicator_analysis, "RESULTS", tmp_path)
    report = indicator_analysis.run("tiny", tiny_checkpoint, str(glue_dir))
    written = json.loads((tmp_path / "tiny.json").read_text())
    assert written["layers"] == report["layers"] and len(report["layers"]) == 3  # no prototypes on the last layer
    assert written["backbone"] == EarlyExitModel.from_pretrained(tiny_checkpoint).config.backbone_name
    assert (tmp_path / "tiny.png").stat().st_size > 10_000

    model = EarlyExitModel.from_pretrained(tiny_checkpoint)
    dev = collect_layer_outputs(model, encode_examples(model.tokenizer, load_split("sst2", "dev", str(glue_dir))[1],
                                                       model.config.max_length))
    for criterion, key in (("edr", "edr λ=1"), ("entropy", "entropy"), ("dr", "dr")):
        expected = indicator_auroc(criterion, dev)[:3]
        got = [row["auroc"][key] for row in report["layers"]]
        assert got == pytest.approx(expected, abs=1e-9)
    for row in report["layers"]:
        assert 0.0 <= row["median_dr"] <= 1.0 and 0.0 <= row["median_entropy"] <= 1.0
        assert 0.0 <= row["disagreement_rate"] <= 1.0 and row["prototype_separation"] > 0


def test_prototype_entropy_reads_the_margin_where_dr_reads_the_ratio():
    """Two inputs on class 1's side: one near its prototype, one far out. DR (scale-free r1/r2) calls the far one
    less certain; the entropy of q = softmax(−r) sees its larger margin r2 − r1 and calls it more certain."""
    logits = torch.tensor([[[0.0, 2.0], [0.0, 4.0]]])  # (M=1, N=2, C=2), both predict class 1
    distances = torch.tensor([[[4.0, 1.0], [400.0, 300.0]]])  # near: r1/r2 = 1/4, margin 3; far: 3/4, margin 100
    features = indicator_analysis.layer_features(LayerOutputs(logits, distances, torch.tensor([1, 1])), 0)
    assert features["dr"][0] == pytest.approx(0.125) and features["dr"][1] == pytest.approx(0.375)
    assert features["prototype_entropy"][1] < features["prototype_entropy"][0]
    q_near = torch.softmax(torch.tensor([-4.0, -1.0]), -1)
    assert features["prototype_entropy"][0] == pytest.approx(float(-(q_near * q_near.log()).sum() / math.log(2)))


def test_calibrated_exits_by_entropy_equal_the_library_calibration(tiny_checkpoint, glue_dir):
    """The analysis's own first-exit simulation agrees with calibrated_table for a criterion both know."""
    model = EarlyExitModel.from_pretrained(tiny_checkpoint)
    encode = lambda examples: encode_examples(model.tokenizer, examples, model.config.max_length)  # noqa: E731
    task, dev_examples = load_split("sst2", "dev", str(glue_dir))
    dev = collect_layer_outputs(model, encode(dev_examples))
    calibration = collect_layer_outputs(model, encode(calibration_examples(model, "sst2", str(glue_dir), None)[1]))
    ours = indicator_analysis.calibrated_exits("entropy", calibration, dev, task)
    library = calibrated_table(("entropy",), calibration, dev, task)
    assert [r["target_speedup"] for r in ours] == [r["target_speedup"] for r in library]
    assert any(r["metric"] is not None for r in ours)
    for mine, theirs in zip(ours, library):
        if mine["metric"] is None:
            assert "error" in theirs
        else:
            assert (mine["metric"], mine["speedup"]) == pytest.approx((theirs["metric"], theirs["speedup"]))
