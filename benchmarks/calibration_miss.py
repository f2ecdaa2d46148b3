"""The speed-up asked for against the one measured: thresholds calibrated at training time, and `de3bert calibrate`
on one half of dev's texts measured on the other half.

For each checkpoint, criterion (its stored default, entropy, and its recipe's own: EDR for de3) and target
layer speed-up (1.5x, 2x, 3x):

- before: the threshold calibrated at training time on the slice held out of the training data (config.json's
  calibrated table, as the checkpoint was written), measured on all of dev and on dev half B;
- after: `calibrate` (exits.calibration.calibrate_targets, what `de3bert calibrate` runs) fitted on dev half A's
  texts — the labels replaced by −1, so nothing but the texts can reach it — measured on half B, with the
  bootstrap interval it reports on A and whether B's speed-up fell inside it.

Halves A and B are a seeded random split of dev (seed 0 for the table). Because one split of a few hundred inputs
is itself noisy, the same is repeated over `--splits` random splits (seeds 0, 1, ...): the median and 90th
percentile of |relative miss| and the share of splits within ±5 % of the target. Nothing is tuned to dev: the
training-time thresholds are read as they are, and calibrating on half A is the method under test.

`--end-to-end` also runs the command line once, on the first checkpoint: `de3bert calibrate` on a file of half A's
texts (in a copy of the checkpoint), then `de3bert predict --input` on half B, and records the delivered speed-up
the batch job reports next to the library's number for the same cell.

    .venv/bin/python benchmarks/calibration_miss.py --checkpoint minilm-l6-sst2=runs/demo-sst2 \\
        --checkpoint minilm-l6-rte=runs/rte-de3 --checkpoint minilm-l6-cola=runs/cola-de3 \\
        --checkpoint mpnet-sst2=runs/mpnet-sst2 --data-dir ../shared/data/glue --end-to-end

Writes results/calibration_miss/summary.json (every cell, every split) and table.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from de3bert.apps.cli import main as cli
from de3bert.data import encode_examples
from de3bert.evaluation.run_data import calibration_split, evaluation_source, split_examples
from de3bert.exits.calibration import (SPEEDUP_TOLERANCE, TARGET_SPEEDUPS, calibrate_targets, choose_policy,
                                       closest_challenger, evaluate_policy)
from de3bert.exits.criteria import REFERENCE_CRITERION, applicable_criteria, own_criterion
from de3bert.exits.outputs import LayerOutputs, collect_layer_outputs
from de3bert.exits.policies import ExitPolicy
from de3bert.model.modeling import EarlyExitModel

RESULTS = Path("results") / "calibration_miss"


def select(outputs: LayerOutputs, rows: np.ndarray, labelled: bool = True) -> LayerOutputs:
    """The outputs of some inputs; unlabelled: their labels replaced by −1."""
    return outputs.select(torch.as_tensor(rows), labelled)


def halves(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of range(size) into halves A and B."""
    order = np.random.default_rng(seed).permutation(size)
    return np.sort(order[:size // 2]), np.sort(order[size // 2:])


def miss(measured: float, target: float) -> float:
    """Relative miss of a measured speed-up against the target."""
    return measured / target - 1.0


def criteria_of(model: EarlyExitModel) -> list[str]:
    """The criteria measured: the stored default's, the reference (entropy) and the training recipe's own (EDR for
    de3), each where the model supports it."""
    config = model.config
    names = [config.policy["criterion"], REFERENCE_CRITERION,
             own_criterion(config.training.get("recipe", "de3"), config.is_regression)]
    supported = applicable_criteria(config.is_regression, model.has_prototypes, early_only=True)
    return [name for name in dict.fromkeys(names) if name in supported]


def trained_policy(model: EarlyExitModel, criterion: str, target: float) -> ExitPolicy | None:
    """The threshold calibrated at training time (None where that target was out of reach)."""
    row = next((r for r in model.config.calibration if r.get("criterion") == criterion
                and r["target_speedup"] == target and "threshold" in r), None)
    return None if row is None else ExitPolicy(criterion, row["threshold"], row["patience"], row["lam"])


def measure(name: str, folder: str, data_dir: str | None, splits: int) -> dict:
    """Every cell of one checkpoint (see the module's docstring)."""
    model = EarlyExitModel.from_pretrained(folder)
    data, _, examples = split_examples(model, evaluation_source(model, None, data_dir), "dev")
    task = data.task
    started = time.perf_counter()
    dev = collect_layer_outputs(model, encode_examples(model.tokenizer, examples, model.config.max_length))
    print(f"{name}: {len(examples)} dev inputs, every exit computed in {time.perf_counter() - started:.0f}s")
    lam = model.config.training.get("lam", 1.0)
    cells = []
    for criterion in criteria_of(model):
        per_split: dict[float, list[dict]] = {target: [] for target in TARGET_SPEEDUPS}
        for seed in range(splits):
            a, b = halves(len(examples), seed)
            fitted = calibrate_targets(criterion, select(dev, a, labelled=False), TARGET_SPEEDUPS, seed=seed, lam=lam)
            for row in fitted:
                target = row["target_speedup"]
                if "error" in row:
                    per_split[target].append({"seed": seed, "error": row["error"]})
                    continue
                policy = ExitPolicy(criterion, row["threshold"], row["patience"], row["lam"])
                on_b = evaluate_policy(policy, select(dev, b), task)
                per_split[target].append({"seed": seed, "threshold": row["threshold"], "on_a": row["speedup"],
                                          "a_low": row["speedup_low"], "a_high": row["speedup_high"],
                                          "warning": row.get("warning"), "on_b": on_b["speedup"],
                                          "metric_b": on_b["metric"]})
        a, b = halves(len(examples), 0)
        for target in TARGET_SPEEDUPS:
            cell = {"checkpoint": name, "criterion": criterion, "target_speedup": target, "dev_inputs": len(examples),
                    "half_inputs": (len(a), len(b)), "metric": task.main_metric}
            trained = trained_policy(model, criterion, target)
            if trained is not None:
                on_dev, on_b = evaluate_policy(trained, dev, task), evaluate_policy(trained, select(dev, b), task)
                cell["before"] = {"threshold": trained.threshold, "dev": on_dev["speedup"], "dev_metric": on_dev["metric"],
                                  "half_b": on_b["speedup"], "half_b_metric": on_b["metric"],
                                  "miss_dev": miss(on_dev["speedup"], target), "miss_b": miss(on_b["speedup"], target)}
            runs = [r for r in per_split[target] if "error" not in r]
            first = per_split[target][0]
            if "error" not in first:
                cell["after"] = first | {"miss_b": miss(first["on_b"], target),
                                         "b_in_a_interval": first["a_low"] <= first["on_b"] <= first["a_high"]}
            else:
                cell["after_error"] = first["error"]
            if runs:
                misses = sorted(abs(miss(r["on_b"], target)) for r in runs)
                cell["splits"] = {"count": len(runs), "median_abs_miss": statistics.median(misses),
                                  "p90_abs_miss": float(np.quantile(misses, 0.9)),
                                  "within_tolerance": sum(m <= SPEEDUP_TOLERANCE for m in misses) / len(runs),
                                  "b_in_a_interval": sum(r["a_low"] <= r["on_b"] <= r["a_high"] for r in runs)
                                  / len(runs),
                                  "runs": per_split[target]}
            cells.append(cell)
    return {"name": name, "folder": str(folder), "task": task.name, "dev_inputs": len(examples),
            "num_layers": dev.num_layers, "default_policy": model.config.policy, "cells": cells,
            "default_criterion": default_criterion(model, data, task)}


def default_criterion(model: EarlyExitModel, data, task) -> dict:
    """The default criterion chosen again on the checkpoint's calibration split, by today's rule (entropy unless
    another criterion beats it beyond paired-bootstrap noise), next to the one the checkpoint stored."""
    training = model.config.training
    split, examples = calibration_split(data)
    outputs = collect_layer_outputs(model, encode_examples(model.tokenizer, examples, model.config.max_length))
    criteria = applicable_criteria(model.config.is_regression, model.has_prototypes, early_only=True)
    preferred = own_criterion(training.get("recipe", "de3"), model.config.is_regression)
    _, record = choose_policy(criteria, outputs, task, training.get("target_speedup", 2.0), preferred,
                              seed=training.get("seed", 0), patience=training.get("pcee_patience", 2),
                              lam=training.get("lam", 1.0))
    return {"split": split, "stored": model.config.policy_selection.get("criterion"), "now": record["criterion"],
            "selection": record}


def end_to_end(name: str, folder: str, data_dir: str | None, cell: dict) -> dict:
    """The command line on one cell: `de3bert calibrate` on a file of half A's texts, `de3bert predict` on half B."""
    model = EarlyExitModel.from_pretrained(folder)
    data, _, examples = split_examples(model, evaluation_source(model, None, data_dir), "dev")
    a, b = halves(len(examples), 0)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        checkpoint = scratch / "checkpoint"
        shutil.copytree(folder, checkpoint)
        for half, rows in (("a", a), ("b", b)):
            with open(scratch / f"half_{half}.tsv", "w", newline="") as handle:
                writer = csv.writer(handle, delimiter="\t")
                writer.writerow(["text", "text_pair"])
                writer.writerows([examples[i].text_a, examples[i].text_b or ""] for i in rows)
        pair = ["--text-pair-column", "text_pair"] if examples[0].text_b is not None else []
        target = str(cell["target_speedup"])
        assert cli(["calibrate", str(checkpoint), "--input", str(scratch / "half_a.tsv"), "--text-column", "text",
                    *pair, "--criterion", cell["criterion"], "--target-speedup", target, "--no-progress"]) == 0
        assert cli(["predict", str(checkpoint), "--input", str(scratch / "half_b.tsv"), "--text-column", "text", *pair,
                    "--output", str(scratch / "b.jsonl"), "--no-progress"]) == 0
        summary = json.loads((scratch / "b.jsonl.summary.json").read_text())
    return {"checkpoint": name, "criterion": cell["criterion"], "target_speedup": cell["target_speedup"],
            "delivered_on_b": summary["speedup"], "exit_layers": summary["exit_layers"],
            "library_on_b": cell["after"]["on_b"], "calibrated": summary["calibrated"]}


def _speed(value: float, target: float) -> str:
    return f"{value:.2f}× ({100 * miss(value, target):+.1f} %)"


def table(checkpoints: list[dict]) -> str:
    """The before/after table in markdown."""
    lines = ["| checkpoint | criterion | asked | before: dev | before: half B | after: half B | A's 95 % interval | "
             "after, over splits: median / p90 abs miss, within ±5 % |",
             "|---|---|---|---|---|---|---|---|"]
    for checkpoint in checkpoints:
        for cell in checkpoint["cells"]:
            target = cell["target_speedup"]
            before = cell.get("before")
            after = cell.get("after")
            splits = cell.get("splits")
            lines.append("| " + " | ".join([
                f"{checkpoint['name']} ({checkpoint['dev_inputs']} dev)", cell["criterion"], f"{target:g}×",
                _speed(before["dev"], target) if before else "not reached",
                _speed(before["half_b"], target) if before else "–",
                _speed(after["on_b"], target) if after else "not reached",
                f"{after['a_low']:.2f}–{after['a_high']:.2f}×" if after else "–",
                (f"{100 * splits['median_abs_miss']:.1f} % / {100 * splits['p90_abs_miss']:.1f} %, "
                 f"{100 * splits['within_tolerance']:.0f} %") if splits else "–"]) + " |")
    return "\n".join(lines) + "\n"


def criterion_table(checkpoints: list[dict]) -> str:
    """The default criterion stored after training against the one today's rule picks, with the closest margin."""
    lines = ["| checkpoint | calibration examples | stored default | default now | closest challenger exiting "
             "otherwise: margin (95 % interval) |", "|---|---|---|---|---|"]
    for checkpoint in checkpoints:
        choice = checkpoint["default_criterion"]
        record = choice["selection"]
        closest = closest_challenger(record)
        margin = (f"{closest['criterion']} {closest['margin']:+.4f} ({closest['margin_low']:+.4f} to "
                  f"{closest['margin_high']:+.4f})") if closest else "–"
        lines.append(f"| {checkpoint['name']} | {record['examples']} | {choice['stored']} | {choice['now']} | {margin} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure every checkpoint given, write summary.json and table.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=FOLDER",
                        help="a checkpoint to measure, with the name the table gives it (repeatable)")
    parser.add_argument("--data-dir", help="GLUE folder (default: the one each checkpoint was trained from)")
    parser.add_argument("--splits", type=int, default=20, help="random half splits of dev to measure the spread on")
    parser.add_argument("--end-to-end", action="store_true",
                        help="also run `de3bert calibrate` and `de3bert predict` on the first checkpoint's first cell")
    parser.add_argument("--output", default=str(RESULTS), help="folder for summary.json and table.md")
    args = parser.parse_args()
    checkpoints = []
    for spec in args.checkpoint:
        name, _, folder = spec.partition("=")
        if not Path(folder).is_dir():
            print(f"{name}: {folder} is not there, skipped")
            continue
        checkpoints.append(measure(name, folder, args.data_dir, args.splits))
    report = {"targets": TARGET_SPEEDUPS, "tolerance": SPEEDUP_TOLERANCE, "splits": args.splits,
              "checkpoints": checkpoints}
    if args.end_to_end and checkpoints:
        first = checkpoints[0]
        cell = next(c for c in first["cells"] if c["criterion"] == first["default_policy"]["criterion"]
                    and c["target_speedup"] == 2.0 and "after" in c)
        report["end_to_end"] = end_to_end(first["name"], first["folder"], args.data_dir, cell)
        print(f"end to end: `de3bert predict` on half B delivered {report['end_to_end']['delivered_on_b']:.4f}x, "
              f"the library measured {report['end_to_end']['library_on_b']:.4f}x")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "summary.json").write_text(json.dumps(report, indent=2))
    text = table(checkpoints) + "\nThe default criterion, chosen again on each calibration split:\n\n" + \
        criterion_table(checkpoints)
    (output / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
