import json

import pytest
import torch

from de3bert.errors import ExportError, PolicyError
from de3bert.exits.engine import EarlyExitEngine
from de3bert.exits.policies import ExitPolicy
from de3bert.model.modeling import EarlyExitModel
from de3bert.onnx.runtime import OnnxEarlyExitModel

pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from de3bert.onnx import export as onnx_export  # noqa: E402
from de3bert.onnx import tracing  # noqa: E402
from de3bert.onnx.export import TOLERANCE, export_checkpoint  # noqa: E402
from de3bert.onnx.format import read_export_info  # noqa: E402


def test_export_writes_one_self_describing_graph(tiny_export, tiny_checkpoint):
    assert sorted(p.name for p in tiny_export.glob("*.onnx")) == ["model.onnx"]
    assert not (tiny_export / "model.safetensors").exists() and (tiny_export / "tokenizer.json").exists()
    config = json.loads((tiny_export / "config.json").read_text())
    assert config["de3bert"] == json.loads((tiny_checkpoint / "config.json").read_text())["de3bert"]
    section = config["onnx"]
    policy = config["de3bert"]["policy"]
    assert section["criterion"] == policy["criterion"] and section["policy"] == policy
    assert section["quantization"] is None and section["source"]["checkpoint"] == str(tiny_checkpoint.resolve())
    assert set(section["versions"]) == {"torch", "onnx", "onnxruntime"}
    validation = section["validation"]
    assert max(validation["pieces"].values()) <= TOLERANCE and validation["max_logit_difference"] <= TOLERANCE
    assert validation["same_label"] == validation["same_exit_layer"] == 1.0 and validation["rows"] == 40
    graph = onnx.load(str(tiny_export / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["logits", "exit_layer", "indicator"]
    inputs = [i.name for i in graph.input]
    assert inputs[:3] == ["input_ids", "attention_mask", "token_type_ids"] and "max_layer" in inputs
    defaults = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer if init.name in inputs}
    assert float(defaults["threshold"]) == pytest.approx(policy["threshold"])  # the policy is the inputs' defaults
    assert int(defaults["max_layer"]) == 4
    assert any(node.op_type == "If" for node in graph.node)  # exits decided inside the graph


def test_int8_export_measures_the_accuracy_of_every_exit(tiny_checkpoint, glue_dir, tmp_path):
    """Measuring is the command's job (evaluation.compare after the export); it lands in the export's config."""
    from de3bert.apps.cli import main

    assert main(["export", str(tiny_checkpoint), "--output", str(tmp_path / "int8"), "--quantize", "int8",
                 "--data-dir", str(glue_dir)]) == 0
    info = read_export_info(tmp_path / "int8")
    assert info.quantization == "int8" and 0.5 <= info.validation["same_exit_layer"] <= 1.0
    assert [row["exit"] for row in info.exit_metrics][:4] == [1, 2, 3, 4] and len(info.exit_metrics) == 5
    assert all(0.0 <= row["pytorch"] <= 1.0 and 0.0 <= row["onnx"] <= 1.0 for row in info.exit_metrics)
    assert "speedup_onnx" in info.exit_metrics[-1]  # the calibrated policy's row
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx"))
    quantized = [node.op_type for node in iterate_nodes(graph.graph) if "Integer" in node.op_type
                 or "Quant" in node.op_type]
    assert len(quantized) >= 4 * 4  # the layers inside the control flow, not only the first level
    exported = OnnxEarlyExitModel.from_pretrained(tmp_path / "int8")
    assert exported.export.exit_metrics == info.exit_metrics
    predictions = EarlyExitEngine(exported).predict(["the film was good great", "the film was awful"])
    assert all(p.label in ("negative", "positive") and 1 <= p.exit_layer <= 4 for p in predictions)


def iterate_nodes(graph):
    """Every node of a graph and of the subgraphs of its control flow."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == attribute.GRAPH:
                yield from iterate_nodes(attribute.g)


def test_another_criterion_takes_its_calibrated_threshold(tiny_checkpoint, tmp_path):
    model = EarlyExitModel.from_pretrained(tiny_checkpoint)
    info = export_checkpoint(tiny_checkpoint, tmp_path / "pcee", criterion="pcee")
    target = model.config.policy_selection["target_speedup"]
    row = next(r for r in model.config.calibration if r["criterion"] == "pcee" and r["target_speedup"] == target)
    assert info.criterion == "pcee" and info.policy["threshold"] == pytest.approx(row["threshold"])
    exported = OnnxEarlyExitModel.from_pretrained(tmp_path / "pcee")
    assert exported.config.policy == info.policy and exported.criteria == ("pcee", "full-depth")
    full = export_checkpoint(tiny_checkpoint, tmp_path / "full", criterion="full-depth")
    assert full.criterion == "full-depth" and "threshold" not in full.inputs  # no internal head, nothing to read
    exits = EarlyExitEngine(OnnxEarlyExitModel.from_pretrained(tmp_path / "full")).predict(["the film was good"])
    assert exits[0].exit_layer == 4


def test_a_criterion_the_model_cannot_run_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(PolicyError, match="criterion 'regression-patience' does not apply to this model"):
        export_checkpoint(tiny_checkpoint, tmp_path / "out", criterion="regression-patience")
    with pytest.raises(PolicyError, match="unknown exit criterion 'magic'"):
        export_checkpoint(tiny_checkpoint, tmp_path / "out", criterion="magic")
    assert list(tmp_path.iterdir()) == []


def test_a_graph_that_disagrees_with_pytorch_is_not_exported(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(tracing, "TOLERANCE", -1.0)
    with pytest.raises(ExportError, match=r"piece inputs differs from PyTorch by .* not exported"):
        export_checkpoint(tiny_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_exits_that_disagree_with_the_engine_are_not_exported(tiny_checkpoint, tmp_path, monkeypatch):
    """A graph whose pieces are each right but which exits elsewhere than the engine (here: the engine is told
    every row leaves at layer 1) fails the export."""
    real = EarlyExitEngine.run_batch

    def at_layer_one(self, *args, **kwargs):
        exits = real(self, *args, **kwargs)
        exits.exit_layers = torch.ones_like(exits.exit_layers)
        return exits

    monkeypatch.setattr(EarlyExitEngine, "run_batch", at_layer_one)
    monkeypatch.setattr(onnx_export, "near_decision", lambda model, policy, batch: torch.zeros(
        batch["input_ids"].shape[0], dtype=torch.bool))
    policy = ExitPolicy(**EarlyExitModel.from_pretrained(tiny_checkpoint).config.policy)
    if policy.threshold < 1.0:  # unless every row really leaves at layer 1
        with pytest.raises(ExportError, match="the exported graph disagrees with PyTorch on a random input"):
            export_checkpoint(tiny_checkpoint, tmp_path / "out")


def test_a_piece_that_cannot_be_traced_is_named(tiny_checkpoint, tmp_path, monkeypatch):
    def fail(spec, path):
        raise RuntimeError("unsupported operator aten::frobnicate\nmore detail")

    monkeypatch.setattr(tracing, "trace_graph", fail)
    with pytest.raises(ExportError, match=r"^piece inputs could not be exported: unsupported operator "
                                          r"aten::frobnicate$"):
        export_checkpoint(tiny_checkpoint, tmp_path / "out")


def test_unknown_quantization_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="unknown quantization 'int4'; choose one of int8"):
        export_checkpoint(tiny_checkpoint, tmp_path / "out", "int4")


def test_the_export_leaves_the_checkpoint_loadable(tiny_export, tiny_checkpoint):
    assert EarlyExitModel.from_pretrained(tiny_checkpoint).num_layers == 4
