"""Task metrics: accuracy (with macro-F1 for users' tasks), F1 with accuracy, Matthews correlation,
Pearson/Spearman correlation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from de3bert.data.tasks import TaskSpec
from de3bert.errors import DataError


def _correlation(function, predictions: np.ndarray, references: np.ndarray) -> float:
    # Undefined for a constant input; 0.0 keeps sweeps and model selection free of NaN.
    if np.ptp(predictions) == 0 or np.ptp(references) == 0:
        return 0.0
    value = float(function(predictions, references)[0])
    return value if np.isfinite(value) else 0.0


def compute_metrics(task: TaskSpec, predictions: Sequence[int | float],
                    references: Sequence[int | float]) -> dict[str, float]:
    """The task's metrics (fractions, not percentages) for class indices or regression scores."""
    if len(predictions) != len(references):
        raise DataError(f"task {task.name}: {len(predictions)} predictions for {len(references)} references")
    if not len(references):
        raise DataError(f"task {task.name}: no predictions to score")
    if task.metric == "pearson_spearman":
        pred, ref = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
        return {"pearson": _correlation(pearsonr, pred, ref), "spearman": _correlation(spearmanr, pred, ref)}
    pred, ref = np.asarray(predictions, dtype=int), np.asarray(references, dtype=int)
    accuracy = float(accuracy_score(ref, pred))
    if task.metric == "f1_accuracy":
        return {"f1": float(f1_score(ref, pred, pos_label=1, zero_division=0.0)), "accuracy": accuracy}
    if task.metric == "accuracy_macro_f1":
        # macro: every class counts alike, however rare (an average over the classes present in either)
        return {"accuracy": accuracy, "macro_f1": float(f1_score(ref, pred, average="macro", zero_division=0.0))}
    if task.metric == "mcc":
        return {"mcc": float(matthews_corrcoef(ref, pred))}
    return {"accuracy": accuracy}


def main_metric(task: TaskSpec, metrics: Mapping[str, float]) -> float:
    """The task's headline number from a `compute_metrics` result."""
    if task.main_metric not in metrics:
        raise DataError(f"task {task.name}: metrics {sorted(metrics)} lack its main metric {task.main_metric!r}")
    return float(metrics[task.main_metric])
