"""What the commands share: options generated from settings dataclasses, the exit-policy and device options, the
help formatter and plain-text tables."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from de3bert.devices import PRECISIONS
from de3bert.exits.criteria import CRITERIA

DATA_HELP = ("folder in the official GLUE layout (<dir>/<TASK>/train.tsv, dev.tsv); default: $GLUE_DIR, "
             "else ../shared/data/glue")
RUNTIME_HELP = ("torch (PyTorch) or onnx (ONNX Runtime, on a folder written by `de3bert export`); default: the one "
                "the folder was written for")
HUB_HELP = "read the task from a Hugging Face datasets id instead (e.g. nyu-mll/glue; needs internet and `datasets`)"
RUNTIMES = ("torch", "onnx")
TYPES = {"int": int, "float": float, "str": str, "bool": bool}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default to its help, unless it has none or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        """The option's help, with its default where that adds something."""
        if action.default is None or "default" in (action.help or "") or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def add_knobs(group: argparse._ActionsContainer, settings: type, skip: tuple[str, ...] = ()) -> None:
    """One option per field of a dataclass written with `knobs.knob`: its flag, type, default, choices and help come
    from the field (a boolean that defaults to True becomes --no-NAME)."""
    for spec in fields(settings):
        if spec.name in skip or not spec.metadata.get("cli", True):
            continue
        default = None if spec.default is MISSING else spec.default
        annotation = spec.type.replace(" | None", "")
        many = annotation.startswith("tuple[")  # tuple[float, ...]: one or more values
        kind = TYPES[annotation.removeprefix("tuple[").split(",")[0]] if many else TYPES[annotation]
        help_text = spec.metadata["help"]
        if kind is bool:
            flag = f"--{'no-' if default else ''}{spec.name.replace('_', '-')}"
            group.add_argument(flag, dest=spec.name, action="store_false" if default else "store_true",
                               help=f"do not {help_text}" if default else help_text)
            continue
        flag = spec.metadata.get("flag", f"--{spec.name.replace('_', '-')}")  # --output for output_dir, ...
        group.add_argument(flag, dest=spec.name, type=kind, default=default, choices=spec.metadata.get("choices"),
                           nargs="+" if many else None, help=help_text)


def knob_values(settings: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of a knob dataclass from the parsed options (and overrides)."""
    values = {spec.name: getattr(args, spec.name) for spec in fields(settings) if hasattr(args, spec.name)}
    values = {name: tuple(value) if isinstance(value, list) else value for name, value in values.items()}
    return settings(**(values | overrides))


def add_policy_options(parser: argparse.ArgumentParser) -> None:
    """--criterion (every criterion, full depth included), --threshold, --patience, --lam."""
    group = parser.add_argument_group("exit policy (default: the one calibrated into the checkpoint)")
    group.add_argument("--criterion", choices=list(CRITERIA), help="exit criterion")
    group.add_argument("--threshold", type=float, default=0.5, help="threshold τ in [0, 1] (tolerance for regression)")
    group.add_argument("--patience", type=int, default=1, help="consecutive confident layers needed to exit")
    group.add_argument("--lam", type=float, default=1.0, help="λ of the hybrid indicator EDR")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """--device and --precision of inference."""
    parser.add_argument("--device", default="auto",
                        help="where to run: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="precision of the weights: auto is fp32 on the CPU and bf16 on a GPU (fp16 where it has "
                             "no bf16)")


def add_runtime_option(parser: argparse.ArgumentParser) -> None:
    """--runtime torch|onnx."""
    parser.add_argument("--runtime", choices=RUNTIMES, help=RUNTIME_HELP)


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    """--no-progress."""
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def table(rows: list[dict], columns: list[str]) -> str:
    """Rows as a plain-text table of the given columns, right-aligned (floats with 4 decimals, None as -)."""
    widths = {c: max([len(c), *(len(_cell(r.get(c))) for r in rows)]) for c in columns}  # rows may be none
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(_cell(r.get(c)).rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)
