import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from de3bert.errors import PolicyError
from de3bert.exits.calibration import candidate_policies
from de3bert.exits.engine import EarlyExitEngine
from de3bert.exits.outputs import LayerOutputs
from de3bert.exits.policies import ExitPolicy, simulate_exits
from tests.conftest import padded_batch, tiny_model


def sharpen(model, scale: float = 30.0):
    """Scale the classifiers so a random tiny model spreads its indicators over [0, 1]."""
    with torch.no_grad():
        for head in model.heads:
            head.classifier.weight.mul_(scale)
    return model


def offline(model, batch, policy):
    with torch.no_grad():
        output = model(**batch)
    return simulate_exits(policy, output.layers)


def policies_for(model, batch):
    """For every criterion, a threshold from the middle of its range on this batch (so rows exit at many layers)."""
    with torch.no_grad():
        output = model(**batch)
    outputs = LayerOutputs.from_layers(output.layers, torch.zeros(1))
    chosen = []
    for criterion in ("edr", "entropy", "confidence", "dr", "patience", "pcee"):
        grid = candidate_policies(criterion, outputs, points=9, patience=2)
        chosen.append(grid[len(grid) // 2])
    return chosen


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("batch_size,chunk_size", [(1, None), (7, None), (32, None), (32, 5)])
def test_engine_equals_offline_simulation_for_every_policy(batch_size, chunk_size, pooling):
    model = sharpen(tiny_model(pooling=pooling))
    engine = EarlyExitEngine(model, ExitPolicy("entropy"))
    batch = padded_batch(batch_size, max_len=16, seed=batch_size)
    exit_layers_seen = set()
    for policy in policies_for(model, batch):
        expected = offline(model, batch, policy)
        actual = engine.run_batch(**batch, policy=policy, chunk_size=chunk_size)
        assert actual.exit_layers.tolist() == expected.exit_layers.tolist(), policy
        assert actual.predictions.tolist() == expected.predictions.tolist(), policy
        assert torch.allclose(actual.indicators, expected.indicators, atol=1e-5, equal_nan=True), policy
        exit_layers_seen |= set(actual.exit_layers.tolist())
    if batch_size > 1:
        assert len(exit_layers_seen) > 1  # the test exercises real early exits, not only full depth


def test_engine_stops_computing_at_the_exit_layer():
    model = sharpen(tiny_model())
    calls = []
    for index, layer in enumerate(model.backbone.encoder.encoder.layer):
        layer.register_forward_hook(lambda module, inputs, output, index=index: calls.append((index, inputs[0].shape[0])))
    batch = padded_batch(1, seed=3)
    policy = ExitPolicy("confidence", threshold=0.0)  # every row is confident at layer 1
    result = EarlyExitEngine(model, policy).run_batch(**batch)
    assert result.exit_layers.tolist() == [1]
    assert calls == [(0, 1)]


def test_engine_drops_exited_rows_from_the_batch():
    model = sharpen(tiny_model())
    batch = padded_batch(16, seed=5)
    policy = policies_for(model, batch)[1]  # entropy, mid threshold
    rows_per_layer = []
    for layer in model.backbone.encoder.encoder.layer:
        layer.register_forward_hook(lambda module, inputs, output: rows_per_layer.append(inputs[0].shape[0]))
    result = EarlyExitEngine(model, policy).run_batch(**batch)
    expected = [int((result.exit_layers >= m).sum()) for m in range(1, len(rows_per_layer) + 1)]
    assert rows_per_layer == expected
    assert rows_per_layer[-1] < 16


def test_engine_skips_prototypes_when_the_policy_does_not_read_them():
    model = tiny_model()
    projections = []
    for head in model.heads[:-1]:  # the last layer has no prototypical network
        head.projection.register_forward_hook(lambda *args: projections.append(1))
    EarlyExitEngine(model, ExitPolicy("patience", patience=1)).run_batch(**padded_batch(4))
    assert projections == []
    EarlyExitEngine(model, ExitPolicy("edr", threshold=0.0)).run_batch(**padded_batch(4))
    assert projections


def test_engine_needs_a_policy_and_prototypes_for_edr():
    with pytest.raises(PolicyError, match="no calibrated exit policy"):
        EarlyExitEngine(tiny_model())
    with pytest.raises(PolicyError, match="needs prototypes"):
        EarlyExitEngine(tiny_model(prototype_dim=0), ExitPolicy("edr"))


def test_predict_from_text_returns_input_order(tokenizer):
    model = sharpen(tiny_model(tokenizer=tokenizer))
    texts = ["short", "a considerably longer sentence that needs more tokens than the others do", "mid length text"]
    engine = EarlyExitEngine(model, ExitPolicy("entropy", threshold=0.5), batch_size=2)
    bucketed = engine.predict(texts)
    single = [engine.predict([t])[0] for t in texts]
    assert [p.label for p in bucketed] == [p.label for p in single]
    assert [p.exit_layer for p in bucketed] == [p.exit_layer for p in single]
    assert all(abs(sum(p.probabilities.values()) - 1) < 1e-5 for p in bucketed)


def test_chunks_are_repacked_as_rows_exit():
    model = sharpen(tiny_model())
    batch = padded_batch(16, seed=5)
    policy = policies_for(model, batch)[1]  # entropy, mid threshold
    chunk_rows = []
    for index, layer in enumerate(model.backbone.encoder.encoder.layer):
        layer.register_forward_hook(lambda module, inputs, output, index=index: chunk_rows.append((index, inputs[0].shape[0])))
    result = EarlyExitEngine(model, policy).run_batch(**batch, chunk_size=4)
    for m in range(len(model.heads)):
        active = int((result.exit_layers > m).sum())
        rows = [n for index, n in chunk_rows if index == m]
        assert sum(rows) == active and all(n <= 4 for n in rows)
        assert len(rows) == -(-active // 4)  # survivors fill as few chunks as possible


def test_full_depth_skips_internal_heads():
    model = sharpen(tiny_model())
    heads_called = []
    for index, head in enumerate(model.heads):
        head.register_forward_hook(lambda *args, index=index: heads_called.append(index))
    batch = padded_batch(6)
    result = EarlyExitEngine(model, ExitPolicy("full-depth")).run_batch(**batch)
    assert heads_called == [len(model.heads) - 1]
    assert result.exit_layers.tolist() == [len(model.heads)] * 6
    with torch.no_grad():
        assert result.predictions.tolist() == model(**batch).layers[-1].logits.argmax(-1).tolist()


PROPERTY_MODEL = sharpen(tiny_model(pooling="mean"))
REGRESSION_MODEL = sharpen(tiny_model(labels=(), pooling="mean"), scale=300.0)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 16), st.integers(3, 14), st.integers(0, 10_000), st.sampled_from(
    ["edr", "entropy", "confidence", "dr", "patience", "pcee", "full-depth"]), st.floats(0.0, 1.0),
    st.sampled_from([None, 1, 3]))
def test_engine_equals_offline_simulation_for_random_batches(batch_size, max_len, seed, criterion, threshold, chunk):
    batch = padded_batch(batch_size, max_len=max_len, seed=seed)
    policy = ExitPolicy(criterion, threshold, patience=2 if criterion in ("pcee", "patience") else 1)
    expected = offline(PROPERTY_MODEL, batch, policy)
    actual = EarlyExitEngine(PROPERTY_MODEL, policy).run_batch(**batch, chunk_size=chunk)
    assert actual.exit_layers.tolist() == expected.exit_layers.tolist()
    assert actual.predictions.tolist() == expected.predictions.tolist()
    assert torch.allclose(actual.indicators, expected.indicators, atol=1e-5, equal_nan=True)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 16), st.integers(3, 14), st.integers(0, 10_000), st.floats(0.0, 4.0), st.integers(1, 2),
       st.sampled_from([None, 3]))
def test_regression_engine_equals_offline_simulation_for_random_batches(batch_size, max_len, seed, tolerance,
                                                                         patience, chunk):
    batch = padded_batch(batch_size, max_len=max_len, seed=seed)
    policy = ExitPolicy("regression-patience", tolerance, patience)
    expected = offline(REGRESSION_MODEL, batch, policy)
    actual = EarlyExitEngine(REGRESSION_MODEL, policy).run_batch(**batch, chunk_size=chunk)
    assert actual.exit_layers.tolist() == expected.exit_layers.tolist()
    assert torch.allclose(actual.predictions, expected.predictions, atol=1e-5)


def test_full_depth_on_a_regression_model_matches_offline_simulation():
    batch = padded_batch(6, seed=1)
    expected = offline(REGRESSION_MODEL, batch, ExitPolicy("full-depth"))
    actual = EarlyExitEngine(REGRESSION_MODEL, ExitPolicy("full-depth")).run_batch(**batch)
    assert torch.allclose(actual.predictions, expected.predictions, atol=1e-5)
    assert actual.indicators.tolist() == expected.indicators.tolist() == [0.0] * 6


def test_bf16_autocast_keeps_indicators_sane():
    model = sharpen(tiny_model())
    batch = padded_batch(16, seed=2)
    with torch.no_grad():
        grid = candidate_policies("edr", LayerOutputs.from_layers(model(**batch).layers, torch.zeros(1)), points=9)
    policy = grid[len(grid) // 4]  # some rows exit early, some reach the last layer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = EarlyExitEngine(model, policy).run_batch(**batch)
    early = result.exit_layers < 4  # EDR has no value at the last layer, which has no prototypes
    assert early.any() and torch.isnan(result.indicators[~early]).all()
    indicators = result.indicators[early]
    assert torch.isfinite(indicators).all() and ((indicators >= 0) & (indicators <= 1)).all()
    assert ((result.exit_layers >= 1) & (result.exit_layers <= 4)).all()
    with torch.no_grad():
        full = model(**batch).layers[-1].logits.argmax(-1)
    last = result.exit_layers == 4
    assert (result.predictions[last] == full[last]).float().mean() >= 0.9  # bf16 rounding may flip a near tie


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_engine_equals_offline_simulation_under_cpu_autocast(dtype):
    model = sharpen(tiny_model(pooling="mean"))
    batch = padded_batch(16, max_len=16, seed=4)
    exit_layers_seen = set()
    with torch.autocast("cpu", dtype=dtype):
        for policy in policies_for(model, batch):
            expected = offline(model, batch, policy)
            actual = EarlyExitEngine(model, policy).run_batch(**batch, chunk_size=5)
            assert actual.exit_layers.tolist() == expected.exit_layers.tolist(), policy
            assert actual.predictions.tolist() == expected.predictions.tolist(), policy
            defined = ~(policy.needs_prototypes & (actual.exit_layers == 4))  # no prototypes at the last layer
            indicators = actual.indicators[defined]
            assert torch.isfinite(indicators).all() and ((indicators >= 0) & (indicators <= 1)).all(), policy
            exit_layers_seen |= set(actual.exit_layers.tolist())
    assert len(exit_layers_seen) > 1


def test_the_engine_moves_inputs_to_the_models_device_and_answers_on_the_cpu(tokenizer):
    model = sharpen(tiny_model(tokenizer=tokenizer))
    batch = padded_batch(5, seed=7)
    engine = EarlyExitEngine(model, ExitPolicy("entropy", 0.5), device="cpu")
    result = engine.run_batch(**batch)
    assert result.exit_layers.device.type == "cpu" and engine.model.device.type == "cpu"
    assert result.exit_layers.tolist() == offline(model, batch, ExitPolicy("entropy", 0.5)).exit_layers.tolist()
