import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from de3bert.apps.cli import main
from de3bert.data import Columns, FileSource, GlueSource
from de3bert.errors import CheckpointError, De3bertError
from de3bert.exits.criteria import own_criterion
from de3bert.model.config import ExitHeadConfig
from de3bert.model.modeling import EarlyExitModel
from de3bert.training import RECIPES, TrainingJob
from de3bert.training.arguments import TrainingArguments
from de3bert.training.distributed import process_share
from de3bert.training.launch import resume, train
from de3bert.training.state import load_training_state, state_path
from de3bert.training.trainer import STOP_AFTER_STEPS_ENV, Trainer, epoch_order
from tests.conftest import TICKETS, TINY, tiny_model


def args_for(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "ckpt"), epochs=3, learning_rate=1e-2, batch_size=16, progress=False,
                  calibration_fraction=0.25)
    return TrainingArguments(**(values | overrides))


def test_de3_training_learns_and_writes_a_calibrated_checkpoint(tmp_path, tiny_backbone_dir, glue_dir):
    result = train("sst2", str(tiny_backbone_dir), args_for(tmp_path), data_dir=str(glue_dir))
    model = EarlyExitModel.from_pretrained(result.output_dir)
    config = model.config
    assert config.labels == ["0", "1"] and config.task == "sst2"
    # the default criterion is the calibration winner (on this trivially separable task they tie: the recipe's own)
    selection = config.policy_selection
    assert config.policy["criterion"] == selection["criterion"] == selection["standings"][0]["criterion"]
    assert selection["preferred"] == "edr" and not selection["forced"]
    assert {row["criterion"] for row in selection["standings"]} == {"edr", "entropy", "confidence", "dr", "patience",
                                                                     "pcee"}
    assert {row["criterion"] for row in config.calibration} == {"edr", "entropy", "confidence", "dr", "patience", "pcee"}
    layer_metrics = config.training["layer_metrics"]
    assert len(layer_metrics) == 4
    assert layer_metrics[-1]["accuracy"] >= 0.9  # the tiny task is trivially separable
    history = json.loads((result.output_dir / "training_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert config.training["train_examples"] == 96 and config.training["calibration_examples"] == 32
    card = (result.output_dir / "README.md").read_text()
    assert card.startswith("# de3bert early-exit model: sst2") and "on the calibration split at 2x" in card


def test_criterion_option_forces_the_default_policy(tmp_path, tiny_backbone_dir, glue_dir, capsys):
    result = train("sst2", str(tiny_backbone_dir), args_for(tmp_path, epochs=1, criterion="patience"),
                   data_dir=str(glue_dir))
    config = EarlyExitModel.from_pretrained(result.output_dir).config
    assert config.policy["criterion"] == "patience" and config.policy_selection["forced"]
    assert "default exit policy: patience, as asked by --criterion" in capsys.readouterr().out
    with pytest.raises(De3bertError, match="criterion 'edr' reads prototypes, which recipe 'pabee' does not train"):
        args_for(tmp_path, recipe="pabee", criterion="edr")


@pytest.mark.parametrize("recipe", ["pabee", "deebert"])
def test_baseline_recipes_train_without_prototypes(tmp_path, tiny_backbone_dir, glue_dir, recipe):
    result = train("sst2", str(tiny_backbone_dir), args_for(tmp_path, recipe=recipe, epochs=1), data_dir=str(glue_dir))
    model = EarlyExitModel.from_pretrained(result.output_dir)
    assert not model.heads[0].has_prototypes
    assert model.config.policy_selection["preferred"] == own_criterion(recipe)
    assert "edr" not in {row["criterion"] for row in model.config.calibration}


def test_deebert_second_stage_trains_only_internal_heads(tmp_path, tokenizer):
    model = tiny_model(tokenizer=tokenizer)
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


def cli_train_argv(backbone, glue_dir, output, **options) -> list[str]:
    """`de3bert train` arguments for the tiny SST-2 with the settings of args_for."""
    values = dict(task="sst2", model=str(backbone), output=str(output), epochs=3, learning_rate=1e-2, batch_size=16,
                  calibration_fraction=0.25, data_dir=str(glue_dir)) | options
    return ["train", "--no-progress"] + [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


def max_weight_difference(first: Path, second: Path) -> float:
    """Largest absolute difference between the tensors of two checkpoints."""
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def history(output: Path) -> list[float]:
    """Stage, epoch, train_loss and score of every epoch of a finished run, one after the other."""
    records = json.loads((output / "training_history.json").read_text())
    return [value for r in records for value in (r["stage"], r["epoch"], r["train_loss"], r["score"])]


def test_batches_are_shared_so_that_averaged_gradients_equal_the_whole_batch_gradient():
    batch = list(range(13))
    assert process_share(batch, 0, 1) == (batch, 1.0)
    assert process_share(batch, 0, 2) == (list(range(7)), 14 / 13)
    assert process_share(batch, 1, 2) == (list(range(7, 13)), 12 / 13)
    assert process_share([5], 1, 2) == ([5], 0.0)  # nothing left for it: runs one example with weight 0
    assert sorted(epoch_order(10, 42, 0, 1)) == list(range(10))
    assert epoch_order(10, 42, 0, 1) == epoch_order(10, 42, 0, 1) != epoch_order(10, 42, 0, 2)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, tiny_backbone_dir, glue_dir):
    # the default de3 recipe: the state holds the running-mean prototypes too, and they must resume exactly
    reference = train("sst2", str(tiny_backbone_dir),
                      args_for(tmp_path / "reference", epochs=2, save_every_steps=4, learning_rate=2e-2),
                      data_dir=str(glue_dir)).output_dir
    output = tmp_path / "killed" / "ckpt"
    # 6 steps per epoch; state checkpoints after steps 4, 6 (epoch end) and 8; killed after step 10.
    killed = subprocess.run([sys.executable, "-m", "de3bert",
                             *cli_train_argv(tiny_backbone_dir, glue_dir, output, epochs=2, save_every_steps=4,
                                             learning_rate=2e-2)],
                            env=os.environ | {STOP_AFTER_STEPS_ENV: "10"}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = load_training_state(output)
    assert (state.stage, state.epoch, state.step, state.global_step) == (0, 2, 2, 8)  # mid-epoch
    assert main(["train", "--resume", str(output), "--no-progress"]) == 0
    assert max_weight_difference(reference, output) < 1e-5
    prototypes = load_file(output / "model.safetensors")["heads.0.prototypes"]
    assert torch.equal(prototypes, load_file(reference / "model.safetensors")["heads.0.prototypes"])
    assert prototypes.abs().sum() > 0  # they were trained, not left at their zero start
    assert history(output) == pytest.approx(history(reference), rel=1e-6)
    # The kept weights come from the epoch that was interrupted, so the comparison means something.
    scores = [r["score"] for r in json.loads((reference / "training_history.json").read_text())]
    assert scores[1] > scores[0]
    assert not state_path(output).parent.exists()  # a finished run leaves a plain checkpoint


def test_missing_or_damaged_training_state_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="holds no training state"):
        resume(tmp_path / "run")
    path = state_path(tmp_path / "run")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"half a file")
    with pytest.raises(CheckpointError, match="cannot be read .* truncated or damaged"):
        resume(tmp_path / "run")
    torch.save({"version": 1, "stage": 0}, path)
    with pytest.raises(CheckpointError, match="lacks best_model"):
        resume(tmp_path / "run")
    with pytest.raises(CheckpointError, match="training state of an unfinished run: continue it with"):
        train("sst2", "unused", args_for(tmp_path, output_dir=str(tmp_path / "run")))


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, tokenizer, glue_dir):
    # Dropout off: the processes draw other dropout masks than one process would. What remains is floating-point
    # summation order (gradient all-reduce, smaller matrix products), amplified by Adam over 16 steps: about 3e-5
    # here, against 4e-2 when the processes' mean losses are averaged without weighting by their share.
    backbone = tmp_path / "tiny-bert-no-dropout"
    torch.manual_seed(0)
    BertModel(BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    single = train("sst2", str(backbone), args_for(tmp_path / "single", epochs=2, batch_size=13),
                   data_dir=str(glue_dir), heads=ExitHeadConfig(dropout=0.0)).output_dir
    output = tmp_path / "ddp" / "ckpt"
    torchrun = Path(sys.executable).parent / "torchrun"
    launched = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "de3bert",
         *cli_train_argv(backbone, glue_dir, output, epochs=2, batch_size=13, head_dropout=0.0)],
        env=os.environ | {"CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)  # CPU processes (gloo)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("best checkpoint") == 1  # only the main process prints
    assert "2 processes, 13 examples per step in all" in launched.stdout
    assert history(output) == pytest.approx(history(single), rel=1e-6)
    assert max_weight_difference(single, output) < 2e-4


def test_bf16_mixed_precision_trains_on_the_cpu_and_fp16_or_a_missing_gpu_are_clear_errors(
        tmp_path, tiny_backbone_dir, glue_dir, capsys):
    result = train("sst2", str(tiny_backbone_dir), args_for(tmp_path, epochs=1, precision="bf16", device="cpu"),
                   data_dir=str(glue_dir))
    model = EarlyExitModel.from_pretrained(result.output_dir)
    assert next(model.parameters()).dtype == torch.float32  # mixed precision: the weights stay float32
    assert model.config.training["precision"] == "bf16"
    with pytest.raises(De3bertError, match="fp16 mixed precision needs a CUDA GPU"):
        Trainer(tiny_model(tokenizer=model.tokenizer), args_for(tmp_path, precision="fp16", device="cpu"), None, [], [],
                [])
    if not torch.cuda.is_available():
        argv = cli_train_argv(tiny_backbone_dir, glue_dir, tmp_path / "gpu", device="cuda")
        assert main(argv) == 2
        assert "error: device 'cuda' is not available: this machine has no usable CUDA GPU" in capsys.readouterr().err


def test_stages_compute_only_the_heads_their_loss_reads(tmp_path, tokenizer):
    from de3bert.training.recipes import trained_exits

    stages = RECIPES["deebert"].stages
    assert trained_exits(stages[0].loss, 4) == [3] and trained_exits(stages[1].loss, 4) == [0, 1, 2]
    model = tiny_model(tokenizer=tokenizer)
    calls = []
    for index, head in enumerate(model.heads):
        head.register_forward_hook(lambda *args, index=index: calls.append(index))
    from tests.conftest import padded_batch
    output = model(**padded_batch(), exits=[3])
    assert calls == [3] and output.layers[:3] == [None] * 3 and output.layers[3] is not None


def test_run_spec_round_trips_its_source_and_reads_states_from_before_sources(tmp_path):
    run = TrainingJob(FileSource("/d/t.csv", columns=Columns("body"), labels=("a", "b")), "minilm-l6",
                  args_for(tmp_path), ExitHeadConfig(prototype_dim=8))
    assert TrainingJob.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    legacy = {"task": "rte", "backbone": "minilm-l6", "args": run.args.to_dict(), "data_dir": "/glue",
              "hub_dataset": None, "heads": run.to_dict()["heads"]}
    assert TrainingJob.from_dict(legacy).data == GlueSource("rte", "/glue")


def test_a_stopped_run_on_a_users_file_resumes_from_its_recorded_source(tmp_path, tiny_backbone_dir, tickets_dir,
                                                                         monkeypatch):
    class Stopped(Exception):
        """Stands in for the SIGKILL of the stop hook, so that the run stops inside this process."""

    def stop(pid, sig):
        raise Stopped

    monkeypatch.setattr("de3bert.training.trainer.os.kill", stop)
    monkeypatch.setenv(STOP_AFTER_STEPS_ENV, "5")
    source = FileSource(str(tickets_dir / "tickets.csv"))
    with pytest.raises(Stopped):
        train(source, str(tiny_backbone_dir), args_for(tmp_path, epochs=1, save_every_steps=4))
    assert TrainingJob.from_dict(load_training_state(tmp_path / "ckpt").run).data == source
    monkeypatch.delenv(STOP_AFTER_STEPS_ENV)
    config = EarlyExitModel.from_pretrained(resume(tmp_path / "ckpt").output_dir).config
    assert config.training["data"] == source.to_dict() and config.label_names == sorted(TICKETS)
