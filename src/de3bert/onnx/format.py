"""The exported folder's format, which the exporter writes and the ONNX Runtime model reads.

    model.onnx      one self-contained graph that decides exits by itself (`graph.py`):
                    input_ids, attention_mask (B, T) int64 [, token_type_ids]        the tokens
                    threshold (float32), patience (int64), lam (float32),            optional: defaults are the
                    max_layer (int64)                                                exported policy's (M: no cap)
                      -> logits (B, C) float32, exit_layer (B,) int64 (1-based), indicator (B,) float32 (NaN: none)
    config.json     the checkpoint's config.json with an added "onnx" section (OnnxExportInfo: the criterion fixed
                    in the graph, quantization, validation against PyTorch, versions)
    tokenizer files as in the checkpoint

Format version 1 was a graph per layer and per head, stepped by the engine in Python; its folders are refused
with a message to export again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from de3bert.atomic import write_file
from de3bert.digests import files_digest
from de3bert.errors import CheckpointError
from de3bert.model.config import CONFIG_NAME, EarlyExitConfig

EXPORT_SECTION = "onnx"
EXPORT_FORMAT_VERSION = 2
QUANTIZATIONS = ("int8",)
GRAPH_NAME = "model.onnx"
OUTPUTS = ("logits", "exit_layer", "indicator")
"""The graph's outputs, in order."""
POLICY_INPUTS = {"threshold": "float32", "patience": "int64", "lam": "float32", "max_layer": "int64"}
"""The graph's optional inputs and their element types; a graph offers those its criterion reads, and max_layer."""


@dataclass
class OnnxExportInfo:
    """The "onnx" section of an exported folder's config.json."""

    criterion: str = ""
    """The exit criterion fixed in the graph (its threshold, patience and λ are inputs; full depth is served by
    inputs under which no row exits early)."""
    policy: dict = field(default_factory=dict)
    """The policy whose threshold, patience and λ are the inputs' defaults (ExitPolicy as a dict)."""
    inputs: list[str] = field(default_factory=list)
    """The graph's inputs, the optional ones included."""
    quantization: str | None = None
    """None: float32; "int8": every piece dynamically quantized (ONNX Runtime's quantize_dynamic, subgraphs too)."""
    opset: int = 17
    """ONNX opset of the traced pieces."""
    source: dict = field(default_factory=dict)
    """The checkpoint exported: its folder (absolute) and the SHA-256 of its weights."""
    validation: dict = field(default_factory=dict)
    """Measured at export: every piece's largest relative |ONNX Runtime − PyTorch|, and the graph's agreement with
    the PyTorch engine (labels, exit layers, logits) on token batches of other shapes than the traced ones."""
    exit_metrics: list[dict] = field(default_factory=list)
    """Per exit: dev metric of the checkpoint in PyTorch and of the exported graph (when measured after export)."""
    versions: dict[str, str] = field(default_factory=dict)
    """torch, onnx and onnxruntime versions that wrote the graphs."""
    format_version: int = EXPORT_FORMAT_VERSION

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def write_export_config(config: EarlyExitConfig, info: OnnxExportInfo, folder: Path) -> None:
    """Write an exported folder's config.json: the checkpoint's config with the "onnx" section (atomically)."""
    text = json.dumps(config.to_dict() | {EXPORT_SECTION: info.to_dict()}, indent=2, default=str)
    write_file(Path(folder) / CONFIG_NAME, lambda handle: handle.write(text.encode()))


def is_export(directory: Path) -> bool:
    """Whether a folder's config.json has the "onnx" section of an export (the folder must hold a config.json)."""
    return EXPORT_SECTION in json.loads((Path(directory) / CONFIG_NAME).read_text())


def read_export_info(directory: Path) -> OnnxExportInfo:
    """The "onnx" section of an exported folder's config.json, with errors that say what is wrong."""
    data = json.loads((directory / CONFIG_NAME).read_text())
    if EXPORT_SECTION not in data:
        raise CheckpointError(f"{directory} is a PyTorch checkpoint, not an ONNX export: run it with --runtime torch, "
                              f"or export it with `de3bert export {directory} --output DIR`")
    section = data[EXPORT_SECTION]
    if section.get("format_version") != EXPORT_FORMAT_VERSION:
        raise CheckpointError(f"exported folder {directory} has ONNX format version {section.get('format_version')} "
                              f"(a graph per layer, before the single self-exiting graph); this de3bert reads version "
                              f"{EXPORT_FORMAT_VERSION}: export the checkpoint again with `de3bert export CHECKPOINT "
                              "--output DIR`")
    try:
        return OnnxExportInfo(**section)
    except TypeError as exc:
        raise CheckpointError(f"{directory / CONFIG_NAME} has an unexpected onnx section: {exc}") from exc


def export_digest(directory: Path) -> str:
    """SHA-256 of an exported folder's graphs, in name order."""
    graphs = sorted(Path(directory).glob("*.onnx"))
    if not graphs:
        raise CheckpointError(f"{directory} holds no ONNX graph")
    return files_digest(graphs)


def write_policy_defaults(directory: Path, policy: dict) -> None:
    """Rewrite the defaults of an exported graph's policy inputs (threshold, patience, lam, max_layer: those of them
    it has and `policy` gives, for a policy of its criterion), atomically: what runtimes that cannot feed those
    inputs run (onnxruntime-node, Triton with batching; docs/serving.md)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    path = Path(directory) / GRAPH_NAME
    model = onnx.load(str(path))
    inputs = {value.name for value in model.graph.input}
    for initializer in model.graph.initializer:
        if initializer.name in inputs and initializer.name in policy and initializer.name in POLICY_INPUTS:
            value = np.array(policy[initializer.name], POLICY_INPUTS[initializer.name])
            initializer.CopyFrom(numpy_helper.from_array(value, initializer.name))
    write_file(path, lambda handle: handle.write(model.SerializeToString()))
