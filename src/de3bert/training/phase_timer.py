"""Wall-clock seconds spent in each phase of training (data, forward, backward, optimizer, ...).

The trainer wraps its phases in `timer.phase(name)`; the trainer's own timer is disabled and costs one
attribute lookup per phase. The throughput benchmark swaps in an enabled one, which waits for the device
at every phase boundary so that asynchronous GPU work is charged to the phase that queued it.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

from de3bert.devices import synchronize

_NOTHING = contextlib.nullcontext()


class PhaseTimer:
    """Accumulates seconds per named phase; `enabled=False` makes `phase` a no-op."""

    def __init__(self, device: torch.device | None = None, enabled: bool = True):
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.device = device or torch.device("cpu")

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """A context that charges its wall-clock time to `name`."""
        return self._timed(name) if self.enabled else _NOTHING

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] += time.perf_counter() - started
