"""The prediction service: answers equal the engine's, micro-batching, limits, and a real uvicorn process."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from de3bert.engine import EarlyExitEngine
from de3bert.modeling import EarlyExitModel
from de3bert.policies import ExitPolicy
from de3bert.serving import ServiceSettings, create_app

TEXTS = ["the film was good great", "the film was awful dull", "the film was fine", "the film was poor ugly bad"]


@pytest.fixture(scope="module")
def settings(tiny_checkpoint):
    return ServiceSettings(str(tiny_checkpoint), max_batch_size=16, max_wait_ms=50, max_inputs=8, max_chars=200,
                           max_body_bytes=4000)


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def predict(client, inputs, **extra):
    return client.post("/v1/predict", json={"inputs": inputs, **extra})


def test_answers_equal_the_engine(client, tiny_checkpoint):
    response = predict(client, [{"text": t} for t in TEXTS])
    assert response.status_code == 200, response.text
    body = response.json()
    model = EarlyExitModel.from_pretrained(tiny_checkpoint)
    expected = EarlyExitEngine(model).predict(TEXTS)
    assert [p["label"] for p in body["predictions"]] == [e.label for e in expected]
    assert [p["exit_layer"] for p in body["predictions"]] == [e.exit_layer for e in expected]
    for answer in body["predictions"]:
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert 1 <= answer["exit_layer"] <= 4 and 0.0 <= answer["indicator"] <= 1.0
    assert body["model_version"].startswith("de3bert-") and body["policy"] == model.config.policy


def test_per_request_policy_and_target_speedup(client, tiny_checkpoint):
    full = predict(client, [{"text": t} for t in TEXTS], policy={"criterion": "full-depth"}).json()
    assert [p["exit_layer"] for p in full["predictions"]] == [4] * 4
    eager = predict(client, [{"text": t} for t in TEXTS], policy={"criterion": "confidence", "threshold": 0.0}).json()
    assert [p["exit_layer"] for p in eager["predictions"]] == [1] * 4
    calibrated = [r for r in EarlyExitModel.from_pretrained(tiny_checkpoint).config.calibration
                  if r["policy"] == "edr" and "threshold" in r]
    target = calibrated[0]["target_speedup"]
    response = predict(client, [{"text": TEXTS[0]}], policy={"criterion": "edr", "target_speedup": target})
    assert response.status_code == 200, response.text
    assert response.json()["policy"]["threshold"] == pytest.approx(calibrated[0]["threshold"])


@pytest.mark.parametrize("body,status,message", [
    ({"inputs": []}, 422, "inputs: List should have at least 1 item"),
    ({"inputs": [{"text": "x"}] * 9}, 422, "9 inputs in one request; the limit is 8"),
    ({"inputs": [{"text": "   "}]}, 422, "inputs[0].text is empty"),
    ({"inputs": [{"text": "y" * 201}]}, 422, "inputs[0].text has 201 characters; the limit is 200"),
    ({"inputs": [{"text": 5}]}, 422, "inputs.0.text: Input should be a valid string"),
    ({"inputs": [{"txt": "a"}]}, 422, "inputs.0.text: Field required"),
    ({"texts": ["a"]}, 422, "inputs: Field required"),
    ({"inputs": [{"text": "a"}, {"text": "b", "text_pair": "c"}]}, 422, "mix single texts and text pairs"),
    ({"inputs": [{"text": "a"}], "policy": {"criterion": "magic"}}, 422, "unknown criterion 'magic'"),
    ({"inputs": [{"text": "a"}], "policy": {"criterion": "edr", "threshold": 1.5}}, 422, "must lie in [0, 1]"),
    ({"inputs": [{"text": "a"}], "policy": {"criterion": "edr", "target_speedup": 9}}, 422,
     "target_speedup 9 is outside the calibrated range"),
])
def test_bad_requests_get_clear_errors(client, body, status, message):
    response = client.post("/v1/predict", json=body)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_malformed_and_oversize_bodies(client):
    response = client.post("/v1/predict", content=b'{"inputs": [{"text": "\xff\xfe"}]}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid UTF-8" in response.json()["error"]
    response = client.post("/v1/predict", content=b'{"inputs": [', headers={"content-type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.json()["error"]
    response = client.post("/v1/predict", content=json.dumps({"inputs": [{"text": "z" * 5000}]}),
                           headers={"content-type": "application/json"})
    assert response.status_code == 413 and "the limit is 4000" in response.json()["error"]
    assert client.get("/healthz").json()["status"] == "ok"  # still alive


def test_concurrent_requests_are_merged_and_answered_in_order(client):
    expected = {t: predict(client, [{"text": t}]).json()["predictions"][0] for t in TEXTS}
    batcher = client.app.state.batcher
    batcher.batch_sizes.clear()
    answers = {}

    def ask(index):
        texts = [TEXTS[(index + k) % 4] for k in range(3)]
        answers[index] = (texts, predict(client, [{"text": t} for t in texts]).json()["predictions"])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 12
    for texts, predictions in answers.values():
        assert [p["label"] for p in predictions] == [expected[t]["label"] for t in texts]
        assert [p["exit_layer"] for p in predictions] == [expected[t]["exit_layer"] for t in texts]
    assert max(batcher.batch_sizes) > 3  # several requests shared an engine call
    assert max(batcher.batch_sizes) <= 16 + 2  # bounded: one request may tip a batch over the limit


def test_model_description(client, tiny_checkpoint):
    body = client.get("/v1/model").json()
    assert body["labels"] == ["0", "1"] and body["num_layers"] == 4 and body["task"] == "sst2"
    assert body["calibration"] and body["policy"]["criterion"] == "edr"
    assert client.get("/openapi.json").json()["paths"]["/v1/predict"]


def test_real_uvicorn_process(tiny_checkpoint):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "de3bert.cli", "serve", str(tiny_checkpoint), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail("the service did not come up")
        response = httpx.post(f"{url}/v1/predict", json={"inputs": [{"text": TEXTS[0]}]}, timeout=30)
        assert response.status_code == 200 and response.json()["predictions"][0]["label"] in ("0", "1")
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0].decode()
    assert "predict inputs=1" in output  # one log line per request
