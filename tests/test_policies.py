import math

import pytest
import torch

from de3bert.errors import PolicyError
from de3bert.heads import HeadOutput
from de3bert.policies import (ExitPolicy, distance_ratio, hybrid_indicator, max_probability, normalized_entropy,
                              simulate_exits, speedup_ratio)


def test_normalized_entropy_hand_computed():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]])
    expected = torch.tensor([1.0, 0.0, -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)])
    assert torch.allclose(normalized_entropy(probs), expected, atol=1e-6)
    assert normalized_entropy(torch.full((1, 3), 1 / 3)).item() == pytest.approx(1.0)


def test_max_probability():
    assert torch.equal(max_probability(torch.tensor([[0.2, 0.8], [0.6, 0.4]])), torch.tensor([0.8, 0.6]))


def test_distance_ratio_agreement_and_disagreement():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    distances = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    ratio = distance_ratio(probs, distances)
    assert ratio[0].item() == pytest.approx(0.5 * (1 + (1 - 3) / 3))  # agrees: 1/6
    assert ratio[1].item() == pytest.approx(0.5 * (1 + (3 - 1) / 3))  # disagrees: 5/6
    assert ratio[1] > 0.5 > ratio[0]


def test_distance_ratio_three_classes_uses_nearest_other():
    probs = torch.tensor([[0.1, 0.8, 0.1]])
    distances = torch.tensor([[2.0, 4.0, 8.0]])  # predicted class 1: r1 = 4, r2 = 2
    assert distance_ratio(probs, distances).item() == pytest.approx(0.5 * (1 + 2 / 4))


def test_distance_ratio_zero_distances_is_half():
    assert distance_ratio(torch.tensor([[0.6, 0.4]]), torch.zeros(1, 2)).item() == pytest.approx(0.5)


def test_hybrid_indicator_hand_computed_and_lambda():
    entropy, ratio = torch.tensor([0.5]), torch.tensor([0.25])
    assert hybrid_indicator(entropy, ratio, 1.0).item() == pytest.approx(2 / (1 / 0.25 + 1 / 0.5))
    assert hybrid_indicator(entropy, ratio, 2.0).item() == pytest.approx(3 / (2 / 0.25 + 1 / 0.5))
    # larger λ pulls EDR toward DR
    assert hybrid_indicator(entropy, ratio, 100.0).item() == pytest.approx(0.25, abs=0.01)


def test_hybrid_indicator_is_zero_when_either_part_is_zero():
    edr = hybrid_indicator(torch.tensor([0.0, 0.4, 0.0]), torch.tensor([0.3, 0.0, 0.0]))
    assert torch.equal(edr, torch.zeros(3))


def outputs_from_predictions(predictions: list[list[int]], confidence: float = 0.9) -> list[HeadOutput]:
    """Layers of two-class logits whose argmax follows predictions[layer][sample]."""
    logit = math.log(confidence / (1 - confidence))
    return [HeadOutput(torch.tensor([[logit, 0.0] if p == 0 else [0.0, logit] for p in layer]))
            for layer in predictions]


def test_patience_exits_when_prediction_unchanged_for_t_layers():
    outputs = outputs_from_predictions([[0, 0], [1, 0], [1, 0], [1, 1]])
    one = simulate_exits(ExitPolicy("patience", patience=1), outputs)
    assert one.exit_layers.tolist() == [3, 2]
    two = simulate_exits(ExitPolicy("patience", patience=2), outputs)
    assert two.exit_layers.tolist() == [4, 3]
    assert two.predictions.tolist() == [1, 0]


def test_entropy_policy_threshold():
    layers = [HeadOutput(torch.tensor([[0.0, 0.0], [3.0, 0.0]])), HeadOutput(torch.tensor([[5.0, 0.0], [0.0, 5.0]]))]
    exits = simulate_exits(ExitPolicy("entropy", threshold=0.5), layers)
    assert exits.exit_layers.tolist() == [2, 1]
    assert exits.predictions.tolist() == [0, 0]
    assert speedup_ratio(exits.exit_layers, 2) == pytest.approx(4 / 3)


def test_pcee_needs_consecutive_confident_layers():
    confident, unsure = [4.0, 0.0], [0.1, 0.0]
    layers = [HeadOutput(torch.tensor([row])) for row in (confident, unsure, confident, confident, confident)]
    assert simulate_exits(ExitPolicy("pcee", threshold=0.5, patience=2), layers).exit_layers.tolist() == [4]
    assert simulate_exits(ExitPolicy("entropy", threshold=0.5), layers).exit_layers.tolist() == [1]


def test_confidence_policy_exits_above_threshold():
    layers = [HeadOutput(torch.tensor([[2.0, 0.0]])), HeadOutput(torch.tensor([[0.0, 0.0]]))]
    assert simulate_exits(ExitPolicy("confidence", threshold=0.8), layers).exit_layers.tolist() == [1]
    assert simulate_exits(ExitPolicy("confidence", threshold=0.9), layers).exit_layers.tolist() == [2]


def test_edr_policy_uses_prototypes():
    agree = HeadOutput(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 9.0]]))
    disagree = HeadOutput(torch.tensor([[2.0, 0.0]]), torch.tensor([[9.0, 1.0]]))
    last = HeadOutput(torch.tensor([[0.0, 2.0]]), torch.tensor([[9.0, 1.0]]))
    policy = ExitPolicy("edr", threshold=0.3)
    assert policy.needs_prototypes
    assert simulate_exits(policy, [agree, last]).exit_layers.tolist() == [1]
    assert simulate_exits(policy, [disagree, last]).exit_layers.tolist() == [2]
    # entropy alone cannot tell the two apart
    assert simulate_exits(ExitPolicy("entropy", threshold=0.7), [disagree, last]).exit_layers.tolist() == [1]


def test_regression_patience_uses_tolerance():
    layers = [HeadOutput(torch.tensor([[v]])) for v in (1.0, 2.0, 2.05, 2.07)]
    exits = simulate_exits(ExitPolicy("regression-patience", threshold=0.1, patience=1), layers)
    assert exits.exit_layers.tolist() == [3]
    assert exits.predictions.tolist() == [pytest.approx(2.05)]


def test_last_layer_always_exits():
    layers = [HeadOutput(torch.zeros(3, 2)) for _ in range(3)]
    assert simulate_exits(ExitPolicy("entropy", threshold=0.1), layers).exit_layers.tolist() == [3, 3, 3]


@pytest.mark.parametrize("kwargs, message", [
    (dict(criterion="magic"), "unknown exit criterion"),
    (dict(threshold=1.5), r"must lie in \[0, 1\]"),
    (dict(threshold=-0.1), r"must lie in \[0, 1\]"),
    (dict(patience=0), "patience must be at least 1"),
    (dict(lam=0.0), "λ must be positive"),
])
def test_bad_policy_settings_are_clear_errors(kwargs, message):
    with pytest.raises(PolicyError, match=message):
        ExitPolicy(**kwargs)


def test_edr_without_distances_is_a_clear_error():
    with pytest.raises(PolicyError, match="needs prototype distances"):
        simulate_exits(ExitPolicy("edr"), [HeadOutput(torch.zeros(1, 2))])


# Property-based checks over random (and extreme) logits and distances.
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

LOGIT = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False)
DISTANCE = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


@st.composite
def layer_outputs(draw, max_layers=6, max_rows=8, max_classes=5):
    """Random head outputs for M layers, N rows, C classes: logits anywhere in ±1e4, distances ≥ 0."""
    layers, rows, classes = draw(st.integers(1, max_layers)), draw(st.integers(1, max_rows)), draw(st.integers(2, max_classes))
    def tensor(elements):
        return torch.tensor(draw(st.lists(elements, min_size=rows * classes, max_size=rows * classes))).view(rows, classes)
    return [HeadOutput(tensor(LOGIT), tensor(DISTANCE)) for _ in range(layers)]


@settings(max_examples=60, deadline=None)
@given(layer_outputs(max_layers=1), st.sampled_from([0.25, 0.5, 1.0, 2.0, 8.0]))
def test_every_indicator_stays_in_unit_interval(outputs, lam):
    logits, distances = outputs[0].logits, outputs[0].distances
    probs = logits.softmax(-1)
    entropy, ratio = normalized_entropy(probs), distance_ratio(probs, distances)
    for value in (entropy, max_probability(probs), ratio, hybrid_indicator(entropy, ratio, lam)):
        assert torch.isfinite(value).all()
        assert (value >= 0).all() and (value <= 1).all()


@settings(max_examples=60, deadline=None)
@given(layer_outputs(), st.sampled_from(["edr", "entropy", "confidence", "dr", "pcee", "patience"]),
       st.floats(0.0, 1.0), st.integers(1, 3))
def test_exit_layers_stay_within_the_model(outputs, criterion, threshold, patience):
    exits = simulate_exits(ExitPolicy(criterion, threshold, patience), outputs)
    assert ((exits.exit_layers >= 1) & (exits.exit_layers <= len(outputs))).all()
    assert torch.isfinite(exits.indicators).all()


@settings(max_examples=60, deadline=None)
@given(layer_outputs(), st.sampled_from(["edr", "entropy", "dr", "pcee"]), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_lowering_tau_never_lowers_the_mean_exit_layer(outputs, criterion, tau_a, tau_b):
    """For "exit when indicator < τ" criteria a smaller τ exits no earlier, row by row."""
    low, high = sorted((tau_a, tau_b))
    strict = simulate_exits(ExitPolicy(criterion, low, 2 if criterion == "pcee" else 1), outputs)
    loose = simulate_exits(ExitPolicy(criterion, high, 2 if criterion == "pcee" else 1), outputs)
    assert (strict.exit_layers >= loose.exit_layers).all()


@settings(max_examples=40, deadline=None)
@given(layer_outputs(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_raising_the_confidence_bar_never_lowers_the_mean_exit_layer(outputs, tau_a, tau_b):
    """max-probability exits when the indicator is above τ: a higher τ exits no earlier."""
    low, high = sorted((tau_a, tau_b))
    strict = simulate_exits(ExitPolicy("confidence", high), outputs)
    loose = simulate_exits(ExitPolicy("confidence", low), outputs)
    assert (strict.exit_layers >= loose.exit_layers).all()


@settings(max_examples=30, deadline=None)
@given(layer_outputs(), st.integers(1, 4), st.integers(1, 4))
def test_more_patience_never_exits_earlier(outputs, t_a, t_b):
    low, high = sorted((t_a, t_b))
    assert (simulate_exits(ExitPolicy("patience", patience=high), outputs).exit_layers
            >= simulate_exits(ExitPolicy("patience", patience=low), outputs).exit_layers).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_indicators_survive_half_precision_logits(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(64, 3) * torch.tensor([1.0, 30.0, 300.0])).to(dtype)
    distances = (torch.rand(64, 3) * 1e4).to(dtype)
    step = ExitPolicy("edr", 0.5).step(HeadOutput(logits, distances), ExitPolicy("edr").initial_state(64), False)
    assert step.indicator.dtype == torch.float32
    assert torch.isfinite(step.indicator).all() and (step.indicator >= 0).all() and (step.indicator <= 1).all()
