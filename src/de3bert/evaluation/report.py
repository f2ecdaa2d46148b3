"""`de3bert evaluate`: every exit's metric, the oracle, threshold sweeps, calibrated policies, separation, plot.

All of it works on `LayerOutputs` — every head's output for every sample, computed once — and on
`simulate_exits`, the same decision code the inference engine runs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from de3bert.data import TaskSpec, encode_examples, main_metric, read_table
from de3bert.evaluation.plots import plot_tradeoff
from de3bert.evaluation.run_data import calibration_split, evaluation_source, split_examples
from de3bert.evaluation.separation import indicator_auroc
from de3bert.exits.calibration import calibrated_table, candidate_policies, describe_choice, evaluate_policy
from de3bert.exits.criteria import CRITERIA, applicable_criteria
from de3bert.exits.outputs import LayerOutputs, collect_layer_outputs, layer_metrics, task_metrics
from de3bert.exits.policies import speedup_ratio
from de3bert.model.card import write_model_card
from de3bert.model.modeling import EarlyExitModel


def oracle(outputs: LayerOutputs, task: TaskSpec) -> dict | None:
    """The shallowest-correct-exit oracle: metric and speed-up (None for regression)."""
    if task.is_regression:
        return None
    correct = outputs.predictions() == outputs.labels.unsqueeze(0)  # (M, N)
    any_correct = correct.any(0)
    first = correct.float().argmax(0)
    exit_index = torch.where(any_correct, first, torch.full_like(first, outputs.num_layers - 1))
    predictions = outputs.predictions().gather(0, exit_index.unsqueeze(0)).squeeze(0)
    metrics = task_metrics(task, predictions, outputs.labels)
    return {"criterion": "oracle", "speedup": speedup_ratio(exit_index + 1, outputs.num_layers),
            "metric": main_metric(task, metrics), "mean_exit_layer": float((exit_index + 1).float().mean()), **metrics}


def sweep(criterion: str, outputs: LayerOutputs, task: TaskSpec, **grid) -> list[dict]:
    """Trade-off rows over a grid of thresholds (or patiences), sorted by speed-up."""
    rows = [evaluate_policy(p, outputs, task) for p in candidate_policies(criterion, outputs, **grid)]
    return sorted(rows, key=lambda r: (r["speedup"], -r["metric"]))


def evaluate_checkpoint(checkpoint: str | Path, task_name: str | None = None, data_dir: str | None = None,
                        hub_dataset: str | None = None, output_dir: str | Path | None = None,
                        batch_size: int = 64, pcee_patience: int = 2, lam: float | None = None,
                        progress: bool = True, split: str = "dev", eval_file: str | Path | None = None,
                        text_column: str | None = None, text_pair_column: str | None = None,
                        label_column: str | None = None, device: str | None = None, precision: str = "fp32") -> dict:
    """Per-layer metrics, oracle, sweeps and calibrated trade-off of a checkpoint; writes JSON, CSV, PNG.

    It is scored on its dev set, another split of its data (`split`, e.g. "dev_mismatched"), or a labelled file
    (`eval_file`: .csv, .tsv or .jsonl, its columns by default those of the training data; labels as values or
    names). Thresholds are calibrated on the run's calibration slice, rebuilt from its data (see
    `evaluation_source`). The model runs on `device` in `precision` (as in EarlyExitModel.from_pretrained).
    """
    model = EarlyExitModel.from_pretrained(checkpoint, device=device, precision=precision)
    source = evaluation_source(model, task_name, data_dir, hub_dataset)
    data, evaluated_on, examples = split_examples(model, source, split)
    task = data.task
    if eval_file is not None:
        columns = source.columns.overridden(text_column, text_pair_column, label_column)
        evaluated_on = Path(eval_file).name
        examples = read_table(eval_file, columns.text, columns.text_pair, columns.label, task.labels,
                              task.label_names, "the model's labels")[0]
    max_length = model.config.max_length
    evaluated = collect_layer_outputs(model, encode_examples(model.tokenizer, examples, max_length), batch_size,
                                      progress)
    split_name, cal_examples = calibration_split(data)
    calibration = collect_layer_outputs(model, encode_examples(model.tokenizer, cal_examples, max_length),
                                        batch_size, progress)
    grid = {"patience": pcee_patience, "lam": lam if lam is not None else (model.config.policy or {}).get("lam", 1.0)}
    criteria = applicable_criteria(model.config.is_regression, model.has_prototypes, early_only=True)
    layers = layer_metrics(evaluated, task)
    report = {
        "checkpoint": str(checkpoint), "task": task.name, "recipe": model.config.training.get("recipe"),
        "metric": task.main_metric,
        "num_layers": evaluated.num_layers, "evaluated_on": evaluated_on, "eval_examples": len(examples),
        "class_counts": task.class_counts(e.label for e in examples),
        "calibration_split": split_name, "calibration_examples": len(cal_examples),
        "layer_metrics": layers, "full_depth": main_metric(task, layers[-1]), "oracle": oracle(evaluated, task),
        "sweeps": {c: sweep(c, evaluated, task, **grid) for c in criteria},
        "calibrated": calibrated_table(criteria, calibration, evaluated, task, **grid),
        "separation": {c: indicator_auroc(c, evaluated, grid["lam"]) for c in criteria if CRITERIA[c].separates},
        "overhead": model.overhead(),
    }
    if output_dir is not None:
        write_report(report, Path(output_dir))
        if Path(output_dir).resolve().is_relative_to(Path(checkpoint).resolve()):
            selection = model.config.policy_selection
            if selection and "summary" not in selection:  # a checkpoint written before selections carried one
                selection["summary"] = describe_choice(selection)
            write_model_card(model.config, Path(checkpoint))  # the card now shows the plot
    return report


def write_report(report: dict, output_dir: Path) -> None:
    """Write evaluation.json, sweeps.csv, calibrated.csv and tradeoff.png into a folder."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "evaluation.json").write_text(json.dumps(report, indent=2))
    sweep_rows = [row for rows in report["sweeps"].values() for row in rows]
    _write_csv(output_dir / "sweeps.csv", sweep_rows)
    _write_csv(output_dir / "calibrated.csv", report["calibrated"])
    plot_tradeoff(report["sweeps"], output_dir / "tradeoff.png",
                  f"{report['task']} {report['evaluated_on']}: accuracy/speed trade-off "
                  f"({report['num_layers']} layers)", report["metric"],
                  report["full_depth"], report["oracle"], report["calibrated"], report.get("recipe"))


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
