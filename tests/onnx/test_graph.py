"""The single self-exiting ONNX graph makes the PyTorch engine's decisions: same predictions, exit layers, logits and
indicators for every criterion at batches of 1, 7 and 32 with padding, on BERT and MPNet, with the policy stored in
the graph and with threshold, patience and λ overridden at run time; max_layer caps the exit layer and gives every
exit; no layer runs after the last exit; int8 runs and agrees with float32."""

import json
import os
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from de3bert.errors import PolicyError
from de3bert.exits.engine import EarlyExitEngine
from de3bert.exits.policies import ExitPolicy
from tests.conftest import padded_batch, tiny_model
from tests.onnx.test_runtime import CLASSIFICATION, separated, sharpen, tiny_mpnet_model

ort = pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from de3bert.onnx.format import GRAPH_NAME, OnnxExportInfo  # noqa: E402
from de3bert.onnx.graph import build_exit_graph  # noqa: E402
from de3bert.onnx.runtime import OnnxEarlyExitModel  # noqa: E402
from de3bert.onnx.sessions import inference_session  # noqa: E402

OVERRIDABLE = ("threshold", "patience", "lam")
DEMO = Path(os.environ.get("DE3BERT_DEMO_CHECKPOINT", Path(__file__).parents[2] / "runs" / "demo-sst2"))


def graph_model(model, policy: ExitPolicy, folder: Path, session=None, **options) -> OnnxEarlyExitModel:
    """The graph of a model under a policy, built into folder/model.onnx and loaded as an export is."""
    folder.mkdir(parents=True, exist_ok=True)
    built = build_exit_graph(model, policy, folder, **options)
    onnx.save(built.model, str(folder / GRAPH_NAME))
    export = OnnxExportInfo(criterion=policy.criterion, policy=policy.to_dict(), inputs=built.inputs)
    return OnnxEarlyExitModel(model.config, export, session or inference_session(folder / GRAPH_NAME, 2),
                              model.tokenizer, folder)


def run(graph: OnnxEarlyExitModel, batch: dict, **inputs):
    """The graph's results for a batch, its inputs overridden (threshold, patience, lam, max_layer)."""
    logits, exit_layers, indicators = graph.run_graph(batch["input_ids"], batch["attention_mask"], None, inputs)
    return logits, exit_layers, indicators


def policy_pair(model, criterion: str) -> tuple[ExitPolicy, ExitPolicy]:
    """The policy stored in the graph, and another one to pass at run time (other τ, patience and λ)."""
    calibration = padded_batch(32, max_len=16, seed=32)
    patient = criterion in ("patience", "pcee", "regression-patience")
    stored = separated(model, calibration, criterion, 2 if patient else 1)
    overridden = separated(model, calibration, criterion, 1 if patient else 2,
                           lam=2.0, around=0.3)
    return stored, overridden


class Built(NamedTuple):
    model: object
    stored: ExitPolicy  # the policy whose values are the graph's defaults
    overridden: ExitPolicy  # another one, to pass at run time
    graph: OnnxEarlyExitModel
    path: Path


class Graphs:
    """Graphs built on first use and kept for the module."""

    def __init__(self, folder: Path, tokenizer):
        self.folder = folder
        self.models = {"bert": sharpen(tiny_model(pooling="mean", tokenizer=tokenizer)),
                       "mpnet": tiny_mpnet_model(tokenizer),
                       "regression": sharpen(tiny_model(labels=(), pooling="mean", tokenizer=tokenizer), scale=300.0)}
        self.built = {}

    def get(self, name: str, criterion: str, **options):
        key = (name, criterion, tuple(sorted(options.items())))
        if key not in self.built:
            model = self.models[name]
            stored, overridden = policy_pair(model, criterion)
            folder = self.folder / f"{name}-{criterion}-{len(self.built)}"
            graph = graph_model(model, stored, folder, **options)
            self.built[key] = Built(model, stored, overridden, graph, folder / GRAPH_NAME)
        return self.built[key]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine each PyTorch call waits for its thread team
    (≈ 10 ms a call measured with the two cores taken)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tokenizer):
    return Graphs(tmp_path_factory.mktemp("graphs"), tokenizer)


def assert_same_exits(model, graph, batch, policy, **overrides):
    expected = EarlyExitEngine(model, policy).run_batch(**batch)
    actual = graph.exit_batch(batch["input_ids"], batch["attention_mask"], None, policy, len(batch["input_ids"]))
    if not overrides:  # the graph's own defaults give the stored policy
        logits, exit_layers, _ = run(graph, batch)
        assert exit_layers.tolist() == actual.exit_layers.tolist() and torch.equal(logits, actual.logits)
    assert actual.exit_layers.tolist() == expected.exit_layers.tolist(), policy
    assert torch.allclose(actual.predictions.double(), expected.predictions.double(), atol=1e-5), policy
    assert torch.allclose(actual.logits, expected.logits, atol=1e-4), policy
    assert torch.allclose(actual.indicators, expected.indicators, atol=1e-5, equal_nan=True), policy
    return actual.exit_layers


CASES = [("bert", c) for c in CLASSIFICATION] + [("mpnet", c) for c in CLASSIFICATION] + [
    ("regression", "regression-patience")]


@pytest.mark.parametrize("name,criterion", CASES)
def test_graph_equals_engine_with_stored_and_overridden_policies(graphs, name, criterion):
    model, stored, overridden, graph, _ = graphs.get(name, criterion)
    overrides = {field: getattr(overridden, field) for field in OVERRIDABLE if field in graph.policy_inputs}
    assert set(overrides) == {f for f in OVERRIDABLE if f != "lam" or criterion == "edr"} - (
        {"threshold"} if criterion == "patience" else set()) - ({"threshold", "patience"} if criterion == "full-depth"
                                                                 else set())
    exit_layers = set()
    for batch_size in (1, 7, 32):
        batch = padded_batch(batch_size, max_len=16, seed=batch_size)
        exit_layers |= set(assert_same_exits(model, graph, batch, stored).tolist())
        exit_layers |= set(assert_same_exits(model, graph, batch, overridden, **overrides).tolist())
    if criterion != "full-depth":
        assert len(exit_layers) > 2  # rows left at several layers: compaction and write-back ran


def test_always_compacting_gives_the_same_results(graphs):
    model, stored, _, graph, _ = graphs.get("bert", "pcee", compaction="always")
    for batch_size in (1, 32):
        assert_same_exits(model, graph, padded_batch(batch_size, max_len=16, seed=batch_size), stored)


@pytest.mark.parametrize("criterion", ["entropy", "edr", "patience", "full-depth"])
def test_max_layer_caps_exits_and_gives_every_exit(graphs, criterion):
    model, stored, _, graph, _ = graphs.get("bert", criterion)
    batch = padded_batch(7, max_len=16, seed=3)
    with torch.no_grad():
        expected = model.layer_outputs(**batch, reads=stored.head_reads)
    exits = graph.layer_outputs(**batch, reads=stored.head_reads)
    for ours, theirs in zip(exits, expected, strict=True):
        assert torch.allclose(ours.logits, theirs.logits, atol=1e-4)
    # an indicator criterion's values at every exit are those the policy reads from PyTorch's heads
    if stored.spec.indicator is not None:
        for index, (ours, theirs) in enumerate(zip(exits, expected)):
            if stored.needs_prototypes and index == len(exits) - 1:
                break  # no prototypical network on the last layer: no value
            assert torch.allclose(stored.indicator(ours, None)[0], stored.indicator(theirs, None)[0], atol=1e-5)
    _, capped, _ = run(graph, batch, max_layer=2)
    uncapped = EarlyExitEngine(model, stored).run_batch(**batch)
    assert capped.tolist() == torch.clamp(uncapped.exit_layers, max=2).tolist()


def test_graph_without_max_layer_has_no_such_input(graphs):
    model, stored, _, graph, _ = graphs.get("bert", "full-depth", max_layer=False)
    assert not graph.policy_inputs
    assert_same_exits(model, graph, padded_batch(7, max_len=16, seed=7), stored)
    with pytest.raises(Exception, match="max_layer"):
        graph.layer_outputs(**padded_batch(1))


def profiled_layers(path: Path, folder: Path, batch: dict, **overrides) -> set[str]:
    """The layer pieces (layer_01, ...) of which some node ran, read from an ONNX Runtime profile."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    export = OnnxExportInfo(criterion="entropy")
    graph = OnnxEarlyExitModel(tiny_model().config, export, session, None, path.parent)
    run(graph, batch, **overrides)
    events = json.loads(Path(session.end_profiling()).read_text())
    return {event["name"].split("/")[0] for event in events
            if event.get("cat") == "Node" and event["name"].startswith("layer_")}


def test_no_layer_runs_after_the_last_exit(graphs, tmp_path):
    _, _, _, graph, path = graphs.get("bert", "entropy")
    never = {"threshold": 0.0}  # entropy < 0 never holds: max_layer decides
    assert profiled_layers(path, tmp_path, padded_batch(1), max_layer=2, **never) == {"layer_01", "layer_02"}
    batch = padded_batch(7, max_len=16, seed=7)
    _, exit_layers, _ = run(graph, batch, threshold=1.0)  # every row is confident at layer 1
    assert exit_layers.tolist() == [1] * 7
    assert profiled_layers(path, tmp_path, batch, threshold=1.0) == {"layer_01"}
    assert profiled_layers(path, tmp_path, batch, **never) == {f"layer_{m:02d}" for m in range(1, 5)}


def test_int8_graph_runs_and_agrees_with_float32(graphs, tmp_path):
    model, stored, _, graph, _ = graphs.get("bert", "entropy")
    quantized = graph_model(model, stored, tmp_path / "int8", quantize="int8")
    batch = padded_batch(32, max_len=16, seed=11)
    (ours, ours_exits, _), (reference, reference_exits, _) = run(quantized, batch), run(graph, batch)
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8
    assert (ours_exits == reference_exits).float().mean() >= 0.7
    for exits, float_exits in zip(quantized.layer_outputs(**batch), graph.layer_outputs(**batch)):
        assert (exits.logits.argmax(-1) == float_exits.logits.argmax(-1)).float().mean() >= 0.8


def test_a_criterion_the_graph_was_not_built_with_is_refused(graphs):
    graph = graphs.get("bert", "entropy").graph
    assert graph.criteria == ("entropy", "full-depth") and "lam" not in graph.policy_inputs
    batch = padded_batch(3)
    with pytest.raises(PolicyError, match="decides exits by criterion 'entropy' .* --criterion edr"):
        graph.exit_batch(batch["input_ids"], batch["attention_mask"], None, ExitPolicy("edr", 0.5), 3)
    full = graph.exit_batch(batch["input_ids"], batch["attention_mask"], None, ExitPolicy("full-depth"), 3)
    assert full.exit_layers.tolist() == [4, 4, 4]  # full depth: inputs under which no row leaves early


@pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason=f"needs the demo checkpoint ({DEMO})")
def test_int8_demo_checkpoint_keeps_every_exits_accuracy(tmp_path):
    """int8 on the trained MiniLM-L6 (SST-2): every exit's dev accuracy within about a point of PyTorch float32 (one
    point is 9 of the 872 sentences; measured: at most 1.03 points, at exit 5 — the same with float32 heads)."""
    from de3bert.data import encode_examples
    from de3bert.evaluation.run_data import evaluation_source, split_examples
    from de3bert.exits.outputs import collect_layer_outputs
    from de3bert.model.modeling import EarlyExitModel

    model = EarlyExitModel.from_pretrained(DEMO)
    _, _, examples = split_examples(model, evaluation_source(model))
    encoded = encode_examples(model.tokenizer, examples, model.config.max_length)
    graph = graph_model(model, ExitPolicy(**model.config.policy), tmp_path / "int8", quantize="int8")
    labels = torch.tensor([e.label for e in encoded])
    int8 = (collect_layer_outputs(graph, encoded).predictions() == labels).float().mean(1)
    float32 = (collect_layer_outputs(model, encoded).predictions() == labels).float().mean(1)
    assert (int8 - float32).abs().max() <= 0.0125, (int8.tolist(), float32.tolist())
