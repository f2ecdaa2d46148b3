"""Early-exit inference that really stops computing.

After every layer the policy decides which rows of the batch exit; those rows are recorded and
dropped from the active set (hidden states, attention mask, policy state), trailing padding
columns that no remaining row needs are cut, and only the remaining rows go through the next
layer. A batch of one therefore stops at its exit layer. Only the parts of a head the policy reads
are computed (patience and entropy policies skip the prototypical network).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from de3bert.data import Collator, Example, encode_examples, length_sorted_batches
from de3bert.errors import PolicyError
from de3bert.modeling import EarlyExitModel
from de3bert.policies import ExitPolicy


@dataclass
class BatchExits:
    """Engine results for one batch, in input order."""

    logits: torch.Tensor  # (B, C) logits of the exit layer
    predictions: torch.Tensor  # (B,) class index, or regression score
    exit_layers: torch.Tensor  # (B,) 1-based layer each input left at
    indicators: torch.Tensor  # (B,) the policy's indicator at the exit layer


@dataclass
class Prediction:
    """One input's answer: label (or score), class probabilities, exit layer and indicator at exit."""

    label: str | float
    probabilities: dict[str, float] | None
    exit_layer: int
    indicator: float


def _trim_padding(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing columns that are padding for every remaining row."""
    used = mask.any(0).nonzero()
    length = int(used.max()) + 1 if used.numel() else mask.shape[1]
    if length == mask.shape[1]:
        return hidden, mask
    return hidden[:, :length], mask[:, :length]


class EarlyExitEngine:
    """Runs an EarlyExitModel layer by layer and stops each input at the layer its policy picks."""

    def __init__(self, model: EarlyExitModel, policy: ExitPolicy | None = None, batch_size: int = 32,
                 bucket_by_length: bool = True):
        if policy is None:
            if not model.config.policy:
                raise PolicyError("the checkpoint has no calibrated exit policy; pass one (criterion and threshold)")
            policy = ExitPolicy(**model.config.policy)
        if policy.needs_prototypes and not model.heads[0].has_prototypes:
            raise PolicyError(f"criterion '{policy.criterion}' needs prototypes, but this model's heads have none "
                              "(trained with a recipe without prototypes)")
        self.model = model.eval()
        self.policy = policy
        self.batch_size = batch_size
        self.bucket_by_length = bucket_by_length
        self.collator = Collator(model.tokenizer) if model.tokenizer is not None else None

    @torch.no_grad()
    def run_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  token_type_ids: torch.Tensor | None = None, policy: ExitPolicy | None = None) -> BatchExits:
        """Early-exit forward of one padded batch; rows leave the computation as they exit."""
        policy = policy or self.policy
        backbone, heads = self.model.backbone, self.model.heads
        num_layers, batch = len(heads), input_ids.shape[0]
        hidden = backbone.embed(input_ids, token_type_ids)
        mask = attention_mask
        hidden, mask = _trim_padding(hidden, mask)
        context = backbone.context(hidden, mask)
        state = policy.initial_state(batch, hidden.device)
        active = torch.arange(batch, device=hidden.device)
        width = heads[0].classifier.out_features
        logits = hidden.new_zeros(batch, width)
        exit_layers = torch.zeros(batch, dtype=torch.long, device=hidden.device)
        indicators = hidden.new_zeros(batch)
        for index in range(num_layers):
            hidden = backbone.run_layer(index, hidden, context)
            output = heads[index](hidden[:, 0], with_prototypes=policy.needs_prototypes)
            step = policy.step(output, state, is_last=index == num_layers - 1)
            leaving = active[step.exits]
            logits[leaving] = output.logits[step.exits].to(logits.dtype)
            indicators[leaving] = step.indicator[step.exits].to(indicators.dtype)
            exit_layers[leaving] = index + 1
            staying = ~step.exits
            if not staying.any():
                break
            state = step.state
            if leaving.numel():
                active, state = active[staying], state.select(staying)
                hidden, mask = _trim_padding(hidden[staying], mask[staying])
                context = backbone.context(hidden, mask)
        predictions = logits.squeeze(-1) if width == 1 else logits.argmax(-1)
        return BatchExits(logits, predictions, exit_layers, indicators)

    def run_examples(self, examples: list[Example], policy: ExitPolicy | None = None) -> BatchExits:
        """Early-exit results for examples, batched (by similar length if enabled), in input order."""
        if self.collator is None:
            raise PolicyError("the model has no tokenizer; use run_batch with token ids")
        encoded = encode_examples(self.model.tokenizer, examples, self.model.config.max_length)
        if self.bucket_by_length:
            batches = length_sorted_batches([len(e.input_ids) for e in encoded], self.batch_size)
        else:
            batches = [list(range(i, min(i + self.batch_size, len(encoded)))) for i in range(0, len(encoded), self.batch_size)]
        parts, order = [], []
        for indices in batches:
            batch = self.collator([encoded[i] for i in indices])
            batch.pop("labels")
            parts.append(self.run_batch(**batch, policy=policy))
            order += indices
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return BatchExits(*(torch.cat([getattr(p, f) for p in parts])[inverse]
                            for f in ("logits", "predictions", "exit_layers", "indicators")))

    def predict(self, texts: list[str], text_pairs: list[str] | None = None,
                policy: ExitPolicy | None = None) -> list[Prediction]:
        """Label, probabilities, exit layer and indicator for raw texts (or text pairs)."""
        pairs = text_pairs if text_pairs is not None else [None] * len(texts)
        if len(pairs) != len(texts):
            raise PolicyError(f"got {len(texts)} texts but {len(pairs)} text pairs")
        results = self.run_examples([Example(a, b, -1) for a, b in zip(texts, pairs)], policy)
        labels = self.model.config.labels
        predictions = []
        for row in range(len(texts)):
            indicator = float(results.indicators[row])
            layer = int(results.exit_layers[row])
            if not labels:
                predictions.append(Prediction(float(results.predictions[row]), None, layer, indicator))
                continue
            probs = results.logits[row].softmax(-1).tolist()
            predictions.append(Prediction(labels[int(results.predictions[row])], dict(zip(labels, probs)), layer, indicator))
        return predictions
