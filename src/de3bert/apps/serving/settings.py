"""What the service serves, its request limits and its micro-batching knobs."""

from __future__ import annotations

from dataclasses import dataclass

from de3bert.apps.runtimes import RUNTIMES
from de3bert.devices import PRECISIONS
from de3bert.errors import De3bertError
from de3bert.knobs import knob


@dataclass
class ServiceSettings:
    """What the service serves, its request limits and its micro-batching knobs."""

    checkpoint: str = knob(help="checkpoint folder, or exported folder (`de3bert export`), to serve", cli=False)
    runtime: str | None = knob(None, "torch (PyTorch) or onnx (ONNX Runtime, on a folder written by `de3bert "
                                     "export`); unset: the one the folder was written for", choices=RUNTIMES)
    device: str = knob("auto", "where the model runs: auto (a CUDA GPU when there is one; an export: the CPU), cpu, "
                               "cuda or cuda:N")
    precision: str = knob("auto", "precision of the weights: auto (fp32 on the CPU, bf16 on a GPU), fp32, bf16 or "
                                  "fp16", choices=PRECISIONS)
    max_batch_size: int = knob(32, "most inputs merged into one engine call (a larger single request runs alone)")
    max_wait_ms: float = knob(0.0, "longest a request waits for others to join its micro-batch (0: merge only those "
                                   "that queued while the engine was busy; on a CPU as fast under load, faster idle)")
    micro_batching: bool = knob(True, "merge concurrent requests into micro-batches (without: one request per engine "
                                      "call, the load test's baseline)")
    max_inputs: int = knob(64, "most inputs in one request")
    max_chars: int = knob(5000, "most characters in one text")
    max_body_bytes: int = knob(1_000_000, "largest request body accepted, in bytes")

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_inputs", "max_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise De3bertError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise De3bertError(f"max_wait_ms must not be negative, got {self.max_wait_ms}")
        if self.runtime not in (None, *RUNTIMES):
            raise De3bertError(f"unknown runtime '{self.runtime}'; choose one of {', '.join(RUNTIMES)}")
