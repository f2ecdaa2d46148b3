"""Runtimes: where a model runs, chosen once at the edge (CLI, service, benchmark) and carried from there.

A folder is a PyTorch checkpoint (`de3bert train`) or an ONNX export (`de3bert export`). `load_model`
loads it for a runtime — by default the one it was written for — and refuses a mismatch with one line;
what it returns (EarlyExitModel or OnnxEarlyExitModel) goes to the engine, which runs either.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from de3bert.errors import CheckpointError
from de3bert.modeling import CONFIG_NAME, WEIGHTS_NAME, EarlyExitModel, read_config
from de3bert.onnx_model import EXPORT_SECTION, OnnxEarlyExitModel

RUNTIMES = ("torch", "onnx")


def folder_runtime(directory: str | Path) -> str:
    """The runtime a folder was written for: "onnx" for an ONNX export, "torch" for a PyTorch checkpoint."""
    directory = Path(directory)
    read_config(directory)  # a folder that is neither fails here, saying why
    return "onnx" if EXPORT_SECTION in json.loads((directory / CONFIG_NAME).read_text()) else "torch"


def load_model(directory: str | Path, runtime: str | None = None,
               threads: int | None = None) -> EarlyExitModel | OnnxEarlyExitModel:
    """A folder loaded for a runtime (None: the one it was written for); threads: ONNX Runtime's intra-op threads."""
    written_for = folder_runtime(directory)
    runtime = runtime or written_for
    if runtime not in RUNTIMES:
        raise CheckpointError(f"unknown runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}")
    if runtime == "onnx":
        return OnnxEarlyExitModel.from_pretrained(directory, threads)
    if written_for == "onnx":
        raise CheckpointError(f"{directory} is an ONNX export, not a PyTorch checkpoint: run it with --runtime onnx")
    return EarlyExitModel.from_pretrained(directory)


def weights_digest(directory: str | Path) -> str:
    """SHA-256 of a folder's weights: a checkpoint's model.safetensors, or an export's graphs in name order."""
    directory = Path(directory)
    files = [directory / WEIGHTS_NAME] if (directory / WEIGHTS_NAME).exists() else sorted(directory.glob("*.onnx"))
    if not files:
        raise CheckpointError(f"{directory} holds neither {WEIGHTS_NAME} nor ONNX graphs")
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
