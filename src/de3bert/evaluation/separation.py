"""How well an indicator separates right from wrong answers, layer by layer (AUROC)."""

from __future__ import annotations

from sklearn.metrics import roc_auc_score

from de3bert.errors import PolicyError
from de3bert.exits.outputs import LayerOutputs
from de3bert.exits.policies import ExitPolicy


def indicator_auroc(criterion: str, outputs: LayerOutputs, lam: float = 1.0) -> list[float | None]:
    """Per layer: AUROC of the indicator (oriented so higher = more certain) against that exit being
    correct — how well the criterion separates right from wrong answers (0.5 = not at all)."""
    if outputs.logits.shape[-1] == 1:
        raise PolicyError("indicator separation is defined for classification tasks only")
    probe = ExitPolicy(criterion, lam=lam)
    orientation = -1.0 if probe.spec.below else 1.0
    correct = outputs.predictions() == outputs.labels.unsqueeze(0)  # (M, N)
    scores = []
    for m, head in enumerate(outputs.heads()):
        if probe.needs_prototypes and head.distances is None:  # a last layer without prototypes
            scores.append(None)
            continue
        indicator, _ = probe.indicator(head, None)
        labels = correct[m]
        both_present = bool(labels.any()) and not bool(labels.all())
        scores.append(float(roc_auc_score(labels.numpy(), (orientation * indicator).numpy())) if both_present else None)
    return scores
