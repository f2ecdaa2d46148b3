"""Calibrating a folder's exit policy on a user's own inputs (`de3bert calibrate`, `de3bert serve --calibrate-from`).

The thresholds are fitted on the inputs' texts alone — the layer speed-up of a policy follows from the exit layers
— so any sample of production traffic will do; labels, where the file has them, add the metric at each target and
the fastest policy within an accuracy budget (`max_drop`). The result is a new config: the criterion's rows of the
calibrated table replaced, the default policy and its promise (`calibrated_speedup`) set, and what they replace
appended to `calibration_history`. `write_calibration` writes it into the folder — a checkpoint's or an export's
config.json — atomically, and renews a checkpoint's model card.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from de3bert.apps.runtimes import load_model
from de3bert.data import Example, TaskSpec, encode_examples, find_glue_task, read_table, recorded_columns, user_task
from de3bert.errors import DataError, PolicyError
from de3bert.exits.calibration import (RESAMPLES, TARGET_SPEEDUPS, calibrate_targets, default_promise, fastest_within,
                                       full_depth_metric, promise_of)
from de3bert.exits.criteria import CRITERIA, REFERENCE_CRITERION
from de3bert.exits.outputs import collect_layer_outputs
from de3bert.exits.policies import ExitPolicy
from de3bert.exits.runners import ExitRunner, runner_criteria
from de3bert.model.card import write_model_card
from de3bert.model.heads import HeadReads
from de3bert.model.config import EarlyExitConfig, write_config
from de3bert.onnx.format import is_export, read_export_info, write_export_config, write_policy_defaults


@dataclass
class Calibration:
    """What a calibration on a user's inputs found, and the folder's config with it.

    inputs: where the inputs came from (a file's name), examples: how many. rows: one per target speed-up
    (`exits.calibration.promise_row`, or the target with its error). within: the fastest policy within the
    accuracy budget (`fastest_within`), when one was asked. full_depth: the metric of full depth on a labelled
    file. default: the row that became the default policy. config: the folder's config with all of it.
    """

    criterion: str
    inputs: str
    examples: int
    labelled: bool
    metric: str | None
    rows: list[dict]
    within: dict | None
    full_depth: float | None
    default: dict
    config: EarlyExitConfig


def model_task(config: EarlyExitConfig) -> TaskSpec:
    """The task a model was trained for, with its labels and label names: the GLUE task of that name where the labels
    agree, else a user's task."""
    glue = find_glue_task(config.task)
    if glue is not None and list(glue.labels) == config.labels:
        return glue
    return replace(user_task(config.task, tuple(config.labels)), label_names=tuple(config.label_names))


def read_inputs(config: EarlyExitConfig, path: str | Path, text_column: str | None = None,
                text_pair_column: str | None = None, label_column: str | None = None) -> list[Example]:
    """The inputs of a user's .csv, .tsv or .jsonl file, columns by default those of the training data; labelled
    (values or names of the model's labels) only where `label_column` is given, else every label is −1."""
    columns = recorded_columns(config.training, config.task).overridden(text_column, text_pair_column)
    task = model_task(config)
    return read_table(path, columns.text, columns.text_pair, label_column, task.labels, task.label_names,
                      "the model's labels")[0]


def _criterion(model: ExitRunner, criterion: str | None) -> str:
    """The criterion to calibrate: the one asked for, else the default policy's, else the reference one."""
    stored = model.config.policy["criterion"] if model.config.policy else None
    allowed = tuple(name for name in runner_criteria(model) if CRITERIA[name].exits_early)
    chosen = criterion or stored or (REFERENCE_CRITERION if REFERENCE_CRITERION in allowed else allowed[0])
    if chosen not in allowed:
        raise PolicyError(f"criterion '{chosen}' cannot be calibrated on this model; choose one of {', '.join(allowed)}")
    return chosen


def _grid(config: EarlyExitConfig, criterion: str) -> dict:
    """Patience and λ of the calibrated policies: the default policy's where it is of the same criterion, else
    those training calibrated with."""
    policy = config.policy if config.policy and config.policy["criterion"] == criterion else {}
    return {"patience": policy.get("patience", config.training.get("pcee_patience", 2)),
            "lam": policy.get("lam", config.training.get("lam", 1.0))}


def calibrate_model(model: ExitRunner, examples: list[Example], inputs: str, targets: tuple[float, ...],
                    criterion: str | None = None, max_drop: float | None = None, seed: int = 0,
                    resamples: int = RESAMPLES, batch_size: int = 64, progress: bool = False) -> Calibration:
    """Calibrate a model's exit policy on inputs (labelled or not, as `read_inputs` gives them), to each target
    speed-up, and to the fastest policy within `max_drop` points of full depth (labelled inputs only); the default
    policy becomes the `max_drop` one, else the first target's. Nothing is written: `write_calibration` does."""
    if not examples:
        raise DataError(f"{inputs}: no inputs to calibrate on")  # read_table refuses an empty file before this
    targets = tuple(dict.fromkeys(targets))
    if not targets and max_drop is None:
        raise PolicyError("give at least one target speed-up, or --max-drop with a labelled file")
    for target in targets:
        if not (math.isfinite(target) and target >= 1.0):
            raise PolicyError(f"a target speed-up must be a number >= 1 (1 = full depth), got {target:g}")
    labelled = examples[0].label != -1
    if max_drop is not None and not labelled:
        raise PolicyError("--max-drop compares the metric with full depth, so it needs labels: give --label-column")
    criterion = _criterion(model, criterion)
    config = model.config
    task = model_task(config) if labelled else None
    grid = _grid(config, criterion)
    outputs = collect_layer_outputs(model, encode_examples(model.tokenizer, examples, config.max_length), batch_size,
                                    progress, HeadReads(True, None, grid["lam"]))
    rows = calibrate_targets(criterion, outputs, targets, task, resamples, seed, **grid)
    full = full_depth_metric(outputs, task) if task is not None else None
    if full is not None:
        rows = [row | {"metric_drop": 100 * (full - row["metric"])} if "metric" in row else row for row in rows]
    within = None if max_drop is None else fastest_within(criterion, outputs, task, max_drop, resamples, seed, **grid)
    default = within or next((row for row in rows if "error" not in row), None)
    if default is None:
        raise PolicyError(rows[0]["error"])
    return Calibration(criterion, inputs, len(examples), labelled, task.main_metric if task else None, rows, within,
                       full, default, recalibrated(config, criterion, rows, default, inputs))


def recalibrated(config: EarlyExitConfig, criterion: str, rows: list[dict], default: dict,
                 inputs: str) -> EarlyExitConfig:
    """A copy of the config with the criterion's calibrated rows replaced by `rows`, the default policy and its
    promise taken from `default`, and the replaced policy, promise and table appended to the history."""
    new = copy.deepcopy(config)
    new.calibration_history.append({
        "replaced": datetime.now(timezone.utc).isoformat(timespec="seconds"), "replaced_by": inputs,
        "policy": copy.deepcopy(config.policy), "calibrated_speedup": copy.deepcopy(config.calibrated_speedup),
        "calibration": copy.deepcopy(config.calibration)})
    new.calibration = ([row for row in config.calibration if row.get("criterion") != criterion]
                       + [row | {"inputs": inputs} for row in rows])
    new.policy = ExitPolicy(default["criterion"], default["threshold"], default["patience"], default["lam"]).to_dict()
    new.calibrated_speedup = promise_of(default, inputs)
    return new


def write_calibration(folder: str | Path, config: EarlyExitConfig) -> None:
    """Write a recalibrated config into its folder — a checkpoint's config.json, or an export's with its "onnx"
    section kept and the graph's policy defaults rewritten (runtimes that cannot feed the policy inputs run those) —
    atomically file by file (a process killed meanwhile leaves each file old or new, and the folder loads), then
    renew a checkpoint's model card."""
    folder = Path(folder)
    if is_export(folder):
        info = read_export_info(folder)
        info.policy = dict(config.policy)
        write_policy_defaults(folder, info.policy)  # de3bert's runtime feeds config.json's policy either way
        write_export_config(config, info, folder)
        return
    write_config(config, folder)
    write_model_card(config, folder)


def default_targets(config: EarlyExitConfig, first: float | None = None) -> tuple[float, ...]:
    """The targets calibrated when none are given: `first`, else the one the default policy was calibrated to, then
    the others of TARGET_SPEEDUPS (so that the calibrated table keeps its range)."""
    promise = default_promise(config)
    first = first or (promise and promise["target_speedup"])
    return tuple(dict.fromkeys(t for t in (first, *TARGET_SPEEDUPS) if t is not None))


def calibrate_folder(folder: str | Path, input_file: str | Path, targets: tuple[float, ...] | None = None,
                     criterion: str | None = None, text_column: str | None = None,
                     text_pair_column: str | None = None, label_column: str | None = None,
                     max_drop: float | None = None, seed: int = 0, runtime: str | None = None,
                     device: str | None = None, precision: str = "fp32", batch_size: int = 64,
                     progress: bool = False, write: bool = True) -> Calibration:
    """`de3bert calibrate`: load a checkpoint or exported folder, calibrate its policy on a file's inputs
    (`calibrate_model`) and, unless `write` is False, write the result into the folder (`write_calibration`).
    targets None: `default_targets`, or none when `max_drop` is given."""
    model = load_model(folder, runtime, device=device, precision=precision)
    if targets is None:
        targets = () if max_drop is not None else default_targets(model.config)
    examples = read_inputs(model.config, input_file, text_column, text_pair_column, label_column)
    calibration = calibrate_model(model, examples, Path(input_file).name, targets, criterion, max_drop, seed,
                                  batch_size=batch_size, progress=progress)
    if write:
        write_calibration(folder, calibration.config)
    return calibration
