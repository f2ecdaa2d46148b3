import pytest
import torch

from de3bert.data import get_task
from de3bert.errors import DataError, PolicyError
from de3bert.evaluation.report import evaluate_checkpoint, oracle, sweep
from de3bert.evaluation.separation import indicator_auroc
from de3bert.exits.calibration import (calibrate, calibrated_table, candidate_policies, choose_policy, describe_choice,
                                       evaluate_policy, most_conservative)
from de3bert.exits.outputs import LayerOutputs, layer_metrics
from de3bert.exits.policies import ExitPolicy

SST2 = get_task("sst2")


def logits_for(predictions, margin):
    """(M, N, 2) logits whose argmax is predictions[m][n], with confidence growing with margin[m]."""
    rows = [[[margin[m], 0.0] if p == 0 else [0.0, margin[m]] for p in layer] for m, layer in enumerate(predictions)]
    return torch.tensor(rows)


def three_layer_outputs():
    # sample 0 right from layer 1; sample 1 right from layer 2; sample 2 right only at layer 3; sample 3 never
    predictions = [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0]]
    labels = torch.tensor([0, 1, 1, 1])
    return LayerOutputs(logits_for(predictions, [0.5, 2.0, 6.0]), None, labels)


def test_layer_metrics_and_oracle_hand_computed():
    outputs = three_layer_outputs()
    assert [row["accuracy"] for row in layer_metrics(outputs, SST2)] == [0.25, 0.5, 0.75]
    best = oracle(outputs, SST2)
    # exits at layers 1, 2, 3, 3 -> speed-up 3*4/9; 3 of 4 right
    assert best["speedup"] == pytest.approx(12 / 9)
    assert best["accuracy"] == pytest.approx(0.75)


def test_sweep_spans_full_depth_to_first_layer():
    outputs = three_layer_outputs()
    rows = sweep("entropy", outputs, SST2)
    assert rows[0]["speedup"] == pytest.approx(1.0)
    assert rows[-1]["speedup"] == pytest.approx(3.0)
    assert rows[0]["accuracy"] == pytest.approx(0.75)
    patience_rows = sweep("patience", outputs, SST2)
    assert [r["patience"] for r in sorted(patience_rows, key=lambda r: -r["speedup"])] == [1, 2]


def test_calibrate_picks_most_conservative_threshold_reaching_target():
    outputs = three_layer_outputs()
    policy = calibrate("entropy", outputs, 1.2)
    row = evaluate_policy(policy, outputs, SST2)
    assert row["speedup"] >= 1.2
    speedups = sorted(r["speedup"] for r in sweep("entropy", outputs, SST2, points=200))
    assert row["speedup"] == pytest.approx(min(s for s in speedups if s >= 1.2))


def test_calibrate_unreachable_target_names_reachable_range():
    with pytest.raises(PolicyError, match=r"reachable range is 1\.00x to 3\.00x"):
        calibrate("entropy", three_layer_outputs(), 5.0)


def test_unreachable_target_range_is_rounded_inwards():
    scored = [(1.004, ExitPolicy("entropy", 0.1)), (2.996, ExitPolicy("entropy", 0.9))]
    with pytest.raises(PolicyError, match=r"reachable range is 1\.01x to 2\.99x"):
        most_conservative(scored, "entropy", 3.0)


def test_calibrated_table_reports_errors_per_row():
    outputs = three_layer_outputs()
    rows = calibrated_table(("entropy",), outputs, outputs, SST2, targets=(1.5, 9.0))
    assert rows[0]["speedup"] >= 1.5 and "error" in rows[1]


def test_candidate_thresholds_stay_in_unit_interval():
    outputs = three_layer_outputs()
    for criterion in ("entropy", "confidence", "pcee"):
        assert all(0.0 <= p.threshold <= 1.0 for p in candidate_policies(criterion, outputs))


def test_indicator_auroc_hand_computed():
    # one layer, 4 samples; labels 0,0,1,1; predictions 0,1,1,0 -> correct: T, F, T, F
    # margins 3, 1, 2, 0.5 -> entropy lowest for sample 0, then 2, 1, 3: both correct rank above both wrong
    logits = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.5, 0.0]]])
    outputs = LayerOutputs(logits, None, torch.tensor([0, 0, 1, 1]))
    assert indicator_auroc("entropy", outputs) == [pytest.approx(1.0)]
    assert indicator_auroc("confidence", outputs) == [pytest.approx(1.0)]
    # swap which answers are right: the certain ones are now wrong
    flipped = LayerOutputs(logits, None, torch.tensor([1, 1, 0, 0]))
    assert indicator_auroc("entropy", flipped) == [pytest.approx(0.0)]


def test_indicator_auroc_undefined_when_all_answers_agree():
    logits = torch.tensor([[[3.0, 0.0], [2.0, 0.0]]])
    assert indicator_auroc("entropy", LayerOutputs(logits, None, torch.tensor([0, 0]))) == [None]


def test_regression_tolerances_above_one_reach_the_earliest_exit():
    """Scores change by up to 3.7 between layers: the largest change must still fit under some calibrated τ, so
    patience 1 can send every input out at layer 2 (3x on 6 layers) — float32 rounds a fixed 1e-7 step away."""
    torch.manual_seed(0)
    scores = torch.cumsum(torch.rand(6, 50, 1) * 3.7, 0)  # (M, N, 1) regression outputs
    outputs = LayerOutputs(scores, None, torch.rand(50) * 5)
    policy = calibrate("regression-patience", outputs, 3.0, patience=1)
    assert evaluate_policy(policy, outputs, get_task("stsb"))["speedup"] == pytest.approx(3.0)


def two_layer_outputs(entropy_knows: bool) -> LayerOutputs:
    """8 inputs, right at layer 2; at layer 1 inputs 0–3 are right and 4–7 wrong. One indicator ranks the right ones
    as certain, the other the wrong ones: entropy when `entropy_knows`, the distance ratio otherwise."""
    labels = torch.tensor([0] * 8)
    certain, doubtful = [6.0, 0.0], [0.3, 0.0]
    first = [certain if (i < 4) == entropy_knows else doubtful for i in range(8)]
    first = [row if i < 4 else row[::-1] for i, row in enumerate(first)]  # 4–7 predict class 1 (wrong)
    logits = torch.tensor([first, [[5.0, 0.0]] * 8])
    near, far = [1.0, 9.0], [4.0, 5.0]  # DR 0.06 (certain) and 0.4 (doubtful) for the predicted class
    dr_certain = [(i >= 4) == entropy_knows for i in range(8)]
    distances = torch.tensor([[(near if c else far) if i < 4 else (near if c else far)[::-1]
                               for i, c in enumerate(dr_certain)]])
    return LayerOutputs(logits, distances, labels)


@pytest.mark.parametrize("entropy_knows, winner", [(True, "entropy"), (False, "dr")])
def test_entropy_stays_the_default_unless_another_criterion_beats_it_beyond_noise(entropy_knows, winner):
    outputs = two_layer_outputs(entropy_knows)
    policy, record = choose_policy(("dr", "entropy"), outputs, SST2, 4 / 3, preferred="dr")
    assert policy.criterion == record["criterion"] == winner and record["reference"] == "entropy"
    best, other = record["standings"]
    assert (best["criterion"], best["metric"]) == (winner, 1.0) and other["metric"] == 0.5
    assert evaluate_policy(policy, outputs, SST2)["accuracy"] == 1.0
    dr = next(row for row in record["standings"] if row["criterion"] == "dr")
    # dr is right on 4 inputs more of 8: its margin is ±0.5, and the paired interval stays on that side of 0
    assert dr["margin"] == (-0.5 if entropy_knows else 0.5)
    assert (dr["margin_high"] < 0) if entropy_knows else (dr["margin_low"] > 0)
    assert dr["margin_low"] <= dr["margin"] <= dr["margin_high"]
    summary = describe_choice(record)
    if winner == "dr":
        assert summary.startswith("dr beats the reference entropy beyond noise on the calibration split at 1.33x "
                                  "(calibration accuracy 1.0000 at ")
        assert "+0.5000 (95% interval +0." in summary and "paired bootstrap over 8 examples" in summary
    else:
        assert summary.startswith("entropy, the reference, is kept on the calibration split at 1.33x")
        assert "the closest, dr, -0.5000 (95% interval -" in summary
    forced, record = choose_policy(("dr", "entropy"), outputs, SST2, 4 / 3, preferred="entropy", forced=True)
    assert forced.criterion == "entropy" and record["forced"]
    assert describe_choice(record).startswith("entropy, as asked by --criterion")


def test_an_advantage_within_noise_keeps_the_reference():
    """dr is right on one input more of 8 than entropy: better on the calibration split, but not beyond noise."""
    outputs = two_layer_outputs(False)
    outputs.logits[0, 5:] = torch.tensor([6.0, 0.0])  # entropy's certain exits 5-7 become right; 4 stays wrong
    policy, record = choose_policy(("dr", "entropy"), outputs, SST2, 4 / 3, preferred="dr")
    dr = next(row for row in record["standings"] if row["criterion"] == "dr")
    assert dr["margin"] == 0.125 and dr["margin_low"] <= 0
    assert policy.criterion == "entropy" and "no criterion beats it beyond noise" in record["summary"]


def test_the_margins_are_reproducible_by_seed():
    outputs = two_layer_outputs(False)
    first = choose_policy(("dr", "entropy"), outputs, SST2, 4 / 3, preferred="dr", seed=3)[1]
    again = choose_policy(("dr", "entropy"), outputs, SST2, 4 / 3, preferred="dr", seed=3)[1]
    assert first == again


def test_a_tie_keeps_the_reference_and_an_unreachable_target_gives_its_fastest_policy():
    outputs = three_layer_outputs()
    policy, record = choose_policy(("entropy", "confidence"), outputs, SST2, 1.2, preferred="confidence")
    assert record["standings"][0]["metric"] == record["standings"][1]["metric"]  # two classes: the same exits
    assert policy.criterion == "entropy" and record["standings"][0]["criterion"] == "entropy"
    confidence = record["standings"][1]
    assert confidence["margin"] == confidence["margin_low"] == confidence["margin_high"] == 0.0
    assert record["summary"].endswith("is kept on the calibration split at 1.2x (calibration accuracy 0.5000 at "
                                      "1.50x): the other criteria give the same answers")
    policy, record = choose_policy(("entropy", "confidence"), outputs, SST2, 5.0, preferred="entropy")
    assert policy.criterion == "entropy" and all("error" in row for row in record["standings"])
    assert evaluate_policy(policy, outputs, SST2)["speedup"] == pytest.approx(3.0)


def test_an_older_record_without_margins_is_still_described():
    record = {"criterion": "entropy", "preferred": "edr", "forced": False, "target_speedup": 2.0, "metric": "accuracy",
              "standings": [{"criterion": "entropy", "metric": 0.9, "speedup": 2.01},
                            {"criterion": "edr", "metric": 0.88, "speedup": 2.0}]}
    assert describe_choice(record) == ("entropy scores best on the calibration split at 2x (calibration accuracy "
                                       "0.9000 at 2.01x), +0.0200 against edr")


def test_a_glue_model_scores_a_labelled_file_written_with_values_or_names(tiny_checkpoint, tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("sentence,label\nthe film was good great,positive\nthe film was awful dull,0\nnice lovely,1\n")
    report = evaluate_checkpoint(tiny_checkpoint, eval_file=path, progress=False)  # the data folder is recorded
    assert (report["evaluated_on"], report["eval_examples"]) == ("mine.csv", 3)
    assert report["class_counts"] == {"negative": 1, "positive": 2}
    assert report["calibration_split"] == "calibration (held out from train)"
    with pytest.raises(DataError, match="task sst2 has no split 'test'; its splits are train, dev"):
        evaluate_checkpoint(tiny_checkpoint, split="test", progress=False)
