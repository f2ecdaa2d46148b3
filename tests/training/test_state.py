import pytest
import torch

from de3bert.training.state import StateWriter, TrainingState, load_training_state


def state(weights: torch.Tensor, history: list) -> TrainingState:
    return TrainingState(run={}, examples=4, stage=0, epoch=1, step=2, global_step=2, running_loss=0.5,
                         permutation=[3, 1, 0, 2], model={"w": weights}, optimizer={"state": {0: {"m": weights * 2}}},
                         scheduler={}, best_score=0.1, best_model=None, history=history, rng=[])


def test_the_background_writer_saves_the_state_as_it_was_when_asked(tmp_path):
    weights, history = torch.ones(3), [{"epoch": 1}]
    writer = StateWriter()
    writer.save(state(weights, history), tmp_path)
    weights.add_(100.0)  # training goes on at once: the next optimizer step changes the weights in place
    history.append({"epoch": 2})
    writer.wait()
    loaded = load_training_state(tmp_path)
    assert loaded.model["w"].tolist() == [1.0, 1.0, 1.0] and loaded.optimizer["state"][0]["m"].tolist() == [2.0] * 3
    assert loaded.history == [{"epoch": 1}] and loaded.permutation == [3, 1, 0, 2]


def test_a_failed_background_write_surfaces_in_the_training_thread(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run folder should be")
    writer = StateWriter()
    writer.save(state(torch.ones(1), []), blocker)
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # reported once
