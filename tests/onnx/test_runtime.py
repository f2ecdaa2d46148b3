"""The engine on an exported folder (ONNX Runtime) makes the same decisions as on PyTorch: same predictions
and exit layers for every criterion, batches of 1, 7 and 32 with padding, chunked or not, BERT and MPNet,
classification and regression, random tiny models and the real MiniLM-L6 on real sentences."""

import shutil
import sys

import pytest
import torch

from de3bert.errors import CheckpointError, ExportError
from de3bert.exits.engine import EarlyExitEngine
from de3bert.exits.outputs import LayerOutputs
from de3bert.exits.policies import ExitPolicy
from de3bert.model.backbones import Backbone
from de3bert.model.config import EarlyExitConfig, ExitHeadConfig
from de3bert.model.heads import HeadOutput
from de3bert.model.modeling import EarlyExitModel
from de3bert.onnx.runtime import OnnxEarlyExitModel
from de3bert.onnx.sessions import onnxruntime
from tests.conftest import padded_batch, tiny_model, tiny_mpnet

pytest.importorskip("onnxruntime")

from de3bert.onnx.export import export_checkpoint  # noqa: E402  (needs onnx, installed with onnxruntime)

CLASSIFICATION = ("edr", "entropy", "confidence", "dr", "patience", "pcee", "full-depth")


def sharpen(model, scale: float = 30.0):
    """Scale the classifiers and spread the prototypes (running means start at zero) so that a random model spreads
    its indicators over [0, 1]."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for head in model.heads:
            head.classifier.weight.mul_(scale)
            if head.has_prototypes:
                head.prototypes.copy_(0.1 * torch.randn(head.prototypes.shape, generator=generator))
    return model


def tiny_mpnet_model(tokenizer) -> EarlyExitModel:
    """A tiny random 3-class EarlyExitModel on a 4-layer MPNet (relative position bias in every layer)."""
    backbone = Backbone(tiny_mpnet())
    config = EarlyExitConfig(backbone=backbone.config.to_dict(), backbone_name="tiny-mpnet", task="tiny",
                             labels=["a", "b", "c"], heads=ExitHeadConfig(pooling="mean"))
    model = EarlyExitModel(config, backbone, tokenizer)
    torch.manual_seed(1)
    model.init_heads()
    return sharpen(model.eval())


def export(model, folder) -> OnnxEarlyExitModel:
    """Save a model, export it and load the export."""
    model.save_pretrained(folder / "ckpt")
    export_checkpoint(folder / "ckpt", folder / "onnx")
    return OnnxEarlyExitModel.from_pretrained(folder / "onnx")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """(PyTorch model, its export) for each kind of model the engine serves."""
    built = {"bert": sharpen(tiny_model(pooling="mean", tokenizer=tokenizer)),
             "bert-cls-without-prototypes": sharpen(tiny_model(pooling="cls", prototype_dim=0, tokenizer=tokenizer)),
             "mpnet": tiny_mpnet_model(tokenizer),
             "regression": sharpen(tiny_model(labels=(), pooling="mean", tokenizer=tokenizer), scale=300.0)}
    return {name: (model, export(model, tmp_path_factory.mktemp(name))) for name, model in built.items()}


def separated_policies(model, batch, criteria) -> list[ExitPolicy]:
    """For each criterion, τ in the widest gap between neighbouring indicator values in the middle of their range
    on this batch: rows exit at many layers, and float rounding between runtimes cannot carry a row across τ."""
    with torch.no_grad():
        outputs = LayerOutputs.from_layers(model(**batch).layers, torch.zeros(1))
    policies = []
    for criterion in criteria:
        patience = 2 if criterion in ("patience", "pcee", "regression-patience") else 1
        if criterion in ("patience", "full-depth"):
            policies.append(ExitPolicy(criterion, patience=patience))
            continue
        probe, values, previous = ExitPolicy(criterion, patience=patience), [], None
        for head in outputs.heads()[:-1]:
            indicator, previous = probe.indicator(head, previous)
            values.append(indicator[torch.isfinite(indicator)])
        ordered = torch.cat(values).double().unique()
        middle = ordered[len(ordered) // 4: 3 * len(ordered) // 4 + 2]
        widest = int((middle[1:] - middle[:-1]).argmax())
        policies.append(ExitPolicy(criterion, float(middle[widest:widest + 2].mean()), patience))
    return policies


def assert_same_exits(model, exported, batch, policy, chunk_size=None):
    expected = EarlyExitEngine(model, policy).run_batch(**batch, chunk_size=chunk_size)
    actual = EarlyExitEngine(exported, policy).run_batch(**batch, chunk_size=chunk_size)
    assert actual.exit_layers.tolist() == expected.exit_layers.tolist(), policy
    assert torch.allclose(actual.predictions.double(), expected.predictions.double(), atol=1e-5), policy
    assert torch.allclose(actual.logits, expected.logits, atol=1e-4), policy
    assert torch.allclose(actual.indicators, expected.indicators, atol=1e-5, equal_nan=True), policy
    return actual


@pytest.mark.parametrize("name", ["bert", "mpnet"])
@pytest.mark.parametrize("batch_size,chunk_size", [(1, None), (7, None), (32, None), (32, 5)])
def test_onnx_engine_equals_pytorch_engine_for_every_criterion(models, name, batch_size, chunk_size):
    model, exported = models[name]
    batch = padded_batch(batch_size, max_len=16, seed=batch_size)
    exit_layers_seen = set()
    for policy in separated_policies(model, padded_batch(32, max_len=16, seed=32), CLASSIFICATION):
        exit_layers_seen |= set(assert_same_exits(model, exported, batch, policy, chunk_size).exit_layers.tolist())
    if batch_size > 1:
        assert len(exit_layers_seen) > 2  # real early exits at several layers, not only full depth


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_onnx_engine_equals_pytorch_engine_without_prototypes_and_for_regression(models, batch_size):
    batch = padded_batch(batch_size, max_len=16, seed=batch_size + 1)
    model, exported = models["bert-cls-without-prototypes"]
    assert not exported.has_prototypes
    for policy in separated_policies(model, padded_batch(32, seed=7), ("entropy", "patience", "pcee", "full-depth")):
        assert_same_exits(model, exported, batch, policy, chunk_size=3)
    model, exported = models["regression"]
    for policy in separated_policies(model, padded_batch(32, seed=7), ("regression-patience", "full-depth")):
        assert_same_exits(model, exported, batch, policy, chunk_size=3)


def test_onnx_model_gives_every_exit_like_the_pytorch_forward(models):
    model, exported = models["mpnet"]
    batch = padded_batch(6, seed=4)
    with torch.no_grad():
        expected = model.layer_outputs(**batch)
    actual = exported.layer_outputs(**batch)
    assert len(actual) == len(expected) == exported.num_layers == 4
    for ours, theirs in zip(actual, expected):
        assert torch.allclose(ours.logits, theirs.logits, atol=1e-5)
        assert (ours.distances is None) == (theirs.distances is None)  # the last layer has no prototypes


def test_policies_read_the_indicators_the_graphs_computed(models):
    model, exported = models["bert"]
    batch = padded_batch(4, seed=9)
    hidden = exported.embed(batch["input_ids"], None)
    context = exported.context(hidden, batch["attention_mask"])
    _, output = exported.run_layer(0, hidden, batch["attention_mask"], context, ExitPolicy("edr", lam=2.0).head_reads)
    assert set(output.indicators) == {"prediction", "edr"}  # what the policy reads, of all the graph computes
    # without them, the policy computes its own from logits and distances
    recomputed = ExitPolicy("edr", lam=2.0).indicator(HeadOutput(output.logits, output.distances), None)[0]
    assert torch.allclose(output.indicators["edr"], recomputed, atol=1e-6)


def test_real_minilm_on_real_sentences(minilm_pair):
    model, exported = minilm_pair
    sentences = ["a gripping , funny and deeply moving film", "the plot is a mess and the acting is worse",
                 "it 's a charming , often hilarious ride", "tedious , predictable and far too long",
                 "one of the best films of the year", "i walked out after an hour", "not bad at all",
                 "a triumph of style over substance", "the cast is terrific", "dull , dull , dull",
                 "an intelligent , moving story told with grace", "an utterly forgettable sequel"] * 3
    encoded = model.tokenizer(sentences, padding=True, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    for batch_size in (1, 7, 36):
        part = {k: v[:batch_size] for k, v in batch.items()}
        for policy in separated_policies(model, batch, CLASSIFICATION):
            assert_same_exits(model, exported, part, policy, chunk_size=5)
    ours = EarlyExitEngine(exported, ExitPolicy("entropy", 0.5)).predict(sentences[:12])
    theirs = EarlyExitEngine(model, ExitPolicy("entropy", 0.5)).predict(sentences[:12])
    assert [(p.label, p.exit_layer) for p in ours] == [(p.label, p.exit_layer) for p in theirs]


@pytest.fixture(scope="module")
def minilm_pair(tmp_path_factory):
    """The embedded MiniLM-L6 with random, sharpened mean-pooling heads, and its export."""
    torch.manual_seed(0)
    model = sharpen(EarlyExitModel.from_backbone("minilm-l6", "sst2", ["0", "1"], max_length=64).eval(), scale=10.0)
    return model, export(model, tmp_path_factory.mktemp("minilm"))


def test_loading_errors_are_one_line(models, tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="is a PyTorch checkpoint, not an ONNX export"):
        OnnxEarlyExitModel.from_pretrained(tiny_checkpoint)
    folder = tmp_path / "broken"
    shutil.copytree(models["bert"][1].directory, folder)
    (folder / "head_02.onnx").unlink()
    with pytest.raises(CheckpointError, match="lacks head_02.onnx; export the checkpoint again"):
        OnnxEarlyExitModel.from_pretrained(folder)
    (folder / "head_02.onnx").write_bytes(b"not a graph")
    with pytest.raises(CheckpointError, match="head_02.onnx is not a usable ONNX graph"):
        OnnxEarlyExitModel.from_pretrained(folder)


def test_missing_onnxruntime_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError, match=r"ONNX Runtime is not installed; install the extra: pip install 'de3bert\[onnx\]'"):
        onnxruntime()
