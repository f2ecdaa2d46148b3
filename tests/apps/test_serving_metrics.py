"""GET /metrics through the real app: counters equal what was sent and answered, the delivered speed-up next to the
calibrated one, errors by kind, the drift warning, --calibrate-from, and a load test against uvicorn."""

import logging
import math
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from de3bert.apps.calibrate import calibrate_model, default_targets, read_inputs
from de3bert.apps.runtimes import load_model
from de3bert.apps.serving.app import create_app
from de3bert.apps.serving.settings import ServiceSettings
from de3bert.errors import De3bertError
from de3bert.exits.policies import ExitPolicy
from tests.conftest import NEGATIVE, POSITIVE, tiny_model

WORDS = POSITIVE + NEGATIVE + ["the", "film", "plot", "was", "rather", "not", "very", "a", "story", "of", "ending"]
PROMISE = {"criterion": "entropy", "target_speedup": 2.0, "speedup": 2.0, "speedup_low": 1.9, "speedup_high": 2.1,
           "examples": 500, "inputs": "traffic.csv"}


def texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, 12))) for _ in range(count)]


def save_checkpoint(folder, tokenizer, threshold: float, promise: dict | None = PROMISE):
    """A tiny random 4-layer checkpoint with confident-enough heads, an entropy default policy and its promise."""
    model = tiny_model(tokenizer=tokenizer)
    for head in model.heads:
        head.classifier.weight.data *= 300
    model.config.policy = ExitPolicy("entropy", threshold=threshold).to_dict()
    model.config.calibrated_speedup = dict(promise or {})
    return model.save_pretrained(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    return save_checkpoint(tmp_path_factory.mktemp("metrics") / "ckpt", tokenizer, threshold=0.5)


def samples(text: str) -> dict[tuple, float]:
    """(sample name, sorted label items) -> value of a Prometheus text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def predict(client, inputs, **extra):
    return client.post("/v1/predict", json={"inputs": [{"text": t} for t in inputs], **extra})


def test_metrics_count_what_was_served_and_refused(checkpoint):
    settings = ServiceSettings(str(checkpoint), max_inputs=8, max_body_bytes=4000, speedup_window=1000)
    default_layers, request_layers = [], []
    with TestClient(create_app(settings)) as client:
        for count in (1, 3, 5):
            answer = predict(client, texts(count, seed=count))
            assert answer.status_code == 200
            default_layers += [p["exit_layer"] for p in answer.json()["predictions"]]
        answer = predict(client, texts(2), policy={"criterion": "full-depth"})
        request_layers += [p["exit_layer"] for p in answer.json()["predictions"]]
        assert predict(client, texts(1), policy={"threshold": 2.0}).status_code == 422  # policy
        assert predict(client, texts(9)).status_code == 422  # data: more inputs than the limit
        assert client.post("/v1/predict", json={"inputs": []}).status_code == 422  # invalid request
        assert client.post("/v1/predict", content="x", headers={"content-type": "text/plain"}).status_code == 415
        assert client.post("/v1/predict", content=b"{" + b" " * 5000 + b"}",
                           headers={"content-type": "application/json"}).status_code == 413
        assert client.get("/nowhere").status_code == 404
        assert client.get("/healthz").status_code == 200
        response = client.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        metrics = samples(response.text)
    assert value(metrics, "de3bert_requests_total", endpoint="/v1/predict", status="200") == 4
    assert value(metrics, "de3bert_requests_total", endpoint="/v1/predict", status="422") == 3
    assert value(metrics, "de3bert_requests_total", endpoint="/v1/predict", status="415") == 1
    assert value(metrics, "de3bert_requests_total", endpoint="/v1/predict", status="413") == 1
    assert value(metrics, "de3bert_requests_total", endpoint="other", status="404") == 1
    assert value(metrics, "de3bert_requests_total", endpoint="/healthz", status="200") == 1
    assert value(metrics, "de3bert_request_seconds_count", endpoint="/v1/predict") == 9
    assert value(metrics, "de3bert_inputs_total", policy="default") == 9
    assert value(metrics, "de3bert_inputs_total", policy="request") == 2
    for policy, layers in (("default", default_layers), ("request", request_layers)):
        assert value(metrics, "de3bert_exit_layer_count", policy=policy) == len(layers)
        assert value(metrics, "de3bert_exit_layer_sum", policy=policy) == sum(layers)
        for bucket in range(1, 5):
            assert value(metrics, "de3bert_exit_layer_bucket", policy=policy, le=f"{bucket:.1f}") == \
                sum(layer <= bucket for layer in layers)
    assert request_layers == [4, 4]
    errors = {kind: value(metrics, "de3bert_errors_total", kind=kind)
              for kind in ("policy", "data", "invalid_request", "content_type", "body_too_large", "not_found")}
    assert errors == dict.fromkeys(errors, 1.0)
    assert value(metrics, "de3bert_delivered_speedup") == pytest.approx(4 * 9 / sum(default_layers))
    assert value(metrics, "de3bert_delivered_window_inputs") == 9
    assert value(metrics, "de3bert_calibrated_speedup", kind="target") == 2.0
    assert value(metrics, "de3bert_calibrated_speedup", kind="measured") == 2.0
    assert value(metrics, "de3bert_speedup_band") == 0.1 and value(metrics, "de3bert_speedup_drift") == 0
    info = next(labels for (name, labels) in metrics if name == "de3bert_model_info")
    assert dict(info)["criterion"] == "entropy" and dict(info)["calibrated_on"] == "traffic.csv"


def test_each_app_counts_its_own_requests(checkpoint):
    with TestClient(create_app(ServiceSettings(str(checkpoint)))) as first, \
            TestClient(create_app(ServiceSettings(str(checkpoint)))) as second:
        predict(first, texts(2))
        assert value(samples(first.get("/metrics").text), "de3bert_inputs_total", policy="default") == 2
        assert value(samples(second.get("/metrics").text), "de3bert_inputs_total", policy="default") == 0


def test_the_window_keeps_the_last_inputs_and_no_promise_means_nan(tmp_path, tokenizer):
    folder = save_checkpoint(tmp_path / "ckpt", tokenizer, threshold=0.5, promise=None)
    with TestClient(create_app(ServiceSettings(str(folder), speedup_window=4))) as client:
        metrics = samples(client.get("/metrics").text)
        assert math.isnan(value(metrics, "de3bert_delivered_speedup"))
        assert math.isnan(value(metrics, "de3bert_calibrated_speedup", kind="target"))
        layers = [p["exit_layer"] for p in predict(client, texts(6, seed=3)).json()["predictions"]]
        metrics = samples(client.get("/metrics").text)
    assert value(metrics, "de3bert_delivered_window_inputs") == 4
    assert value(metrics, "de3bert_delivered_speedup") == pytest.approx(4 * 4 / sum(layers[-4:]))
    assert value(metrics, "de3bert_speedup_drift") == 0  # nothing to drift from


def test_drift_out_of_the_band_is_logged_once_and_its_end_too(tmp_path, tokenizer, caplog):
    # τ = 0 never exits early: every input runs 4 layers, 1x against the 2x the policy was calibrated to
    folder = save_checkpoint(tmp_path / "ckpt", tokenizer, threshold=0.0)
    settings = ServiceSettings(str(folder), speedup_window=5, speedup_band=0.2)
    with caplog.at_level(logging.INFO, logger="de3bert.serving"), TestClient(create_app(settings)) as client:
        predict(client, texts(4))
        assert "drift" not in caplog.text  # the window is not full yet
        for _ in range(3):
            predict(client, texts(2))
        metrics = samples(client.get("/metrics").text)
        assert value(metrics, "de3bert_speedup_drift") == 1 and value(metrics, "de3bert_drift_warnings_total") == 1
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert ("delivered a layer speed-up of 1.00x over the last 5 inputs, -50% from the 2.00x it was calibrated to "
                "on traffic.csv (band ±20%)") in warnings[0].getMessage()
        assert "recalibrate on recent traffic" in warnings[0].getMessage()
        client.app.state.metrics.promise = dict(PROMISE, speedup=1.05)  # as if recalibrated to what it delivers
        predict(client, texts(1))
        assert "drift over: the delivered layer speed-up 1.00x is back within ±20% of 1.05x" in caplog.text
        assert value(samples(client.get("/metrics").text), "de3bert_speedup_drift") == 0


def test_requests_with_their_own_policy_do_not_move_the_delivered_speedup(checkpoint):
    with TestClient(create_app(ServiceSettings(str(checkpoint)))) as client:
        predict(client, texts(3), policy={"criterion": "full-depth"})
        metrics = samples(client.get("/metrics").text)
    assert value(metrics, "de3bert_delivered_window_inputs") == 0 and value(metrics, "de3bert_inputs_total",
                                                                            policy="request") == 3


def test_calibrate_from_calibrates_the_served_policy_without_writing_the_folder(checkpoint, tmp_path):
    traffic = tmp_path / "recent.csv"
    traffic.write_text("text\n" + "\n".join(texts(200, seed=9)) + "\n")
    before = (checkpoint / "config.json").read_bytes()
    settings = ServiceSettings(str(checkpoint), calibrate_from=str(traffic), calibrate_speedup=1.5)
    model = load_model(checkpoint)
    expected = calibrate_model(model, read_inputs(model.config, traffic), "recent.csv",
                               default_targets(model.config, 1.5)).default
    with TestClient(create_app(settings)) as client:
        body = client.get("/v1/model").json()
        metrics = samples(client.get("/metrics").text)
    assert body["policy"]["threshold"] == pytest.approx(expected["threshold"]) and body["policy"]["criterion"] == "entropy"
    rows = [row for row in body["calibration"] if row.get("inputs") == "recent.csv"]
    assert [row["target_speedup"] for row in rows] == [1.5, 2.0, 3.0]
    assert value(metrics, "de3bert_calibrated_speedup", kind="target") == 1.5
    assert value(metrics, "de3bert_calibrated_speedup", kind="measured") == pytest.approx(expected["speedup"])
    assert (checkpoint / "config.json").read_bytes() == before
    with pytest.raises(De3bertError, match="missing.csv: file not found"):
        create_app(ServiceSettings(str(checkpoint), calibrate_from=str(tmp_path / "missing.csv")))


def test_settings_refuse_an_empty_window_or_band(checkpoint):
    with pytest.raises(De3bertError, match="speedup_window must be at least 1, got 0"):
        ServiceSettings(str(checkpoint), speedup_window=0)
    with pytest.raises(De3bertError, match="speedup_band must be a positive fraction"):
        ServiceSettings(str(checkpoint), speedup_band=0.0)


def test_under_load_the_counters_equal_the_requests_sent(checkpoint):
    """8 client threads, each with its own connection, send 25 requests of 1–4 inputs to uvicorn; /metrics then
    counts exactly the requests, inputs and exit layers that came back."""
    app = create_app(ServiceSettings(str(checkpoint), max_wait_ms=2))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the service did not come up"
            time.sleep(0.05)

        def client(seed: int) -> list[int]:
            rng, layers = random.Random(seed), []
            with httpx.Client(base_url=url, timeout=60) as http:
                for _ in range(25):
                    response = http.post("/v1/predict", json={"inputs": [{"text": t} for t in
                                                                         texts(rng.randint(1, 4), rng.random())]})
                    assert response.status_code == 200, response.text
                    layers += [p["exit_layer"] for p in response.json()["predictions"]]
            return layers

        with ThreadPoolExecutor(8) as pool:
            layers = [layer for answered in pool.map(client, range(8)) for layer in answered]
        metrics = samples(httpx.get(f"{url}/metrics", timeout=30).text)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert value(metrics, "de3bert_requests_total", endpoint="/v1/predict", status="200") == 8 * 25
    assert sum(v for (name, labels), v in metrics.items() if name == "de3bert_requests_total"
               and dict(labels)["endpoint"] == "/v1/predict") == 8 * 25  # nothing refused, nothing lost
    assert value(metrics, "de3bert_request_seconds_count", endpoint="/v1/predict") == 8 * 25
    assert value(metrics, "de3bert_inputs_total", policy="default") == len(layers)
    assert value(metrics, "de3bert_exit_layer_count", policy="default") == len(layers)
    assert value(metrics, "de3bert_exit_layer_sum", policy="default") == sum(layers)
    assert value(metrics, "de3bert_delivered_speedup") == pytest.approx(4 * len(layers) / sum(layers))
    assert not any(name == "de3bert_errors_total" for name, _ in metrics)
