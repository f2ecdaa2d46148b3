"""An exported folder (`de3bert export`) loaded for inference on ONNX Runtime.

The folder holds one ONNX graph per piece the engine stops between (file names below), the
checkpoint's config.json with an added "onnx" section, and the tokenizer. `OnnxEarlyExitModel`
has the surface the engine, the service, `de3bert predict` and the benchmark use (config,
tokenizer, num_layers, has_prototypes, runner), so `EarlyExitEngine(OnnxEarlyExitModel.from_pretrained(dir))`
runs the same exit loop as on PyTorch; `OrtRunner` is the part that differs. Head graphs compute
the policy's indicators next to the head (`policies.head_indicators`, traced), so the policy reads
them instead of running a dozen small PyTorch operations per layer.

    embeddings.onnx   input_ids (B, T) [, token_type_ids]  -> hidden (B, T, H)
    context.onnx      attention_mask (B, T)                -> attention_bias (B, 1, 1, T) [, position_bias]
    layer_NN.onnx     hidden, attention_bias [, position_bias] -> layer_output  (one per layer, NN from 01)
    head_NN.onnx      hidden, attention_mask               -> logits, prediction, entropy, confidence
    prototype_head_NN.onnx  hidden, attention_mask, lam    -> logits, distances, prediction, entropy, confidence,
                      dr, edr   (the head with its prototypical network, where the layer has one)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from de3bert.errors import CheckpointError, DeviceError, ExportError
from de3bert.heads import HeadOutput
from de3bert.modeling import CONFIG_NAME, EarlyExitConfig, EarlyExitOutput, load_tokenizer, read_config
from de3bert.policies import CRITERION_INDICATORS, ExitPolicy

EXPORT_SECTION = "onnx"
EXPORT_FORMAT_VERSION = 1
QUANTIZATIONS = ("int8",)


def onnxruntime() -> ModuleType:
    """The onnxruntime module, or an ExportError saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("ONNX Runtime is not installed; install the extra: pip install 'de3bert[onnx]'") from exc
    return ort


def graph_name(piece: str, index: int | None = None) -> str:
    """File name of a graph in an exported folder: embeddings, context, or layer/head number index (0-based)."""
    return f"{piece}.onnx" if index is None else f"{piece}_{index + 1:02d}.onnx"


def inference_session(path: Path, threads: int | None = None, optimized_path: Path | None = None):
    """An ONNX Runtime CPU session with the settings every de3bert graph runs under: all graph optimizations,
    `threads` intra-op threads (None: ONNX Runtime's default), one inter-op thread, no spinning (spinning
    threads slow whatever else runs on the machine, measured in the interleaved benchmark).

    optimized_path: also write the graph optimized offline there (portable optimizations only)."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path is not None:  # higher levels save hardware-specific layouts
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized_path)
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise CheckpointError(f"{path} is not a usable ONNX graph: {str(exc).splitlines()[0]}") from exc


@dataclass
class OnnxExportInfo:
    """The "onnx" section of an exported folder's config.json."""

    quantization: str | None = None
    """None: float32 graphs; "int8": every graph dynamically quantized (ONNX Runtime's quantize_dynamic)."""
    opset: int = 17
    """ONNX opset of the graphs."""
    source: dict = field(default_factory=dict)
    """The checkpoint exported: its folder (absolute) and the SHA-256 of its weights."""
    validation: dict[str, float] = field(default_factory=dict)
    """Every graph of the folder: its largest |ONNX Runtime − PyTorch| over its outputs, measured at export."""
    exit_metrics: list[dict] = field(default_factory=list)
    """Per exit: dev metric of the checkpoint in PyTorch and of the exported graphs (measured when quantizing)."""
    versions: dict[str, str] = field(default_factory=dict)
    """torch, onnx and onnxruntime versions that wrote the graphs."""
    format_version: int = EXPORT_FORMAT_VERSION

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class OrtContext:
    """What every layer graph of a compute chunk reads besides its hidden states."""

    attention_mask: np.ndarray  # (B, T) int64, 1 on tokens
    attention_bias: np.ndarray  # (B, 1, 1, T) float32, 0 on tokens and a large negative value on padding
    position_bias: np.ndarray | None  # (B, heads, T, T) float32 (MPNet), or None


def _array(tensor: torch.Tensor, dtype: type) -> np.ndarray:
    """A contiguous CPU numpy view of a tensor (a copy only where dtype or layout require one)."""
    return np.ascontiguousarray(tensor.cpu().numpy(), dtype=dtype)


class Graph:
    """An ONNX Runtime session with the names of its inputs and outputs."""

    def __init__(self, session):
        self.session = session
        self.inputs = {i.name for i in session.get_inputs()}
        self.outputs = [o.name for o in session.get_outputs()]

    def run(self, outputs: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The named outputs (None: all) for a feed, of which the graph takes the inputs it has."""
        return self.session.run(outputs, {name: value for name, value in feed.items() if name in self.inputs})


class OrtRunner:
    """Runs an exported folder's graphs on ONNX Runtime for the engine (tensors on the CPU).

    Head graphs compute the indicators next to the head; a policy that reads prototypes runs the head graph with
    the prototypical network (where the layer has one), any other the head graph without it, and only the outputs
    the policy reads are fetched: the HeadOutput holds what the PyTorch runner's would.
    """

    def __init__(self, embeddings: Graph, context: Graph, layers: list[Graph], heads: list[Graph],
                 prototype_heads: list[Graph | None]):
        self.embeddings, self.context_graph, self.layers = embeddings, context, layers
        self.heads, self.prototype_heads = heads, prototype_heads

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
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
                  policy: ExitPolicy | None) -> tuple[torch.Tensor, HeadOutput | None]:
        """Layer graph ``index`` and, for a policy, the head graph it reads."""
        feed = {"hidden": _array(hidden, np.float32), "attention_bias": context.attention_bias,
                "position_bias": context.position_bias}
        hidden = self.layers[index].run(None, feed)[0]
        if policy is None:
            return torch.from_numpy(hidden), None
        prototype_head = self.prototype_heads[index] if policy.needs_prototypes else None
        head = prototype_head or self.heads[index]  # the last layer has no prototypical network
        wanted = ("logits", "distances", "prediction", CRITERION_INDICATORS.get(policy.criterion))
        names = [name for name in wanted if name in head.outputs]
        feed = {"hidden": hidden, "attention_mask": context.attention_mask, "lam": np.array(policy.lam, np.float32)}
        values = dict(zip(names, map(torch.from_numpy, head.run(names, feed))))
        logits, distances = values.pop("logits"), values.pop("distances", None)
        return torch.from_numpy(hidden), HeadOutput(logits, distances, values)


class OnnxEarlyExitModel:
    """An exported folder loaded on ONNX Runtime: the config, tokenizer and runner the engine needs."""

    def __init__(self, config: EarlyExitConfig, export: OnnxExportInfo, runner: OrtRunner,
                 tokenizer: PreTrainedTokenizerBase | None, directory: Path):
        self.config = config
        self.export = export
        self.runner = runner
        self.tokenizer = tokenizer
        self.directory = directory

    @property
    def num_layers(self) -> int:
        """Number of layers M (= number of exits)."""
        return len(self.runner.layers)

    @property
    def has_prototypes(self) -> bool:
        """Whether the internal exit heads carry prototypical networks (the prototype criteria read them)."""
        return self.runner.prototype_heads[0] is not None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> EarlyExitOutput:
        """Every exit head's output for a batch (the offline-evaluation path: no early stop)."""
        every_head = ExitPolicy("edr" if self.has_prototypes else "entropy")
        hidden = self.runner.embed(input_ids, token_type_ids)
        context = self.runner.context(hidden, attention_mask)
        layers = []
        for index in range(self.num_layers):
            hidden, output = self.runner.run_layer(index, hidden, attention_mask, context, every_head)
            layers.append(output)
        return EarlyExitOutput(layers)

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
        layers = range(config.backbone["num_hidden_layers"])
        runner = OrtRunner(graphs[graph_name("embeddings")], graphs[graph_name("context")],
                           [graphs[graph_name("layer", i)] for i in layers], [graphs[graph_name("head", i)] for i in layers],
                           [graphs.get(graph_name("prototype_head", i)) for i in layers])
        return cls(config, export, runner, load_tokenizer(directory), directory)


def read_export_info(directory: Path) -> OnnxExportInfo:
    """The "onnx" section of an exported folder's config.json, with errors that say what is wrong."""
    data = json.loads((directory / CONFIG_NAME).read_text())
    if EXPORT_SECTION not in data:
        raise CheckpointError(f"{directory} is a PyTorch checkpoint, not an ONNX export: run it with --runtime torch, "
                              f"or export it with `de3bert export {directory} --output DIR`")
    section = data[EXPORT_SECTION]
    if section.get("format_version") != EXPORT_FORMAT_VERSION:
        raise CheckpointError(f"exported folder {directory} has ONNX format version {section.get('format_version')}; "
                              f"this de3bert reads version {EXPORT_FORMAT_VERSION}: export the checkpoint again")
    try:
        return OnnxExportInfo(**section)
    except TypeError as exc:
        raise CheckpointError(f"{directory / CONFIG_NAME} has an unexpected onnx section: {exc}") from exc
