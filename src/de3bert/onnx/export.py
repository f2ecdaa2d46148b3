"""`de3bert export`: a checkpoint as ONNX graphs that an engine can stop between (layout: format.py).

Every graph is traced from the PyTorch code the engine runs — `Backbone.embed`, `Backbone.run_layer`,
`ExitHead` and `exits.indicators.head_indicators` — with dynamic batch and sequence axes, then optimized
offline by ONNX Runtime (layer-norm, GELU and matmul fusions), optionally quantized to int8, and
checked against PyTorch on inputs of another shape than the traced ones: a float32 graph whose
outputs differ from PyTorch's by more than TOLERANCE (relative to the outputs' scale) fails the
export. Attention is traced in its eager form with the padding mask added as a bias computed once
per chunk (context.onnx); that form measured fastest on ONNX Runtime, ahead of the decomposed SDPA
of the torch.export-based exporter and of ONNX Runtime's fused Attention operator at batch 32.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from de3bert.atomic import replace_directory
from de3bert.errors import ExportError
from de3bert.exits.indicators import head_indicators
from de3bert.model.backbones import LayerContext
from de3bert.model.config import checkpoint_digest
from de3bert.model.modeling import EarlyExitModel, plain_classifier
from de3bert.onnx.format import QUANTIZATIONS, OnnxExportInfo, graph_name, write_export_config
from de3bert.onnx.sessions import Graph, inference_session, onnxruntime

OPSET = 17
TOLERANCE = 1e-3
PADDING_BIAS = torch.finfo(torch.float32).min


class EmbeddingsGraph(nn.Module):
    """Token ids → embedding output (B, T, H)."""

    def __init__(self, model: EarlyExitModel):
        super().__init__()
        self.backbone = model.backbone

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding output for token ids."""
        return self.backbone.embed(input_ids, token_type_ids)


class ContextGraph(nn.Module):
    """Padding mask (B, T) → the additive attention bias (B, 1, 1, T) and, for MPNet, the position bias."""

    def __init__(self, model: EarlyExitModel):
        super().__init__()
        self.backbone = model.backbone

    def forward(self, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What every layer of a chunk reads besides its hidden states."""
        bias = (1.0 - attention_mask[:, None, None, :].float()) * PADDING_BIAS
        position_bias = self.backbone.position_bias(attention_mask.unsqueeze(-1))  # only the shape (B, T) matters
        return (bias,) if position_bias is None else (bias, position_bias)


class LayerGraph(nn.Module):
    """Layer ``index`` of the backbone: hidden states → hidden states."""

    def __init__(self, model: EarlyExitModel, index: int):
        super().__init__()
        self.backbone = model.backbone
        self.index = index

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor,
                position_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after the layer."""
        return self.backbone.run_layer(self.index, hidden, LayerContext(attention_bias, position_bias))


class HeadGraph(nn.Module):
    """Exit head ``index`` — with its prototypical network or without — and every indicator a policy reads
    from it (λ of EDR is an input)."""

    def __init__(self, model: EarlyExitModel, index: int, with_prototypes: bool):
        super().__init__()
        self.head = model.heads[index]
        self.with_prototypes = with_prototypes

    def outputs(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                lam: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The head's outputs by name: logits, distances (with prototypes), prediction and indicators."""
        output = self.head(hidden, attention_mask, with_prototypes=self.with_prototypes)
        named = {"logits": output.logits}
        if output.distances is not None:
            named["distances"] = output.distances
        return named | head_indicators(output.logits, output.distances, lam)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                lam: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The outputs in the order of `outputs`."""
        return tuple(self.outputs(hidden, attention_mask, lam).values())


@dataclass
class GraphSpec:
    """One graph to export: its file name, module, example inputs by name, output names and dynamic axes."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    axes: dict[str, dict[int, str]] = field(default_factory=dict)


def example_batch(config: PretrainedConfig, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Random token ids of a backbone with right padding of varying lengths (the first row unpadded)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, config.vocab_size, (batch, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    input_ids = torch.where(mask.bool(), input_ids, torch.full_like(input_ids, config.pad_token_id or 0))
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}


@torch.no_grad()
def graph_specs(model: EarlyExitModel, batch: dict[str, torch.Tensor]) -> list[GraphSpec]:
    """Every graph of an export, with example inputs computed by PyTorch from a token batch."""
    tokens, positions = {0: "batch", 1: "tokens"}, {0: "batch"}
    embed_inputs = {"input_ids": batch["input_ids"]}
    if model.backbone.config.model_type != "mpnet":  # MPNet has no token types
        embed_inputs["token_type_ids"] = batch["token_type_ids"]
    embeddings = EmbeddingsGraph(model).eval()  # wrappers in eval mode: the exporter restores each module's mode
    hidden = embeddings(**embed_inputs)
    context = ContextGraph(model).eval()
    biases = context(batch["attention_mask"])
    context_outputs = ["attention_bias", "position_bias"][:len(biases)]
    specs = [GraphSpec(graph_name("embeddings"), embeddings, embed_inputs, ["hidden"],
                       dict.fromkeys([*embed_inputs, "hidden"], tokens)),
             GraphSpec(graph_name("context"), context, {"attention_mask": batch["attention_mask"]}, context_outputs,
                       {"attention_mask": tokens, "attention_bias": {0: "batch", 3: "tokens"},
                        "position_bias": {0: "batch", 2: "tokens", 3: "tokens"}})]
    for index in range(model.num_layers):
        layer = LayerGraph(model, index).eval()
        layer_inputs = {"hidden": hidden, **dict(zip(context_outputs, biases))}
        specs.append(GraphSpec(graph_name("layer", index), layer, layer_inputs, ["layer_output"],
                               {"hidden": tokens, "layer_output": tokens, **specs[1].axes}))
        hidden = layer(**layer_inputs)
        head_inputs = {"hidden": hidden, "attention_mask": batch["attention_mask"]}
        heads = [("head", HeadGraph(model, index, False).eval(), head_inputs)]
        if model.heads[index].has_prototypes:
            heads.append(("prototype_head", HeadGraph(model, index, True).eval(),
                          head_inputs | {"lam": torch.tensor(1.0)}))
        for piece, head, inputs in heads:
            names = list(head.outputs(**inputs))
            specs.append(GraphSpec(graph_name(piece, index), head, inputs, names,
                                   {"hidden": tokens, "attention_mask": tokens} | dict.fromkeys(names, positions)))
    return specs


def trace_graph(spec: GraphSpec, path: Path) -> None:
    """Trace a module into an ONNX file with its dynamic axes and the shapes of every intermediate named
    consistently (ONNX Runtime fuses residual additions into its layer norms only where shapes are known)."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated and chatty; it is the faster one
        warnings.simplefilter("ignore")
        torch.onnx.export(spec.module, tuple(spec.inputs.values()), str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(spec.inputs), output_names=spec.outputs,
                          dynamic_axes={k: v for k, v in spec.axes.items() if k in [*spec.inputs, *spec.outputs]})
    onnx.save(SymbolicShapeInference.infer_shapes(onnx.load(str(path)), auto_merge=True), str(path))


def export_graph(spec: GraphSpec, folder: Path, quantize: str | None, check: dict[str, torch.Tensor]) -> float:
    """Trace, optimize and (optionally) quantize one graph into folder/spec.name, and return its largest
    difference from PyTorch on the `check` inputs; a float32 graph off by more than TOLERANCE is an ExportError."""
    traced, target = folder / f".traced.{spec.name}", folder / spec.name
    try:
        trace_graph(spec, traced)
        inference_session(traced, optimized_path=target)
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            target.rename(traced)
            logging.disable(logging.WARNING)  # it advises pre-processing: shape inference and optimization, done above
            try:
                quantize_dynamic(traced, target, weight_type=QuantType.QInt8, per_channel=True)
            finally:
                logging.disable(logging.NOTSET)
    except Exception as exc:  # the tracer and ONNX Runtime raise many types; name the graph
        raise ExportError(f"graph {spec.name} could not be exported: {str(exc).splitlines()[0]}") from exc
    finally:
        traced.unlink(missing_ok=True)
    difference = max_difference(spec, target, check)
    if quantize is None and difference > TOLERANCE:
        raise ExportError(f"graph {spec.name} differs from PyTorch by {difference:.2e} (relative; tolerance "
                          f"{TOLERANCE:g}): not exported")
    return difference


def max_difference(spec: GraphSpec, path: Path, inputs: dict[str, torch.Tensor]) -> float:
    """Largest |ONNX Runtime − PyTorch| over a graph's float outputs, relative to their scale (at least 1)."""
    with torch.no_grad():
        expected = spec.module(**inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    outputs = Graph(inference_session(path)).run(spec.outputs, {name: value.numpy() for name, value in inputs.items()})
    worst = 0.0
    for reference, output in zip(expected, outputs):
        if reference.is_floating_point():
            scale = max(1.0, float(reference.abs().max()))
            worst = max(worst, float((torch.from_numpy(output) - reference).abs().max()) / scale)
    return worst


def export_checkpoint(checkpoint: str | Path, output: str | Path, quantize: str | None = None) -> OnnxExportInfo:
    """Write the ONNX export of a checkpoint to `output` (atomically) and return what it holds.

    quantize: None (float32) or "int8": ONNX Runtime's dynamic quantization of every graph (what it quantizes:
    the matrix products of the layers and the embedding tables; the heads' dense layers stay float32).
    """
    if quantize not in (None, *QUANTIZATIONS):
        raise ExportError(f"unknown quantization '{quantize}'; choose one of {', '.join(QUANTIZATIONS)}")
    onnxruntime()  # a missing ONNX Runtime fails here, before any work
    checkpoint, output = Path(checkpoint), Path(output)
    model = EarlyExitModel.from_pretrained(checkpoint)
    model.backbone.encoder.set_attn_implementation("eager")  # the form that runs fastest on ONNX Runtime
    info = OnnxExportInfo(quantization=quantize, opset=OPSET,
                          source={"checkpoint": str(checkpoint.resolve()), "weights_sha256": checkpoint_digest(checkpoint)},
                          versions={name: version(name) for name in ("torch", "onnx", "onnxruntime")})
    # checked on another shape than the traced one, so that the axes are known to be dynamic
    checks = {spec.name: spec.inputs for spec in graph_specs(model, example_batch(model.backbone.config, 3, 11, 1))}
    staging = output.with_name(f".{output.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for spec in graph_specs(model, example_batch(model.backbone.config, 2, 8, 0)):
            info.validation[spec.name] = export_graph(spec, staging, quantize, checks[spec.name])
        model.tokenizer.save_pretrained(staging)
        write_export_config(model.config, info, staging)
        replace_directory(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


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
    traced, optimized, quantized and validated as our graphs are: the reference a user deploying on ONNX Runtime
    would otherwise pick. Returns the graph's path."""
    plain = plain_classifier(model)
    plain.set_attn_implementation("eager")  # as our graphs: the form that runs fastest on ONNX Runtime
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if model.backbone.config.model_type != "mpnet" else [])
    traced, check = (example_batch(model.backbone.config, *shape) for shape in ((2, 8, 0), (3, 11, 1)))
    spec = GraphSpec("plain.onnx", PlainGraph(plain).eval(), {n: traced[n] for n in names}, ["logits"],
                     dict.fromkeys(names, {0: "batch", 1: "tokens"}) | {"logits": {0: "batch"}})
    export_graph(spec, Path(folder), quantize, {n: check[n] for n in names})
    return Path(folder) / spec.name
