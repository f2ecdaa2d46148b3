"""Task metrics: accuracy (with macro-F1 for users' tasks), F1 with accuracy, Matthews correlation,
Pearson/Spearman correlation.

The classification metrics are written out over the confusion matrix (the same numbers as scikit-learn's,
tests/data/test_metrics.py checks): the service and the engine score policies without loading scikit-learn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr

from de3bert.data.tasks import TaskSpec
from de3bert.errors import DataError


def _correlation(function, predictions: np.ndarray, references: np.ndarray) -> float:
    # Undefined for a constant input; 0.0 keeps sweeps and model selection free of NaN.
    if np.ptp(predictions) == 0 or np.ptp(references) == 0:
        return 0.0
    value = float(function(predictions, references)[0])
    return value if np.isfinite(value) else 0.0


def confusion_matrix(references: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Counts (K, K) of reference class i predicted as class j, over the classes present in either."""
    classes, codes = np.unique(np.concatenate([references, predictions]), return_inverse=True)
    size = len(classes)
    return np.bincount(codes[:len(references)] * size + codes[len(references):], minlength=size * size).reshape(size, size)


def f1_scores(counts: np.ndarray) -> np.ndarray:
    """F1 of every class of a confusion matrix, 2·tp / (2·tp + fp + fn) (0 where the class has none of the three)."""
    tp = np.diag(counts).astype(float)
    wrong = counts.sum(0) + counts.sum(1) - 2 * tp  # fp + fn
    return np.divide(2 * tp, 2 * tp + wrong, out=np.zeros_like(tp), where=(2 * tp + wrong) > 0)


def matthews_correlation(counts: np.ndarray) -> float:
    """Matthews correlation of a confusion matrix (the multi-class form, Gorodkin 2004); 0 where it is undefined."""
    counts = counts.astype(float)
    total, correct = counts.sum(), np.trace(counts)
    predicted, actual = counts.sum(0), counts.sum(1)
    numerator = correct * total - predicted @ actual
    denominator = np.sqrt((total**2 - predicted @ predicted) * (total**2 - actual @ actual))
    return float(numerator / denominator) if denominator else 0.0


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
    accuracy = float(np.mean(pred == ref))
    if task.metric == "f1_accuracy":  # F1 of the positive class, 1
        tp, wrong = np.sum((pred == 1) & (ref == 1)), np.sum((pred == 1) != (ref == 1))
        return {"f1": float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0, "accuracy": accuracy}
    if task.metric == "accuracy_macro_f1":
        # macro: every class counts alike, however rare (an average over the classes present in either)
        return {"accuracy": accuracy, "macro_f1": float(f1_scores(confusion_matrix(ref, pred)).mean())}
    if task.metric == "mcc":
        return {"mcc": matthews_correlation(confusion_matrix(ref, pred))}
    return {"accuracy": accuracy}


def main_metric(task: TaskSpec, metrics: Mapping[str, float]) -> float:
    """The task's headline number from a `compute_metrics` result."""
    if task.main_metric not in metrics:
        raise DataError(f"task {task.name}: metrics {sorted(metrics)} lack its main metric {task.main_metric!r}")
    return float(metrics[task.main_metric])
