"""Trade-off plots: task metric against layer speed-up, one curve per exit criterion."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from de3bert.exits.criteria import criterion_label  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", "-.", ":")


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows not beaten on both speed-up and metric by another row, sorted by speed-up."""
    front, best = [], float("-inf")
    for row in sorted(rows, key=lambda r: (-r["speedup"], -r["metric"])):
        if row["metric"] > best:
            front.append(row)
            best = row["metric"]
    return sorted(front, key=lambda r: r["speedup"])


def coinciding_curves(sweeps: dict[str, list[dict]]) -> list[list[str]]:
    """Criteria grouped by identical Pareto fronts (entropy and max-probability always coincide on two classes:
    both are monotone in max p), in the sweeps' order."""
    groups: dict[tuple, list[str]] = {}
    for criterion, rows in sweeps.items():
        key = tuple((round(r["speedup"], 9), round(r["metric"], 9)) for r in pareto_front(rows))
        groups.setdefault(key, []).append(criterion)
    return list(groups.values())


def plot_tradeoff(sweeps: dict[str, list[dict]], path: str | Path, title: str, metric_name: str,
                  full_depth: float | None = None, oracle: dict | None = None,
                  calibrated: list[dict] | None = None, recipe: str | None = None) -> Path:
    """Save a PNG of metric vs speed-up for each criterion's sweep (its Pareto front).

    Curves are named by criterion (a method's name only for the criterion of the recipe the model was trained
    with); criteria whose curves coincide share one line whose label says so.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = {}
    for index, group in enumerate(coinciding_curves(sweeps)):
        front = pareto_front(sweeps[group[0]])
        label = " = ".join(criterion_label(c, recipe) for c in group) + (" (same exits)" if len(group) > 1 else "")
        (line,) = ax.plot([r["speedup"] for r in front], [r["metric"] for r in front], label=label,
                          marker=MARKERS[index % len(MARKERS)], markersize=4,
                          linestyle=LINESTYLES[index % len(LINESTYLES)])
        colors |= dict.fromkeys(group, line.get_color())
    for row in calibrated or []:
        if "speedup" in row:
            ax.scatter(row["speedup"], row["metric"], marker="o", s=60, facecolors="none",
                       edgecolors=colors.get(row["criterion"], "black"))
    if full_depth is not None:
        ax.axhline(full_depth, color="gray", linestyle="--", linewidth=1, label="full depth")
    if oracle is not None:
        ax.scatter(oracle["speedup"], oracle["metric"], marker="*", s=120, color="black", label="oracle", zorder=3)
    ax.set_xlabel("layer speed-up ratio (M·N / Σ exit layers)")
    ax.set_ylabel(metric_name)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure as a PNG (its folder created) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
