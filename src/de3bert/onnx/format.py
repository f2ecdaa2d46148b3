"""The exported folder's format, which the exporter writes and the ONNX Runtime model reads.

    config.json       the checkpoint's config.json with an added "onnx" section (OnnxExportInfo)
    tokenizer files   as in the checkpoint
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

from de3bert.atomic import write_file
from de3bert.digests import files_digest
from de3bert.errors import CheckpointError
from de3bert.model.config import CONFIG_NAME, EarlyExitConfig

EXPORT_SECTION = "onnx"
EXPORT_FORMAT_VERSION = 1
QUANTIZATIONS = ("int8",)


def graph_name(piece: str, index: int | None = None) -> str:
    """File name of a graph in an exported folder: embeddings, context, or layer/head number index (0-based)."""
    return f"{piece}.onnx" if index is None else f"{piece}_{index + 1:02d}.onnx"


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
    """Per exit: dev metric of the checkpoint in PyTorch and of the exported graphs (when measured after export)."""
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
        raise CheckpointError(f"exported folder {directory} has ONNX format version {section.get('format_version')}; "
                              f"this de3bert reads version {EXPORT_FORMAT_VERSION}: export the checkpoint again")
    try:
        return OnnxExportInfo(**section)
    except TypeError as exc:
        raise CheckpointError(f"{directory / CONFIG_NAME} has an unexpected onnx section: {exc}") from exc


def export_digest(directory: Path) -> str:
    """SHA-256 of an exported folder's graphs, in name order."""
    graphs = sorted(Path(directory).glob("*.onnx"))
    if not graphs:
        raise CheckpointError(f"{directory} holds no ONNX graphs")
    return files_digest(graphs)
