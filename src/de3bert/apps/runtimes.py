"""Runtimes: where a model runs, chosen once at the edge (CLI, service, benchmark) and carried from there.

A folder is a PyTorch checkpoint (`de3bert train`) or an ONNX export (`de3bert export`). `load_model`
loads it for a runtime — by default the one it was written for — and refuses a mismatch with one line;
what it returns is an `ExitRunner` the engine, the evaluation and the service run alike.
"""

from __future__ import annotations

from pathlib import Path

import torch

from de3bert.devices import resolve_device, resolve_precision
from de3bert.errors import CheckpointError, DeviceError
from de3bert.exits.runners import ExitRunner
from de3bert.model.config import WEIGHTS_NAME, checkpoint_digest, read_config
from de3bert.model.modeling import EarlyExitModel
from de3bert.onnx.format import export_digest, is_export
from de3bert.onnx.runtime import OnnxEarlyExitModel

RUNTIMES = ("torch", "onnx")


def folder_runtime(directory: str | Path) -> str:
    """The runtime a folder was written for: "onnx" for an ONNX export, "torch" for a PyTorch checkpoint."""
    directory = Path(directory)
    read_config(directory)  # a folder that is neither fails here, saying why
    return "onnx" if is_export(directory) else "torch"


def load_model(directory: str | Path, runtime: str | None = None, threads: int | None = None,
               device: str | None = None, precision: str = "fp32") -> ExitRunner:
    """A folder loaded for a runtime (None: the one it was written for); threads: ONNX Runtime's intra-op threads;
    device and precision: where and in which precision a PyTorch checkpoint runs (an export: the CPU, as exported)."""
    written_for = folder_runtime(directory)
    runtime = runtime or written_for
    if runtime not in RUNTIMES:
        raise CheckpointError(f"unknown runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}")
    if runtime == "onnx":
        if resolve_precision(precision, torch.device("cpu")) != "fp32":
            raise DeviceError(f"an ONNX export runs in the precision it was exported in, not {precision}; "
                              "export with --quantize int8 for a smaller, faster model")
        # "auto" means the CPU for an export: its graphs run on ONNX Runtime's CPU provider
        return OnnxEarlyExitModel.from_pretrained(directory, threads).to(
            torch.device("cpu") if device in (None, "auto") else resolve_device(device))
    if written_for == "onnx":
        raise CheckpointError(f"{directory} is an ONNX export, not a PyTorch checkpoint: run it with --runtime onnx")
    return EarlyExitModel.from_pretrained(directory, device=device, precision=precision)


def weights_digest(directory: str | Path) -> str:
    """SHA-256 of a folder's weights: a checkpoint's model.safetensors, or an export's graphs in name order."""
    directory = Path(directory)
    if (directory / WEIGHTS_NAME).exists():
        return checkpoint_digest(directory)
    if any(directory.glob("*.onnx")):
        return export_digest(directory)
    raise CheckpointError(f"{directory} holds neither {WEIGHTS_NAME} nor ONNX graphs")
