"""`de3bert export`: a checkpoint as ONNX graphs for ONNX Runtime, checked against PyTorch, and (with --measure or
--quantize) every exit's dev metric on both runtimes."""

from __future__ import annotations

import argparse
from pathlib import Path

from de3bert.apps.cli.options import DATA_HELP, HelpFormatter, table
from de3bert.apps.runtimes import load_model
from de3bert.evaluation.compare import compare_exits
from de3bert.onnx.export import export_checkpoint
from de3bert.onnx.format import QUANTIZATIONS, write_export_config

HELP = "write a checkpoint as ONNX graphs for ONNX Runtime (serve it without PyTorch weights)"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the command."""
    parser = commands.add_parser("export", help=HELP, description=HELP, formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint folder written by `de3bert train`")
    parser.add_argument("--output", required=True, help="folder to write the graphs, config and tokenizer to")
    parser.add_argument("--quantize", choices=QUANTIZATIONS,
                        help="dynamic int8 quantization of the graphs (its accuracy is measured on the task's dev "
                             "split)")
    parser.add_argument("--measure", action="store_true",
                        help="measure every exit's dev metric in PyTorch and on the graphs (always with --quantize)")
    parser.add_argument("--data-dir", help=DATA_HELP)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Export, and measure what the export costs in accuracy where asked (recorded in the export's config)."""
    info = export_checkpoint(args.checkpoint, args.output, args.quantize)
    print(f"exported {args.checkpoint} to {args.output} ({info.quantization or 'float32'} graphs; largest relative "
          f"difference from PyTorch {max(info.validation.values()):.1e})")
    if args.quantize is not None or args.measure:
        exported = load_model(args.output, "onnx")
        exported.export.exit_metrics = compare_exits(load_model(args.checkpoint, "torch"), exported, args.data_dir)
        write_export_config(exported.config, exported.export, Path(args.output))
        print("dev metric of every exit (and of the calibrated policy, with its layer speed-up):")
        print(table(exported.export.exit_metrics, list(exported.export.exit_metrics[-1])))
    print(f"run it with: de3bert serve {args.output}  (or predict / bench {args.output} --runtime onnx)")
