"""The data a checkpoint was trained on, rebuilt from what its config records: its training run's splits, the
calibration slice held out beside them, and the source it is evaluated against."""

from __future__ import annotations

from de3bert.data import (DataSource, Example, GlueSource, RunData, as_source, load_run_data, recorded_source,
                          with_location)
from de3bert.errors import CheckpointError
from de3bert.exits.runners import ExitRunner


def run_data(model: ExitRunner, source: DataSource) -> RunData:
    """The examples of the run that trained the checkpoint — training, dev and the held-out slices — rebuilt from
    its source and its recorded subsample size, fractions and seed."""
    training = model.config.training
    return load_run_data(source, training.get("max_train_samples"), training.get("validation_fraction", 0.1),
                         training.get("calibration_fraction", 0.0), training.get("seed", 42))


def calibration_split(data: RunData) -> tuple[str, list[Example]]:
    """The name and examples of a run's calibration slice, or of its dev set when it held none out."""
    if data.calibration:
        return "calibration (held out from train)", data.calibration
    return data.dev_split, data.dev


def calibration_examples(model: ExitRunner, source: DataSource | str, data_dir: str | None = None,
                         hub_dataset: str | None = None) -> tuple[str, list[Example]]:
    """The held-out calibration split the checkpoint was trained beside (rebuilt from its seed), or its dev set
    when it held none out. source: a data source, or a GLUE task name read from data_dir or hub_dataset."""
    return calibration_split(run_data(model, as_source(source, data_dir, hub_dataset)))


def evaluation_source(model: ExitRunner, task_name: str | None = None, data_dir: str | None = None,
                      hub_dataset: str | None = None) -> DataSource:
    """The data a checkpoint is evaluated against: the GLUE task `task_name` if given, else the source it was
    trained on (a GLUE task moved to data_dir or hub_dataset if given)."""
    if task_name is not None:
        return GlueSource(task_name, data_dir, hub_dataset)
    source = recorded_source(model.config.training, model.config.task)
    if source is None:
        raise CheckpointError(f"the checkpoint of task '{model.config.task}' records no training data to rebuild "
                              "its calibration slice from, and that is no GLUE task; give the GLUE task to use")
    return with_location(source, data_dir, hub_dataset)


def split_examples(model: ExitRunner, source: DataSource, split: str = "dev") -> tuple[RunData, str, list[Example]]:
    """The run's data rebuilt from `source`, and the name and examples of one of its splits ("dev": the split that
    chose the best epoch — a dev set, a validation file or the held-out validation slice)."""
    data = run_data(model, source)
    if list(data.task.labels) != model.config.labels:
        raise CheckpointError(f"the model was trained for task '{model.config.task}' with labels "
                              f"{model.config.labels}, not for '{data.task.name}' with labels {list(data.task.labels)}")
    if split == "dev":
        return data, data.dev_split, data.dev
    return data, split, source.read(split, data.task)
