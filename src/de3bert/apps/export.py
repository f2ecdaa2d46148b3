"""Export a checkpoint and, where asked, measure what the export costs in accuracy: every exit's dev metric and the
calibrated policy's on both runtimes, recorded in the export's config (what `de3bert export --measure` does)."""

from __future__ import annotations

from pathlib import Path

from de3bert.apps.runtimes import load_model
from de3bert.evaluation.compare import compare_exits
from de3bert.onnx.export import export_checkpoint
from de3bert.onnx.format import OnnxExportInfo, write_export_config


def export_and_measure(checkpoint: str | Path, output: str | Path, quantize: str | None = None,
                       criterion: str | None = None, measure: bool = False,
                       data_dir: str | None = None) -> OnnxExportInfo:
    """`export_checkpoint`, then with `measure` the dev metric of every exit in PyTorch and on the export (dev: the
    split that chose the checkpoint's best epoch; data_dir: where GLUE data is now), written into the export."""
    info = export_checkpoint(checkpoint, output, quantize, criterion)
    if measure:
        exported = load_model(output, "onnx")
        info.exit_metrics = compare_exits(load_model(checkpoint, "torch"), exported, data_dir)
        write_export_config(exported.config, info, Path(output))
    return info
