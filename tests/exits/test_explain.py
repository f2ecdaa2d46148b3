"""Explanations of exits: every layer's values equal the every-head outputs read by the policy, and the exit layer
equals the engine's and the offline simulation's."""

import math

import pytest
import torch

from de3bert.data import Example, encode_examples
from de3bert.exits.engine import EarlyExitEngine
from de3bert.errors import PolicyError
from de3bert.exits.calibration import candidate_policies
from de3bert.exits.outputs import collect_layer_outputs
from de3bert.exits.explain import explain_exits, indicator_reading
from de3bert.exits.indicators import distance_ratio, hybrid_indicator, normalized_entropy
from de3bert.exits.policies import ExitPolicy, simulate_exits
from tests.conftest import tiny_model
from tests.exits.test_engine import sharpen

TEXTS = ["the film was good great", "the film was awful dull", "fine", "the film was poor ugly bad and long",
         "a gripping, funny film", "nobody liked it", "it rains", "what a lovely superb evening"]


@pytest.fixture(scope="module")
def model(tokenizer):
    return sharpen(tiny_model(tokenizer=tokenizer))


def layer_outputs(model, texts, pairs=None):
    examples = [Example(a, b, -1) for a, b in zip(texts, pairs or [None] * len(texts))]
    return collect_layer_outputs(model, encode_examples(model.tokenizer, examples, model.config.max_length))


def middle_policy(criterion, outputs, **grid):
    """A policy of the criterion halfway along its trade-off curve on these outputs, so that exits vary."""
    candidates = candidate_policies(criterion, outputs, points=9, **grid)
    return candidates[len(candidates) // 2]


@pytest.mark.parametrize("criterion", ["edr", "entropy", "confidence", "dr", "patience", "pcee", "full-depth"])
def test_exit_layers_equal_the_engine_and_the_simulation(model, criterion):
    outputs = layer_outputs(model, TEXTS)
    policy = ExitPolicy("full-depth") if criterion == "full-depth" else middle_policy(criterion, outputs)
    explanations = explain_exits(model, policy, TEXTS)
    engine = EarlyExitEngine(model, policy).predict(TEXTS)
    simulated = simulate_exits(policy, outputs.heads())
    assert [e.exit_layer for e in explanations] == [p.exit_layer for p in engine] == simulated.exit_layers.tolist()
    for explanation, prediction in zip(explanations, engine):
        at_exit = explanation.layers[explanation.exit_layer - 1]
        assert at_exit.label == prediction.label
        assert at_exit.probabilities == pytest.approx(prediction.probabilities, abs=1e-5)
        if prediction.indicator is None:
            assert at_exit.indicator is None
        else:
            assert at_exit.indicator == pytest.approx(prediction.indicator, abs=1e-5)
        # the streak reaches the patience at the exit layer, never before it (except at the last layer)
        streaks = [layer.streak for layer in explanation.layers]
        assert all(s < policy.patience for s in streaks[:explanation.exit_layer - 1])
        assert streaks[explanation.exit_layer - 1] >= policy.patience or explanation.exit_layer == model.num_layers
    if criterion in ("edr", "entropy", "confidence", "pcee"):  # on this model they let some inputs out early
        assert len({e.exit_layer for e in explanations}) > 1


def test_every_layer_holds_the_heads_values(model):
    outputs = layer_outputs(model, TEXTS)
    policy = middle_policy("edr", outputs, lam=2.0)
    assert policy.lam == 2.0
    explanations = explain_exits(model, policy, TEXTS)
    probs = outputs.logits.softmax(-1)  # (M, N, C)
    entropy = normalized_entropy(probs)
    assert outputs.distances.shape[0] == model.num_layers - 1  # the last layer has no prototypes: no EDR there
    streaks = [0] * len(TEXTS)
    for m, layers in enumerate(zip(*(e.layers for e in explanations))):
        edr = hybrid_indicator(entropy[m], distance_ratio(probs[m], outputs.distances[m]), lam=2.0).tolist() \
            if m < model.num_layers - 1 else [None] * len(TEXTS)
        for n, layer in enumerate(layers):
            assert layer.layer == m + 1 and len(explanations[n].layers) == model.num_layers
            assert layer.label == ["neg", "pos"][int(probs[m, n].argmax())]
            assert list(layer.probabilities.values()) == pytest.approx(probs[m, n].tolist(), abs=1e-6)
            assert layer.indicator == pytest.approx(edr[n], abs=1e-6)
            if edr[n] is not None:
                streaks[n] = streaks[n] + 1 if edr[n] < policy.threshold else 0
                assert layer.streak == streaks[n]
    assert {e.exit_layer for e in explanations} != {model.num_layers}  # some inputs did exit early


def test_patience_reads_whether_the_prediction_changed(model):
    policy = ExitPolicy("patience", patience=2)
    explanations = explain_exits(model, policy, TEXTS)
    for explanation in explanations:
        labels = [layer.label for layer in explanation.layers]
        changed = [1.0] + [float(a != b) for a, b in zip(labels, labels[1:])]
        assert [layer.indicator for layer in explanation.layers] == changed
        streak = 0
        for layer, flag in zip(explanation.layers, changed):
            streak = 0 if flag else streak + 1
            assert layer.streak == streak
    reading = indicator_reading(policy)
    assert (reading.indicator, reading.holds_when, reading.threshold, reading.patience) == (
        "prediction_changed", "below", 0.5, 2)


def test_text_pairs_and_regression(tokenizer):
    pairs = ["a man sleeps", "nobody sleeps", "it rains", "the sun is out"]
    model = sharpen(tiny_model(labels=(), tokenizer=tokenizer))
    policy = ExitPolicy("regression-patience", threshold=0.05, patience=2)
    explanations = explain_exits(model, policy, TEXTS[:4], pairs)
    engine = EarlyExitEngine(model, policy).predict(TEXTS[:4], pairs)
    assert [e.exit_layer for e in explanations] == [p.exit_layer for p in engine]
    for explanation, prediction in zip(explanations, engine):
        first, at_exit = explanation.layers[0], explanation.layers[explanation.exit_layer - 1]
        assert first.indicator is None and first.probabilities is None  # no score before layer 1 to compare with
        assert at_exit.label == pytest.approx(prediction.label, abs=1e-5)
        scores = [layer.label for layer in explanation.layers]
        assert [layer.indicator for layer in explanation.layers[1:]] == pytest.approx(
            [abs(b - a) for a, b in zip(scores, scores[1:])], abs=1e-6)
    assert indicator_reading(policy).indicator == "score_change"
    with pytest.raises(PolicyError, match="got 4 texts but 2 text pairs"):
        explain_exits(model, policy, TEXTS[:4], pairs[:2])


def test_a_prototype_criterion_at_a_last_layer_without_prototypes(model):
    assert not model.heads[-1].has_prototypes
    explanations = explain_exits(model, ExitPolicy("edr", threshold=0.0), TEXTS[:2])
    for explanation in explanations:
        assert explanation.exit_layer == 4 and explanation.layers[-1].indicator is None
        assert all(layer.indicator is not None and math.isfinite(layer.indicator) for layer in explanation.layers[:3])


@pytest.mark.parametrize("policy,expected", [
    (ExitPolicy("edr", 0.2), ("edr", "below", 0.2, 1)),
    (ExitPolicy("confidence", 0.9), ("confidence", "above", 0.9, 1)),
    (ExitPolicy("pcee", 0.3, patience=2), ("entropy", "below", 0.3, 2)),
    (ExitPolicy("full-depth"), ("entropy", "never", None, 1)),
])
def test_indicator_reading(policy, expected):
    reading = indicator_reading(policy)
    assert (reading.indicator, reading.holds_when, reading.threshold, reading.patience) == expected


def test_explanations_leave_a_model_in_training_mode_as_it_was(model):
    model.train()
    try:
        explain_exits(model, ExitPolicy("entropy", 0.5), TEXTS[:1])
        assert model.training
    finally:
        model.eval()
    assert torch.is_grad_enabled()
