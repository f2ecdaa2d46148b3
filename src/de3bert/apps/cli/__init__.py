"""`de3bert` command line: train | evaluate | calibrate | export | predict | bench | serve — a module per command.

Thin: each command parses its options and calls the library; anything it does, Python code can do with the
same objects. Options that are knobs of a settings dataclass are generated from its fields.
"""

from __future__ import annotations

import argparse
import sys

from de3bert.errors import De3bertError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `de3bert` command."""
    from de3bert.apps.cli import bench, calibrate, evaluate, export, predict, serve, train

    parser = argparse.ArgumentParser(prog="de3bert", description=(
        "Distance-enhanced early exiting (DE³-BERT) for BERT-family classifiers: train, evaluate, calibrate, export, "
        "predict, bench, serve."))
    commands = parser.add_subparsers(dest="command", required=True)
    for command in (train, evaluate, calibrate, export, predict, bench, serve):
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `de3bert` console script."""
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    # --no-progress also silences transformers' own "Loading weights" bar
    (hf_logging.enable_progress_bar if getattr(args, "progress", True) else hf_logging.disable_progress_bar)()
    try:
        args.run(args)
    except De3bertError as exc:
        print(f"de3bert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"de3bert {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
