"""Wall-clock benchmark: plain Hugging Face model vs our model at full depth vs the early-exit engine.

All systems run side by side in one process on the same inputs and the same batches, interleaved
input by input (batch 1) or batch by batch (batch 32) so that machine noise hits them alike.
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
from de3bert.policies import ExitPolicy, speedup_ratio


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
    """Batch size of the throughput runs."""
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
    return 2 * params / layer


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
    policies = {"full depth (ours)": ExitPolicy("confidence", threshold=1.0)}  # max p > 1 never holds
    for target in settings.targets:
        policies[f"{criterion} @ {target:g}x"] = calibrate(criterion, outputs, task, target, lam=lam)
    plain = plain_hf_model(model)
    engine = EarlyExitEngine(model, policies["full depth (ours)"])
    collator = Collator(model.tokenizer)

    def systems(batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        calls = {"plain HF (full depth)": lambda: plain(**inputs)}
        for name, policy in policies.items():
            calls[name] = lambda policy=policy: engine.run_batch(**inputs, policy=policy)
        return calls

    def timed(batches, desc):
        samples = {name: [[] for _ in batches] for name in ["plain HF (full depth)", *policies]}
        exit_layers = {name: [] for name in policies}
        with torch.inference_mode():
            for name, call in systems(collator([encoded[i] for i in batches[0]])).items():  # warm-up
                call()
            for repeat in range(settings.repeats):
                for index, batch_indices in enumerate(tqdm(batches, desc=f"{desc} pass {repeat + 1}",
                                                           disable=not progress, leave=False)):
                    calls = list(systems(collator([encoded[i] for i in batch_indices])).items())
                    shift = (index + repeat) % len(calls)  # rotate the order to spread drift evenly
                    for name, call in calls[shift:] + calls[:shift]:
                        started = time.perf_counter()
                        result = call()
                        elapsed = time.perf_counter() - started
                        samples[name][index].append(elapsed)
                        if repeat == 0 and name in exit_layers:
                            exit_layers[name].append(result.exit_layers)
        seconds = {name: [statistics.median(runs) for runs in per_batch] for name, per_batch in samples.items()}
        return seconds, {n: torch.cat(v) for n, v in exit_layers.items()}

    single = [[i] for i in range(min(settings.latency_inputs, len(encoded)))]
    count = len(encoded) if settings.throughput_inputs is None else min(settings.throughput_inputs, len(encoded))
    batched = length_sorted_batches([len(encoded[i].input_ids) for i in range(count)], settings.batch_size)
    latency, latency_exits = timed(single, "batch 1")
    throughput, throughput_exits = timed(batched, f"batch {settings.batch_size}")

    base_latency = statistics.median(latency["plain HF (full depth)"])
    base_throughput = count / sum(throughput["plain HF (full depth)"])
    rows = []
    for name in latency:
        p50 = statistics.median(latency[name])
        sentences_per_s = count / sum(throughput[name])
        row = {"system": name, "latency_p50_ms": 1000 * p50, "latency_p95_ms": 1000 * _percentile(latency[name], 0.95),
               "throughput_per_s": sentences_per_s, "wallclock_speedup_batch1": base_latency / p50,
               "wallclock_speedup_batched": sentences_per_s / base_throughput}
        if name in policies:
            row["policy"] = policies[name].to_dict()
            row["layer_speedup_batch1"] = speedup_ratio(latency_exits[name], model.num_layers)
            row["layer_speedup_batched"] = speedup_ratio(throughput_exits[name], model.num_layers)
        rows.append(row)
    full = next(r for r in rows if r["system"] == "full depth (ours)")
    per_layer_overhead = (full["latency_p50_ms"] - rows[0]["latency_p50_ms"]) / model.num_layers
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
    """Bar chart of measured wall-clock speed-up next to the layer speed-up, batch 1 and batched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["system"] for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120, sharey=True)
    for ax, key, title in ((axes[0], "batch1", "batch 1 (latency p50)"),
                           (axes[1], "batched", f"batch {report['settings']['batch_size']} (throughput)")):
        ax.bar([i - 0.2 for i in x], [r.get(f"layer_speedup_{key}", 1.0) for r in rows], 0.4, label="layer speed-up")
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
