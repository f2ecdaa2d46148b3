"""Wall-clock study (issue: real early exit): plain HF vs our full depth vs the engine at 1.5x/2x/3x.

Trains the needed checkpoints once (cached under results/cache/), then times every system side by
side for each (backbone, task) pair and writes results/wallclock/<backbone>-<task>.json and .png
plus a summary table results/wallclock/summary.json.

    .venv/bin/python benchmarks/wallclock.py                       # MiniLM-L6 on SST-2 and RTE
    .venv/bin/python benchmarks/wallclock.py --backbones minilm-l6 mpnet-base
    .venv/bin/python benchmarks/wallclock.py --checkpoint sst2=runs/demo-sst2 --checkpoint rte=runs/rte-de3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from de3bert.benchmark import BenchSettings, plot_benchmark, run_benchmark
from de3bert.training import TrainingArguments, train

RESULTS = Path("results")
# Training budgets sized for a 2-core CPU; SST-2 is subsampled.
TRAIN_SAMPLES = {"sst2": 8000, "rte": None}
EPOCHS = {"minilm-l6": 3, "mpnet-base": 2}


def checkpoint(backbone: str, task: str, data_dir: str | None) -> Path:
    """A trained DE³ checkpoint for the pair, trained once and cached."""
    folder = RESULTS / "cache" / f"{backbone}-{task}-de3"
    if not (folder / "config.json").exists() or not json.loads((folder / "config.json").read_text())["de3bert"]["policy"]:
        args = TrainingArguments(output_dir=str(folder), recipe="de3", epochs=EPOCHS.get(backbone, 3),
                                 max_train_samples=TRAIN_SAMPLES[task], max_length=128)
        train(task, backbone, args, data_dir)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["minilm-l6"], help="backbones to time")
    parser.add_argument("--tasks", nargs="+", default=["sst2", "rte"], help="GLUE tasks whose dev sets are timed")
    parser.add_argument("--latency-inputs", type=int, default=200, help="inputs timed one at a time")
    parser.add_argument("--repeats", type=int, default=3, help="repeated passes (medians)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="TASK=DIR",
                        help="time this already trained checkpoint for TASK instead of training one")
    parser.add_argument("--data-dir", help="GLUE folder (default: $GLUE_DIR, else ../shared/data/glue)")
    args = parser.parse_args()
    given = dict(item.split("=", 1) for item in args.checkpoint)
    out = RESULTS / "wallclock"
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for backbone in args.backbones:
        for task in args.tasks:
            folder = given.get(task) or checkpoint(backbone, task, args.data_dir)
            report = run_benchmark(folder, task, args.data_dir,
                                   BenchSettings(latency_inputs=args.latency_inputs, repeats=args.repeats))
            name = f"{backbone}-{task}"
            (out / f"{name}.json").write_text(json.dumps(report, indent=2))
            plot_benchmark(report, out / f"{name}.png")
            for row in report["rows"]:
                summary.append({"backbone": backbone, "task": task, **{k: v for k, v in row.items() if k != "policy"}})
                print(json.dumps(summary[-1]))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
