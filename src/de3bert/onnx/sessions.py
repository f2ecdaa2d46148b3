"""ONNX Runtime sessions with the settings every de3bert graph runs under, for the exporter and the runtime alike."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np

from de3bert.errors import CheckpointError, ExportError


def onnxruntime() -> ModuleType:
    """The onnxruntime module, or an ExportError saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("ONNX Runtime is not installed; install the extra: pip install 'de3bert[onnx]'") from exc
    return ort


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
    # errors only: an exported graph's optional inputs are initializers listed as inputs, on purpose (their
    # defaults), which ONNX Runtime would note at every session
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise CheckpointError(f"{path} is not a usable ONNX graph: {str(exc).splitlines()[0]}") from exc


class Graph:
    """An ONNX Runtime session with the names of its inputs and outputs."""

    def __init__(self, session):
        self.session = session
        self.inputs = {i.name for i in session.get_inputs()}
        self.outputs = [o.name for o in session.get_outputs()]

    def run(self, outputs: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The named outputs (None: all) for a feed, of which the graph takes the inputs it has."""
        return self.session.run(outputs, {name: value for name, value in feed.items() if name in self.inputs})
