"""Where a run's examples come from: a GLUE task, a user's own files, or any `datasets` dataset.

A source is chosen once, at the edge (the command line, or the caller in Python), and carried as a small
typed description that round-trips through JSON: the trainer saves it with its state (so `resume` reads the
same data) and the checkpoint keeps it (so `evaluate` rebuilds the very same held-out slices and knows the
column names). `load_run_data` turns a source into the examples of a run.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from de3bert.data.readers import load_dataset_splits, load_split, read_dataset, read_table, split_off, subsample
from de3bert.data.tasks import Example, TaskSpec, find_glue_task, get_task, user_task
from de3bert.errors import DataError

TRAIN, DEV = "train", "dev"
GIVEN, SEEN = "the labels given", "the labels seen in training"


@dataclass(frozen=True)
class Columns:
    """The columns of a user's table or dataset holding the text, the second text of a pair, and the label."""

    text: str = "text"
    text_pair: str | None = None
    label: str = "label"

    def overridden(self, text: str | None = None, text_pair: str | None = None, label: str | None = None) -> Columns:
        """These columns with the names that are given (not None) replaced."""
        return Columns(text or self.text, text_pair or self.text_pair, label or self.label)


@dataclass
class _Source:
    """What every source shares: its JSON form."""

    kind: ClassVar[str]

    def to_dict(self) -> dict:
        """JSON-ready form, tagged with the source's kind."""
        return {"kind": self.kind, **asdict(self)}


@dataclass
class GlueSource(_Source):
    """A GLUE task: official TSVs from `data_dir` (default: $GLUE_DIR, else ../shared/data/glue; kept absolute), or
    the hub dataset `hub_dataset` laid out like nyu-mll/glue."""

    task: str
    data_dir: str | None = None
    hub_dataset: str | None = None
    kind: ClassVar[str] = "glue"

    def __post_init__(self) -> None:
        self.task = get_task(self.task).name
        self.data_dir = self.data_dir and os.path.abspath(self.data_dir)

    @property
    def name(self) -> str:
        """The task's canonical name."""
        return self.task

    @property
    def columns(self) -> Columns:
        """The task's column names in its TSV files (defaults of `predict --input` and `evaluate --eval-file`)."""
        task = get_task(self.task)
        named = [c if isinstance(c, str) else None for c in (task.text_a_column, task.text_b_column, task.label_column)]
        return Columns(named[0] or "text", named[1], named[2] or "label")

    def describe(self) -> str:
        """One line saying where the examples come from."""
        where = f"hub dataset {self.hub_dataset}" if self.hub_dataset else (self.data_dir or "the default GLUE folder")
        return f"GLUE task {self.task} ({where})"

    def read_train(self) -> tuple[TaskSpec, list[Example]]:
        """The task and its training examples."""
        return load_split(self.task, TRAIN, self.data_dir, self.hub_dataset)

    def read(self, split: str, spec: TaskSpec) -> list[Example]:
        """The examples of one split of the task ("dev", or another of its splits, e.g. "dev_mismatched")."""
        return load_split(self.task, split, self.data_dir, self.hub_dataset)[1]


@dataclass(kw_only=True)
class _UserSource(_Source, ABC):
    """What a user's files and a `datasets` dataset share: columns, and labels found in the training data
    (sorted; numerically when all are integers), fixed by `labels`, or numeric scores with `regression`."""

    columns: Columns = field(default_factory=Columns)
    labels: tuple[str, ...] | None = None
    """The class labels in output order (None: the sorted labels found in the training data)."""
    regression: bool = False
    """Predict a numeric score instead of a class."""

    def __post_init__(self) -> None:
        if isinstance(self.columns, dict):
            self.columns = Columns(**self.columns)
        if self.labels is None:
            return
        self.labels = tuple(self.labels)
        if self.regression:
            raise DataError("labels and regression exclude each other: a regression task has a score, not labels")
        if not self.labels:
            raise DataError("labels is empty; give the class labels, or none to take those of the training data")
        if not all(self.labels):
            raise DataError(f"labels {', '.join(map(repr, self.labels))} include an empty one; give non-empty labels")
        repeated = sorted({label for label in self.labels if self.labels.count(label) > 1})
        if repeated:
            raise DataError(f"labels repeat {', '.join(map(repr, repeated))}; give each label once")

    @abstractmethod
    def _read(self, split: str, labels: tuple[str, ...] | None,
              labels_from: str) -> tuple[list[Example], tuple[str, ...]] | None:
        """Examples and labels of a split; None when the source has no such split (a dev set to hold out)."""

    def _describe_columns(self) -> str:
        columns = self.columns
        pair = f", text pair column {columns.text_pair}" if columns.text_pair else ""
        target = "score" if self.regression else "label"
        return f"text column {columns.text}{pair}, {target} column {columns.label}"

    def read_train(self) -> tuple[TaskSpec, list[Example]]:
        """The task (labels resolved from the training data) and its training examples."""
        examples, labels = self._read(TRAIN, () if self.regression else self.labels, GIVEN)
        if self.labels is not None:
            seen = {e.label for e in examples}
            unused = [label for index, label in enumerate(labels) if index not in seen]
            if unused:
                raise DataError(f"{self.training_data}: no example has label {', '.join(map(repr, unused))}, which "
                                "the labels given include; give only labels that occur in the training data")
        return user_task(self.name, labels), examples

    def read(self, split: str, spec: TaskSpec) -> list[Example] | None:
        """The examples of a split with the task's labels; None for "dev" when the source has none."""
        found = self._read(split, spec.labels, SEEN if self.labels is None else GIVEN)
        return None if found is None else found[0]


@dataclass
class FileSource(_UserSource):
    """A user's .csv, .tsv or .jsonl files: training data and, optionally, a validation file (the run's dev)."""

    train_file: str
    validation_file: str | None = None
    kind: ClassVar[str] = "files"

    def __post_init__(self) -> None:
        super().__post_init__()
        # absolute, so that a checkpoint's evaluation finds its data from any working directory
        self.train_file = os.path.abspath(self.train_file)
        self.validation_file = self.validation_file and os.path.abspath(self.validation_file)

    @property
    def training_data(self) -> str:
        """Where the training examples are, for messages."""
        return self.train_file

    @property
    def name(self) -> str:
        """The training file's name without suffix; its folder's name when that says only "train"."""
        path = Path(self.train_file)
        return path.parent.name if path.stem.lower() in ("train", "training") and path.parent.name else path.stem

    def describe(self) -> str:
        """One line saying where the examples come from."""
        validation = f", validation file {self.validation_file}" if self.validation_file else ""
        return f"training file {self.train_file}{validation}; {self._describe_columns()}"

    def _read(self, split: str, labels: tuple[str, ...] | None,
              labels_from: str) -> tuple[list[Example], tuple[str, ...]] | None:
        files = {TRAIN: self.train_file, DEV: self.validation_file}
        if split not in files:
            raise DataError(f"data from files has the splits train and dev (the validation file), not {split!r}; "
                            "evaluate another file with --eval-file")
        if files[split] is None:
            return None
        columns = self.columns
        return read_table(files[split], columns.text, columns.text_pair, columns.label, labels, (), labels_from)


@dataclass
class DatasetSource(_UserSource):
    """Any dataset the `datasets` library loads: a hub id (with a config name) or a local folder of data files.

    validation_split: the split that picks the best epoch; None takes the dataset's "validation" split when it
    has one, else a slice held out from training.
    """

    dataset: str
    config: str | None = None
    train_split: str = TRAIN
    validation_split: str | None = None
    kind: ClassVar[str] = "dataset"

    @property
    def training_data(self) -> str:
        """Where the training examples are, for messages."""
        return f"{self.dataset} split {self.train_split}"

    @property
    def name(self) -> str:
        """The dataset's name (the last part of its id or folder), with its config."""
        base = Path(self.dataset.rstrip("/")).name or self.dataset
        return f"{base}-{self.config}" if self.config else base

    def describe(self) -> str:
        """One line saying where the examples come from."""
        config = f" (config {self.config})" if self.config else ""
        validation = f", validation split {self.validation_split}" if self.validation_split else ""
        return (f"dataset {self.dataset}{config}, training split {self.train_split}{validation}; "
                f"{self._describe_columns()}")

    def _read(self, split: str, labels: tuple[str, ...] | None,
              labels_from: str) -> tuple[list[Example], tuple[str, ...]] | None:
        splits = load_dataset_splits(self.dataset, self.config)
        fallback = "validation" if "validation" in splits else None
        name = {TRAIN: self.train_split, DEV: self.validation_split or fallback}.get(split, split)
        if name is None:
            return None
        if name not in splits:
            raise DataError(f"dataset {self.dataset} has no split {name!r}; its splits are {', '.join(splits)}")
        columns = self.columns
        return read_dataset(splits[name], f"{self.dataset} split {name}", columns.text, columns.text_pair,
                            columns.label, labels, labels_from)


DataSource = GlueSource | FileSource | DatasetSource
SOURCES: dict[str, type] = {cls.kind: cls for cls in (GlueSource, FileSource, DatasetSource)}


def source_from_dict(data: dict) -> DataSource:
    """Inverse of `to_dict`."""
    fields = dict(data)
    kind = fields.pop("kind", None)
    if kind not in SOURCES:
        raise DataError(f"unknown kind of data source {kind!r}; known: {', '.join(SOURCES)}")
    try:
        return SOURCES[kind](**fields)
    except TypeError as exc:
        raise DataError(f"the {kind} data source {fields} cannot be read by this de3bert: {exc}") from exc


def as_source(data: DataSource | str, data_dir: str | None = None, hub_dataset: str | None = None) -> DataSource:
    """`data` itself, or for a GLUE task name (the shorthand), GlueSource(name, data_dir, hub_dataset)."""
    if isinstance(data, str):
        return GlueSource(data, data_dir, hub_dataset)
    if data_dir is not None or hub_dataset is not None:
        raise DataError("data_dir and hub_dataset go with a GLUE task name; a data source carries its own location")
    return data


def recorded_source(training: dict, task: str) -> DataSource | None:
    """The source a checkpoint was trained on: recorded with its training, or for a checkpoint from before sources
    were recorded, the GLUE task of its name (None if it is not one)."""
    if "data" in training:
        return source_from_dict(training["data"])
    return GlueSource(task) if find_glue_task(task) is not None else None


def recorded_columns(training: dict, task: str) -> Columns:
    """The columns of the data a checkpoint was trained on (defaults for the files it reads later), else the
    defaults text and label."""
    source = recorded_source(training, task)
    return Columns() if source is None else source.columns


def with_location(source: DataSource, data_dir: str | None, hub_dataset: str | None) -> DataSource:
    """A GLUE source read from another folder or hub dataset; any other source unchanged (and refused with them)."""
    if data_dir is None and hub_dataset is None:
        return source
    if not isinstance(source, GlueSource):
        raise DataError(f"--data-dir and --hub-dataset locate GLUE data; this run read {source.name} "
                        f"({source.kind}), which records its own location")
    return replace(source, data_dir=data_dir or source.data_dir, hub_dataset=hub_dataset or source.hub_dataset)


@dataclass
class RunData:
    """The examples of a run: training, the dev set that picks the best epoch, the calibration slice."""

    task: TaskSpec
    train: list[Example]
    dev: list[Example]
    calibration: list[Example]
    """Held out from training to calibrate exit thresholds (empty: they are calibrated on dev)."""
    dev_split: str
    """What dev is: "dev" (the source's), or "validation" held out from training."""


def load_run_data(source: DataSource, max_train_samples: int | None = None, validation_fraction: float = 0.1,
                  calibration_fraction: float = 0.1, seed: int = 42) -> RunData:
    """A run's examples: the training data, subsampled to `max_train_samples`, less a calibration slice
    (`calibration_fraction`, at random), less — when the source has no dev set — a validation slice
    (`validation_fraction`, stratified by class) that picks the best epoch. Seeded: the same every time."""
    task, train = source.read_train()
    dev = source.read(DEV, task)
    if max_train_samples:
        train = subsample(train, max_train_samples, seed)
    calibration, train = split_off(train, calibration_fraction, seed)
    if dev is not None:
        return RunData(task, train, dev, calibration, DEV)
    if not validation_fraction:
        raise DataError(f"{source.name} has no validation data: give a validation file (or split), or hold out "
                        "a validation fraction above 0")
    dev, train = split_off(train, validation_fraction, seed, stratified=not task.is_regression)
    return RunData(task, train, dev, calibration, "validation")
