"""Layer runners: how the early-exit engine computes a model's pieces on one runtime.

`EarlyExitEngine` owns the one loop that decides exits (chunks, padding trims, policy state). What
differs between runtimes is passed in as a runner: it computes the embeddings, the per-chunk layer
context and one layer with (optionally) its exit head, and hands back PyTorch tensors. Tensors stay
where the runner puts them. `TorchRunner` runs an `EarlyExitModel` in PyTorch; the ONNX Runtime
runner lives in `onnx_model.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from de3bert.heads import HeadOutput
from de3bert.policies import ExitPolicy

if TYPE_CHECKING:
    from de3bert.modeling import EarlyExitModel


class LayerRunner(Protocol):
    """What the engine needs from a runtime."""

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Embedding output (B, T, H) for token ids."""

    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> object:
        """What every layer of a compute chunk needs besides its hidden states (masks, position bias)."""

    def run_layer(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor, context: object,
                  policy: ExitPolicy | None) -> tuple[torch.Tensor, HeadOutput | None]:
        """Hidden states after layer ``index`` (0-based) and, unless policy is None, the exit head's output with
        what the policy reads."""


class TorchRunner:
    """Runs an EarlyExitModel's backbone and heads in PyTorch (in eval mode: no dropout), on the device the model
    is on: token ids are moved there, and the hidden states stay there."""

    def __init__(self, model: EarlyExitModel):
        model.eval()
        self.backbone = model.backbone
        self.heads = model.heads

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return self.heads[0].classifier.weight.device

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Embedding output (B, T, H) for token ids."""
        device = self.device
        return self.backbone.embed(input_ids.to(device), None if token_type_ids is None else token_type_ids.to(device))

    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> object:
        """The backbone's layer context (attention mask, position bias) for a chunk."""
        return self.backbone.context(hidden, attention_mask)

    def run_layer(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor, context: object,
                  policy: ExitPolicy | None) -> tuple[torch.Tensor, HeadOutput | None]:
        """Layer ``index`` and, for a policy, its head (the prototypical network only if the policy reads it)."""
        hidden = self.backbone.run_layer(index, hidden, context)
        if policy is None:
            return hidden, None
        return hidden, self.heads[index](hidden, attention_mask, with_prototypes=policy.needs_prototypes)
