"""The before/after miss study: halves that split dev, labels kept from the half calibrated on, cells measured as the
library measures them, and the command line agreeing with the library on the same cell."""

import numpy as np
import pytest

from benchmarks import calibration_miss
from de3bert.data import encode_examples, load_split
from de3bert.exits.calibration import calibrate, evaluate_policy
from de3bert.exits.outputs import collect_layer_outputs
from de3bert.model.modeling import EarlyExitModel


def test_halves_split_dev_in_two_seeded_disjoint_parts():
    a, b = calibration_miss.halves(11, seed=3)
    assert len(a) == 5 and len(b) == 6 and sorted([*a, *b]) == list(range(11))
    assert np.array_equal(a, calibration_miss.halves(11, seed=3)[0])
    assert not np.array_equal(a, calibration_miss.halves(11, seed=4)[0])


def test_cells_are_measured_as_the_library_measures_them(tiny_checkpoint, glue_dir, tmp_path):
    report = calibration_miss.measure("tiny", str(tiny_checkpoint), str(glue_dir), splits=3)
    model = EarlyExitModel.from_pretrained(tiny_checkpoint)
    task, examples = load_split("sst2", "dev", str(glue_dir))
    dev = collect_layer_outputs(model, encode_examples(model.tokenizer, examples, model.config.max_length))
    assert report["dev_inputs"] == 32 and {c["criterion"] for c in report["cells"]} >= {"entropy", "edr"}
    a, b = calibration_miss.halves(32, 0)
    unlabelled = calibration_miss.select(dev, a, labelled=False)
    assert (unlabelled.labels == -1).all()
    checked = 0
    for cell in report["cells"]:
        if "after" not in cell:
            continue
        policy = calibrate(cell["criterion"], unlabelled, cell["target_speedup"])
        assert policy.threshold == cell["after"]["threshold"]
        on_b = evaluate_policy(policy, calibration_miss.select(dev, b), task)["speedup"]
        assert cell["after"]["on_b"] == pytest.approx(on_b)
        assert cell["after"]["miss_b"] == pytest.approx(on_b / cell["target_speedup"] - 1)
        assert cell["splits"]["count"] <= 3 and 0 <= cell["splits"]["within_tolerance"] <= 1
        checked += 1
    assert checked
    table = calibration_miss.table([report])
    assert table.startswith("| checkpoint | criterion | asked |") and "tiny (32 dev)" in table
    choice = report["default_criterion"]
    assert choice["selection"]["reference"] == "entropy" and choice["now"] == choice["selection"]["criterion"]
    assert choice["split"] == "calibration (held out from train)"
    assert f"| tiny | {choice['selection']['examples']} | " in calibration_miss.criterion_table([report])


def test_the_command_line_delivers_what_the_library_measured(tiny_checkpoint, glue_dir):
    report = calibration_miss.measure("tiny", str(tiny_checkpoint), str(glue_dir), splits=1)
    cell = next(c for c in report["cells"] if "after" in c and c["criterion"] == "entropy")
    result = calibration_miss.end_to_end("tiny", str(tiny_checkpoint), str(glue_dir), cell)
    assert result["delivered_on_b"] == pytest.approx(result["library_on_b"])
    assert result["calibrated"]["target_speedup"] == cell["target_speedup"]
