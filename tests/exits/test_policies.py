import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from de3bert.errors import PolicyError
from de3bert.exits.indicators import distance_ratio, hybrid_indicator, max_probability, normalized_entropy
from de3bert.exits.policies import ExitPolicy, simulate_exits, speedup_ratio
from de3bert.model.heads import ExitHead, HeadOutput


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


def test_distance_ratio_of_overflowed_and_rounded_distances():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    inf = math.inf
    # r1 overflowed, r2 overflowed, both overflowed (half precision); 1 − cos rounded below 0
    distances = torch.tensor([[inf, 1.0], [1.0, inf], [inf, inf], [-1e-7, 0.0]])
    assert distance_ratio(probs, distances).tolist() == [1.0, 0.0, 0.5, 0.5]


def test_hybrid_indicator_hand_computed_and_lambda():
    entropy, ratio = torch.tensor([0.5]), torch.tensor([0.25])
    assert hybrid_indicator(entropy, ratio, 1.0).item() == pytest.approx(2 / (1 / 0.25 + 1 / 0.5))
    assert hybrid_indicator(entropy, ratio, 2.0).item() == pytest.approx(3 / (2 / 0.25 + 1 / 0.5))
    # larger λ pulls EDR toward DR
    assert hybrid_indicator(entropy, ratio, 100.0).item() == pytest.approx(0.25, abs=0.01)


def test_hybrid_indicator_is_zero_when_either_part_is_zero():
    edr = hybrid_indicator(torch.tensor([0.0, 0.4, 0.0]), torch.tensor([0.3, 0.0, 0.0]))
    assert torch.equal(edr, torch.zeros(3))


def test_hybrid_indicator_does_not_round_above_one():
    # (λ + 1)·1·1 / (λ·1 + 1) rounds to 1.0000001 in float32 for λ = 0.32
    assert hybrid_indicator(torch.ones(1), torch.ones(1), 0.32).item() == 1.0


def test_normalized_entropy_of_a_single_output_is_zero():
    assert normalized_entropy(torch.ones(3, 1)).tolist() == [0.0, 0.0, 0.0]


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


def test_regression_tolerance_is_not_a_probability():
    layers = [HeadOutput(torch.tensor([[v]])) for v in (1.0, 3.0, 4.5, 4.6)]
    assert simulate_exits(ExitPolicy("regression-patience", threshold=2.5), layers).exit_layers.tolist() == [2]


def test_full_depth_on_a_regression_head_predicts_the_score():
    layers = [HeadOutput(torch.tensor([[v], [-v]])) for v in (1.0, 3.0, 4.5)]
    exits = simulate_exits(ExitPolicy("full-depth"), layers)
    assert exits.exit_layers.tolist() == [3, 3]
    assert exits.predictions.tolist() == [4.5, -4.5] and exits.indicators.tolist() == [0.0, 0.0]


def test_last_layer_always_exits():
    layers = [HeadOutput(torch.zeros(3, 2)) for _ in range(3)]
    assert simulate_exits(ExitPolicy("entropy", threshold=0.1), layers).exit_layers.tolist() == [3, 3, 3]


@pytest.mark.parametrize("kwargs, message", [
    (dict(criterion="magic"), "unknown exit criterion"),
    (dict(threshold=1.5), r"must lie in \[0, 1\]"),
    (dict(threshold=-0.1), r"must lie in \[0, 1\]"),
    (dict(patience=0), "patience must be at least 1"),
    (dict(threshold=math.nan), r"must lie in \[0, 1\]"),
    (dict(lam=0.0), "λ must be positive and finite, got 0.0"),
    (dict(lam=math.inf), "λ must be positive and finite, got inf"),
    (dict(lam=math.nan), "λ must be positive and finite, got nan"),
    (dict(criterion="regression-patience", threshold=-0.1), "tolerance of 'regression-patience' must be a number >= 0"),
    (dict(criterion="regression-patience", threshold=math.nan), "tolerance of 'regression-patience' must be a number"),
])
def test_bad_policy_settings_are_clear_errors(kwargs, message):
    with pytest.raises(PolicyError, match=message):
        ExitPolicy(**kwargs)


@pytest.mark.parametrize("criterion", ["edr", "entropy", "confidence", "dr", "pcee"])
def test_overflowed_half_precision_logits_give_finite_indicators(criterion):
    logits = torch.tensor([[7e4, 0.0], [-7e4, 0.0], [7e4, 7e4]], dtype=torch.float16)  # ±inf in float16
    assert torch.isinf(logits).any()
    policy = ExitPolicy(criterion)
    indicator, prediction = policy.indicator(HeadOutput(logits, torch.tensor([[1.0, 2.0]] * 3)), None)
    assert prediction.tolist() == [0, 1, 0]
    expected = {"entropy": [0.0, 0.0, 1.0], "pcee": [0.0, 0.0, 1.0], "confidence": [1.0, 1.0, 0.5],
                "dr": [1 / 4, 3 / 4, 1 / 4], "edr": [0.0, 0.0, 2 * 0.25 / 1.25]}[criterion]
    assert indicator.tolist() == pytest.approx(expected)


def test_edr_without_distances_is_a_clear_error():
    with pytest.raises(PolicyError, match="needs prototype distances"):
        simulate_exits(ExitPolicy("edr"), [HeadOutput(torch.zeros(1, 2))] * 2)


# Property-based checks over random (and extreme) logits and distances.
FINITE_LOGIT = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False)
LOGIT = FINITE_LOGIT | st.sampled_from([-math.inf, math.inf])  # ±inf: a half-precision head that overflowed
# any distance >= 0 up to inf (beyond float32's range), and the slightly negative values 1 − cos rounds to
DISTANCE = st.floats(min_value=0.0, allow_nan=False) | st.floats(min_value=-1e-6, max_value=0.0)
CLASSIFICATION = ["edr", "entropy", "confidence", "dr", "pcee", "patience"]


@st.composite
def layer_outputs(draw, max_layers=6, max_rows=8, min_classes=2, max_classes=5):
    """Random head outputs for M layers, N rows, C outputs: logits in ±1e4 or ±inf, distances >= 0 up to inf
    (C = 1 is a regression head, without distances)."""
    layers, rows = draw(st.integers(1, max_layers)), draw(st.integers(1, max_rows))
    classes = draw(st.integers(min_classes, max_classes))

    def tensor(elements):
        values = draw(st.lists(elements, min_size=rows * classes, max_size=rows * classes))
        return torch.tensor(values).view(rows, classes)

    return [HeadOutput(tensor(LOGIT), tensor(DISTANCE) if classes > 1 else None) for _ in range(layers)]


def assert_indicators_in_unit_interval(output: HeadOutput, lam: float) -> None:
    """Every classification indicator of one head output is finite and within [0, 1]."""
    for criterion in ("entropy", "confidence", "dr", "edr"):
        indicator, _ = ExitPolicy(criterion, lam=lam).indicator(output, None)
        assert torch.isfinite(indicator).all(), criterion
        assert ((indicator >= 0) & (indicator <= 1)).all(), criterion


@settings(max_examples=60, deadline=None)
@given(layer_outputs(max_layers=1), st.floats(1e-3, 1e3))
def test_every_indicator_stays_in_unit_interval(outputs, lam):
    """Entropy, max-probability, DR and EDR (any λ) of any logits and distances: in [0, 1], never NaN or inf."""
    assert_indicators_in_unit_interval(outputs[0], lam)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8), st.integers(2, 4096), st.sampled_from([0.0, 1e-3, 1.0, 30.0, 1e4]),
       st.sampled_from([0.0, 1e-6, 1.0, 1e6, 1e30]), st.integers(0, 2**32 - 1), st.floats(1e-3, 1e3))
def test_indicators_stay_in_unit_interval_for_many_classes(rows, classes, logit_scale, distance_scale, seed, lam):
    """The same for up to 4096 classes, logits up to 1e4 (scale 0: all tied) and distances up to 1e30."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=generator) * logit_scale
    distances = torch.rand(rows, classes, generator=generator) * distance_scale
    assert_indicators_in_unit_interval(HeadOutput(logits, distances), lam)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(1e-3, 1e3))
def test_hybrid_indicator_stays_in_unit_interval(entropy, ratio, lam):
    """EDR of any Ent, DR in [0, 1] and any λ lies in [0, 1] (rounding included)."""
    edr = hybrid_indicator(torch.tensor([entropy]), torch.tensor([ratio]), lam)
    assert 0.0 <= edr.item() <= 1.0


@settings(max_examples=60, deadline=None)
@given(layer_outputs(), st.sampled_from(CLASSIFICATION), st.floats(0.0, 1.0), st.integers(1, 3))
def test_exit_layers_stay_within_the_model(outputs, criterion, threshold, patience):
    exits = simulate_exits(ExitPolicy(criterion, threshold, patience), outputs)
    assert ((exits.exit_layers >= 1) & (exits.exit_layers <= len(outputs))).all()
    assert torch.isfinite(exits.indicators).all()


@settings(max_examples=30, deadline=None)
@given(layer_outputs(min_classes=1))
def test_full_depth_exits_at_the_last_layer_with_its_prediction(outputs):
    """Classification and regression heads alike: layer M, and the last head's class (or score)."""
    exits = simulate_exits(ExitPolicy("full-depth"), outputs)
    last = outputs[-1].logits
    assert exits.exit_layers.tolist() == [len(outputs)] * last.shape[0]
    expected = last.squeeze(-1) if last.shape[-1] == 1 else last.argmax(-1)
    assert torch.equal(exits.predictions, expected)


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


@settings(max_examples=40, deadline=None)
@given(layer_outputs(min_classes=1, max_classes=1), st.floats(0.0, 1e5), st.floats(0.0, 1e5), st.integers(1, 3))
def test_lowering_the_regression_tolerance_never_lowers_the_mean_exit_layer(outputs, tol_a, tol_b, patience):
    """regression-patience exits when |Δ output| < τ: a smaller tolerance τ exits no earlier, and within 1..M."""
    low, high = sorted((tol_a, tol_b))
    strict = simulate_exits(ExitPolicy("regression-patience", low, patience), outputs)
    loose = simulate_exits(ExitPolicy("regression-patience", high, patience), outputs)
    assert (strict.exit_layers >= loose.exit_layers).all()
    assert (loose.exit_layers >= 1).all() and (strict.exit_layers <= len(outputs)).all()


@settings(max_examples=40, deadline=None)
@given(layer_outputs(), st.sampled_from(CLASSIFICATION), st.floats(0.0, 1.0), st.integers(1, 4), st.integers(1, 4))
def test_more_patience_never_exits_earlier(outputs, criterion, threshold, t_a, t_b):
    """Every criterion exits after t consecutive confident layers (PABEE: unchanged predictions), so a larger
    patience t exits no earlier, row by row."""
    low, high = sorted((t_a, t_b))
    assert (simulate_exits(ExitPolicy(criterion, threshold, high), outputs).exit_layers
            >= simulate_exits(ExitPolicy(criterion, threshold, low), outputs).exit_layers).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_indicators_survive_half_precision_logits(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(64, 3) * torch.tensor([1.0, 30.0, 300.0])).to(dtype)
    distances = (torch.rand(64, 3) * 1e4).to(dtype)
    step = ExitPolicy("edr", 0.5).step(HeadOutput(logits, distances), ExitPolicy("edr").initial_state(64), False)
    assert step.indicator.dtype == torch.float32
    assert torch.isfinite(step.indicator).all() and (step.indicator >= 0).all() and (step.indicator <= 1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_head_and_indicators_under_cpu_autocast(dtype, scale):
    """A head's forward and every indicator under autocast: finite, in [0, 1], and deciding as in float32."""
    torch.manual_seed(0)
    head = ExitHead(32, 3, 16, "sqeuclidean", 0.0, pooling="mean").eval()
    with torch.no_grad():
        head.prototypes.normal_()
        head.classifier.weight.mul_(30.0)  # spread the indicators over [0, 1]
    hidden = torch.randn(32, 10, 32) * scale
    mask = (torch.arange(10) < torch.randint(1, 11, (32, 1))).long()
    with torch.no_grad():
        reference = head(hidden, mask)
        with torch.autocast("cpu", dtype=dtype):
            output = head(hidden, mask)
            indicators = {c: ExitPolicy(c).indicator(output, None) for c in ("edr", "entropy", "confidence", "dr")}
    assert output.logits.dtype == dtype
    for criterion, (indicator, prediction) in indicators.items():
        assert torch.isfinite(indicator).all() and ((indicator >= 0) & (indicator <= 1)).all(), criterion
        expected, expected_prediction = ExitPolicy(criterion).indicator(reference, None)
        assert (prediction == expected_prediction).float().mean() >= 0.9, criterion  # rounding may flip a near tie
        assert (indicator - expected).abs().max() < 0.05, criterion
