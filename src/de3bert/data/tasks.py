"""The nine GLUE tasks: file layout, label order and metric of each, and the Example they yield."""

from __future__ import annotations

from dataclasses import dataclass, field

from de3bert.errors import DataError


@dataclass(frozen=True)
class Example:
    """One input: a text or text pair and its label (index into the task's labels, or a float score)."""

    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to read, model and score one GLUE task."""

    name: str
    """Canonical lowercase id, e.g. "sst2"."""
    folder: str
    """Folder of the task in the official GLUE layout, e.g. "SST-2"."""
    labels: tuple[str, ...]
    """Label strings as written in the files, in the order of the model's outputs; empty for regression."""
    metric: str
    """Metric family: "accuracy", "f1_accuracy", "mcc" or "pearson_spearman"."""
    main_metric: str
    """Key of the headline number in `compute_metrics` output."""
    splits: dict[str, str] = field(hash=False)
    """Split name -> file name inside the task's folder."""
    text_a_column: str | int
    """Header name of the first text column, or its 0-based position in a file without a header."""
    text_b_column: str | int | None
    """Header name (or position) of the second text column; None for single-sentence tasks."""
    label_column: str | int
    """Header name (or position) of the label or score column."""
    hub_columns: tuple[str, str | None]
    """Text column names of the task in the `nyu-mll/glue` hub dataset."""
    headerless_columns: int | None = None
    """Column count of a file that has no header row (CoLA); None when the first row is a header."""

    @property
    def is_regression(self) -> bool:
        """Whether the task predicts a score instead of a class."""
        return not self.labels

    @property
    def num_labels(self) -> int:
        """Number of model outputs: the class count, or 1 for regression."""
        return len(self.labels) or 1


_DEV = {"train": "train.tsv", "dev": "dev.tsv"}
_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, TaskSpec] = {task.name: task for task in (
    TaskSpec("cola", "CoLA", _BINARY, "mcc", "mcc", _DEV, 3, None, 1, ("sentence", None), headerless_columns=4),
    TaskSpec("sst2", "SST-2", _BINARY, "accuracy", "accuracy", _DEV, "sentence", None, "label", ("sentence", None)),
    TaskSpec("mrpc", "MRPC", _BINARY, "f1_accuracy", "f1", _DEV, "#1 String", "#2 String", "Quality",
             ("sentence1", "sentence2")),
    TaskSpec("stsb", "STS-B", (), "pearson_spearman", "pearson", _DEV, "sentence1", "sentence2", "score",
             ("sentence1", "sentence2")),
    TaskSpec("qqp", "QQP", _BINARY, "f1_accuracy", "f1", _DEV, "question1", "question2", "is_duplicate",
             ("question1", "question2")),
    TaskSpec("mnli", "MNLI", ("contradiction", "entailment", "neutral"), "accuracy", "accuracy",
             {"train": "train.tsv", "dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv",
              "dev": "dev_matched.tsv"}, "sentence1", "sentence2", "gold_label", ("premise", "hypothesis")),
    TaskSpec("qnli", "QNLI", _NLI2, "accuracy", "accuracy", _DEV, "question", "sentence", "label",
             ("question", "sentence")),
    TaskSpec("rte", "RTE", _NLI2, "accuracy", "accuracy", _DEV, "sentence1", "sentence2", "label",
             ("sentence1", "sentence2")),
    TaskSpec("wnli", "WNLI", _BINARY, "accuracy", "accuracy", _DEV, "sentence1", "sentence2", "label",
             ("sentence1", "sentence2")),
)}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def get_task(name: str) -> TaskSpec:
    """The TaskSpec for a task name, accepting any case and with or without '-'/'_' ("SST-2", "sts_b")."""
    task = GLUE_TASKS.get(_key(name))
    if task is None:
        known = ", ".join(f"{t.name} ({t.folder})" for t in GLUE_TASKS.values())
        raise DataError(f"unknown task {name!r}; known GLUE tasks: {known}")
    return task
