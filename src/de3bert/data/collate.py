"""Tokenizing examples, padding them into batches, and grouping inputs of similar length."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from de3bert.data.tasks import Example
from de3bert.errors import DataError


@dataclass
class EncodedExample:
    """One tokenized, unpadded example."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    label: int | float
    truncated: bool
    """Whether tokens were cut to fit max_length."""


def _tokenize(tokenizer, examples: Sequence[Example], **kwargs) -> dict[str, list[list[int]]]:
    pairs = [e.text_b for e in examples]
    if any(p is None for p in pairs) and any(p is not None for p in pairs):
        raise DataError("examples mix single texts and text pairs; a task uses one or the other")
    return tokenizer([e.text_a for e in examples], pairs if pairs and pairs[0] is not None else None,
                     add_special_tokens=True, **kwargs)


def encode_examples(tokenizer, examples: Sequence[Example], max_length: int) -> list[EncodedExample]:
    """Tokenize examples (as pairs where text_b is set), truncated to max_length and flagged when cut; no padding."""
    if not examples:
        return []
    for index, example in enumerate(examples):
        for name, text in (("text", example.text_a), ("text pair", example.text_b)):
            if text is not None and not text.strip():
                raise DataError(f"input {index}: {name} is empty; there is nothing to classify")
    full = _tokenize(tokenizer, examples, truncation=False, verbose=False)
    long = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
    # Only the inputs that overflow are tokenized a second time, with the tokenizer's own truncation strategy.
    cut = _tokenize(tokenizer, [examples[i] for i in long], truncation=True, max_length=max_length) if long else {}
    encoded = [EncodedExample(ids, types, e.label, False)
               for e, ids, types in zip(examples, full["input_ids"],
                                        full.get("token_type_ids") or [None] * len(examples))]
    for j, i in enumerate(long):
        encoded[i] = EncodedExample(cut["input_ids"][j], cut["token_type_ids"][j] if "token_type_ids" in cut else None,
                                    examples[i].label, True)
    return encoded


class Collator:
    """DataLoader collate_fn: pads EncodedExamples to the batch's longest with the tokenizer's pad id."""

    def __init__(self, tokenizer):
        if tokenizer.pad_token_id is None:
            raise DataError(f"tokenizer {type(tokenizer).__name__} has no pad token; set one before batching")
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, batch: Sequence[EncodedExample]) -> dict[str, torch.Tensor]:
        """Stack a batch into input_ids, attention_mask, token_type_ids (if any) and labels tensors."""
        width = max(len(e.input_ids) for e in batch)
        padding = [width - len(e.input_ids) for e in batch]
        tensors = {
            "input_ids": torch.tensor([e.input_ids + [self.pad_id] * p for e, p in zip(batch, padding)]),
            "attention_mask": torch.tensor([[1] * len(e.input_ids) + [0] * p for e, p in zip(batch, padding)]),
        }
        if batch[0].token_type_ids is not None:
            tensors["token_type_ids"] = torch.tensor([e.token_type_ids + [0] * p for e, p in zip(batch, padding)])
        regression = any(isinstance(e.label, float) for e in batch)
        tensors["labels"] = torch.tensor([e.label for e in batch], dtype=torch.float if regression else torch.long)
        return tensors


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group indices into batches of similar length, longest first, each index exactly once."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    # Longest first: a batch that does not fit in memory fails at once, not at the end of a long run.
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
