"""de3bert: BERT-family text classifiers that answer faster by early exiting, with exit decisions that can be trusted.

    from de3bert import EarlyExitEngine, TrainingArguments, load_model, train

    result = train("sst2", "minilm-l6", TrainingArguments(output_dir="runs/sst2", epochs=2))
    engine = EarlyExitEngine(load_model(result.output_dir))  # the checkpoint's calibrated exit policy
    print(engine.predict(["a gripping, funny film"]))

The names below are imported when first used, so that `import de3bert` (and the command line's help) stays
light; the packages behind them show the architecture (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "EarlyExitModel": "de3bert.model.modeling",
    "EarlyExitConfig": "de3bert.model.config",
    "ExitHeadConfig": "de3bert.model.config",
    "EarlyExitEngine": "de3bert.exits.engine",
    "Prediction": "de3bert.exits.engine",
    "ExitPolicy": "de3bert.exits.policies",
    "CRITERIA": "de3bert.exits.criteria",
    "TrainingArguments": "de3bert.training.arguments",
    "train": "de3bert.training.launch",
    "resume": "de3bert.training.launch",
    "load_model": "de3bert.apps.runtimes",
    "evaluate_checkpoint": "de3bert.evaluation.report",
    "calibrate_folder": "de3bert.apps.calibrate",
    "export_checkpoint": "de3bert.onnx.export",
    "OnnxEarlyExitModel": "de3bert.onnx.runtime",
    "ServiceSettings": "de3bert.apps.serving.settings",
    "create_app": "de3bert.apps.serving.app",
}
__all__ = list(_PUBLIC)

if TYPE_CHECKING:
    from de3bert.apps.calibrate import calibrate_folder
    from de3bert.apps.runtimes import load_model
    from de3bert.apps.serving.app import create_app
    from de3bert.apps.serving.settings import ServiceSettings
    from de3bert.evaluation.report import evaluate_checkpoint
    from de3bert.exits.criteria import CRITERIA
    from de3bert.exits.engine import EarlyExitEngine, Prediction
    from de3bert.exits.policies import ExitPolicy
    from de3bert.model.config import EarlyExitConfig, ExitHeadConfig
    from de3bert.model.modeling import EarlyExitModel
    from de3bert.onnx.export import export_checkpoint
    from de3bert.onnx.runtime import OnnxEarlyExitModel
    from de3bert.training.arguments import TrainingArguments
    from de3bert.training.launch import resume, train


def __getattr__(name: str) -> Any:
    """The public name, imported from its module on first use."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'de3bert' has no attribute '{name}'")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the public ones included."""
    return sorted({*globals(), *_PUBLIC})
