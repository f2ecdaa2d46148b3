"""Exiting: the criteria (one registry), indicators, policies, calibration, the runner protocol and the engine."""

from de3bert.exits.criteria import CRITERIA, Criterion, applicable_criteria, get_criterion
from de3bert.exits.engine import EarlyExitEngine, Prediction
from de3bert.exits.runners import BatchExits
from de3bert.exits.policies import ExitPolicy, simulate_exits, speedup_ratio
from de3bert.exits.runners import ExitRunner

__all__ = ["CRITERIA", "BatchExits", "Criterion", "EarlyExitEngine", "ExitPolicy", "ExitRunner", "Prediction",
           "applicable_criteria", "get_criterion", "simulate_exits", "speedup_ratio"]
