"""The runner protocol: what the engine, calibration and evaluation need of a model, on any runtime.

A model is an `ExitRunner`: its config and tokenizer, and every exit head's output for a batch (what
calibration, evaluation and explanations read). To answer with early exits it is one of two kinds:

- a `LayerRunner` the engine steps through — embeddings, the per-chunk layer context, one layer with
  (optionally) its exit head — deciding after each layer with `ExitPolicy.step`: the PyTorch `EarlyExitModel`
  (`model/modeling.py`);
- a `SelfExitingRunner` whose rows leave by themselves, given the policy: the exported graph on ONNX Runtime
  (`onnx/runtime.py`), which runs `ExitPolicy.step` traced into it.

The engine asks which kind a model is once, when it is built (`is_self_exiting`); nothing else needs to know
which model it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase

from de3bert.errors import PolicyError
from de3bert.exits.criteria import applicable_criteria
from de3bert.model.config import EarlyExitConfig
from de3bert.model.heads import HeadOutput, HeadReads


@dataclass
class BatchExits:
    """Early-exit results for one batch, in input order."""

    logits: torch.Tensor  # (B, C) logits of the exit layer
    predictions: torch.Tensor  # (B,) class index, or regression score
    exit_layers: torch.Tensor  # (B,) 1-based layer each input left at
    indicators: torch.Tensor  # (B,) the criterion's value at the exit layer (NaN where it has none)


class ExitRunner(Protocol):
    """A model on some runtime: what every part of de3bert reads of it."""

    config: EarlyExitConfig
    tokenizer: PreTrainedTokenizerBase | None
    training: bool

    @property
    def num_layers(self) -> int:
        """Number of layers M (= number of exits)."""

    @property
    def has_prototypes(self) -> bool:
        """Whether the internal exit heads carry prototypical networks (the prototype criteria read them)."""

    def layer_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None, reads: HeadReads = HeadReads(True)) -> list[HeadOutput]:
        """Every exit head's output for a batch (no early stop)."""

    def eval(self) -> ExitRunner:
        """Itself, in inference mode (no dropout)."""

    def train(self, mode: bool = True) -> ExitRunner:
        """Itself, in training mode or not."""

    def to(self, device: torch.device) -> ExitRunner:
        """Itself, on `device`."""


class LayerRunner(ExitRunner, Protocol):
    """A model the engine steps through layer by layer."""

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Embedding output (B, T, H) for token ids."""

    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> object:
        """What every layer of a compute chunk needs besides its hidden states (masks, position bias)."""

    def run_layer(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor, context: object,
                  reads: HeadReads | None) -> tuple[torch.Tensor, HeadOutput | None]:
        """Hidden states after layer ``index`` (0-based) and, unless reads is None, the exit head's output with
        what reads asks for."""


@runtime_checkable
class SelfExitingRunner(Protocol):
    """A model whose rows leave by themselves under a policy (an exported graph)."""

    @property
    def criteria(self) -> tuple[str, ...]:
        """The criteria it can run (those fixed in it)."""

    def exit_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                   policy, chunk_size: int) -> BatchExits:
        """Early-exit forward of a padded batch under `policy` (an ExitPolicy), in chunks of chunk_size rows."""


_SELF_EXITING_KINDS: dict[type, bool] = {}


def is_self_exiting(model: ExitRunner) -> bool:
    """Whether a model decides exits by itself (else the engine steps through its layers)."""
    kind = type(model)  # a protocol's isinstance inspects every member (µs per call): asked once per class
    if kind not in _SELF_EXITING_KINDS:
        _SELF_EXITING_KINDS[kind] = isinstance(model, SelfExitingRunner)
    return _SELF_EXITING_KINDS[kind]


def runner_criteria(model: ExitRunner) -> tuple[str, ...]:
    """The criteria a model can run, full depth included: those fixed in a self-exiting model, else every criterion
    its task and heads support."""
    if is_self_exiting(model):
        return model.criteria
    return applicable_criteria(model.config.is_regression, model.has_prototypes)


def check_criterion(model: ExitRunner, criterion: str) -> None:
    """A PolicyError, naming what the model can run, unless it can run `criterion`."""
    criteria = runner_criteria(model)
    if criterion in criteria:
        return
    if is_self_exiting(model):
        raise PolicyError(f"this export decides exits by criterion '{criteria[0]}' (or full depth), not "
                          f"'{criterion}': export the checkpoint again with --criterion {criterion}")
    raise PolicyError(f"criterion '{criterion}' does not apply to this model; choose one of {', '.join(criteria)}")
