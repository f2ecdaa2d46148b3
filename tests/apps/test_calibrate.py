"""`de3bert calibrate`: targets reproduced on the user's inputs (the written policy run by the engine, recomputed
here), the accuracy budget, what is written (policy, table the service reads, history, card, an export's section),
an interrupted write, and one-line errors."""

import json
import random
import shutil

import pytest

from de3bert.apps.calibrate import calibrate_folder, read_inputs
from de3bert.apps.cli import main
from de3bert.apps.runtimes import load_model
from de3bert.data import encode_examples
from de3bert.errors import De3bertError
from de3bert.exits.calibration import policy_for_speedup
from de3bert.exits.engine import EarlyExitEngine
from de3bert.exits.outputs import collect_layer_outputs
from de3bert.exits.policies import ExitPolicy, speedup_ratio
from de3bert.model.config import read_config
from de3bert.model.modeling import EarlyExitModel
from tests.conftest import NEGATIVE, POSITIVE, tiny_model
from tests.exits.test_calibration import by_hand, every_threshold, hand_speedup

WORDS = POSITIVE + NEGATIVE + ["the", "film", "plot", "was", "rather", "not", "very", "a", "story", "of", "ending"]


def write_inputs(path, size: int, seed: int = 0, labelled: bool = False):
    """A user's file of `size` varied texts (header text[,label])."""
    rng = random.Random(seed)
    rows = ["text,label" if labelled else "text"]
    for i in range(size):
        text = " ".join(rng.choices(WORDS, k=rng.randint(2, 14)))
        rows.append(f"{text},{rng.choice(['positive', 'negative'])}" if labelled else text)
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A tiny random 4-layer DE³ checkpoint of a user's task with a default entropy policy and a calibrated table."""
    model = tiny_model(labels=("negative", "positive"), tokenizer=tokenizer)
    for head in model.heads:  # confidences spread out, as a trained model's are, instead of all near 1/2
        head.classifier.weight.data *= 300
    model.config.policy = ExitPolicy("entropy", threshold=0.999).to_dict()
    model.config.calibration = [{"criterion": "edr", "target_speedup": 2.0, "threshold": 0.5, "patience": 1,
                                 "lam": 1.0, "speedup": 2.1}]
    return model.save_pretrained(tmp_path_factory.mktemp("calibrate") / "ckpt")


@pytest.fixture
def folder(checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    return copy


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("traffic") / "traffic.csv", 300)


def engine_exit_layers(folder, texts):
    """Exit layers of the folder's default policy, run by the inference engine (not the calibration's simulation)."""
    model = load_model(folder)
    return [p.exit_layer for p in EarlyExitEngine(model).predict(texts)], model.num_layers


def test_calibration_reproduces_each_target_on_the_inputs_it_was_fitted_on(folder, traffic, capsys):
    assert main(["calibrate", str(folder), "--input", str(traffic), "--target-speedup", "1.5", "2", "3",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "entropy calibrated on traffic.csv (300 inputs, labels unused)" in out and "written into" in out
    config = read_config(folder)
    texts = [e.text_a for e in read_inputs(config, traffic)]
    rows = [r for r in config.calibration if r["criterion"] == "entropy"]
    model = EarlyExitModel.from_pretrained(folder)
    outputs = collect_layer_outputs(model, encode_examples(model.tokenizer, read_inputs(config, traffic), 128))
    reachable = [hand_speedup(by_hand(outputs, "entropy", t)[0], 4) for t in every_threshold(outputs, "entropy")]
    assert [r["target_speedup"] for r in rows] == [1.5, 2.0, 3.0] and all(r["inputs"] == "traffic.csv" for r in rows)
    for row in rows:
        config.policy = ExitPolicy(row["criterion"], row["threshold"], row["patience"], row["lam"]).to_dict()
        engine = EarlyExitEngine(EarlyExitModel.from_pretrained(folder), ExitPolicy(**config.policy))
        layers = [p.exit_layer for p in engine.predict(texts)]
        reached = 4 * len(layers) / sum(layers)
        # the engine reaches the smallest speed-up at or above the target that any threshold gives on these inputs
        assert reached == pytest.approx(min(s for s in reachable if s >= row["target_speedup"] - 1e-9))
        assert reached == pytest.approx(row["speedup"])
        assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"] and row["examples"] == 300
    # the first target is the default, and the service reads the written table
    written = read_config(folder)
    assert written.policy["threshold"] == rows[0]["threshold"]
    assert written.calibrated_speedup["target_speedup"] == 1.5 and written.calibrated_speedup["inputs"] == "traffic.csv"
    assert policy_for_speedup(written.calibration, "entropy", 2.0).threshold == rows[1]["threshold"]
    assert [r["criterion"] for r in written.calibration if "inputs" not in r] == ["edr"]  # other criteria kept


def test_the_replaced_values_are_kept_in_the_history_and_the_card(folder, traffic):
    before = read_config(folder)
    calibrate_folder(folder, traffic, (2.0,))
    between = read_config(folder)
    calibrate_folder(folder, traffic, (1.5,))
    config = read_config(folder)
    first, second = config.calibration_history
    assert first["policy"] == before.policy and first["calibration"] == before.calibration
    assert first["calibrated_speedup"] == {} and first["replaced_by"] == "traffic.csv"
    assert second["policy"] == between.policy and second["calibration"] == between.calibration
    assert second["calibrated_speedup"]["target_speedup"] == 2.0 and config.calibrated_speedup["target_speedup"] == 1.5
    card = (folder / "README.md").read_text()
    assert "## Calibration history" in card and card.count("replaced by calibration on traffic.csv") == 2
    assert "calibrated to 1.5x: 1.50x (95% interval" in card and "on 300 inputs of traffic.csv" in card
    EarlyExitModel.from_pretrained(folder)  # still a checkpoint


def test_without_targets_the_default_policys_own_comes_first(folder, traffic):
    calibration = calibrate_folder(folder, traffic, write=False)
    assert [r["target_speedup"] for r in calibration.rows] == [1.5, 2.0, 3.0]  # no promise recorded: the usual ones
    calibrate_folder(folder, traffic, (2.0,))
    assert [r["target_speedup"] for r in calibrate_folder(folder, traffic, write=False).rows] == [2.0, 1.5, 3.0]


def test_a_small_file_is_calibrated_but_warned_about(folder, tmp_path, capsys):
    small = write_inputs(tmp_path / "few.csv", 30)
    assert main(["calibrate", str(folder), "--input", str(small), "--target-speedup", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "warning at 2x: only 30 inputs (fewer than 100)" in out and "at least 100 inputs" in out
    assert "warning" in read_config(folder).calibrated_speedup


def test_the_budget_gives_the_fastest_policy_within_it(folder, tmp_path, capsys):
    labelled = write_inputs(tmp_path / "labelled.csv", 120, seed=1, labelled=True)
    assert main(["calibrate", str(folder), "--input", str(labelled), "--label-column", "label", "--max-drop", "2",
                 "--target-speedup", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "full depth accuracy" in out and "fastest within 2 points of full depth (every distinct policy scored)" in out
    config = read_config(folder)
    promise = config.calibrated_speedup
    assert promise["metric_drop"] <= 2.0 + 1e-9 and promise["max_drop"] == 2.0
    rows = [r for r in config.calibration if r.get("inputs") == "labelled.csv"]
    assert "metric" in rows[0] and "metric_drop" in rows[0]
    # no faster policy of the criterion stays within the budget: a sweep run by the engine over many thresholds
    examples = read_inputs(config, labelled, label_column="label")
    texts, labels = [e.text_a for e in examples], [e.label for e in examples]
    model = EarlyExitModel.from_pretrained(folder)
    engine = EarlyExitEngine(model, ExitPolicy(config.policy["criterion"], threshold=1.0))
    full = sum(p.label == model.config.label_names[y] for p, y in
               zip(engine.predict(texts, policy=ExitPolicy("full-depth")), labels)) / len(labels)
    chosen = promise["speedup"]
    for step in range(101):
        policy = ExitPolicy("entropy", threshold=0.99 + step * 0.0001)
        answers = engine.predict(texts, policy=policy)
        accuracy = sum(p.label == model.config.label_names[y] for p, y in zip(answers, labels)) / len(labels)
        speedup = speedup_ratio(__import__("torch").tensor([p.exit_layer for p in answers]), 4)
        if accuracy >= full - 0.02 + 1e-9:
            assert speedup <= chosen + 1e-9


def test_an_export_is_calibrated_in_place_and_keeps_its_onnx_section(checkpoint, tmp_path, traffic):
    pytest.importorskip("onnxruntime")
    from de3bert.onnx.export import export_checkpoint

    exported = tmp_path / "onnx"
    export_checkpoint(checkpoint, exported)
    section = json.loads((exported / "config.json").read_text())["onnx"]
    calibration = calibrate_folder(exported, traffic, (2.0,))
    data = json.loads((exported / "config.json").read_text())
    policy = data["de3bert"]["policy"]
    assert policy["threshold"] == calibration.default["threshold"]
    assert data["onnx"] == section | {"policy": policy}  # the export's section kept, with the policy it now serves
    layers, num_layers = engine_exit_layers(exported, [e.text_a for e in read_inputs(read_config(exported), traffic)])
    assert num_layers * len(layers) / sum(layers) == pytest.approx(calibration.default["speedup"], rel=0.02)
    # the graph's own defaults follow, for the runtimes that cannot feed the policy inputs (onnxruntime-node)
    import onnx

    graph = onnx.load(str(exported / "model.onnx")).graph
    defaults = {init.name: float(onnx.numpy_helper.to_array(init)) for init in graph.initializer
                if init.name in ("threshold", "patience")}
    assert defaults["threshold"] == pytest.approx(policy["threshold"]) and defaults["patience"] == policy["patience"]


def test_an_interrupted_write_leaves_the_folder_as_it_was(folder, traffic, monkeypatch):
    before = (folder / "config.json").read_bytes()

    def killed(*args):
        raise KeyboardInterrupt  # the process dies between writing the new file and renaming it into place

    monkeypatch.setattr("de3bert.atomic.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        calibrate_folder(folder, traffic, (2.0,))
    assert (folder / "config.json").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no half-written file left
    EarlyExitModel.from_pretrained(folder)


def test_a_dry_run_writes_nothing(folder, traffic, capsys):
    before = (folder / "config.json").read_bytes()
    assert main(["calibrate", str(folder), "--input", str(traffic), "--dry-run", "--no-progress"]) == 0
    assert "dry run" in capsys.readouterr().out and (folder / "config.json").read_bytes() == before


@pytest.mark.parametrize("content, options, message", [
    ("", [], "file is empty, expected a header row"),
    ("text\n", [], "has no rows"),
    ("review\ngreat\n", [], "line 2 has no column 'text'; available: review"),
    ("text\n  \n", [], "line 2: text is empty"),
    ('text\n"never closed\nmore\n', [], "line 2 opens a quote that never closes"),
    ("text\ngood film\n", ["--max-drop", "1"], "--max-drop compares the metric with full depth, so it needs labels"),
    ("text\ngood film\n", ["--target-speedup", "0.5"], "a target speed-up must be a number >= 1"),
    ("text\ngood film\n", ["--target-speedup", "9"], "cannot reach a layer speed-up of 9x"),
    ("text\ngood film\n", ["--criterion", "full-depth"], "criterion 'full-depth' cannot be calibrated on this model"),
    ("text,label\ngood film,maybe\n", ["--label-column", "label"], "label 'maybe' is not one of negative, positive"),
])
def test_bad_inputs_are_one_line_errors(folder, tmp_path, capsys, content, options, message):
    path = tmp_path / "inputs.csv"
    path.write_text(content)
    before = (folder / "config.json").read_bytes()
    assert main(["calibrate", str(folder), "--input", str(path), *options, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert (folder / "config.json").read_bytes() == before


def test_the_library_refuses_no_inputs(checkpoint):
    from de3bert.apps.calibrate import calibrate_model

    with pytest.raises(De3bertError, match="no inputs to calibrate on"):
        calibrate_model(load_model(checkpoint), [], "nothing.csv", (2.0,))
