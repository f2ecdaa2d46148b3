"""GLUE tasks and users' own tables: reading, metrics, tokenizing and batching."""

from de3bert.data.collate import Collator, EncodedExample, encode_examples, length_sorted_batches
from de3bert.data.metrics import compute_metrics, main_metric
from de3bert.data.readers import (load_split, read_glue_split, read_hub_split, read_table, resolve_glue_dir, split_off,
                                  subsample)
from de3bert.data.tasks import GLUE_TASKS, Example, TaskSpec, get_task

__all__ = [
    "GLUE_TASKS", "Collator", "EncodedExample", "Example", "TaskSpec", "compute_metrics", "encode_examples", "get_task",
    "length_sorted_batches", "load_split", "main_metric", "read_glue_split", "read_hub_split", "read_table",
    "resolve_glue_dir", "split_off", "subsample",
]
