import pytest

from de3bert.data import GLUE_TASKS, TaskSpec, default_label_names, get_task, user_task
from de3bert.errors import DataError


@pytest.mark.parametrize("alias, name", [("SST-2", "sst2"), ("sst-2", "sst2"), ("sst2", "sst2"), ("STS-B", "stsb"),
                                         ("stsb", "stsb"), ("sts-b", "stsb"), ("CoLA", "cola"), ("MNLI", "mnli"),
                                         ("qnli", "qnli"), ("Rte", "rte"), ("WNLI", "wnli"), ("qqp", "qqp"),
                                         ("MRPC", "mrpc")])
def test_get_task_accepts_aliases(alias, name):
    assert get_task(alias).name == name


def test_unknown_task_lists_known_ones():
    with pytest.raises(DataError, match="unknown task 'imdb'.*sst2 \\(SST-2\\).*wnli"):
        get_task("imdb")


def test_label_orders_and_sizes():
    assert get_task("mnli").labels == ("contradiction", "entailment", "neutral")
    assert get_task("qnli").labels == get_task("rte").labels == ("entailment", "not_entailment")
    assert all(get_task(n).labels == ("0", "1") for n in ("cola", "sst2", "mrpc", "qqp", "wnli"))
    stsb = get_task("stsb")
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.labels == ()
    assert not get_task("mnli").is_regression and get_task("mnli").num_labels == 3


def test_metrics_and_splits():
    assert {t.name: t.main_metric for t in GLUE_TASKS.values()} == {
        "cola": "mcc", "sst2": "accuracy", "mrpc": "f1", "stsb": "pearson", "qqp": "f1", "mnli": "accuracy",
        "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy"}
    assert get_task("mnli").splits["dev"] == "dev_matched.tsv"
    assert get_task("rte").splits == {"train": "train.tsv", "dev": "dev.tsv"}


def test_task_spec_is_hashable():
    assert len({get_task("rte"), get_task("RTE")}) == 1


def test_glue_label_names():
    names = {t.name: t.label_names for t in GLUE_TASKS.values()}
    assert names == {"cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
                     "mrpc": ("not_equivalent", "equivalent"), "stsb": (), "qqp": ("not_duplicate", "duplicate"),
                     "mnli": ("contradiction", "entailment", "neutral"), "qnli": ("entailment", "not_entailment"),
                     "rte": ("entailment", "not_entailment"), "wnli": ("not_entailment", "entailment")}


def test_user_tasks_and_names_of_old_checkpoints():
    tickets = user_task("tickets", ("billing", "bug", "login"))
    assert tickets.label_names == tickets.labels and (tickets.metric, tickets.main_metric) == ("accuracy_macro_f1",
                                                                                                "accuracy")
    assert user_task("scores", ()).main_metric == "pearson" and user_task("scores", ()).is_regression
    assert tickets.class_counts([0, 2, 2]) == {"billing": 1, "bug": 0, "login": 2}
    assert default_label_names("SST-2", ("0", "1")) == ("negative", "positive")
    assert default_label_names("sst2", ("a", "b")) == ("a", "b") and default_label_names("tiny", ("x",)) == ("x",)
    with pytest.raises(DataError, match="task t: 1 label names for 2 labels"):
        TaskSpec("t", ("a", "b"), "accuracy", "accuracy", ("a",))
