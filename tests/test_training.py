import json

import pytest
import torch

from de3bert.errors import De3bertError
from de3bert.modeling import EarlyExitModel
from de3bert.training import RECIPES, Trainer, TrainingArguments, train
from tests.conftest import tiny_model


def args_for(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "ckpt"), epochs=3, learning_rate=1e-2, batch_size=16, progress=False,
                  calibration_fraction=0.25)
    return TrainingArguments(**(values | overrides))


def test_de3_training_learns_and_writes_a_calibrated_checkpoint(tmp_path, tiny_backbone_dir, glue_dir):
    result = train("sst2", str(tiny_backbone_dir), args_for(tmp_path), data_dir=str(glue_dir))
    model = EarlyExitModel.from_pretrained(result.output_dir)
    config = model.config
    assert config.labels == ["0", "1"] and config.task == "sst2"
    assert config.policy["criterion"] == "edr"
    assert {row["policy"] for row in config.calibration} == {"edr", "entropy", "confidence", "dr", "patience", "pcee"}
    layer_metrics = config.training["layer_metrics"]
    assert len(layer_metrics) == 4
    assert layer_metrics[-1]["accuracy"] >= 0.9  # the tiny task is trivially separable
    history = json.loads((result.output_dir / "training_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert config.training["train_examples"] == 96 and config.training["calibration_examples"] == 32
    assert (result.output_dir / "README.md").read_text().startswith("# de3bert early-exit model: sst2")


@pytest.mark.parametrize("recipe", ["pabee", "deebert"])
def test_baseline_recipes_train_without_prototypes(tmp_path, tiny_backbone_dir, glue_dir, recipe):
    result = train("sst2", str(tiny_backbone_dir), args_for(tmp_path, recipe=recipe, epochs=1), data_dir=str(glue_dir))
    model = EarlyExitModel.from_pretrained(result.output_dir)
    assert not model.heads[0].has_prototypes
    assert model.config.policy["criterion"] == RECIPES[recipe].criterion
    assert "edr" not in {row["policy"] for row in model.config.calibration}


def test_deebert_second_stage_trains_only_internal_heads(tmp_path):
    model = tiny_model()
    trainer = Trainer(model, args_for(tmp_path, recipe="deebert"), None, [], [], [])
    trainable = trainer._set_trainable(RECIPES["deebert"].stages[1])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(names)
    assert not any(n.startswith("backbone.") for n in names)
    assert not any(n.startswith("heads.3.") for n in names)
    assert any(n.startswith("heads.0.") for n in names)


def test_same_seed_gives_same_weights(tmp_path, tiny_backbone_dir, glue_dir):
    first = train("sst2", str(tiny_backbone_dir), args_for(tmp_path / "a", epochs=1), data_dir=str(glue_dir))
    second = train("sst2", str(tiny_backbone_dir), args_for(tmp_path / "b", epochs=1), data_dir=str(glue_dir))
    a = EarlyExitModel.from_pretrained(first.output_dir).state_dict()
    b = EarlyExitModel.from_pretrained(second.output_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, message", [
    (dict(recipe="magic"), "unknown recipe"),
    (dict(epochs=0), "epochs must be at least 1"),
    (dict(calibration_fraction=1.0), "calibration_fraction"),
])
def test_bad_arguments_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(De3bertError, match=message):
        args_for(tmp_path, **overrides)
