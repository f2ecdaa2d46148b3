"""Exit criteria: one record per criterion, the only place criteria are named.

A criterion says what it measures at each layer (an indicator of the head, or the change of the
prediction since the previous layer), which way that measure means "confident", what its threshold
τ is, how patience enters, which tasks and heads it applies to, and what it is called — on its own
and as the method it stands for on a model trained with that method's recipe. Policies, calibration,
training checks, the command line, the service, the benchmark and the plots read these records;
adding a criterion is one record here plus, if it reads a new indicator, its formula in `indicators.py`.
The records are plain data (no tensors), so the command line can offer them without loading PyTorch;
`measures.py` computes what a record says to read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from de3bert.errors import PolicyError

INDICATORS = ("entropy", "confidence", "dr", "edr")
"""The indicators a criterion can read (their formulas: `indicators.py`)."""
PROTOTYPE_INDICATORS = ("dr", "edr")
"""The indicators that read prototype distances."""
CHANGES = ("prediction", "output")
"""What a criterion can compare across layers instead: the predicted class (PABEE) or a regression output."""

THRESHOLD_KINDS = ("probability", "tolerance", "fixed")
PATIENCE_KINDS = ("one", "given", "swept")


@dataclass(frozen=True)
class Criterion:
    """One exit criterion.

    indicator: the indicator it reads at each layer, or None when it compares `change` across layers instead.
    below: confident where the measure is below τ (else above).
    threshold: what τ is — "probability" (in [0, 1]), "tolerance" (any value >= 0), or "fixed" (fixed_threshold,
        not a knob). patience: "one" (exit at the first confident layer), "given" (after t consecutive confident
        layers, t the run's), or "swept" (t is the knob calibration turns). tasks: "classification" and/or
        "regression". exits_early: False for the policy that never exits before the last layer.
    methods: recipe -> the method this criterion stands for on a model trained with that recipe.
    own_for: the recipes whose own exit criterion this is (the default's tie-breaker after training).
    """

    name: str
    display: str
    indicator: str | None = None
    change: str | None = None
    below: bool = True
    threshold: str = "probability"
    patience: str = "one"
    tasks: tuple[str, ...] = ("classification",)
    exits_early: bool = True
    fixed_threshold: float | None = None
    methods: Mapping[str, str] = field(default_factory=dict)
    own_for: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.indicator is None) == (self.change is None) or self.indicator not in (None, *INDICATORS) \
                or self.change not in (None, *CHANGES):
            raise ValueError(f"criterion '{self.name}' must read one of the indicators {INDICATORS} or compare one "
                             f"of {CHANGES} across layers")
        if self.threshold not in THRESHOLD_KINDS or self.patience not in PATIENCE_KINDS:
            raise ValueError(f"criterion '{self.name}': threshold kind in {THRESHOLD_KINDS}, patience in "
                             f"{PATIENCE_KINDS}")

    @property
    def reads_prototypes(self) -> bool:
        """Whether it reads prototype distances (so the head's prototypical network must run)."""
        return self.indicator in PROTOTYPE_INDICATORS

    @property
    def separates(self) -> bool:
        """Whether it is an indicator read alone, whose separation of right from wrong answers is worth measuring."""
        return self.indicator is not None and self.patience == "one" and self.exits_early

    def applies_to(self, regression: bool, has_prototypes: bool) -> bool:
        """Whether a model for this kind of task, with or without prototypical networks, supports it."""
        task = "regression" if regression else "classification"
        return task in self.tasks and (has_prototypes or not self.reads_prototypes)

    def check_threshold(self, threshold: float) -> None:
        """A PolicyError unless τ is a value this criterion takes."""
        if self.threshold == "tolerance" and not threshold >= 0.0:  # written so that NaN fails too
            raise PolicyError(f"tolerance of '{self.name}' must be a number >= 0, got {threshold}")
        if self.threshold == "probability" and not 0.0 <= threshold <= 1.0:
            raise PolicyError(f"threshold of '{self.name}' must lie in [0, 1], got {threshold}")

    def label(self, recipe: str | None = None) -> str:
        """Its name on a model trained with `recipe`: the method's name only where the model was trained the way
        that method trains ("entropy", not "DeeBERT (entropy)", on a DE³ model)."""
        return self.methods.get(recipe, self.display)


CRITERIA: Mapping[str, Criterion] = MappingProxyType({c.name: c for c in (
    Criterion("edr", "EDR", "edr", methods={"de3": "DE³ (EDR)"}, own_for=("de3",)),
    Criterion("entropy", "entropy", "entropy", methods={"deebert": "DeeBERT (entropy)"},
              own_for=("deebert",)),
    Criterion("confidence", "max-probability", "confidence", below=False),
    Criterion("dr", "distance ratio", "dr"),
    Criterion("patience", "patience", change="prediction", threshold="fixed", fixed_threshold=0.5, patience="swept",
              methods={"pabee": "PABEE (patience)"}, own_for=("pabee",)),
    Criterion("pcee", "entropy + patience", "entropy", patience="given",
              methods={"pabee": "PCEE (entropy + patience)"}),
    Criterion("regression-patience", "patience (regression)", change="output", threshold="tolerance",
              patience="given", tasks=("regression",), own_for=("de3", "pabee", "deebert")),
    Criterion("full-depth", "full depth (no early exit)", "entropy", exits_early=False,
              tasks=("classification", "regression")),
)})
"""Every exit criterion by name, in the order choices are shown."""
DEFAULT_CRITERION = "edr"
"""The criterion of a policy that names none: DE³-BERT's hybrid indicator."""
FULL_DEPTH = "full-depth"
"""The criterion that never exits early (every input runs every layer)."""
REFERENCE_CRITERION = "entropy"
"""The criterion a trained model's default policy keeps unless another one beats it on the calibration split by more
than the paired bootstrap's noise: across the study it is never far from the best (docs/results.md)."""


def get_criterion(name: str) -> Criterion:
    """The criterion of a name, or a PolicyError listing the names."""
    try:
        return CRITERIA[name]
    except KeyError:
        raise PolicyError(f"unknown exit criterion '{name}'; choose one of {', '.join(CRITERIA)}") from None


def applicable_criteria(regression: bool, has_prototypes: bool, early_only: bool = False) -> tuple[str, ...]:
    """Names of the criteria a model supports; early_only: only those that exit early (the ones calibration tunes)."""
    return tuple(name for name, c in CRITERIA.items()
                 if c.applies_to(regression, has_prototypes) and (c.exits_early or not early_only))


def criterion_label(name: str, recipe: str | None = None) -> str:
    """How to name a criterion on a model trained with `recipe` (see Criterion.label)."""
    return get_criterion(name).label(recipe)


def own_criterion(recipe: str, regression: bool = False) -> str:
    """The exit criterion a training method uses itself, on a classification or a regression task."""
    return next(name for name, c in CRITERIA.items() if recipe in c.own_for and c.applies_to(regression, True))
