import hashlib

import pytest

from de3bert.apps.runtimes import folder_runtime, load_model, weights_digest
from de3bert.errors import CheckpointError
from de3bert.exits.criteria import CRITERIA
from de3bert.model.modeling import EarlyExitModel
from de3bert.onnx.runtime import OnnxEarlyExitModel


def test_a_folder_loads_for_the_runtime_it_was_written_for(tiny_checkpoint, tiny_export):
    assert folder_runtime(tiny_checkpoint) == "torch" and folder_runtime(tiny_export) == "onnx"
    assert isinstance(load_model(tiny_checkpoint), EarlyExitModel)
    exported = load_model(tiny_export, threads=1)
    assert isinstance(exported, OnnxEarlyExitModel) and isinstance(load_model(tiny_export, "onnx"), OnnxEarlyExitModel)
    assert exported.num_layers == 4 and exported.config.labels == ["0", "1"]
    assert exported.has_prototypes == CRITERIA[exported.criterion].reads_prototypes  # the heads its graph computes


def test_a_runtime_that_does_not_fit_the_folder_is_one_line(tiny_checkpoint, tiny_export, tmp_path):
    with pytest.raises(CheckpointError, match="is an ONNX export, not a PyTorch checkpoint: run it with --runtime onnx"):
        load_model(tiny_export, "torch")
    with pytest.raises(CheckpointError, match="is a PyTorch checkpoint, not an ONNX export: run it with --runtime "
                                              "torch, or export it"):
        load_model(tiny_checkpoint, "onnx")
    with pytest.raises(CheckpointError, match="is not a de3bert checkpoint: it has no config.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="unknown runtime 'tensorrt'; choose one of torch, onnx"):
        load_model(tiny_checkpoint, "tensorrt")


def test_weights_digest_is_of_the_weights_or_the_graphs(tiny_checkpoint, tiny_export, tmp_path):
    assert weights_digest(tiny_checkpoint) == hashlib.sha256((tiny_checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert weights_digest(tiny_export) != weights_digest(tiny_checkpoint)
    with pytest.raises(CheckpointError, match="holds neither model.safetensors nor ONNX graphs"):
        weights_digest(tmp_path)
