"""`de3bert bench`: measured wall-clock speed-up over the plain model, on PyTorch and ONNX Runtime."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from de3bert.apps.bench import BenchSettings, plot_benchmark, run_benchmark
from de3bert.apps.cli.options import DATA_HELP, HelpFormatter, add_knobs, add_progress_option, knob_values, table

HELP = "measured wall-clock speed-up over the plain model, on PyTorch and ONNX Runtime"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the command."""
    parser = commands.add_parser("bench", help=HELP, description=HELP, formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint folder, or exported folder (then the ONNX Runtime systems are "
                                           "timed too, next to the PyTorch ones of the checkpoint it was exported from)")
    parser.add_argument("--task", help="task whose data is timed (default: the checkpoint's)")
    add_knobs(parser, BenchSettings)
    parser.add_argument("--output", help="folder for wallclock.json and wallclock.png (default: CHECKPOINT/bench)")
    parser.add_argument("--data-dir", help=DATA_HELP)
    add_progress_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Time every system and print the tables."""
    settings = knob_values(BenchSettings, args)
    report = run_benchmark(args.checkpoint, args.task, args.data_dir, settings, progress=args.progress)
    output = Path(args.output) if args.output else Path(args.checkpoint) / "bench"
    output.mkdir(parents=True, exist_ok=True)
    (output / "wallclock.json").write_text(json.dumps(report, indent=2))
    plot_benchmark(report, output / "wallclock.png")
    print(f"{report['task']} {report['split']}: {report['latency_inputs']} inputs at batch 1, "
          f"{report['throughput_inputs']} in batches of {settings.batch_size} and in pools of {settings.pool_size}, "
          f"{settings.threads} threads, medians of {settings.repeats}; speed-ups over {report['reference']}")
    print(table(report["rows"], ["system", "latency_p50_ms", "latency_p95_ms", "layer_speedup_batch1",
                                 "wallclock_speedup_batch1", "metric"]))
    print(table(report["rows"], ["system", "layer_speedup_batched", "throughput_per_s", "wallclock_speedup_batched",
                                 "throughput_pooled_per_s", "wallclock_speedup_pooled"]))
    for runtime, milliseconds in report["overhead"]["measured_head_and_policy_ms_per_layer_batch1"].items():
        print(f"exit heads + policy on {runtime}: {milliseconds:.3f} ms per layer at batch 1")
    print(f"heads hold {100 * report['overhead']['overhead_fraction']:.1f}% of the backbone's parameters; "
          f"written to {output}/wallclock.json and wallclock.png")
