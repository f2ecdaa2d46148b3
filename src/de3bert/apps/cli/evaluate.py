"""`de3bert evaluate`: every exit's metric, the oracle, threshold sweeps, calibrated policies, separation and plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from de3bert.apps.cli.options import DATA_HELP, HUB_HELP, HelpFormatter, add_device_options, add_progress_option, table
from de3bert.evaluation.report import evaluate_checkpoint

HELP = "per-layer metrics, oracle, threshold sweeps, calibration, plot"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the command."""
    parser = commands.add_parser("evaluate", help=HELP, description=HELP, formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint folder written by `de3bert train`")
    parser.add_argument("--eval-file", help="a labelled .csv, .tsv or .jsonl file to score the model on (default: "
                                            "the dev or validation data of its training run)")
    parser.add_argument("--text-column", help="text column of --eval-file (default: the training data's)")
    parser.add_argument("--text-pair-column", help="second text column of --eval-file (default: the training data's)")
    parser.add_argument("--label-column", help="label column of --eval-file (default: the training data's); labels "
                                               "may be written as values or as names")
    parser.add_argument("--split", default="dev",
                        help="split of the training data to score on instead, e.g. dev_mismatched for MNLI")
    parser.add_argument("--task", help="GLUE task to evaluate on (default: the data the checkpoint was trained on)")
    parser.add_argument("--output", help="folder for evaluation.json, sweeps.csv, calibrated.csv, tradeoff.png "
                                         "(default: CHECKPOINT/evaluation)")
    parser.add_argument("--pcee-patience", type=int, default=2, help="patience t used for PCEE")
    parser.add_argument("--data-dir", help=DATA_HELP + " (default: the folder the checkpoint was trained from)")
    parser.add_argument("--hub-dataset", help=HUB_HELP)
    add_device_options(parser)
    add_progress_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Evaluate a checkpoint and print its tables."""
    output = Path(args.output) if args.output else Path(args.checkpoint) / "evaluation"
    report = evaluate_checkpoint(args.checkpoint, args.task, args.data_dir, args.hub_dataset, output,
                                 pcee_patience=args.pcee_patience, progress=args.progress, split=args.split,
                                 eval_file=args.eval_file, text_column=args.text_column,
                                 text_pair_column=args.text_pair_column, label_column=args.label_column,
                                 device=args.device, precision=args.precision)
    metric = report["metric"]
    print(f"\n{report['task']} {report['evaluated_on']} ({report['eval_examples']} examples): {metric} of every exit")
    print(table(report["layer_metrics"], list(report["layer_metrics"][0])))
    if report["oracle"]:
        o = report["oracle"]
        print(f"\noracle (shallowest correct exit): {metric} {o['metric']:.4f} at speed-up {o['speedup']:.2f}x")
    print(f"\nthresholds calibrated on {report['calibration_split']} ({report['calibration_examples']} examples), "
          f"measured on {report['evaluated_on']}:")
    rows = [r for r in report["calibrated"] if "speedup" in r]
    print(table(rows, ["criterion", "target_speedup", "threshold", "patience", "speedup", "metric", "mean_exit_layer"]))
    for row in report["calibrated"]:
        if "error" in row:
            print(f"  {row['criterion']} at {row['target_speedup']}x: {row['error']}")
    if report["separation"]:
        print("\nhow well each indicator separates right from wrong answers (AUROC per layer, 0.5 = not at all):")
        print(table([{"indicator": c, **{f"L{m + 1}": v for m, v in enumerate(scores)}}
                     for c, scores in report["separation"].items()],
                    ["indicator"] + [f"L{m + 1}" for m in range(report["num_layers"])]))
    print(f"\nfull-depth {metric}: {report['full_depth']:.4f}; sweeps, tables and plot written to {output}")
