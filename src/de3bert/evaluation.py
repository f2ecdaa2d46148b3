"""Offline evaluation: every exit's metric, the oracle, threshold sweeps and calibration.

All of it works on `LayerOutputs` — every head's output for every sample, computed once — and
on `simulate_exits`, the same decision code the inference engine runs.
"""

from __future__ import annotations

import csv
import math
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from de3bert.data import (Collator, DataSource, EncodedExample, Example, GlueSource, RunData, TaskSpec, as_source,
                          compute_metrics, encode_examples, load_run_data, main_metric, read_table, recorded_source,
                          with_location)
from de3bert.errors import CheckpointError, PolicyError
from de3bert.heads import HeadOutput
from de3bert.model_card import write_model_card
from de3bert.modeling import EarlyExitModel
from de3bert.plots import plot_tradeoff
from de3bert.policies import CRITERIA, ExitPolicy, simulate_exits, speedup_ratio

if TYPE_CHECKING:
    from de3bert.onnx_model import OnnxEarlyExitModel

T = TypeVar("T")
CLASSIFICATION_CRITERIA = ("edr", "entropy", "confidence", "dr", "patience", "pcee")
TARGET_SPEEDUPS = (1.5, 2.0, 3.0)


@dataclass
class LayerOutputs:
    """Every exit head's output on a dataset: logits (M, N, C), labels (N,), and distances (K, N, C) of the first
    K layers, those with a prototypical network (K = M − 1 when the last layer has none), or None."""

    logits: torch.Tensor
    distances: torch.Tensor | None
    labels: torch.Tensor

    @classmethod
    def from_layers(cls, layers: list[HeadOutput], labels: torch.Tensor) -> LayerOutputs:
        """Stack one batch's per-layer head outputs (float32, on the CPU)."""
        distances = [layer.distances.float().cpu() for layer in layers if layer.distances is not None]
        return cls(torch.stack([layer.logits.float().cpu() for layer in layers]),
                   torch.stack(distances) if distances else None, labels)

    @property
    def num_layers(self) -> int:
        """Number of exits M."""
        return self.logits.shape[0]

    def heads(self) -> list[HeadOutput]:
        """Per-layer HeadOutputs, the form policies read."""
        with_distances = 0 if self.distances is None else self.distances.shape[0]
        return [HeadOutput(self.logits[m], self.distances[m] if m < with_distances else None)
                for m in range(self.num_layers)]

    def predictions(self) -> torch.Tensor:
        """(M, N) prediction of every exit: class index, or score for regression."""
        return self.logits.squeeze(-1) if self.logits.shape[-1] == 1 else self.logits.argmax(-1)


@torch.no_grad()
def collect_layer_outputs(
    model: EarlyExitModel | OnnxEarlyExitModel, examples: list[EncodedExample], batch_size: int = 64,
    progress: bool = False
) -> LayerOutputs:
    """Run every exit head over encoded examples (no early stopping) and gather the outputs."""
    on_torch = isinstance(model, nn.Module)  # an ONNX export has no training mode and runs on the CPU
    was_training = on_torch and model.training
    if on_torch:
        model.eval()
    device = next(model.parameters()).device if on_torch else torch.device("cpu")
    loader = DataLoader(examples, batch_size=batch_size, collate_fn=Collator(model.tokenizer))
    parts = []
    for batch in tqdm(loader, desc="evaluating", disable=not progress, leave=False):
        labels = batch.pop("labels")
        parts.append(LayerOutputs.from_layers(model(**{k: v.to(device) for k, v in batch.items()}).layers, labels))
    if on_torch:
        model.train(was_training)
    return LayerOutputs(torch.cat([p.logits for p in parts], 1),
                        None if parts[0].distances is None else torch.cat([p.distances for p in parts], 1),
                        torch.cat([p.labels for p in parts]))


def _metrics(task: TaskSpec, predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return compute_metrics(task, predictions.tolist(), labels.tolist())


def layer_metrics(outputs: LayerOutputs, task: TaskSpec) -> list[dict]:
    """Metric of every exit layer taken alone (rows: layer, metrics...)."""
    predictions = outputs.predictions()
    return [{"layer": m + 1, **_metrics(task, predictions[m], outputs.labels)} for m in range(outputs.num_layers)]


def oracle(outputs: LayerOutputs, task: TaskSpec) -> dict | None:
    """The shallowest-correct-exit oracle: metric and speed-up (None for regression)."""
    if task.is_regression:
        return None
    correct = outputs.predictions() == outputs.labels.unsqueeze(0)  # (M, N)
    any_correct = correct.any(0)
    first = correct.float().argmax(0)
    exit_index = torch.where(any_correct, first, torch.full_like(first, outputs.num_layers - 1))
    predictions = outputs.predictions().gather(0, exit_index.unsqueeze(0)).squeeze(0)
    metrics = _metrics(task, predictions, outputs.labels)
    return {"policy": "oracle", "speedup": speedup_ratio(exit_index + 1, outputs.num_layers),
            "metric": main_metric(task, metrics), "mean_exit_layer": float((exit_index + 1).float().mean()), **metrics}


def evaluate_policy(policy: ExitPolicy, outputs: LayerOutputs, task: TaskSpec) -> dict:
    """One trade-off row: the policy, its layer speed-up, metric and mean exit layer."""
    exits = simulate_exits(policy, outputs.heads())
    metrics = _metrics(task, exits.predictions, outputs.labels)
    return {
        "policy": policy.criterion, "threshold": policy.threshold, "patience": policy.patience, "lam": policy.lam,
        "speedup": speedup_ratio(exits.exit_layers, outputs.num_layers), "metric": main_metric(task, metrics),
        "mean_exit_layer": float(exits.exit_layers.float().mean()), **metrics,
    }


def threshold_grid(values: torch.Tensor, points: int, below: bool = True) -> list[float]:
    """Thresholds at `points` quantiles of indicator values, each just past its quantile so that the inputs
    there exit too (exits happen strictly below τ, or above it where `below` is False)."""
    if not values.numel():
        return []
    quantiles = torch.quantile(values.double(), torch.linspace(0, 1, points, dtype=torch.float64)).tolist()
    # step past each value by more than float32's resolution there: indicators are float32, and regression
    # tolerances exceed 1, where a fixed 1e-7 rounds away and the largest value could never exit
    return [v + (1e-7 + 1e-6 * abs(v)) * (1.0 if below else -1.0) for v in quantiles]


def candidate_policies(criterion: str, outputs: LayerOutputs, points: int = 40, patience: int = 2,
                       lam: float = 1.0) -> list[ExitPolicy]:
    """A grid of policies spanning the criterion's whole trade-off curve on these outputs."""
    num_layers = outputs.num_layers
    if criterion == "patience":
        return [ExitPolicy("patience", patience=t) for t in range(1, num_layers)]
    policy_patience = patience if criterion in ("pcee", "regression-patience") else 1
    probe = ExitPolicy(criterion, patience=policy_patience, lam=lam)
    values, previous = [], None
    for head in outputs.heads()[:-1]:
        indicator, previous = probe.indicator(head, previous)
        values.append(indicator[torch.isfinite(indicator)])
    below = CRITERIA[criterion][1]
    grid = threshold_grid(torch.cat(values), points, below)
    if criterion != "regression-patience":
        grid = [min(1.0, max(0.0, v)) for v in grid] + ([0.0, 1.0] if below else [1.0, 0.0])
    return [ExitPolicy(criterion, threshold=t, patience=policy_patience, lam=lam) for t in sorted(set(grid))]


def sweep(criterion: str, outputs: LayerOutputs, task: TaskSpec, **grid) -> list[dict]:
    """Trade-off rows over a grid of thresholds (or patiences), sorted by speed-up."""
    rows = [evaluate_policy(p, outputs, task) for p in candidate_policies(criterion, outputs, **grid)]
    return sorted(rows, key=lambda r: (r["speedup"], -r["metric"]))


def _scored_candidates(criterion: str, outputs: LayerOutputs, **grid) -> list[tuple[float, ExitPolicy]]:
    """(layer speed-up, policy) of a fine grid of the criterion's policies on these outputs."""
    heads = outputs.heads()
    return [(speedup_ratio(simulate_exits(p, heads).exit_layers, outputs.num_layers), p)
            for p in candidate_policies(criterion, outputs, points=200, **grid)]


def most_conservative(scored: list[tuple[float, T]], criterion: str, target_speedup: float) -> T:
    """Of (layer speed-up, setting) pairs, the setting with the smallest speed-up that reaches the target."""
    reaching = [(s, p) for s, p in scored if s >= target_speedup - 1e-9]
    if not reaching:
        # rounded inwards, so that a fastest 2.996x does not read as "up to 3.00x" next to "cannot reach 3x"
        low, high = math.ceil(100 * min(s for s, _ in scored)) / 100, math.floor(100 * max(s for s, _ in scored)) / 100
        raise PolicyError(
            f"criterion '{criterion}' cannot reach a layer speed-up of {target_speedup:g}x on this model; "
            f"reachable range is {low:.2f}x to {high:.2f}x"
        )
    return min(reaching, key=lambda sp: sp[0])[1]


def calibrate(criterion: str, outputs: LayerOutputs, task: TaskSpec, target_speedup: float, **grid) -> ExitPolicy:
    """The most conservative policy of a criterion whose layer speed-up reaches the target."""
    return most_conservative(_scored_candidates(criterion, outputs, **grid), criterion, target_speedup)


def choose_policy(criteria: tuple[str, ...], calibration: LayerOutputs, task: TaskSpec, target_speedup: float,
                  preferred: str, forced: bool = False, **grid) -> tuple[ExitPolicy, dict]:
    """The default exit policy and the record of how it was chosen (a checkpoint's `policy_selection`).

    Each criterion is calibrated to the target speed-up on the calibration outputs and scored there; the winner
    is the highest metric among those that reach the target (ties: `preferred`, the recipe's own criterion).
    `forced` takes `preferred` whatever the others score. A winner that cannot reach the target (nothing can,
    or the forced one cannot) gives its fastest policy.
    """
    standings, policies = [], {}
    for criterion in criteria:
        scored = _scored_candidates(criterion, calibration, **grid)
        try:
            policies[criterion] = most_conservative(scored, criterion, target_speedup)
        except PolicyError as exc:
            policies[criterion] = fastest_of(scored)
            standings.append({"criterion": criterion, "error": str(exc)})
            continue
        row = evaluate_policy(policies[criterion], calibration, task)
        standings.append({"criterion": criterion, "metric": row["metric"], "speedup": row["speedup"]})
    # best first; among equal metrics the preferred criterion first, then the given order
    standings.sort(key=lambda r: ("metric" not in r, -r.get("metric", 0.0), r["criterion"] != preferred))
    winner = preferred if forced or "metric" not in standings[0] else standings[0]["criterion"]
    return policies[winner], {"criterion": winner, "preferred": preferred, "forced": forced,
                              "target_speedup": target_speedup, "metric": task.main_metric, "standings": standings}


def fastest_of(scored: list[tuple[float, T]]) -> T:
    """Of (layer speed-up, setting) pairs, the setting with the largest speed-up."""
    return max(scored, key=lambda sp: sp[0])[1]


def calibrated_table(criteria: tuple[str, ...], calibration: LayerOutputs, evaluation: LayerOutputs, task: TaskSpec,
                     targets: tuple[float, ...] = TARGET_SPEEDUPS, **grid) -> list[dict]:
    """For each criterion and target speed-up: τ calibrated on one split, measured on another."""
    rows = []
    for criterion in criteria:
        scored = _scored_candidates(criterion, calibration, **grid)
        for target in targets:
            try:
                policy = most_conservative(scored, criterion, target)
            except PolicyError as exc:
                rows.append({"policy": criterion, "target_speedup": target, "error": str(exc)})
                continue
            rows.append({"target_speedup": target, **evaluate_policy(policy, evaluation, task)})
    return rows


SEPARATION_CRITERIA = ("edr", "entropy", "confidence", "dr")


def indicator_auroc(criterion: str, outputs: LayerOutputs, lam: float = 1.0) -> list[float | None]:
    """Per layer: AUROC of the indicator (oriented so higher = more certain) against that exit being
    correct — how well the criterion separates right from wrong answers (0.5 = not at all)."""
    if outputs.logits.shape[-1] == 1:
        raise PolicyError("indicator separation is defined for classification tasks only")
    probe = ExitPolicy(criterion, lam=lam)
    orientation = -1.0 if CRITERIA[criterion][1] else 1.0
    correct = outputs.predictions() == outputs.labels.unsqueeze(0)  # (M, N)
    scores = []
    for m, head in enumerate(outputs.heads()):
        if probe.needs_prototypes and head.distances is None:  # a last layer without prototypes
            scores.append(None)
            continue
        indicator, _ = probe.indicator(head, None)
        labels = correct[m]
        both_present = bool(labels.any()) and not bool(labels.all())
        scores.append(float(roc_auc_score(labels.numpy(), (orientation * indicator).numpy())) if both_present else None)
    return scores


def criteria_for(model: EarlyExitModel | OnnxEarlyExitModel) -> tuple[str, ...]:
    """The exit criteria a model supports (prototype criteria need prototype heads)."""
    if model.config.is_regression:
        return ("regression-patience",)
    if model.has_prototypes:
        return CLASSIFICATION_CRITERIA
    return tuple(c for c in CLASSIFICATION_CRITERIA if c not in ("edr", "dr"))


def run_data(model: EarlyExitModel, source: DataSource) -> RunData:
    """The examples of the run that trained the checkpoint — training, dev and the held-out slices — rebuilt from
    its source and its recorded subsample size, fractions and seed."""
    training = model.config.training
    return load_run_data(source, training.get("max_train_samples"), training.get("validation_fraction", 0.1),
                         training.get("calibration_fraction", 0.0), training.get("seed", 42))


def _calibration_split(data: RunData) -> tuple[str, list[Example]]:
    if data.calibration:
        return "calibration (held out from train)", data.calibration
    return data.dev_split, data.dev


def calibration_examples(model: EarlyExitModel, source: DataSource | str, data_dir: str | None = None,
                         hub_dataset: str | None = None) -> tuple[str, list[Example]]:
    """The held-out calibration split the checkpoint was trained beside (rebuilt from its seed), or its dev set
    when it held none out. source: a data source, or a GLUE task name read from data_dir or hub_dataset."""
    return _calibration_split(run_data(model, as_source(source, data_dir, hub_dataset)))


def evaluation_source(model: EarlyExitModel, task_name: str | None = None, data_dir: str | None = None,
                      hub_dataset: str | None = None) -> DataSource:
    """The data a checkpoint is evaluated against: the GLUE task `task_name` if given, else the source it was
    trained on (a GLUE task moved to data_dir or hub_dataset if given)."""
    if task_name is not None:
        return GlueSource(task_name, data_dir, hub_dataset)
    source = recorded_source(model.config.training, model.config.task)
    if source is None:
        raise CheckpointError(f"the checkpoint of task '{model.config.task}' records no training data to rebuild "
                              "its calibration slice from, and that is no GLUE task; give the GLUE task to use")
    return with_location(source, data_dir, hub_dataset)


def split_examples(model: EarlyExitModel, source: DataSource, split: str = "dev") -> tuple[RunData, str, list[Example]]:
    """The run's data rebuilt from `source`, and the name and examples of one of its splits ("dev": the split that
    chose the best epoch — a dev set, a validation file or the held-out validation slice)."""
    data = run_data(model, source)
    if list(data.task.labels) != model.config.labels:
        raise CheckpointError(f"the model was trained for task '{model.config.task}' with labels "
                              f"{model.config.labels}, not for '{data.task.name}' with labels {list(data.task.labels)}")
    if split == "dev":
        return data, data.dev_split, data.dev
    return data, split, source.read(split, data.task)


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
    split_name, cal_examples = _calibration_split(data)
    calibration = collect_layer_outputs(model, encode_examples(model.tokenizer, cal_examples, max_length),
                                        batch_size, progress)
    grid = {"patience": pcee_patience, "lam": lam if lam is not None else (model.config.policy or {}).get("lam", 1.0)}
    criteria = criteria_for(model)
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
        "separation": {c: indicator_auroc(c, evaluated, grid["lam"]) for c in SEPARATION_CRITERIA if c in criteria},
        "overhead": model.overhead(),
    }
    if output_dir is not None:
        write_report(report, Path(output_dir))
        if Path(output_dir).resolve().is_relative_to(Path(checkpoint).resolve()):
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
