"""The engine on an exported folder (one self-exiting graph on ONNX Runtime) makes the same decisions as on
PyTorch: same predictions and exit layers for the exported criterion and for full depth, batches of 1, 7 and 32
with padding, chunked or not, BERT and MPNet, classification and regression, random tiny models and the real
MiniLM-L6 on real sentences; every exit's output comes from the same graph; a criterion the graph was not
exported with, and folders of the old per-layer format, are one-line errors."""

import json
import shutil
import sys

import pytest
import torch

from de3bert.errors import CheckpointError, ExportError, PolicyError
from de3bert.exits.engine import EarlyExitEngine
from de3bert.exits.outputs import LayerOutputs
from de3bert.exits.policies import ExitPolicy, simulate_exits
from de3bert.model.backbones import Backbone
from de3bert.model.config import EarlyExitConfig, ExitHeadConfig
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


def export(model, folder, policy: ExitPolicy) -> OnnxEarlyExitModel:
    """Save a model with `policy` as its calibrated one, export it and load the export."""
    model.config.policy = policy.to_dict()
    model.save_pretrained(folder / "ckpt")
    export_checkpoint(folder / "ckpt", folder / "onnx")
    return OnnxEarlyExitModel.from_pretrained(folder / "onnx")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """(PyTorch model, its export) for each kind of model the engine serves, exported with a criterion of its kind
    whose τ lies in a gap of its indicator values."""
    built = {"bert": (sharpen(tiny_model(pooling="mean", tokenizer=tokenizer)), "edr"),
             "bert-cls-without-prototypes": (sharpen(tiny_model(pooling="cls", prototype_dim=0, tokenizer=tokenizer)),
                                             "confidence"),
             "mpnet": (tiny_mpnet_model(tokenizer), "entropy"),
             "regression": (sharpen(tiny_model(labels=(), pooling="mean", tokenizer=tokenizer), scale=300.0),
                            "regression-patience")}
    calibration = padded_batch(32, max_len=16, seed=32)
    return {name: (model, export(model, tmp_path_factory.mktemp(name),
                                 separated_policies(model, calibration, (criterion,))[0]))
            for name, (model, criterion) in built.items()}


def separated(model, batch, criterion: str, patience: int, lam: float = 1.0, around: float = 0.5) -> ExitPolicy:
    """The criterion's policy with τ in the widest gap between neighbouring indicator values of the batch's internal
    layers, within a quarter of the range around the quantile `around`: rows exit at many layers, and float rounding
    between runtimes cannot carry a row across τ."""
    if criterion in ("patience", "full-depth"):
        return ExitPolicy(criterion, patience=patience)
    with torch.no_grad():
        outputs = LayerOutputs.from_layers(model.layer_outputs(**batch), torch.zeros(1))
    probe, values, previous = ExitPolicy(criterion, patience=patience, lam=lam), [], None
    for head in outputs.heads()[:-1]:
        indicator, previous = probe.indicator(head, previous)
        values.append(indicator[torch.isfinite(indicator)])
    ordered = torch.cat(values).double().unique()
    low, high = (int(q * len(ordered)) for q in (max(0.0, around - 0.25), min(1.0, around + 0.25)))
    window = ordered[low:high + 2]
    widest = int((window[1:] - window[:-1]).argmax())
    return ExitPolicy(criterion, float(window[widest:widest + 2].mean()), patience, lam)


def separated_policies(model, batch, criteria) -> list[ExitPolicy]:
    """For each criterion, τ in the widest gap between neighbouring indicator values in the middle of their range."""
    return [separated(model, batch, criterion, 2 if criterion in ("patience", "pcee", "regression-patience") else 1)
            for criterion in criteria]


def assert_same_exits(model, exported, batch, policy, chunk_size=None):
    expected = EarlyExitEngine(model, policy).run_batch(**batch, chunk_size=chunk_size)
    actual = EarlyExitEngine(exported, policy).run_batch(**batch, chunk_size=chunk_size)
    assert actual.exit_layers.tolist() == expected.exit_layers.tolist(), policy
    assert torch.allclose(actual.predictions.double(), expected.predictions.double(), atol=1e-5), policy
    assert torch.allclose(actual.logits, expected.logits, atol=1e-4), policy
    assert torch.allclose(actual.indicators, expected.indicators, atol=1e-5, equal_nan=True), policy
    return actual


@pytest.mark.parametrize("name", ["bert", "mpnet", "bert-cls-without-prototypes", "regression"])
@pytest.mark.parametrize("batch_size,chunk_size", [(1, None), (7, None), (32, None), (32, 5)])
def test_onnx_engine_equals_pytorch_engine(models, name, batch_size, chunk_size):
    """The exported criterion with its stored policy, another threshold, and full depth."""
    model, exported = models[name]
    batch = padded_batch(batch_size, max_len=16, seed=batch_size)
    stored = ExitPolicy(**exported.config.policy)
    other = separated(model, padded_batch(32, max_len=16, seed=9), stored.criterion, stored.patience, around=0.25)
    exit_layers_seen = set()
    for policy in (stored, other, ExitPolicy("full-depth")):
        exit_layers_seen |= set(assert_same_exits(model, exported, batch, policy, chunk_size).exit_layers.tolist())
    if batch_size == 32:
        assert min(exit_layers_seen) < exported.num_layers  # real early exits, not only full depth


def test_an_export_serves_its_criterion_and_full_depth_only(models):
    model, exported = models["bert"]
    assert exported.criteria == ("edr", "full-depth") and exported.has_prototypes
    with pytest.raises(PolicyError, match="this export decides exits by criterion 'edr' .* --criterion entropy"):
        EarlyExitEngine(exported, ExitPolicy("entropy", 0.5)).run_batch(**padded_batch(2))
    without = models["bert-cls-without-prototypes"][1]
    assert not without.has_prototypes and without.criteria == ("confidence", "full-depth")


def test_onnx_model_gives_every_exit_like_the_pytorch_forward(models):
    model, exported = models["mpnet"]
    batch = padded_batch(6, seed=4)
    with torch.no_grad():
        expected = model.layer_outputs(**batch)
    actual = exported.layer_outputs(**batch)
    assert len(actual) == len(expected) == exported.num_layers == 4
    for ours, theirs in zip(actual, expected):
        assert torch.allclose(ours.logits, theirs.logits, atol=1e-5)
        # the graph's criterion's indicator stands for what the policy would compute from the head
        assert torch.allclose(ours.indicators["entropy"], ExitPolicy("entropy").indicator(theirs, None)[0], atol=1e-5)


def test_every_exit_of_an_export_feeds_calibration_and_explanations(models):
    """Offline simulation on an export's outputs gives the exits the engine gives on it (λ read by the graph)."""
    model, exported = models["bert"]
    batch = padded_batch(12, max_len=16, seed=5)
    policy = ExitPolicy(**exported.config.policy)
    policy = ExitPolicy(policy.criterion, policy.threshold, policy.patience, lam=2.0)
    heads = LayerOutputs.from_layers(exported.layer_outputs(**batch, reads=policy.head_reads), torch.zeros(12)).heads()
    simulated = simulate_exits(policy, heads)
    assert simulated.exit_layers.tolist() == EarlyExitEngine(exported, policy).run_batch(**batch).exit_layers.tolist()
    assert simulated.exit_layers.tolist() == EarlyExitEngine(model, policy).run_batch(**batch).exit_layers.tolist()


def test_real_minilm_on_real_sentences(minilm_pair):
    model, exported = minilm_pair
    sentences = ["a gripping , funny and deeply moving film", "the plot is a mess and the acting is worse",
                 "it 's a charming , often hilarious ride", "tedious , predictable and far too long",
                 "one of the best films of the year", "i walked out after an hour", "not bad at all",
                 "a triumph of style over substance", "the cast is terrific", "dull , dull , dull",
                 "an intelligent , moving story told with grace", "an utterly forgettable sequel"] * 3
    encoded = model.tokenizer(sentences, padding=True, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    policy = ExitPolicy(**exported.config.policy)
    for batch_size in (1, 7, 36):
        part = {k: v[:batch_size] for k, v in batch.items()}
        assert_same_exits(model, exported, part, policy, chunk_size=5)
    ours = EarlyExitEngine(exported).predict(sentences[:12])
    theirs = EarlyExitEngine(model, policy).predict(sentences[:12])
    assert [(p.label, p.exit_layer) for p in ours] == [(p.label, p.exit_layer) for p in theirs]


@pytest.fixture(scope="module")
def minilm_pair(tmp_path_factory):
    """The embedded MiniLM-L6 with random, sharpened mean-pooling heads, and its export."""
    torch.manual_seed(0)
    model = sharpen(EarlyExitModel.from_backbone("minilm-l6", "sst2", ["0", "1"], max_length=64).eval(), scale=10.0)
    sentences = model.tokenizer(["a gripping , funny film", "dull , dull , dull", "not bad at all", "the cast is "
                                 "terrific", "i walked out after an hour", "an utterly forgettable sequel"] * 4,
                                padding=True, return_tensors="pt")
    batch = {"input_ids": sentences["input_ids"], "attention_mask": sentences["attention_mask"]}
    return model, export(model, tmp_path_factory.mktemp("minilm"), separated_policies(model, batch, ("entropy",))[0])


def test_loading_errors_are_one_line(models, tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="is a PyTorch checkpoint, not an ONNX export"):
        OnnxEarlyExitModel.from_pretrained(tiny_checkpoint)
    folder = tmp_path / "broken"
    shutil.copytree(models["bert"][1].directory, folder)
    (folder / "model.onnx").unlink()
    with pytest.raises(CheckpointError, match="lacks model.onnx; export the checkpoint again"):
        OnnxEarlyExitModel.from_pretrained(folder)
    (folder / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(CheckpointError, match="model.onnx is not a usable ONNX graph"):
        OnnxEarlyExitModel.from_pretrained(folder)


def test_a_folder_of_the_per_layer_format_says_to_export_again(models, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(models["bert"][1].directory, folder)
    config = json.loads((folder / "config.json").read_text())
    config["onnx"] = {"quantization": None, "opset": 17, "format_version": 1,
                      "validation": {"embeddings.onnx": 1e-7, "layer_01.onnx": 1e-7}}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"ONNX format version 1 \(a graph per layer.*export the checkpoint "
                                              r"again with `de3bert export"):
        OnnxEarlyExitModel.from_pretrained(folder)


def test_missing_onnxruntime_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError, match=r"ONNX Runtime is not installed; install the extra: pip install 'de3bert\[onnx\]'"):
        onnxruntime()
