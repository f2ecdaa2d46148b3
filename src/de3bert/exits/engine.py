"""Early-exit inference that really stops computing.

The engine tokenizes inputs, sorts them by length into pools of `pool_size` and runs each pool in
compute chunks of `batch_size` rows. A model that decides exits by itself (the exported graph) gets
the chunks and the policy. Any other is stepped through by the engine's layer loop (`step_layers`):
after every layer the policy decides which rows exit; those rows are recorded and dropped from the
pool (hidden states, attention mask, policy state), and only the remaining rows go through the next
layer, re-packed into dense chunks, each cut to the padding its longest row needs, so late layers
still run on full batches instead of on the few survivors of one batch. A batch of one therefore
stops at its exit layer. Only the parts of a head the policy reads are computed (patience and
entropy policies skip the prototypical network; full depth skips internal heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from de3bert.data import Collator, Example, encode_examples
from de3bert.devices import resolve_device
from de3bert.errors import PolicyError
from de3bert.exits.policies import ExitPolicy
from de3bert.exits.runners import BatchExits, ExitRunner, LayerRunner, check_criterion, is_self_exiting
from de3bert.model.heads import HeadOutput


@dataclass
class Prediction:
    """One input's answer: label name (or score), class probabilities by label name, exit layer and indicator at
    exit (None where the criterion has no value: a prototype criterion at a last layer without prototypes)."""

    label: str | float
    probabilities: dict[str, float] | None
    exit_layer: int
    indicator: float | None


def _trim_padding(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing columns that are padding for every row."""
    if mask[:, -1].any():  # the common case (a single input, the longest row of a chunk): nothing to drop
        return hidden, mask
    used = mask.any(0).nonzero()
    length = int(used.max()) + 1 if used.numel() else mask.shape[1]
    if length == mask.shape[1]:
        return hidden, mask
    return hidden[:, :length], mask[:, :length]


def _concat(outputs: list[HeadOutput]) -> HeadOutput:
    """One HeadOutput of the chunks' outputs, rows in chunk order."""
    if len(outputs) == 1:
        return outputs[0]
    first = outputs[0]
    return HeadOutput(torch.cat([o.logits for o in outputs]),
                      None if first.distances is None else torch.cat([o.distances for o in outputs]),
                      None if first.indicators is None else {name: torch.cat([o.indicators[name] for o in outputs])
                                                             for name in first.indicators})


class EarlyExitEngine:
    """Runs a model layer by layer and stops each input at the layer its policy picks.

    model: any ExitRunner — an EarlyExitModel (PyTorch) or an OnnxEarlyExitModel (an exported graph on ONNX
    Runtime), as `load_model` gives them.
    device: where to run it ("auto", "cpu", "cuda", "cuda:N"; None: where it is). Results come back on the CPU.
    batch_size: rows per compute chunk. pool_size: inputs run together layer by layer by
    `run_examples` (rows that exit are replaced by rows of the same pool, keeping chunks full).
    """

    def __init__(self, model: ExitRunner, policy: ExitPolicy | None = None,
                 batch_size: int = 32, pool_size: int = 256, device: str | torch.device | None = None):
        if policy is None:
            if not model.config.policy:
                raise PolicyError("the checkpoint has no calibrated exit policy; pass one (criterion and threshold)")
            policy = ExitPolicy(**model.config.policy)
        self._check(policy, model)
        if device is not None:
            model.to(resolve_device(device))
        self.model = model.eval()
        # chosen once: a model that decides exits by itself, or the engine's loop through its layers
        self._exit_batch = model.exit_batch if is_self_exiting(model) else partial(step_layers, model)
        self.policy = policy
        self.batch_size = batch_size
        self.pool_size = max(pool_size, batch_size)
        self.collator = Collator(model.tokenizer) if model.tokenizer is not None else None

    @staticmethod
    def _check(policy: ExitPolicy, model: ExitRunner) -> None:
        if policy.needs_prototypes and not model.has_prototypes:
            raise PolicyError(f"criterion '{policy.criterion}' needs prototypes, but this model's heads have none "
                              "(trained with a recipe without prototypes)")
        check_criterion(model, policy.criterion)

    @torch.no_grad()
    def run_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  token_type_ids: torch.Tensor | None = None, policy: ExitPolicy | None = None,
                  chunk_size: int | None = None) -> BatchExits:
        """Early-exit forward of a padded batch (computed in chunks of chunk_size rows, default all);
        rows leave the computation as they exit."""
        policy = policy or self.policy
        self._check(policy, self.model)
        return self._exit_batch(input_ids, attention_mask, token_type_ids, policy, chunk_size or input_ids.shape[0])

    def run_examples(self, examples: list[Example], policy: ExitPolicy | None = None) -> BatchExits:
        """Early-exit results for examples, in input order: pools of similar length, dense chunks."""
        if self.collator is None:
            raise PolicyError("the model has no tokenizer; use run_batch with token ids")
        encoded = encode_examples(self.model.tokenizer, examples, self.model.config.max_length)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        parts = []
        for start in range(0, len(order), self.pool_size):
            batch = self.collator([encoded[i] for i in order[start:start + self.pool_size]])
            batch.pop("labels")
            parts.append(self.run_batch(**batch, policy=policy, chunk_size=self.batch_size))
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
        labels = self.model.config.label_names
        predictions = []
        for row in range(len(texts)):
            indicator = float(results.indicators[row])
            indicator = None if math.isnan(indicator) else indicator
            layer = int(results.exit_layers[row])
            if not labels:
                predictions.append(Prediction(float(results.predictions[row]), None, layer, indicator))
                continue
            probs = results.logits[row].softmax(-1).tolist()
            predictions.append(Prediction(labels[int(results.predictions[row])], dict(zip(labels, probs)), layer, indicator))
        return predictions


def step_layers(runner: LayerRunner, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None, policy: ExitPolicy, chunk_size: int) -> BatchExits:
    """The engine's layer loop: a padded batch through a model's layers, rows leaving as the policy exits them,
    the others re-packed into chunks of chunk_size rows after every layer where some left."""
    num_layers, batch = runner.num_layers, input_ids.shape[0]
    hidden = runner.embed(input_ids, token_type_ids)
    hidden, mask = _trim_padding(hidden, attention_mask.to(hidden.device))
    state = policy.initial_state(batch, hidden.device)
    active = torch.arange(batch, device=hidden.device)
    width = runner.config.num_labels
    logits = hidden.new_zeros(batch, width)
    exit_layers = torch.zeros(batch, dtype=torch.long, device=hidden.device)
    indicators = hidden.new_zeros(batch)
    chunks = None
    for index in range(num_layers):
        is_last = index == num_layers - 1
        reads = policy.head_reads if is_last or policy.reads_internal_heads else None
        if chunks is None:  # (re-)pack the active rows into dense chunks, each with its own padding and mask
            chunks = []
            for start in range(0, hidden.shape[0], chunk_size):
                chunk_hidden, chunk_mask = _trim_padding(hidden[start:start + chunk_size],
                                                         mask[start:start + chunk_size])
                chunks.append([start, chunk_hidden, chunk_mask, runner.context(chunk_hidden, chunk_mask)])
        outputs = []
        for chunk in chunks:
            start, chunk_hidden, chunk_mask, context = chunk
            chunk[1], output = runner.run_layer(index, chunk_hidden, chunk_mask, context, reads)
            outputs.append(output)
        if reads is None:
            continue
        output = _concat(outputs)
        step = policy.step(output, state, is_last=is_last)
        state = step.state
        if not step.exits.any():  # the common case at batch 1: nothing to record or re-pack
            continue
        leaving = active[step.exits]
        logits[leaving] = output.logits[step.exits].to(logits.dtype)
        indicators[leaving] = step.indicator[step.exits].to(indicators.dtype)
        exit_layers[leaving] = index + 1
        staying = ~step.exits
        if not staying.any():
            break
        if len(chunks) == 1:
            hidden, mask = chunks[0][1], chunks[0][2]
        else:
            for start, chunk_hidden, _, _ in chunks:
                hidden[start:start + chunk_size, :chunk_hidden.shape[1]] = chunk_hidden
        active, state = active[staying], state.select(staying)
        hidden, mask = _trim_padding(hidden[staying], mask[staying])
        chunks = None
    predictions = logits.squeeze(-1) if width == 1 else logits.argmax(-1)
    return BatchExits(logits.cpu(), predictions.cpu(), exit_layers.cpu(), indicators.cpu())

