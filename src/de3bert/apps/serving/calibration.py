"""The served default policy calibrated at start-up on a file of recent traffic (`de3bert serve --calibrate-from`),
in memory: the folder is not written (`de3bert calibrate` writes it)."""

from __future__ import annotations

import logging
from pathlib import Path

from de3bert.apps.calibrate import calibrate_model, default_targets, read_inputs
from de3bert.apps.serving.settings import ServiceSettings
from de3bert.exits.runners import ExitRunner
from de3bert.model.config import EarlyExitConfig

logger = logging.getLogger("de3bert.serving")


def calibrate_on_start(model: ExitRunner, settings: ServiceSettings) -> EarlyExitConfig:
    """The model's config with its default policy's criterion calibrated on `settings.calibrate_from`'s texts to
    `calibrate_speedup` (the default policy's own target when unset) and to the other usual targets (the calibrated
    table keeps its range for per-request target speed-ups); the first becomes the served default."""
    examples = read_inputs(model.config, settings.calibrate_from, settings.calibrate_text_column,
                           settings.calibrate_text_pair_column)
    calibration = calibrate_model(model, examples, Path(settings.calibrate_from).name,
                                  default_targets(model.config, settings.calibrate_speedup))
    default = calibration.default
    logger.info("calibrated the default policy on %s (%d inputs): %s τ=%.4g at %.2fx (95%% interval %.2fx to %.2fx)%s",
                calibration.inputs, calibration.examples, default["criterion"], default["threshold"],
                default["speedup"], default["speedup_low"], default["speedup_high"],
                f"; warning: {default['warning']}" if "warning" in default else "")
    return calibration.config
