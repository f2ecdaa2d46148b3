"""The entry points of training: `train` a new model, or `resume` a stopped run from its folder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from de3bert.data import DataSource, as_source, encode_examples, load_run_data, with_location
from de3bert.errors import CheckpointError, De3bertError
from de3bert.model.config import ExitHeadConfig
from de3bert.model.modeling import EarlyExitModel
from de3bert.training.arguments import TrainingArguments
from de3bert.training.distributed import Placement, process_state
from de3bert.training.job import TrainingJob
from de3bert.training.recipes import RECIPES
from de3bert.training.state import TrainingState, load_training_state, state_path
from de3bert.training.trainer import Trainer, TrainResult, seed_everything


def train(data: DataSource | str, backbone: str, args: TrainingArguments, data_dir: str | None = None,
          hub_dataset: str | None = None, heads: ExitHeadConfig | None = None) -> TrainResult:
    """The whole job: read the data, build the model on a backbone, train, calibrate, save.

    data: where the examples come from (GlueSource, FileSource, DatasetSource), or a GLUE task name, read from
    data_dir or hub_dataset.
    """
    if state_path(args.output_dir).exists():
        raise CheckpointError(
            f"{args.output_dir} holds the training state of an unfinished run: continue it with `de3bert train "
            f"--resume {args.output_dir}` (de3bert.training.resume), or delete {state_path(args.output_dir).parent}")
    return _train_job(TrainingJob(as_source(data, data_dir, hub_dataset), backbone, args, heads or ExitHeadConfig()))


def resume(output_dir: str | Path, data_dir: str | None = None, progress: bool | None = None,
           device: str | None = None) -> TrainResult:
    """Continue a stopped run from <output_dir>/training_state, with the arguments it was started with.

    It ends with the weights the uninterrupted run would have reached. data_dir: where a GLUE task's data lies
    now, if it moved. progress: show progress bars (None: as the run did). device: where to continue (None: where
    the run was asked to train; another device gives the same run up to floating-point differences).
    """
    state = load_training_state(output_dir)
    if not state.run:
        raise CheckpointError(f"the training state in {output_dir} was saved by a Trainer driven directly; "
                              "continue it with Trainer(...).train(load_training_state(...))")
    try:
        job = TrainingJob.from_dict(state.run)
    except (TypeError, De3bertError) as exc:
        raise CheckpointError(f"{state_path(output_dir)} holds arguments this de3bert cannot use: {exc}") from exc
    args = replace(job.args, output_dir=str(output_dir), progress=job.args.progress if progress is None else progress,
                   device=job.args.device if device is None else device)
    return _train_job(replace(job, args=args, data=with_location(job.data, data_dir, None)), state)


def _train_job(job: TrainingJob, state: TrainingState | None = None) -> TrainResult:
    """Read the job's data, build the model, and train it from the start or from `state` (the device and precision
    resolved here, once, and carried)."""
    args = job.args
    placement = Placement.resolve(args.device, args.precision)
    processes = process_state(placement.device)
    if state is not None:
        processes.print(f"resuming the run in {args.output_dir} after optimizer step {state.global_step}")
    data = load_run_data(job.data, args.max_train_samples, args.validation_fraction, args.calibration_fraction,
                         args.seed)
    task = data.task
    heads = job.heads if RECIPES[args.recipe].prototypes else replace(job.heads, prototype_dim=0)
    seed_everything(args.seed)
    model = EarlyExitModel.from_backbone(job.backbone, task.name, list(task.labels), heads, args.max_length,
                                         list(task.label_names))
    encoded = {}
    for split, examples in (("train", data.train), ("calibration", data.calibration), ("dev", data.dev)):
        encoded[split] = encode_examples(model.tokenizer, examples, args.max_length)
        truncated = sum(e.truncated for e in encoded[split])
        if truncated:
            processes.print(f"note: {truncated} of {len(examples)} {split} inputs were longer than {args.max_length} "
                            "tokens and were truncated")
    held_out = ("" if data.dev_split == "dev"
                else f" (held out from train{'' if task.is_regression else ', stratified by class'})")
    processes.print(
        f"task {task.name}: {len(data.train)} training, {len(data.calibration)} calibration, "
        f"{len(data.dev)} {data.dev_split}{held_out} examples; "
        + (f"{task.num_labels} classes; " if task.num_labels > 2 else "")
        + f"backbone {job.backbone} ({model.num_layers} layers); recipe {args.recipe}"
        + (f"; {processes.num_processes} processes, {args.batch_size} examples per step in all"
           if processes.num_processes > 1 else ""))
    trainer = Trainer(model, args, task, encoded["train"], encoded["dev"], encoded["calibration"], job,
                      data.dev_split, placement)
    return trainer.train(state)
