"""Tasks: what a task is (labels, readable label names, metric), the nine GLUE tasks with their file layout,
and the Example every reader yields."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
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
    """What a task is: its name, its classes and how it is scored — the same for GLUE and users' own tasks."""

    name: str
    """Canonical id, e.g. "sst2", or the name of a user's task."""
    labels: tuple[str, ...]
    """Label values as written in the data, in the order of the model's outputs; empty for regression."""
    metric: str
    """Metric family: "accuracy", "accuracy_macro_f1", "f1_accuracy", "mcc" or "pearson_spearman"."""
    main_metric: str
    """Key of the headline number in `compute_metrics` output."""
    label_names: tuple[str, ...] = ()
    """Readable name of each label, in the same order (what predictions say); empty: the label values."""

    def __post_init__(self) -> None:
        if not self.label_names:
            object.__setattr__(self, "label_names", self.labels)
        if len(self.label_names) != len(self.labels):
            raise DataError(f"task {self.name}: {len(self.label_names)} label names for {len(self.labels)} labels")

    @property
    def is_regression(self) -> bool:
        """Whether the task predicts a score instead of a class."""
        return not self.labels

    @property
    def num_labels(self) -> int:
        """Number of model outputs: the class count, or 1 for regression."""
        return len(self.labels) or 1

    def class_counts(self, labels: Iterable[int | float]) -> dict[str, int]:
        """How many of these label indices fall in each class, by label name; empty for regression."""
        counts = Counter(labels)
        return {name: counts[index] for index, name in enumerate(self.label_names)}


@dataclass(frozen=True)
class GlueTask(TaskSpec):
    """A GLUE task: its TaskSpec plus where and how its official TSV files hold the examples."""

    folder: str = field(kw_only=True)
    """Folder of the task in the official GLUE layout, e.g. "SST-2"."""
    splits: dict[str, str] = field(kw_only=True, hash=False)
    """Split name -> file name inside the task's folder."""
    text_a_column: str | int = field(kw_only=True)
    """Header name of the first text column, or its 0-based position in a file without a header."""
    text_b_column: str | int | None = field(kw_only=True)
    """Header name (or position) of the second text column; None for single-sentence tasks."""
    label_column: str | int = field(kw_only=True)
    """Header name (or position) of the label or score column."""
    hub_columns: tuple[str, str | None] = field(kw_only=True)
    """Text column names of the task in the `nyu-mll/glue` hub dataset."""
    headerless_columns: int | None = field(default=None, kw_only=True)
    """Column count of a file that has no header row (CoLA); None when the first row is a header."""


def user_task(name: str, labels: tuple[str, ...]) -> TaskSpec:
    """A user's own task: accuracy with macro-F1 over its classes, or Pearson/Spearman when `labels` is empty
    (regression). Label values are their own names."""
    if not labels:
        return TaskSpec(name, (), "pearson_spearman", "pearson")
    return TaskSpec(name, labels, "accuracy_macro_f1", "accuracy")


_DEV = {"train": "train.tsv", "dev": "dev.tsv"}
_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {task.name: task for task in (
    GlueTask("cola", _BINARY, "mcc", "mcc", ("unacceptable", "acceptable"), folder="CoLA", splits=_DEV,
             text_a_column=3, text_b_column=None, label_column=1, hub_columns=("sentence", None),
             headerless_columns=4),
    GlueTask("sst2", _BINARY, "accuracy", "accuracy", ("negative", "positive"), folder="SST-2", splits=_DEV,
             text_a_column="sentence", text_b_column=None, label_column="label", hub_columns=("sentence", None)),
    GlueTask("mrpc", _BINARY, "f1_accuracy", "f1", ("not_equivalent", "equivalent"), folder="MRPC", splits=_DEV,
             text_a_column="#1 String", text_b_column="#2 String", label_column="Quality",
             hub_columns=("sentence1", "sentence2")),
    GlueTask("stsb", (), "pearson_spearman", "pearson", folder="STS-B", splits=_DEV, text_a_column="sentence1",
             text_b_column="sentence2", label_column="score", hub_columns=("sentence1", "sentence2")),
    GlueTask("qqp", _BINARY, "f1_accuracy", "f1", ("not_duplicate", "duplicate"), folder="QQP", splits=_DEV,
             text_a_column="question1", text_b_column="question2", label_column="is_duplicate",
             hub_columns=("question1", "question2")),
    GlueTask("mnli", ("contradiction", "entailment", "neutral"), "accuracy", "accuracy", folder="MNLI",
             splits={"train": "train.tsv", "dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv",
                     "dev": "dev_matched.tsv"},
             text_a_column="sentence1", text_b_column="sentence2", label_column="gold_label",
             hub_columns=("premise", "hypothesis")),
    GlueTask("qnli", _NLI2, "accuracy", "accuracy", folder="QNLI", splits=_DEV, text_a_column="question",
             text_b_column="sentence", label_column="label", hub_columns=("question", "sentence")),
    GlueTask("rte", _NLI2, "accuracy", "accuracy", folder="RTE", splits=_DEV, text_a_column="sentence1",
             text_b_column="sentence2", label_column="label", hub_columns=("sentence1", "sentence2")),
    # the files write 0/1; the hub dataset names them not_entailment/entailment
    GlueTask("wnli", _BINARY, "accuracy", "accuracy", ("not_entailment", "entailment"), folder="WNLI", splits=_DEV,
             text_a_column="sentence1", text_b_column="sentence2", label_column="label",
             hub_columns=("sentence1", "sentence2")),
)}


def find_glue_task(name: str) -> GlueTask | None:
    """The GLUE task of a name, accepting any case and with or without '-'/'_' ("SST-2", "sts_b"); None if none."""
    return GLUE_TASKS.get(name.lower().replace("-", "").replace("_", ""))


def get_task(name: str) -> GlueTask:
    """The GlueTask for a task name, as `find_glue_task`; an unknown name is an error listing the known ones."""
    task = find_glue_task(name)
    if task is None:
        known = ", ".join(f"{t.name} ({t.folder})" for t in GLUE_TASKS.values())
        raise DataError(f"unknown task {name!r}; known GLUE tasks: {known}")
    return task


def default_label_names(task: str, labels: tuple[str, ...]) -> tuple[str, ...]:
    """Label names for a model that stored none (checkpoints from before names were stored): the GLUE task's
    names where `task` is a GLUE task with these labels, else the labels themselves."""
    glue = find_glue_task(task)
    return glue.label_names if glue is not None and glue.labels == tuple(labels) else tuple(labels)
