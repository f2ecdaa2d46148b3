"""GLUE tasks, users' own files and `datasets` datasets: sources, reading, metrics, tokenizing and batching."""

from de3bert.data.collate import Collator, EncodedExample, encode_examples, length_sorted_batches
from de3bert.data.metrics import compute_metrics, main_metric
from de3bert.data.readers import (load_dataset_splits, load_split, read_dataset, read_glue_split, read_hub_split,
                                  read_rows, read_table, resolve_glue_dir, split_off, subsample)
from de3bert.data.sources import (Columns, DatasetSource, DataSource, FileSource, GlueSource, RunData, as_source,
                                  load_run_data, recorded_columns, recorded_source, source_from_dict, with_location)
from de3bert.data.tasks import (GLUE_TASKS, Example, GlueTask, TaskSpec, default_label_names, find_glue_task, get_task,
                                user_task)

__all__ = [
    "GLUE_TASKS", "Collator", "Columns", "DataSource", "DatasetSource", "EncodedExample", "Example", "FileSource",
    "GlueSource", "GlueTask", "RunData", "TaskSpec", "as_source", "compute_metrics", "default_label_names",
    "encode_examples", "find_glue_task", "get_task", "length_sorted_batches", "load_dataset_splits", "load_run_data",
    "load_split", "main_metric", "read_dataset", "read_glue_split", "read_hub_split", "read_rows", "read_table",
    "recorded_columns", "recorded_source", "resolve_glue_dir", "source_from_dict", "split_off", "subsample",
    "user_task", "with_location",
]
