"""Predictions for a whole file (TSV/CSV/JSONL), streamed through the engine and written atomically, with a summary
of what the job delivered (exit layers, layer speed-up) written next to them."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from de3bert.atomic import write_file
from de3bert.data import read_table
from de3bert.errors import DataError
from de3bert.exits.calibration import default_promise
from de3bert.exits.engine import EarlyExitEngine
from de3bert.exits.policies import ExitPolicy, speedup_ratio

CHUNK = 512


def _rows(engine: EarlyExitEngine, examples, progress: bool):
    with tqdm(total=len(examples), desc="predicting", unit="input", disable=not progress) as bar:
        for start in range(0, len(examples), CHUNK):
            chunk = examples[start:start + CHUNK]
            texts = [e.text_a for e in chunk]
            pairs = [e.text_b for e in chunk] if chunk and chunk[0].text_b is not None else None
            for example, prediction in zip(chunk, engine.predict(texts, pairs)):
                row = {"text": example.text_a}
                if example.text_b is not None:
                    row["text_pair"] = example.text_b
                yield row | asdict(prediction)
            bar.update(len(chunk))


@dataclass
class BatchSummary:
    """What a batch job delivered: the number of inputs, how many left at each exit layer, the layer speed-up
    M·N / Σ m_i, the policy, and — when that is the folder's default policy — what it was calibrated to deliver."""

    inputs: int
    num_layers: int
    exit_layers: dict[int, int]
    speedup: float
    policy: dict
    calibrated: dict | None

    @classmethod
    def of(cls, engine: EarlyExitEngine, exit_layers: list[int]) -> BatchSummary:
        """The summary of the exit layers an engine's policy gave."""
        config, counts = engine.model.config, Counter(exit_layers)
        default = ExitPolicy(**config.policy) if config.policy else None
        return cls(len(exit_layers), engine.model.num_layers,
                   {layer: counts[layer] for layer in range(1, engine.model.num_layers + 1)},
                   speedup_ratio(torch.tensor(exit_layers), engine.model.num_layers), engine.policy.to_dict(),
                   default_promise(config) if engine.policy == default else None)

    def describe(self) -> str:
        """One line: the delivered speed-up, the exit-layer counts, and the calibrated speed-up to compare with."""
        layers = ", ".join(f"{layer}: {count}" for layer, count in self.exit_layers.items())
        calibrated = "" if not self.calibrated else (f"; the policy was calibrated to "
                                                     f"{self.calibrated['target_speedup']:g}x "
                                                     f"({self.calibrated['speedup']:.2f}x on {self.calibrated['inputs']})")
        return (f"delivered layer speed-up {self.speedup:.2f}x over {self.inputs} inputs (inputs leaving at each of the "
                f"{self.num_layers} layers: {layers}){calibrated}")


def summary_path(target: str | Path) -> Path:
    """Where the summary of a batch job writing `target` goes: beside it, as TARGET.summary.json."""
    target = Path(target)
    return target.with_name(target.name + ".summary.json")


def predict_file(engine: EarlyExitEngine, source: str | Path, target: str | Path, text_column: str,
                 text_pair_column: str | None = None, progress: bool = True) -> BatchSummary:
    """Write one prediction per input row of `source` to `target` (.jsonl, .tsv or .csv), and the job's summary to
    `summary_path(target)` (both atomically); returns the summary."""
    target = Path(target)
    suffix = target.suffix.lower()
    if suffix not in (".jsonl", ".tsv", ".csv"):
        raise DataError(f"output file {target} must end in .jsonl, .tsv or .csv")
    examples, _ = read_table(source, text_column, text_pair_column, label_column=None)
    staging = target.with_name(f".{target.name}.tmp{os.getpid()}")
    exit_layers = []
    try:
        with open(staging, "w", newline="", encoding="utf-8") as handle:
            writer = None
            for row in _rows(engine, examples, progress):
                if suffix == ".jsonl":
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                else:
                    flat = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()}
                    if writer is None:
                        writer = csv.DictWriter(handle, fieldnames=list(flat), delimiter="\t" if suffix == ".tsv" else ",")
                        writer.writeheader()
                    writer.writerow(flat)
                exit_layers.append(row["exit_layer"])
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    summary = BatchSummary.of(engine, exit_layers)
    text = json.dumps(asdict(summary) | {"output": str(target)}, indent=2)
    write_file(summary_path(target), lambda handle: handle.write(text.encode()))
    return summary
