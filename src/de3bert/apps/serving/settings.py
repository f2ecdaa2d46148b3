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
    calibrate_from: str | None = knob(None, "a .csv, .tsv or .jsonl file of inputs (recent traffic) to calibrate the "
                                            "served default policy on at start-up, in memory (the folder is not "
                                            "written; `de3bert calibrate` writes it)")
    calibrate_speedup: float | None = knob(None, "target layer speed-up of --calibrate-from (unset: the one the "
                                                 "default policy was calibrated to)")
    calibrate_text_column: str | None = knob(None, "text column of --calibrate-from (unset: the training data's)")
    calibrate_text_pair_column: str | None = knob(None, "second text column of --calibrate-from, for pair tasks "
                                                        "(unset: the training data's)")
    speedup_window: int = knob(1000, "last inputs of requests without a policy of their own over which /metrics "
                                     "reports the delivered layer speed-up")
    speedup_band: float = knob(0.1, "relative band around the calibrated speed-up (0.1: a tenth either side): a full "
                                    "window's delivered speed-up outside it logs a drift warning")

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_inputs", "max_chars", "max_body_bytes", "speedup_window"):
            if getattr(self, name) < 1:
                raise De3bertError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise De3bertError(f"max_wait_ms must not be negative, got {self.max_wait_ms}")
        if not self.speedup_band > 0:
            raise De3bertError(f"speedup_band must be a positive fraction (0.1: a tenth either side), got {self.speedup_band}")
        if self.runtime not in (None, *RUNTIMES):
            raise De3bertError(f"unknown runtime '{self.runtime}'; choose one of {', '.join(RUNTIMES)}")
