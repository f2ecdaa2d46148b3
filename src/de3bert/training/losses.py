"""Training losses of DE³-BERT (DESIGN §1), written as pure functions over tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from de3bert.model.heads import HeadOutput

LAYER_WEIGHTINGS = ("linear", "uniform", "last", "internal")


@dataclass
class LossConfig:
    """Which loss terms are on and how layers are weighted.

    alpha: weight of the prototype cross-entropy CE(q, y); 0 switches it off.
    beta: weight of the distance-aware regularizer DAR; 0 switches it off.
    layer_weighting: "linear" (layer m weighs m, PABEE/DE³), "uniform", "last" (final layer only,
        DeeBERT stage 1) or "internal" (uniform over layers 1..M-1, DeeBERT stage 2).
    """

    alpha: float = 1.0
    beta: float = 1.0
    layer_weighting: str = "linear"


def distance_aware_regularizer(distances: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """DAR per sample: r_y / (r_y + min_{k≠y} r_k) — 0 on its own prototype, 0.5 on the boundary."""
    own = distances.gather(1, labels.unsqueeze(1)).squeeze(1)
    others = distances.scatter(1, labels.unsqueeze(1), float("inf")).min(dim=1).values
    return own / (own + others + eps)


def prototype_cross_entropy(distances: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample CE of q = softmax(−r) against the labels."""
    return F.cross_entropy(-distances, labels, reduction="none")


def layer_loss(output: HeadOutput, labels: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """Mean loss of one layer: CE(p, y) + α·CE(q, y) + β·DAR (MSE for regression heads)."""
    if output.logits.shape[-1] == 1:
        return F.mse_loss(output.logits.squeeze(-1), labels.float())
    loss = F.cross_entropy(output.logits, labels)
    if output.distances is not None:
        if config.alpha:
            loss = loss + config.alpha * prototype_cross_entropy(output.distances, labels).mean()
        if config.beta:
            loss = loss + config.beta * distance_aware_regularizer(output.distances, labels).mean()
    return loss


def layer_weights(num_layers: int, weighting: str) -> torch.Tensor:
    """Normalized weights w_m over layers m = 1..M (they sum to 1)."""
    m = torch.arange(1, num_layers + 1, dtype=torch.float)
    if weighting == "linear":
        weights = m
    elif weighting == "uniform":
        weights = torch.ones(num_layers)
    elif weighting == "last":
        weights = (m == num_layers).float()
    elif weighting == "internal":
        weights = (m < num_layers).float()
    else:
        raise ValueError(f"unknown layer weighting '{weighting}'; choose one of {LAYER_WEIGHTINGS}")
    return weights / weights.sum()


def early_exit_loss(outputs: list[HeadOutput | None], labels: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """Total loss L = Σ_m w_m·L⁽ᵐ⁾ over all exit heads (layers with weight 0 are skipped, and may be None)."""
    weights = layer_weights(len(outputs), config.layer_weighting)
    total = None
    for weight, output in zip(weights.tolist(), outputs):
        if weight:
            term = weight * layer_loss(output, labels, config)
            total = term if total is None else total + term
    return total
