"""Wall-clock study: what the user gains against what they would otherwise deploy.

For each (backbone, task) it trains the DE³ checkpoint once (cached under results/cache/), exports it
to ONNX (one self-exiting graph, cached beside it, again whenever the checkpoint changed), and times
side by side, in one interleaved run with the same thread count: the plain model on PyTorch and on
ONNX Runtime, and ours on PyTorch (the engine's layer loop) and on ONNX Runtime (the exported graph)
— at full depth, computing every head without exiting, and at calibrated layer speed-ups of
1.5x/2x/3x — at batch 1, in batches of 32 and in pools of 256. With --quantize int8 the int8 export is
timed too, in a run of its own (plain ONNX Runtime int8 as the reference, each row with its accuracy).
Writes results/wallclock/<backbone>-<task>[-int8].json and .png, results/wallclock/summary.json, the
markdown tables results/wallclock/table.md, and the line a user feels — the int8 graph at each
calibrated target against the plain PyTorch model in float32, with dev accuracy next to full depth's —
in results/wallclock/user_line.md, with the CPU model beside it.

    .venv/bin/python benchmarks/wallclock.py                       # MiniLM-L6 on SST-2 and RTE
    .venv/bin/python benchmarks/wallclock.py --checkpoint sst2=runs/demo-sst2 --checkpoint rte=runs/rte-de3
    .venv/bin/python benchmarks/wallclock.py --backbones mpnet-base --tasks sst2 --checkpoint sst2=runs/mpnet-sst2 \\
        --latency-inputs 100 --throughput-inputs 300 --quantize int8

A run replaces the rows of the (backbone, task, precision) triples it times in summary.json and keeps the others.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from de3bert.apps.bench import BenchSettings, plot_benchmark, run_benchmark
from de3bert.apps.export import export_and_measure
from de3bert.apps.runtimes import weights_digest
from de3bert.errors import CheckpointError
from de3bert.onnx.format import read_export_info
from de3bert.training.arguments import TrainingArguments
from de3bert.training.launch import train

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


def exported(source: Path, name: str, quantize: str | None, data_dir: str | None) -> Path:
    """The checkpoint's ONNX export (float32, or int8 with the dev metric of every exit measured), cached under
    results/cache/ until the checkpoint changes."""
    folder = RESULTS / "cache" / f"{name}-onnx{'-' + quantize if quantize else ''}"
    try:
        current = read_export_info(folder).source.get("weights_sha256") == weights_digest(source)
    except (CheckpointError, OSError):
        current = False
    if not current:
        export_and_measure(source, folder, quantize, measure=quantize is not None, data_dir=data_dir)
    return folder


def cpu_model() -> str:
    """The CPU's model name (lscpu) and its matrix extensions (AVX-512, AMX): speed-ups against PyTorch depend on
    them."""
    import subprocess

    lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown CPU")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    extensions = [label for flag, label in (("avx512f", "AVX-512"), ("amx_bf16", "AMX")) if f" {flag}" in flags]
    return f"{name} ({', '.join(extensions) or 'no AVX-512'})"


def user_line(summary: list[dict], cpu: str) -> str:
    """The int8 graph at each calibrated target against the plain PyTorch model in float32, at batch 1 and in
    batches, with its dev accuracy next to full depth's (PyTorch, float32)."""
    lines = [f"CPU: {cpu}\n", "| backbone / task | system | vs plain PyTorch fp32, batch 1 | batch 32 | metric | "
             "full depth (PyTorch fp32) | vs full depth (points) |", "|---|---|---|---|---|---|---|"]
    for backbone, task in dict.fromkeys((r["backbone"], r["task"]) for r in summary if r["precision"] == "int8"):
        rows = [r for r in summary if (r["backbone"], r["task"], r["precision"]) == (backbone, task, "int8")]
        full = next(r["metric"] for r in rows if r["system"] == "ours PyTorch, full depth")
        for row in rows:
            if row["runtime"] != "ORT int8" or "metric" not in row or "every head" in row["system"]:
                continue
            batch1, batched = row["speedup_vs_plain_PyTorch_batch1"], row["speedup_vs_plain_PyTorch_batched"]
            lines.append(f"| {backbone} / {task} | {row['system']} | {batch1:.2f}x | {batched:.2f}x "
                         f"| {row['metric']:.4f} | {full:.4f} | {100 * (row['metric'] - full):+.1f} |")
    return "\n".join(lines) + "\n"


def _ratio(row: dict, mode: str) -> str:
    """'wall (layer, wall/layer)' for one mode, or just the wall-clock speed-up for systems without exits."""
    wall = row[f"wallclock_speedup_{mode}"]
    layer = row.get(f"layer_speedup_{mode if mode != 'pooled' else 'batched'}")
    if layer is None or layer == 1.0:
        return f"{wall:.2f}x"
    return f"{wall:.2f}x ({layer:.2f}x, {wall / layer:.2f})"


def markdown_table(summary: list[dict]) -> str:
    """Per (backbone, task, precision): latency and wall-clock speed-ups over the reference next to layer speed-ups."""
    lines = []
    for backbone, task, precision in dict.fromkeys((r["backbone"], r["task"], r["precision"]) for r in summary):
        rows = [r for r in summary if (r["backbone"], r["task"], r["precision"]) == (backbone, task, precision)]
        reference = rows[0]["reference"]
        lines += [f"\n**{backbone} / {task} ({precision})** — wall-clock speed-up over {reference} "
                  "(layer speed-up, wall/layer); last columns: batch-1 speed-up over plain PyTorch, metric\n",
                  "| system | p50 ms | p95 ms | batch 1 | batch 32 | pools of 256 | vs PyTorch | metric |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            metric = f"{row['metric']:.3f}" if "metric" in row else ""
            lines.append(f"| {row['system']} | {row['latency_p50_ms']:.1f} | {row['latency_p95_ms']:.1f} | "
                         f"{_ratio(row, 'batch1')} | {_ratio(row, 'batched')} | {_ratio(row, 'pooled')} | "
                         f"{row['speedup_vs_plain_PyTorch_batch1']:.2f}x | {metric} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["minilm-l6"], help="backbones to time")
    parser.add_argument("--tasks", nargs="+", default=["sst2", "rte"], help="GLUE tasks whose dev sets are timed")
    parser.add_argument("--latency-inputs", type=int, default=200, help="inputs timed one at a time")
    parser.add_argument("--throughput-inputs", type=int, help="dev inputs timed in batches (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="repeated passes (medians)")
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0],
                        help="layer speed-ups the thresholds are calibrated to")
    parser.add_argument("--threads", type=int, default=2, help="threads of every system")
    parser.add_argument("--quantize", choices=["int8"], help="also time the int8 export, in a run of its own")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="TASK=DIR",
                        help="time this already trained checkpoint for TASK instead of training one")
    parser.add_argument("--data-dir", help="GLUE folder (default: $GLUE_DIR, else ../shared/data/glue)")
    args = parser.parse_args()
    given = dict(item.split("=", 1) for item in args.checkpoint)
    cpu = cpu_model()
    out = RESULTS / "wallclock"
    out.mkdir(parents=True, exist_ok=True)
    precisions = ["float32"] + ([args.quantize] if args.quantize else [])
    measured = {(b, t, p) for b in args.backbones for t in args.tasks for p in precisions}
    # rows of triples timed by earlier runs stay (rows from before the ONNX Runtime systems do not); each triple's
    # systems are always timed together
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else []
    summary = [row for row in previous
               if "precision" in row and (row["backbone"], row["task"], row["precision"]) not in measured]
    for backbone in args.backbones:
        for task in args.tasks:
            source = Path(given.get(task) or checkpoint(backbone, task, args.data_dir))
            for precision in precisions:
                quantize = None if precision == "float32" else precision
                folder = exported(source, f"{backbone}-{task}", quantize, args.data_dir)
                report = run_benchmark(folder, task, args.data_dir,
                                       BenchSettings(targets=tuple(args.targets), latency_inputs=args.latency_inputs,
                                                     repeats=args.repeats, throughput_inputs=args.throughput_inputs,
                                                     threads=args.threads))
                name = f"{backbone}-{task}" + (f"-{quantize}" if quantize else "")
                (out / f"{name}.json").write_text(json.dumps(report, indent=2))
                plot_benchmark(report, out / f"{name}.png")
                for row in report["rows"]:
                    summary.append({"backbone": backbone, "task": task, "precision": precision, "cpu": cpu,
                                    "reference": report["reference"], **{k: v for k, v in row.items() if k != "policy"}})
                    print(json.dumps(summary[-1]))
    summary.sort(key=lambda row: (row["backbone"], row["task"], row["precision"]))  # stable: systems keep their order
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "table.md").write_text(f"CPU: {cpu}\n" + markdown_table(summary))
    (out / "user_line.md").write_text(user_line(summary, cpu))
    print(markdown_table(summary) + "\n" + user_line(summary, cpu))


if __name__ == "__main__":
    main()
