"""The same model on two runtimes, scored side by side: every exit's metric and the calibrated policy's (what an
export — int8 above all — costs in accuracy)."""

from __future__ import annotations

from de3bert.data import encode_examples, main_metric
from de3bert.evaluation.run_data import evaluation_source, split_examples
from de3bert.exits.calibration import evaluate_policy
from de3bert.exits.outputs import collect_layer_outputs, layer_metrics
from de3bert.exits.policies import ExitPolicy
from de3bert.exits.runners import ExitRunner


def compare_exits(reference: ExitRunner, candidate: ExitRunner, data_dir: str | None = None,
                  names: tuple[str, str] = ("pytorch", "onnx")) -> list[dict]:
    """Dev metric of every exit, and of the reference's calibrated policy with its layer speed-up, on both models
    (dev: the split that chose the checkpoint's best epoch, rebuilt from its recorded data; data_dir: where GLUE
    data is now)."""
    data, _, examples = split_examples(reference, evaluation_source(reference, None, data_dir))
    task = data.task
    encoded = encode_examples(reference.tokenizer, examples, reference.config.max_length)
    ours, theirs = collect_layer_outputs(reference, encoded), collect_layer_outputs(candidate, encoded)
    first, second = names
    rows = [{"exit": b["layer"], first: main_metric(task, a), second: main_metric(task, b)}
            for a, b in zip(layer_metrics(ours, task), layer_metrics(theirs, task))]
    if reference.config.policy:
        policy = ExitPolicy(**reference.config.policy)
        a, b = evaluate_policy(policy, ours, task), evaluate_policy(policy, theirs, task)
        rows.append({"exit": f"{policy.criterion} τ={policy.threshold:.4g}", first: a["metric"], second: b["metric"],
                     f"speedup_{first}": a["speedup"], f"speedup_{second}": b["speedup"]})
    return rows
