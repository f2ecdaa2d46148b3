import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from de3bert.data import compute_metrics, get_task, main_metric, user_task
from de3bert.errors import DataError


def test_accuracy():
    metrics = compute_metrics(get_task("sst2"), [1, 0, 1, 1], [1, 0, 0, 1])
    assert metrics == {"accuracy": 0.75}
    assert main_metric(get_task("sst2"), metrics) == 0.75


def test_f1_and_accuracy():
    # tp=2, fp=1, fn=1 -> precision 2/3, recall 2/3, f1 2/3; 3 of 5 right
    metrics = compute_metrics(get_task("mrpc"), [1, 1, 1, 0, 0], [1, 1, 0, 1, 0])
    assert metrics["f1"] == pytest.approx(2 / 3) and metrics["accuracy"] == pytest.approx(0.6)
    assert main_metric(get_task("mrpc"), metrics) == pytest.approx(2 / 3)


def test_mcc():
    # tp=1, tn=1, fp=1, fn=1 -> (1 - 1) / ... = 0; tp=2 tn=1 fp=0 fn=1 -> (2 - 0) / sqrt(2*3*1*2) = 2/sqrt(12)
    assert compute_metrics(get_task("cola"), [1, 0, 1, 0], [1, 0, 0, 1]) == {"mcc": 0.0}
    assert compute_metrics(get_task("cola"), [1, 1, 0, 0], [1, 1, 0, 1])["mcc"] == pytest.approx(2 / math.sqrt(12))


def test_pearson_spearman():
    metrics = compute_metrics(get_task("stsb"), [1.0, 2.0, 3.0, 5.0], [2.0, 4.0, 6.0, 7.0])
    assert metrics["spearman"] == pytest.approx(1.0)
    # x - mean = (-1.75, -0.75, 0.25, 2.25), y - mean = (-2.75, -0.75, 1.25, 2.25)
    cov = 4.8125 + 0.5625 + 0.3125 + 5.0625
    vx, vy = 3.0625 + 0.5625 + 0.0625 + 5.0625, 7.5625 + 0.5625 + 1.5625 + 5.0625
    assert metrics["pearson"] == pytest.approx(cov / math.sqrt(vx * vy))
    assert main_metric(get_task("stsb"), metrics) == metrics["pearson"]


def test_constant_predictions_give_zero_not_nan():
    assert compute_metrics(get_task("stsb"), [2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == {"pearson": 0.0, "spearman": 0.0}


def test_length_mismatch_and_missing_main_metric():
    with pytest.raises(DataError, match="2 predictions for 3 references"):
        compute_metrics(get_task("rte"), [0, 1], [0, 1, 1])
    with pytest.raises(DataError, match="main metric 'f1'"):
        main_metric(get_task("qqp"), {"accuracy": 0.5})


def test_accuracy_and_macro_f1_of_a_users_task():
    # class 0: f1 1; class 1: tp 1, fp 1, fn 0 -> 2/3; class 2: tp 0, fn 1 -> 0; macro (1 + 2/3 + 0) / 3
    task = user_task("tickets", ("a", "b", "c"))
    metrics = compute_metrics(task, [0, 0, 1, 1], [0, 0, 1, 2])
    assert metrics == {"accuracy": 0.75, "macro_f1": pytest.approx(5 / 9)}
    assert main_metric(task, metrics) == 0.75


@pytest.mark.filterwarnings("ignore:A single label was found")  # scikit-learn's note on a one-class sample
@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=40))
def test_classification_metrics_equal_scikit_learns(pairs):
    """Written over the confusion matrix, they give scikit-learn's numbers (zero where those are undefined)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    references, predictions = (np.array(side) for side in zip(*pairs))
    binary = (references % 2, predictions % 2)
    mrpc = compute_metrics(get_task("mrpc"), binary[1].tolist(), binary[0].tolist())
    assert mrpc["f1"] == pytest.approx(f1_score(*binary, zero_division=0.0))
    assert mrpc["accuracy"] == pytest.approx(accuracy_score(*binary))
    cola = compute_metrics(get_task("cola"), predictions.tolist(), references.tolist())
    assert cola["mcc"] == pytest.approx(matthews_corrcoef(references, predictions), abs=1e-12)
    users = compute_metrics(user_task("t", ("a", "b", "c", "d")), predictions.tolist(), references.tolist())
    assert users["macro_f1"] == pytest.approx(f1_score(references, predictions, average="macro", zero_division=0.0))
