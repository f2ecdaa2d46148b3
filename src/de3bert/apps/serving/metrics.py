"""What the service delivers, in the Prometheus text format: `GET /metrics`.

    de3bert_requests_total{endpoint,status}      HTTP requests answered
    de3bert_request_seconds{endpoint}            latency histogram (request in to answer out, body read included)
    de3bert_inputs_total{policy}                 inputs answered: by the served default policy or a request's own
    de3bert_exit_layer{policy}                   histogram of the layer each input left at (buckets 1..M)
    de3bert_errors_total{kind}                   refused or failed requests by kind (invalid_request, policy, data,
                                                 content_type, body_too_large, bad_request, not_found, internal, ...)
    de3bert_delivered_speedup                    layer speed-up M·N / Σ m_i of the last `speedup_window` inputs the
                                                 default policy served (NaN before the first)
    de3bert_delivered_window_inputs              how many inputs that window holds
    de3bert_calibrated_speedup{kind}             what the default policy was calibrated to: kind="target" and the
                                                 speed-up it gave on its calibration inputs, kind="measured"
    de3bert_speedup_band                         the relative band around the measured one (`speedup_band`)
    de3bert_speedup_drift                        1 while a full window's speed-up lies outside the band, else 0
    de3bert_drift_warnings_total                 times it left the band (each logged once, as a warning)
    de3bert_model_info{model_version,criterion,threshold,patience,calibrated_on}

Each app has a registry of its own (several apps in one process, as tests make them, do not collide). With
`--workers N` every worker process counts its own requests: scrape each, or serve with one worker.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from starlette.exceptions import HTTPException
from starlette.responses import Response

from de3bert.apps.serving.settings import ServiceSettings
from de3bert.errors import DataError, De3bertError, PolicyError
from de3bert.exits.calibration import default_promise
from de3bert.exits.engine import Prediction
from de3bert.exits.policies import ExitPolicy
from de3bert.exits.runners import ExitRunner

logger = logging.getLogger("de3bert.serving")
STATUS_KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
                415: "content_type", 422: "invalid_request", 500: "internal"}
"""The kind of a refused request by its status, where no handler said more (BodyGuard's refusals, for one)."""


def error_kind(exc: Exception, status: int) -> str:
    """The kind of error a handled exception was answered with."""
    if isinstance(exc, PolicyError):
        return "policy"
    if isinstance(exc, DataError):
        return "data"
    if isinstance(exc, De3bertError):
        return "refused"
    return STATUS_KINDS.get(status, f"http_{status}")


class ServiceMetrics:
    """The service's Prometheus metrics in a registry of their own, and the drift check of the delivered speed-up.

    num_layers: M. promise: what the default policy was calibrated to deliver (`exits.calibration.default_promise`),
    or None. window: inputs of the default policy over which the delivered speed-up is measured. band: relative
    band around the promise's measured speed-up; a full window outside it is drift.
    """

    def __init__(self, num_layers: int, promise: dict | None, window: int, band: float, info: dict[str, str]):
        self.registry = registry = CollectorRegistry()
        self.num_layers, self.promise, self.band = num_layers, promise, band
        self.requests = Counter("de3bert_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.latency = Histogram("de3bert_request_seconds", "time from a request's arrival to its answer, by endpoint",
                                 ["endpoint"], registry=registry)
        self.inputs = Counter("de3bert_inputs", "inputs answered, by policy: the served default or the request's own",
                              ["policy"], registry=registry)
        self.exit_layer = Histogram("de3bert_exit_layer", "layer each input left the model at, by policy", ["policy"],
                                    buckets=tuple(range(1, num_layers + 1)), registry=registry)
        self.errors = Counter("de3bert_errors", "refused or failed requests, by kind", ["kind"], registry=registry)
        self.delivered = Gauge("de3bert_delivered_speedup", "layer speed-up M·N/Σm of the last inputs the default "
                               "policy served (de3bert_delivered_window_inputs of them)", registry=registry)
        self.window_inputs = Gauge("de3bert_delivered_window_inputs", "inputs in the window of the delivered speed-up",
                                   registry=registry)
        calibrated = Gauge("de3bert_calibrated_speedup", "what the default policy was calibrated to: the target "
                           "(kind=target) and the speed-up it gave on its calibration inputs (kind=measured)",
                           ["kind"], registry=registry)
        Gauge("de3bert_speedup_band", "relative band around the calibrated (measured) speed-up; outside it is drift",
              registry=registry).set(band)
        self.drift = Gauge("de3bert_speedup_drift", "1 while the delivered speed-up of a full window lies outside the "
                           "band around the calibrated one, else 0", registry=registry)
        self.drift_warnings = Counter("de3bert_drift_warnings", "times the delivered speed-up left the band",
                                      registry=registry)
        Info("de3bert_model", "the served model and default policy", registry=registry).info(info)
        calibrated.labels("target").set(promise["target_speedup"] if promise else math.nan)
        calibrated.labels("measured").set(promise["speedup"] if promise else math.nan)
        self.delivered.set(math.nan)
        self.window: deque[int] = deque(maxlen=window)
        self.drifting = False

    def observe_response(self, endpoint: str, status: int, seconds: float, kind: str | None) -> None:
        """Count one answered HTTP request (and its error, for a status of 400 or more)."""
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(kind or STATUS_KINDS.get(status, f"http_{status}")).inc()

    def observe_predictions(self, predictions: list[Prediction], default: bool) -> None:
        """Count one request's answered inputs and their exit layers; those of the default policy enter the window
        of the delivered speed-up, which is then checked against the band."""
        policy = "default" if default else "request"
        self.inputs.labels(policy).inc(len(predictions))
        histogram = self.exit_layer.labels(policy)
        for prediction in predictions:
            histogram.observe(prediction.exit_layer)
        if not default:
            return
        self.window.extend(p.exit_layer for p in predictions)
        delivered = self.num_layers * len(self.window) / sum(self.window)
        self.delivered.set(delivered)
        self.window_inputs.set(len(self.window))
        if self.promise and len(self.window) == self.window.maxlen:
            self._check_drift(delivered)

    def _check_drift(self, delivered: float) -> None:
        """Log, once per excursion, a delivered speed-up leaving the band around the calibrated one, and its return."""
        calibrated = self.promise["speedup"]
        outside = abs(delivered / calibrated - 1.0) > self.band
        if outside and not self.drifting:
            self.drift_warnings.inc()
            logger.warning(
                "drift: the default policy delivered a layer speed-up of %.2fx over the last %d inputs, %+.0f%% from "
                "the %.2fx it was calibrated to on %s (band ±%.0f%%); the traffic differs from the calibration inputs: "
                "recalibrate on recent traffic (de3bert calibrate FOLDER --input recent.csv, or serve "
                "--calibrate-from recent.csv)", delivered, len(self.window), 100 * (delivered / calibrated - 1),
                calibrated, self.promise.get("inputs", "its calibration inputs"), 100 * self.band)
        elif not outside and self.drifting:
            logger.info("drift over: the delivered layer speed-up %.2fx is back within ±%.0f%% of %.2fx", delivered,
                        100 * self.band, calibrated)
        self.drifting = outside
        self.drift.set(1.0 if outside else 0.0)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware that times and counts every HTTP request by endpoint (a route of the app, else "other") and
    status, with the error kind the exception handlers tagged (`install_metrics`)."""

    def __init__(self, app, metrics: ServiceMetrics, routes: FastAPI):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        """Pass the request on, watching the status it is answered with."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        state = scope.setdefault("state", {})

        async def watched(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            status = 500  # answered by the outermost handler, after this middleware
            raise
        finally:
            known = {getattr(route, "path", None) for route in self.routes.routes}
            self.metrics.observe_response(scope["path"] if scope["path"] in known else "other", status,
                                          time.perf_counter() - started, state.get("error_kind"))


def _tagged(handler):
    """An exception handler that records the kind of error it answers for the metrics middleware."""
    async def handle(request: Request, exc: Exception) -> Response:
        response = await handler(request, exc)
        request.state.error_kind = error_kind(exc, response.status_code)
        return response
    return handle


def install_metrics(app: FastAPI, metrics: ServiceMetrics) -> None:
    """Serve `metrics` at GET /metrics, count every request (outermost middleware), and have the app's handlers of
    refused requests tag their kind."""
    app.state.metrics = metrics
    for exception in (RequestValidationError, De3bertError, HTTPException):
        if exception in app.exception_handlers:
            app.exception_handlers[exception] = _tagged(app.exception_handlers[exception])
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        """The service's metrics in the Prometheus text format."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def service_metrics(model: ExitRunner, default: ExitPolicy, model_version: str,
                    settings: ServiceSettings) -> ServiceMetrics:
    """The metrics of a service serving `model` with the default policy `default`: what that policy was calibrated
    to deliver (nothing when it is not the checkpoint's own calibrated one) and the window and band of the settings."""
    config = model.config
    promise = default_promise(config) if config.policy and ExitPolicy(**config.policy) == default else None
    info = {"model_version": model_version, "criterion": default.criterion, "threshold": f"{default.threshold:.6g}",
            "patience": str(default.patience), "calibrated_on": promise.get("inputs", "") if promise else ""}
    return ServiceMetrics(model.num_layers, promise, settings.speedup_window, settings.speedup_band, info)
