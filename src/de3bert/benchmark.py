"""Wall-clock benchmark: plain Hugging Face model vs our model at full depth vs the early-exit engine.

All systems run side by side in one process on the same inputs, interleaved unit by unit so that
machine noise hits them alike, in three modes:

- batch 1: one input per call (latency; the speed-up is the ratio of mean latencies, the quantity
  the layer speed-up predicts; p50/p95 are reported too);
- batched: length-sorted batches of `batch_size`, each run on its own (rows that exit leave the
  batch, so late layers run on the survivors only);
- pooled: pools of `pool_size` length-sorted inputs run layer by layer in compute chunks of
  `batch_size` rows, survivors re-packed into full chunks (what `EarlyExitEngine.run_examples`,
  `de3bert predict` and the service do). The plain model runs the same chunks.

Thresholds are calibrated on the benchmark inputs to target layer speed-ups, and the layer
speed-up the engine actually achieved is reported next to the measured wall-clock speed-up.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification

from de3bert.data import Collator, encode_examples, length_sorted_batches, load_split
from de3bert.engine import EarlyExitEngine
from de3bert.evaluation import calibrate, collect_layer_outputs
from de3bert.modeling import EarlyExitModel
from de3bert.policies import CRITERIA, ExitPolicy, speedup_ratio


@dataclass
class BenchSettings:
    """Knobs of a wall-clock benchmark run."""

    criterion: str | None = None
    """Exit criterion to calibrate (None: the checkpoint's default policy's criterion)."""
    targets: tuple[float, ...] = (1.5, 2.0, 3.0)
    """Layer speed-ups to calibrate thresholds to."""
    latency_inputs: int = 200
    """How many inputs are timed one at a time (batch 1)."""
    throughput_inputs: int | None = None
    """How many inputs the batched runs use (None: the whole split)."""
    batch_size: int = 32
    """Batch size of the throughput runs (and compute chunk of the pooled runs)."""
    pool_size: int = 256
    """Inputs per pool in the pooled runs."""
    repeats: int = 3
    """Repeated passes; medians are reported."""
    threads: int = 2
    """torch.set_num_threads for the run."""
    split: str = "dev"
    """Data split to benchmark on."""


def plain_hf_model(model: EarlyExitModel) -> nn.Module:
    """The stock Hugging Face sequence-classification model of the same backbone, with its weights."""
    backbone = dict(model.config.backbone)
    config = AutoConfig.for_model(backbone.pop("model_type"), **backbone)
    config.num_labels = model.config.num_labels
    plain = AutoModelForSequenceClassification.from_config(config)
    plain.base_model.load_state_dict(model.backbone.encoder.state_dict(), strict=False)
    return plain.eval()


def head_flops_fraction(model: EarlyExitModel, seq_len: int) -> float:
    """FLOPs of one exit head (with prototypes) relative to one encoder layer at a sequence length."""
    hidden = model.backbone.hidden_size
    intermediate = model.backbone.config.intermediate_size
    layer = 2 * seq_len * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * seq_len * seq_len * hidden
    head = model.heads[0]
    params = sum(p.numel() for p in head.parameters())
    pooling = seq_len * hidden if head.pooling == "mean" else 0
    return (2 * params + pooling) / layer


def never_exiting(criterion: str, lam: float, num_layers: int) -> ExitPolicy:
    """A policy of the criterion that computes every head and indicator but never exits early."""
    if criterion in ("patience", "regression-patience"):
        return ExitPolicy(criterion, threshold=0.0, patience=num_layers)
    below = CRITERIA[criterion][1]
    return ExitPolicy(criterion, threshold=0.0 if below else 1.0, lam=lam)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_benchmark(checkpoint: str | Path, task_name: str | None = None, data_dir: str | None = None,
                  settings: BenchSettings | None = None, progress: bool = True) -> dict:
    """Latency (batch 1) and throughput (batched) of the three systems; returns a JSON-ready report."""
    settings = settings or BenchSettings()
    torch.set_num_threads(settings.threads)
    model = EarlyExitModel.from_pretrained(checkpoint)
    task_name = task_name or model.config.task
    task, examples = load_split(task_name, settings.split, data_dir)
    encoded = encode_examples(model.tokenizer, examples, model.config.max_length)
    criterion = settings.criterion or (model.config.policy or {}).get("criterion", "entropy")
    lam = (model.config.policy or {}).get("lam", 1.0)
    outputs = collect_layer_outputs(model, encoded)
    probe = "every head, no exit (ours)"
    policies = {"full depth (ours)": ExitPolicy("full-depth"), probe: never_exiting(criterion, lam, model.num_layers)}
    for target in settings.targets:
        policies[f"{criterion} @ {target:g}x"] = calibrate(criterion, outputs, task, target, lam=lam)
    plain = plain_hf_model(model)
    engine = EarlyExitEngine(model, policies["full depth (ours)"])
    collator = Collator(model.tokenizer)
    names = ["plain HF (full depth)", *policies]

    def collate(indices):
        batch = collator([encoded[i] for i in indices])
        batch.pop("labels")
        return batch

    def timed(units, desc):
        """Median seconds per unit of every system (plain HF runs each unit in chunks of batch_size)."""
        samples = {name: [[] for _ in units] for name in names}
        exit_layers = {name: [] for name in policies}
        prepared = [(collate(unit), [collate(unit[i:i + settings.batch_size])
                                     for i in range(0, len(unit), settings.batch_size)]) for unit in units]

        def calls(whole, chunks):
            result = {"plain HF (full depth)": lambda: [plain(**chunk) for chunk in chunks]}
            for name, policy in policies.items():
                result[name] = lambda policy=policy: engine.run_batch(**whole, policy=policy,
                                                                      chunk_size=settings.batch_size)
            return list(result.items())

        with torch.inference_mode():
            for _, call in calls(*prepared[0]):  # warm-up
                call()
            for repeat in range(settings.repeats):
                for index, unit in enumerate(tqdm(prepared, desc=f"{desc} pass {repeat + 1}",
                                                  disable=not progress, leave=False)):
                    ordered = calls(*unit)
                    shift = (index + repeat) % len(ordered)  # rotate the order to spread drift evenly
                    for name, call in ordered[shift:] + ordered[:shift]:
                        started = time.perf_counter()
                        result = call()
                        samples[name][index].append(time.perf_counter() - started)
                        if repeat == 0 and name in exit_layers:
                            exit_layers[name].append(result.exit_layers)
        seconds = {name: [statistics.median(runs) for runs in per_unit] for name, per_unit in samples.items()}
        return seconds, {n: torch.cat(v) for n, v in exit_layers.items()}

    single = [[i] for i in range(min(settings.latency_inputs, len(encoded)))]
    count = len(encoded) if settings.throughput_inputs is None else min(settings.throughput_inputs, len(encoded))
    lengths = [len(encoded[i].input_ids) for i in range(count)]
    batched = length_sorted_batches(lengths, settings.batch_size)
    by_length = sorted(range(count), key=lambda i: lengths[i])
    pooled = [by_length[i:i + settings.pool_size] for i in range(0, count, settings.pool_size)]
    latency, latency_exits = timed(single, "batch 1")
    throughput, throughput_exits = timed(batched, f"batch {settings.batch_size}")
    pooled_seconds, _ = timed(pooled, f"pools of {settings.pool_size}")

    base = "plain HF (full depth)"
    rows = []
    for name in names:
        row = {"system": name, "latency_p50_ms": 1000 * statistics.median(latency[name]),
               "latency_p95_ms": 1000 * _percentile(latency[name], 0.95),
               "latency_mean_ms": 1000 * statistics.fmean(latency[name]),
               "throughput_per_s": count / sum(throughput[name]),
               "throughput_pooled_per_s": count / sum(pooled_seconds[name]),
               "wallclock_speedup_batch1": sum(latency[base]) / sum(latency[name]),
               "wallclock_speedup_batched": sum(throughput[base]) / sum(throughput[name]),
               "wallclock_speedup_pooled": sum(pooled_seconds[base]) / sum(pooled_seconds[name])}
        if name in policies:
            row["policy"] = policies[name].to_dict()
            row["layer_speedup_batch1"] = speedup_ratio(latency_exits[name], model.num_layers)
            row["layer_speedup_batched"] = speedup_ratio(throughput_exits[name], model.num_layers)
        rows.append(row)
    full = next(r for r in rows if r["system"] == "full depth (ours)")
    every_head = next(r for r in rows if r["system"] == probe)
    per_layer_overhead = (every_head["latency_mean_ms"] - full["latency_mean_ms"]) / (model.num_layers - 1)
    mean_len = sum(len(e.input_ids) for e in encoded[:count]) / count
    return {
        "checkpoint": str(checkpoint), "task": task.name, "split": settings.split, "backbone": model.config.backbone_name,
        "num_layers": model.num_layers, "threads": settings.threads, "settings": asdict(settings),
        "latency_inputs": len(single), "throughput_inputs": count, "mean_tokens": mean_len,
        "overhead": model.overhead() | {"head_flops_per_layer_fraction": head_flops_fraction(model, round(mean_len)),
                                         "measured_head_and_policy_ms_per_layer_batch1": per_layer_overhead},
        "rows": rows,
    }


def plot_benchmark(report: dict, path: str | Path) -> Path:
    """Bar chart of measured wall-clock speed-up next to the layer speed-up, for each batching mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["system"] for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), dpi=120, sharey=True)
    batch, pool = report["settings"]["batch_size"], report["settings"]["pool_size"]
    for ax, key, layer_key, title in ((axes[0], "batch1", "batch1", "batch 1 (mean latency)"),
                                      (axes[1], "batched", "batched", f"batches of {batch}"),
                                      (axes[2], "pooled", "batched", f"pools of {pool}, chunks of {batch}")):
        ax.bar([i - 0.2 for i in x], [r.get(f"layer_speedup_{layer_key}", 1.0) for r in rows], 0.4,
               label="layer speed-up")
        ax.bar([i + 0.2 for i in x], [r[f"wallclock_speedup_{key}"] for r in rows], 0.4, label="measured wall-clock")
        ax.set_xticks(list(x), names, rotation=25, ha="right", fontsize=8)
        ax.set_title(title)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("speed-up vs plain HF model")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['task']} {report['split']}, {report['backbone']} ({report['num_layers']} layers), "
                 f"{report['threads']} threads")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
