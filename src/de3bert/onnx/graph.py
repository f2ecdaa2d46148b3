"""One self-contained ONNX graph that decides exits by itself (ONNX `If` control flow).

`build_exit_graph` builds the one graph of an export (`model.onnx`, format.py) for one exit criterion:

    input_ids, attention_mask (B, T) int64 [, token_type_ids]    the tokens, as the plain model takes them
    threshold (float32), patience (int64), lam (float32)         optional: defaults are the policy's, stored as
    max_layer (int64)                                            initializers of the same name (ONNX's defaults)
        -> logits (B, C) float32     the head each row exited at
           exit_layer (B,) int64     1-based
           indicator (B,) float32    the criterion's value there; NaN where it has none

Inside, level m (one per layer) runs layer m and, where the criterion reads internal heads, an exit step: the
head (only the parts the criterion reads), its indicator and `ExitPolicy.step` — traced from the PyTorch code the
engine runs, with τ, t and λ as inputs — plus the `max_layer` cap. If every row exits, the level returns its own
outputs; else it runs level m + 1 in the `else` branch of an `If` on the rows that stay (hidden states, mask and
policy state compacted, only where a row left) and writes their results back at their positions. Each level's
weights are initializers of the subgraph that runs it (read from the main graph instead, the demo checkpoint's
batch-1 wall-clock speed-up at 2x layer speed-up fell from 1.56x to 1.31x), and each piece — inputs, layer, exit
step — is traced and optimized by ONNX Runtime on its own before stitching: its optimizers do not cross subgraph
boundaries. int8 quantizes every piece, the heads' dense layers included. Measured: docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from de3bert.errors import ExportError
from de3bert.exits.policies import ExitPolicy, ExitState
from de3bert.model.modeling import EarlyExitModel
from de3bert.onnx.format import OUTPUTS, POLICY_INPUTS
from de3bert.onnx.tracing import (ContextGraph, EmbeddingsGraph, GraphSpec, LayerGraph, Piece, build_piece,
                                  example_batch)

if TYPE_CHECKING:
    import onnx  # imported where used: ONNX is an optional dependency

TORCH_TYPES = {"float32": torch.float32, "int64": torch.int64}
POLICY_FIELDS = {"threshold": "threshold", "patience": "patience", "lam": "lam", "max_layer": None}
"""The ExitPolicy field that gives each optional input its default (max_layer: M, no cap)."""
# the policy state an exit step reads (input name) and what it carries to the next one (output name)
STATE = {"streak": "next_streak", "previous": "prediction"}
# what an exit step gives for its rows (the exit layer is a constant: added only where rows leave)
STEP_RESULTS = ("logits", "indicator")
STEP_OUTPUTS = ("exits", "exit_all", "exit_any", *STEP_RESULTS, *STATE.values())
COMPACTIONS = ("when-needed", "always")


class InputGraph(nn.Module):
    """Token ids and mask → embedding output (B, T, H), the additive attention bias and, for MPNet, the position
    bias: the encoder's embeddings and the context every layer reads, traced as one piece."""

    def __init__(self, model: EarlyExitModel):
        super().__init__()
        self.embeddings = EmbeddingsGraph(model)
        self.context = ContextGraph(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """hidden, attention_bias [, position_bias]."""
        return (self.embeddings(input_ids, token_type_ids), *self.context(attention_mask))


class ExitStepGraph(nn.Module):
    """Exit head ``index``, its indicator and the policy's decision for one layer, with τ, patience and λ as tensor
    inputs — `ExitPolicy.step`, traced — and the `max_layer` cap.

    final: the layer exits every row (the last layer, or an internal one where the cap forces it): outputs logits
    and indicator; else also the decisions (exits, exit_all, exit_any) and the state it carries.
    """

    def __init__(self, model: EarlyExitModel, index: int, criterion: str, final: bool):
        super().__init__()
        self.head = model.heads[index]
        self.index, self.criterion, self.final = index, criterion, final
        # no exit step ran before this one (the first layer; full depth): the policy's initial state
        self.first = index == 0 or not ExitPolicy(criterion).reads_internal_heads

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, streak: torch.Tensor,
                previous: torch.Tensor, threshold: torch.Tensor, patience: torch.Tensor, lam: torch.Tensor,
                max_layer: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs named by `step_outputs` (streak and previous are not read by a first step)."""
        policy = ExitPolicy(self.criterion)
        # tensors after validation: graph inputs, not constants folded into the trace; a final step exits every row
        # whatever the streak, so patience stays out of it (a full-depth graph would offer it for nothing)
        policy.threshold, policy.lam = threshold, lam
        if not self.final:
            policy.patience = patience
        output = self.head(hidden, attention_mask, with_prototypes=policy.needs_prototypes)
        state = policy.initial_state(hidden.shape[0]) if self.first else ExitState(streak, previous)
        step = policy.step(output, state, is_last=self.final)
        exits = step.exits | (max_layer <= self.index + 1)  # the latency cap: rows still here leave at max_layer
        flags = exits.int()  # one cast for both reductions (ONNX Runtime merges the two)
        named = {"exits": exits, "exit_all": flags.min().bool(), "exit_any": flags.max().bool(),
                 "logits": output.logits, "indicator": step.indicator,  # float32, as the model is
                 "next_streak": step.state.streak, "prediction": step.state.previous}
        return tuple(named[name] for name in step_outputs(self.final))


def step_outputs(final: bool) -> tuple[str, ...]:
    """Output names of an exit step: a final one only gives the results."""
    return STEP_RESULTS if final else STEP_OUTPUTS


@dataclass
class ExitGraph:
    """What `build_exit_graph` built: the ONNX model, its inputs, and how far each piece is from PyTorch."""

    model: onnx.ModelProto
    inputs: list[str]
    pieces: dict[str, float]


def policy_tensors(policy: ExitPolicy, num_layers: int) -> dict[str, torch.Tensor]:
    """The optional inputs of a policy as 0-d tensors (max_layer: M, no cap)."""
    return {name: torch.tensor(num_layers if POLICY_FIELDS[name] is None else getattr(policy, POLICY_FIELDS[name]),
                               dtype=TORCH_TYPES[kind]) for name, kind in POLICY_INPUTS.items()}


def step_kind(policy: ExitPolicy, index: int, num_layers: int, capped: bool) -> bool | None:
    """Which exit step layer ``index`` has: False (a decision), True (final: every row exits there), or None (no
    head at this level: full depth, uncapped)."""
    if index == num_layers - 1:
        return True
    if policy.reads_internal_heads:
        return False
    return True if capped else None


@torch.no_grad()
def piece_specs(model: EarlyExitModel, policy: ExitPolicy, batch: dict[str, torch.Tensor],
                capped: bool) -> list[GraphSpec]:
    """Every piece of the graph, with example inputs computed by PyTorch from a token batch."""
    tokens, rows = {0: "batch", 1: "tokens"}, {0: "batch"}
    names = ["input_ids", "attention_mask"]
    if model.backbone.config.model_type != "mpnet":  # MPNet has no token types
        names.append("token_type_ids")
    inputs = InputGraph(model).eval()
    token_inputs = {name: batch[name] for name in names}
    hidden, *context = inputs(**token_inputs)
    context_names = ["attention_bias", "position_bias"][:len(context)]
    context_axes = {"attention_bias": {0: "batch", 3: "tokens"},
                    "position_bias": {0: "batch", 2: "tokens", 3: "tokens"}}
    specs = [GraphSpec("inputs", inputs, token_inputs, ["hidden", *context_names],
                       dict.fromkeys([*names, "hidden"], tokens) | context_axes)]
    context = dict(zip(context_names, context))
    params = policy_tensors(policy, model.num_layers)
    state = {"streak": torch.zeros(hidden.shape[0], dtype=torch.long), "previous": torch.zeros(hidden.shape[0])}
    for index in range(model.num_layers):
        layer = LayerGraph(model, index).eval()
        layer_inputs = {"hidden": hidden, **context}
        specs.append(GraphSpec(f"layer_{index + 1:02d}", layer, layer_inputs, ["layer_output"],
                               {"hidden": tokens, "layer_output": tokens} | context_axes))
        hidden = layer(**layer_inputs)
        final = step_kind(policy, index, model.num_layers, capped)
        if final is None:
            continue
        step = ExitStepGraph(model, index, policy.criterion, final).eval()
        step_inputs = {"hidden": hidden, "attention_mask": batch["attention_mask"], **state, **params}
        outputs = step_outputs(final)
        specs.append(GraphSpec(f"step_{index + 1:02d}", step, step_inputs, list(outputs),
                               {"hidden": tokens, "attention_mask": tokens, "streak": rows, "previous": rows}
                               | {name: rows for name in outputs if name not in ("exit_all", "exit_any")}))
        if not final:
            values = dict(zip(outputs, step(**step_inputs)))
            state = {name: values[carried] for name, carried in STATE.items()}
    return specs


@dataclass
class Scope:
    """Names of the tensors a level reads, in the scope it runs in (the active rows only)."""

    hidden: str
    context: dict[str, str]  # attention_bias [, position_bias]: a layer's other inputs
    attention_mask: str
    state: dict[str, str]  # streak [, previous]: what the last exit step carries

    def rows(self) -> dict[str, str]:
        """Every per-row tensor by its role."""
        return {"hidden": self.hidden, **self.context, "attention_mask": self.attention_mask, **self.state}


class Stitcher:
    """Stitches the pieces into one graph of nested `If`s, one level per layer."""

    def __init__(self, pieces: dict[str, Piece], num_layers: int, compaction: str):
        self.pieces, self.num_layers, self.compaction = pieces, num_layers, compaction
        self.types: dict[str, tuple[int, int]] = {}  # tensor name -> (element type, rank), for subgraph outputs

    def inline(self, name: str, bindings: dict[str, str], outputs: set[str] | None = None) -> tuple[list, list]:
        """A piece's nodes and initializers, its inputs and outputs renamed by `bindings` and every other name
        prefixed with the piece's name (ONNX forbids a subgraph to shadow an outer name; node names tell the
        profile which level ran). outputs: the piece's outputs that are read (None: all); nodes that only feed
        others do not run (ONNX Runtime runs every node it is given)."""
        from onnx import helper

        graph = self.pieces[name].model.graph
        wanted = {o.name for o in graph.output} if outputs is None else set(outputs)
        live = []
        for node in reversed(graph.node):
            if wanted & set(node.output):
                live.append(node)
                wanted |= set(node.input)
        for value in [*graph.input, *graph.output]:
            if value.name in bindings:
                tensor = value.type.tensor_type
                self.types[bindings[value.name]] = (tensor.elem_type, len(tensor.shape.dim))

        def rename(tensor: str) -> str:
            return bindings.get(tensor, f"{name}/{tensor}") if tensor else tensor

        nodes = []
        for node in reversed(live):
            if any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
                raise ExportError(f"piece {name} holds control flow ({node.op_type}); the stitcher expects none")
            renamed = helper.make_node(node.op_type, [rename(i) for i in node.input], [rename(o) for o in node.output],
                                       name=f"{name}/{node.name or node.op_type}", domain=node.domain)
            renamed.attribute.extend(node.attribute)
            nodes.append(renamed)
        initializers = []
        for init in graph.initializer:
            if init.name not in wanted:
                continue
            copy = type(init)()
            copy.CopyFrom(init)
            copy.name = rename(init.name)
            initializers.append(copy)
        return nodes, initializers

    def branch(self, condition: str, name: str, then: Callable, otherwise: Callable, outputs: list[str]) -> list:
        """An If node giving `outputs`; `then` and `otherwise` take the names their branch must produce and return
        (nodes, initializers): what a branch builds stays local to it, its weights included."""
        from onnx import helper

        graphs = {}
        for label, build in (("then", then), ("else", otherwise)):
            produced = [f"{output}/{label}" for output in outputs]
            nodes, initializers = build(produced)
            graphs[label] = helper.make_graph(
                nodes, f"{name}/{label}", [],
                [helper.make_tensor_value_info(p, self.types[p][0], [None] * self.types[p][1]) for p in produced],
                initializer=initializers)
        for output in outputs:
            self.types[output] = self.types[f"{output}/then"]
        return [helper.make_node("If", [condition], outputs, name=name, then_branch=graphs["then"],
                                 else_branch=graphs["else"])]

    def identity(self, sources: list[str], targets: list[str]) -> tuple[list, list]:
        """Identity nodes (an If branch must produce its outputs itself), no initializers."""
        from onnx import helper

        for source, target in zip(sources, targets):
            self.types[target] = self.types[source]
        return [helper.make_node("Identity", [s], [t], name=f"{t}/identity") for s, t in zip(sources, targets)], []

    def level(self, index: int, scope: Scope, results: list[str]) -> tuple[list, list]:
        """Nodes and initializers (of the current scope) computing `results` — logits, exit_layer, indicator of
        the active rows — from layer ``index`` on."""
        from onnx import helper, numpy_helper

        tag, step = f"level_{index + 1:02d}", f"step_{index + 1:02d}"
        hidden = f"hidden_{index + 1:02d}"
        nodes, initializers = self.inline(f"layer_{index + 1:02d}",
                                          {"hidden": scope.hidden, **scope.context, "layer_output": hidden})
        step_inputs = {"hidden": hidden, "attention_mask": scope.attention_mask, **scope.state}
        step_inputs |= {name: name for name in POLICY_INPUTS}
        next_scope = Scope(hidden, scope.context, scope.attention_mask, {})
        if step not in self.pieces:  # full depth without a cap: the next level follows in the same scope
            more = self.level(index + 1, next_scope, results)
            return nodes + more[0], initializers + more[1]
        if index == self.num_layers - 1:
            more = self.final(index, step_inputs, results)
            return nodes + more[0], initializers + more[1]
        if "exits" not in [o.name for o in self.pieces[step].model.graph.output]:
            # full depth with a cap: the head runs only where the cap makes every row leave
            capped, layer_number = f"{tag}/capped", f"{tag}/layer_number"
            initializers.append(numpy_helper.from_array(np.array(index + 1, np.int64), layer_number))
            nodes.append(helper.make_node("LessOrEqual", ["max_layer", layer_number], [capped], name=capped))
            nodes += self.branch(capped, f"{tag}/if",
                                 lambda out: self.final(index, step_inputs, out),
                                 lambda out: self.level(index + 1, next_scope, out), results)
            return nodes, initializers
        decided = {name: f"{name}_{index + 1:02d}" for name in STEP_OUTPUTS}
        next_scope.state = {name: decided[STATE[name]] for name in self.state_after(index)}
        unread = {carried for name, carried in STATE.items() if name not in next_scope.state}
        unread |= {"exit_any"} if self.compaction == "always" else set()
        more = self.inline(step, step_inputs | decided, set(STEP_OUTPUTS) - unread)
        nodes, initializers = nodes + more[0], initializers + more[1]
        nodes += self.branch(decided["exit_all"], f"{tag}/if", lambda out: self.own_results(index, decided, out),
                             lambda out: self.continuation(index, next_scope, decided, out), results)
        return nodes, initializers

    def final(self, index: int, step_inputs: dict[str, str], results: list[str]) -> tuple[list, list]:
        """A final exit step, where every row leaves: its results."""
        logits, exit_layer, indicator = results
        nodes, initializers = self.inline(f"step_{index + 1:02d}",
                                          step_inputs | {"logits": logits, "indicator": indicator})
        return nodes + self.exit_layer(index, indicator, exit_layer), initializers

    def own_results(self, index: int, decided: dict[str, str], results: list[str]) -> tuple[list, list]:
        """The results of the rows at level ``index`` as its exit step gave them."""
        logits, exit_layer, indicator = results
        nodes, _ = self.identity([decided["logits"], decided["indicator"]], [logits, indicator])
        return nodes + self.exit_layer(index, decided["indicator"], exit_layer), []

    def exit_layer(self, index: int, rows: str, target: str) -> list:
        """Nodes giving target = index + 1 for every row of `rows`, int64."""
        from onnx import TensorProto, helper

        self.types[target] = (TensorProto.INT64, 1)
        shape = f"{target}/shape"
        return [helper.make_node("Shape", [rows], [shape], name=shape),
                helper.make_node("ConstantOfShape", [shape], [target], name=f"{target}/layer",
                                 value=helper.make_tensor("value", TensorProto.INT64, [1], [index + 1]))]

    def state_after(self, index: int) -> list[str]:
        """The policy state the next exit step reads (streak, and previous for the patience criteria)."""
        following = self.pieces.get(f"step_{index + 2:02d}")
        return [] if following is None else [name for name in STATE if name in following.consumed()]

    def continuation(self, index: int, scope: Scope, decided: dict[str, str], results: list[str]) -> tuple[list, list]:
        """The rows of level ``index`` that stay, through the next levels, their results written back at their
        positions next to the results of the rows that left there."""
        tag, exits = f"level_{index + 1:02d}", decided["exits"]
        rows = scope.rows()
        kept = [f"{name}/kept" for name in rows.values()]
        named = dict(zip(rows, kept))
        next_scope = Scope(named["hidden"], {role: named[role] for role in scope.context}, named["attention_mask"],
                           {role: named[role] for role in scope.state})
        kept_results = [f"{r}/kept" for r in results]
        if self.compaction == "always":
            nodes, initializers, flat, column = self.kept_rows(tag, exits)
            nodes += self.gather(list(rows.values()), flat, kept)
            more = self.level(index + 1, next_scope, kept_results)
            return (nodes + more[0] + self.scatter(index, decided, column, kept_results, results),
                    initializers + more[1])

        def compact(out: list[str]) -> tuple[list, list]:
            nodes, initializers, flat, _ = self.kept_rows(f"{tag}/compact", exits)
            return nodes + self.gather(list(rows.values()), flat, out), initializers

        def merge(out: list[str]) -> tuple[list, list]:
            nodes, initializers, _, column = self.kept_rows(f"{tag}/merge", exits)
            return nodes + self.scatter(index, decided, column, kept_results, out), initializers

        # the common case at batch 1: no row left here, nothing to gather or scatter
        nodes = self.branch(decided["exit_any"], f"{tag}/compact_if", compact,
                            lambda out: self.identity(list(rows.values()), out), kept)
        more = self.level(index + 1, next_scope, kept_results)
        return nodes + more[0] + self.branch(decided["exit_any"], f"{tag}/merge_if", merge,
                                             lambda out: self.identity(kept_results, out), results), more[1]

    def kept_rows(self, tag: str, exits: str) -> tuple[list, list, str, str]:
        """Nodes and initializers giving the indices of the rows that stay, and their names: (K,) for Gather and
        (K, 1) for ScatterND."""
        from onnx import helper, numpy_helper

        stay, nonzero, flat, column = (f"{tag}/{n}" for n in ("stay", "nonzero", "rows", "row_indices"))
        shapes = [numpy_helper.from_array(np.array([-1], np.int64), f"{tag}/flat_shape"),
                  numpy_helper.from_array(np.array([-1, 1], np.int64), f"{tag}/column_shape")]
        nodes = [helper.make_node("Not", [exits], [stay], name=stay),
                 helper.make_node("NonZero", [stay], [nonzero], name=nonzero),
                 helper.make_node("Reshape", [nonzero, shapes[0].name], [flat], name=flat),
                 helper.make_node("Reshape", [nonzero, shapes[1].name], [column], name=column)]
        return nodes, shapes, flat, column

    def gather(self, rows: list[str], indices: str, targets: list[str]) -> list:
        """The rows at `indices` (K,) of every per-row tensor."""
        from onnx import helper

        for name, target in zip(rows, targets):
            self.types[target] = self.types[name]
        return [helper.make_node("Gather", [name, indices], [target], name=f"{target}/gather", axis=0)
                for name, target in zip(rows, targets)]

    def scatter(self, index: int, decided: dict[str, str], indices: str, kept: list[str], targets: list[str]) -> list:
        """Level ``index``'s results with those of the rows that stayed, `kept`, written at their positions
        `indices` (K, 1)."""
        from onnx import helper

        logits, exit_layer, indicator = targets
        own = [decided["logits"], f"{exit_layer}/own", decided["indicator"]]
        nodes = self.exit_layer(index, decided["indicator"], own[1])
        for source, update, target in zip(own, kept, targets):
            self.types[target] = self.types[source]
            nodes.append(helper.make_node("ScatterND", [source, indices, update], [target], name=f"{target}/scatter"))
        return nodes


def build_exit_graph(model: EarlyExitModel, policy: ExitPolicy, scratch: Path, quantize: str | None = None,
                     max_layer: bool = True, compaction: str = "when-needed") -> ExitGraph:
    """One ONNX graph that runs `model` with early exits decided inside it (layout: module docstring), its pieces
    traced and built in the folder `scratch`.

    policy: the criterion (fixed in the graph) and the defaults of the threshold, patience and lam inputs.
    quantize: None (float32) or "int8" (ONNX Runtime's dynamic quantization of every piece: the layers' matrix
    products, the embedding tables and the heads' dense layers). max_layer: offer the max_layer input (a cap on the
    exit layer). compaction: "when-needed" gathers the staying rows only at a level where some row left; "always"
    at every level.
    """
    import onnx
    from onnx import helper

    if compaction not in COMPACTIONS:
        raise ExportError(f"unknown compaction '{compaction}'; choose one of {', '.join(COMPACTIONS)}")
    encoder = model.backbone.encoder
    attention = encoder.config._attn_implementation
    encoder.set_attn_implementation("eager")  # the form that runs fastest on ONNX Runtime (tracing.py)
    model.eval()
    try:
        config = model.backbone.config
        # checked on another shape than the traced one, so that the axes are known to be dynamic
        checks = {s.name: s.inputs for s in piece_specs(model, policy, example_batch(config, 3, 11, 1), max_layer)}
        pieces = {spec.name: build_piece(spec, scratch, quantize, checks[spec.name])
                  for spec in piece_specs(model, policy, example_batch(config, 2, 8, 0), max_layer)}
    finally:
        encoder.set_attn_implementation(attention)
    stitcher = Stitcher(pieces, model.num_layers, compaction)
    token_names = [i.name for i in pieces["inputs"].model.graph.input]
    context_names = [o.name for o in pieces["inputs"].model.graph.output][1:]
    nodes, initializers = stitcher.inline("inputs", {name: name for name in
                                                     [*token_names, "hidden", *context_names]})
    scope = Scope("hidden", {name: name for name in context_names}, "attention_mask", {})
    level_nodes, level_initializers = stitcher.level(0, scope, list(OUTPUTS))
    read = {name for piece in pieces.values() for name in piece.consumed()} | {"max_layer"}
    defaults = {name: value.numpy() for name, value in policy_tensors(policy, model.num_layers).items()
                if name in read and (max_layer or name != "max_layer")}
    if not max_layer:  # no cap: M, a constant ONNX Runtime folds away
        level_initializers.append(onnx.numpy_helper.from_array(np.array(model.num_layers, np.int64), "max_layer"))
    graph_inputs = [i for i in pieces["inputs"].model.graph.input]
    graph_inputs += [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), [])
                     for name, value in defaults.items()]
    graph = helper.make_graph(
        nodes + level_nodes, "de3bert_exit_graph", graph_inputs,
        [helper.make_tensor_value_info(name, stitcher.types[name][0], [None] * stitcher.types[name][1])
         for name in OUTPUTS],
        initializer=initializers + level_initializers
        + [onnx.numpy_helper.from_array(value, name) for name, value in defaults.items()])
    opsets = {}
    for piece in pieces.values():
        for opset in piece.model.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="de3bert")
    built.ir_version = max(piece.model.ir_version for piece in pieces.values())
    return ExitGraph(built, [i.name for i in graph_inputs], {name: piece.difference for name, piece in pieces.items()})
