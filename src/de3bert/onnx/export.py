"""`de3bert export`: a checkpoint as one self-exiting ONNX graph (layout: format.py; construction: graph.py).

The graph is built from pieces traced from the PyTorch code the engine runs (tracing.py) and checked twice:
every piece against its PyTorch module, and the whole graph against the PyTorch engine — labels, exit
layers and exit logits under the exported policy — on token batches of other shapes than the traced ones.
A float32 export that disagrees fails; an int8 one records how often it agrees. The folder is written
atomically. The exporter never imports the ONNX Runtime model (runtime.py): both read format.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

from de3bert.atomic import replace_directory
from de3bert.errors import ExportError, PolicyError
from de3bert.exits.calibration import policy_for_speedup
from de3bert.exits.criteria import CRITERIA, applicable_criteria, get_criterion
from de3bert.exits.engine import EarlyExitEngine
from de3bert.exits.policies import ExitPolicy
from de3bert.model.config import checkpoint_digest
from de3bert.model.modeling import EarlyExitModel, plain_classifier
from de3bert.onnx.format import GRAPH_NAME, OUTPUTS, QUANTIZATIONS, OnnxExportInfo, write_export_config
from de3bert.onnx.graph import build_exit_graph
from de3bert.onnx.sessions import Graph, inference_session, onnxruntime
from de3bert.onnx.tracing import OPSET, TOLERANCE, GraphSpec, build_piece, example_batch

VALIDATION_BATCHES = ((7, 13, 3), (1, 9, 4), (32, 6, 5))
"""(rows, tokens, seed) of the token batches the graph is checked on: other shapes than the traced ones."""
ROUNDING = 1e-4
"""How close to τ (or to a tie of the two top logits) a row's decision may lie for rounding between runtimes to
move its exit: such a row may disagree without failing the export."""


def exported_policy(model: EarlyExitModel, criterion: str | None = None) -> ExitPolicy:
    """The policy an export fixes: the checkpoint's calibrated one, or for another criterion its calibrated policy at
    the same target speed-up (full depth: no threshold to calibrate)."""
    stored = ExitPolicy(**model.config.policy) if model.config.policy else None
    if criterion is None or (stored is not None and stored.criterion == criterion):
        if stored is None:
            raise PolicyError("the checkpoint has no calibrated exit policy; give --criterion")
        return stored
    supported = applicable_criteria(model.config.is_regression, model.has_prototypes)
    if criterion not in supported:
        get_criterion(criterion)  # an unknown name says so
        raise PolicyError(f"criterion '{criterion}' does not apply to this model; choose one of {', '.join(supported)}")
    if not CRITERIA[criterion].exits_early:
        return ExitPolicy(criterion)
    target = model.config.policy_selection.get("target_speedup", 2.0)
    return policy_for_speedup(model.config.calibration, criterion, target)


def export_checkpoint(checkpoint: str | Path, output: str | Path, quantize: str | None = None,
                      criterion: str | None = None) -> OnnxExportInfo:
    """Write the ONNX export of a checkpoint to `output` (atomically) and return what it holds.

    quantize: None (float32) or "int8": ONNX Runtime's dynamic quantization of every piece, inside the graph's
    control flow too (the layers' matrix products, the embedding tables and the heads' dense layers).
    criterion: the exit criterion fixed in the graph (None: the checkpoint's default policy's; another one takes its
    calibrated threshold at the default's target speed-up).
    """
    if quantize not in (None, *QUANTIZATIONS):
        raise ExportError(f"unknown quantization '{quantize}'; choose one of {', '.join(QUANTIZATIONS)}")
    onnxruntime()  # a missing ONNX Runtime fails here, before any work
    import onnx

    checkpoint, output = Path(checkpoint), Path(output)
    model = EarlyExitModel.from_pretrained(checkpoint)
    policy = exported_policy(model, criterion)
    staging = output.with_name(f".{output.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory(prefix="de3bert-pieces-") as scratch:
            graph = build_exit_graph(model, policy, Path(scratch), quantize)
        onnx.save(graph.model, str(staging / GRAPH_NAME))
        validation = {"pieces": graph.pieces} | agreement_with_pytorch(model, policy, staging / GRAPH_NAME,
                                                                       strict=quantize is None)
        info = OnnxExportInfo(criterion=policy.criterion, policy=policy.to_dict(), inputs=graph.inputs,
                              quantization=quantize, opset=OPSET, validation=validation,
                              source={"checkpoint": str(checkpoint.resolve()),
                                      "weights_sha256": checkpoint_digest(checkpoint)},
                              versions={name: version(name) for name in ("torch", "onnx", "onnxruntime")})
        model.tokenizer.save_pretrained(staging)
        model.config.policy = policy.to_dict()  # the export serves the policy it fixes
        write_export_config(model.config, info, staging)
        replace_directory(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


@torch.no_grad()
def agreement_with_pytorch(model: EarlyExitModel, policy: ExitPolicy, path: Path, strict: bool) -> dict:
    """How the graph at `path` agrees with the PyTorch engine under its policy on random token batches: the share of
    rows with the same label and exit layer, and the largest relative difference of their exit logits. strict: an
    ExportError where they differ beyond rounding (a row whose decision lies within ROUNDING of τ or of a tie may
    differ; `excused` counts them)."""
    graph = Graph(inference_session(path))
    engine = EarlyExitEngine(model, policy)
    rows = same_label = same_exit = excused = 0
    worst = 0.0
    for size, length, seed in VALIDATION_BATCHES:
        batch = example_batch(model.backbone.config, size, length, seed)
        expected = engine.run_batch(**batch)
        logits, exit_layers, _ = (torch.from_numpy(value) for value in graph.run(
            list(OUTPUTS), {name: value.numpy() for name, value in batch.items()}))
        predictions = logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)
        labels = (predictions == expected.predictions) if logits.shape[-1] > 1 else torch.ones(size, dtype=torch.bool)
        exits = exit_layers == expected.exit_layers
        agree = labels & exits
        near = near_decision(model, policy, batch) & ~agree
        if strict and not bool((agree | near).all()):
            row = int((~(agree | near)).nonzero()[0])
            raise ExportError(f"the exported graph disagrees with PyTorch on a random input (row {row} of a batch of "
                              f"{size}: exit layer {int(exit_layers[row])} against {int(expected.exit_layers[row])}): "
                              "not exported")
        scale = expected.logits[exits].abs().max().clamp_min(1.0) if exits.any() else torch.tensor(1.0)
        difference = float((logits[exits] - expected.logits[exits]).abs().max() / scale) if exits.any() else 0.0
        if strict and difference > TOLERANCE:
            raise ExportError(f"the exported graph's exit logits differ from PyTorch's by {difference:.2e} "
                              f"(relative; tolerance {TOLERANCE:g}): not exported")
        rows, same_label, same_exit = rows + size, same_label + int(labels.sum()), same_exit + int(exits.sum())
        excused, worst = excused + int(near.sum()), max(worst, difference)
    return {"rows": rows, "same_label": same_label / rows, "same_exit_layer": same_exit / rows, "excused": excused,
            "max_logit_difference": worst}


def near_decision(model: EarlyExitModel, policy: ExitPolicy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rows (B,) whose measure at some layer lies within ROUNDING of τ, or whose two top logits tie within it: where
    rounding between runtimes may move an exit or a label."""
    outputs = model.layer_outputs(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    near = torch.zeros(batch["input_ids"].shape[0], dtype=torch.bool)
    previous, bar = None, policy.threshold if policy.spec.fixed_threshold is None else policy.spec.fixed_threshold
    for output in outputs:
        logits = output.logits.float()
        if logits.shape[-1] > 1:
            top = logits.topk(2, -1).values
            near |= (top[:, 0] - top[:, 1]).abs() <= ROUNDING * top.abs().max(-1).values.clamp_min(1.0)
        if output.distances is None and policy.needs_prototypes:
            continue  # the last layer: everything exits, no measure
        value, previous = policy.indicator(output, previous)
        near |= torch.isfinite(value) & ((value - bar).abs() <= ROUNDING * max(1.0, abs(bar)))
    return near.cpu()


class PlainGraph(nn.Module):
    """A plain sequence classifier as one graph: token ids and mask → logits."""

    def __init__(self, plain: nn.Module):
        super().__init__()
        self.plain = plain

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The classifier's logits."""
        return self.plain(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def export_plain_classifier(model: EarlyExitModel, folder: Path, quantize: str | None = None) -> Path:
    """The plain classifier of the model's backbone (`plain_classifier`) exported whole to folder/plain.onnx —
    traced, optimized, quantized and validated as the pieces of our graph are: the reference a user deploying on
    ONNX Runtime would otherwise pick. Returns the graph's path."""
    import onnx

    plain = plain_classifier(model)
    plain.set_attn_implementation("eager")  # as our pieces: the form that runs fastest on ONNX Runtime
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if model.backbone.config.model_type != "mpnet" else [])
    traced, check = (example_batch(model.backbone.config, *shape) for shape in ((2, 8, 0), (3, 11, 1)))
    spec = GraphSpec("plain", PlainGraph(plain).eval(), {n: traced[n] for n in names}, ["logits"],
                     dict.fromkeys(names, {0: "batch", 1: "tokens"}) | {"logits": {0: "batch"}})
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="de3bert-plain-") as scratch:
        piece = build_piece(spec, Path(scratch), quantize, {n: check[n] for n in names})
    onnx.save(piece.model, str(folder / "plain.onnx"))
    return folder / "plain.onnx"
