"""Reading examples: GLUE TSVs in the official layout, users' own tables, and Hugging Face hub datasets."""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from de3bert.data.tasks import Example, TaskSpec, get_task
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


def read_glue_split(task: TaskSpec, split: str, data_dir: Path) -> list[Example]:
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


def resolve_glue_dir(data_dir: str | Path | None, task: TaskSpec) -> Path:
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
    reader = csv.reader((line for _, line in _lines(path, where)), delimiter="\t" if suffix == ".tsv" else ",")
    header = next(reader, None)
    if header is None:
        raise DataError(f"{where}: file is empty, expected a header row")
    try:
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(f"{where}: line {reader.line_num} has {_columns(len(fields))}, expected {len(header)}")
            yield reader.line_num, dict(zip(header, fields))
    except csv.Error as err:
        raise DataError(f"{where}: line {reader.line_num} is not valid {suffix[1:].upper()} ({err})") from None


def read_table(path: str | Path, text_column: str, text_pair_column: str | None = None,
               label_column: str | None = "label",
               labels: tuple[str, ...] | None = None) -> tuple[list[Example], tuple[str, ...]]:
    """Read a user's .csv, .tsv or .jsonl file with named columns; returns the examples and the label tuple used.

    `labels=None` takes the sorted unique label strings found; `labels=()` makes it a regression task (labels must
    be finite numbers). `label_column=None` reads a file to predict on: every example gets label -1, and the
    returned labels are `labels or ()`.
    """
    path = Path(path)
    where = str(path)
    wanted = [c for c in (text_column, text_pair_column, label_column) if c is not None]
    rows: list[tuple[int, str, str | None, str | None]] = []
    for number, row in _table_rows(path, where):
        at = f"{where}: line {number}"
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
        rows.append((number, _text(row[text_column], text_column, at), text_b, label))
    if not rows:
        raise DataError(f"{where}: has no rows")
    if label_column is None:
        return [Example(a, b, -1) for _, a, b, _ in rows], labels or ()
    if labels is None:
        labels = tuple(sorted({label for *_, label in rows}))
    regression = labels == ()
    return [Example(a, b, _score(label, f"{where}: line {number}") if regression
                    else _label_index(label, labels, f"{where}: line {number}"))
            for number, a, b, label in rows], labels


def _hub_split(task: TaskSpec, split: str) -> str:
    if split not in task.splits:
        raise DataError(f"task {task.name} has no split {split!r}; its splits are {', '.join(task.splits)}")
    if split == "train":
        return split
    # The hub calls dev "validation"; MNLI's "dev" is the matched set, as in task.splits.
    return "validation" + task.splits[split].removeprefix("dev").removesuffix(".tsv")


def read_hub_split(dataset_id: str, task: TaskSpec, split: str) -> list[Example]:
    """Read one split of a task from a Hugging Face hub dataset laid out like `nyu-mll/glue` (needs `datasets`)."""
    hub_split = _hub_split(task, split)
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {dataset_id} from the Hugging Face hub needs the `datasets` package: "
                        "pip install datasets") from None
    where = f"{dataset_id} ({task.name}, split {hub_split})"
    try:
        dataset = datasets.load_dataset(dataset_id, task.name, split=hub_split)
    except Exception as err:  # network, unknown id or config: all surface as one actionable error
        raise DataError(f"could not load {where} from the hub: {err}") from err
    text_a_column, text_b_column = task.hub_columns
    missing = [c for c in (text_a_column, text_b_column, "label") if c is not None and c not in dataset.column_names]
    if missing:
        raise DataError(f"{where} has no column {', '.join(missing)}; it has {', '.join(dataset.column_names)}")
    # Map hub class ids to ours by name where the names agree (MNLI orders them differently); GLUE's binary
    # tasks name their classes (e.g. negative/positive) where the files write 0/1, in the same order.
    names = getattr(dataset.features["label"], "names", None) or []
    order = ([task.labels.index(n) for n in names] if names and set(names) <= set(task.labels)
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
               hub_dataset: str | None = None) -> tuple[TaskSpec, list[Example]]:
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


def split_off(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split into (held out, rest) with round(fraction * len) held out (at least one if fraction > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"held-out fraction must lie in [0, 1), got {fraction}")
    if fraction == 0.0:
        return [], list(examples)
    count = max(1, round(fraction * len(examples)))
    if count >= len(examples):
        raise DataError(f"cannot hold out {fraction:g} of {len(examples)} examples and keep any for training")
    held = set(random.Random(seed).sample(range(len(examples)), count))
    return ([e for i, e in enumerate(examples) if i in held],
            [e for i, e in enumerate(examples) if i not in held])
