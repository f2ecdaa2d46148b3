"""Training recipes: DE³-BERT and the baselines it is compared with, as stages of one trainer.

A recipe is a list of stages (what each trains and with which loss) and whether its heads carry
prototypical networks. Baselines are configurations of
the same model and trainer, not forks of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from de3bert.training.losses import LossConfig, layer_weights


@dataclass
class Stage:
    """One training stage of a recipe.

    loss: the loss terms and layer weighting. train_backbone: whether the encoder is updated.
    train_heads: "all", "final" (last exit head only) or "internal" (every head but the last).
    select_by: "mean" (metric averaged over all exits) or "last" (final exit) to keep the best epoch.
    """

    loss: LossConfig
    train_backbone: bool = True
    train_heads: str = "all"
    select_by: str = "mean"


@dataclass
class Recipe:
    """A training method: its stages and whether its heads carry prototypes (its own exit criterion is in the
    criteria registry, `exits.criteria.own_criterion`)."""

    stages: list[Stage]
    prototypes: bool


RECIPES = {
    # DE³-BERT: joint, linearly weighted CE + α prototype CE + β DAR on every layer.
    "de3": Recipe([Stage(LossConfig(1.0, 1.0, "linear"))], prototypes=True),
    # PABEE: joint, linearly weighted CE.
    "pabee": Recipe([Stage(LossConfig(0.0, 0.0, "linear"))], prototypes=False),
    # DeeBERT: fine-tune backbone + final head, then freeze them and train the internal heads.
    "deebert": Recipe(
        [Stage(LossConfig(0.0, 0.0, "last"), train_heads="final", select_by="last"),
         Stage(LossConfig(0.0, 0.0, "internal"), train_backbone=False, train_heads="internal")],
        prototypes=False),
}


def trained_exits(loss: LossConfig, num_layers: int) -> list[int]:
    """Indices of the exit heads a loss reads (layers it weighs by 0 need not be computed)."""
    return [m for m, weight in enumerate(layer_weights(num_layers, loss.layer_weighting).tolist()) if weight]


def stage_loss(recipe: Recipe, stage: Stage, alpha: float | None, beta: float | None) -> LossConfig:
    """The stage's loss with a run's α/β overrides applied (prototype recipes only; None keeps the recipe's)."""
    if not recipe.prototypes:
        return stage.loss
    return LossConfig(stage.loss.alpha if alpha is None else alpha, stage.loss.beta if beta is None else beta,
                      stage.loss.layer_weighting)
