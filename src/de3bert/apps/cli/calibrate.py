"""`de3bert calibrate`: fit a folder's exit thresholds to target speed-ups on your own inputs, and write them in."""

from __future__ import annotations

import argparse

from de3bert.apps.calibrate import Calibration, calibrate_folder
from de3bert.apps.cli.options import HelpFormatter, add_device_options, add_progress_option, add_runtime_option, table
from de3bert.exits.calibration import LEVEL, MIN_INPUTS, SPEEDUP_TOLERANCE, TARGET_SPEEDUPS
from de3bert.exits.criteria import CRITERIA

HELP = "fit exit thresholds to target speed-ups on your own (unlabelled) inputs"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the command."""
    parser = commands.add_parser("calibrate", help=HELP, formatter_class=HelpFormatter, description=(
        f"{HELP}: the layer speed-up of a policy follows from the exit layers alone, so the texts of a sample of "
        "your traffic are enough. The thresholds, the default policy (the first target's, or the --max-drop one) and "
        "the calibrated table are written into the folder's config.json atomically; the values they replace stay in "
        "its calibration_history and the model card."))
    parser.add_argument("checkpoint", help="checkpoint folder or exported folder (written into)")
    parser.add_argument("--input", required=True,
                        help="inputs to calibrate on: a .csv, .tsv or .jsonl file with named columns")
    parser.add_argument("--target-speedup", type=float, nargs="+",
                        help="layer speed-ups to calibrate to; the first becomes the default policy's (default: the "
                             "one the folder's default policy was calibrated to, then the others of "
                             f"{', '.join(f'{t:g}' for t in TARGET_SPEEDUPS)}; none with --max-drop)")
    parser.add_argument("--criterion", choices=list(CRITERIA),
                        help="exit criterion to calibrate (default: the folder's default policy's)")
    parser.add_argument("--text-column", help="column holding the text (default: the training data's)")
    parser.add_argument("--text-pair-column", help="column holding the second text of a pair (default: the training "
                                                   "data's)")
    parser.add_argument("--label-column", help="column holding labels (values or names): adds the metric at each "
                                               "target and allows --max-drop; labels never move the thresholds")
    parser.add_argument("--max-drop", type=float,
                        help="the fastest policy whose metric on the labelled file stays within this many points "
                             "(metric × 100) of full depth becomes the default policy")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")
    parser.add_argument("--dry-run", action="store_true", help="print the calibration without writing the folder")
    parser.add_argument("--batch-size", type=int, default=64, help="inference batch size")
    add_runtime_option(parser)
    add_device_options(parser)
    add_progress_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Calibrate, print the table, write the folder."""
    calibration = calibrate_folder(args.checkpoint, args.input, args.target_speedup and tuple(args.target_speedup),
                                   args.criterion, args.text_column, args.text_pair_column, args.label_column,
                                   args.max_drop, args.seed, args.runtime, args.device, args.precision,
                                   args.batch_size, args.progress, write=not args.dry_run)
    print(report(calibration))
    if args.dry_run:
        print(f"dry run: {args.checkpoint} is unchanged")
    else:
        print(f"written into {args.checkpoint}/config.json (what it replaced is kept in calibration_history)")


def report(calibration: Calibration) -> str:
    """The calibration as a user reads it: the table, the budget's policy, the warnings and the new default."""
    labels = "labelled" if calibration.labelled else "labels unused"
    lines = [f"{calibration.criterion} calibrated on {calibration.inputs} ({calibration.examples} inputs, {labels}); "
             "speed-up with its "
             f"{LEVEL:.0%} bootstrap interval (low, high):"]
    columns = ["target_speedup", "threshold", "patience", "speedup", "speedup_low", "speedup_high"]
    if calibration.labelled:
        columns += ["metric", "metric_drop"]
        lines.insert(1, f"full depth {calibration.metric}: {calibration.full_depth:.4f}; metric_drop in points "
                        "(metric × 100) below it")
    reached = [row for row in calibration.rows if "error" not in row]
    if reached:
        lines.append(table(reached, columns))
    lines += [f"  {row['target_speedup']:g}x: {row['error']}" for row in calibration.rows if "error" in row]
    within = calibration.within
    if within is not None:
        exactly = "every distinct policy scored" if within["exact"] else "a grid of policies scored"
        lines.append(f"fastest within {within['max_drop']:g} points of full depth ({exactly}): "
                     f"{within['speedup']:.2f}x ({within['speedup_low']:.2f}x to {within['speedup_high']:.2f}x), "
                     f"{calibration.metric} {within['metric']:.4f} ({within['metric_drop']:.2f} points below), "
                     f"τ={within['threshold']:.4g}, patience {within['patience']}")
    for row in [*reached, *([within] if within else [])]:
        if "warning" in row:
            lines.append(f"warning at {row['target_speedup']:.3g}x: {row['warning']}")
    if any("warning" in row for row in [*reached, *([within] if within else [])]):
        lines.append(f"(a calibration is trusted with at least {MIN_INPUTS} inputs and a {LEVEL:.0%} interval within "
                     f"±{SPEEDUP_TOLERANCE:.0%} of the target)")
    default = calibration.default
    lines.append(f"default exit policy: {default['criterion']} τ={default['threshold']:.4g}, patience "
                 f"{default['patience']}, at {default['speedup']:.2f}x on these inputs")
    return "\n".join(lines)
