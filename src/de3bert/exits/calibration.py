"""Calibration: exit policies tuned to a target layer speed-up, how far to trust them, the default policy's
criterion, the calibrated table, the fastest policy within an accuracy budget, and the policy for a speed-up
between calibrated targets.

Everything here works on `LayerOutputs` (every head's output, computed once) and `simulate_exits`: the
layer speed-up of a policy on a set of inputs follows from the exit layers alone, so thresholds are
tuned offline, without running the model again, and without labels (outputs of unlabelled inputs carry
label −1; only metrics read labels).

How far to trust a calibration: a policy's speed-up on the calibration inputs is a sample mean, so its
95 % bootstrap interval (inputs resampled, the policy fixed) says where the speed-up on more traffic of the
same kind lies. A calibration warns when that interval is wider than ±`SPEEDUP_TOLERANCE` of the target,
when the inputs are fewer than `MIN_INPUTS`, or when the closest policy lands beyond that tolerance (a
criterion that moves in whole layers, as patience does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch

from de3bert.data import TaskSpec, main_metric
from de3bert.errors import PolicyError
from de3bert.exits.criteria import REFERENCE_CRITERION, get_criterion
from de3bert.exits.outputs import LayerOutputs, task_metrics
from de3bert.exits.policies import ExitPolicy, SimulatedExits, simulate_exits, speedup_ratio
from de3bert.model.config import EarlyExitConfig

T = TypeVar("T")
TARGET_SPEEDUPS = (1.5, 2.0, 3.0)
"""Layer speed-ups every criterion is calibrated to after training."""
SPEEDUP_TOLERANCE = 0.05
"""How far, relative to the target, a speed-up may land and still keep a calibration's promise (±5 %)."""
MIN_INPUTS = 100
"""Fewest inputs a calibration is trusted on: below, even the bootstrap interval is unreliable."""
RESAMPLES = 1000
"""Bootstrap resamples of the speed-up intervals and of the default criterion's margins."""
LEVEL = 0.95
"""Coverage of the bootstrap intervals."""
MAX_SCAN = 5000
"""Most policies `fastest_within` scores one by one: beyond, it scans this many quantile thresholds."""


def _policy_row(policy: ExitPolicy, exits: SimulatedExits, outputs: LayerOutputs, task: TaskSpec | None) -> dict:
    row = {"criterion": policy.criterion, "threshold": policy.threshold, "patience": policy.patience,
           "lam": policy.lam, "speedup": speedup_ratio(exits.exit_layers, outputs.num_layers)}
    metrics = {} if task is None else task_metrics(task, exits.predictions, outputs.labels)
    if task is not None:
        row["metric"] = main_metric(task, metrics)
    return row | {"mean_exit_layer": float(exits.exit_layers.float().mean()), **metrics}


def evaluate_policy(policy: ExitPolicy, outputs: LayerOutputs, task: TaskSpec | None) -> dict:
    """One trade-off row: the policy, its layer speed-up, metric (task None: no metric, labels unused) and mean
    exit layer."""
    return _policy_row(policy, simulate_exits(policy, outputs.heads()), outputs, task)


def threshold_grid(values: torch.Tensor, points: int | None, below: bool = True) -> list[float]:
    """Thresholds at `points` quantiles of indicator values, each just past its value so that the inputs there exit
    too (exits happen strictly below τ, or above it where `below` is False); points None: one threshold between
    every two neighbouring distinct values (`separating_thresholds`)."""
    if not values.numel():
        return []
    if points is None:
        return separating_thresholds(values, below)
    anchors = torch.quantile(values.double(), torch.linspace(0, 1, points, dtype=torch.float64)).tolist()
    # step past each value by more than float32's resolution there: indicators are float32, and regression
    # tolerances exceed 1, where a fixed 1e-7 rounds away and the largest value could never exit
    return [v + (1e-7 + 1e-6 * abs(v)) * (1.0 if below else -1.0) for v in anchors]


def separating_thresholds(values: torch.Tensor, below: bool = True) -> list[float]:
    """For every distinct (float32) indicator value, the threshold that lets exactly the values up to it exit (down to
    it where `below` is False): the float32 number halfway to the next distinct value — as far from both as float32
    allows, so that a runtime's rounding hardly moves an exit — or the next value itself where none lies between
    (the comparison is strict); past the last value, its next float32 number."""
    distinct = torch.unique(values.float())  # ascending
    if not below:  # confident above τ: mirror, so that "up to" runs downwards
        distinct = -distinct.flip(0)
    after = torch.cat([distinct[1:], torch.nextafter(distinct[-1:], torch.tensor(math.inf))])
    middle = ((distinct.double() + after.double()) / 2).float()
    thresholds = torch.where(middle > distinct, middle, after)
    return (thresholds if below else -thresholds.flip(0)).double().tolist()


def candidate_policies(criterion: str, outputs: LayerOutputs, points: int | None = 40, patience: int = 2,
                       lam: float = 1.0) -> list[ExitPolicy]:
    """A grid of policies spanning the criterion's whole trade-off curve on these outputs (points: thresholds at
    that many quantiles, None: every distinct policy; patience: t of the criteria that take a given patience)."""
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


def ordered_policies(criterion: str, outputs: LayerOutputs, points: int | None = None, **grid) -> list[ExitPolicy]:
    """The criterion's policies on these outputs (`candidate_policies`; default: every distinct one) from the
    slowest to the fastest: the layer speed-up never falls along the list."""
    spec = get_criterion(criterion)
    policies = candidate_policies(criterion, outputs, points, **grid)
    # more patience, or a higher bar of a criterion confident above τ, exits later
    return policies[::-1] if spec.patience == "swept" or not spec.below else policies


def most_conservative(scored: list[tuple[float, T]], criterion: str, target_speedup: float) -> T:
    """Of (layer speed-up, setting) pairs, the setting with the smallest speed-up that reaches the target."""
    reaching = [(s, p) for s, p in scored if s >= target_speedup - 1e-9]
    if not reaching:
        raise _unreachable(criterion, target_speedup, [s for s, _ in scored])
    return min(reaching, key=lambda sp: sp[0])[1]


def _unreachable(criterion: str, target_speedup: float, speedups: list[float]) -> PolicyError:
    # rounded inwards, so that a fastest 2.996x does not read as "up to 3.00x" next to "cannot reach 3x"
    low, high = math.ceil(100 * min(speedups)) / 100, math.floor(100 * max(speedups)) / 100
    return PolicyError(f"criterion '{criterion}' cannot reach a layer speed-up of {target_speedup:g}x on this model; "
                       f"reachable range is {low:.2f}x to {high:.2f}x")


def calibrate(criterion: str, outputs: LayerOutputs, target_speedup: float, **grid) -> ExitPolicy:
    """The most conservative policy of a criterion whose layer speed-up on these outputs reaches the target (labels
    unused): a binary search over every distinct policy, so the speed-up reached is the smallest at or above the
    target that these inputs allow."""
    policies, heads = ordered_policies(criterion, outputs, **grid), outputs.heads()
    speedups: dict[int, float] = {}

    def speedup(index: int) -> float:
        if index not in speedups:
            speedups[index] = speedup_ratio(simulate_exits(policies[index], heads).exit_layers, outputs.num_layers)
        return speedups[index]

    low, high = 0, len(policies) - 1
    if speedup(high) < target_speedup - 1e-9:
        raise _unreachable(criterion, target_speedup, [speedup(0), speedup(high)])
    while low < high:  # the speed-up of policies[high] reaches the target
        middle = (low + high) // 2
        if speedup(middle) >= target_speedup - 1e-9:
            high = middle
        else:
            low = middle + 1
    return policies[high]


def speedup_interval(exit_layers: torch.Tensor, num_layers: int, resamples: int = RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the layer speed-up M·N / Σ m_i of these exit layers: the inputs resampled
    with replacement (seeded), the policy that gave them fixed."""
    count, layers = exit_layers.numel(), exit_layers.double().flatten()
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, 4_000_000 // count)  # resamples drawn at once, keeping the index matrix small
    sums = torch.cat([layers[torch.randint(count, (min(chunk, resamples - start), count), generator=generator)].sum(1)
                      for start in range(0, resamples, chunk)])
    speedups = num_layers * count / sums
    tail = (1.0 - level) / 2
    return float(torch.quantile(speedups, tail)), float(torch.quantile(speedups, 1.0 - tail))


def trust_warning(row: dict) -> str | None:
    """Why a calibrated row (target, speed-up, its interval and number of inputs) cannot promise its target within
    ±SPEEDUP_TOLERANCE, or None when it can."""
    target, tolerance = row["target_speedup"], SPEEDUP_TOLERANCE * row["target_speedup"]
    problems = []
    if row["examples"] < MIN_INPUTS:
        problems.append(f"only {row['examples']} inputs (fewer than {MIN_INPUTS})")
    if (row["speedup_high"] - row["speedup_low"]) / 2 > tolerance:
        problems.append(f"the {LEVEL:.0%} interval {row['speedup_low']:.2f}x to {row['speedup_high']:.2f}x is wider "
                        f"than ±{SPEEDUP_TOLERANCE:.0%} of {target:g}x")
    if row["speedup"] - target > tolerance:
        problems.append(f"the closest policy gives {row['speedup']:.2f}x (the criterion moves in coarse steps)")
    if not problems:
        return None
    return "; ".join(problems) + f": more traffic like this may run more than {SPEEDUP_TOLERANCE:.0%} from {target:g}x"


def promise_row(policy: ExitPolicy, outputs: LayerOutputs, target_speedup: float, task: TaskSpec | None = None,
                resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """A calibrated row with how far to trust it: the policy, the target and the speed-up reached on these inputs,
    its bootstrap interval, the number of inputs, a warning where they cannot promise the target (`trust_warning`),
    and with a task the metric (labels read)."""
    exits = simulate_exits(policy, outputs.heads())
    low, high = speedup_interval(exits.exit_layers, outputs.num_layers, resamples, seed)
    row = {"target_speedup": target_speedup, **_policy_row(policy, exits, outputs, task), "speedup_low": low,
           "speedup_high": high, "examples": int(exits.exit_layers.numel())}
    warning = trust_warning(row)
    return row | ({"warning": warning} if warning else {})


def per_target(criterion: str, outputs: LayerOutputs, targets: tuple[float, ...],
               row: Callable[[ExitPolicy, float], dict], **grid) -> list[dict]:
    """For each target speed-up, `row` of the most conservative policy of the criterion reaching it on these
    outputs (an unreachable target: a row with the error)."""
    rows = []
    for target in targets:
        try:
            policy = calibrate(criterion, outputs, target, **grid)
        except PolicyError as exc:
            rows.append({"criterion": criterion, "target_speedup": target, "error": str(exc)})
            continue
        rows.append(row(policy, target))
    return rows


def calibrate_targets(criterion: str, outputs: LayerOutputs, targets: tuple[float, ...], task: TaskSpec | None = None,
                      resamples: int = RESAMPLES, seed: int = 0, **grid) -> list[dict]:
    """For each target speed-up, the most conservative policy of the criterion reaching it on these inputs, as a
    `promise_row` (an unreachable target: a row with the error)."""
    return per_target(criterion, outputs, targets,
                      lambda policy, target: promise_row(policy, outputs, target, task, resamples, seed), **grid)


def full_depth_metric(outputs: LayerOutputs, task: TaskSpec) -> float:
    """The task's metric of the last exit: every input through every layer."""
    return main_metric(task, task_metrics(task, outputs.predictions()[-1], outputs.labels))


def fastest_within(criterion: str, outputs: LayerOutputs, task: TaskSpec, max_drop: float, resamples: int = RESAMPLES,
                   seed: int = 0, **grid) -> dict:
    """The fastest policy of the criterion whose metric on these (labelled) outputs stays within `max_drop` points
    (metric × 100) of full depth, as a `promise_row` with target = the speed-up it reaches, plus the full-depth
    metric and the drop. Every distinct policy is scored (beyond MAX_SCAN of them, MAX_SCAN quantile thresholds;
    "exact" says which), fastest first, so no faster policy of the criterion keeps the metric within the budget;
    among equally fast ones the best metric wins."""
    if not max_drop >= 0:
        raise PolicyError(f"max drop must be a number of points >= 0, got {max_drop}")
    full = full_depth_metric(outputs, task)
    policies = ordered_policies(criterion, outputs, **grid)
    exact = len(policies) <= MAX_SCAN
    if not exact:
        policies = ordered_policies(criterion, outputs, MAX_SCAN, **grid)
    heads, best = outputs.heads(), None
    for policy in [*reversed(policies), ExitPolicy.never_exiting(criterion, outputs.num_layers, policies[0].lam)]:
        row = _policy_row(policy, simulate_exits(policy, heads), outputs, task)
        if best is not None and row["speedup"] < best[1]["speedup"] - 1e-12:
            break
        if row["metric"] >= full - max_drop / 100 - 1e-12 and (best is None or row["metric"] > best[1]["metric"]):
            best = policy, row
    row = promise_row(best[0], outputs, best[1]["speedup"], task, resamples, seed)
    return row | {"full_depth_metric": full, "metric_drop": 100 * (full - row["metric"]), "max_drop": max_drop,
                  "exact": exact}


def paired_margins(task: TaskSpec, labels: torch.Tensor, reference: torch.Tensor, others: dict[str, torch.Tensor],
                   resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict[str, tuple[float, float, float]]:
    """Paired bootstrap of (metric of each other criterion's predictions − metric of the reference's) on the same
    inputs: name -> (margin on all inputs, interval low, interval high), every criterion scored on the same
    resamples."""
    def metric(predictions: torch.Tensor, rows: torch.Tensor | slice) -> float:
        return main_metric(task, task_metrics(task, predictions[rows], labels[rows]))

    generator = torch.Generator().manual_seed(seed)
    differences: dict[str, list[float]] = {name: [] for name in others}
    for _ in range(resamples):
        rows = torch.randint(len(labels), (len(labels),), generator=generator)
        base = metric(reference, rows)
        for name, predictions in others.items():
            differences[name].append(metric(predictions, rows) - base)
    tail, whole = (1.0 - level) / 2, slice(None)
    intervals = {}
    for name, values in differences.items():
        spread = torch.tensor(values, dtype=torch.float64)
        intervals[name] = (metric(others[name], whole) - metric(reference, whole), float(torch.quantile(spread, tail)),
                           float(torch.quantile(spread, 1.0 - tail)))
    return intervals


def choose_policy(criteria: tuple[str, ...], calibration: LayerOutputs, task: TaskSpec, target_speedup: float,
                  preferred: str, forced: bool = False, resamples: int = RESAMPLES, seed: int = 0,
                  **grid) -> tuple[ExitPolicy, dict]:
    """The default exit policy and the record of how it was chosen (a checkpoint's `policy_selection`).

    Each criterion is calibrated to the target speed-up on the calibration outputs and scored there. The reference
    criterion (REFERENCE_CRITERION where the model supports it, else `preferred`, the recipe's own) stays the
    default unless another one beats it beyond noise: the lower end of the paired bootstrap interval of its margin
    (its metric − the reference's, on the same resampled inputs) above 0; of several, the largest margin wins.
    Every margin and interval is recorded. A reference that cannot reach the target leaves the highest metric among
    those that do. `forced` takes `preferred` whatever the others score. A winner that cannot reach the target
    (nothing can, or the forced one cannot) gives its fastest policy.
    """
    reference = REFERENCE_CRITERION if REFERENCE_CRITERION in criteria else preferred
    heads = calibration.heads()
    standings, policies, predictions = [], {}, {}
    for criterion in dict.fromkeys((reference, *criteria, preferred)):
        try:  # a criterion that never exits early has one policy, whatever the target
            policies[criterion] = (calibrate(criterion, calibration, target_speedup, **grid)
                                   if get_criterion(criterion).exits_early
                                   else ordered_policies(criterion, calibration, **grid)[0])
        except PolicyError as exc:
            policies[criterion] = ordered_policies(criterion, calibration, **grid)[-1]  # the fastest
            standings.append({"criterion": criterion, "error": str(exc)})
            continue
        exits = simulate_exits(policies[criterion], heads)
        predictions[criterion] = exits.predictions
        row = _policy_row(policies[criterion], exits, calibration, task)
        standings.append({"criterion": criterion, "metric": row["metric"], "speedup": row["speedup"]})
    if reference in predictions:
        margins = paired_margins(task, calibration.labels, predictions[reference],
                                 {c: p for c, p in predictions.items() if c != reference}, resamples, seed)
        for row in standings:
            if row["criterion"] in margins:
                row["margin"], row["margin_low"], row["margin_high"] = margins[row["criterion"]]
    # best first; among equal metrics the reference first, then the given order
    standings.sort(key=lambda r: ("metric" not in r, -r.get("metric", 0.0), r["criterion"] != reference))
    beyond_noise = [r for r in standings if r.get("margin_low", 0.0) > 0.0]
    if forced:
        winner = preferred
    elif reference in predictions:
        winner = max(beyond_noise, key=lambda r: r["margin"])["criterion"] if beyond_noise else reference
    else:
        winner = standings[0]["criterion"] if "metric" in standings[0] else reference
    selection = {"criterion": winner, "preferred": preferred, "reference": reference, "forced": forced,
                 "target_speedup": target_speedup, "metric": task.main_metric, "examples": len(calibration.labels),
                 "resamples": resamples, "level": LEVEL, "standings": standings}
    return policies[winner], selection | {"summary": describe_choice(selection)}


def calibrated_table(criteria: tuple[str, ...], calibration: LayerOutputs, evaluation: LayerOutputs, task: TaskSpec,
                     targets: tuple[float, ...] = TARGET_SPEEDUPS, **grid) -> list[dict]:
    """For each criterion and target speed-up: τ calibrated on one split, measured on another."""
    return [row for criterion in criteria for row in per_target(
        criterion, calibration, targets,
        lambda policy, target: {"target_speedup": target, **evaluate_policy(policy, evaluation, task)}, **grid)]


def _margin(row: dict, selection: dict) -> str:
    """A margin with its interval, as the summary sentence shows it."""
    return (f"{row['margin']:+.4f} ({selection.get('level', LEVEL):.0%} interval {row['margin_low']:+.4f} to "
            f"{row['margin_high']:+.4f}, paired bootstrap over {selection['examples']} examples)")


def closest_challenger(selection: dict) -> dict | None:
    """The standing with the largest margin over the reference among the criteria that exit differently from it (a
    zero margin on every resample: the same answers, as max-probability gives entropy's on two classes); None if
    there is none."""
    differing = [r for r in selection["standings"] if "margin" in r
                 and (r["margin"], r["margin_low"], r["margin_high"]) != (0.0, 0.0, 0.0)]
    return max(differing, key=lambda r: r["margin"], default=None)


def describe_choice(selection: dict) -> str:
    """One sentence saying which criterion a `choose_policy` record picked, by how much and how surely (records
    written before margins were kept are described by their plain differences)."""
    rows = {r["criterion"]: r for r in selection["standings"]}
    winner, metric = selection["criterion"], selection["metric"]
    reference = selection.get("reference", selection["preferred"])
    target = f"{selection['target_speedup']:.3g}x"
    if "metric" not in rows[winner]:
        return f"{rows[winner]['error']}; the default exit policy is the fastest reachable one"
    score = f"calibration {metric} {rows[winner]['metric']:.4f} at {rows[winner]['speedup']:.2f}x"
    best = selection["standings"][0]
    if selection["forced"]:
        beaten = "" if best["criterion"] == winner else f"; best was {best['criterion']} with {best['metric']:.4f}"
        return f"{winner}, as asked by --criterion ({score}{beaten})"
    others = [r for r in selection["standings"] if r["criterion"] != winner and "metric" in r]
    if winner != reference:
        if "margin" in rows[winner]:
            return (f"{winner} beats the reference {reference} beyond noise on the calibration split at {target} "
                    f"({score}): {_margin(rows[winner], selection)}")
        own = rows.get(reference, {})
        against = (f"{rows[winner]['metric'] - own['metric']:+.4f} against {reference}" if "metric" in own
                   else f"{reference} cannot reach {target}")
        return f"{winner} scores best on the calibration split at {target} ({score}), {against}"
    if any("margin" in r for r in others):
        kept = f"{winner}, the reference, is kept on the calibration split at {target} ({score})"
        closest = closest_challenger(selection)
        if closest is None:
            return f"{kept}: the other criteria give the same answers"
        return (f"{kept}: no criterion beats it beyond noise; the closest, {closest['criterion']}, "
                f"{_margin(closest, selection)}")
    if others:
        return (f"{winner} scores best on the calibration split at {target} ({score}), "
                f"{rows[winner]['metric'] - others[0]['metric']:+.4f} against {others[0]['criterion']}")
    return f"{winner} scores best on the calibration split at {target} ({score})"


def promise_of(row: dict, inputs: str) -> dict:
    """A default policy's promise, as `EarlyExitConfig.calibrated_speedup` holds it, from its `promise_row` and a
    description of the calibration inputs."""
    keys = ("criterion", "target_speedup", "speedup", "speedup_low", "speedup_high", "examples", "warning", "metric",
            "metric_drop", "max_drop")
    return {key: row[key] for key in keys if key in row} | {"inputs": inputs}


def default_promise(config: EarlyExitConfig) -> dict | None:
    """What a checkpoint's default policy was calibrated to deliver: its target layer speed-up and the speed-up
    measured on the calibration inputs (with the interval, the number of inputs and where they came from, where
    recorded); from the policy selection for checkpoints written before that was recorded; None when unknown."""
    if config.calibrated_speedup:
        return config.calibrated_speedup
    selection = config.policy_selection
    if not config.policy or not selection:
        return None
    row = next((r for r in selection.get("standings", [])
                if r["criterion"] == config.policy["criterion"] and "speedup" in r), None)
    return None if row is None else {"criterion": row["criterion"], "target_speedup": selection["target_speedup"],
                                     "speedup": row["speedup"], "inputs": "the training run's calibration split"}


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
