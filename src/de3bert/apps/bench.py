"""Wall-clock benchmark: the plain model a user would otherwise deploy against our early-exit engine.

All systems run side by side in one process on the same inputs, with the same thread count,
interleaved unit by unit in a fresh random order so that machine noise hits them alike. On a PyTorch
checkpoint the systems are the stock Hugging Face model of the same backbone and weights ("plain
PyTorch") and our engine on PyTorch at full depth, computing every head without exiting, and at
calibrated layer speed-ups.
On an exported folder (`de3bert export`) the same systems also run on ONNX Runtime: the stock model
exported whole, traced, optimized (and quantized) like our pieces ("plain ORT", the reference a user
deploying on the CPU would pick), our exported graph at the policies above (its criterion's), and at
full depth a graph of the same checkpoint exported with `--criterion full-depth` (no internal head);
the PyTorch systems come from the checkpoint the folder was exported from. Three modes:

- batch 1: one input per call (latency; the speed-up is the ratio of mean latencies, the quantity
  the layer speed-up predicts; p50/p95 are reported too);
- batched: length-sorted batches of `batch_size`, each run on its own (rows that exit leave the
  batch, so late layers run on the survivors only);
- pooled: pools of `pool_size` length-sorted inputs run in compute chunks of `batch_size` rows (what
  `EarlyExitEngine.run_examples`, `de3bert predict` and the service do): on PyTorch layer by layer with
  survivors re-packed into full chunks, on ONNX Runtime each chunk through the graph. The plain models
  run the same chunks.

Thresholds are calibrated on the benchmark inputs (in PyTorch) to target layer speed-ups and used on
both runtimes; the layer speed-up each system actually achieved is reported next to the measured
wall-clock speed-up, and our systems' metric on the batched inputs next to both.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from de3bert.apps.runtimes import RUNTIMES, folder_runtime, load_model
from de3bert.data import Collator, compute_metrics, encode_examples, length_sorted_batches, main_metric
from de3bert.devices import PRECISIONS, synchronize
from de3bert.errors import CheckpointError, PolicyError
from de3bert.evaluation.run_data import evaluation_source, split_examples
from de3bert.exits.calibration import calibrate
from de3bert.exits.criteria import CRITERIA, FULL_DEPTH
from de3bert.exits.engine import EarlyExitEngine
from de3bert.exits.outputs import collect_layer_outputs
from de3bert.exits.policies import ExitPolicy, speedup_ratio
from de3bert.knobs import knob
from de3bert.model.config import WEIGHTS_NAME, checkpoint_digest
from de3bert.model.modeling import EarlyExitModel, plain_classifier
from de3bert.onnx.export import export_checkpoint, export_plain_classifier
from de3bert.onnx.runtime import OnnxEarlyExitModel
from de3bert.onnx.sessions import Graph, inference_session


@dataclass
class BenchSettings:
    """Knobs of a wall-clock benchmark run."""

    criterion: str | None = knob(None, "exit criterion to calibrate (unset: the checkpoint's default policy's)",
                                 choices=tuple(CRITERIA))
    targets: tuple[float, ...] = knob((1.5, 2.0, 3.0), "layer speed-ups to calibrate thresholds to")
    latency_inputs: int = knob(200, "inputs timed one at a time (batch 1)")
    throughput_inputs: int | None = knob(None, "inputs in the batched runs (unset: the whole split)")
    batch_size: int = knob(32, "batch size of the throughput runs (and compute chunk of the pooled runs)")
    pool_size: int = knob(256, "inputs run layer by layer together in the pooled runs (survivors re-packed)")
    repeats: int = knob(3, "repeated passes (medians are reported)")
    threads: int = knob(2, "threads of every system: torch.set_num_threads and ONNX Runtime's intra-op threads")
    split: str = knob("dev", "data split to time")
    runtime: str | None = knob(None, "torch (the PyTorch systems) or onnx (an exported folder: the ONNX Runtime "
                                     "systems too, next to the PyTorch ones of the checkpoint it was exported "
                                     "from); unset: the one the folder was written for", choices=RUNTIMES)
    device: str = knob("auto", "where the PyTorch systems run: auto, cpu, cuda or cuda:N (ONNX Runtime systems run "
                               "on the CPU)")
    precision: str = knob("auto", "precision of the PyTorch systems' weights: auto (fp32 on the CPU, bf16 on a GPU), "
                                  "fp32, bf16 or fp16", choices=PRECISIONS)


@dataclass
class System:
    """One timed system: its row name, runtime ("PyTorch", "ORT" or "ORT int8"), how it runs a unit (given the
    whole unit and the same unit cut into chunks of batch_size), and the exit policy of ours (None: a plain model)."""

    name: str
    runtime: str
    run: Callable[[dict, list[dict]], object]
    policy: ExitPolicy | None = None


def head_flops_fraction(model: EarlyExitModel, seq_len: int) -> float:
    """FLOPs of one exit head (with prototypes) relative to one encoder layer at a sequence length."""
    hidden = model.backbone.hidden_size
    intermediate = model.backbone.config.intermediate_size
    layer = 2 * seq_len * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * seq_len * seq_len * hidden
    head = model.heads[0]
    params = sum(p.numel() for p in head.parameters())
    pooling = seq_len * hidden if head.pooling == "mean" else 0
    return (2 * params + pooling) / layer


def source_checkpoint(exported: OnnxEarlyExitModel) -> Path:
    """The PyTorch checkpoint an export was written from, unchanged since (the plain models take its weights)."""
    source = Path(exported.export.source.get("checkpoint", ""))
    if not (source / WEIGHTS_NAME).exists():
        raise CheckpointError(f"the benchmark builds the plain models from the checkpoint {exported.directory} was "
                              f"exported from, {source}, which is gone; bench that checkpoint or export it again")
    if checkpoint_digest(source) != exported.export.source.get("weights_sha256"):
        raise CheckpointError(f"checkpoint {source} changed since {exported.directory} was exported from it; "
                              "export it again")
    return source


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _our_systems(runtime: str, engine: EarlyExitEngine, policies: dict[str, ExitPolicy], batch_size: int) -> list[System]:
    """Our engine on one runtime, one system per policy."""
    return [System(f"ours {runtime}, {name}", runtime, lambda whole, chunks, policy=policy: engine.run_batch(
        **whole, policy=policy, chunk_size=batch_size), policy) for name, policy in policies.items()]


def _plain_systems(model: EarlyExitModel, exported: OnnxEarlyExitModel | None, threads: int) -> list[System]:
    """The plain model in PyTorch (on the device and in the precision of ours) and, next to an export, exported
    whole on ONNX Runtime (float32, and quantized as the export is); it runs the chunks of each unit."""
    weights = next(model.parameters())
    plain = plain_classifier(model).to(device=weights.device, dtype=weights.dtype)
    systems = [System("plain PyTorch", "PyTorch", lambda whole, chunks: [
        plain(**{name: value.to(weights.device) for name, value in chunk.items()}).logits for chunk in chunks])]
    if exported is None:
        return systems
    with tempfile.TemporaryDirectory(prefix="de3bert-bench-") as scratch:  # sessions keep their graphs in memory
        for quantize in dict.fromkeys([None, exported.export.quantization]):
            folder = Path(scratch) / (quantize or "float32")
            folder.mkdir()
            graph = Graph(inference_session(export_plain_classifier(model, folder, quantize), threads))
            runtime = _ort_label(quantize)
            systems.append(System(f"plain {runtime}", runtime, lambda whole, chunks, graph=graph: [
                graph.run(None, {name: value.numpy() for name, value in chunk.items()}) for chunk in chunks]))
    return systems


def full_depth_graph(exported: OnnxEarlyExitModel, threads: int) -> OnnxEarlyExitModel:
    """The checkpoint an export came from, exported again at full depth (no internal head) and quantized as the export
    is: what full depth costs on ONNX Runtime."""
    with tempfile.TemporaryDirectory(prefix="de3bert-bench-") as scratch:  # the session keeps its graph in memory
        folder = Path(scratch) / FULL_DEPTH
        export_checkpoint(source_checkpoint(exported), folder, exported.export.quantization, FULL_DEPTH)
        return OnnxEarlyExitModel.from_pretrained(folder, threads)


def _ort_label(quantization: str | None) -> str:
    """How rows name ONNX Runtime with a quantization ("ORT", "ORT int8")."""
    return "ORT" if quantization is None else f"ORT {quantization}"


def running_order(systems: list, unit: int, repeat: int) -> list:
    """The systems in a fresh random order for one unit of one pass (seeded, so runs repeat): drift spreads evenly
    and no system always follows the same one (a system that leaves the machine busy — a thread pool still
    spinning, caches evicted — would otherwise always slow the same successor)."""
    order = list(systems)
    random.Random(unit * 1_000_003 + repeat).shuffle(order)
    return order


def run_benchmark(folder: str | Path, task_name: str | None = None, data_dir: str | None = None,
                  settings: BenchSettings | None = None, progress: bool = True) -> dict:
    """Latency (batch 1) and throughput (batched, pooled) of every system; returns a JSON-ready report."""
    settings = settings or BenchSettings()
    torch.set_num_threads(settings.threads)
    runtime = settings.runtime or folder_runtime(folder)
    exported = load_model(folder, runtime, settings.threads) if runtime == "onnx" else None
    model = load_model(source_checkpoint(exported) if exported else folder, "torch", device=settings.device,
                       precision=settings.precision)
    device = next(model.parameters()).device
    data, _, examples = split_examples(model, evaluation_source(model, task_name, data_dir), settings.split)
    task = data.task
    encoded = encode_examples(model.tokenizer, examples, model.config.max_length)
    if settings.criterion is None and not model.config.policy:
        raise PolicyError(f"{folder} has no calibrated exit policy; give the criterion to time (--criterion)")
    default = ExitPolicy(**(exported or model).config.policy) if model.config.policy else ExitPolicy(settings.criterion)
    criterion, lam = settings.criterion or default.criterion, default.lam
    if exported is not None and criterion != exported.criterion:
        raise PolicyError(f"{folder} decides exits by criterion '{exported.criterion}', not '{criterion}': bench that "
                          "criterion, or export the checkpoint again with --criterion")
    outputs = collect_layer_outputs(model, encoded)
    probe = "every head, no exit"
    policies = {"full depth": ExitPolicy(FULL_DEPTH), probe: ExitPolicy.never_exiting(criterion, model.num_layers, lam)}
    for target in settings.targets:
        policies[f"{criterion} @ {target:g}x"] = calibrate(criterion, outputs, target, lam=lam)
    plains = _plain_systems(model, exported, settings.threads)
    ours = _our_systems("PyTorch", EarlyExitEngine(model, policies["full depth"]), policies, settings.batch_size)
    if exported is not None:
        runtime, full_depth = _ort_label(exported.export.quantization), policies.pop("full depth")
        ours += _our_systems(runtime, EarlyExitEngine(full_depth_graph(exported, settings.threads), full_depth),
                             {"full depth": full_depth}, settings.batch_size)
        ours += _our_systems(runtime, EarlyExitEngine(exported, policies[probe]), policies, settings.batch_size)
    systems = plains + ours
    reference = plains[-1].name  # the plain model on the runtime, and in the precision, ours run last on
    collator = Collator(model.tokenizer)

    def collate(indices):
        batch = collator([encoded[i] for i in indices])
        batch.pop("labels")
        return batch

    def timed(units, desc):
        """Median seconds per unit of every system, and the results of ours in the first pass."""
        samples = {system.name: [[] for _ in units] for system in systems}
        results = {system.name: [] for system in systems if system.policy is not None}
        prepared = [(collate(unit), [collate(unit[i:i + settings.batch_size])
                                     for i in range(0, len(unit), settings.batch_size)]) for unit in units]
        with torch.inference_mode():
            for system in systems:  # warm-up
                system.run(*prepared[0])
            for repeat in range(settings.repeats):
                for index, unit in enumerate(tqdm(prepared, desc=f"{desc} pass {repeat + 1}",
                                                  disable=not progress, leave=False)):
                    for system in running_order(systems, index, repeat):
                        started = time.perf_counter()
                        result = system.run(*unit)
                        synchronize(device)  # a GPU may still be computing what the call queued
                        samples[system.name][index].append(time.perf_counter() - started)
                        if repeat == 0 and system.name in results:
                            results[system.name].append(result)
        seconds = {name: [statistics.median(runs) for runs in per_unit] for name, per_unit in samples.items()}
        return seconds, results

    single = [[i] for i in range(min(settings.latency_inputs, len(encoded)))]
    count = len(encoded) if settings.throughput_inputs is None else min(settings.throughput_inputs, len(encoded))
    lengths = [len(encoded[i].input_ids) for i in range(count)]
    batched = length_sorted_batches(lengths, settings.batch_size)
    by_length = sorted(range(count), key=lambda i: lengths[i])
    pooled = [by_length[i:i + settings.pool_size] for i in range(0, count, settings.pool_size)]
    latency, latency_results = timed(single, "batch 1")
    throughput, throughput_results = timed(batched, f"batch {settings.batch_size}")
    pooled_seconds, _ = timed(pooled, f"pools of {settings.pool_size}")

    labels = [encoded[i].label for unit in batched for i in unit]
    rows = []
    for system in systems:
        name = system.name
        row = {"system": name, "runtime": system.runtime, "latency_p50_ms": 1000 * statistics.median(latency[name]),
               "latency_p95_ms": 1000 * _percentile(latency[name], 0.95),
               "latency_mean_ms": 1000 * statistics.fmean(latency[name]),
               "throughput_per_s": count / sum(throughput[name]),
               "throughput_pooled_per_s": count / sum(pooled_seconds[name])}
        for mode, timings in (("batch1", latency), ("batched", throughput), ("pooled", pooled_seconds)):
            row[f"wallclock_speedup_{mode}"] = sum(timings[reference]) / sum(timings[name])
            for plain in plains:
                row[f"speedup_vs_{plain.name.replace(' ', '_')}_{mode}"] = sum(timings[plain.name]) / sum(timings[name])
        if system.policy is not None:
            exits = throughput_results[name]
            row["policy"] = system.policy.to_dict()
            row["layer_speedup_batch1"] = speedup_ratio(torch.cat([r.exit_layers for r in latency_results[name]]),
                                                        model.num_layers)
            row["layer_speedup_batched"] = speedup_ratio(torch.cat([r.exit_layers for r in exits]), model.num_layers)
            predictions = torch.cat([r.predictions for r in exits]).tolist()
            row["metric"] = main_metric(task, compute_metrics(task, predictions, labels))
        rows.append(row)
    by_name = {row["system"]: row for row in rows}
    head_cost = {runtime: (by_name[f"ours {runtime}, {probe}"]["latency_mean_ms"]
                           - by_name[f"ours {runtime}, full depth"]["latency_mean_ms"]) / (model.num_layers - 1)
                 for runtime in dict.fromkeys(system.runtime for system in ours)}
    mean_len = sum(len(e.input_ids) for e in encoded[:count]) / count
    return {
        "checkpoint": str(folder), "task": task.name, "split": settings.split, "backbone": model.config.backbone_name,
        "num_layers": model.num_layers, "threads": settings.threads, "settings": asdict(settings),
        "reference": reference, "metric": task.main_metric, "latency_inputs": len(single),
        "throughput_inputs": count, "mean_tokens": mean_len,
        "overhead": model.overhead() | {"head_flops_per_layer_fraction": head_flops_fraction(model, round(mean_len)),
                                         "measured_head_and_policy_ms_per_layer_batch1": head_cost},
        "rows": rows,
    }


def plot_benchmark(report: dict, path: str | Path) -> Path:
    """Bar chart of measured wall-clock speed-up next to the layer speed-up, for each batching mode."""
    from de3bert.evaluation.plots import save_figure  # first: it sets matplotlib's file-only backend

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
    axes[0].set_ylabel(f"speed-up vs {report['reference']}")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['task']} {report['split']}, {report['backbone']} ({report['num_layers']} layers), "
                 f"{report['threads']} threads")
    return save_figure(fig, path)
