"""An exported folder (`de3bert export`, layout in `format.py`) loaded for inference on ONNX Runtime.

The graph decides exits by itself, so `OnnxEarlyExitModel` is a self-exiting runner (`exits.runners`): the engine
hands it padded chunks and a policy, and it feeds the policy's threshold, patience and λ to the graph's inputs.
The criterion is fixed in the graph; full depth is served by inputs under which no row exits early. Every
exit's output, which calibration, evaluation and explanations read, comes from the same graph: run with the
`max_layer` cap at m = 1..M and a patience no row reaches, each row leaves at layer m with that layer's logits
and the criterion's indicator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from de3bert.errors import CheckpointError, DeviceError
from de3bert.exits.criteria import CRITERIA, FULL_DEPTH
from de3bert.exits.runners import BatchExits, check_criterion
from de3bert.exits.indicators import class_probabilities
from de3bert.exits.policies import ExitPolicy
from de3bert.model.config import EarlyExitConfig, load_tokenizer, read_config
from de3bert.model.heads import HeadOutput, HeadReads
from de3bert.onnx.format import GRAPH_NAME, OUTPUTS, POLICY_INPUTS, OnnxExportInfo, read_export_info
from de3bert.onnx.sessions import inference_session

NUMPY_TYPES = {"float32": np.float32, "int64": np.int64}


class OnnxEarlyExitModel:
    """An exported folder loaded on ONNX Runtime: the config, tokenizer and the one graph that decides exits."""

    training = False  # an export has no training mode

    def __init__(self, config: EarlyExitConfig, export: OnnxExportInfo, session,
                 tokenizer: PreTrainedTokenizerBase | None, directory: Path):
        self.config = config
        self.export = export
        self.session = session
        self.tokenizer = tokenizer
        self.directory = directory
        self.token_inputs = {i.name for i in session.get_inputs()}
        # inputs with a default are initializers to ONNX Runtime, not inputs
        self.policy_inputs = {i.name for i in session.get_overridable_initializers()} & set(POLICY_INPUTS)

    @property
    def num_layers(self) -> int:
        """Number of layers M (= number of exits)."""
        return self.config.backbone["num_hidden_layers"]

    @property
    def criterion(self) -> str:
        """The exit criterion fixed in the graph."""
        return self.export.criterion

    @property
    def has_prototypes(self) -> bool:
        """Whether the graph computes prototype distances (its criterion reads them)."""
        return CRITERIA[self.criterion].reads_prototypes

    @property
    def criteria(self) -> tuple[str, ...]:
        """The criteria this export serves: the one fixed in its graph, and full depth."""
        return tuple(dict.fromkeys((self.criterion, FULL_DEPTH)))

    def graph_inputs(self, policy: ExitPolicy) -> dict[str, float]:
        """The policy inputs that make the graph run `policy` (a PolicyError for a criterion it was not exported
        with)."""
        check_criterion(self, policy.criterion)
        if policy.criterion != self.criterion:  # full depth: a patience no row reaches before the last layer
            return {"patience": self.num_layers} if "patience" in self.policy_inputs else {}
        values = {"threshold": policy.threshold, "patience": policy.patience, "lam": policy.lam}
        return {name: value for name, value in values.items() if name in self.policy_inputs}

    def run_graph(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                  inputs: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The graph's (logits, exit_layer, indicator) for a padded batch and values of its policy inputs."""
        return self._run(self._token_arrays(input_ids, attention_mask, token_type_ids), inputs)

    def _token_arrays(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None) -> dict[str, np.ndarray]:
        """The token inputs the graph takes, as int64 arrays (token types: zeros unless given)."""
        tokens = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        arrays = {name: np.ascontiguousarray(value.cpu().numpy(), dtype=np.int64) for name, value in tokens.items()
                  if value is not None and name in self.token_inputs}
        if "token_type_ids" in self.token_inputs and "token_type_ids" not in arrays:
            arrays["token_type_ids"] = np.zeros_like(arrays["input_ids"])
        return arrays

    def _run(self, tokens: dict[str, np.ndarray], inputs: dict[str, float]) -> tuple[torch.Tensor, ...]:
        """The graph's outputs for token arrays and values of its policy inputs."""
        feed = tokens | {name: np.array(value, NUMPY_TYPES[POLICY_INPUTS[name]]) for name, value in inputs.items()}
        return tuple(torch.from_numpy(output) for output in self.session.run(list(OUTPUTS), feed))

    def exit_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                   policy: ExitPolicy, chunk_size: int) -> BatchExits:
        """Early-exit forward of a padded batch under a policy, in chunks of chunk_size rows (each cut to the
        padding its longest row needs); the rows leave inside the graph."""
        inputs = self.graph_inputs(policy)
        tokens = self._token_arrays(input_ids, attention_mask, token_type_ids)
        lengths = tokens["attention_mask"].sum(-1)
        parts = []
        for start in range(0, input_ids.shape[0], chunk_size):
            rows, length = slice(start, start + chunk_size), int(lengths[start:start + chunk_size].max())
            parts.append(self._run({name: np.ascontiguousarray(array[rows, :length]) for name, array in tokens.items()},
                                   inputs))
        logits, exit_layers, indicators = parts[0] if len(parts) == 1 else (torch.cat(part) for part in zip(*parts))
        if policy.criterion != self.criterion:  # full depth reads the exit head itself (its entropy), not the graph's
            indicators = policy.indicator(HeadOutput(logits), None)[0]
        return BatchExits(logits, class_probabilities(logits)[1], exit_layers, indicators)

    def layer_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None, reads: HeadReads = HeadReads(True)) -> list[HeadOutput]:
        """Every exit head's output for a batch: the logits, and the graph's criterion's indicator (λ: reads.lam)
        with the prediction, as the graph's exit steps compute them (no prototype distances: the indicator stands for them)."""
        if "max_layer" not in self.policy_inputs:
            raise CheckpointError(f"the graph of {self.directory} has no max_layer input to read every exit with; "
                                  "export the checkpoint again")
        spec = CRITERIA[self.criterion]
        inputs = {"patience": self.num_layers} if "patience" in self.policy_inputs else {}
        inputs |= {"lam": reads.lam} if "lam" in self.policy_inputs else {}
        layers = []
        for layer in range(1, self.num_layers + 1):
            logits, _, indicator = self.run_graph(input_ids, attention_mask, token_type_ids,
                                                  inputs | {"max_layer": layer})
            computed = {"prediction": class_probabilities(logits)[1]}
            if spec.indicator is not None:  # NaN at a last layer without prototypes, as the policy gives it
                computed[spec.indicator] = indicator
            layers.append(HeadOutput(logits, None, computed))
        return layers

    def eval(self) -> OnnxEarlyExitModel:
        """Itself: an export has no training mode."""
        return self

    def train(self, mode: bool = True) -> OnnxEarlyExitModel:
        """Itself; an export cannot be put into training mode."""
        if mode:
            raise DeviceError("an ONNX export runs inference only; train the PyTorch checkpoint")
        return self

    def to(self, device: torch.device) -> OnnxEarlyExitModel:
        """Itself, where `device` is the CPU: the exported graph runs on ONNX Runtime's CPU provider."""
        if torch.device(device).type != "cpu":
            raise DeviceError(f"an ONNX export runs on the CPU (ONNX Runtime's CPU provider), not on {device}; "
                              "use --device cpu, or the PyTorch checkpoint with --runtime torch")
        return self

    @classmethod
    def from_pretrained(cls, directory: str | Path, threads: int | None = None) -> OnnxEarlyExitModel:
        """Load an exported folder written by `de3bert export`; threads: ONNX Runtime's intra-op threads."""
        directory = Path(directory)
        config = read_config(directory)
        export = read_export_info(directory)
        if not (directory / GRAPH_NAME).exists():
            raise CheckpointError(f"exported folder {directory} lacks {GRAPH_NAME}; export the checkpoint again")
        return cls(config, export, inference_session(directory / GRAPH_NAME, threads), load_tokenizer(directory),
                   directory)
