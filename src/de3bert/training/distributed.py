"""Where a run trains: its processes (one, or several under `accelerate launch` / `torchrun`), its device and its
mixed precision, resolved once from the arguments' names and carried from there.

Accelerate sets up the processes, the DDP wrapping and the collectives. Mixed precision is the run's own
(`Placement.autocast` and, for fp16, a loss scaler) rather than Accelerate's, whose settings are one
process-wide state that a second run in the same process (a notebook, the test suite) could not change
without reaching into its private attributes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator, PartialState

from de3bert.devices import DTYPES, resolve_device, resolve_precision
from de3bert.errors import DeviceError


@dataclass(frozen=True)
class Placement:
    """The device a run trains on, the name it was asked by, and the mixed precision of its forward and backward
    passes ("fp32", "bf16" or "fp16")."""

    device: torch.device
    requested: str
    precision: str

    @classmethod
    def resolve(cls, device: str, precision: str) -> Placement:
        """The placement the names stand for (as TrainingArguments writes them), or a DeviceError."""
        chosen = resolve_device(device)
        precision = resolve_precision(precision, chosen)
        if precision == "fp16" and chosen.type != "cuda":
            raise DeviceError("fp16 mixed precision needs a CUDA GPU; on the CPU use --precision bf16 or fp32")
        return cls(chosen, device, precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context in which forward passes run in the mixed precision (nothing for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The loss scaler: active for fp16, whose small range underflows gradients; a pass-through otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")


def process_state(device: torch.device) -> PartialState:
    """This process's place in the run: the only one, or one of several (on the CPU they talk over gloo)."""
    return PartialState(cpu=device.type == "cpu")


def training_accelerator(placement: Placement) -> Accelerator:
    """The Accelerator of a run (processes, DDP wrapping, collectives) on the placement's device."""
    processes = process_state(placement.device).num_processes
    if placement.device.type == "cuda" and ":" in placement.requested:
        if processes > 1:
            raise DeviceError(f"--device {placement.requested} names one GPU, but {processes} processes each train on "
                              "their own; use --device cuda")
        torch.cuda.set_device(placement.device)
    accelerator = Accelerator(cpu=placement.device.type == "cpu", mixed_precision="no")
    if accelerator.device.type != placement.device.type:
        # Accelerate keeps one set-up per process: the first run of a process decides where the others train
        raise DeviceError(f"this process already trains on {accelerator.device.type}; train on "
                          f"{placement.device.type} in a new process")
    return accelerator


def process_share(indices: list[int], process: int, processes: int) -> tuple[list[int], float]:
    """This process's contiguous part of a global batch, and the weight of its mean loss.

    The weight processes·b/B makes the average over processes (what DDP does to gradients) equal the gradient
    of the mean loss over the whole batch of B. A process left without examples (B < processes) runs one with
    weight 0, because every process has to take part in each step.
    """
    own = np.array_split(np.asarray(indices), processes)[process].tolist()
    return (own, processes * len(own) / len(indices)) if own else (indices[:1], 0.0)
