"""Reading examples: GLUE TSVs in the official layout, users' own tables, and Hugging Face `datasets`."""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from de3bert.data.tasks import Example, GlueTask, get_task
from de3bert.errors import DataError

GLUE_DOWNLOAD_HINT = ("get the data with the GLUE download script (download_glue_data.py) into a folder and pass "
                      "it with --data-dir (or set $GLUE_DIR), or, with internet, use --hub-dataset nyu-mll/glue")
STSB_RANGE = (0.0, 5.0)
BOM = "\ufeff"


def _lines(path: Path, where: str) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text with its line ending) of a UTF-8 file, dropping a leading BOM."""
    if not path.is_file():
        raise DataError(f"{where}: file not found")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: line {number} is not valid UTF-8 ({err.reason} at byte {err.start}); "
                                "save the file as UTF-8") from None
            yield number, line.removeprefix(BOM) if number == 1 else line


def _columns(count: int) -> str:
    return f"{count} column{'' if count == 1 else 's'}"


def _label_index(value: str, labels: tuple[str, ...], where: str) -> int:
    if value not in labels:
        raise DataError(f"{where}: label {value!r} is not one of {', '.join(labels)}")
    return labels.index(value)


def _score(value: str, where: str, bounds: tuple[float, float] | None = None) -> float:
    try:
        score = float(value)
    except ValueError:
        score = math.nan
    if not math.isfinite(score) or (bounds is not None and not bounds[0] <= score <= bounds[1]):
        wanted = f"a number from {bounds[0]:g} to {bounds[1]:g}" if bounds else "a finite number"
        raise DataError(f"{where}: score {value!r} is not {wanted}")
    return score


def _text(value: object, column: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {column} is {type(value).__name__}, expected text")
    if not value.strip():
        raise DataError(f"{where}: {column} is empty")
    return value


def read_glue_split(task: GlueTask, split: str, data_dir: Path) -> list[Example]:
    """Read one split of a GLUE task from `<data_dir>/<task.folder>/<file>`, quoting disabled as in the GLUE code."""
    if split not in task.splits:
        raise DataError(f"task {task.name} has no split {split!r}; its splits are {', '.join(task.splits)}")
    path = Path(data_dir) / task.folder / task.splits[split]
    where = f"{path} of task {task.name}"
    lines = ((n, line.rstrip("\r\n")) for n, line in _lines(path, where))
    columns: dict[str | int, int] = {i: i for i in range(task.headerless_columns or 0)}
    expected = task.headerless_columns
    if expected is None:
        _, header_line = next(lines, (0, ""))
        if not header_line:
            raise DataError(f"{where}: file is empty, expected a header row")
        header = header_line.split("\t")
        columns = {name: i for i, name in enumerate(header)}
        expected = len(header)
    wanted = [c for c in (task.text_a_column, task.text_b_column, task.label_column) if c is not None]
    missing = [str(c) for c in wanted if c not in columns]
    if missing:
        raise DataError(f"{where}: line 1 (header) lacks column {', '.join(missing)}; "
                        f"it has {', '.join(map(str, columns))}")
    name = {c: str(c) if isinstance(c, str) else f"column {c + 1}" for c in wanted}
    examples = []
    for number, line in lines:
        fields = line.split("\t")
        at = f"{where}: line {number}"
        if len(fields) != expected:
            raise DataError(f"{at} has {_columns(len(fields))}, expected {expected}")
        label_value = fields[columns[task.label_column]]
        label = (_score(label_value, at, STSB_RANGE) if task.is_regression
                 else _label_index(label_value, task.labels, at))
        text_b = None
        if task.text_b_column is not None:
            text_b = _text(fields[columns[task.text_b_column]], name[task.text_b_column], at)
        examples.append(Example(_text(fields[columns[task.text_a_column]], name[task.text_a_column], at),
                                text_b, label))
    if not examples:
        raise DataError(f"{where}: " + ("file is empty" if task.headerless_columns else "has a header but no rows"))
    return examples


def resolve_glue_dir(data_dir: str | Path | None, task: GlueTask) -> Path:
    """`data_dir` if given, else the first of $GLUE_DIR and ../shared/data/glue (from the working directory)
    that holds the task. An explicit `data_dir` is never silently replaced by another folder."""
    if data_dir is not None:
        candidates = [(Path(data_dir), "--data-dir")]
    else:
        candidates = [(Path(os.environ["GLUE_DIR"]), "$GLUE_DIR")] if os.environ.get("GLUE_DIR") else []
        candidates.append((Path.cwd().parent / "shared" / "data" / "glue", "../shared/data/glue"))
    for directory, _ in candidates:
        if (directory / task.folder).is_dir():
            return directory
    looked = "; ".join(f"{directory / task.folder} ({source})" for directory, source in candidates)
    unset = "" if data_dir is not None or os.environ.get("GLUE_DIR") else " ($GLUE_DIR is not set)"
    raise DataError(f"GLUE task {task.name} not found; looked for folder {task.folder} in: {looked}{unset}. "
                    f"To fix: {GLUE_DOWNLOAD_HINT}")


DELIMITERS = {"\t": "tabs", ",": "commas", ";": "semicolons", "|": "vertical bars"}


def _check_delimiter(header: str, delimiter: str, where: str) -> None:
    """Refuse a one-column header that holds another delimiter: the file is separated by something else."""
    for other, name in DELIMITERS.items():
        if other != delimiter and other in header:
            fix = {"\t": "name it .tsv", ",": "name it .csv"}.get(
                other, "save it separated by commas (.csv) or tabs (.tsv)")
            raise DataError(f"{where}: line 1 (header) is one column holding {name}: the file looks separated by "
                            f"{name}, but a {Path(where).suffix.lower()} file is read as separated by "
                            f"{DELIMITERS[delimiter]}; {fix}")


def _table_rows(path: Path, where: str) -> Iterator[tuple[int, dict[str, object]]]:
    """Yield (line number, row) of a CSV, TSV or JSON Lines file with named columns."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl"):
        raise DataError(f"{where}: unsupported file type {suffix or '(none)'!r}; use .csv, .tsv or .jsonl")
    if suffix == ".jsonl":
        for number, line in _lines(path, where):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: line {number} is not a JSON object")
            yield number, row
        return
    delimiter = "\t" if suffix == ".tsv" else ","
    record: list[str] = []  # the raw lines of the record being read, to find a quote that never closes

    def lines() -> Iterator[str]:
        for _, line in _lines(path, where):
            record.append(line)
            yield line

    reader = csv.reader(lines(), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        raise DataError(f"{where}: file is empty, expected a header row")
    _check_quotes(record, 1, delimiter, where)
    if len(header) == 1:
        _check_delimiter(header[0], delimiter, where)
    try:
        while True:
            first, record[:] = reader.line_num + 1, []
            fields = next(reader, None)
            if fields is None:
                return
            _check_quotes(record, first, delimiter, where)
            if not fields:
                continue
            if len(fields) != len(header):
                spans = f" (lines {first} to {reader.line_num} read as one row: a quoted field holds line breaks)" \
                    if reader.line_num > first else ""
                raise DataError(f"{where}: line {reader.line_num} has {_columns(len(fields))}, expected {len(header)}"
                                + spans)
            yield reader.line_num, dict(zip(header, fields))
    except csv.Error as err:
        raise DataError(f"{where}: line {reader.line_num} is not valid {suffix[1:].upper()} ({err})") from None


def _check_quotes(record: list[str], first: int, delimiter: str, where: str) -> None:
    """Refuse a record whose quote never closes: it swallows the rest of the file into one field."""
    if not any('"' in line for line in record):
        return
    try:  # strict parsing fails at the end of the data exactly when a quoted field is still open there
        list(csv.reader(record, delimiter=delimiter, strict=True))
    except csv.Error as err:
        if "unexpected end of data" in str(err):
            rest = f" (lines {first} to {first + len(record) - 1})" if len(record) > 1 else ""
            raise DataError(f"{where}: line {first} opens a quote that never closes, so the rest of the file{rest} "
                            "would be read as one field; close the quote, or double it (\"\") to write a quote "
                            "character") from None


def _sorted_labels(values: Iterable[str]) -> tuple[str, ...]:
    """Label values in sorted order; numerically when all are integers ("2" before "10")."""
    values = set(values)
    try:
        return tuple(sorted(values, key=int))
    except ValueError:
        return tuple(sorted(values))


def _user_label_index(value: str, labels: tuple[str, ...], names: tuple[str, ...], labels_from: str, at: str) -> int:
    if value in labels:
        return labels.index(value)
    if value in names:
        return names.index(value)
    known = ", ".join(labels) + ("" if names in ((), labels) else f" nor their names {', '.join(names)}")
    raise DataError(f"{at}: label {value!r} is not one of {known} ({labels_from})")


def read_rows(rows: Iterable[tuple[str, dict[str, object]]], where: str, text_column: str,
              text_pair_column: str | None = None, label_column: str | None = "label",
              labels: tuple[str, ...] | None = None, label_names: tuple[str, ...] = (),
              labels_from: str = "the labels given") -> tuple[list[Example], tuple[str, ...]]:
    """Examples from rows with named columns, each row given with where it is (e.g. "train.csv: line 3").

    `labels=None` takes the sorted unique label values found (numerically sorted when all are integers);
    `labels=()` makes it a regression task (labels must be finite numbers). A label may also be written as its
    name in `label_names`; `labels_from` says in errors where the labels came from. `label_column=None` reads
    inputs to predict on: every example gets label -1, and the returned labels are `labels or ()`.
    """
    wanted = [c for c in (text_column, text_pair_column, label_column) if c is not None]
    parsed: list[tuple[str, str, str | None, str | None]] = []
    for at, row in rows:
        missing = [c for c in wanted if c not in row]
        if missing:
            raise DataError(f"{at} has no column {', '.join(map(repr, missing))}; "
                            f"available: {', '.join(map(str, row))}")
        text_b = None if text_pair_column is None else _text(row[text_pair_column], text_pair_column, at)
        label = None
        if label_column is not None:
            value = row[label_column]
            if value is None or value == "":
                raise DataError(f"{at}: label column {label_column!r} is empty")
            label = value if isinstance(value, str) else json.dumps(value)
        parsed.append((at, _text(row[text_column], text_column, at), text_b, label))
    if not parsed:
        raise DataError(f"{where}: has no rows")
    if label_column is None:
        return [Example(a, b, -1) for _, a, b, _ in parsed], labels or ()
    if labels is None:
        labels = _sorted_labels(label for *_, label in parsed)
    if not labels:
        return [Example(a, b, _score(label, at)) for at, a, b, label in parsed], labels
    return [Example(a, b, _user_label_index(label, labels, label_names, labels_from, at))
            for at, a, b, label in parsed], labels


def read_table(path: str | Path, text_column: str, text_pair_column: str | None = None,
               label_column: str | None = "label", labels: tuple[str, ...] | None = None,
               label_names: tuple[str, ...] = (),
               labels_from: str = "the labels given") -> tuple[list[Example], tuple[str, ...]]:
    """Read a user's .csv, .tsv or .jsonl file with named columns; returns the examples and the label tuple used
    (the label options as in `read_rows`)."""
    where = str(path)
    rows = ((f"{where}: line {number}", row) for number, row in _table_rows(Path(path), where))
    return read_rows(rows, where, text_column, text_pair_column, label_column, labels, label_names, labels_from)


def load_dataset_splits(dataset_id: str, config: str | None = None, split: str | None = None):
    """A `datasets` dataset — a hub id, or a local folder of data files — as all its splits (a DatasetDict),
    or one split; needs the `datasets` package."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {dataset_id} with the Hugging Face `datasets` library needs the package: "
                        "pip install datasets") from None
    what = dataset_id + (f" (config {config})" if config else "") + (f" split {split}" if split else "")
    try:
        return datasets.load_dataset(dataset_id, config, split=split)
    except Exception as err:  # network, unknown id, config or split: all surface as one actionable error
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"could not load {what}: {reason}") from err


def read_dataset(dataset, where: str, text_column: str, text_pair_column: str | None = None,
                 label_column: str = "label", labels: tuple[str, ...] | None = None,
                 labels_from: str = "the labels given") -> tuple[list[Example], tuple[str, ...]]:
    """Examples of one split of a `datasets` dataset, columns and labels as in `read_rows`. A class-label column
    reads as its class names, and without `labels` the task takes the dataset's class order."""
    names = getattr(dataset.features.get(label_column), "names", None)

    def rows() -> Iterator[tuple[str, dict[str, object]]]:
        for index, row in enumerate(dataset):
            at = f"{where}: row {index}"
            if names is not None and label_column in row:
                value = row[label_column]
                if not isinstance(value, int) or not 0 <= value < len(names):
                    raise DataError(f"{at}: label {value!r} is not a class id from 0 to {len(names) - 1} "
                                    "(an unlabelled split?)")
                row = {**row, label_column: names[value]}
            yield at, row

    if labels is None and names is not None:
        labels = tuple(names)
    return read_rows(rows(), where, text_column, text_pair_column, label_column, labels, (), labels_from)


def _hub_split(task: GlueTask, split: str) -> str:
    if split not in task.splits:
        raise DataError(f"task {task.name} has no split {split!r}; its splits are {', '.join(task.splits)}")
    if split == "train":
        return split
    # The hub calls dev "validation"; MNLI's "dev" is the matched set, as in task.splits.
    return "validation" + task.splits[split].removeprefix("dev").removesuffix(".tsv")


def read_hub_split(dataset_id: str, task: GlueTask, split: str) -> list[Example]:
    """Read one split of a task from a Hugging Face hub dataset laid out like `nyu-mll/glue` (needs `datasets`)."""
    hub_split = _hub_split(task, split)
    where = f"{dataset_id} ({task.name}, split {hub_split})"
    dataset = load_dataset_splits(dataset_id, task.name, hub_split)
    text_a_column, text_b_column = task.hub_columns
    missing = [c for c in (text_a_column, text_b_column, "label") if c is not None and c not in dataset.column_names]
    if missing:
        raise DataError(f"{where} has no column {', '.join(missing)}; it has {', '.join(dataset.column_names)}")
    # Map hub class ids to ours by name (MNLI orders them differently from the files).
    names = getattr(dataset.features["label"], "names", None) or []
    order = ([task.label_names.index(n) for n in names] if names and set(names) <= set(task.label_names)
             else list(range(task.num_labels)))
    examples = []
    for index, row in enumerate(dataset):
        at = f"{where}: row {index}"
        label = row["label"]
        if task.is_regression:
            label = _score(str(label), at, STSB_RANGE)
        elif not 0 <= label < len(order):
            raise DataError(f"{at}: label {label!r} is not a class id from 0 to {len(order) - 1}")
        else:
            label = order[label]
        text_b = None if text_b_column is None else _text(row[text_b_column], text_b_column, at)
        examples.append(Example(_text(row[text_a_column], text_a_column, at), text_b, label))
    return examples


def load_split(task_name: str, split: str, data_dir: str | Path | None = None,
               hub_dataset: str | None = None) -> tuple[GlueTask, list[Example]]:
    """The task and its examples of one split, from the hub if `hub_dataset` is given, else from GLUE TSVs."""
    task = get_task(task_name)
    if hub_dataset is not None:
        return task, read_hub_split(hub_dataset, task, split)
    return task, read_glue_split(task, split, resolve_glue_dir(data_dir, task))


def subsample(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """A fixed random subset of `n` examples (all of them if n >= len), in their original order."""
    if n < 1:
        raise DataError(f"subsample size must be at least 1, got {n}")
    if n >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def split_off(examples: Sequence[Example], fraction: float, seed: int,
              stratified: bool = False) -> tuple[list[Example], list[Example]]:
    """Split into (held out, rest): round(fraction * len) held out at random, or, `stratified`, round(fraction *
    size) of every class (half up, never a class's last example); at least one if fraction > 0."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"held-out fraction must lie in [0, 1), got {fraction}")
    if fraction == 0.0:
        return [], list(examples)
    rng = random.Random(seed)
    if stratified:
        classes: dict[int | float, list[int]] = {}
        for index, example in enumerate(examples):
            classes.setdefault(example.label, []).append(index)
        members = [classes[label] for label in sorted(classes)]
        counts = [min(len(m) - 1, math.floor(fraction * len(m) + 0.5)) for m in members]
        if not any(counts):  # every class too small for its share: one example of the largest one
            largest = max(range(len(members)), key=lambda k: len(members[k]))
            counts[largest] = min(1, len(members[largest]) - 1)
        held = {i for m, count in zip(members, counts) for i in rng.sample(m, count)}
    else:
        count = max(1, round(fraction * len(examples)))
        held = set(rng.sample(range(len(examples)), count)) if count < len(examples) else set()
    if not held or len(held) >= len(examples):
        raise DataError(f"cannot hold out {fraction:g} of {len(examples)} examples and keep any for training")
    return ([e for i, e in enumerate(examples) if i in held],
            [e for i, e in enumerate(examples) if i not in held])
