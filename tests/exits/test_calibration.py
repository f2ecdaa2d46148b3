"""Calibration on a set of inputs: the target reproduced within the resolution the inputs allow, labels unused, the
bootstrap interval and its warning, and the fastest policy within an accuracy budget — each checked against an
exit rule recomputed here by hand."""

import math

import numpy as np
import pytest
import torch

from de3bert.data import get_task
from de3bert.errors import PolicyError
from de3bert.exits.calibration import (MIN_INPUTS, calibrate, calibrate_targets, default_promise, fastest_within,
                                       speedup_interval, trust_warning)
from de3bert.exits.outputs import LayerOutputs
from de3bert.model.config import EarlyExitConfig

SST2 = get_task("sst2")


def random_outputs(inputs: int, layers: int = 4, seed: int = 0, labelled: bool = True) -> LayerOutputs:
    """Logits growing more certain with depth; the last layer right on about 80 % of inputs."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (inputs,), generator=generator)
    sign = torch.where(torch.rand(inputs, generator=generator) < 0.8, 1.0, -1.0) * (2 * labels - 1)
    logits = []
    for layer in range(layers):
        margin = torch.randn(inputs, generator=generator) * 2 + sign * (layer + 1)
        logits.append(torch.stack([-margin / 2, margin / 2], -1))
    return LayerOutputs(torch.stack(logits), None, labels if labelled else torch.full((inputs,), -1))


def by_hand(outputs: LayerOutputs, criterion: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Exit layers (1-based) and predictions of a one-layer-confident criterion, recomputed with NumPy."""
    probs = torch.softmax(outputs.logits.double(), -1).numpy()  # (M, N, C)
    if criterion == "entropy":
        confident = (-(probs * np.log(np.clip(probs, 1e-30, None))).sum(-1) / math.log(probs.shape[-1])) < threshold
    else:  # confidence: max probability above τ
        confident = probs.max(-1) > threshold
    confident[-1] = True
    exits = confident.argmax(0)
    return exits + 1, probs.argmax(-1)[exits, np.arange(probs.shape[1])]


def hand_speedup(exits: np.ndarray, layers: int) -> float:
    return layers * len(exits) / exits.sum()


def every_threshold(outputs: LayerOutputs, criterion: str) -> list[float]:
    """Thresholds that give every distinct exit pattern: just past each indicator value, and the two extremes."""
    probs = torch.softmax(outputs.logits[:-1].double(), -1).numpy()
    if criterion == "entropy":
        values = (-(probs * np.log(np.clip(probs, 1e-30, None))).sum(-1) / math.log(2)).ravel()
        return [0.0, 1.0] + [min(1.0, v + 1e-6) for v in values]
    return [0.0, 1.0] + [max(0.0, v - 1e-6) for v in probs.max(-1).ravel()]


@pytest.mark.parametrize("criterion", ["entropy", "confidence"])
@pytest.mark.parametrize("inputs, seed", [(40, 0), (150, 1), (400, 2)])
@pytest.mark.parametrize("target", [1.3, 1.5, 2.0, 3.0])
def test_calibration_reproduces_the_target_within_the_resolution_of_the_inputs(criterion, inputs, seed, target):
    outputs = random_outputs(inputs, seed=seed)
    layers = outputs.num_layers
    reachable = sorted(hand_speedup(by_hand(outputs, criterion, t)[0], layers) for t in every_threshold(outputs, criterion))
    policy = calibrate(criterion, outputs, target)
    reached = hand_speedup(by_hand(outputs, criterion, policy.threshold)[0], layers)
    # the smallest speed-up at or above the target that any threshold gives on these inputs ...
    assert reached == pytest.approx(min(s for s in reachable if s >= target - 1e-9))
    # ... so it overshoots by less than one input moving all of its M − 1 skippable layers
    assert target - 1e-9 <= reached <= target + reached**2 * (layers - 1) / (layers * inputs) + 1e-9


def test_calibration_reads_no_labels():
    labelled, unlabelled = random_outputs(200, seed=4), random_outputs(200, seed=4, labelled=False)
    assert (unlabelled.labels == -1).all()
    for target in (1.5, 2.0, 3.0):
        assert calibrate("entropy", labelled, target) == calibrate("entropy", unlabelled, target)
    rows = calibrate_targets("entropy", unlabelled, (1.5, 2.0))
    assert all("metric" not in row for row in rows)


def test_an_unreachable_target_is_a_row_with_the_reachable_range():
    rows = calibrate_targets("entropy", random_outputs(100), (2.0, 9.0))
    assert rows[0]["speedup"] >= 2.0 and rows[1]["error"].startswith("criterion 'entropy' cannot reach a layer "
                                                                      "speed-up of 9x on this model; reachable range")
    with pytest.raises(PolicyError, match="cannot reach"):
        calibrate("patience", random_outputs(100), 4.5)


def test_the_bootstrap_interval_holds_the_speedup_and_narrows_with_more_inputs():
    small, large = random_outputs(60, seed=5), random_outputs(3000, seed=5)
    widths = []
    for outputs in (small, large):
        row = calibrate_targets("entropy", outputs, (2.0,), seed=7)[0]
        assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"] and row["examples"] == len(outputs.labels)
        assert calibrate_targets("entropy", outputs, (2.0,), seed=7)[0] == row  # seeded
        widths.append(row["speedup_high"] - row["speedup_low"])
    assert widths[1] < widths[0] / 3  # about sqrt(50) narrower
    assert speedup_interval(torch.full((50,), 3), 6) == (2.0, 2.0)  # every input at layer 3 of 6: no spread


def test_the_interval_matches_the_normal_approximation():
    exits = torch.randint(1, 7, (2000,), generator=torch.Generator().manual_seed(0))
    low, high = speedup_interval(exits, 6, resamples=2000)
    mean, sd = exits.double().mean(), exits.double().std() / math.sqrt(len(exits))
    expected = (6 / float(mean + 1.96 * sd), 6 / float(mean - 1.96 * sd))
    assert (low, high) == pytest.approx(expected, rel=0.01)


def test_too_few_inputs_or_a_wide_interval_or_a_coarse_criterion_warn():
    row = {"target_speedup": 2.0, "speedup": 2.01, "speedup_low": 1.97, "speedup_high": 2.05, "examples": 5000}
    assert trust_warning(row) is None
    assert "only 50 inputs (fewer than 100)" in trust_warning(row | {"examples": 50})
    assert "interval 1.80x to 2.30x is wider than ±5% of 2x" in trust_warning(row | {"speedup_low": 1.8,
                                                                                      "speedup_high": 2.3})
    coarse = trust_warning(row | {"speedup": 2.9})
    assert "the closest policy gives 2.90x" in coarse and coarse.endswith("may run more than 5% from 2x")
    assert MIN_INPUTS == 100
    assert "warning" in calibrate_targets("entropy", random_outputs(40), (2.0,))[0]
    assert "warning" not in calibrate_targets("entropy", random_outputs(20000, seed=3), (2.0,))[0]


@pytest.mark.parametrize("criterion", ["entropy", "confidence"])
@pytest.mark.parametrize("max_drop", [0.0, 1.0, 5.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_fastest_policy_within_the_budget_and_no_faster_one(criterion, max_drop, seed):
    outputs = random_outputs(80, seed=seed)
    layers, labels = outputs.num_layers, outputs.labels.numpy()
    full = float((outputs.predictions()[-1].numpy() == labels).mean())
    row = fastest_within(criterion, outputs, SST2, max_drop)
    exits, predictions = by_hand(outputs, criterion, row["threshold"])
    accuracy = float((predictions == labels).mean())
    assert row["metric"] == pytest.approx(accuracy) and accuracy >= full - max_drop / 100 - 1e-12
    assert row["speedup"] == pytest.approx(hand_speedup(exits, layers)) and row["exact"]
    assert row["full_depth_metric"] == pytest.approx(full)
    assert row["metric_drop"] == pytest.approx(100 * (full - accuracy))
    within = [hand_speedup(e, layers) for e, p in (by_hand(outputs, criterion, t)
                                                   for t in every_threshold(outputs, criterion))
              if (p == labels).mean() >= full - max_drop / 100 - 1e-12]
    assert row["speedup"] == pytest.approx(max(within))


def test_a_negative_budget_is_refused():
    with pytest.raises(PolicyError, match="max drop must be a number of points >= 0"):
        fastest_within("entropy", random_outputs(20), SST2, -1.0)


def test_the_default_promise_of_an_older_checkpoint_comes_from_its_selection():
    config = EarlyExitConfig(backbone={}, backbone_name="tiny", task="sst2", labels=["0", "1"],
                             policy={"criterion": "entropy", "threshold": 0.4, "patience": 1, "lam": 1.0},
                             policy_selection={"target_speedup": 2.0, "standings": [
                                 {"criterion": "edr", "speedup": 2.1}, {"criterion": "entropy", "speedup": 2.02}]})
    assert default_promise(config) == {"criterion": "entropy", "target_speedup": 2.0, "speedup": 2.02,
                                       "inputs": "the training run's calibration split"}
    config.calibrated_speedup = {"criterion": "entropy", "target_speedup": 1.5, "speedup": 1.51, "inputs": "x.csv"}
    assert default_promise(config)["inputs"] == "x.csv"
    assert default_promise(EarlyExitConfig(backbone={}, backbone_name="tiny", task="sst2", labels=["0", "1"])) is None
