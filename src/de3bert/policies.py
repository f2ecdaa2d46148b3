"""Exit indicators and exit policies.

Indicators are pure functions (DESIGN §1), all in [0, 1] with lower = more certain, except
max-probability (higher = more certain). A policy turns one indicator into exit decisions, layer
by layer, through a single mechanism shared by every criterion:

    confident_m = indicator_m compared with τ      (or "argmax/output unchanged" for patience)
    streak_m    = streak_{m-1} + 1 if confident_m else 0
    exit at the first layer with streak_m >= patience; the last layer always exits.

DeeBERT/entropy, confidence, DR and DE³/EDR use patience 1; PABEE is "prediction unchanged" with
patience t; PCEE is "entropy < τ" with patience t; regression patience is "|Δ output| < τ" with
patience t; full depth never exits early (the engine then skips the internal heads altogether).
The offline simulation (`simulate_exits`) and the inference engine both call `ExitPolicy.step`, so
they cannot disagree. An exported layer graph computes the indicators next to its head with
`head_indicators` — these same functions, traced — and the policy then reads them instead of
computing them (`HeadOutput.indicators`); the decisions stay here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from de3bert.errors import PolicyError
from de3bert.heads import HeadOutput

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


def hybrid_indicator(entropy: torch.Tensor, ratio: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """EDR = (λ + 1) / (λ/DR + 1/Ent), the weighted harmonic mean, computed as
    (λ + 1)·Ent·DR / (λ·Ent + DR); 0 where Ent or DR is 0."""
    edr = (lam + 1.0) * entropy * ratio / (lam * entropy + ratio).clamp_min(1e-30)
    return edr.clamp(0.0, 1.0)  # rounding can land one ulp above 1 (Ent = DR = 1, λ = 0.32 gives 1.0000001)


# criterion -> (reads prototypes, confident when indicator is below τ (True) or above (False))
CRITERIA = {
    "edr": (True, True),
    "entropy": (False, True),
    "confidence": (False, False),
    "dr": (True, True),
    "pcee": (False, True),
    "patience": (False, True),
    "regression-patience": (False, True),
    "full-depth": (False, True),
}
# the indicator each criterion compares with τ (patience and regression-patience compare predictions instead)
CRITERION_INDICATORS = {"edr": "edr", "entropy": "entropy", "confidence": "confidence", "dr": "dr", "pcee": "entropy",
                        "full-depth": "entropy"}
INDICATORS = ("entropy", "confidence", "dr", "edr")  # the last two read prototype distances
CRITERION_NAMES = {
    "edr": "EDR", "entropy": "entropy", "confidence": "max-probability", "dr": "distance ratio",
    "pcee": "entropy + patience", "patience": "patience", "regression-patience": "patience (regression)",
    "full-depth": "full depth (no early exit)",
}
# the method a criterion stands for when the model was trained with that method's recipe
METHOD_NAMES = {("de3", "edr"): "DE³ (EDR)", ("deebert", "entropy"): "DeeBERT (entropy)",
                ("pabee", "patience"): "PABEE (patience)", ("pabee", "pcee"): "PCEE (entropy + patience)"}


def criterion_label(criterion: str, recipe: str | None = None) -> str:
    """How to name a criterion on a model trained with `recipe`: the method's name only where the model was
    trained the way that method trains ("entropy", not "DeeBERT (entropy)", on a DE³ model)."""
    return METHOD_NAMES.get((recipe, criterion), CRITERION_NAMES.get(criterion, criterion))


def class_probabilities(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities p (float32) of a head's logits, and its prediction: the argmax class, or the score of a
    one-output regression head."""
    logits = logits.float()
    # a half-precision head can overflow to ±inf, and softmax of inf is NaN; the largest finite float is not
    finite = logits.clamp(-FLOAT32_MAX, FLOAT32_MAX)
    # the class of the largest logit: probabilities can tie where logits do not
    return finite.softmax(-1), logits.squeeze(-1) if logits.shape[-1] == 1 else finite.argmax(-1)


def indicator_value(name: str, probs: torch.Tensor, distances: torch.Tensor | None,
                    lam: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The named indicator (one of INDICATORS) of a head's class probabilities and prototype distances."""
    if name == "entropy":
        return normalized_entropy(probs)
    if name == "confidence":
        return max_probability(probs)
    ratio = distance_ratio(probs, distances.float())
    return ratio if name == "dr" else hybrid_indicator(normalized_entropy(probs), ratio, lam)


def head_indicators(logits: torch.Tensor, distances: torch.Tensor | None,
                    lam: float | torch.Tensor = 1.0) -> dict[str, torch.Tensor]:
    """The prediction and every indicator a policy can read from one head output (the prototype ones only with
    distances): what an exported layer graph computes next to its head, from these very functions."""
    probs, prediction = class_probabilities(logits)
    names = INDICATORS if distances is not None else INDICATORS[:2]
    return {"prediction": prediction} | {name: indicator_value(name, probs, distances, lam) for name in names}


@dataclass
class ExitState:
    """Per-row state carried from layer to layer: the confident streak and the last output."""

    streak: torch.Tensor  # (B,) long
    previous: torch.Tensor | None  # (B,) last prediction (class index or regression value)

    def select(self, rows: torch.Tensor) -> ExitState:
        """State of the given rows only (the engine drops rows that exited)."""
        return ExitState(self.streak[rows], None if self.previous is None else self.previous[rows])


@dataclass
class ExitStep:
    """What a policy decided at one layer for a batch."""

    exits: torch.Tensor  # (B,) bool
    indicator: torch.Tensor  # (B,) float, the criterion's value at this layer
    prediction: torch.Tensor  # (B,) class index, or regression value
    state: ExitState


@dataclass
class ExitPolicy:
    """An exit criterion with its threshold τ, patience t and EDR weight λ.

    criterion: one of CRITERIA. threshold: τ in [0, 1] — for "patience" it is unused (the criterion
    is "prediction unchanged"), for "regression-patience" it is the tolerance on |Δ output| (any τ >= 0).
    patience: consecutive confident layers needed to exit (1 = exit at the first confident one).
    lam: λ of the hybrid indicator (EDR only).
    """

    criterion: str = "edr"
    threshold: float = 0.5
    patience: int = 1
    lam: float = 1.0

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise PolicyError(f"unknown exit criterion '{self.criterion}'; choose one of {', '.join(CRITERIA)}")
        if self.patience < 1:
            raise PolicyError(f"patience must be at least 1, got {self.patience}")
        if self.criterion == "regression-patience":
            if not self.threshold >= 0.0:  # written so that NaN fails too
                raise PolicyError(f"tolerance of 'regression-patience' must be a number >= 0, got {self.threshold}")
        elif not 0.0 <= self.threshold <= 1.0:
            raise PolicyError(f"threshold of '{self.criterion}' must lie in [0, 1], got {self.threshold}")
        if not (self.lam > 0 and math.isfinite(self.lam)):
            raise PolicyError(f"λ must be positive and finite, got {self.lam}")

    @property
    def reads_internal_heads(self) -> bool:
        """Whether exits before the last layer are possible (else their heads need not be computed)."""
        return self.criterion != "full-depth"

    @property
    def needs_prototypes(self) -> bool:
        """Whether the policy reads prototype distances (so the engine must compute them)."""
        return CRITERIA[self.criterion][0]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> ExitState:
        """State before layer 1."""
        return ExitState(torch.zeros(batch_size, dtype=torch.long, device=device), None)

    def indicator(self, output: HeadOutput, previous: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(indicator value, prediction) of one layer's head output; read from output.indicators when the head
        computed them (head_indicators, inside an exported layer graph)."""
        if self.criterion == "regression-patience":
            value = output.logits.float().squeeze(-1)
            delta = torch.full_like(value, math.inf) if previous is None else (value - previous).abs()
            return delta, value
        computed = output.indicators
        probs, prediction = (None, computed["prediction"]) if computed else class_probabilities(output.logits)
        if self.criterion == "patience":
            changed = torch.ones_like(prediction, dtype=torch.bool) if previous is None else prediction != previous
            return changed.float(), prediction
        if self.needs_prototypes and output.distances is None:
            raise PolicyError(f"criterion '{self.criterion}' needs prototype distances, but the head gave none")
        name = CRITERION_INDICATORS[self.criterion]
        if computed:
            return computed[name], prediction
        return indicator_value(name, probs, output.distances, self.lam), prediction

    def confident(self, indicator: torch.Tensor) -> torch.Tensor:
        """Whether each row is confident at this layer."""
        if self.criterion == "full-depth":
            return torch.zeros_like(indicator, dtype=torch.bool)
        if self.criterion == "patience":
            return indicator < 0.5  # indicator is 1 where the prediction changed
        below = CRITERIA[self.criterion][1]
        return indicator < self.threshold if below else indicator > self.threshold

    def step(self, output: HeadOutput, state: ExitState, is_last: bool) -> ExitStep:
        """Exit decisions at one layer from its head output and the carried state.

        A last layer without a prototypical network has no value of a prototype criterion: everything exits
        there, with indicator NaN.
        """
        if is_last and self.needs_prototypes and output.distances is None:
            prediction = output.logits.float().argmax(-1)  # prototype criteria are for classification only
            indicator = torch.full(prediction.shape, math.nan, device=prediction.device)
            return ExitStep(torch.ones_like(state.streak, dtype=torch.bool), indicator, prediction,
                            ExitState(state.streak, prediction))
        indicator, prediction = self.indicator(output, state.previous)
        streak = (state.streak + 1) * self.confident(indicator)  # +1 where confident, else back to 0
        exits = streak >= self.patience
        if is_last:
            exits = torch.ones_like(exits)
        return ExitStep(exits, indicator, prediction, ExitState(streak, prediction))


@dataclass
class SimulatedExits:
    """Offline exit decisions for N samples given all layers' outputs."""

    exit_layers: torch.Tensor  # (N,) 1-based layer each sample left at
    predictions: torch.Tensor  # (N,) prediction taken at that layer
    indicators: torch.Tensor  # (N,) the criterion's value at the exit layer


def simulate_exits(policy: ExitPolicy, outputs: list[HeadOutput]) -> SimulatedExits:
    """Where each sample exits under a policy, from every layer's head output (all computed)."""
    num_layers, batch = len(outputs), outputs[0].logits.shape[0]
    state = policy.initial_state(batch, outputs[0].logits.device)
    exit_layers = torch.zeros(batch, dtype=torch.long)
    predictions = torch.zeros(batch, dtype=outputs[0].logits.dtype if outputs[0].logits.shape[-1] == 1 else torch.long)
    indicators = torch.zeros(batch)
    for index, output in enumerate(outputs):
        step = policy.step(output, state, is_last=index == num_layers - 1)
        newly = step.exits.cpu() & (exit_layers == 0)
        exit_layers[newly] = index + 1
        predictions[newly] = step.prediction.cpu()[newly].to(predictions.dtype)
        indicators[newly] = step.indicator.cpu()[newly].float()
        state = step.state
    return SimulatedExits(exit_layers, predictions, indicators)


def speedup_ratio(exit_layers: torch.Tensor, num_layers: int) -> float:
    """Layer speed-up M·N / Σ_i m_i."""
    return num_layers * exit_layers.numel() / float(exit_layers.sum())
