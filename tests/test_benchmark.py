import pytest

from de3bert.benchmark import BenchSettings, head_flops_fraction, plain_hf_model, plot_benchmark, run_benchmark
from de3bert.modeling import EarlyExitModel
from tests.conftest import padded_batch


def test_plain_model_shares_the_backbone_weights(tiny_checkpoint):
    model = EarlyExitModel.from_pretrained(tiny_checkpoint)
    plain = plain_hf_model(model)
    batch = padded_batch(3)
    import torch

    with torch.no_grad():
        ours = model.backbone.embed(batch["input_ids"])
        theirs = plain.base_model.embeddings(input_ids=batch["input_ids"])
    assert torch.equal(ours, theirs)
    assert plain.config.num_labels == 2


def test_benchmark_reports_every_system_side_by_side(tiny_checkpoint, glue_dir, tmp_path):
    settings = BenchSettings(criterion="entropy", targets=(1.5, 2.0), latency_inputs=6, batch_size=8, pool_size=16,
                             repeats=2)
    report = run_benchmark(tiny_checkpoint, "sst2", str(glue_dir), settings, progress=False)
    names = [row["system"] for row in report["rows"]]
    assert names == ["plain HF (full depth)", "full depth (ours)", "every head, no exit (ours)", "entropy @ 1.5x",
                     "entropy @ 2x"]
    for row in report["rows"][1:3]:
        assert row["layer_speedup_batch1"] == pytest.approx(1.0) and row["layer_speedup_batched"] == pytest.approx(1.0)
    for row in report["rows"][3:]:
        assert row["layer_speedup_batched"] >= 1.0
        assert row["latency_p50_ms"] > 0 and row["throughput_per_s"] > 0 and row["throughput_pooled_per_s"] > 0
    assert report["overhead"]["measured_head_and_policy_ms_per_layer_batch1"] == pytest.approx(
        (report["rows"][2]["latency_mean_ms"] - report["rows"][1]["latency_mean_ms"]) / 3)
    assert report["throughput_inputs"] == 32 and report["latency_inputs"] == 6
    assert plot_benchmark(report, tmp_path / "bench.png").stat().st_size > 10_000


def test_head_flops_are_small_relative_to_a_layer(tiny_checkpoint):
    model = EarlyExitModel.from_pretrained(tiny_checkpoint)
    assert 0 < head_flops_fraction(model, 64) < 0.1
