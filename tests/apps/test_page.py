"""The page `de3bert serve` answers GET / with: self-contained, and driven in a real headless Chromium (through
Playwright, on the system's Chromium) against the real app under uvicorn."""

import os
import re
import shutil
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from de3bert.exits.policies import ExitPolicy
from de3bert.apps.serving import ServiceSettings, create_app
from tests.conftest import tiny_model
from tests.apps.test_serving import CALIBRATION, checkpoint  # noqa: F401 (checkpoint is a fixture used below)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# a fresh profile comes with Playwright; these keep a closed network from producing refused connections
CHROMIUM_FLAGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
MAX_CHARS = 300


def find_chromium() -> str | None:
    """$DE3BERT_CHROMIUM, else the first Chromium or Chrome on the PATH."""
    return os.environ.get("DE3BERT_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the page test needs the playwright package: pip install -e '.[test]'")
    executable = find_chromium()
    if executable is None:
        pytest.skip("the page test needs Chromium: install it (Debian: apt-get install chromium) "
                    "or set DE3BERT_CHROMIUM to a Chromium or Chrome binary")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@contextmanager
def serving(folder):
    """The real app under uvicorn on a free localhost port, in a thread; yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    app = create_app(ServiceSettings(str(folder), max_chars=MAX_CHARS))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not come up"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        listener.close()


@pytest.fixture(scope="module")
def pair_checkpoint(tmp_path_factory, tokenizer):
    """The tiny checkpoint of test_serving, as a model of a pair task (RTE)."""
    model = tiny_model(tokenizer=tokenizer)
    model.config.task = "rte"
    model.config.policy = ExitPolicy("edr", threshold=0.5).to_dict()
    model.config.calibration = CALIBRATION
    return model.save_pretrained(tmp_path_factory.mktemp("page") / "rte")


def answer(url, inputs, policy=None):
    """/v1/predict's answer for one input (without explain)."""
    body = {"inputs": [inputs]} | ({"policy": policy} if policy else {})
    response = httpx.post(f"{url}/v1/predict", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]


def expect(locator):
    """Playwright's waiting assertions (imported here: the module loads without Playwright, whose tests skip)."""
    from playwright.sync_api import expect

    return expect(locator)


def shown(page):
    """The label and exit layer the page shows, once its answer is in (locator waits: the page's CSP forbids eval)."""
    expect(page.locator("#status")).to_contain_text("Done", timeout=30_000)
    return page.locator("#answer").inner_text(), page.locator("#exit-layer").inner_text()


def test_the_page_is_self_contained(checkpoint):  # noqa: F811
    with TestClient(create_app(ServiceSettings(str(checkpoint)))) as client:
        response = client.get("/")
        assert client.get("/v1/model").json()["text_pairs"] is False
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    html = response.text
    assert "<title>de3bert: try the model</title>" in html and "v1/predict" in html and '"explain": true' in html
    assert not re.search(r"https?:|//[\w.-]+\.\w", html.replace("https?", "")), "the page references a URL elsewhere"
    assert not re.search(r"<(script|link|img|iframe)[^>]*\b(src|href)=", html), "the page loads a file"
    assert re.findall(r'href="([^"]*)"', html) == ["docs"]  # the API docs of this same service


def test_typing_a_sentence_shows_the_label_and_exit_layer_of_the_api(browser, checkpoint, tmp_path):  # noqa: F811
    text = "the film was good great"
    with serving(checkpoint) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        page.get_by_text("Default policy", exact=True).wait_for()
        page.get_by_label("Text", exact=True).press_sequentially(text)
        page.keyboard.press("Tab")  # to the Classify button, by keyboard
        page.keyboard.press("Enter")
        label, exit_layer = shown(page)
        expected = answer(url, {"text": text})
        saved = 4 - expected["exit_layer"]
        assert label == expected["label"] and exit_layer == f"{expected['exit_layer']} of 4 " + (
            f"({saved} layer{'s' if saved > 1 else ''} saved)" if saved else "(ran every layer)")
        probabilities = page.locator("#probabilities tr").all_inner_texts()
        assert len(probabilities) == 2 and any("(predicted)" in item for item in probabilities)
        table = page.locator("#layers tbody tr").all_inner_texts()
        assert len(table) == 4 and sum("saved" in row for row in table) == 4 - expected["exit_layer"]
        page.screenshot(path=tmp_path / "page.png", full_page=True)

        # the slider, by keyboard: its far end asks for the fastest calibrated policy, and the exit moves with it
        page.locator("#speedup").focus()
        page.keyboard.press("End")
        expect(page.locator("#policy-used")).to_contain_text("3.00×", timeout=30_000)
        label, exit_layer = shown(page)
        fastest = answer(url, {"text": text}, {"criterion": "edr", "target_speedup": 3.0})
        assert label == fastest["label"] and exit_layer.startswith(f"{fastest['exit_layer']} of 4")
        assert fastest["exit_layer"] < expected["exit_layer"]  # this model exits earlier at τ 0.9 than at τ 0.5
        assert len(page.locator("#chart text", has_text="saved").all()) == 4 - fastest["exit_layer"]

        # an answer of the API that refuses the text is shown as text
        page.get_by_label("Text", exact=True).fill("a" * (MAX_CHARS + 1))
        page.get_by_role("button", name="Classify").click()
        page.get_by_role("alert").wait_for()
        assert page.get_by_role("alert").inner_text() == (
            f"Error: inputs[0].text has {MAX_CHARS + 1} characters; the limit is {MAX_CHARS}")

        # at phone width nothing is wider than the screen
        page.set_viewport_size({"width": 375, "height": 800})
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        page.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_a_pair_task_asks_for_two_texts(browser, pair_checkpoint):
    with serving(pair_checkpoint) as url:
        page = browser.new_page(viewport={"width": 375, "height": 800})
        page.goto(url)
        page.get_by_label("Second text").wait_for()
        example = page.locator("#examples button").first
        example.focus()
        page.keyboard.press("Enter")
        label, exit_layer = shown(page)
        first, second = page.get_by_label("First text").input_value(), page.get_by_label("Second text").input_value()
        assert f"{first} / {second}" == example.inner_text()
        expected = answer(url, {"text": first, "text_pair": second})
        assert label == expected["label"] and exit_layer.startswith(f"{expected['exit_layer']} of 4")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        page.close()
