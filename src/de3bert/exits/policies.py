"""Exit policies: a criterion (`criteria.py`) with its threshold τ, patience t and λ, deciding exits layer by layer.

One mechanism serves every criterion:

    confident_m = the criterion's measure at layer m compared with τ
    streak_m    = streak_{m-1} + 1 if confident_m else 0
    exit at the first layer with streak_m >= patience; the last layer always exits.

The offline simulation (`simulate_exits`), the layer-by-layer engine and the exported graph all run
`ExitPolicy.step`, so they cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from de3bert.errors import PolicyError
from de3bert.exits.criteria import DEFAULT_CRITERION, Criterion, get_criterion
from de3bert.exits.measures import measure
from de3bert.model.heads import HeadOutput, HeadReads


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

    criterion: a name in `criteria.CRITERIA`. threshold: τ — in [0, 1] for indicators, the tolerance on
    |Δ output| (any τ >= 0) for "regression-patience", unused by "patience" (its criterion is "prediction
    unchanged"). patience: consecutive confident layers needed to exit (1 = exit at the first confident one).
    lam: λ of the hybrid indicator (EDR only).
    """

    criterion: str = DEFAULT_CRITERION
    threshold: float = 0.5
    patience: int = 1
    lam: float = 1.0

    def __post_init__(self) -> None:
        spec = get_criterion(self.criterion)
        if self.patience < 1:
            raise PolicyError(f"patience must be at least 1, got {self.patience}")
        spec.check_threshold(self.threshold)
        if not (self.lam > 0 and math.isfinite(self.lam)):
            raise PolicyError(f"λ must be positive and finite, got {self.lam}")

    @classmethod
    def never_exiting(cls, criterion: str, num_layers: int, lam: float = 1.0) -> ExitPolicy:
        """A policy of the criterion that computes every head and its measure but never exits before the last
        layer (τ that no measure passes; for a criterion whose knob is patience, more layers than the model has)."""
        spec = get_criterion(criterion)
        return cls(criterion, threshold=0.0 if spec.below else 1.0,
                   patience=num_layers if spec.patience == "swept" else 1, lam=lam)

    @property
    def spec(self) -> Criterion:
        """The criterion's record."""
        return get_criterion(self.criterion)

    @property
    def reads_internal_heads(self) -> bool:
        """Whether exits before the last layer are possible (else their heads need not be computed)."""
        return self.spec.exits_early

    @property
    def needs_prototypes(self) -> bool:
        """Whether the policy reads prototype distances (so the engine must compute them)."""
        return self.spec.reads_prototypes

    @property
    def head_reads(self) -> HeadReads:
        """What a head must compute for this policy: the prototypical network or not, and the indicator it reads."""
        return HeadReads(self.needs_prototypes, self.spec.indicator, self.lam)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> ExitState:
        """State before layer 1."""
        return ExitState(torch.zeros(batch_size, dtype=torch.long, device=device), None)

    def indicator(self, output: HeadOutput, previous: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the criterion's measure, prediction) of one layer's head output and the previous layer's prediction."""
        return measure(self.spec, output, previous, self.lam)

    def confident(self, indicator: torch.Tensor) -> torch.Tensor:
        """Whether each row is confident at this layer: its measure on the criterion's side of τ."""
        spec = self.spec
        if not spec.exits_early:
            return torch.zeros_like(indicator, dtype=torch.bool)
        bar = self.threshold if spec.fixed_threshold is None else spec.fixed_threshold
        return indicator < bar if spec.below else indicator > bar

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
