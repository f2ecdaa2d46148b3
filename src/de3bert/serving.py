"""HTTP prediction service: a FastAPI app that merges concurrent requests into micro-batches and runs
them through the early-exit engine (rows that exit leave the batch layer by layer).

    de3bert serve runs/demo-sst2 --port 8000          # PyTorch
    de3bert serve runs/demo-sst2-onnx --port 8000     # an exported folder, on ONNX Runtime
    curl -s localhost:8000/v1/predict -H 'content-type: application/json' \\
         -d '{"inputs": [{"text": "a gripping, funny film"}]}'

One worker task per process collects requests into micro-batches (at most `max_batch_size` inputs,
no request waiting more than `max_wait_ms` for company) and hands each batch to a single engine
thread, one engine call per exit policy, so the event loop stays free to accept requests.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from de3bert.engine import EarlyExitEngine, Prediction
from de3bert.errors import DataError, De3bertError, PolicyError
from de3bert.evaluation import criteria_for
from de3bert.modeling import EarlyExitModel
from de3bert.onnx_model import OnnxEarlyExitModel
from de3bert.policies import CRITERIA, ExitPolicy
from de3bert.runtimes import RUNTIMES, load_model, weights_digest

logger = logging.getLogger("de3bert.serving")
SETTINGS_ENV = "DE3BERT_SERVE_SETTINGS"


@dataclass
class ServiceSettings:
    """What the service serves, its request limits and its micro-batching knobs."""

    checkpoint: str
    """Checkpoint folder, or exported folder (`de3bert export`), to serve."""
    runtime: str | None = None
    """"torch" or "onnx" (ONNX Runtime); None: the one the folder was written for."""
    device: str = "cpu"
    """Where the model runs: cpu, cuda, cuda:N or auto (a GPU when there is one; an export: the CPU)."""
    precision: str = "fp32"
    """Precision of the weights: fp32, bf16, fp16 or auto (fp32 on the CPU, bf16 on a GPU)."""
    max_batch_size: int = 32
    """Most inputs merged into one micro-batch (a larger single request runs alone)."""
    max_wait_ms: float = 0.0
    """Longest a request waits for other requests to join its micro-batch. 0: no waiting; requests that
    queued while the engine was busy still merge (on a CPU this was as fast under load, faster when idle)."""
    micro_batching: bool = True
    """Merge concurrent requests; False runs one request per engine call (the load test's baseline)."""
    max_inputs: int = 64
    """Most inputs in one request."""
    max_chars: int = 5000
    """Most characters in one text."""
    max_body_bytes: int = 1_000_000
    """Largest request body accepted, in bytes."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_inputs", "max_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise De3bertError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise De3bertError(f"max_wait_ms must not be negative, got {self.max_wait_ms}")
        if self.runtime not in (None, *RUNTIMES):
            raise De3bertError(f"unknown runtime '{self.runtime}'; choose one of {', '.join(RUNTIMES)}")


class TextInput(BaseModel):
    """One input: a text, or a text pair for pair tasks (RTE, MRPC, QNLI, ...)."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(description="the text to classify", examples=["a gripping, funny film"])
    text_pair: str | None = Field(None, description="second text of a pair (pair tasks only)")


class PolicyOverride(BaseModel):
    """Per-request exit policy: a criterion with threshold/patience/λ, or a target layer speed-up.

    Fields left out come from the served default policy when the criterion is the default's, else
    from ExitPolicy's defaults. target_speedup picks threshold and patience from the checkpoint's
    calibrated table (interpolated between calibrated targets) and is refused outside its range.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    criterion: str | None = Field(None, description=f"one of {', '.join(CRITERIA)}")
    threshold: float | None = Field(None, description="τ in [0, 1] (tolerance for regression-patience)")
    patience: int | None = Field(None, description="consecutive confident layers needed to exit")
    lam: float | None = Field(None, description="λ of the hybrid indicator EDR")
    target_speedup: float | None = Field(None, description="layer speed-up within the calibrated range")


class PredictRequest(BaseModel):
    """Body of POST /v1/predict."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[TextInput] = Field(min_length=1, description="texts (or pairs) to classify, answered in order")
    policy: PolicyOverride | None = Field(None, description="exit policy for this request (default: the served one)")


class PolicyInfo(BaseModel):
    """An exit policy as applied."""

    criterion: str
    threshold: float
    patience: int
    lam: float


class PredictionOut(BaseModel):
    """One input's answer."""

    label: str | None = Field(description="predicted label's name (None for regression)")
    score: float | None = Field(description="predicted score (regression only)")
    probabilities: dict[str, float] | None = Field(description="class probabilities at the exit layer, by label name")
    exit_layer: int = Field(description="1-based layer the input left at")
    indicator: float | None = Field(description="the criterion's indicator value at the exit layer (null for a "
                                                "prototype criterion at a last layer without prototypes)")


class PredictResponse(BaseModel):
    """Body of a successful POST /v1/predict."""

    model_version: str
    policy: PolicyInfo
    predictions: list[PredictionOut]


class ModelInfo(BaseModel):
    """Body of GET /v1/model."""

    model_version: str
    backbone: str
    task: str
    labels: list[str] = Field(description="label names, in the order of the model's outputs")
    num_layers: int
    max_length: int
    heads: dict = Field(description="exit-head configuration")
    criteria: list[str] = Field(description="criteria this model supports")
    policy: PolicyInfo = Field(description="the default policy (calibrated at training time)")
    calibration: list[dict] = Field(description="calibrated trade-off table: criterion, target and measured speed-up")
    limits: dict[str, int]
    micro_batching: dict[str, bool | int | float]


class Health(BaseModel):
    """Body of GET /healthz."""

    status: str
    model_version: str


def model_version(checkpoint: str | Path) -> str:
    """Identifier of the served model: de3bert version + the first 12 hex digits of the weights' SHA-256
    (an export's: of its graphs)."""
    return f"de3bert-{version('de3bert')}+{weights_digest(checkpoint)[:12]}"


def served_criteria(model: EarlyExitModel | OnnxEarlyExitModel) -> tuple[str, ...]:
    """The criteria a request may ask of this model."""
    return (*criteria_for(model), "full-depth")


def policy_for_speedup(calibration: list[dict], criterion: str, target: float) -> ExitPolicy:
    """The policy of a criterion for a target layer speed-up inside the calibrated range: the calibrated
    policy at a calibrated target, τ interpolated linearly between the two neighbouring targets."""
    rows = sorted((r for r in calibration if r.get("policy") == criterion and "threshold" in r),
                  key=lambda r: r["target_speedup"])
    if not rows:
        raise PolicyError(f"the checkpoint holds no calibrated thresholds for criterion '{criterion}'; "
                          "give a threshold instead of target_speedup")
    low, high = rows[0]["target_speedup"], rows[-1]["target_speedup"]
    if not low <= target <= high:
        raise PolicyError(f"target_speedup {target:g} is outside the range calibrated for criterion "
                          f"'{criterion}': {low:g}x to {high:g}x")
    upper = next(r for r in rows if r["target_speedup"] >= target)
    lower = rows[rows.index(upper) - 1] if upper["target_speedup"] > target else upper
    if lower is upper or lower["patience"] != upper["patience"]:
        # a patience count cannot be interpolated: take the calibrated point that reaches the target
        return ExitPolicy(criterion, upper["threshold"], upper["patience"], upper["lam"])
    share = (target - lower["target_speedup"]) / (upper["target_speedup"] - lower["target_speedup"])
    threshold = lower["threshold"] + share * (upper["threshold"] - lower["threshold"])
    return ExitPolicy(criterion, threshold, upper["patience"], upper["lam"])


def resolve_policy(model: EarlyExitModel | OnnxEarlyExitModel, default: ExitPolicy,
                   override: PolicyOverride | None) -> ExitPolicy:
    """The exit policy of one request: the served default, or the default with the request's changes."""
    if override is None or not override.model_dump(exclude_none=True):
        return default
    criterion = override.criterion or default.criterion
    allowed = served_criteria(model)
    if criterion not in CRITERIA:
        raise PolicyError(f"unknown criterion '{criterion}'; choose one of {', '.join(allowed)}")
    if criterion not in allowed:
        raise PolicyError(f"criterion '{criterion}' does not apply to this model; choose one of {', '.join(allowed)}")
    if override.target_speedup is not None:
        if any(value is not None for value in (override.threshold, override.patience, override.lam)):
            raise PolicyError("target_speedup picks threshold, patience and λ from the calibrated table; "
                              "give either target_speedup or threshold/patience/lam")
        return policy_for_speedup(model.config.calibration, criterion, override.target_speedup)
    base = default if criterion == default.criterion else ExitPolicy(criterion)
    return ExitPolicy(criterion,
                      base.threshold if override.threshold is None else override.threshold,
                      base.patience if override.patience is None else override.patience,
                      base.lam if override.lam is None else override.lam)


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


class BodyGuard:
    """ASGI middleware refusing request bodies over max_bytes (by Content-Length and by the bytes
    actually received, reading no further than the limit) and bodies that are not UTF-8."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        """Check the body, then hand the request on with the body replayed."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _error(413, f"request body of {declared.decode('latin-1')} bytes; the limit is "
                              f"{self.max_bytes}")(scope, receive, send)
            return
        chunks, received, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            more = message.get("more_body", False)
            if received > self.max_bytes:
                await _error(413, f"request body exceeds {self.max_bytes} bytes, the limit")(scope, receive, send)
                return
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            await _error(400, f"request body is not valid UTF-8 (byte {exc.start}); send JSON encoded as UTF-8")(
                scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def _describe(error: dict) -> str:
    """One pydantic/FastAPI validation error as `where: what`."""
    if error["type"] == "json_invalid":
        return f"body is not valid JSON ({error.get('ctx', {}).get('error', error['msg'])} at character {error['loc'][-1]})"
    if error["type"] == "missing" and tuple(error["loc"]) == ("body",):
        return 'the body is empty; send {"inputs": [{"text": "..."}]}'
    where = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
    return f"{where}: {error['msg']}"


def _check_limits(request: PredictRequest, settings: ServiceSettings) -> None:
    if len(request.inputs) > settings.max_inputs:
        raise DataError(f"{len(request.inputs)} inputs in one request; the limit is {settings.max_inputs}")
    if len({item.text_pair is None for item in request.inputs}) > 1:
        raise DataError("inputs mix single texts and text pairs; send one kind per request")
    for number, item in enumerate(request.inputs):
        for name, text in (("text", item.text), ("text_pair", item.text_pair)):
            if text is None:
                continue
            if not text.strip():
                raise DataError(f"inputs[{number}].{name} is empty")
            if len(text) > settings.max_chars:
                raise DataError(f"inputs[{number}].{name} has {len(text)} characters; "
                                        f"the limit is {settings.max_chars}")


def _answer(prediction: Prediction) -> PredictionOut:
    regression = prediction.probabilities is None
    return PredictionOut(label=None if regression else prediction.label, score=prediction.label if regression else None,
                         probabilities=prediction.probabilities, exit_layer=prediction.exit_layer,
                         indicator=prediction.indicator)


def create_app(settings: ServiceSettings) -> FastAPI:
    """The FastAPI app serving one checkpoint (the batching task starts with the app's lifespan)."""
    model = load_model(settings.checkpoint, settings.runtime, device=settings.device, precision=settings.precision)
    default = ExitPolicy(**model.config.policy) if model.config.policy else ExitPolicy("full-depth")
    engine = EarlyExitEngine(model, default, batch_size=settings.max_batch_size)
    batcher = MicroBatcher(engine, settings.max_batch_size, settings.max_wait_ms, settings.micro_batching)
    served_version = model_version(settings.checkpoint)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="de3bert", version=version("de3bert"), lifespan=lifespan,
                  description="Early-exit text classification (DE³-BERT) with micro-batching.")
    app.state.batcher = batcher
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        if "json" not in request.headers.get("content-type", ""):
            return _error(415, "send the body as JSON, with the header content-type: application/json")
        return _error(422, "invalid request: " + "; ".join(_describe(e) for e in exc.errors()))

    @app.exception_handler(De3bertError)
    async def refused(request: Request, exc: De3bertError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": exc.detail}, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error ({type(exc).__name__}); the service log has the details")

    @app.get("/healthz")
    async def healthz() -> Health:
        """Liveness: the model is loaded and the service answers."""
        return Health(status="ok", model_version=served_version)

    @app.get("/v1/model")
    async def describe() -> ModelInfo:
        """What is served: backbone, task, labels, layers, default policy and the calibrated speed-up table."""
        config = model.config
        return ModelInfo(
            model_version=served_version, backbone=config.backbone_name, task=config.task, labels=config.label_names,
            num_layers=model.num_layers, max_length=config.max_length, heads=asdict(config.heads), criteria=list(served_criteria(model)),
            policy=PolicyInfo(**asdict(default)), calibration=config.calibration,
            limits={"max_inputs": settings.max_inputs, "max_chars": settings.max_chars,
                    "max_body_bytes": settings.max_body_bytes},
            micro_batching={"enabled": settings.micro_batching, "max_batch_size": settings.max_batch_size,
                            "max_wait_ms": settings.max_wait_ms})

    @app.post("/v1/predict")
    async def predict(request: PredictRequest) -> PredictResponse:
        """Label (or score), class probabilities, exit layer and indicator for each input, in order."""
        started = time.perf_counter()
        _check_limits(request, settings)
        policy = resolve_policy(model, default, request.policy)
        predictions, batch_size = await batcher.predict(request.inputs, policy)
        logger.info("predict inputs=%d batch=%d latency_ms=%.1f policy=%s exit_layers=%s", len(predictions),
                    batch_size, 1000 * (time.perf_counter() - started), policy.criterion,
                    ",".join(str(p.exit_layer) for p in predictions))
        return PredictResponse(model_version=served_version, policy=PolicyInfo(**asdict(policy)),
                               predictions=[_answer(p) for p in predictions])

    return app


def app_from_environment() -> FastAPI:
    """App factory for uvicorn worker processes: the settings come from $DE3BERT_SERVE_SETTINGS (JSON)."""
    return create_app(ServiceSettings(**json.loads(os.environ[SETTINGS_ENV])))


def serve(settings: ServiceSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the service under uvicorn; each of `workers` processes loads the model and batches on its own."""
    import uvicorn

    if workers < 1:
        raise De3bertError(f"workers must be at least 1, got {workers}")
    # a bad folder or device fails here, once, with a clear message
    load_model(settings.checkpoint, settings.runtime, device=settings.device, precision=settings.precision)
    os.environ[SETTINGS_ENV] = json.dumps(asdict(settings))
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["de3bert"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    uvicorn.run("de3bert.serving:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_config=log_config)
