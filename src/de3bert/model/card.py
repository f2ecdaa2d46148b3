"""The model card (README.md) written into every checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from de3bert.atomic import write_file
from de3bert.data import source_from_dict


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |\n" for row in rows)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def render_model_card(config, plot: str | None = None) -> str:
    """Markdown model card for an EarlyExitConfig: backbone, task, data, per-layer metrics, trade-off
    (with the trade-off plot at the relative path `plot`, if given), and how to load and serve it."""
    training = config.training or {}
    lines = [
        f"# de3bert early-exit model: {config.task}",
        "",
        f"- backbone: `{config.backbone_name}` ({config.backbone.get('model_type')}, "
        f"{config.backbone.get('num_hidden_layers')} layers, hidden {config.backbone.get('hidden_size')})",
        f"- task: `{config.task}`, " + (_labels(config) if config.labels else "regression score"),
        f"- exit heads: {config.heads.pooling or 'cls'} pooling, prototype dim "
        f"{config.heads.prototype_dim if config.heads.prototype_dim is not None else 'hidden size'}, "
        f"distance {config.heads.distance}; max length {config.max_length} tokens",
    ]
    if training:
        lines.append(f"- recipe: `{training.get('recipe')}`, epochs {training.get('epochs')}, "
                     f"learning rate {training.get('learning_rate')} (heads {training.get('head_learning_rate')}), "
                     f"seed {training.get('seed')}")
        dev = training.get("dev_split", "dev")
        lines.append(f"- data: {training.get('train_examples')} training, {training.get('calibration_examples')} "
                     f"calibration (held out from train), {training.get('dev_examples')} {dev} examples"
                     + ("" if dev == "dev" else " (held out from train, to pick the best epoch)")
                     + (f" (train subsampled to {training['max_train_samples']})"
                        if training.get("max_train_samples") else ""))
        if "data" in training:
            lines.append(f"- data source: {source_from_dict(training['data']).describe()}")
    if config.policy:
        lines.append(f"- default exit policy: {_policy(config.policy)}"
                     + (f": {config.policy_selection['summary']}" if config.policy_selection.get("summary") else ""))
    if config.calibrated_speedup:
        lines.append(f"- {_promise(config.calibrated_speedup)}")
    layer_metrics = training.get("layer_metrics")
    if layer_metrics:
        lines += ["", "## Metric of every exit (dev)", "", _table(layer_metrics, list(layer_metrics[0]))]
    counts = training.get("class_counts") or {}
    if any(counts.values()):
        header = {"train": "train", "calibration": "calibration", "dev": training.get("dev_split", "dev")}
        rows = [{"label": name, **{header[split]: by_class.get(name) for split, by_class in counts.items()}}
                for name in config.label_names]
        lines += ["", "## Examples of each class", "", _table(rows, ["label", *(header[split] for split in counts)])]
    margins = [row for row in config.policy_selection.get("standings", []) if "margin" in row]
    if margins:
        selection = config.policy_selection
        lines += ["", "## Default criterion", "",
                  f"Every criterion calibrated to {selection['target_speedup']:g}x on the calibration split "
                  f"({selection['examples']} examples) and scored there; margin: its {selection['metric']} minus the "
                  f"reference {selection['reference']}'s, with the {selection['level']:.0%} interval of a paired "
                  f"bootstrap ({selection['resamples']} resamples). The reference stays the default unless an "
                  "interval lies above 0.", "",
                  _table(selection["standings"], ["criterion", "metric", "speedup", "margin", "margin_low",
                                                  "margin_high", "error"])]
    calibrated = [row for row in config.calibration if "error" not in row]
    if calibrated:
        where = ("Thresholds calibrated on a held-out calibration split to a target layer speed-up; measured on dev"
                 if not config.calibration_history else
                 "Thresholds calibrated to a target layer speed-up; the rows `de3bert calibrate` wrote say on what "
                 "inputs (`inputs`), with the speed-up there and its interval, the others are from training "
                 "(measured on dev)")
        lines += ["", "## Calibrated trade-off", "", where + ".", "",
                  _table(calibrated, list(dict.fromkeys(key for row in calibrated for key in row)))]
    lines += [f"- {row['criterion']} at {row['target_speedup']:g}x: {row['error']}"
              for row in config.calibration if "error" in row]
    if config.calibration_history:
        lines += ["", "## Calibration history", "", "Replaced by `de3bert calibrate`, oldest first (config.json keeps "
                  "every replaced table in `calibration_history`):", ""]
        lines += [f"- {entry['replaced']}: default {_policy(entry['policy']) if entry.get('policy') else 'none'}"
                  + (f"; {_promise(entry['calibrated_speedup'])}" if entry.get("calibrated_speedup") else "")
                  + f"; replaced by calibration on {entry['replaced_by']}" for entry in config.calibration_history]
    if plot:
        lines += ["", f"![accuracy/speed trade-off]({plot})"]
    else:
        lines += ["", "The full trade-off curves and plot: `de3bert evaluate path/to/this/folder` "
                      "(writes evaluation/tradeoff.png, which this card then shows)."]
    lines += [
        "", "## Use", "", "```python", "from de3bert import EarlyExitEngine, load_model", "",
        "model = load_model('path/to/this/folder')",
        "engine = EarlyExitEngine(model)  # uses the calibrated policy above",
        "print(engine.predict(['a sentence to classify']))", "```", "",
        "or `de3bert predict path/to/this/folder --text '...'`, `de3bert serve path/to/this/folder`.", "",
    ]
    return "\n".join(lines)


def _policy(policy: dict) -> str:
    return f"{policy['criterion']} τ={policy['threshold']:.4g}, patience {policy['patience']}"


def _promise(promise: dict) -> str:
    """What the default policy was calibrated to deliver, in words."""
    interval = (f" (95% interval {promise['speedup_low']:.2f}x to {promise['speedup_high']:.2f}x)"
                if "speedup_low" in promise else "")
    count = f"{promise['examples']} inputs of " if "examples" in promise else ""
    warning = f"; warning: {promise['warning']}" if promise.get("warning") else ""
    return (f"calibrated to {promise['target_speedup']:g}x: {promise['speedup']:.2f}x{interval} on {count}"
            f"{promise['inputs']}{warning}")


def _labels(config) -> str:
    """The classes by name, with the value the data writes for each where that differs."""
    named = [name if name == value else f"{name} ({value})" for name, value in zip(config.label_names, config.labels)]
    return f"{len(named)} classes: {', '.join(named)}"


def write_model_card(config, directory: Path) -> None:
    """Write README.md for a checkpoint directory (atomically), showing a trade-off plot found in one of its
    subfolders."""
    directory = Path(directory)
    plots = sorted(directory.glob("*/tradeoff.png"))
    plot = plots[0].relative_to(directory).as_posix() if plots else None
    text = render_model_card(config, plot)
    write_file(directory / "README.md", lambda handle: handle.write(text.encode()))
