"""HTTP prediction service: a FastAPI app that merges concurrent requests into micro-batches and runs
them through the early-exit engine (rows that exit leave the batch layer by layer).

    de3bert serve runs/sst2 --port 8000
    curl -s localhost:8000/v1/predict -H 'content-type: application/json' \\
         -d '{"inputs": [{"text": "a gripping, funny film"}]}'
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from de3bert.data import Example
from de3bert.engine import EarlyExitEngine, Prediction
from de3bert.errors import De3bertError, PolicyError
from de3bert.modeling import WEIGHTS_NAME, EarlyExitModel
from de3bert.policies import CRITERIA, ExitPolicy

logger = logging.getLogger("de3bert.serving")
SETTINGS_ENV = "DE3BERT_SERVE_SETTINGS"


@dataclass
class ServiceSettings:
    """Limits and micro-batching knobs of the service."""

    checkpoint: str
    """Checkpoint folder to serve."""
    max_batch_size: int = 32
    """Most inputs merged into one engine call."""
    max_wait_ms: float = 2.0
    """Longest a request waits for others to join its micro-batch."""
    micro_batching: bool = True
    """Merge concurrent requests (False: one request per engine call, for comparison)."""
    max_inputs: int = 64
    """Most inputs in one request."""
    max_chars: int = 5000
    """Most characters in one text."""
    max_body_bytes: int = 1_000_000
    """Largest request body accepted."""


class TextInput(BaseModel):
    """One input: a text, or a text pair for pair tasks."""

    model_config = ConfigDict(extra="forbid")
    text: str
    text_pair: str | None = None


class PolicyOverride(BaseModel):
    """Per-request exit policy: a criterion with threshold/patience/λ, or a target layer speed-up."""

    model_config = ConfigDict(extra="forbid")
    criterion: str | None = None
    threshold: float | None = None
    patience: int | None = None
    lam: float | None = None
    target_speedup: float | None = None


class PredictRequest(BaseModel):
    """Body of POST /v1/predict."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[TextInput] = Field(min_length=1)
    policy: PolicyOverride | None = None


class PredictionOut(BaseModel):
    """One input's answer."""

    label: str | None
    score: float | None
    probabilities: dict[str, float] | None
    exit_layer: int
    indicator: float


class PredictResponse(BaseModel):
    """Body of a successful POST /v1/predict."""

    model_version: str
    policy: dict
    predictions: list[PredictionOut]


class ServiceError(De3bertError):
    """A request the service refuses, with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def model_version(checkpoint: str | Path) -> str:
    """Identifier of the served weights: de3bert version + the first 12 hex digits of their SHA-256."""
    digest = hashlib.sha256()
    with open(Path(checkpoint) / WEIGHTS_NAME, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"de3bert-{version('de3bert')}+{digest.hexdigest()[:12]}"


def resolve_policy(model: EarlyExitModel, default: ExitPolicy, override: PolicyOverride | None) -> ExitPolicy:
    """The exit policy of a request: the served default, an explicit criterion/threshold, or the
    threshold interpolated from the checkpoint's calibration table for a target speed-up."""
    if override is None or not override.model_dump(exclude_none=True):
        return default
    criterion = override.criterion or default.criterion
    if criterion not in CRITERIA:
        raise ServiceError(422, f"unknown criterion '{criterion}'; choose one of {', '.join(CRITERIA)}")
    if override.target_speedup is not None:
        if override.threshold is not None:
            raise ServiceError(422, "give either threshold or target_speedup, not both")
        return _policy_for_speedup(model, criterion, override.target_speedup)
    base = default if criterion == default.criterion else ExitPolicy(criterion, patience=default.patience, lam=default.lam)
    try:
        policy = ExitPolicy(criterion, override.threshold if override.threshold is not None else base.threshold,
                            override.patience or base.patience, override.lam or base.lam)
    except PolicyError as exc:
        raise ServiceError(422, str(exc)) from exc
    if policy.needs_prototypes and not model.heads[0].has_prototypes:
        raise ServiceError(422, f"criterion '{criterion}' needs prototypes, which this model does not have")
    return policy


def _policy_for_speedup(model: EarlyExitModel, criterion: str, target: float) -> ExitPolicy:
    rows = sorted((r for r in model.config.calibration if r.get("policy") == criterion and "threshold" in r),
                  key=lambda r: r["target_speedup"])
    if not rows:
        raise ServiceError(422, f"the checkpoint has no calibration for criterion '{criterion}'")
    low, high = rows[0]["target_speedup"], rows[-1]["target_speedup"]
    if not low <= target <= high:
        raise ServiceError(422, f"target_speedup {target:g} is outside the calibrated range {low:g}x to {high:g}x "
                                f"for criterion '{criterion}'")
    below = max((r for r in rows if r["target_speedup"] <= target), key=lambda r: r["target_speedup"])
    above = min((r for r in rows if r["target_speedup"] >= target), key=lambda r: r["target_speedup"])
    share = 0.0 if above is below else (target - below["target_speedup"]) / (above["target_speedup"] - below["target_speedup"])
    # patience counts are not interpolated: the calibrated point at or beyond the target is taken
    reference = above if share > 0 else below
    threshold = below["threshold"] + share * (above["threshold"] - below["threshold"])
    if below["patience"] != above["patience"]:
        threshold = reference["threshold"]
    return ExitPolicy(criterion, threshold, reference["patience"], reference.get("lam", 1.0))


class MicroBatcher:
    """Merges concurrent requests into engine calls of at most max_batch_size inputs, waiting at most
    max_wait_ms for company; one worker thread runs the engine so the event loop stays free."""

    def __init__(self, engine: EarlyExitEngine, max_batch_size: int, max_wait_ms: float, enabled: bool = True):
        self.engine = engine
        self.max_batch_size = max_batch_size if enabled else 1
        self.max_wait = max_wait_ms / 1000 if enabled else 0.0
        self.batch_sizes: list[int] = []
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="de3bert-engine")

    async def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop the loop and the engine thread."""
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False)

    async def predict(self, inputs: list[TextInput], policy: ExitPolicy) -> tuple[list[Prediction], int]:
        """Predictions for one request's inputs, and the size of the micro-batch that served it."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((inputs, policy, future))
        return await future

    async def _loop(self) -> None:
        while True:
            pending = [await self._queue.get()]
            size = len(pending[0][0])
            deadline = asyncio.get_running_loop().time() + self.max_wait
            while size < self.max_batch_size:
                remaining = deadline - asyncio.get_running_loop().time()
                try:
                    item = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(),
                                                                                                   remaining)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                pending.append(item)
                size += len(item[0])
            self.batch_sizes.append(size)
            try:
                results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, pending)
            except Exception as exc:  # the request fails, the service carries on
                for _, _, future in pending:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), predictions in zip(pending, results):
                if not future.done():
                    future.set_result((predictions, size))

    def _run(self, pending: list) -> list[list[Prediction]]:
        """Engine calls for a micro-batch: one per (policy, single text or pair) group, answers per request."""
        groups: dict[tuple, list[int]] = {}
        for index, (inputs, policy, _) in enumerate(pending):
            key = (tuple(asdict(policy).items()), inputs[0].text_pair is not None)
            groups.setdefault(key, []).append(index)
        answers: list[list[Prediction]] = [[] for _ in pending]
        for (_, is_pair), members in groups.items():
            texts = [i.text for m in members for i in pending[m][0]]
            pairs = [i.text_pair for m in members for i in pending[m][0]] if is_pair else None
            predictions = iter(self.engine.predict(texts, pairs, pending[members[0]][1]))
            for m in members:
                answers[m] = [next(predictions) for _ in pending[m][0]]
        return answers


def _validate(request: PredictRequest, settings: ServiceSettings) -> None:
    if len(request.inputs) > settings.max_inputs:
        raise ServiceError(422, f"{len(request.inputs)} inputs in one request; the limit is {settings.max_inputs}")
    kinds = {i.text_pair is None for i in request.inputs}
    if len(kinds) > 1:
        raise ServiceError(422, "inputs mix single texts and text pairs; send one kind per request")
    for number, item in enumerate(request.inputs):
        for field, text in (("text", item.text), ("text_pair", item.text_pair)):
            if text is None:
                continue
            if not text.strip():
                raise ServiceError(422, f"inputs[{number}].{field} is empty")
            if len(text) > settings.max_chars:
                raise ServiceError(422, f"inputs[{number}].{field} has {len(text)} characters; "
                                        f"the limit is {settings.max_chars}")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def create_app(settings: ServiceSettings) -> FastAPI:
    """The FastAPI app serving one checkpoint."""
    model = EarlyExitModel.from_pretrained(settings.checkpoint)
    default = ExitPolicy(**model.config.policy) if model.config.policy else ExitPolicy("full-depth")
    engine = EarlyExitEngine(model, default, batch_size=settings.max_batch_size)
    batcher = MicroBatcher(engine, settings.max_batch_size, settings.max_wait_ms, settings.micro_batching)
    served_version = model_version(settings.checkpoint)

    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="de3bert", version=version("de3bert"), lifespan=lifespan,
                  description="Early-exit text classification (DE³-BERT).")
    app.state.batcher = batcher

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return _error(413, f"request body of {length} bytes; the limit is {settings.max_body_bytes}")
        if request.method == "POST":
            body = await request.body()
            if len(body) > settings.max_body_bytes:
                return _error(413, f"request body of {len(body)} bytes; the limit is {settings.max_body_bytes}")
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:
                return _error(400, f"request body is not valid UTF-8 (byte {exc.start})")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                             for e in exc.errors())
        return _error(422, f"invalid request: {problems}")

    @app.exception_handler(ServiceError)
    async def refused(request: Request, exc: ServiceError):
        return _error(exc.status, str(exc))

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the model is loaded and the batching loop runs."""
        return {"status": "ok", "model_version": served_version}

    @app.get("/v1/model")
    async def describe() -> dict:
        """What is served: backbone, task, labels, layers, default policy and the calibrated speed-up table."""
        config = model.config
        return {"model_version": served_version, "backbone": config.backbone_name, "task": config.task,
                "labels": config.labels, "num_layers": model.num_layers, "max_length": config.max_length,
                "heads": asdict(config.heads), "policy": asdict(default), "calibration": config.calibration,
                "limits": {"max_inputs": settings.max_inputs, "max_chars": settings.max_chars,
                           "max_body_bytes": settings.max_body_bytes}}

    @app.post("/v1/predict", response_model=PredictResponse)
    async def predict(request: PredictRequest) -> PredictResponse:
        """Label (or score), probabilities, exit layer and indicator for each input."""
        started = time.perf_counter()
        _validate(request, settings)
        policy = resolve_policy(model, default, request.policy)
        try:
            predictions, batch_size = await batcher.predict(request.inputs, policy)
        except De3bertError as exc:
            raise ServiceError(422, str(exc)) from exc
        layers = [p.exit_layer for p in predictions]
        logger.info("predict inputs=%d batch=%d latency_ms=%.1f exit_layers=%s", len(predictions), batch_size,
                    1000 * (time.perf_counter() - started), ",".join(map(str, layers)))
        return PredictResponse(model_version=served_version, policy=asdict(policy), predictions=[
            PredictionOut(label=None if isinstance(p.label, float) else p.label,
                          score=p.label if isinstance(p.label, float) else None, probabilities=p.probabilities,
                          exit_layer=p.exit_layer, indicator=p.indicator) for p in predictions])

    return app


def app_from_environment() -> FastAPI:
    """App factory for uvicorn workers: settings come from $DE3BERT_SERVE_SETTINGS (JSON)."""
    return create_app(ServiceSettings(**json.loads(os.environ[SETTINGS_ENV])))


def serve(settings: ServiceSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the service under uvicorn (each worker process loads the model once)."""
    import uvicorn

    EarlyExitModel.from_pretrained(settings.checkpoint)  # fail here, with a clear message, not in every worker
    os.environ[SETTINGS_ENV] = json.dumps(asdict(settings))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run("de3bert.serving:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level="info")
