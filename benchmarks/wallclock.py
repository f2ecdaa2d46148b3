"""Wall-clock study (issue: real early exit): plain HF vs our full depth vs the engine at 1.5x/2x/3x.

Trains the needed checkpoints once (cached under results/cache/), then times every system side by
side for each (backbone, task) pair and writes results/wallclock/<backbone>-<task>.json and .png
plus results/wallclock/summary.json and the markdown table results/wallclock/table.md.

    .venv/bin/python benchmarks/wallclock.py                       # MiniLM-L6 on SST-2 and RTE
    .venv/bin/python benchmarks/wallclock.py --backbones minilm-l6 mpnet-base
    .venv/bin/python benchmarks/wallclock.py --checkpoint sst2=runs/demo-sst2 --checkpoint rte=runs/rte-de3

A run replaces the rows of the (backbone, task) pairs it times in summary.json and keeps the others.
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


def _ratio(row: dict, mode: str) -> str:
    """'wall (layer, wall/layer)' for one mode, or just the wall-clock speed-up for systems without exits."""
    wall = row[f"wallclock_speedup_{mode}"]
    layer = row.get(f"layer_speedup_{mode}")
    if layer is None or layer == 1.0:
        return f"{wall:.2f}x"
    return f"{wall:.2f}x ({layer:.2f}x, {wall / layer:.2f})"


def markdown_table(summary: list[dict]) -> str:
    """Per (backbone, task): latency and wall-clock speed-ups next to layer speed-ups, every system."""
    lines = []
    for backbone, task in dict.fromkeys((r["backbone"], r["task"]) for r in summary):
        lines += [f"\n**{backbone} / {task}** — wall-clock speed-up over plain HF (layer speed-up, wall/layer)\n",
                  "| system | p50 ms | p95 ms | batch 1 | batch 32 | pools of 256 |", "|---|---|---|---|---|---|"]
        for row in (r for r in summary if (r["backbone"], r["task"]) == (backbone, task)):
            pooled = row.get("layer_speedup_batched")
            pooled = "" if pooled is None or pooled == 1.0 else f" ({pooled:.2f}x, {row['wallclock_speedup_pooled'] / pooled:.2f})"
            lines.append(f"| {row['system']} | {row['latency_p50_ms']:.1f} | {row['latency_p95_ms']:.1f} | "
                         f"{_ratio(row, 'batch1')} | {_ratio(row, 'batched')} | "
                         f"{row['wallclock_speedup_pooled']:.2f}x{pooled} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["minilm-l6"], help="backbones to time")
    parser.add_argument("--tasks", nargs="+", default=["sst2", "rte"], help="GLUE tasks whose dev sets are timed")
    parser.add_argument("--latency-inputs", type=int, default=200, help="inputs timed one at a time")
    parser.add_argument("--throughput-inputs", type=int, help="dev inputs timed in batches (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="repeated passes (medians)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="TASK=DIR",
                        help="time this already trained checkpoint for TASK instead of training one")
    parser.add_argument("--data-dir", help="GLUE folder (default: $GLUE_DIR, else ../shared/data/glue)")
    args = parser.parse_args()
    given = dict(item.split("=", 1) for item in args.checkpoint)
    out = RESULTS / "wallclock"
    out.mkdir(parents=True, exist_ok=True)
    measured = {(b, t) for b in args.backbones for t in args.tasks}
    # rows of (backbone, task) pairs timed by earlier runs stay; each pair's systems are always timed together
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else []
    summary = [row for row in previous if (row["backbone"], row["task"]) not in measured]
    for backbone in args.backbones:
        for task in args.tasks:
            folder = given.get(task) or checkpoint(backbone, task, args.data_dir)
            report = run_benchmark(folder, task, args.data_dir,
                                   BenchSettings(latency_inputs=args.latency_inputs, repeats=args.repeats,
                                                 throughput_inputs=args.throughput_inputs))
            name = f"{backbone}-{task}"
            (out / f"{name}.json").write_text(json.dumps(report, indent=2))
            plot_benchmark(report, out / f"{name}.png")
            for row in report["rows"]:
                summary.append({"backbone": backbone, "task": task, **{k: v for k, v in row.items() if k != "policy"}})
                print(json.dumps(summary[-1]))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "table.md").write_text(markdown_table(summary))
    print(markdown_table(summary))


if __name__ == "__main__":
    main()
