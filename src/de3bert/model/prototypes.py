"""Class prototypes as running averages of each class's embeddings (the paper's mechanism, DESIGN §1).

During training, per layer and class k present in the batch:

    P_k ← (1 − γ)·P_k + γ·(mean of the batch's class-k embeddings)

A class absent from a batch keeps its prototype; a class seen for the first time takes its batch mean
as it is (a running average started from zero would drag the prototype towards the origin for the
first ~1/γ batches). Like batch-norm statistics, the prototypes are buffers, not parameters: no
gradient reaches them, and under several processes the class sums and counts are all-reduced before
the update, so that every process holds the same prototypes (the update of the whole global batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

PROTOTYPE_KINDS = ("ema", "learned")


def class_sums(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums (C, d) of embeddings (B, d) and per-class counts (C,), in float32; rows labelled
    outside 0..C−1 (e.g. −1, a process's padding row) are left out."""
    embeddings = embeddings.detach().float()
    counted = (labels >= 0) & (labels < num_classes)
    # no boolean indexing: it would wait for the GPU to learn how many rows count
    one_hot = F.one_hot(labels.long().clamp(0, num_classes - 1), num_classes).float() * counted.unsqueeze(-1)
    return one_hot.T @ embeddings, one_hot.sum(0)


def moving_average_update(prototypes: torch.Tensor, initialized: torch.Tensor, sums: torch.Tensor,
                          counts: torch.Tensor, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """New (prototypes, initialized) after one batch: P_k ← (1 − γ)·P_k + γ·mean_k for classes seen before,
    P_k ← mean_k for classes seen for the first time, P_k unchanged for classes absent from the batch."""
    present = counts > 0
    means = sums / counts.clamp_min(1.0).unsqueeze(-1)
    blended = torch.where(initialized.unsqueeze(-1), (1.0 - momentum) * prototypes + momentum * means, means)
    return torch.where(present.unsqueeze(-1), blended, prototypes), initialized | present


def all_reduce_class_sums(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class sums and counts over every process of a distributed run (unchanged in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums, counts
    packed = torch.cat([sums, counts.unsqueeze(-1)], dim=-1)  # one collective instead of two
    dist.all_reduce(packed)
    return packed[:, :-1], packed[:, -1]
