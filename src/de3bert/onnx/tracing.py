"""Pieces of a model traced to ONNX, optimized, optionally quantized, and checked against PyTorch.

A piece is a small PyTorch module — the inputs (embeddings and attention context), one layer, one exit step,
or the plain classifier the benchmark compares against — traced with dynamic batch and sequence axes by the
TorchScript-based exporter with eager attention (that form measured fastest on ONNX Runtime, ahead of the
torch.export-based exporter's decomposed SDPA and of ONNX Runtime's fused Attention operator at batch 32),
optimized offline by ONNX Runtime (its fusions: layer norms with residual additions, GELU, matrix products),
for int8 quantized with ONNX Runtime's dynamic quantization and optimized again, and measured against PyTorch
on inputs of another shape than the traced ones: a float32 piece off by more than TOLERANCE fails.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PretrainedConfig

from de3bert.errors import ExportError
from de3bert.model.backbones import LayerContext
from de3bert.model.modeling import EarlyExitModel
from de3bert.onnx.sessions import Graph, inference_session, onnxruntime

if TYPE_CHECKING:
    import onnx  # imported where used: ONNX is an optional dependency

OPSET = 17
TOLERANCE = 1e-3
"""Largest relative difference from PyTorch a float32 piece may have."""
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
        """What every layer reads besides its hidden states."""
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


@dataclass
class GraphSpec:
    """One piece to trace: its name, module, example inputs by name, output names and dynamic axes."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    axes: dict[str, dict[int, str]] = field(default_factory=dict)


@dataclass
class Piece:
    """A traced, optimized (and quantized) piece: its ONNX model and its largest difference from PyTorch."""

    name: str
    model: onnx.ModelProto
    difference: float

    def consumed(self) -> set[str]:
        """Names of the graph inputs some node reads."""
        read = {name for node in self.model.graph.node for name in node.input}
        return {i.name for i in self.model.graph.input if i.name in read}


def example_batch(config: PretrainedConfig, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Random token ids of a backbone with right padding of varying lengths (the first row unpadded)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, config.vocab_size, (batch, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    input_ids = torch.where(mask.bool(), input_ids, torch.full_like(input_ids, config.pad_token_id or 0))
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}


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


def gemm_as_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Gemm with a constant weight (a traced nn.Linear on 2-D input: the heads' dense layers) as MatMul + Add:
    ONNX Runtime's dynamic quantization quantizes MatMul, not Gemm."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in weights or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        name = f"{node.input[1]}.matmul"
        graph.initializer.append(numpy_helper.from_array(weight.T.copy() if attrs.get("transB", 0) else weight, name))
        product = f"{node.output[0]}.product" if len(node.input) > 2 else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}.matmul"))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.add"))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def optimize_offline(source: Path, target: Path, keep_matmul: bool) -> None:
    """ONNX Runtime's portable graph optimizations (higher levels save hardware-specific layouts), saved to target;
    keep_matmul: leave MatMul + Add unfused (a Gemm would not be quantized)."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3  # errors only: it notes every initializer an optimization made unused
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["MatMulAddFusion"] if keep_matmul else None)


def build_piece(spec: GraphSpec, folder: Path, quantize: str | None, check: dict[str, torch.Tensor]) -> Piece:
    """Trace, optimize and (optionally) quantize one piece in `folder`, and measure it against PyTorch on `check`
    inputs; a float32 piece off by more than TOLERANCE is an ExportError."""
    import onnx

    traced, target = folder / f"{spec.name}.traced.onnx", folder / f"{spec.name}.onnx"
    try:
        trace_graph(spec, traced)
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            onnx.save(gemm_as_matmul(onnx.load(str(traced))), str(traced))
            optimize_offline(traced, target, keep_matmul=True)
            logging.disable(logging.WARNING)  # it advises pre-processing: shape inference and optimization, done
            try:
                quantize_dynamic(target, traced, weight_type=QuantType.QInt8, per_channel=True)
            finally:
                logging.disable(logging.NOTSET)
            # fuse the quantized products here: inside a subgraph ONNX Runtime may not
        optimize_offline(traced, target, keep_matmul=quantize is not None)
    except Exception as exc:  # the tracer and ONNX Runtime raise many types; name the piece
        raise ExportError(f"piece {spec.name} could not be exported: {str(exc).splitlines()[0]}") from exc
    difference = max_difference(spec, target, check)
    if quantize is None and difference > TOLERANCE:
        raise ExportError(f"piece {spec.name} differs from PyTorch by {difference:.2e} (relative; tolerance "
                          f"{TOLERANCE:g}): not exported")
    return Piece(spec.name, onnx.load(str(target)), difference)


def max_difference(spec: GraphSpec, path: Path, inputs: dict[str, torch.Tensor]) -> float:
    """Largest |ONNX Runtime − PyTorch| over a graph's float outputs, relative to their scale (at least 1)."""
    with torch.no_grad():
        expected = spec.module(**inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    outputs = Graph(inference_session(path)).run(spec.outputs, {name: value.numpy() for name, value in inputs.items()})
    worst = 0.0
    for reference, output in zip(expected, outputs):
        if reference.is_floating_point():
            finite = torch.isfinite(reference)  # NaN where a criterion has no value: compared as NaN below
            if not torch.equal(torch.isnan(torch.from_numpy(output)), torch.isnan(reference)):
                return float("inf")
            scale = max(1.0, float(reference[finite].abs().max())) if finite.any() else 1.0
            difference = (torch.from_numpy(output) - reference)[finite].abs()
            worst = max(worst, float(difference.max()) / scale if difference.numel() else 0.0)
    return worst
