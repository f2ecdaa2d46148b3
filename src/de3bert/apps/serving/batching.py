"""Micro-batching: concurrent requests merged into one engine call, run on one engine thread."""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from de3bert.apps.serving.schemas import TextInput
from de3bert.exits.engine import EarlyExitEngine, Prediction
from de3bert.exits.explain import Explanation, explain_exits
from de3bert.exits.policies import ExitPolicy


@dataclass
class _Job:
    """One request waiting in the batcher's queue."""

    inputs: list[TextInput]
    policy: ExitPolicy
    future: asyncio.Future
    enqueued: float

    @property
    def group(self) -> tuple:
        """Jobs with equal groups can share one engine call (same policy, same kind of input)."""
        return (*asdict(self.policy).values(), self.inputs[0].text_pair is not None)


class MicroBatcher:
    """Merges concurrent requests into micro-batches of at most max_batch_size inputs, none waiting
    more than max_wait_ms for company, and runs them on one engine thread, one call per policy.
    With enabled=False every request runs alone."""

    def __init__(self, engine: EarlyExitEngine, max_batch_size: int, max_wait_ms: float, enabled: bool = True):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.enabled = enabled
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        """Inputs in each recent micro-batch (for tests and monitoring)."""
        self._queue: asyncio.Queue[_Job] | None = None
        self._held: _Job | None = None  # a request that would have overfilled the last batch
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="de3bert-engine")

    async def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop the batching task and the engine thread."""
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def predict(self, inputs: list[TextInput], policy: ExitPolicy) -> tuple[list[Prediction], int]:
        """Predictions for one request's inputs, in order, and the size of the micro-batch that served them."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put_nowait(_Job(inputs, policy, future, loop.time()))
        return await future

    async def explain(self, inputs: list[TextInput], policy: ExitPolicy) -> list[Explanation]:
        """Layer-by-layer explanations of one request's inputs (`explain_exits`), computed on the engine thread
        between micro-batches so that they never compete with the engine for the model."""
        pairs = [item.text_pair for item in inputs] if inputs[0].text_pair is not None else None
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, explain_exits, self.engine.model, policy, [item.text for item in inputs], pairs)

    async def _next_batch(self) -> list[_Job]:
        """The next micro-batch: the oldest request plus those that arrive within its wait budget."""
        first = self._held or await self._queue.get()
        self._held = None
        batch, size = [first], len(first.inputs)
        loop = asyncio.get_running_loop()
        deadline = first.enqueued + self.max_wait
        while self.enabled and size < self.max_batch_size:
            try:  # requests that queued up while the engine was busy join without waiting
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if size + len(job.inputs) > self.max_batch_size:
                self._held = job
                break
            batch.append(job)
            size += len(job.inputs)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            size = sum(len(job.inputs) for job in batch)
            self.batch_sizes.append(size)
            groups: dict[tuple, list[_Job]] = {}
            for job in batch:
                groups.setdefault(job.group, []).append(job)
            for jobs in groups.values():
                try:
                    predictions = await loop.run_in_executor(self._executor, self._predict, jobs)
                except Exception as exc:  # these requests fail with the error; the service carries on
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                start = 0
                for job in jobs:
                    if not job.future.done():  # done = the client went away
                        job.future.set_result((predictions[start:start + len(job.inputs)], size))
                    start += len(job.inputs)

    def _predict(self, jobs: list[_Job]) -> list[Prediction]:
        """One engine call over the inputs of jobs that share a policy and a kind of input."""
        inputs = [item for job in jobs for item in job.inputs]
        pairs = [item.text_pair for item in inputs] if inputs[0].text_pair is not None else None
        return self.engine.predict([item.text for item in inputs], pairs, jobs[0].policy)
