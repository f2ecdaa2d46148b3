import json

import pytest
import torch

from de3bert.errors import CheckpointError
from de3bert.model.modeling import EarlyExitModel
from tests.conftest import padded_batch, tiny_model


def test_forward_gives_every_layer(tokenizer):
    model = tiny_model(tokenizer=tokenizer)
    output = model(**padded_batch())
    assert len(output.layers) == 4
    assert output.logits.shape == (4, 5, 2)
    assert output.layers[0].distances.shape == (5, 2)
    assert (output.layers[0].distances >= 0).all()
    assert model(**padded_batch(), with_prototypes=False).layers[0].distances is None


def test_prototype_dim_and_no_prototypes():
    assert tiny_model(prototype_dim=8).heads[0].prototypes.shape == (2, 8)
    assert tiny_model(prototype_dim=None).heads[0].prototypes.shape == (2, 32)
    assert not tiny_model(prototype_dim=0).heads[0].has_prototypes
    assert not tiny_model(labels=()).heads[0].has_prototypes


def test_overhead_report_counts_prototypes():
    overhead = tiny_model(prototype_dim=8).overhead()
    assert overhead["prototype_parameters_per_layer"] == 8 * (32 + 1) + 2 * 8  # projection + prototypes
    assert 0 < overhead["overhead_fraction"] < 1


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path, tokenizer):
    model = tiny_model(tokenizer=tokenizer)
    model.config.policy = {"criterion": "edr", "threshold": 0.3, "patience": 1, "lam": 1.0}
    model.save_pretrained(tmp_path / "ckpt")
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    loaded = EarlyExitModel.from_pretrained(tmp_path / "ckpt")
    batch = padded_batch()
    with torch.no_grad():
        expected, actual = model(**batch), loaded(**batch)
    for a, b in zip(expected.layers, actual.layers):
        assert torch.equal(a.logits, b.logits)
        assert (a.distances is b.distances is None) or torch.equal(a.distances, b.distances)
    assert loaded.config.policy == model.config.policy
    assert loaded.tokenizer is not None
    # saving again over an existing checkpoint replaces it completely
    model.save_pretrained(tmp_path / "ckpt")
    assert not list(tmp_path.glob(".ckpt*"))


def test_loading_something_else_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(CheckpointError, match="does not exist"):
        EarlyExitModel.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        EarlyExitModel.from_pretrained(tmp_path / "empty")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not a de3bert checkpoint"):
        EarlyExitModel.from_pretrained(tmp_path / "hf")


def test_labels_of_another_task_are_rejected(tmp_path, tokenizer):
    path = tiny_model(tokenizer=tokenizer).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"trained for labels \['neg', 'pos'\] of task 'tiny', but the data has "
                                              r"labels \['a', 'b', 'c'\]"):
        EarlyExitModel.from_pretrained(path, expected_labels=["a", "b", "c"])


def test_incompatible_format_version_is_rejected(tmp_path, tokenizer):
    path = tiny_model(tokenizer=tokenizer).save_pretrained(tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["de3bert"]["format_version"] = 99
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has format version 99; this de3bert reads version 1"):
        EarlyExitModel.from_pretrained(path)


def test_checkpoint_without_weights_is_a_clear_error(tmp_path, tokenizer):
    path = tiny_model(tokenizer=tokenizer).save_pretrained(tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        EarlyExitModel.from_pretrained(path)


def test_weights_of_another_model_are_rejected(tmp_path, tokenizer):
    small = tiny_model(tokenizer=tokenizer, prototype_dim=8).save_pretrained(tmp_path / "small")
    other = tiny_model(tokenizer=tokenizer).save_pretrained(tmp_path / "other")
    (small / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not fit"):
        EarlyExitModel.from_pretrained(small)


def test_from_backbone_copies_pretrained_pooler():
    model = EarlyExitModel.from_backbone("minilm-l6", "sst2", ["0", "1"])
    assert model.num_layers == 6
    from safetensors.torch import load_file

    from de3bert.model.backbones import resolve_backbone

    pretrained = load_file(f"{resolve_backbone('minilm-l6')}/model.safetensors")["pooler.dense.weight"]
    assert all(torch.equal(head.pooler.weight, pretrained) for head in model.heads)


def test_checkpoint_without_tokenizer_files_is_a_clear_error(tmp_path, tokenizer):
    path = tiny_model(tokenizer=tokenizer).save_pretrained(tmp_path / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="has no usable tokenizer files"):
        EarlyExitModel.from_pretrained(path)


def test_corrupt_config_json_is_a_clear_error(tmp_path, tokenizer):
    path = tiny_model(tokenizer=tokenizer).save_pretrained(tmp_path / "ckpt")
    (path / "config.json").write_text('{"de3bert": {"task": ')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        EarlyExitModel.from_pretrained(path)


def test_corrupt_weights_are_a_clear_error(tmp_path, tokenizer):
    path = tiny_model(tokenizer=tokenizer).save_pretrained(tmp_path / "ckpt")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model.safetensors cannot be read"):
        EarlyExitModel.from_pretrained(path)


def test_checkpoint_written_before_running_mean_prototypes_loads_as_it_was(tmp_path, tokenizer):
    """Older config.json files have no `prototypes` or `final_prototypes`: learned prototypes on every layer."""
    model = tiny_model(tokenizer=tokenizer, prototypes="learned", final_prototypes=True)
    model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("prototypes", "prototype_momentum", "final_prototypes"):
        del config["de3bert"]["heads"][key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = EarlyExitModel.from_pretrained(tmp_path / "old")
    assert loaded.config.heads.prototypes == "learned" and loaded.heads[-1].has_prototypes
    batch = padded_batch()
    with torch.no_grad():
        for a, b in zip(model(**batch).layers, loaded(**batch).layers):
            assert torch.equal(a.logits, b.logits) and torch.equal(a.distances, b.distances)


def test_new_models_have_no_prototypical_network_on_the_last_layer():
    model = tiny_model(prototype_dim=8)
    assert [head.has_prototypes for head in model.heads] == [True, True, True, False]
    overhead = model.overhead()
    assert overhead["prototype_parameters"] == 3 * (8 * (32 + 1) + 2 * 8)
    assert overhead["prototype_parameters_saved_on_last_layer"] == 8 * (32 + 1) + 2 * 8


def test_loading_in_half_precision_keeps_integer_and_boolean_buffers(tmp_path, tokenizer):
    model = tiny_model(tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "ckpt")
    half = EarlyExitModel.from_pretrained(tmp_path / "ckpt", device="cpu", precision="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16
    buffers = dict(half.named_buffers())
    assert buffers["heads.0.prototype_initialized"].dtype == torch.bool
    assert all(b.dtype == torch.long for name, b in buffers.items() if name.endswith(("position_ids", "token_type_ids")))
    batch = padded_batch()
    with torch.no_grad():
        agree = (half(**batch).layers[-1].logits.argmax(-1) == model(**batch).layers[-1].logits.argmax(-1)).float()
    assert agree.mean() >= 0.8  # bf16 rounding may flip a near tie of a random model


def test_label_names_are_stored_as_id2label_and_old_checkpoints_get_derived_names(tmp_path, tokenizer):
    model = tiny_model(labels=("0", "1"), tokenizer=tokenizer)
    model.config.label_names = ["bad", "good"]
    path = model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    assert config["id2label"] == {"0": "bad", "1": "good"} and config["label2id"] == {"bad": 0, "good": 1}
    assert "label_names" not in config["de3bert"]
    assert EarlyExitModel.from_pretrained(path).config.label_names == ["bad", "good"]
    for task, names in (("sst2", ["negative", "positive"]), ("tiny", ["0", "1"])):
        old = {"de3bert": {**config["de3bert"], "task": task}}  # written before label names were stored
        (path / "config.json").write_text(json.dumps(old))
        assert EarlyExitModel.from_pretrained(path).config.label_names == names
    (path / "config.json").write_text(json.dumps({**config, "id2label": {"0": "bad", "1": "bad"}}))
    with pytest.raises(CheckpointError, match=r"label names \['bad', 'bad'\] do not name the labels"):
        EarlyExitModel.from_pretrained(path)


def test_a_checkpoint_whose_calibration_rows_name_the_policy_loads_and_serves(tmp_path, tokenizer):
    """Calibrated rows written before every JSON said "criterion" said "policy"; such checkpoints load, and their
    rows read as the new ones (what the service's target_speedup interpolation reads)."""
    from de3bert.exits.calibration import policy_for_speedup

    model = tiny_model(tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["de3bert"]["calibration"] = [
        {"target_speedup": 1.5, "policy": "entropy", "threshold": 0.2, "patience": 1, "lam": 1.0, "speedup": 1.5},
        {"target_speedup": 2.0, "policy": "entropy", "threshold": 0.4, "patience": 1, "lam": 1.0, "speedup": 2.0}]
    config["de3bert"]["policy_selection"] = {"criterion": "entropy", "preferred": "edr", "forced": False,
                                             "target_speedup": 2.0, "metric": "accuracy",
                                             "standings": [{"criterion": "entropy", "metric": 0.9, "speedup": 2.0}]}
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = EarlyExitModel.from_pretrained(tmp_path / "old")
    assert [row["criterion"] for row in loaded.config.calibration] == ["entropy", "entropy"]
    assert policy_for_speedup(loaded.config.calibration, "entropy", 1.75).threshold == pytest.approx(0.3)
    loaded.save_pretrained(tmp_path / "again")  # the card of a selection without its sentence
    assert "entropy" in (tmp_path / "again" / "README.md").read_text()
