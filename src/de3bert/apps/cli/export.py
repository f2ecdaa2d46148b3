"""`de3bert export`: a checkpoint as one self-exiting ONNX graph, checked against PyTorch, and (with --measure or
--quantize) every exit's dev metric on both runtimes."""

from __future__ import annotations

import argparse

from de3bert.apps.cli.options import DATA_HELP, HelpFormatter, table
from de3bert.apps.export import export_and_measure
from de3bert.exits.criteria import CRITERIA
from de3bert.onnx.format import QUANTIZATIONS

HELP = "write a checkpoint as one ONNX graph that exits by itself (any ONNX Runtime runs it; no PyTorch needed)"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the command."""
    parser = commands.add_parser("export", help=HELP, description=HELP, formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint folder written by `de3bert train`")
    parser.add_argument("--output", required=True, help="folder to write model.onnx, the config and the tokenizer to")
    parser.add_argument("--criterion", choices=list(CRITERIA),
                        help="exit criterion fixed in the graph (default: the checkpoint's; another one takes its "
                             "calibrated threshold at the same target speed-up; threshold, patience and λ stay "
                             "inputs of the graph)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS,
                        help="dynamic int8 quantization of every layer and head inside the graph (its accuracy is "
                             "measured on the task's dev split)")
    parser.add_argument("--measure", action="store_true",
                        help="measure every exit's dev metric in PyTorch and on the graphs (always with --quantize)")
    parser.add_argument("--data-dir", help=DATA_HELP)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Export, and measure what the export costs in accuracy where asked (recorded in the export's config)."""
    info = export_and_measure(args.checkpoint, args.output, args.quantize, args.criterion,
                              args.quantize is not None or args.measure, args.data_dir)
    check = info.validation
    print(f"exported {args.checkpoint} to {args.output}/model.onnx ({info.quantization or 'float32'}, criterion "
          f"{info.criterion}; on {check['rows']} random inputs against PyTorch: same label "
          f"{100 * check['same_label']:.1f} %, same exit layer {100 * check['same_exit_layer']:.1f} %, exit logits "
          f"within {check['max_logit_difference']:.1e})")
    if info.exit_metrics:
        print("dev metric of every exit (and of the calibrated policy, with its layer speed-up):")
        print(table(info.exit_metrics, list(info.exit_metrics[-1])))
    print(f"run it with: de3bert serve {args.output}  (or predict / bench {args.output}), or from any ONNX Runtime "
          "(docs/serving.md)")
