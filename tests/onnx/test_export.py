import json

import pytest

from de3bert.errors import ExportError
from de3bert.exits.engine import EarlyExitEngine
from de3bert.model.modeling import EarlyExitModel
from de3bert.onnx.runtime import OnnxEarlyExitModel

pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from de3bert.onnx import export as onnx_export  # noqa: E402
from de3bert.onnx.export import TOLERANCE, export_checkpoint  # noqa: E402
from de3bert.onnx.format import read_export_info  # noqa: E402

GRAPHS = sorted(["context.onnx", "embeddings.onnx", *(f"{piece}_0{i}.onnx" for piece in ("head", "layer") for i in range(1, 5)),
                 *(f"prototype_head_0{i}.onnx" for i in range(1, 4))])  # the last layer has no prototypical network


def test_export_writes_a_self_describing_folder(tiny_export, tiny_checkpoint):
    assert sorted(p.name for p in tiny_export.glob("*.onnx")) == GRAPHS
    assert not (tiny_export / "model.safetensors").exists() and (tiny_export / "tokenizer.json").exists()
    config = json.loads((tiny_export / "config.json").read_text())
    assert config["de3bert"] == json.loads((tiny_checkpoint / "config.json").read_text())["de3bert"]
    section = config["onnx"]
    assert section["quantization"] is None and section["source"]["checkpoint"] == str(tiny_checkpoint.resolve())
    assert set(section["validation"]) == set(GRAPHS) and max(section["validation"].values()) <= TOLERANCE
    assert set(section["versions"]) == {"torch", "onnx", "onnxruntime"}
    def outputs(name):
        return [o.name for o in onnx.load(str(tiny_export / name)).graph.output]

    assert outputs("head_01.onnx") == outputs("head_04.onnx") == ["logits", "prediction", "entropy", "confidence"]
    assert outputs("prototype_head_01.onnx") == ["logits", "distances", "prediction", "entropy", "confidence", "dr",
                                                 "edr"]


def test_int8_export_measures_the_accuracy_of_every_exit(tiny_checkpoint, glue_dir, tmp_path):
    """Measuring is the command's job (evaluation.compare after the export); it lands in the export's config."""
    from de3bert.apps.cli import main

    assert main(["export", str(tiny_checkpoint), "--output", str(tmp_path / "int8"), "--quantize", "int8",
                 "--data-dir", str(glue_dir)]) == 0
    info = read_export_info(tmp_path / "int8")
    assert info.quantization == "int8"
    assert [row["exit"] for row in info.exit_metrics][:4] == [1, 2, 3, 4] and len(info.exit_metrics) == 5
    assert all(0.0 <= row["pytorch"] <= 1.0 and 0.0 <= row["onnx"] <= 1.0 for row in info.exit_metrics)
    assert "speedup_onnx" in info.exit_metrics[-1]  # the calibrated policy's row
    layer = onnx.load(str(tmp_path / "int8" / "layer_01.onnx"))
    assert any("Integer" in node.op_type or "Quant" in node.op_type for node in layer.graph.node)
    exported = OnnxEarlyExitModel.from_pretrained(tmp_path / "int8")
    assert exported.export.exit_metrics == info.exit_metrics
    predictions = EarlyExitEngine(exported).predict(["the film was good great", "the film was awful"])
    assert all(p.label in ("negative", "positive") and 1 <= p.exit_layer <= 4 for p in predictions)


def test_a_graph_that_disagrees_with_pytorch_is_not_exported(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "TOLERANCE", -1.0)
    with pytest.raises(ExportError, match=r"graph embeddings.onnx differs from PyTorch by .* not exported"):
        export_checkpoint(tiny_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_graph_that_cannot_be_traced_is_named(tiny_checkpoint, tmp_path, monkeypatch):
    def fail(spec, path):
        raise RuntimeError("unsupported operator aten::frobnicate\nmore detail")

    monkeypatch.setattr(onnx_export, "trace_graph", fail)
    with pytest.raises(ExportError, match=r"^graph embeddings.onnx could not be exported: unsupported operator "
                                          r"aten::frobnicate$"):
        export_checkpoint(tiny_checkpoint, tmp_path / "out")


def test_unknown_quantization_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="unknown quantization 'int4'; choose one of int8"):
        export_checkpoint(tiny_checkpoint, tmp_path / "out", "int4")


def test_the_export_leaves_the_checkpoint_loadable(tiny_export, tiny_checkpoint):
    assert EarlyExitModel.from_pretrained(tiny_checkpoint).num_layers == 4
