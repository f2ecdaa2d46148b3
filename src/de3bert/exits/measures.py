"""What a criterion reads at one layer, computed: its indicator, or the change of the prediction (or regression
output) since the previous layer.

The criteria (`criteria.py`) are plain records; this is where a record becomes a number per row.
"""

from __future__ import annotations

import math

import torch

from de3bert.errors import PolicyError
from de3bert.exits.criteria import PROTOTYPE_INDICATORS, Criterion
from de3bert.exits.indicators import INDICATORS, class_probabilities
from de3bert.model.heads import HeadOutput


def measure(criterion: Criterion, output: HeadOutput, previous: torch.Tensor | None,
            lam: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the criterion's measure, prediction) of one layer's head output, given the previous layer's prediction
    (None at the first layer). Indicators a graph computed next to the head are read from the output."""
    if criterion.change == "output":  # |Δ output| of a regression head (inf at the first layer)
        value = output.logits.float().squeeze(-1)
        delta = torch.full_like(value, math.inf) if previous is None else (value - previous).abs()
        return delta, value
    computed = output.indicators
    if criterion.change == "prediction":  # 1 where the predicted class changed (and at the first layer), else 0
        prediction = computed["prediction"] if computed else class_probabilities(output.logits)[1]
        changed = torch.ones_like(prediction, dtype=torch.bool) if previous is None else prediction != previous
        return changed.float(), prediction
    if computed:
        if criterion.indicator not in computed:  # an export's graph computes the indicator of its own criterion only
            raise PolicyError(f"criterion '{criterion.name}' reads the indicator {criterion.indicator}, which these "
                              f"heads did not compute (they give {', '.join(sorted(set(computed) - {'prediction'}))})")
        return computed[criterion.indicator], computed["prediction"]
    if criterion.indicator in PROTOTYPE_INDICATORS and output.distances is None:
        raise PolicyError(f"criterion '{criterion.name}' needs prototype distances, but the head gave none")
    probs, prediction = class_probabilities(output.logits)
    return INDICATORS[criterion.indicator](probs, output.distances, lam), prediction
