"""The runner protocol: what the engine, calibration and evaluation need of a model, on any runtime.

`EarlyExitEngine` owns the one loop that decides exits (chunks, padding trims, policy state). A model
is anything that implements `ExitRunner`: its config and tokenizer, and the pieces the loop steps
through — embeddings, the per-chunk layer context, and one layer with (optionally) its exit head —
handing back PyTorch tensors (they stay where the model puts them). `EarlyExitModel` (PyTorch,
`model/modeling.py`) and `OnnxEarlyExitModel` (ONNX Runtime, `onnx/runtime.py`) both implement it,
so nothing here or above needs to know which one it runs.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from de3bert.model.config import EarlyExitConfig
from de3bert.model.heads import HeadOutput, HeadReads


class ExitRunner(Protocol):
    """A model the early-exit engine can run, layer by layer, on some runtime."""

    config: EarlyExitConfig
    tokenizer: PreTrainedTokenizerBase | None
    training: bool

    @property
    def num_layers(self) -> int:
        """Number of layers M (= number of exits)."""

    @property
    def has_prototypes(self) -> bool:
        """Whether the internal exit heads carry prototypical networks (the prototype criteria read them)."""

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Embedding output (B, T, H) for token ids."""

    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> object:
        """What every layer of a compute chunk needs besides its hidden states (masks, position bias)."""

    def run_layer(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor, context: object,
                  reads: HeadReads | None) -> tuple[torch.Tensor, HeadOutput | None]:
        """Hidden states after layer ``index`` (0-based) and, unless reads is None, the exit head's output with
        what reads asks for."""

    def layer_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None, reads: HeadReads = HeadReads(True)) -> list[HeadOutput]:
        """Every exit head's output for a batch (no early stop)."""

    def eval(self) -> ExitRunner:
        """Itself, in inference mode (no dropout)."""

    def train(self, mode: bool = True) -> ExitRunner:
        """Itself, in training mode or not."""

    def to(self, device: torch.device) -> ExitRunner:
        """Itself, on `device`."""
