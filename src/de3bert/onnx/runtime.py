"""An exported folder (`de3bert export`, layout in `format.py`) loaded for inference on ONNX Runtime.

`OnnxEarlyExitModel` implements the engine's `ExitRunner`, as the PyTorch `EarlyExitModel` does, so
`EarlyExitEngine(OnnxEarlyExitModel.from_pretrained(dir))` runs the same exit loop. Head graphs compute
the indicators next to the head (`exits.indicators.head_indicators`, traced), so the policy reads them
instead of running a dozen small PyTorch operations per layer; only the outputs a policy reads are fetched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from de3bert.errors import CheckpointError, DeviceError
from de3bert.model.config import EarlyExitConfig, load_tokenizer, read_config
from de3bert.model.heads import HeadOutput, HeadReads
from de3bert.onnx.format import OnnxExportInfo, graph_name, read_export_info
from de3bert.onnx.sessions import Graph, inference_session


@dataclass
class OrtContext:
    """What every layer graph of a compute chunk reads besides its hidden states."""

    attention_mask: np.ndarray  # (B, T) int64, 1 on tokens
    attention_bias: np.ndarray  # (B, 1, 1, T) float32, 0 on tokens and a large negative value on padding
    position_bias: np.ndarray | None  # (B, heads, T, T) float32 (MPNet), or None


def _array(tensor: torch.Tensor, dtype: type) -> np.ndarray:
    """A contiguous CPU numpy view of a tensor (a copy only where dtype or layout require one)."""
    return np.ascontiguousarray(tensor.cpu().numpy(), dtype=dtype)


class OnnxEarlyExitModel:
    """An exported folder loaded on ONNX Runtime: the config, tokenizer and graphs the engine steps through
    (tensors on the CPU). A policy that reads prototypes runs the head graph with the prototypical network (where
    the layer has one), any other the head graph without it; only the outputs the policy reads are fetched, so the
    HeadOutput holds what the PyTorch model's would."""

    training = False  # an export has no training mode

    def __init__(self, config: EarlyExitConfig, export: OnnxExportInfo, graphs: dict[str, Graph],
                 tokenizer: PreTrainedTokenizerBase | None, directory: Path):
        self.config = config
        self.export = export
        self.tokenizer = tokenizer
        self.directory = directory
        layers = range(config.backbone["num_hidden_layers"])
        self.embeddings, self.context_graph = graphs[graph_name("embeddings")], graphs[graph_name("context")]
        self.layers = [graphs[graph_name("layer", i)] for i in layers]
        self.heads = [graphs[graph_name("head", i)] for i in layers]
        self.prototype_heads = [graphs.get(graph_name("prototype_head", i)) for i in layers]

    @property
    def num_layers(self) -> int:
        """Number of layers M (= number of exits)."""
        return len(self.layers)

    @property
    def has_prototypes(self) -> bool:
        """Whether the internal exit heads carry prototypical networks (the prototype criteria read them)."""
        return self.prototype_heads[0] is not None

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding output (B, T, H) for token ids."""
        ids = _array(input_ids, np.int64)
        types = np.zeros_like(ids) if token_type_ids is None else _array(token_type_ids, np.int64)
        return torch.from_numpy(self.embeddings.run(None, {"input_ids": ids, "token_type_ids": types})[0])

    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> OrtContext:
        """The chunk's attention bias (and MPNet's position bias), computed once for all its layers."""
        mask = _array(attention_mask, np.int64)
        outputs = self.context_graph.run(None, {"attention_mask": mask})
        return OrtContext(mask, outputs[0], outputs[1] if len(outputs) > 1 else None)

    def run_layer(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor, context: OrtContext,
                  reads: HeadReads | None) -> tuple[torch.Tensor, HeadOutput | None]:
        """Layer graph ``index`` and, unless reads is None, the head graph with what reads asks for."""
        feed = {"hidden": _array(hidden, np.float32), "attention_bias": context.attention_bias,
                "position_bias": context.position_bias}
        hidden = self.layers[index].run(None, feed)[0]
        if reads is None:
            return torch.from_numpy(hidden), None
        prototype_head = self.prototype_heads[index] if reads.prototypes else None
        head = prototype_head or self.heads[index]  # the last layer has no prototypical network
        wanted = ("logits", "distances", "prediction", reads.indicator)
        names = [name for name in wanted if name in head.outputs]
        feed = {"hidden": hidden, "attention_mask": context.attention_mask, "lam": np.array(reads.lam, np.float32)}
        values = dict(zip(names, map(torch.from_numpy, head.run(names, feed))))
        logits, distances = values.pop("logits"), values.pop("distances", None)
        return torch.from_numpy(hidden), HeadOutput(logits, distances, values)

    def layer_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None, reads: HeadReads = HeadReads(True)) -> list[HeadOutput]:
        """Every exit head's output for a batch (no early stop): logits, and distances where reads asks for them."""
        hidden = self.embed(input_ids, token_type_ids)
        context = self.context(hidden, attention_mask)
        layers = []
        for index in range(self.num_layers):
            hidden, output = self.run_layer(index, hidden, attention_mask, context, reads)
            layers.append(HeadOutput(output.logits, output.distances))
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
        """Itself, where `device` is the CPU: the exported graphs run on ONNX Runtime's CPU provider."""
        if torch.device(device).type != "cpu":
            raise DeviceError(f"an ONNX export runs on the CPU (ONNX Runtime's CPU provider), not on {device}; "
                              "use --device cpu, or the PyTorch checkpoint with --runtime torch")
        return self

    @classmethod
    def from_pretrained(cls, directory: str | Path, threads: int | None = None) -> OnnxEarlyExitModel:
        """Load an exported folder written by `de3bert export`; threads: intra-op threads of every graph."""
        directory = Path(directory)
        config = read_config(directory)
        export = read_export_info(directory)
        missing = [name for name in export.validation if not (directory / name).exists()]
        if missing:
            raise CheckpointError(f"exported folder {directory} lacks {', '.join(missing[:3])}"
                                  f"{' and more' if len(missing) > 3 else ''}; export the checkpoint again")
        graphs = {name: Graph(inference_session(directory / name, threads)) for name in export.validation}
        return cls(config, export, graphs, load_tokenizer(directory), directory)
