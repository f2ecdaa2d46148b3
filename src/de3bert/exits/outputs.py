"""Every exit head's output on a set of examples, computed once: what calibration, sweeps and reports read.

`collect_layer_outputs` runs a model on any runtime (an `ExitRunner`) without early stopping; policies
are then simulated on the stored outputs with `simulate_exits`, the decision code the engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from de3bert.data import Collator, EncodedExample, TaskSpec, compute_metrics
from de3bert.exits.runners import ExitRunner
from de3bert.model.heads import HeadOutput, HeadReads


@dataclass
class LayerOutputs:
    """Every exit head's output on a dataset: logits (M, N, C), labels (N,), distances (K, N, C) of the first K
    layers, those with a prototypical network (K = M − 1 when the last layer has none), or None; and indicators,
    name -> (M, N), where a graph computed them next to its heads (an export's criterion), or None."""

    logits: torch.Tensor
    distances: torch.Tensor | None
    labels: torch.Tensor
    indicators: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_layers(cls, layers: list[HeadOutput], labels: torch.Tensor) -> LayerOutputs:
        """Stack one batch's per-layer head outputs (float32, on the CPU)."""
        distances = [layer.distances.float().cpu() for layer in layers if layer.distances is not None]
        computed = layers[0].indicators
        indicators = {name: torch.stack([layer.indicators[name].cpu() for layer in layers])
                      for name in computed} if computed else None
        return cls(torch.stack([layer.logits.float().cpu() for layer in layers]),
                   torch.stack(distances) if distances else None, labels, indicators)

    @property
    def num_layers(self) -> int:
        """Number of exits M."""
        return self.logits.shape[0]

    def heads(self) -> list[HeadOutput]:
        """Per-layer HeadOutputs, the form policies read."""
        with_distances = 0 if self.distances is None else self.distances.shape[0]
        return [HeadOutput(self.logits[m], self.distances[m] if m < with_distances else None,
                           None if self.indicators is None else {name: v[m] for name, v in self.indicators.items()})
                for m in range(self.num_layers)]

    def select(self, rows: torch.Tensor, labelled: bool = True) -> LayerOutputs:
        """The outputs of some inputs (indices into N); labelled=False: their labels replaced by −1."""
        labels = self.labels[rows] if labelled else torch.full((len(rows),), -1)
        return LayerOutputs(self.logits[:, rows], None if self.distances is None else self.distances[:, rows], labels,
                            None if self.indicators is None else {k: v[:, rows] for k, v in self.indicators.items()})

    def predictions(self) -> torch.Tensor:
        """(M, N) prediction of every exit: class index, or score for regression."""
        return self.logits.squeeze(-1) if self.logits.shape[-1] == 1 else self.logits.argmax(-1)


@torch.no_grad()
def collect_layer_outputs(model: ExitRunner, examples: list[EncodedExample], batch_size: int = 64,
                          progress: bool = False, reads: HeadReads = HeadReads(True)) -> LayerOutputs:
    """Run every exit head over encoded examples (no early stopping) and gather the outputs (float32, CPU)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(examples, batch_size=batch_size, collate_fn=Collator(model.tokenizer))
    parts = []
    for batch in tqdm(loader, desc="evaluating", disable=not progress, leave=False):
        labels = batch.pop("labels")
        parts.append(LayerOutputs.from_layers(model.layer_outputs(**batch, reads=reads), labels))
    model.train(was_training)
    return LayerOutputs(torch.cat([p.logits for p in parts], 1),
                        None if parts[0].distances is None else torch.cat([p.distances for p in parts], 1),
                        torch.cat([p.labels for p in parts]),
                        None if parts[0].indicators is None else {name: torch.cat([p.indicators[name] for p in parts], 1)
                                                                  for name in parts[0].indicators})


def task_metrics(task: TaskSpec, predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The task's metrics of predictions against labels."""
    return compute_metrics(task, predictions.tolist(), labels.tolist())


def layer_metrics(outputs: LayerOutputs, task: TaskSpec) -> list[dict]:
    """Metric of every exit layer taken alone (rows: layer, metrics...)."""
    predictions = outputs.predictions()
    return [{"layer": m + 1, **task_metrics(task, predictions[m], outputs.labels)} for m in range(outputs.num_layers)]


