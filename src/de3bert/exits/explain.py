"""Where an input exits, layer by layer: what its exit policy saw at every layer the input passed through.

    explanations = explain_exits(model, ExitPolicy("edr", threshold=0.1), ["a gripping, funny film"])
    explanations[0].exit_layer, [layer.indicator for layer in explanations[0].layers]

The values come from the model's every-head forward (`collect_layer_outputs`, no early stop) read by the policy's
own `ExitPolicy.step`, the decision code the engine and `simulate_exits` run, so the indicator formulas and the
exit rule are the policy's and nothing is re-derived here. That costs a full-depth pass: the service computes it
only for requests that ask (`"explain": true`), next to the engine's early-exit answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from de3bert.data import Example, encode_examples
from de3bert.errors import PolicyError
from de3bert.exits.indicators import class_probabilities
from de3bert.exits.outputs import collect_layer_outputs
from de3bert.exits.policies import ExitPolicy
from de3bert.exits.runners import ExitRunner
from de3bert.model.heads import HeadReads

CHANGE_VALUES = {"prediction": "prediction_changed", "output": "score_change"}
"""What the per-layer values of a criterion that compares across layers hold (criteria.CHANGES)."""


@dataclass
class IndicatorReading:
    """How to read a policy's per-layer indicator values (the same for every input of a request)."""

    indicator: str
    """What the values are: an indicator of criteria.INDICATORS ("edr", "entropy", "confidence", "dr"),
    "prediction_changed" (patience: 1 where the predicted class differs from the layer before, 0 where it does
    not; layer 1 counts as changed) or "score_change" (regression patience: |score − the layer before's score|,
    none at layer 1)."""
    holds_when: str
    """When the criterion holds at a layer: the indicator is "below" or "above" the threshold; "never" for full
    depth, which runs every layer."""
    threshold: float | None
    """The threshold the policy compares the indicator with (None for full depth)."""
    patience: int
    """Consecutive layers on which the criterion must hold for the input to exit."""


@dataclass
class LayerTrace:
    """One layer an input passed through, as its exit policy saw it."""

    layer: int
    """1-based layer."""
    label: str | float
    """The layer's prediction: its label name, or the score of a regression model."""
    probabilities: dict[str, float] | None
    """Class probabilities of the layer's classifier by label name (None for regression)."""
    indicator: float | None
    """The criterion's indicator at this layer (see IndicatorReading.indicator); None where it has no finite
    value (the first layer's score change; a prototype criterion at a last layer without prototypes)."""
    streak: int
    """Consecutive layers up to this one on which the criterion held; the input exits once it reaches the
    policy's patience, or at the last layer."""


@dataclass
class Explanation:
    """One input's way through the layers: where the policy stops it and each layer it passed through."""

    exit_layer: int
    """1-based layer the policy stops the input at."""
    layers: list[LayerTrace]
    """Every layer of the model, layer 1 first (the every-head pass computes them all); the input passed through
    layers[:exit_layer], the others are the layers its exit saved."""


def indicator_reading(policy: ExitPolicy) -> IndicatorReading:
    """What the per-layer indicator values of `explain_exits` under this policy are, and when they make it exit."""
    spec = policy.spec
    name = spec.indicator or CHANGE_VALUES[spec.change]
    if not spec.exits_early:
        return IndicatorReading(name, "never", None, policy.patience)
    threshold = policy.threshold if spec.fixed_threshold is None else spec.fixed_threshold
    return IndicatorReading(name, "below" if spec.below else "above", threshold, policy.patience)


def explain_exits(model: ExitRunner, policy: ExitPolicy, texts: list[str],
                  text_pairs: list[str] | None = None, batch_size: int = 64) -> list[Explanation]:
    """Every layer's prediction, class probabilities, indicator and confident streak for raw texts (or text
    pairs) under `policy`, and the layer the policy stops each one at, in input order.

    Runs the model's every-head forward on the inputs (tokenized as the engine does) and feeds each layer's head
    output to `policy.step` in turn, exactly as `simulate_exits` does; an exported graph computes its indicator with
    the policy's λ.
    """
    if model.tokenizer is None:
        raise PolicyError("the model has no tokenizer; explanations need raw texts to tokenize")
    pairs = text_pairs if text_pairs is not None else [None] * len(texts)
    if len(pairs) != len(texts):
        raise PolicyError(f"got {len(texts)} texts but {len(pairs)} text pairs")
    encoded = encode_examples(model.tokenizer, [Example(a, b, -1) for a, b in zip(texts, pairs)],
                              model.config.max_length)
    heads = collect_layer_outputs(model, encoded, batch_size, reads=HeadReads(True, None, policy.lam)).heads()
    labels = model.config.label_names
    state = policy.initial_state(len(texts))
    exit_layers = [0] * len(texts)
    layers: list[list[LayerTrace]] = [[] for _ in texts]
    for index, head in enumerate(heads):
        step = policy.step(head, state, is_last=index == len(heads) - 1)
        state = step.state
        probabilities = class_probabilities(head.logits)[0].tolist() if labels else [None] * len(texts)
        rows = zip(step.prediction.tolist(), probabilities, step.indicator.tolist(), state.streak.tolist(),
                   step.exits.tolist())
        for row, (prediction, probs, indicator, streak, exits) in enumerate(rows):
            layers[row].append(LayerTrace(
                index + 1, labels[int(prediction)] if labels else prediction,
                dict(zip(labels, probs)) if labels else None,
                indicator if math.isfinite(indicator) else None, streak))
            if exits and not exit_layers[row]:
                exit_layers[row] = index + 1
    return [Explanation(exit_layer, trace) for exit_layer, trace in zip(exit_layers, layers)]
