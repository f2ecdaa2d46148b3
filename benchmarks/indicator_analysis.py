"""Why does (or doesn't) the distance ratio help? Per-layer analysis of the exit indicators of a DE³ checkpoint.

For every exit layer, on the dev split (fits use the held-out calibration slice of train only):

- AUROC against correctness of entropy, DR and EDR (λ = 0.5, 1, 2): how well each separates right
  from wrong answers (0.5 = not at all);
- the same for the entropy of the prototypical network's own distribution q = softmax(−r), which
  reads the distance *margin* r2 − r1 where DR reads the scale-free ratio r1/r2 (an input far out on
  its class's side has a large margin but a ratio near 1, so DR calls it uncertain);
- the *best any fusion could do*: a logistic regression on (entropy, DR, log r1/r2, prototype
  entropy) fitted on the calibration slice and scored on dev — if even that does not beat entropy
  alone, the prototype distances carry no extra information about correctness and no way of fusing
  them can help;
- the scales of the two parts (medians of Ent and DR): the harmonic mean in EDR follows its smaller
  argument, so a DR that sits near 0 for most inputs makes EDR a copy of DR;
- prototype geometry: how often the classifier and the nearest prototype disagree, the accuracy on
  those inputs, and the distance between prototypes relative to the distance to the own prototype;
- the dev metric of exiting by each candidate indicator (including ones that are not exit criteria of
  the library, such as prototype entropy) at thresholds calibrated to 1.5x, 2x and 3x on the held-out
  slice, as benchmarks/glue_tradeoff.py does for the criteria.

    .venv/bin/python benchmarks/indicator_analysis.py --checkpoint sst2=runs/demo-sst2 --checkpoint rte=runs/rte-de3

Writes results/indicators/<name>.json and .png per checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from de3bert.data import TaskSpec, compute_metrics, encode_examples, load_split, main_metric  # noqa: E402
from de3bert.errors import PolicyError  # noqa: E402
from de3bert.evaluation.run_data import calibration_examples  # noqa: E402
from de3bert.exits.calibration import TARGET_SPEEDUPS, most_conservative, threshold_grid  # noqa: E402
from de3bert.exits.indicators import distance_ratio, hybrid_indicator, normalized_entropy  # noqa: E402
from de3bert.exits.outputs import LayerOutputs, collect_layer_outputs  # noqa: E402
from de3bert.exits.policies import speedup_ratio  # noqa: E402
from de3bert.model.heads import prototype_distances  # noqa: E402
from de3bert.model.modeling import EarlyExitModel  # noqa: E402

RESULTS = Path("results") / "indicators"
LAMBDAS = (0.5, 1.0, 2.0)
# indicators compared at equal speed-up (lower = more certain), from one layer's features
CANDIDATES = {
    "entropy": lambda f: f["entropy"],
    "edr λ=1": lambda f: hybrid_indicator(f["entropy"], f["dr"]),
    "prototype entropy": lambda f: f["prototype_entropy"],
    "harmonic mean of entropy and prototype entropy": lambda f: hybrid_indicator(f["entropy"], f["prototype_entropy"]),
}


def layer_features(outputs: LayerOutputs, layer: int) -> dict[str, np.ndarray]:
    """Entropy, DR, log(r1/r2), prototype entropy and correctness of every sample at one exit."""
    probs = outputs.logits[layer].softmax(-1)
    distances = outputs.distances[layer].clamp_min(1e-12)
    predicted = probs.argmax(-1, keepdim=True)
    r1 = distances.gather(-1, predicted).squeeze(-1)
    r2 = distances.scatter(-1, predicted, float("inf")).min(-1).values
    return {"entropy": normalized_entropy(probs).numpy(), "dr": distance_ratio(probs, distances).numpy(),
            "log_ratio": torch.log(r1 / r2).numpy(),
            "prototype_entropy": normalized_entropy(torch.softmax(-outputs.distances[layer], -1)).numpy(),
            "nearest": distances.argmin(-1).numpy(),
            "predicted": predicted.squeeze(-1).numpy(),
            "correct": (predicted.squeeze(-1) == outputs.labels).numpy()}


def _auroc(correct: np.ndarray, uncertainty: np.ndarray) -> float | None:
    """AUROC of −uncertainty against correctness (None when one class is absent)."""
    if correct.all() or not correct.any():
        return None
    return float(roc_auc_score(correct, -uncertainty))


def _fusion_auroc(calibration: dict, dev: dict) -> float | None:
    """AUROC on dev of a logistic fusion of (Ent, DR, log r1/r2, prototype entropy) fitted on the calibration slice."""
    columns = ("entropy", "dr", "log_ratio", "prototype_entropy")
    fit_x = np.stack([calibration[c] for c in columns], 1)
    if calibration["correct"].all() or not calibration["correct"].any():
        return None
    fusion = LogisticRegression(max_iter=1000).fit(fit_x, calibration["correct"])
    certainty = fusion.predict_proba(np.stack([dev[c] for c in columns], 1))[:, 1]
    return _auroc(dev["correct"], -certainty)


def analyse(model: EarlyExitModel, calibration: LayerOutputs, dev: LayerOutputs) -> list[dict]:
    """Per-layer separation, scales and prototype geometry."""
    rows = []
    for layer, head in enumerate(model.heads):
        if not head.has_prototypes:  # the last layer of a model that has no prototypical network there
            continue
        cal, ev = layer_features(calibration, layer), layer_features(dev, layer)
        entropy, ratio = torch.from_numpy(ev["entropy"]), torch.from_numpy(ev["dr"])
        prototypes = head.prototypes.detach().float()
        between = prototype_distances(prototypes, prototypes, head.distance)
        own = dev.distances[layer].gather(-1, dev.labels.unsqueeze(-1)).squeeze(-1)
        disagree = ev["nearest"] != ev["predicted"]
        row = {"layer": layer + 1, "accuracy": float(ev["correct"].mean()),
               "auroc": {"entropy": _auroc(ev["correct"], ev["entropy"]), "dr": _auroc(ev["correct"], ev["dr"]),
                         **{f"edr λ={lam:g}": _auroc(ev["correct"], hybrid_indicator(entropy, ratio, lam).numpy())
                            for lam in LAMBDAS},
                         "prototype entropy": _auroc(ev["correct"], ev["prototype_entropy"]),
                         "best fusion (fitted)": _fusion_auroc(cal, ev)},
               "median_entropy": float(np.median(ev["entropy"])), "median_dr": float(np.median(ev["dr"])),
               "edr_follows_dr": float(np.mean(ev["dr"] < ev["entropy"])),
               "disagreement_rate": float(disagree.mean()),
               "accuracy_when_disagreeing": float(ev["correct"][disagree].mean()) if disagree.any() else None,
               "prototype_separation": float(between[~torch.eye(len(prototypes), dtype=torch.bool)].mean()
                                             / own.mean().clamp_min(1e-12))}
        rows.append(row)
    return rows


def candidate_indicator(outputs: LayerOutputs, name: str) -> torch.Tensor:
    """(M, N) values of one CANDIDATES indicator at every exit (NaN at a last layer without prototypes: every
    input exits there anyway)."""
    layers = []
    for layer in range(outputs.distances.shape[0]):
        features = {k: torch.from_numpy(v) for k, v in layer_features(outputs, layer).items()}
        layers.append(CANDIDATES[name](features).float())
    layers += [torch.full_like(layers[0], float("nan"))] * (outputs.num_layers - len(layers))
    return torch.stack(layers)


def first_exit_layers(indicator: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N,) 1-based exit layer of each input: the first whose indicator is below τ, else the last."""
    below = indicator < threshold
    below[-1] = True
    return below.int().argmax(0) + 1


def calibrated_exits(name: str, calibration: LayerOutputs, dev: LayerOutputs, task: TaskSpec) -> list[dict]:
    """Dev metric and speed-up of exiting by one candidate indicator, its τ calibrated on the held-out slice."""
    held_out, measured = candidate_indicator(calibration, name), candidate_indicator(dev, name)
    num_layers = dev.num_layers
    grid = threshold_grid(held_out[:-1].flatten(), None) + [0.0]  # every distinct exit pattern, as the library
    scored = [(speedup_ratio(first_exit_layers(held_out, t), num_layers), t) for t in grid]
    predictions = dev.predictions()
    rows = []
    for target in TARGET_SPEEDUPS:
        try:
            threshold = most_conservative(scored, name, target)
        except PolicyError:
            rows.append({"target_speedup": target, "metric": None})
            continue
        exits = first_exit_layers(measured, threshold)
        chosen = predictions.gather(0, (exits - 1).unsqueeze(0)).squeeze(0)
        rows.append({"target_speedup": target, "threshold": threshold, "speedup": speedup_ratio(exits, num_layers),
                     "metric": main_metric(task, compute_metrics(task, chosen.tolist(), dev.labels.tolist()))})
    return rows


def plot(rows: list[dict], title: str, path: Path) -> None:
    """AUROC per layer of each indicator."""
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    layers = [r["layer"] for r in rows]
    for name in rows[0]["auroc"]:
        values = [r["auroc"][name] if r["auroc"][name] is not None else np.nan for r in rows]
        axis.plot(layers, values, marker="o", label=name, linestyle="--" if "fusion" in name else "-")
    axis.axhline(0.5, color="grey", linewidth=0.8)
    axis.set_xlabel("exit layer")
    axis.set_ylabel("AUROC (indicator vs correct)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(name: str, checkpoint: Path, data_dir: str | None) -> dict:
    """Analyse one checkpoint on its task's dev split and write JSON + PNG."""
    model = EarlyExitModel.from_pretrained(checkpoint)
    task_name = model.config.task
    task, dev_examples = load_split(task_name, "dev", data_dir)
    encode = lambda examples: encode_examples(model.tokenizer, examples, model.config.max_length)  # noqa: E731
    dev = collect_layer_outputs(model, encode(dev_examples))
    calibration = collect_layer_outputs(model, encode(calibration_examples(model, task_name, data_dir, None)[1]))
    if dev.distances is None:
        raise SystemExit(f"{checkpoint}: the model has no prototypical networks to analyse")
    rows = analyse(model, calibration, dev)
    report = {"checkpoint": str(checkpoint), "task": task_name, "backbone": model.config.backbone_name, "layers": rows,
              "mean_auroc": {k: statistics.fmean(v for r in rows if (v := r["auroc"][k]) is not None)
                             for k in rows[0]["auroc"]},
              "calibrated": {name: calibrated_exits(name, calibration, dev, task) for name in CANDIDATES}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    plot(rows, f"{model.config.backbone_name} / {task_name}: indicator separation", RESULTS / f"{name}.png")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=DIR",
                        help="a DE³ checkpoint to analyse, named for the output files (repeatable)")
    parser.add_argument("--data-dir", help="GLUE folder (default: $GLUE_DIR, else ../shared/data/glue)")
    args = parser.parse_args()
    for spec in args.checkpoint:
        name, _, folder = spec.partition("=")
        report = run(name, Path(folder), args.data_dir)
        print(f"{name}: mean AUROC over layers " + ", ".join(f"{k} {v:.3f}" for k, v in report["mean_auroc"].items()))
        for row in report["layers"]:
            print(f"  layer {row['layer']}: acc {row['accuracy']:.3f}  median Ent {row['median_entropy']:.3f} "
                  f"DR {row['median_dr']:.3f}  EDR follows DR {row['edr_follows_dr']:.0%}  "
                  f"disagree {row['disagreement_rate']:.1%}  separation {row['prototype_separation']:.1f}")
        for name, points in report["calibrated"].items():
            print(f"  calibrated exits by {name}: " + ", ".join(
                f"{p['target_speedup']:g}x → {100 * p['metric']:.1f} at {p['speedup']:.2f}x" if p["metric"] is not None
                else f"{p['target_speedup']:g}x unreachable" for p in points))


if __name__ == "__main__":
    main()
