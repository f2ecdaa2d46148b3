"""The exit head attached to every layer: an internal classifier plus a prototypical network."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from de3bert.model.prototypes import PROTOTYPE_KINDS, all_reduce_class_sums, class_sums, moving_average_update

DISTANCES = ("sqeuclidean", "cosine")
POOLINGS = ("cls", "mean")


@dataclass
class HeadOutput:
    """What one exit head produces for a batch.

    logits: (B, C) classifier logits z (C = 1 for regression).
    distances: (B, C) distances r_k from the embedding to each class prototype, or None when the
        prototypical network was not evaluated (regression, or a policy that does not read it).
    indicators: the prediction and exit indicators (B,) computed with the head by
        `exits.indicators.head_indicators` (an exported layer graph does this), or None: the policy computes them.
    """

    logits: torch.Tensor
    distances: torch.Tensor | None = None
    indicators: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class HeadReads:
    """What an exit head must compute for an exit policy: the prototypical network or not, and the one indicator
    the policy reads (None: it reads predictions only), with λ of EDR. A runtime that computes indicators next to
    the head (an exported graph) fetches only that one; PyTorch computes the logits (and distances) and lets the
    policy compute it."""

    prototypes: bool = False
    indicator: str | None = None
    lam: float = 1.0


def prototype_distances(embeddings: torch.Tensor, prototypes: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances (B, C) between embeddings e (B, d) and prototypes P (C, d).

    sqeuclidean: r_k = ||e - P_k||² (DESIGN §1, default); cosine: r_k = 1 - cos(e, P_k). Computed in
    float32: squared distances of a half-precision model pass 65504 (float16's largest) easily.
    """
    embeddings, prototypes = embeddings.float(), prototypes.float()
    if metric == "sqeuclidean":
        return (embeddings.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)
    if metric == "cosine":
        return 1.0 - F.normalize(embeddings, dim=-1) @ F.normalize(prototypes, dim=-1).T
    raise ValueError(f"unknown distance '{metric}'; choose one of {DISTANCES}")


def pool_sequence(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per input (B, H) from hidden states (B, T, H): the [CLS] state, or the mean over
    real (unpadded) tokens — the pooling sentence-embedding backbones were pretrained with."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    raise ValueError(f"unknown pooling '{pooling}'; choose one of {POOLINGS}")


class ExitHead(nn.Module):
    """Pooling → pooler (dense + tanh) → dropout → classifier, and mapping g + prototypes P.

    prototype_kind: "ema" — P is a buffer of running class means, updated in training mode from the
    labelled batches the head sees (prototypes.py; momentum γ) — or "learned" — P is a parameter trained
    by gradient descent.
    """

    def __init__(self, hidden_size: int, num_labels: int, prototype_dim: int | None, distance: str, dropout: float,
                 pooling: str = "cls", prototype_kind: str = "learned", momentum: float = 0.1):
        super().__init__()
        if prototype_kind not in PROTOTYPE_KINDS:
            raise ValueError(f"unknown prototype kind '{prototype_kind}'; choose one of {PROTOTYPE_KINDS}")
        self.pooling = pooling
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)
        self.distance = distance
        self.prototype_kind = prototype_kind
        self.momentum = momentum
        self.projection = nn.Linear(hidden_size, prototype_dim) if prototype_dim else None
        if not prototype_dim:
            self.register_parameter("prototypes", None)
        elif prototype_kind == "learned":
            self.prototypes = nn.Parameter(torch.empty(num_labels, prototype_dim))
        else:
            self.register_buffer("prototypes", torch.zeros(num_labels, prototype_dim))
            self.register_buffer("prototype_initialized", torch.zeros(num_labels, dtype=torch.bool))

    @property
    def has_prototypes(self) -> bool:
        """Whether this head carries a prototypical network."""
        return self.projection is not None

    @property
    def tracks_class_means(self) -> bool:
        """Whether the prototypes are running class means (updated in training mode) rather than parameters."""
        return self.has_prototypes and self.prototype_kind == "ema"

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, with_prototypes: bool = True,
                labels: torch.Tensor | None = None) -> HeadOutput:
        """Logits and (optionally) prototype distances for a layer's hidden states (B, T, H) and mask (B, T).

        labels (B,): in training mode, running-mean prototypes first take in this batch's class means (rows
        labelled −1 do not count); the distances are then measured to the updated prototypes.
        """
        pooled = self.dropout(torch.tanh(self.pooler(pool_sequence(hidden, mask, self.pooling))))
        logits = self.classifier(pooled)
        if not (with_prototypes and self.has_prototypes):
            return HeadOutput(logits)
        embeddings = self.projection(pooled)
        if self.training and labels is not None and self.tracks_class_means:
            self.update_prototypes(embeddings, labels)
        return HeadOutput(logits, prototype_distances(embeddings, self.prototypes, self.distance))

    @torch.no_grad()
    def update_prototypes(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Move the running-mean prototypes towards this batch's class means (over every process)."""
        sums, counts = all_reduce_class_sums(*class_sums(embeddings, labels, self.prototypes.shape[0]))
        prototypes, initialized = moving_average_update(self.prototypes.float(), self.prototype_initialized, sums,
                                                        counts, self.momentum)
        self.prototypes.copy_(prototypes)
        self.prototype_initialized.copy_(initialized)
