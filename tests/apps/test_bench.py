import shutil

import pytest
import torch

from de3bert.apps.bench import BenchSettings, head_flops_fraction, plot_benchmark, run_benchmark, running_order
from de3bert.errors import CheckpointError
from de3bert.model.modeling import EarlyExitModel, plain_classifier
from tests.conftest import padded_batch

SETTINGS = BenchSettings(criterion="entropy", targets=(1.5, 2.0), latency_inputs=6, batch_size=8, pool_size=16,
                         repeats=2)
OURS = ["full depth", "every head, no exit", "entropy @ 1.5x", "entropy @ 2x"]


def test_plain_model_shares_the_backbone_weights(tiny_checkpoint):
    model = EarlyExitModel.from_pretrained(tiny_checkpoint)
    plain = plain_classifier(model)
    batch = padded_batch(3)
    with torch.no_grad():
        ours = model.backbone.embed(batch["input_ids"])
        theirs = plain.base_model.embeddings(input_ids=batch["input_ids"])
    assert torch.equal(ours, theirs)
    assert plain.config.num_labels == 2


def test_benchmark_reports_every_system_side_by_side(tiny_checkpoint, glue_dir, tmp_path):
    report = run_benchmark(tiny_checkpoint, "sst2", str(glue_dir), SETTINGS, progress=False)
    names = [row["system"] for row in report["rows"]]
    assert names == ["plain PyTorch", *(f"ours PyTorch, {name}" for name in OURS)]
    assert report["reference"] == "plain PyTorch"
    for row in report["rows"][1:3]:
        assert row["layer_speedup_batch1"] == pytest.approx(1.0) and row["layer_speedup_batched"] == pytest.approx(1.0)
    for row in report["rows"][3:]:
        assert row["layer_speedup_batched"] >= 1.0 and 0.0 <= row["metric"] <= 1.0
        assert row["latency_p50_ms"] > 0 and row["throughput_per_s"] > 0 and row["throughput_pooled_per_s"] > 0
        assert row["speedup_vs_plain_PyTorch_batch1"] == row["wallclock_speedup_batch1"]
    assert report["overhead"]["measured_head_and_policy_ms_per_layer_batch1"]["PyTorch"] == pytest.approx(
        (report["rows"][2]["latency_mean_ms"] - report["rows"][1]["latency_mean_ms"]) / 3)
    assert report["throughput_inputs"] == 32 and report["latency_inputs"] == 6
    assert plot_benchmark(report, tmp_path / "bench.png").stat().st_size > 10_000


def test_benchmark_of_an_export_times_both_runtimes_against_plain_onnx_runtime(tiny_export, glue_dir):
    report = run_benchmark(tiny_export, "sst2", str(glue_dir), SETTINGS, progress=False)
    names = [row["system"] for row in report["rows"]]
    assert names == ["plain PyTorch", "plain ORT", *(f"ours {runtime}, {name}" for runtime in ("PyTorch", "ORT")
                                                     for name in OURS)]
    assert report["reference"] == "plain ORT"
    rows = {row["system"]: row for row in report["rows"]}
    for name in OURS:  # float32 graphs: the same exits, the same answers
        torch_row, onnx_row = rows[f"ours PyTorch, {name}"], rows[f"ours ORT, {name}"]
        assert onnx_row["layer_speedup_batched"] == pytest.approx(torch_row["layer_speedup_batched"])
        assert onnx_row["metric"] == pytest.approx(torch_row["metric"]) and onnx_row["runtime"] == "ORT"
        assert onnx_row["speedup_vs_plain_ORT_pooled"] == onnx_row["wallclock_speedup_pooled"] > 0
    assert rows["plain ORT"]["wallclock_speedup_batch1"] == 1.0
    assert set(report["overhead"]["measured_head_and_policy_ms_per_layer_batch1"]) == {"PyTorch", "ORT"}


def test_benchmark_of_an_export_needs_its_checkpoint(tiny_checkpoint, tiny_export, glue_dir, tmp_path):
    moved = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, moved)
    folder = tmp_path / "onnx"
    shutil.copytree(tiny_export, folder)
    config = (folder / "config.json").read_text().replace(str(tiny_checkpoint.resolve()), str(tmp_path / "gone"))
    (folder / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="builds the plain models from the checkpoint .* which is gone"):
        run_benchmark(folder, "sst2", str(glue_dir), SETTINGS, progress=False)
    (folder / "config.json").write_text(config.replace(str(tmp_path / "gone"), str(moved)))
    (moved / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(CheckpointError, match="changed since .* was exported from it; export it again"):
        run_benchmark(folder, "sst2", str(glue_dir), SETTINGS, progress=False)


def test_head_flops_are_small_relative_to_a_layer(tiny_checkpoint):
    model = EarlyExitModel.from_pretrained(tiny_checkpoint)
    assert 0 < head_flops_fraction(model, 64) < 0.1


def test_systems_run_in_a_fresh_order_for_every_unit_and_no_system_always_follows_the_same_one():
    systems = ["plain PyTorch", "plain ORT", "ours PyTorch", "ours ORT"]
    orders = [running_order(systems, unit, repeat) for repeat in range(2) for unit in range(50)]
    assert all(sorted(order) == sorted(systems) for order in orders)
    assert running_order(systems, 7, 1) == running_order(systems, 7, 1)  # seeded: a rerun times the same orders
    predecessors = {(order[i - 1], order[i]) for order in orders for i in range(1, len(order))}
    assert all(len({a for a, b in predecessors if b == s}) == len(systems) - 1 for s in systems)
