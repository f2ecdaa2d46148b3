"""`de3bert train`: fine-tune an early-exit model on your data, a dataset or a GLUE task, or resume a stopped run.

Its training options are generated from `TrainingArguments` and `ExitHeadConfig` (names, defaults and help
live there); the data options say which `DataSource` to read.
"""

from __future__ import annotations

import argparse

from de3bert.apps.cli.options import DATA_HELP, HUB_HELP, HelpFormatter, add_knobs, knob_values
from de3bert.data import Columns, DatasetSource, DataSource, FileSource, GlueSource
from de3bert.errors import De3bertError
from de3bert.model.backbones import DEFAULT_BACKBONE
from de3bert.model.config import ExitHeadConfig
from de3bert.training import TrainingArguments, resume, train
from de3bert.training.distributed import Placement, process_state

HELP = "fine-tune an early-exit model on your data, a dataset or a GLUE task"
RESUME_OPTIONS = ("resume", "data_dir", "progress", "device")
"""The options that may accompany --resume: where the data and the run are now, and progress bars."""
DATA_OPTIONS = {
    "--task": ("data_dir", "hub_dataset"),
    "--train-file": ("validation_file", "text_column", "text_pair_column", "label_column", "labels", "regression"),
    "--dataset": ("dataset_config", "train_split", "validation_split", "text_column", "text_pair_column",
                  "label_column", "labels", "regression"),
}
"""The options that only one kind of data takes."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the command."""
    parser = commands.add_parser("train", help=HELP, description=HELP, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data: exactly one of --train-file, --dataset and --task")
    data.add_argument("--train-file", help="your training data: a .csv, .tsv or .jsonl file with named columns")
    data.add_argument("--validation-file",
                      help="your validation data (same columns), to pick the best epoch (default: a stratified "
                           "--validation-fraction of the training file is held out for that)")
    data.add_argument("--dataset", help="a Hugging Face `datasets` id (needs internet and `pip install datasets`) or "
                                        "a local folder of data files (train.csv, validation.csv, ...)")
    data.add_argument("--dataset-config", help="configuration (subset) name of --dataset")
    data.add_argument("--train-split", default="train", help="split of --dataset to train on")
    data.add_argument("--validation-split",
                      help="split of --dataset that picks the best epoch (default: its 'validation' split if it has "
                           "one, else a held-out slice of the training split)")
    data.add_argument("--text-column", default="text", help="column holding the text")
    data.add_argument("--text-pair-column", help="column holding the second text, for pair tasks")
    data.add_argument("--label-column", default="label", help="column holding the label (or the score)")
    data.add_argument("--labels",
                      help="the class labels in output order, separated by commas, e.g. bug,feature,question "
                           "(default: the labels found in the training data, sorted)")
    data.add_argument("--regression", action="store_true", help="the label column holds a number to predict")
    data.add_argument("--task", help="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli")
    data.add_argument("--data-dir", help=DATA_HELP)
    data.add_argument("--hub-dataset", help=HUB_HELP)
    parser.add_argument("--model", default=DEFAULT_BACKBONE,
                        help="backbone: minilm-l6 (embedded), mpnet-base (12 layers), a local folder or hub id")
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the stopped run whose --output was DIR, with the options it was started with")
    add_knobs(parser.add_argument_group("training"), TrainingArguments)
    add_knobs(parser.add_argument_group("exit heads"), ExitHeadConfig)
    parser.set_defaults(run=run, parser=parser)


def given(args: argparse.Namespace, names) -> list[str]:
    """The options among `names` set to something other than their defaults, as written on the command line."""
    parser = args.parser
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    return [flags[name] for name in names if getattr(args, name) != parser.get_default(name)]


def data_source(args: argparse.Namespace) -> DataSource:
    """The data the train options name: a GLUE task, the user's files or a `datasets` dataset — exactly one."""
    chosen = [option for option in DATA_OPTIONS if getattr(args, option[2:].replace("-", "_")) is not None]
    if len(chosen) != 1:
        raise De3bertError("give one of --task (a GLUE task), --train-file (your .csv, .tsv or .jsonl) and --dataset "
                           "(a `datasets` id or folder)" + (f", not {' and '.join(chosen)}" if chosen else ""))
    kind = chosen[0]
    foreign = given(args, sorted({n for k, names in DATA_OPTIONS.items() if k != kind for n in names}
                                 - set(DATA_OPTIONS[kind])))
    if foreign:
        raise De3bertError(f"{' '.join(foreign)} do{'es' if len(foreign) == 1 else ''} not go with {kind}")
    if kind == "--task":
        return GlueSource(args.task, args.data_dir, args.hub_dataset)
    labels = None if args.labels is None else tuple(label.strip() for label in args.labels.split(","))
    user = dict(columns=Columns(args.text_column, args.text_pair_column, args.label_column), labels=labels,
                regression=args.regression)
    if kind == "--train-file":
        return FileSource(args.train_file, args.validation_file, **user)
    return DatasetSource(args.dataset, args.dataset_config, args.train_split, args.validation_split, **user)


def run(args: argparse.Namespace) -> None:
    """Train a model, or continue a stopped run with --resume (with the options saved in its folder)."""
    if args.resume:
        options = [action.dest for action in args.parser._actions if action.option_strings and action.dest != "help"]
        repeated = given(args, [name for name in options if name not in RESUME_OPTIONS])
        if repeated:
            raise De3bertError("--resume continues a run with the options it was started with; "
                               f"drop {' '.join(repeated)}")
        result = resume(args.resume, args.data_dir, progress=args.progress,
                        device=None if args.device == "auto" else args.device)
    else:
        if args.output_dir is None:
            raise De3bertError("give --output and the data (--task, --train-file or --dataset), or --resume DIR "
                               "to continue a stopped run")
        result = train(data_source(args), args.model, knob_values(TrainingArguments, args),
                       heads=knob_values(ExitHeadConfig, args))
    process_state(Placement.resolve(args.device, "fp32").device).print(
        f"best checkpoint (selection score {result.best_score:.4f}) saved to {result.output_dir}")
