"""Predictions for a whole file (TSV/CSV/JSONL), streamed through the engine and written atomically."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from de3bert.data import read_table
from de3bert.errors import DataError
from de3bert.exits.engine import EarlyExitEngine

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


def predict_file(engine: EarlyExitEngine, source: str | Path, target: str | Path, text_column: str,
                 text_pair_column: str | None = None, progress: bool = True) -> int:
    """Write one prediction per input row of `source` to `target` (.jsonl, .tsv or .csv); returns the count."""
    target = Path(target)
    suffix = target.suffix.lower()
    if suffix not in (".jsonl", ".tsv", ".csv"):
        raise DataError(f"output file {target} must end in .jsonl, .tsv or .csv")
    examples, _ = read_table(source, text_column, text_pair_column, label_column=None)
    staging = target.with_name(f".{target.name}.tmp{os.getpid()}")
    count = 0
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
                count += 1
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return count
