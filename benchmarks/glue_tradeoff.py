"""GLUE trade-off study (issue: reproduce the paper's claim): DE³ vs DeeBERT, PABEE, PCEE at equal speed-up.

Every method is trained with its own recipe on the same backbone and data, then each criterion's
threshold is calibrated to layer speed-ups 1.5x, 2x and 3x on the held-out calibration slice of
train and measured on dev:

    de3 model:     DE³ (EDR, λ = 0.5 / 1 / 2), entropy, DR only, patience
    pabee model:   PABEE (patience), PCEE (entropy + patience)
    deebert model: DeeBERT (entropy)

STS-B is regression: prototypes (and so EDR, DR and entropy) are undefined there, which makes the
de3 recipe the pabee one (joint, linearly weighted MSE). The stsb plan trains pabee and deebert
and exits both with patience on the regression output (|Δ score| < τ for t = 1 or 2 layers).

Resumable: trained checkpoints are cached under results/cache/tradeoff/, every finished run writes
results/glue_tradeoff/<plan>/runs/<run>.json and is skipped next time; <plan>/progress.json says
what is done. Each plan's results are aggregated (mean ± std over seeds) into <plan>/summary.json,
table.md and one PNG per task; `--report` only aggregates.

    .venv/bin/python benchmarks/glue_tradeoff.py --plan main        # MiniLM-L6 on SST-2, RTE, CoLA
    .venv/bin/python benchmarks/glue_tradeoff.py --plan mpnet       # MPNet-12 on SST-2 and RTE (~1 h)
    .venv/bin/python benchmarks/glue_tradeoff.py --plan ablations   # DE³ variants on 4,000 SST-2 sentences
    .venv/bin/python benchmarks/glue_tradeoff.py --plan stsb        # MiniLM-L6 on STS-B (regression)
    .venv/bin/python benchmarks/glue_tradeoff.py --plan main --report
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root holds the `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks import indicator_analysis  # noqa: E402
from de3bert.data import encode_examples, load_split, main_metric  # noqa: E402
from de3bert.evaluation.report import oracle  # noqa: E402
from de3bert.evaluation.run_data import calibration_examples  # noqa: E402
from de3bert.evaluation.separation import indicator_auroc  # noqa: E402
from de3bert.exits.calibration import TARGET_SPEEDUPS, calibrated_table  # noqa: E402
from de3bert.exits.outputs import collect_layer_outputs, layer_metrics  # noqa: E402
from de3bert.model.config import ExitHeadConfig  # noqa: E402
from de3bert.model.modeling import EarlyExitModel  # noqa: E402
from de3bert.training.arguments import TrainingArguments  # noqa: E402
from de3bert.training.launch import train  # noqa: E402

RESULTS = Path("results") / "glue_tradeoff"
CACHE = Path("results") / "cache" / "tradeoff"
# (method label, criterion, policy options) evaluated on each recipe's model; PCEE and regression patience
# default to patience t = 2
METHODS = {
    "de3": [("DE³ (EDR)", "edr", {}), ("DE³ (EDR, λ=0.5)", "edr", {"lam": 0.5}), ("DE³ (EDR, λ=2)", "edr", {"lam": 2.0}),
            ("entropy on DE³", "entropy", {}), ("DR only on DE³", "dr", {}), ("patience on DE³", "patience", {})],
    "pabee": [("PABEE", "patience", {}), ("PCEE", "pcee", {})],
    "deebert": [("DeeBERT", "entropy", {})],
}
# regression: the de3 recipe equals pabee (no prototypes), so only pabee and deebert are trained
# (t = 2 cannot exit before layer 3, so it cannot reach 3x on 6 layers; t = 1 can)
REGRESSION_METHODS = {
    "pabee": [("PABEE (regression patience t=2)", "regression-patience", {}),
              ("PABEE (regression patience t=1)", "regression-patience", {"patience": 1})],
    "deebert": [("regression patience t=2 on DeeBERT", "regression-patience", {}),
                ("regression patience t=1 on DeeBERT", "regression-patience", {"patience": 1})],
}
HEADLINE = ("DE³ (EDR)", "DeeBERT", "PABEE", "PCEE", "entropy on DE³") + tuple(
    label for methods in REGRESSION_METHODS.values() for label, _, _ in methods)
SEPARATION = ("edr", "entropy", "dr", "confidence")
# Budgets sized for 2 CPU cores (per-stage epochs; SST-2 subsampled).
TASK_SETTINGS = {
    "sst2": dict(max_train_samples=8000, epochs=2, max_length=64),
    "rte": dict(epochs=3, max_length=128),
    "cola": dict(epochs=3, max_length=64),
    "stsb": dict(epochs=3, max_length=64),
}
# MPNet-12 is ~6x slower than MiniLM-L6 here: one epoch per stage, on a 2,000-sentence SST-2 subsample (~20 min for
# the three recipes) and on all of RTE (~15 min per epoch, about an hour for the three recipes).
MPNET_BUDGETS = {"sst2": {"max_train_samples": 2000, "epochs": 1}, "rte": {"epochs": 1}}
# The prototypes plan: the DE³ recipe with the paper's running-mean prototypes against learned ones, side by side
# (both without a prototypical network on the last layer); γ is fixed a priori, the γ runs only show its effect.
PROTOTYPE_VARIANTS = {"ema": {"prototypes": "ema"}, "learned": {"prototypes": "learned"}}
MOMENTA = (0.01, 0.1, 0.5)
HEAD_KEYS = ("prototype_dim", "distance", "pooling", "prototypes", "prototype_momentum")
# the prototype geometry of a DE³ model, per layer (indicator_analysis.analyse)
GEOMETRY = ("median_entropy", "median_dr", "edr_follows_dr", "disagreement_rate", "prototype_separation")
VARIANT_NAMES = {"ema": "running means", "learned": "learned"}
PLANS = ("main", "mpnet", "stsb", "ablations", "prototypes")


@dataclass(frozen=True)
class Run:
    """One training run of the study: task, backbone, recipe, seed and an optional DE³ variant."""

    task: str
    backbone: str
    recipe: str
    seed: int
    variant: str = ""
    overrides: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        """File-safe identifier."""
        variant = f"-{self.variant}" if self.variant else ""
        return f"{self.backbone}-{self.task}-{self.recipe}{variant}-s{self.seed}"


def plan(name: str) -> list[Run]:
    """The runs of a named plan, seed-major so that partial progress covers every method."""
    if name == "main":
        return [Run(task, "minilm-l6", recipe, seed)
                for seed in (42, 43, 44) for task in ("sst2", "rte", "cola") for recipe in METHODS
                if seed == 42 or task != "sst2"]
    if name == "mpnet":
        return [Run(task, "mpnet-base", recipe, 42, overrides=MPNET_BUDGETS[task])
                for task in ("sst2", "rte") for recipe in METHODS]
    if name == "prototypes":
        def side_by_side(task, backbone, seed, budget=None):
            return [Run(task, backbone, "de3", seed, variant, {**(budget or {}), **options})
                    for variant, options in PROTOTYPE_VARIANTS.items()]
        # seed 42 first, then MPNet and γ, then the other seeds: partial progress covers every question
        first = [run for task in ("sst2", "rte", "cola") for run in side_by_side(task, "minilm-l6", 42)]
        mpnet = [run for task in ("rte", "sst2") for run in side_by_side(task, "mpnet-base", 42, MPNET_BUDGETS[task])]
        momenta = [Run("sst2", "minilm-l6", "de3", 42, f"4k-ema-g{m:g}",
                       {"max_train_samples": 4000, "prototypes": "ema", "prototype_momentum": m}) for m in MOMENTA]
        momenta.append(Run("sst2", "minilm-l6", "de3", 42, "4k-learned", {"max_train_samples": 4000,
                                                                          "prototypes": "learned"}))
        rest = [run for seed in (43, 44) for task in ("rte", "cola") for run in side_by_side(task, "minilm-l6", seed)]
        # then more seeds where the mechanism made the largest difference (MPNet-12 on the SST-2 subsample)
        mpnet_seeds = [run for seed in (43, 44) for run in side_by_side("sst2", "mpnet-base", seed, MPNET_BUDGETS["sst2"])]
        return first + mpnet + momenta + rest + mpnet_seeds
    if name == "stsb":
        return [Run("stsb", "minilm-l6", recipe, seed) for seed in (42, 43, 44) for recipe in REGRESSION_METHODS]
    if name == "ablations":
        variants = {"no-proto-loss": {"alpha": 0.0}, "no-dar": {"beta": 0.0}, "cosine": {"distance": "cosine"},
                    "dim64": {"prototype_dim": 64}, "cls-pooling": {"pooling": "cls"},
                    "paper-heads": {"pooling": "cls", "head_learning_rate": None}}
        # on a 4,000-sentence subsample (half the main plan's) to fit the machine; "reference" is the unchanged recipe
        return [Run("sst2", "minilm-l6", "de3", 42, v, {"max_train_samples": 4000, **o})
                for v, o in {"reference": {}, **variants}.items()]
    raise SystemExit(f"unknown plan '{name}'; choose one of {', '.join(PLANS)}")


def trained_checkpoint(run: Run, data_dir: str | None, learning_rate: float) -> Path:
    """The run's checkpoint, trained unless a finished one is cached."""
    folder = CACHE / run.name
    config = folder / "config.json"
    if config.exists() and "layer_metrics" in json.loads(config.read_text())["de3bert"].get("training", {}):
        return folder
    heads = ExitHeadConfig(**{k: v for k, v in run.overrides.items() if k in HEAD_KEYS})
    settings = TASK_SETTINGS[run.task] | {k: v for k, v in run.overrides.items() if k not in HEAD_KEYS}
    args = TrainingArguments(output_dir=str(folder), recipe=run.recipe, seed=run.seed, learning_rate=learning_rate,
                             progress=False, **settings)
    train(run.task, run.backbone, args, data_dir, heads=heads)
    return folder


def evaluate_run(run: Run, folder: Path, data_dir: str | None) -> dict:
    """Calibrated trade-off of every method on the run's model, plus per-layer metrics, oracle, AUROC."""
    model = EarlyExitModel.from_pretrained(folder)
    task, dev_examples = load_split(run.task, "dev", data_dir)
    encode = lambda examples: encode_examples(model.tokenizer, examples, model.config.max_length)  # noqa: E731
    dev = collect_layer_outputs(model, encode(dev_examples))
    calibration = collect_layer_outputs(model, encode(calibration_examples(model, run.task, data_dir, None)[1]))
    layers = layer_metrics(dev, task)
    methods = {}
    for label, criterion, options in (REGRESSION_METHODS if task.is_regression else METHODS)[run.recipe]:
        rows = calibrated_table((criterion,), calibration, dev, task, **{"patience": 2, **options})
        methods[label] = rows
    report = {"run": run.name, "task": run.task, "backbone": run.backbone, "recipe": run.recipe, "seed": run.seed,
              "variant": run.variant, "overrides": run.overrides, "metric": task.main_metric,
              "layer_metrics": layers, "full_depth": main_metric(task, layers[-1]), "oracle": oracle(dev, task),
              "methods": methods, "training": model.config.training}
    if run.recipe == "de3":
        report["separation"] = {c: indicator_auroc(c, dev) for c in SEPARATION}
        report["geometry"] = indicator_analysis.analyse(model, calibration, dev)
    return report


def execute(runs: list[Run], folder: Path, data_dir: str | None, learning_rate: float) -> None:
    """Train and evaluate every run not finished yet, recording progress in folder after each."""
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    for index, run in enumerate(runs, 1):
        target = folder / "runs" / f"{run.name}.json"
        if not target.exists():
            print(f"[{index}/{len(runs)}] {run.name}", flush=True)
            report = evaluate_run(run, trained_checkpoint(run, data_dir, learning_rate), data_dir)
            staging = target.with_suffix(".tmp")
            staging.write_text(json.dumps(report, indent=2))
            staging.replace(target)
        done = [r.name for r in runs if (folder / "runs" / f"{r.name}.json").exists()]
        (folder / "progress.json").write_text(json.dumps(
            {"planned": [r.name for r in runs], "done": done, "remaining": len(runs) - len(done)}, indent=2))


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def aggregate(folder: Path) -> dict:
    """Mean ± std over seeds of every (backbone, task, variant, method, target) cell, from folder's run files."""
    reports = [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]
    cells: dict[tuple, dict[str, list[float]]] = {}
    for report in reports:
        base = (report["backbone"], report["task"], report["variant"])
        full = cells.setdefault(base + (f"full depth ({report['recipe']})", 1.0), {"metric": [], "speedup": []})
        full["metric"].append(report["full_depth"])
        full["speedup"].append(1.0)
        if report["oracle"]:
            cell = cells.setdefault(base + ("oracle (DE³ model)" if report["recipe"] == "de3" else
                                            f"oracle ({report['recipe']})", 0.0), {"metric": [], "speedup": []})
            cell["metric"].append(report["oracle"]["metric"])
            cell["speedup"].append(report["oracle"]["speedup"])
        for label, rows in report["methods"].items():
            for row in rows:
                if "metric" in row:
                    cell = cells.setdefault(base + (label, row["target_speedup"]), {"metric": [], "speedup": []})
                    cell["metric"].append(row["metric"])
                    cell["speedup"].append(row["speedup"])
    summary = [{"backbone": b, "task": t, "variant": v, "method": m, "target_speedup": s,
                "metric": _mean_std(c["metric"]), "speedup": _mean_std(c["speedup"])}
               for (b, t, v, m, s), c in sorted(cells.items())]
    separation = {}
    for report in reports:
        if "separation" in report:
            key = "-".join(filter(None, (report["backbone"], report["task"], report["variant"])))
            for criterion, scores in report["separation"].items():
                separation.setdefault(key, {}).setdefault(criterion, []).append(scores)
    auroc = {key: {c: [statistics.fmean(v) if (v := [s[m] for s in runs if s[m] is not None]) else None
                       for m in range(len(runs[0]))] for c, runs in table.items()}
             for key, table in separation.items()}
    geometry: dict[str, dict[int, dict[str, list[float]]]] = {}
    for report in reports:
        key = "-".join(filter(None, (report["backbone"], report["task"], report["variant"])))
        for row in report.get("geometry", []):
            layer = geometry.setdefault(key, {}).setdefault(row["layer"], {})
            for name in GEOMETRY:
                if row[name] is not None:
                    layer.setdefault(name, []).append(row[name])
    geometry_means = {key: [{"layer": layer, **{name: statistics.fmean(values) for name, values in names.items()}}
                            for layer, names in sorted(layers.items())] for key, layers in geometry.items()}
    return {"cells": summary, "auroc": auroc, "geometry": geometry_means, "runs": [r["run"] for r in reports]}


def _cell(summary: dict, backbone: str, task: str, method: str, target: float, variant: str = "") -> str:
    for row in summary["cells"]:
        if (row["backbone"], row["task"], row["method"], row["target_speedup"], row["variant"]) == \
                (backbone, task, method, target, variant):
            m, s = row["metric"], row["speedup"]
            spread = f" ± {100 * m['std']:.1f}" if m["n"] > 1 else ""
            return f"{100 * m['mean']:.1f}{spread} ({s['mean']:.2f}x)"
    return "–"


def markdown_table(summary: dict) -> str:
    """The paper-style table: task × method at each calibrated speed-up, with full depth and oracle."""
    lines = []
    pairs = sorted({(r["backbone"], r["task"]) for r in summary["cells"] if not r["variant"]})
    for backbone, task in pairs:
        lines += [f"\n**{backbone} / {task}** — dev metric ×100, mean ± std over seeds (measured speed-up)\n",
                  "| method | " + " | ".join(f"{t:g}x" for t in TARGET_SPEEDUPS) + " |",
                  "|---|" + "---|" * len(TARGET_SPEEDUPS)]
        methods = [m for table in (METHODS, REGRESSION_METHODS) for recipe in table.values() for m, _, _ in recipe]
        for method in methods:
            cells = [_cell(summary, backbone, task, method, t) for t in TARGET_SPEEDUPS]
            if any(c != "–" for c in cells):
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        for reference in ("full depth (de3)", "full depth (pabee)", "full depth (deebert)", "oracle (DE³ model)"):
            target = 0.0 if reference.startswith("oracle") else 1.0
            cell = _cell(summary, backbone, task, reference, target)
            if cell != "–":
                lines.append(f"| {reference} | {cell} | | |")
    return "\n".join(lines) + "\n"


def _rows(summary: dict, backbone: str, task: str, method: str, variant: str = "") -> list[dict]:
    """The calibrated cells of one method (and variant) on one task, in target order."""
    return [r for r in summary["cells"] if (r["backbone"], r["task"], r["method"], r["variant"]) ==
            (backbone, task, method, variant)]


def plot_series(series: list[tuple[str, list[dict]]], full_depth: tuple[str, float] | None, title: str,
                path: Path) -> None:
    """Calibrated points (mean ± std over seeds) of labelled series of cells, with a full-depth line."""
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for label, rows in series:
        if rows:
            axis.errorbar([r["speedup"]["mean"] for r in rows], [r["metric"]["mean"] for r in rows],
                          yerr=[r["metric"]["std"] for r in rows], marker="o", capsize=3, label=label)
    if full_depth is not None:
        axis.axhline(full_depth[1], color="grey", linestyle="--", label=full_depth[0])
    axis.set_xlabel("layer speed-up (calibrated on held-out train slice, measured on dev)")
    axis.set_ylabel("dev metric")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_task(summary: dict, backbone: str, task: str, path: Path) -> None:
    """Calibrated points of the headline methods on one task."""
    full = None
    for recipe, name in (("de3", "DE³"), ("pabee", "PABEE")):  # regression tasks have no DE³ model
        rows = _rows(summary, backbone, task, f"full depth ({recipe})")
        if rows:
            full = (f"full depth ({name} model)", rows[0]["metric"]["mean"])
            break
    plot_series([(method, _rows(summary, backbone, task, method)) for method in HEADLINE], full,
                f"{backbone} / {task}: accuracy at equal speed-up", path)


def plot_prototypes(summary: dict, backbone: str, task: str, path: Path) -> None:
    """EDR and entropy on DE³ models with running-mean and with learned prototypes, beside the baselines."""
    reference = _reference_summary(backbone)
    series = [(f"{method} ({VARIANT_NAMES[variant]} prototypes)", _rows(summary, backbone, task, method, variant))
              for method in ("DE³ (EDR)", "entropy on DE³") for variant in VARIANT_NAMES]
    series += [(f"{method} (earlier study)", _rows(reference, backbone, task, method)) for method in ("DeeBERT", "PCEE")]
    full = _rows(summary, backbone, task, "full depth (de3)", "ema")
    plot_series(series, ("full depth (DE³, running means)", full[0]["metric"]["mean"]) if full else None,
                f"{backbone} / {task}: running-mean vs learned prototypes", path)


def ablation_table(summary: dict) -> str:
    """One row per DE³ variant: EDR and entropy at each calibrated speed-up, full depth, mean AUROC of both."""
    variants = sorted({(r["backbone"], r["task"], r["variant"]) for r in summary["cells"] if r["variant"]})
    if not variants:
        return ""
    targets = [f"{method} {t:g}x" for method in ("EDR", "entropy") for t in TARGET_SPEEDUPS]
    lines = ["\n**DE³ variants** — dev metric ×100 (measured speed-up); AUROC averaged over layers\n",
             "| backbone / task / variant | " + " | ".join(targets) + " | full depth | AUROC EDR | AUROC entropy |",
             "|---|" + "---|" * (len(targets) + 3)]
    for backbone, task, variant in variants:
        cells = [_cell(summary, backbone, task, method, t, variant)
                 for method in ("DE³ (EDR)", "entropy on DE³") for t in TARGET_SPEEDUPS]
        cells.append(_cell(summary, backbone, task, "full depth (de3)", 1.0, variant).split(" (")[0])
        scores = summary["auroc"].get(f"{backbone}-{task}-{variant}", {})
        for criterion in ("edr", "entropy"):
            values = [v for v in scores.get(criterion, []) if v is not None]
            cells.append(f"{statistics.fmean(values):.3f}" if values else "–")
        lines.append(f"| {backbone} / {task} / {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _reference_summary(backbone: str) -> dict:
    """The baselines' cells for the side-by-side tables: the main plan's (MiniLM) or the mpnet plan's summary."""
    path = RESULTS / ("mpnet" if backbone == "mpnet-base" else "main") / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {"cells": [], "auroc": {}}


def prototype_tables(summary: dict) -> str:
    """The prototypes plan: running-mean against learned prototypes side by side, with the baselines of the main
    (or mpnet) plan, the γ runs, per-layer AUROC and the prototype geometry."""
    pairs = sorted({(r["backbone"], r["task"]) for r in summary["cells"] if r["variant"] in PROTOTYPE_VARIANTS})
    if not pairs:
        return ""
    lines = []
    for backbone, task in pairs:
        reference = _reference_summary(backbone)
        lines += [f"\n**{backbone} / {task}** — dev metric ×100, mean ± std over seeds (measured speed-up)\n",
                  "| method | prototypes | " + " | ".join(f"{t:g}x" for t in TARGET_SPEEDUPS) + " |",
                  "|---|---|" + "---|" * len(TARGET_SPEEDUPS)]
        for method, _, _ in METHODS["de3"]:
            for variant, name in VARIANT_NAMES.items():
                cells = [_cell(summary, backbone, task, method, t, variant) for t in TARGET_SPEEDUPS]
                lines.append(f"| {method} | {name} | " + " | ".join(cells) + " |")
            old = [_cell(reference, backbone, task, method, t) for t in TARGET_SPEEDUPS]
            if any(c != "–" for c in old):
                lines.append(f"| {method} | learned, with last-layer prototypes (earlier study) | "
                             + " | ".join(old) + " |")
        for method in ("DeeBERT", "PABEE", "PCEE"):
            cells = [_cell(reference, backbone, task, method, t) for t in TARGET_SPEEDUPS]
            if any(c != "–" for c in cells):
                lines.append(f"| {method} | – (earlier study) | " + " | ".join(cells) + " |")
        for variant, name in VARIANT_NAMES.items():
            full = _cell(summary, backbone, task, "full depth (de3)", 1.0, variant)
            oracle = _cell(summary, backbone, task, "oracle (DE³ model)", 0.0, variant)
            lines.append(f"| full depth / oracle | {name} | {full} | {oracle} | |")
        layers = max((len(scores) for variant in VARIANT_NAMES
                      for scores in summary["auroc"].get(f"{backbone}-{task}-{variant}", {}).values()), default=0)
        lines += ["", "AUROC of each indicator against a correct exit, per layer (mean over seeds):", "",
                  "| indicator | prototypes | " + " | ".join(f"L{m}" for m in range(1, layers + 1)) + " |",
                  "|---|---|" + "---|" * layers]
        for criterion in ("entropy", "edr", "dr"):
            for variant, name in VARIANT_NAMES.items():
                scores = summary["auroc"].get(f"{backbone}-{task}-{variant}", {}).get(criterion)
                if scores:
                    lines.append(f"| {criterion} | {name} | " + " | ".join(
                        "–" if v is None else f"{v:.3f}" for v in scores) + " |")
        lines += ["", "Prototype geometry, per layer with prototypes (mean over seeds): median Ent / median DR, share "
                      "of inputs where DR < Ent (EDR follows DR), classifier and nearest prototype disagreeing, "
                      "distance between prototypes ÷ distance of an input to its own:", "",
                  "| prototypes | layer | median Ent | median DR | EDR follows DR | disagreement | separation |",
                  "|---|---|---|---|---|---|---|"]
        for variant, name in VARIANT_NAMES.items():
            for row in summary["geometry"].get(f"{backbone}-{task}-{variant}", []):
                lines.append(f"| {name} | {row['layer']} | {row['median_entropy']:.3f} | {row['median_dr']:.3f} | "
                             f"{100 * row['edr_follows_dr']:.0f} % | {100 * row['disagreement_rate']:.1f} % | "
                             f"{row['prototype_separation']:.1f} |")
    return "\n".join(lines) + "\n"


def report(folder: Path) -> None:
    """Aggregate folder's finished runs into summary.json, table.md and per-task PNGs."""
    summary = aggregate(folder)
    table = markdown_table(summary) + ablation_table(summary) + prototype_tables(summary)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    (folder / "table.md").write_text(table)
    for backbone, task in sorted({(r["backbone"], r["task"]) for r in summary["cells"] if not r["variant"]}):
        plot_task(summary, backbone, task, folder / f"{backbone}-{task}.png")
    for backbone, task in sorted({(r["backbone"], r["task"]) for r in summary["cells"]
                                  if r["variant"] in PROTOTYPE_VARIANTS}):
        plot_prototypes(summary, backbone, task, folder / f"{backbone}-{task}.png")
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", choices=PLANS, required=True,
                        help="runs to train and evaluate; results go to results/glue_tradeoff/<plan>/")
    parser.add_argument("--tasks", nargs="+", help="restrict the plan to these tasks")
    parser.add_argument("--learning-rate", type=float, default=5e-5, help="peak backbone learning rate")
    parser.add_argument("--data-dir", help="GLUE folder (default: $GLUE_DIR, else ../shared/data/glue)")
    parser.add_argument("--report", action="store_true", help="only aggregate finished runs")
    args = parser.parse_args()
    folder = RESULTS / args.plan
    if not args.report:
        runs = [r for r in plan(args.plan) if not args.tasks or r.task in args.tasks]
        execute(runs, folder, args.data_dir, args.learning_rate)
    report(folder)


if __name__ == "__main__":
    main()
