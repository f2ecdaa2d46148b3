"""The state of an unfinished training run, written atomically so that a killed run continues exactly.

It lives in `<output>/training_state/state.pt`, one file replaced whole at every state checkpoint: a run
killed at any moment leaves either the previous state or the new one, never a mix.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from de3bert.atomic import write_file
from de3bert.errors import CheckpointError

STATE_DIR = "training_state"
STATE_FILE = "state.pt"
STATE_VERSION = 1


@dataclass
class TrainingState:
    """Everything a run needs to continue where it stopped.

    The position is the next batch to train: stage (0-based), epoch (1-based; epochs + 1 once the stage's
    epochs are done) and step within the epoch (0-based). permutation: the order of the training examples in
    the current epoch once it has begun (empty at an epoch boundary: it is drawn when the epoch starts).
    """

    run: dict
    """The run's inputs (training.RunSpec as a dict); empty when a Trainer was driven directly."""
    examples: int
    """Number of training examples; resuming on different data is an error."""
    stage: int
    epoch: int
    step: int
    global_step: int
    """Optimizer steps taken so far, over all stages."""
    running_loss: float | None
    """Smoothed training loss of the current epoch."""
    permutation: list[int]
    model: dict
    """Model weights (state dict) at this point."""
    optimizer: dict
    scheduler: dict
    best_score: float
    """Selection score of the current stage's best epoch so far (-inf before the first)."""
    best_model: dict | None
    """Weights of that epoch."""
    history: list[dict]
    """One record per evaluated epoch."""
    rng: list[dict]
    """Random states of every process (capture_rng), indexed by process."""
    version: int = STATE_VERSION


def state_path(output_dir: str | Path) -> Path:
    """Where the training state of a run writing to output_dir lives."""
    return Path(output_dir) / STATE_DIR / STATE_FILE


def save_training_state(state: TrainingState, output_dir: str | Path) -> Path:
    """Write the state atomically (temporary file, fsync, rename) and return its path."""
    return write_file(state_path(output_dir), lambda handle: torch.save(vars(state), handle))


def _cpu_copy(value):
    """A copy of nested dicts/lists/tuples with every tensor copied to the CPU (other values as they are)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    return value


class StateWriter:
    """Writes training states in a background thread, one at a time, so that training does not wait for the
    disk (a state of MPNet-12 with AdamW is ~1.3 GB): the loop only pays for a copy of the tensors on the CPU.

    A state is still written atomically; `wait` blocks until the last one is on disk and re-raises its error.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: TrainingState, output_dir: str | Path) -> None:
        """Snapshot the state now (training may change its tensors right after) and write it in the background."""
        self.wait()
        # the best epoch's weights are a copy already, and never changed once taken
        snapshot = replace(state, **{f.name: _cpu_copy(getattr(state, f.name)) for f in fields(TrainingState)
                                     if f.name != "best_model"})
        self._thread = threading.Thread(target=self._write, args=(snapshot, output_dir), name="de3bert-state",
                                        daemon=True)
        self._thread.start()

    def _write(self, state: TrainingState, output_dir: str | Path) -> None:
        try:
            save_training_state(state, output_dir)
        except BaseException as exc:  # re-raised in the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the state being written (if any) is on disk; raise the error writing it hit, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load_training_state(output_dir: str | Path) -> TrainingState:
    """Read the training state of an interrupted run, with errors that say what to do."""
    path = state_path(output_dir)
    if not path.is_file():
        raise CheckpointError(
            f"{output_dir} holds no training state ({STATE_DIR}/{STATE_FILE}): the run finished, or it stopped "
            "before its first state checkpoint (see --save-every-steps); start it again without --resume")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (UnpicklingError, KeyError, ...) for a damaged file
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}): it is truncated or damaged; delete "
                              f"{path.parent} and start the run again") from exc
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise CheckpointError(f"{path} has training state version {version}; this de3bert reads version "
                              f"{STATE_VERSION}")
    missing = sorted({f.name for f in fields(TrainingState)} - set(data))
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; delete {path.parent} and start the run again")
    return TrainingState(**data)


def capture_rng() -> dict:
    """This process's random states: Python, NumPy, PyTorch on the CPU and on every CUDA device."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {"key": numpy_state["state"]["key"].tolist(),
                                           "pos": numpy_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(states: dict) -> None:
    """Inverse of capture_rng: the random streams continue exactly where they were captured."""
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state({**numpy_state, "state": {"key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
                                                  "pos": numpy_state["state"]["pos"]}})
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
