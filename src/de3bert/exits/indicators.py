"""Exit indicators: pure functions of one head's output (DESIGN §1).

All lie in [0, 1] with lower = more certain, except max-probability (higher = more certain). The
criteria (`criteria.py`) say which one each criterion reads; `head_indicators` computes all of them
next to a head, which is what the exported graph's exit steps trace, so every runtime runs these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from de3bert.exits.criteria import PROTOTYPE_INDICATORS

FLOAT32_MAX = torch.finfo(torch.float32).max


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Ent = −Σ p log p / log C, in [0, 1] (DeeBERT's indicator, normalized); 0 for a single output."""
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    return (entropy / (math.log(probs.shape[-1]) or 1.0)).clamp(0.0, 1.0)  # C = 1: 0/0 by the formula


def max_probability(probs: torch.Tensor) -> torch.Tensor:
    """Confidence max_k p_k (higher = more certain)."""
    return probs.max(-1).values


def distance_ratio(scores: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """DR = 0.5·(1 + (r1 − r2)/max(r1, r2)), r1 = distance to the prototype of the predicted class (the argmax
    of the classifier's scores: logits, or probabilities), r2 = nearest other prototype. DR > 0.5 when the
    classifier disagrees with the geometry; 0.5 when both distances are equal (both 0, or both overflowed to inf)."""
    # Distances are >= 0 by definition, but 1 − cos rounds slightly below 0, and half-precision squared distances
    # overflow to inf (then inf/inf is NaN): clamp both into [0, largest finite value].
    distances = distances.clamp(0.0, torch.finfo(distances.dtype).max)
    predicted = scores.argmax(-1, keepdim=True)
    r1 = distances.gather(-1, predicted).squeeze(-1)
    r2 = distances.scatter(-1, predicted, float("inf")).min(-1).values
    # |r1 - r2| <= max(r1, r2) for distances >= 0, so the ratio lies in [-1, 1]; 0/ε = 0 when both are 0
    ratio = (r1 - r2) / torch.maximum(r1, r2).clamp_min(1e-30)
    return (0.5 * (1.0 + ratio)).clamp(0.0, 1.0)


def hybrid_indicator(entropy: torch.Tensor, ratio: torch.Tensor, lam: float | torch.Tensor = 1.0) -> torch.Tensor:
    """EDR = (λ + 1) / (λ/DR + 1/Ent), the weighted harmonic mean, computed as
    (λ + 1)·Ent·DR / (λ·Ent + DR); 0 where Ent or DR is 0."""
    edr = (lam + 1.0) * entropy * ratio / (lam * entropy + ratio).clamp_min(1e-30)
    return edr.clamp(0.0, 1.0)  # rounding can land one ulp above 1 (Ent = DR = 1, λ = 0.32 gives 1.0000001)


def class_probabilities(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities p (float32) of a head's logits, and its prediction: the argmax class, or the score of a
    one-output regression head."""
    logits = logits.float()
    # a half-precision head can overflow to ±inf, and softmax of inf is NaN; the largest finite float is not
    finite = logits.clamp(-FLOAT32_MAX, FLOAT32_MAX)
    # the class of the largest logit: probabilities can tie where logits do not
    return finite.softmax(-1), logits.squeeze(-1) if logits.shape[-1] == 1 else finite.argmax(-1)


Indicator = Callable[[torch.Tensor, "torch.Tensor | None", "float | torch.Tensor"], torch.Tensor]
"""An indicator of (class probabilities, prototype distances or None, λ)."""

INDICATORS: dict[str, Indicator] = {
    "entropy": lambda probs, distances, lam: normalized_entropy(probs),
    "confidence": lambda probs, distances, lam: max_probability(probs),
    "dr": lambda probs, distances, lam: distance_ratio(probs, distances.float()),
    "edr": lambda probs, distances, lam: hybrid_indicator(normalized_entropy(probs),
                                                          distance_ratio(probs, distances.float()), lam),
}
"""The formula of every indicator the criteria name (criteria.INDICATORS)."""


def head_indicators(logits: torch.Tensor, distances: torch.Tensor | None,
                    lam: float | torch.Tensor = 1.0) -> dict[str, torch.Tensor]:
    """The prediction and every indicator a policy can read from one head output (the prototype ones only with
    distances): what an exported graph's exit step computes next to its head, from these very functions."""
    probs, prediction = class_probabilities(logits)
    names = [name for name in INDICATORS if distances is not None or name not in PROTOTYPE_INDICATORS]
    return {"prediction": prediction} | {name: INDICATORS[name](probs, distances, lam) for name in names}
