from de3bert.evaluation.plots import coinciding_curves, plot_tradeoff
from de3bert.exits.criteria import criterion_label


def rows(*points):
    return [{"speedup": s, "metric": m} for s, m in points]


def test_curves_are_named_by_criterion_unless_the_model_was_trained_for_that_method():
    assert criterion_label("entropy", "de3") == "entropy"
    assert criterion_label("entropy", "deebert") == "DeeBERT (entropy)"
    assert criterion_label("edr", "de3") == "DE³ (EDR)" and criterion_label("edr", None) == "EDR"
    assert criterion_label("patience", "pabee") == "PABEE (patience)"
    assert criterion_label("patience", "de3") == "patience"


def test_coinciding_curves_are_merged_and_the_others_kept_apart(tmp_path):
    same = rows((1.0, 0.9), (2.0, 0.85), (1.5, 0.8))  # (1.5, 0.8) is dominated: not on the front
    sweeps = {"edr": rows((1.0, 0.9), (2.0, 0.8)), "entropy": same, "confidence": rows((1.0, 0.9), (2.0, 0.85))}
    assert coinciding_curves(sweeps) == [["edr"], ["entropy", "confidence"]]
    path = plot_tradeoff(sweeps, tmp_path / "plot.png", "title", "accuracy", 0.9, recipe="de3")
    assert path.stat().st_size > 10_000
