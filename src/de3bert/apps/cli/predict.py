"""`de3bert predict`: classify a text (or text pair), or every row of a file, with early exiting."""

from __future__ import annotations

import argparse
import json

from de3bert.apps.batch_predict import predict_file, summary_path
from de3bert.apps.cli.options import (HelpFormatter, add_device_options, add_policy_options, add_progress_option,
                                      add_runtime_option)
from de3bert.apps.runtimes import load_model
from de3bert.data import recorded_columns
from de3bert.errors import De3bertError
from de3bert.exits.engine import EarlyExitEngine
from de3bert.exits.policies import ExitPolicy

HELP = "classify a text (or text pair) with early exiting"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the command."""
    parser = commands.add_parser("predict", help=HELP, description=HELP, formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint folder or exported folder")
    add_runtime_option(parser)
    parser.add_argument("--text", help="the text to classify")
    parser.add_argument("--text-pair", help="second text, for pair tasks (RTE, MRPC, QNLI, ...)")
    parser.add_argument("--input", help="file of inputs to classify (.tsv, .csv or .jsonl with named columns)")
    parser.add_argument("--text-column", help="column of --input holding the text (default: the training data's)")
    parser.add_argument("--text-pair-column",
                        help="column of --input holding the second text of a pair (default: the training data's)")
    parser.add_argument("--output", help="where to write predictions for --input (.jsonl, .tsv or .csv)")
    parser.add_argument("--batch-size", type=int, default=32, help="inference batch size")
    add_progress_option(parser)
    add_policy_options(parser)
    add_device_options(parser)
    parser.set_defaults(run=run)


def policy_of(args: argparse.Namespace) -> ExitPolicy | None:
    """The exit policy the options ask for (None: the checkpoint's own)."""
    if args.criterion is None:
        return None
    return ExitPolicy(args.criterion, threshold=args.threshold, patience=args.patience, lam=args.lam)


def run(args: argparse.Namespace) -> None:
    """Predict one text, or a file of them."""
    model = load_model(args.checkpoint, args.runtime, device=args.device, precision=args.precision)
    engine = EarlyExitEngine(model, policy_of(args), batch_size=args.batch_size)
    if args.input is not None:
        if args.output is None:
            raise De3bertError("--input needs --output (a .jsonl, .tsv or .csv file to write)")
        columns = recorded_columns(model.config.training, model.config.task).overridden(args.text_column,
                                                                                        args.text_pair_column)
        summary = predict_file(engine, args.input, args.output, columns.text, columns.text_pair,
                               progress=args.progress)
        print(f"wrote {summary.inputs} predictions to {args.output}")
        print(f"{summary.describe()}; summary in {summary_path(args.output)}")
        return
    if args.text is None:
        raise De3bertError("give --text (and --text-pair for pair tasks), or --input FILE --output FILE")
    pairs = [args.text_pair] if args.text_pair is not None else None
    for prediction in engine.predict([args.text], pairs):
        print(json.dumps(prediction.__dict__))
