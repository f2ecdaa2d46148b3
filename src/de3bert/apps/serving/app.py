"""HTTP prediction service: a FastAPI app that merges concurrent requests into micro-batches and runs
them through the early-exit engine (rows that exit leave the batch layer by layer).

    de3bert serve runs/demo-sst2 --port 8000          # PyTorch
    de3bert serve runs/demo-sst2-onnx --port 8000     # an exported folder, on ONNX Runtime
    curl -s localhost:8000/v1/predict -H 'content-type: application/json' \\
         -d '{"inputs": [{"text": "a gripping, funny film"}]}'

`GET /` is a page to try the model in a browser (`page.html`; it uses only the JSON API), and `"explain": true`
adds to each answer the layers its input passed through, with their indicators.

One worker task per process collects requests into micro-batches (at most `max_batch_size` inputs,
no request waiting more than `max_wait_ms` for company) and hands each batch to a single engine
thread, one engine call per exit policy, so the event loop stays free to accept requests.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from de3bert.apps.runtimes import load_model, weights_digest
from de3bert.apps.serving.batching import MicroBatcher
from de3bert.apps.serving.calibration import calibrate_on_start
from de3bert.apps.serving.metrics import install_metrics, service_metrics
from de3bert.apps.serving.schemas import (ExplanationOut, Health, LayerOut, ModelInfo, PolicyInfo, PolicyOverride,
                                          PredictionOut, PredictRequest, PredictResponse)
from de3bert.apps.serving.settings import ServiceSettings
from de3bert.data import recorded_columns
from de3bert.errors import DataError, De3bertError, PolicyError
from de3bert.exits.calibration import policy_for_speedup
from de3bert.exits.criteria import CRITERIA, FULL_DEPTH, criterion_label
from de3bert.exits.engine import EarlyExitEngine, Prediction
from de3bert.exits.explain import Explanation, IndicatorReading, indicator_reading
from de3bert.exits.policies import ExitPolicy
from de3bert.exits.runners import ExitRunner, check_criterion, runner_criteria

logger = logging.getLogger("de3bert.serving")
SETTINGS_ENV = "DE3BERT_SERVE_SETTINGS"


def model_version(checkpoint: str | Path) -> str:
    """Identifier of the served model: de3bert version + the first 12 hex digits of the weights' SHA-256
    (an export's: of its graphs)."""
    return f"de3bert-{version('de3bert')}+{weights_digest(checkpoint)[:12]}"


def served_criteria(model: ExitRunner) -> tuple[str, ...]:
    """The criteria a request may ask of this model (full depth included; an export: the one fixed in its graph)."""
    return runner_criteria(model)


def resolve_policy(model: ExitRunner, default: ExitPolicy,
                   override: PolicyOverride | None) -> ExitPolicy:
    """The exit policy of one request: the served default, or the default with the request's changes."""
    if override is None or not override.model_dump(exclude_none=True):
        return default
    criterion = override.criterion or default.criterion
    allowed = served_criteria(model)
    if criterion not in CRITERIA:
        raise PolicyError(f"unknown criterion '{criterion}'; choose one of {', '.join(allowed)}")
    check_criterion(model, criterion)
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


def _explained(answer: PredictionOut, explanation: Explanation, reading: IndicatorReading) -> PredictionOut:
    """The answer with the layers its input passed through, 1 to the engine's exit layer. The every-head pass that
    computed them (`explain_exits`) decides with the same policy code; where its exit differs from the engine's
    (an indicator within rounding of τ: the two passes batch the input differently) this is logged, and the layers
    shown are still those the engine ran."""
    if explanation.exit_layer != answer.exit_layer:
        logger.warning("explain: the every-head pass exits at layer %d, the engine at layer %d",
                       explanation.exit_layer, answer.exit_layer)
    regression = answer.probabilities is None
    layers = [LayerOut(layer=trace.layer, label=None if regression else trace.label,
                       score=trace.label if regression else None, probabilities=trace.probabilities,
                       indicator=trace.indicator, streak=trace.streak)
              for trace in explanation.layers[:answer.exit_layer]]
    return answer.model_copy(update={"explain": ExplanationOut(**asdict(reading), layers=layers)})


def page_html() -> str:
    """The page that tries the served model (`GET /`): one self-contained HTML file shipped in the package."""
    return files("de3bert.apps.serving").joinpath("page.html").read_text(encoding="utf-8")


# The page loads nothing from elsewhere and talks only to this service; the browser enforces both.
PAGE_HEADERS = {"content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; img-src data:; connect-src 'self'; "
                                           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                "x-content-type-options": "nosniff"}


def create_app(settings: ServiceSettings) -> FastAPI:
    """The FastAPI app serving one checkpoint (the batching task starts with the app's lifespan)."""
    model = load_model(settings.checkpoint, settings.runtime, device=settings.device, precision=settings.precision)
    if settings.calibrate_from is not None:
        model.config = calibrate_on_start(model, settings)
    default = ExitPolicy(**model.config.policy) if model.config.policy else ExitPolicy(FULL_DEPTH)
    engine = EarlyExitEngine(model, default, batch_size=settings.max_batch_size)
    batcher = MicroBatcher(engine, settings.max_batch_size, settings.max_wait_ms, settings.micro_batching)
    served_version = model_version(settings.checkpoint)
    text_pairs = recorded_columns(model.config.training, model.config.task).text_pair is not None
    page = page_html()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="de3bert", version=version("de3bert"), lifespan=lifespan,
                  description="Early-exit text classification (DE³-BERT) with micro-batching.")
    app.state.batcher = batcher
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes)
    metrics = service_metrics(model, default, served_version, settings)

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
            text_pairs=text_pairs,
            num_layers=model.num_layers, max_length=config.max_length, heads=asdict(config.heads),
            criteria=list(served_criteria(model)),
            criterion_labels={c: criterion_label(c, config.training.get("recipe")) for c in served_criteria(model)},
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
        metrics.observe_predictions(predictions, policy == default)
        logger.info("predict inputs=%d batch=%d latency_ms=%.1f policy=%s exit_layers=%s", len(predictions),
                    batch_size, 1000 * (time.perf_counter() - started), policy.criterion,
                    ",".join(str(p.exit_layer) for p in predictions))
        answers = [_answer(p) for p in predictions]
        if request.explain:
            reading = indicator_reading(policy)
            explanations = await batcher.explain(request.inputs, policy)
            answers = [_explained(a, e, reading) for a, e in zip(answers, explanations)]
        return PredictResponse(model_version=served_version, policy=PolicyInfo(**asdict(policy)), predictions=answers)

    @app.get("/", include_in_schema=False)
    async def try_the_model() -> HTMLResponse:
        """A page to try the model and see where each input exits (it reads /v1/model and posts to /v1/predict)."""
        return HTMLResponse(page, headers=PAGE_HEADERS)

    install_metrics(app, metrics)
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
    uvicorn.run("de3bert.apps.serving.app:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_config=log_config)
