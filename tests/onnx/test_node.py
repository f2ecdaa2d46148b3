"""The exported model.onnx runs outside Python: ONNX Runtime for Node.js (`onnxruntime-node`, pinned in
tests/onnx/node/package.json) on token ids of real sentences gives the labels, exit layers and logits of the PyTorch
engine and of ONNX Runtime in Python — under the graph's default policy and under another one baked into its
defaults. onnxruntime-node does not pass the optional inputs a caller feeds (docs/serving.md): a canary fails when
it starts to."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from de3bert.exits.criteria import CRITERIA
from de3bert.exits.engine import EarlyExitEngine
from de3bert.exits.policies import ExitPolicy
from de3bert.model.modeling import EarlyExitModel
from de3bert.onnx.format import GRAPH_NAME, OUTPUTS, POLICY_INPUTS, write_policy_defaults
from de3bert.onnx.runtime import OnnxEarlyExitModel

pytest.importorskip("onnxruntime")


NODE_DIR = Path(__file__).parent / "node"
NODE = shutil.which("node")
if NODE is None or not (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir():
    pytest.skip("Node.js with onnxruntime-node is needed: `make install` installs the package where npm exists "
                "(or: cd tests/onnx/node && npm ci --ignore-scripts)", allow_module_level=True)

SENTENCES = ["a gripping , funny and deeply moving film", "the plot is a mess and the acting is worse",
             "it 's a charming , often hilarious ride", "tedious , predictable and far too long",
             "one of the best films of the year", "i walked out after an hour", "not bad at all",
             "a triumph of style over substance", "the cast is terrific", "dull , dull , dull"]


def run_node(graph: Path, feeds: list[dict], folder: Path) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    """The inputs a Node.js session lists and its outputs for each feed ({name: array}): tests/onnx/node/run.js."""
    (folder / "feeds.json").write_text(json.dumps([{name: {"type": str(array.dtype), "dims": list(array.shape),
                                                           "data": array.ravel().tolist()}
                                                    for name, array in feed.items()} for feed in feeds]))
    subprocess.run([NODE, str(NODE_DIR / "run.js"), str(graph), str(folder / "feeds.json"), str(folder / "out.json")],
                   check=True, timeout=60)
    answer = json.loads((folder / "out.json").read_text())
    results = [{name: np.array([np.nan if x is None else x for x in value["data"]], dtype=value["type"])
                .reshape(value["dims"]) for name, value in result.items()} for result in answer["results"]]
    return answer["inputNames"], results


def policy_array(name: str, value: float) -> np.ndarray:
    """A policy input's value as the graph's scalar of its element type."""
    return np.array(value, POLICY_INPUTS[name])


def with_defaults(graph: Path, values: dict[str, float], output: Path) -> Path:
    """A copy of the graph whose optional inputs default to `values` instead (what a runtime that cannot feed them
    runs; docs/serving.md), written by the library's own `write_policy_defaults`."""
    output.mkdir(parents=True, exist_ok=True)
    shutil.copy(graph, output / GRAPH_NAME)
    write_policy_defaults(output, values)
    return output / GRAPH_NAME


@pytest.fixture(scope="module")
def exported(tiny_export):
    return OnnxEarlyExitModel.from_pretrained(tiny_export)


@pytest.fixture(scope="module")
def tokens(exported, tokenizer) -> dict[str, np.ndarray]:
    """Real sentences tokenized by the real MiniLM tokenizer, padded: the token inputs the graph has."""
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")
            if name in exported.token_inputs}


def python_graph(exported, tokens, inputs: dict[str, float]) -> dict[str, np.ndarray]:
    """The graph's outputs on ONNX Runtime in Python, the policy inputs fed."""
    batch = {name: torch.from_numpy(array) for name, array in tokens.items()}
    outputs = exported.run_graph(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), inputs)
    return {name: value.numpy() for name, value in zip(OUTPUTS, outputs)}


def assert_same(node: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert node["exit_layer"].dtype == np.int64 and node["logits"].dtype == node["indicator"].dtype == np.float32
    assert node["exit_layer"].tolist() == expected["exit_layer"].tolist()
    assert node["logits"].argmax(-1).tolist() == expected["logits"].argmax(-1).tolist()
    np.testing.assert_allclose(node["logits"], expected["logits"], atol=1e-4)
    np.testing.assert_allclose(node["indicator"], expected["indicator"], atol=1e-5)  # NaN where NaN


def pytorch_engine(tiny_checkpoint, tokens, policy: ExitPolicy) -> dict[str, np.ndarray]:
    """The PyTorch engine's logits, exit layers and indicators on the same token ids."""
    exits = EarlyExitEngine(EarlyExitModel.from_pretrained(tiny_checkpoint), policy).run_batch(
        **{name: torch.from_numpy(array) for name, array in tokens.items()})
    assert exits.predictions.tolist() == exits.logits.argmax(-1).tolist()
    return {"logits": exits.logits.numpy(), "exit_layer": exits.exit_layers.numpy(),
            "indicator": exits.indicators.numpy()}


def never_confident(policy: ExitPolicy) -> float:
    """A threshold no indicator value passes: every row runs to the last layer."""
    return 0.0 if CRITERIA[policy.criterion].below else 1.0


def test_node_runs_the_graph_as_python_does(exported, tokens, tiny_checkpoint, tiny_export, tmp_path):
    """Under the graph's defaults (the exported policy), and under another threshold and a cap on the exit layer
    baked into its defaults: Node.js gives the PyTorch engine's labels and exit layers and Python's ONNX Runtime
    outputs."""
    policy = ExitPolicy(**exported.export.policy)
    assert {"threshold", "max_layer"} <= exported.policy_inputs
    full_depth = never_confident(policy)
    graphs = {"default": (tiny_export / GRAPH_NAME, {}),
              "threshold": (with_defaults(tiny_export / GRAPH_NAME, {"threshold": full_depth},
                                          tmp_path / "threshold"), {"threshold": full_depth}),
              "cap": (with_defaults(tiny_export / GRAPH_NAME, {"threshold": full_depth, "max_layer": 3},
                                    tmp_path / "cap"), {"threshold": full_depth, "max_layer": 3})}
    node = {name: run_node(graph, [tokens], tmp_path)[1][0] for name, (graph, _) in graphs.items()}
    for name, (_, inputs) in graphs.items():
        assert_same(node[name], python_graph(exported, tokens, inputs))
    assert_same(node["default"], pytorch_engine(tiny_checkpoint, tokens, policy))
    other = ExitPolicy(policy.criterion, full_depth, policy.patience, policy.lam)
    assert_same(node["threshold"], pytorch_engine(tiny_checkpoint, tokens, other))
    assert node["threshold"]["exit_layer"].tolist() == [exported.num_layers] * len(SENTENCES)
    assert node["cap"]["exit_layer"].tolist() == [3] * len(SENTENCES)


def test_onnxruntime_node_does_not_pass_the_optional_inputs_fed(exported, tokens, tiny_export, tmp_path):
    """onnxruntime-node 1.30 lists and feeds a graph's inputs only, not the initializers that give the optional
    inputs their defaults: a fed threshold is dropped without an error. When this fails, Node.js callers can
    override the policy by feeding it: say so in docs/serving.md and feed the override in the test above."""
    policy = ExitPolicy(**exported.export.policy)
    override = {"threshold": policy_array("threshold", never_confident(policy))}
    names, (default, fed) = run_node(tiny_export / GRAPH_NAME, [tokens, tokens | override], tmp_path)
    assert names == list(tokens)
    assert python_graph(exported, tokens, {"threshold": never_confident(policy)})["exit_layer"].tolist() != \
        default["exit_layer"].tolist()  # the override matters where it is passed
    assert fed["exit_layer"].tolist() == default["exit_layer"].tolist()
