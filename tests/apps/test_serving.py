"""The prediction service: answers equal the engine's, per-request policies, limits, micro-batching,
and one real uvicorn process."""

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from de3bert.apps.serving.app import create_app, model_version
from de3bert.apps.serving.settings import ServiceSettings
from de3bert.errors import De3bertError
from de3bert.exits.calibration import policy_for_speedup
from de3bert.exits.engine import EarlyExitEngine
from de3bert.exits.explain import explain_exits, indicator_reading
from de3bert.exits.policies import ExitPolicy
from de3bert.model.modeling import EarlyExitModel
from tests.conftest import TICKETS, tiny_model

TEXTS = ["the film was good great", "the film was awful dull", "fine", "the film was poor ugly bad and long"]
PAIRS = ["a man sleeps", "nobody sleeps", "it rains", "the sun is out"]
CALIBRATION = [
    {"target_speedup": 1.5, "criterion": "edr", "threshold": 0.3, "patience": 1, "lam": 1.0, "speedup": 1.6},
    {"target_speedup": 2.0, "criterion": "edr", "threshold": 0.5, "patience": 1, "lam": 1.0, "speedup": 2.1},
    {"target_speedup": 3.0, "criterion": "edr", "threshold": 0.9, "patience": 1, "lam": 1.0, "speedup": 3.2},
    {"target_speedup": 1.5, "criterion": "patience", "threshold": 0.5, "patience": 3, "lam": 1.0, "speedup": 1.5},
    {"target_speedup": 2.0, "criterion": "patience", "threshold": 0.5, "patience": 2, "lam": 1.0, "speedup": 2.0},
    {"criterion": "patience", "target_speedup": 3.0, "error": "cannot reach"},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A tiny random 4-layer DE³ checkpoint with a default policy and a calibrated table."""
    model = tiny_model(tokenizer=tokenizer)
    model.config.policy = ExitPolicy("edr", threshold=0.5).to_dict()
    model.config.calibration = CALIBRATION
    return model.save_pretrained(tmp_path_factory.mktemp("serve") / "ckpt")


@pytest.fixture(scope="module")
def engine(checkpoint):
    return EarlyExitEngine(EarlyExitModel.from_pretrained(checkpoint))


@pytest.fixture(scope="module")
def client(checkpoint):
    settings = ServiceSettings(str(checkpoint), max_batch_size=16, max_wait_ms=30, max_inputs=8, max_chars=200,
                               max_body_bytes=4000)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def predict(client, texts, pairs=None, **extra):
    inputs = [{"text": t} if pairs is None else {"text": t, "text_pair": p} for t, p in zip(texts, pairs or texts)]
    return client.post("/v1/predict", json={"inputs": inputs, **extra})


def assert_equal_answers(answers, expected):
    assert len(answers) == len(expected)
    for answer, prediction in zip(answers, expected):
        assert answer["label"] == prediction.label and answer["score"] is None
        assert answer["exit_layer"] == prediction.exit_layer
        assert answer["indicator"] == pytest.approx(prediction.indicator, abs=1e-5)
        assert answer["probabilities"] == pytest.approx(prediction.probabilities, abs=1e-5)


@pytest.mark.parametrize("texts", [TEXTS[:1], TEXTS])
def test_answers_equal_the_engine(client, engine, texts, caplog):
    with caplog.at_level(logging.INFO, logger="de3bert.serving"):
        response = predict(client, texts)
    assert response.status_code == 200, response.text
    body = response.json()
    assert_equal_answers(body["predictions"], engine.predict(texts))
    for answer in body["predictions"]:
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert set(answer["probabilities"]) == {"neg", "pos"} and 1 <= answer["exit_layer"] <= 4
    assert body["policy"] == engine.policy.to_dict()
    assert body["model_version"].startswith("de3bert-0.1.0+") and len(body["model_version"].split("+")[1]) == 12
    assert f"predict inputs={len(texts)} batch=" in caplog.text and "exit_layers=" in caplog.text


def test_requests_without_explain_are_answered_as_before(client):
    body = predict(client, TEXTS).json()
    assert set(body) == {"model_version", "policy", "predictions"}
    for answer in body["predictions"]:
        assert set(answer) == {"label", "score", "probabilities", "exit_layer", "indicator"}
    assert predict(client, TEXTS, explain=False).json() == body


@pytest.mark.parametrize("policy", [None, {"criterion": "entropy", "threshold": 0.999, "patience": 2},
                                    {"criterion": "patience", "patience": 2}, {"criterion": "full-depth"}])
def test_explain_gives_the_layers_each_input_passed_through(client, engine, policy):
    extra = {"policy": policy} if policy else {}
    plain = predict(client, TEXTS, **extra).json()
    body = predict(client, TEXTS, explain=True, **extra).json()
    applied = ExitPolicy(**body["policy"])
    reading = indicator_reading(applied)
    expected = explain_exits(engine.model, applied, TEXTS)
    for answer, without, explanation in zip(body["predictions"], plain["predictions"], expected):
        explained = answer.pop("explain")
        assert answer == without  # the answer itself is the engine's, as without explain
        assert {k: v for k, v in explained.items() if k != "layers"} == asdict(reading)
        layers = explained["layers"]
        assert [layer["layer"] for layer in layers] == list(range(1, answer["exit_layer"] + 1))
        assert explanation.exit_layer == answer["exit_layer"]  # the every-head pass stops where the engine did
        for layer, trace in zip(layers, explanation.layers):
            assert layer["label"] == trace.label and layer["score"] is None and layer["streak"] == trace.streak
            assert layer["probabilities"] == pytest.approx(trace.probabilities, abs=1e-6)
            assert layer["indicator"] == pytest.approx(trace.indicator, abs=1e-6)
        assert layers[-1]["indicator"] == pytest.approx(answer["indicator"], abs=1e-5)
        assert layers[-1]["label"] == answer["label"]


def test_text_pairs_equal_the_engine(client, engine):
    response = predict(client, TEXTS, PAIRS)
    assert response.status_code == 200, response.text
    assert_equal_answers(response.json()["predictions"], engine.predict(TEXTS, PAIRS))


def test_per_request_policy(client, engine):
    full = predict(client, TEXTS, policy={"criterion": "full-depth"}).json()["predictions"]
    assert [p["exit_layer"] for p in full] == [4] * 4
    eager = predict(client, TEXTS, policy={"criterion": "confidence", "threshold": 0.0}).json()["predictions"]
    assert [p["exit_layer"] for p in eager] == [1] * 4
    body = predict(client, TEXTS, policy={"criterion": "entropy", "threshold": 0.999, "patience": 2}).json()
    assert body["policy"] == {"criterion": "entropy", "threshold": 0.999, "patience": 2, "lam": 1.0}
    assert_equal_answers(body["predictions"], engine.predict(TEXTS, policy=ExitPolicy("entropy", 0.999, 2)))
    # fields left out come from the default policy when the criterion is the default's
    assert predict(client, TEXTS[:1], policy={"lam": 2.0}).json()["policy"] == {
        "criterion": "edr", "threshold": 0.5, "patience": 1, "lam": 2.0}


@pytest.mark.parametrize("policy,expected", [
    ({"target_speedup": 2.0}, {"criterion": "edr", "threshold": 0.5, "patience": 1}),
    ({"target_speedup": 1.75}, {"criterion": "edr", "threshold": 0.4, "patience": 1}),
    ({"criterion": "edr", "target_speedup": 2.5}, {"criterion": "edr", "threshold": 0.7, "patience": 1}),
    # patience counts are not interpolated: the calibrated point reaching the target is taken
    ({"criterion": "patience", "target_speedup": 1.75}, {"criterion": "patience", "threshold": 0.5, "patience": 2}),
])
def test_target_speedup_within_the_calibrated_range(client, policy, expected):
    response = predict(client, TEXTS[:2], policy=policy)
    assert response.status_code == 200, response.text
    applied = response.json()["policy"]
    assert {k: applied[k] for k in expected} == pytest.approx(expected)


def test_policy_for_speedup_ends_of_the_range():
    assert policy_for_speedup(CALIBRATION, "edr", 1.5).threshold == 0.3
    assert policy_for_speedup(CALIBRATION, "edr", 3.0).threshold == 0.9
    with pytest.raises(De3bertError, match="no calibrated thresholds for criterion 'dr'"):
        policy_for_speedup(CALIBRATION, "dr", 2.0)


@pytest.mark.parametrize("body,message", [
    ({"inputs": []}, "invalid request: inputs: List should have at least 1 item"),
    ({"inputs": [{"text": "x"}] * 9}, "9 inputs in one request; the limit is 8"),
    ({"inputs": [{"text": "   "}]}, "inputs[0].text is empty"),
    ({"inputs": [{"text": "a", "text_pair": ""}]}, "inputs[0].text_pair is empty"),
    ({"inputs": [{"text": "y" * 201}]}, "inputs[0].text has 201 characters; the limit is 200"),
    ({"inputs": [{"text": 5}]}, "invalid request: inputs.0.text: Input should be a valid string"),
    ({"inputs": "hello"}, "invalid request: inputs: Input should be a valid list"),
    ({"inputs": [{"txt": "a"}]}, "invalid request: inputs.0.text: Field required"),
    ({"texts": ["a"]}, "invalid request: inputs: Field required"),
    ([1, 2], "invalid request: body: Input should be a valid dictionary"),
    ({"inputs": [{"text": "a"}, {"text": "b", "text_pair": "c"}]}, "inputs mix single texts and text pairs"),
    ({"inputs": [{"text": "a"}], "policy": {"criterion": "magic"}}, "unknown criterion 'magic'; choose one of edr"),
    ({"inputs": [{"text": "a"}], "policy": {"criterion": "regression-patience"}},
     "criterion 'regression-patience' does not apply to this model"),
    ({"inputs": [{"text": "a"}], "policy": {"criterion": "edr", "threshold": 1.5}},
     "threshold of 'edr' must lie in [0, 1], got 1.5"),
    ({"inputs": [{"text": "a"}], "policy": {"threshold": -0.1}}, "must lie in [0, 1], got -0.1"),
    ({"inputs": [{"text": "a"}], "policy": {"patience": 0}}, "patience must be at least 1, got 0"),
    ({"inputs": [{"text": "a"}], "policy": {"target_speedup": 9}},
     "target_speedup 9 is outside the range calibrated for criterion 'edr': 1.5x to 3x"),
    ({"inputs": [{"text": "a"}], "policy": {"criterion": "patience", "target_speedup": 2.5}},
     "outside the range calibrated for criterion 'patience': 1.5x to 2x"),
    ({"inputs": [{"text": "a"}], "policy": {"target_speedup": 2, "threshold": 0.3}},
     "give either target_speedup or threshold/patience/lam"),
    ({"inputs": [{"text": "a"}], "policy": {"speedup": 2}}, "invalid request: policy.speedup: Extra inputs"),
])
def test_bad_requests_get_clear_errors(client, body, message):
    response = client.post("/v1/predict", json=body)
    assert response.status_code == 422
    assert message in response.json()["error"]


def test_malformed_and_oversize_bodies(client):
    json_header = {"content-type": "application/json"}
    response = client.post("/v1/predict", content=b'{"inputs": [{"text": "\xff\xfe"}]}', headers=json_header)
    assert response.status_code == 400
    assert response.json()["error"].startswith("request body is not valid UTF-8 (byte 22)")
    response = client.post("/v1/predict", content=b'{"inputs": [', headers=json_header)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid request: body is not valid JSON (Expecting value at character 12)"
    response = client.post("/v1/predict", content=b"", headers=json_header)
    assert response.json()["error"] == 'invalid request: the body is empty; send {"inputs": [{"text": "..."}]}'
    response = client.post("/v1/predict", content=b'{"inputs": [{"text": "a"}]}', headers={"content-type": "text/plain"})
    assert response.status_code == 415 and "content-type: application/json" in response.json()["error"]
    oversize = json.dumps({"inputs": [{"text": "z" * 5000}]}).encode()
    response = client.post("/v1/predict", content=oversize, headers=json_header)
    assert response.status_code == 413 and response.json()["error"] == f"request body of {len(oversize)} bytes; the limit is 4000"
    # no Content-Length (chunked upload): the bytes actually received are counted
    response = client.post("/v1/predict", content=iter([oversize[:3000], oversize[3000:]]), headers=json_header)
    assert response.status_code == 413 and response.json()["error"] == "request body exceeds 4000 bytes, the limit"
    assert client.get("/v1/nothing").json() == {"error": "Not Found"}
    assert client.get("/v1/predict").status_code == 405
    assert client.get("/healthz").json()["status"] == "ok"  # still serving


def test_concurrent_requests_are_merged_by_policy_and_answered_in_order(client, engine):
    policies = [{"criterion": "full-depth"}, {"criterion": "confidence", "threshold": 0.0}, None]
    batcher = client.app.state.batcher
    batcher.batch_sizes.clear()
    answers = {}

    def ask(index):
        texts = [TEXTS[(index + k) % 4] for k in range(3)]
        policy = policies[index % 3]
        answers[index] = predict(client, texts, **({"policy": policy} if policy else {})).json()["predictions"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # a request merged with requests of other policies still gets its own policy's answers
    by_policy = [dict(zip(TEXTS, engine.predict(TEXTS, policy=p)))
                 for p in (ExitPolicy("full-depth"), ExitPolicy("confidence", 0.0), None)]
    for index, predictions in answers.items():
        assert_equal_answers(predictions, [by_policy[index % 3][TEXTS[(index + k) % 4]] for k in range(3)])
    assert len(answers) == 12
    assert max(batcher.batch_sizes) > 3  # several requests shared a micro-batch
    assert max(batcher.batch_sizes) <= 16  # and it stayed within max_batch_size


def test_without_micro_batching_requests_run_alone(checkpoint):
    settings = ServiceSettings(str(checkpoint), max_wait_ms=30, micro_batching=False)
    with TestClient(create_app(settings)) as client:
        threads = [threading.Thread(target=predict, args=(client, TEXTS[:2])) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert list(client.app.state.batcher.batch_sizes) == [2] * 6


def test_health_and_model_description(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model_version"].startswith("de3bert-")
    body = client.get("/v1/model").json()
    assert body["labels"] == ["neg", "pos"] and body["num_layers"] == 4 and body["task"] == "tiny"
    assert body["text_pairs"] is False
    assert body["backbone"] == "tiny-bert" and body["calibration"] == CALIBRATION
    assert body["policy"] == {"criterion": "edr", "threshold": 0.5, "patience": 1, "lam": 1.0}
    assert body["criteria"] == ["edr", "entropy", "confidence", "dr", "patience", "pcee", "full-depth"]
    assert body["limits"] == {"max_inputs": 8, "max_chars": 200, "max_body_bytes": 4000}
    assert body["micro_batching"] == {"enabled": True, "max_batch_size": 16, "max_wait_ms": 30}
    assert set(client.get("/openapi.json").json()["paths"]) == {"/healthz", "/v1/model", "/v1/predict"}


def test_a_six_class_model_trained_on_a_users_file_answers_in_label_names(tickets_checkpoint):
    texts = ["my invoice refund today", "my crash error today", "my parcel courier today"]
    with TestClient(create_app(ServiceSettings(str(tickets_checkpoint)))) as client:
        assert client.get("/v1/model").json()["labels"] == sorted(TICKETS)
        for policy in (None, {"criterion": "dr", "threshold": 0.5}, {"target_speedup": 2.0}):
            response = predict(client, texts, **({"policy": policy} if policy else {}))
            assert response.status_code == 200, response.text
            for answer in response.json()["predictions"]:
                assert answer["label"] in TICKETS and set(answer["probabilities"]) == set(TICKETS)


def test_regression_model_answers_with_scores(tmp_path, tokenizer):
    model = tiny_model(labels=(), tokenizer=tokenizer)
    model.config.policy = ExitPolicy("regression-patience", threshold=0.1, patience=2).to_dict()
    folder = model.save_pretrained(tmp_path / "stsb")
    with TestClient(create_app(ServiceSettings(str(folder)))) as client:
        answers = predict(client, TEXTS, PAIRS).json()["predictions"]
        expected = EarlyExitEngine(EarlyExitModel.from_pretrained(folder)).predict(TEXTS, PAIRS)
        assert [a["score"] for a in answers] == pytest.approx([e.label for e in expected], abs=1e-5)
        assert all(a["label"] is None and a["probabilities"] is None for a in answers)
        for explained, answer in zip(predict(client, TEXTS, PAIRS, explain=True).json()["predictions"], answers):
            reading = explained.pop("explain")
            assert explained == answer and reading["indicator"] == "score_change"
            assert reading["layers"][-1]["score"] == pytest.approx(answer["score"], abs=1e-5)
            assert reading["layers"][0]["indicator"] is None  # no score before layer 1 to compare with
            assert all(layer["label"] is None and layer["probabilities"] is None for layer in reading["layers"])
        response = predict(client, TEXTS, PAIRS, policy={"criterion": "edr"})
        assert response.status_code == 422
        assert response.json()["error"] == ("criterion 'edr' does not apply to this model; "
                                            "choose one of regression-patience, full-depth")


def test_an_exported_folder_is_served_on_onnx_runtime(checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    from de3bert.onnx.export import export_checkpoint
    from de3bert.onnx.runtime import OnnxEarlyExitModel

    export_checkpoint(checkpoint, tmp_path / "onnx")
    with TestClient(create_app(ServiceSettings(str(tmp_path / "onnx")))) as client:
        response = predict(client, TEXTS)
        assert response.status_code == 200, response.text
        expected = EarlyExitEngine(OnnxEarlyExitModel.from_pretrained(tmp_path / "onnx")).predict(TEXTS)
        assert_equal_answers(response.json()["predictions"], expected)
        # the same answers as the PyTorch checkpoint it was exported from
        on_torch = EarlyExitEngine(EarlyExitModel.from_pretrained(checkpoint)).predict(TEXTS)
        assert_equal_answers(response.json()["predictions"], on_torch)
        # explanations read the exported heads with the request's own λ, as the engine does
        explained = predict(client, TEXTS, explain=True, policy={"lam": 2.0}).json()["predictions"]
        expected = explain_exits(EarlyExitModel.from_pretrained(checkpoint), ExitPolicy("edr", 0.5, lam=2.0), TEXTS)
        for answer, explanation in zip(explained, expected):
            assert [layer["indicator"] for layer in answer["explain"]["layers"]] == pytest.approx(
                [trace.indicator for trace in explanation.layers[:answer["exit_layer"]]], abs=1e-5)
        assert client.get("/").headers["content-type"].startswith("text/html")  # the page, on ONNX Runtime too
        body = client.get("/v1/model").json()
        assert body["num_layers"] == 4 and body["calibration"] == CALIBRATION and body["criteria"][0] == "edr"
        assert body["model_version"] == model_version(tmp_path / "onnx") != model_version(checkpoint)
    with pytest.raises(De3bertError, match="is an ONNX export, not a PyTorch checkpoint"):
        create_app(ServiceSettings(str(tmp_path / "onnx"), "torch"))
    with pytest.raises(De3bertError, match="unknown runtime 'gpu'; choose one of torch, onnx"):
        ServiceSettings(str(checkpoint), "gpu")


def test_settings_refuse_unusable_limits(checkpoint):
    with pytest.raises(De3bertError, match="max_batch_size must be at least 1, got 0"):
        ServiceSettings(str(checkpoint), max_batch_size=0)


def test_de3bert_serve_runs_under_uvicorn(checkpoint):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).with_name("de3bert")), "serve", str(checkpoint), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "the service did not come up"
                time.sleep(0.2)
        response = httpx.post(f"{url}/v1/predict", json={"inputs": [{"text": TEXTS[0]}]}, timeout=30)
        assert response.status_code == 200 and response.json()["predictions"][0]["label"] in ("neg", "pos")
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0].decode()
    assert "predict inputs=1 batch=1" in output  # the request's log line
