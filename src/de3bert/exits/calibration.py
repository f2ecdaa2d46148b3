"""Calibration: exit policies tuned to a target layer speed-up, the default policy's criterion, the calibrated
table, and the policy for a speed-up between calibrated targets.

Everything here works on `LayerOutputs` (every head's output, computed once) and `simulate_exits`: the
layer speed-up of a policy on a set of inputs follows from the exit layers alone, so thresholds are
tuned offline, without running the model again.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch

from de3bert.data import TaskSpec, main_metric
from de3bert.errors import PolicyError
from de3bert.exits.criteria import get_criterion
from de3bert.exits.outputs import LayerOutputs, task_metrics
from de3bert.exits.policies import ExitPolicy, simulate_exits, speedup_ratio

T = TypeVar("T")
TARGET_SPEEDUPS = (1.5, 2.0, 3.0)
"""Layer speed-ups every criterion is calibrated to after training."""


def evaluate_policy(policy: ExitPolicy, outputs: LayerOutputs, task: TaskSpec) -> dict:
    """One trade-off row: the policy, its layer speed-up, metric and mean exit layer."""
    exits = simulate_exits(policy, outputs.heads())
    metrics = task_metrics(task, exits.predictions, outputs.labels)
    return {
        "criterion": policy.criterion, "threshold": policy.threshold, "patience": policy.patience, "lam": policy.lam,
        "speedup": speedup_ratio(exits.exit_layers, outputs.num_layers), "metric": main_metric(task, metrics),
        "mean_exit_layer": float(exits.exit_layers.float().mean()), **metrics,
    }


def threshold_grid(values: torch.Tensor, points: int, below: bool = True) -> list[float]:
    """Thresholds at `points` quantiles of indicator values, each just past its quantile so that the inputs
    there exit too (exits happen strictly below τ, or above it where `below` is False)."""
    if not values.numel():
        return []
    quantiles = torch.quantile(values.double(), torch.linspace(0, 1, points, dtype=torch.float64)).tolist()
    # step past each value by more than float32's resolution there: indicators are float32, and regression
    # tolerances exceed 1, where a fixed 1e-7 rounds away and the largest value could never exit
    return [v + (1e-7 + 1e-6 * abs(v)) * (1.0 if below else -1.0) for v in quantiles]


def candidate_policies(criterion: str, outputs: LayerOutputs, points: int = 40, patience: int = 2,
                       lam: float = 1.0) -> list[ExitPolicy]:
    """A grid of policies spanning the criterion's whole trade-off curve on these outputs (patience: t of the
    criteria that take a given patience)."""
    spec, num_layers = get_criterion(criterion), outputs.num_layers
    if not spec.exits_early:
        return [ExitPolicy(criterion, lam=lam)]
    if spec.patience == "swept":
        return [ExitPolicy(criterion, patience=t, lam=lam) for t in range(1, num_layers)]
    policy_patience = patience if spec.patience == "given" else 1
    probe = ExitPolicy(criterion, patience=policy_patience, lam=lam)
    values, previous = [], None
    for head in outputs.heads()[:-1]:
        indicator, previous = probe.indicator(head, previous)
        values.append(indicator[torch.isfinite(indicator)])
    grid = threshold_grid(torch.cat(values), points, spec.below)
    if spec.threshold == "probability":
        grid = [min(1.0, max(0.0, v)) for v in grid] + [0.0, 1.0]
    return [ExitPolicy(criterion, threshold=t, patience=policy_patience, lam=lam) for t in sorted(set(grid))]


def scored_candidates(criterion: str, outputs: LayerOutputs, **grid) -> list[tuple[float, ExitPolicy]]:
    """(layer speed-up, policy) of a fine grid of the criterion's policies on these outputs (labels unused)."""
    heads = outputs.heads()
    return [(speedup_ratio(simulate_exits(p, heads).exit_layers, outputs.num_layers), p)
            for p in candidate_policies(criterion, outputs, points=200, **grid)]


def most_conservative(scored: list[tuple[float, T]], criterion: str, target_speedup: float) -> T:
    """Of (layer speed-up, setting) pairs, the setting with the smallest speed-up that reaches the target."""
    reaching = [(s, p) for s, p in scored if s >= target_speedup - 1e-9]
    if not reaching:
        # rounded inwards, so that a fastest 2.996x does not read as "up to 3.00x" next to "cannot reach 3x"
        low, high = math.ceil(100 * min(s for s, _ in scored)) / 100, math.floor(100 * max(s for s, _ in scored)) / 100
        raise PolicyError(
            f"criterion '{criterion}' cannot reach a layer speed-up of {target_speedup:g}x on this model; "
            f"reachable range is {low:.2f}x to {high:.2f}x"
        )
    return min(reaching, key=lambda sp: sp[0])[1]


def calibrate(criterion: str, outputs: LayerOutputs, task: TaskSpec, target_speedup: float, **grid) -> ExitPolicy:
    """The most conservative policy of a criterion whose layer speed-up reaches the target."""
    return most_conservative(scored_candidates(criterion, outputs, **grid), criterion, target_speedup)


def choose_policy(criteria: tuple[str, ...], calibration: LayerOutputs, task: TaskSpec, target_speedup: float,
                  preferred: str, forced: bool = False, **grid) -> tuple[ExitPolicy, dict]:
    """The default exit policy and the record of how it was chosen (a checkpoint's `policy_selection`).

    Each criterion is calibrated to the target speed-up on the calibration outputs and scored there; the winner
    is the highest metric among those that reach the target (ties: `preferred`, the recipe's own criterion, which
    is scored too if `criteria` lacks it).
    `forced` takes `preferred` whatever the others score. A winner that cannot reach the target (nothing can,
    or the forced one cannot) gives its fastest policy.
    """
    standings, policies = [], {}
    for criterion in dict.fromkeys((*criteria, preferred)):
        scored = scored_candidates(criterion, calibration, **grid)
        try:  # a criterion that never exits early has one policy, whatever the target
            policies[criterion] = (most_conservative(scored, criterion, target_speedup)
                                   if get_criterion(criterion).exits_early else scored[0][1])
        except PolicyError as exc:
            policies[criterion] = fastest_of(scored)
            standings.append({"criterion": criterion, "error": str(exc)})
            continue
        row = evaluate_policy(policies[criterion], calibration, task)
        standings.append({"criterion": criterion, "metric": row["metric"], "speedup": row["speedup"]})
    # best first; among equal metrics the preferred criterion first, then the given order
    standings.sort(key=lambda r: ("metric" not in r, -r.get("metric", 0.0), r["criterion"] != preferred))
    winner = preferred if forced or "metric" not in standings[0] else standings[0]["criterion"]
    selection = {"criterion": winner, "preferred": preferred, "forced": forced, "target_speedup": target_speedup,
                 "metric": task.main_metric, "standings": standings}
    return policies[winner], selection | {"summary": describe_choice(selection)}


def fastest_of(scored: list[tuple[float, T]]) -> T:
    """Of (layer speed-up, setting) pairs, the setting with the largest speed-up."""
    return max(scored, key=lambda sp: sp[0])[1]


def calibrated_table(criteria: tuple[str, ...], calibration: LayerOutputs, evaluation: LayerOutputs, task: TaskSpec,
                     targets: tuple[float, ...] = TARGET_SPEEDUPS, **grid) -> list[dict]:
    """For each criterion and target speed-up: τ calibrated on one split, measured on another."""
    rows = []
    for criterion in criteria:
        scored = scored_candidates(criterion, calibration, **grid)
        for target in targets:
            try:
                policy = most_conservative(scored, criterion, target)
            except PolicyError as exc:
                rows.append({"criterion": criterion, "target_speedup": target, "error": str(exc)})
                continue
            rows.append({"target_speedup": target, **evaluate_policy(policy, evaluation, task)})
    return rows


def describe_choice(selection: dict) -> str:
    """One sentence saying which criterion a `choose_policy` record picked, and by how much."""
    rows = {r["criterion"]: r for r in selection["standings"]}
    winner, preferred, metric = selection["criterion"], selection["preferred"], selection["metric"]
    target = f"{selection['target_speedup']:.3g}x"
    if "metric" not in rows[winner]:
        return f"{rows[winner]['error']}; the default exit policy is the fastest reachable one"
    score = f"calibration {metric} {rows[winner]['metric']:.4f} at {rows[winner]['speedup']:.2f}x"
    best = selection["standings"][0]
    if selection["forced"]:
        beaten = "" if best["criterion"] == winner else f"; best was {best['criterion']} with {best['metric']:.4f}"
        return f"{winner}, as asked by --criterion ({score}{beaten})"
    others = [r for r in selection["standings"] if r["criterion"] != winner and "metric" in r]
    if winner == preferred:
        if others and others[0]["metric"] == rows[winner]["metric"]:
            return (f"{winner}, the recipe's own, ties with {others[0]['criterion']} on the calibration split at "
                    f"{target} ({score}) and is kept")
        margin = f", {rows[winner]['metric'] - others[0]['metric']:+.4f} against {others[0]['criterion']}" if others else ""
        return f"{winner}, the recipe's own, scores best on the calibration split at {target} ({score}){margin}"
    own = rows[preferred]
    against = (f"{rows[winner]['metric'] - own['metric']:+.4f} against the recipe's own {preferred}"
               if "metric" in own else f"the recipe's own {preferred} cannot reach {target}")
    return f"{winner} scores best on the calibration split at {target} ({score}), {against}"


def policy_for_speedup(calibration: list[dict], criterion: str, target: float) -> ExitPolicy:
    """The policy of a criterion for a target layer speed-up inside the calibrated range: the calibrated
    policy at a calibrated target, τ interpolated linearly between the two neighbouring targets."""
    rows = sorted((r for r in calibration if r.get("criterion") == criterion and "threshold" in r),
                  key=lambda r: r["target_speedup"])
    if not rows:
        raise PolicyError(f"the checkpoint holds no calibrated thresholds for criterion '{criterion}'; "
                          "give a threshold instead of target_speedup")
    low, high = rows[0]["target_speedup"], rows[-1]["target_speedup"]
    if not low <= target <= high:
        raise PolicyError(f"target_speedup {target:g} is outside the range calibrated for criterion "
                          f"'{criterion}': {low:g}x to {high:g}x")
    upper = next(r for r in rows if r["target_speedup"] >= target)
    lower = rows[rows.index(upper) - 1] if upper["target_speedup"] > target else upper
    if lower is upper or lower["patience"] != upper["patience"]:
        # a patience count cannot be interpolated: take the calibrated point that reaches the target
        return ExitPolicy(criterion, upper["threshold"], upper["patience"], upper["lam"])
    share = (target - lower["target_speedup"]) / (upper["target_speedup"] - lower["target_speedup"])
    threshold = lower["threshold"] + share * (upper["threshold"] - lower["threshold"])
    return ExitPolicy(criterion, threshold, upper["patience"], upper["lam"])
