"""Single-graph probe: one self-exiting ONNX graph (`onnx.graph.build_exit_graph`) against the plain model on
ONNX Runtime, side by side.

On a trained checkpoint and its task's dev split this builds the plain sequence classifier exported whole
(`onnx.export.export_plain_classifier`, "plain ORT") and our graphs — full depth (no internal heads), and the
checkpoint's criterion, which serves every threshold from one file: every head computed but never exiting (patience
M), the stored policy, and thresholds calibrated in PyTorch to 1.5x/2x/3x layer speed-up — in float32 and int8, plus
variants that price design choices (the max_layer input, compacting at every level, the weights read from the main
graph). Every system runs on the same inputs with 2 intra-op threads and no spinning, interleaved in a fresh random
order per input, at batch 1 (the first `--latency-inputs` dev sentences) and in length-sorted batches of 32 (the
whole split); medians of `--repeats` passes per input. Ratios are of summed times against plain ORT of the same
precision; "wall/layer" is that ratio over the layer speed-up the system achieved. ONNX Runtime profiles then say
where time goes.

    PYTHONPATH=src .venv/bin/python benchmarks/single_graph_probe.py --checkpoint runs/demo-sst2 --overwrite

Writes <output>/<checkpoint name>.json and .md (--output: results/single_graph; the JSON with the machine's load
before and after every pass: only trust a run on an otherwise idle machine), and refuses, before any work, to
replace earlier results without --overwrite. A smoke run that only checks the script works:

    PYTHONPATH=src .venv/bin/python benchmarks/single_graph_probe.py --checkpoint runs/demo-sst2 \\
        --latency-inputs 4 --batched-inputs 32 --repeats 1 --wait-idle 0 --output /tmp/probe-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from de3bert.apps.bench import running_order
from de3bert.data import Collator, TaskSpec, compute_metrics, encode_examples, length_sorted_batches, main_metric
from de3bert.evaluation.run_data import evaluation_source, split_examples
from de3bert.exits.calibration import calibrate
from de3bert.exits.outputs import LayerOutputs, collect_layer_outputs
from de3bert.exits.policies import ExitPolicy, speedup_ratio
from de3bert.model.modeling import EarlyExitModel
from de3bert.onnx.export import export_plain_classifier
from de3bert.onnx.format import POLICY_INPUTS, OnnxExportInfo
from de3bert.onnx.graph import build_exit_graph
from de3bert.onnx.runtime import OnnxEarlyExitModel
from de3bert.onnx.sessions import inference_session

RESULTS = Path("results") / "single_graph"
PRECISIONS = {"float32": None, "int8": "int8"}
CALIBRATION_POINTS = 200
"""Thresholds tried when calibrating to a target: the 200-quantile grid of the earlier runs (the package's calibration
now tries every distinct one), so that a re-run times the thresholds they timed (checked on the demo checkpoint)."""


@dataclass
class System:
    """One timed system: a session and the policy inputs it is run with (ours), or a plain model."""

    name: str
    precision: str
    session: object
    overrides: dict = field(default_factory=dict)
    ours: bool = True

    def feed(self, tokens: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The session's inputs for a unit of tokens."""
        names = {i.name for i in self.session.get_inputs()}
        feed = {name: value for name, value in tokens.items() if name in names}
        return feed | {name: np.array(value, POLICY_INPUTS[name]) for name, value in self.overrides.items()}


def exit_graph(model: EarlyExitModel, policy: ExitPolicy, path: Path, quantize: str | None, threads: int,
               **options) -> OnnxEarlyExitModel:
    """Our graph of the model under a policy (options: build_exit_graph's max_layer and compaction), saved at path
    and loaded as an export is, on a session with the benchmark's threads."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="de3bert-pieces-") as scratch:
        built = build_exit_graph(model, policy, Path(scratch), quantize=quantize, **options)
    onnx.save(built.model, str(path))
    export = OnnxExportInfo(criterion=policy.criterion, policy=policy.to_dict(), inputs=built.inputs,
                            quantization=quantize)
    return OnnxEarlyExitModel(model.config, export, inference_session(path, threads), model.tokenizer, path.parent)


def build_systems(model: EarlyExitModel, policies: dict[str, ExitPolicy], folder: Path,
                  threads: int) -> tuple[list[System], dict[str, OnnxEarlyExitModel]]:
    """Plain ORT and our graphs, each precision (building every graph into folder); and per precision the
    criterion's graph as a runner, to read every exit from."""
    criterion = model.config.policy["criterion"]
    systems, runners = [], {}
    for precision, quantize in PRECISIONS.items():
        plain = export_plain_classifier(model, folder, quantize).rename(folder / f"plain-{precision}.onnx")
        systems.append(System(f"plain ORT {precision}", precision, inference_session(plain, threads), ours=False))
        graphs = {"full": (ExitPolicy("full-depth"), {}), "criterion": (ExitPolicy(**model.config.policy), {})}
        if quantize is None:  # design variants, priced in float32
            graphs |= {"full, no max_layer": (ExitPolicy("full-depth"), {"max_layer": False}),
                       "criterion, no max_layer": (ExitPolicy(**model.config.policy), {"max_layer": False}),
                       "criterion, compact always": (ExitPolicy(**model.config.policy), {"compaction": "always"})}
        sessions = {}
        for name, (policy, options) in graphs.items():
            path = folder / f"{name.replace(' ', '_').replace(',', '')}-{precision}.onnx"
            graph = exit_graph(model, policy, path, quantize, threads, **options)
            sessions[name] = graph.session
            if name == "criterion":
                runners[precision] = graph
        if quantize is None:
            hoisted = folder / "criterion_outer_weights-float32.onnx"
            weights_in_main_graph(folder / "criterion-float32.onnx", hoisted)
            sessions["criterion, outer weights"] = inference_session(hoisted, threads)
        systems.append(System(f"ours {precision}, full depth", precision, sessions["full"]))
        never = {"patience": model.num_layers}
        systems.append(System(f"ours {precision}, every head, no exit", precision, sessions["criterion"], never))
        for label, policy in policies.items():
            overrides = {"threshold": policy.threshold, "patience": policy.patience}
            systems.append(System(f"ours {precision}, {criterion} {label}", precision, sessions["criterion"],
                                  overrides))
        if quantize is None:
            two = {"threshold": policies["@ 2x"].threshold, "patience": policies["@ 2x"].patience}
            systems += [System(f"ours {precision}, full depth, no max_layer input", precision,
                               sessions["full, no max_layer"]),
                        System(f"ours {precision}, {criterion} @ 2x, no max_layer input", precision,
                               sessions["criterion, no max_layer"], two),
                        System(f"ours {precision}, {criterion} @ 2x, weights in the main graph", precision,
                               sessions["criterion, outer weights"], two),
                        System(f"ours {precision}, {criterion} @ 2x, compact at every level", precision,
                               sessions["criterion, compact always"], two)]
    return systems, runners


def weights_in_main_graph(source: Path, target: Path) -> None:
    """The graph with every subgraph's initializers moved to the main graph, so that each level reads its weights
    from an outer scope: the layout build_exit_graph avoids, to price it."""
    import onnx

    model = onnx.load(str(source))
    moved = []

    def collect(graph) -> None:
        """Move the initializers of every subgraph below graph into `moved`."""
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == attribute.GRAPH:
                    moved.extend(attribute.g.initializer)
                    del attribute.g.initializer[:]
                    collect(attribute.g)

    collect(model.graph)
    model.graph.initializer.extend(moved)
    onnx.save(model, str(target))


def time_units(systems: list[System], units: list[dict[str, np.ndarray]], repeats: int,
               label: str) -> tuple[dict[str, list[list[float]]], dict[str, list], list[float]]:
    """Seconds of every pass per unit of every system, our systems' outputs (first pass), and the 1-minute load
    average before each pass and after the last."""
    feeds = [{s.name: s.feed(unit) for s in systems} for unit in units]
    samples = {s.name: [[] for _ in units] for s in systems}
    outputs = {s.name: [] for s in systems if s.ours}
    for system in systems:  # warm-up
        system.session.run(None, feeds[0][system.name])
    loads = []
    for repeat in range(repeats):
        loads.append(os.getloadavg()[0])
        for index, feed in enumerate(feeds):
            for system in running_order(systems, index, repeat):
                started = time.perf_counter()
                result = system.session.run(None, feed[system.name])
                samples[system.name][index].append(time.perf_counter() - started)
                if repeat == 0 and system.ours:
                    outputs[system.name].append(result)
        print(f"{label}: pass {repeat + 1}/{repeats} done, load {os.getloadavg()[0]:.2f}", flush=True)
    loads.append(os.getloadavg()[0])
    return samples, outputs, loads


def profile(session_path: Path, units: list[dict[str, np.ndarray]], overrides: dict, threads: int,
            folder: Path) -> dict:
    """Where the time of a graph goes, per unit, from an ONNX Runtime profile: kernel milliseconds by operator
    type and by piece (the prefix of our node names: inputs, layer_NN, step_NN, level_NN plumbing), `If` nodes
    excluded (their time is their subgraph's), the run time outside kernels, and the operators that ran in each
    piece (are the fused ones there, inside the subgraphs?)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # as inference_session: the graph's optional inputs are initializers on purpose
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / session_path.stem)
    session = ort.InferenceSession(str(session_path), options, providers=["CPUExecutionProvider"])
    system = System("profiled", "", session, overrides)
    for unit in units:
        session.run(None, system.feed(unit))
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op, by_piece, ops, runs = defaultdict(float), defaultdict(float), defaultdict(set), []
    for event in events:
        if event.get("cat") == "Session" and event["name"] == "model_run":
            runs.append(event["dur"])
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"].get("op_name", "?")
        if op == "If":
            continue
        by_op[op] += event["dur"]
        name = event["name"].removesuffix("_kernel_time")
        piece = name.split("/")[0] if "/" in name else "plain graph"
        by_piece[piece] += event["dur"]
        ops[piece].add(op)
    scale = 1e-3 / len(units)  # µs summed over units -> ms per unit
    kernels = sum(by_op.values())
    return {"run_ms": sum(runs) * scale, "kernel_ms": kernels * scale,
            "outside_kernels_ms": (sum(runs) - kernels) * scale,
            "by_op_ms": {k: v * scale for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "by_piece_ms": {k: v * scale for k, v in sorted(by_piece.items())},
            "operators_run_by_piece": {k: sorted(v) for k, v in sorted(ops.items())}}


def summarize(systems: list[System], seconds: dict, outputs: dict, labels: list[int], num_layers: int,
              task) -> dict[str, dict]:
    """Per system: total seconds (of the per-unit medians of the passes), ratio against plain ORT of its precision
    (also of the per-unit minima: robust to bursts of load), and for ours the layer speed-up, wall/layer and the
    metric."""
    rows = {}
    for system in systems:
        plain_runs = seconds[f"plain ORT {system.precision}"]
        total = sum(map(statistics.median, seconds[system.name]))
        row = {"seconds": total, "mean_ms": 1000 * total / len(seconds[system.name]),
               "vs_plain": sum(map(statistics.median, plain_runs)) / total,
               "vs_plain_of_minima": sum(map(min, plain_runs)) / sum(map(min, seconds[system.name]))}
        if system.ours:
            exit_layers = torch.from_numpy(np.concatenate([o[1] for o in outputs[system.name]]))
            predictions = np.concatenate([o[0] for o in outputs[system.name]]).argmax(-1).tolist()
            row["layer_speedup"] = speedup_ratio(exit_layers, num_layers)
            row["wall_per_layer"] = row["vs_plain"] / row["layer_speedup"]
            row["wall_per_layer_of_minima"] = row["vs_plain_of_minima"] / row["layer_speedup"]
            row["metric"] = main_metric(task, compute_metrics(task, predictions, labels))
        rows[system.name] = row
    return rows


def exit_metrics(outputs: LayerOutputs, task: TaskSpec) -> list[float]:
    """The task's main metric of every exit, layer 1 first."""
    labels = outputs.labels.tolist()
    return [main_metric(task, compute_metrics(task, p.tolist(), labels)) for p in outputs.predictions()]


def exit_accuracy(runners: dict[str, OnnxEarlyExitModel], encoded: list, outputs: LayerOutputs,
                  task: TaskSpec) -> dict:
    """Every exit's dev metric: PyTorch float32 (outputs), and our float32 and int8 graphs of the criterion (read
    through max_layer, in batches of 64)."""
    return {"pytorch": exit_metrics(outputs, task)} | {
        precision: exit_metrics(collect_layer_outputs(graph, encoded), task) for precision, graph in runners.items()}


def tokens_of(collate, encoded, indices: list[int]) -> dict[str, np.ndarray]:
    """A padded unit of examples as numpy token inputs."""
    batch = collate([encoded[i] for i in indices])
    batch.pop("labels")
    return {name: value.numpy() for name, value in batch.items()} | {
        "token_type_ids": np.zeros_like(batch["input_ids"].numpy())}


def wait_until_idle(limit_s: float, threshold: float = 0.5) -> float:
    """Wait (up to limit_s) for the 1-minute load average to fall below threshold; return it."""
    deadline = time.time() + limit_s
    while os.getloadavg()[0] >= threshold and time.time() < deadline:
        time.sleep(10)
    return os.getloadavg()[0]


def main() -> None:
    """Parse the options, build and time every system, profile three of them, and write the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a trained checkpoint with a calibrated policy")
    parser.add_argument("--data-dir", help="GLUE folder (default: $GLUE_DIR, else ../shared/data/glue)")
    parser.add_argument("--latency-inputs", type=int, default=200, help="dev inputs timed one at a time")
    parser.add_argument("--batched-inputs", type=int, help="the first N dev inputs only, for smoke runs: calibration, "
                        "exit accuracy and the batched mode read these (default: the whole split)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="passes per input (medians)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--wait-idle", type=float, default=600, help="seconds to wait for an idle machine")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"folder of the report (default: {RESULTS})")
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --output")
    args = parser.parse_args()
    path = args.output / f"{Path(args.checkpoint).name}.json"
    if not args.overwrite and (path.exists() or path.with_suffix(".md").exists()):
        parser.error(f"{path} (or its .md) holds an earlier run; give --overwrite to replace it, or another --output")
    torch.set_num_threads(args.threads)
    model = EarlyExitModel.from_pretrained(args.checkpoint)
    data, _, examples = split_examples(model, evaluation_source(model, None, args.data_dir))
    task = data.task
    encoded = encode_examples(model.tokenizer, examples[:args.batched_inputs], model.config.max_length)
    outputs = collect_layer_outputs(model, encoded)
    stored = ExitPolicy(**model.config.policy)
    policies = {"stored policy": stored} | {
        f"@ {t:g}x": calibrate(stored.criterion, outputs, t, points=CALIBRATION_POINTS, lam=stored.lam)
        for t in (1.5, 2.0, 3.0)}
    collate = Collator(model.tokenizer)
    single = [[i] for i in range(min(args.latency_inputs, len(encoded)))]
    batched = length_sorted_batches([len(e.input_ids) for e in encoded], args.batch_size)
    report = {"checkpoint": str(Path(args.checkpoint).resolve()), "task": task.name, "num_layers": model.num_layers,
              "threads": args.threads, "repeats": args.repeats, "latency_inputs": len(single),
              "batched_inputs": len(encoded), "batch_size": args.batch_size, "machine": platform.processor()
              or platform.machine(), "cpu_count": os.cpu_count(),
              "versions": {n: version(n) for n in ("torch", "onnx", "onnxruntime")},
              "policies": {name: p.to_dict() for name, p in policies.items()}}
    with tempfile.TemporaryDirectory(prefix="de3bert-single-graph-") as scratch:
        folder = Path(scratch)
        systems, runners = build_systems(model, policies, folder, args.threads)
        report["exit_accuracy"] = exit_accuracy(runners, encoded, outputs, task)
        report["load_before"] = wait_until_idle(args.wait_idle)
        modes = {"batch1": single, "batched": batched}
        for mode, units in modes.items():
            tokens = [tokens_of(collate, encoded, unit) for unit in units]
            seconds, results, loads = time_units(systems, tokens, args.repeats, mode)
            labels = [encoded[i].label for unit in units for i in unit]
            report[mode] = {"loads": loads, "rows": summarize(systems, seconds, results, labels, model.num_layers,
                                                              task)}
        two = {"threshold": policies["@ 2x"].threshold, "patience": policies["@ 2x"].patience}
        report["profiles"] = {}
        for mode, units in modes.items():
            tokens = [tokens_of(collate, encoded, unit) for unit in units[:100]]
            report["profiles"][mode] = {
                "plain ORT float32": profile(folder / "plain-float32.onnx", tokens, {}, args.threads, folder),
                "ours float32, full depth": profile(folder / "full-float32.onnx", tokens, {}, args.threads, folder),
                "ours float32, @ 2x": profile(folder / "criterion-float32.onnx", tokens, two, args.threads, folder)}
    args.output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    path.with_suffix(".md").write_text(table(report) + "\n")
    print(table(report))
    print(f"wrote {path}")


def table(report: dict) -> str:
    """Markdown: each system's ratio against plain ORT of its precision, with layer speed-up and wall/layer."""
    lines = ["| system | batch 1 (layer, wall/layer) | batched (layer, wall/layer) | metric |", "|---|---|---|---|"]
    for name in report["batch1"]["rows"]:
        cells = []
        for mode in ("batch1", "batched"):
            r = report[mode]["rows"][name]
            cells.append(f"{r['vs_plain']:.2f}x" + (f" ({r['layer_speedup']:.2f}x, {r['wall_per_layer']:.2f})"
                                                    if "layer_speedup" in r else ""))
        metric = report["batched"]["rows"][name].get("metric")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {'' if metric is None else f'{metric:.3f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
