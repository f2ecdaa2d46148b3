import json
import re
import shutil

import pytest

from de3bert.cli import build_parser, main


def test_evaluate_prints_tables_and_writes_files(tiny_checkpoint, glue_dir, capsys, tmp_path):
    assert main(["evaluate", str(tiny_checkpoint), "--data-dir", str(glue_dir), "--output", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "accuracy of every exit" in out and "oracle" in out and "edr" in out and "patience" in out
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert set(report["sweeps"]) == {"edr", "entropy", "confidence", "dr", "patience", "pcee"}
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000
    assert (tmp_path / "sweeps.csv").read_text().startswith("policy,")


def test_evaluate_into_the_checkpoint_shows_the_plot_in_its_model_card(tiny_checkpoint, glue_dir, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    assert "![accuracy/speed trade-off]" not in (checkpoint / "README.md").read_text()
    assert main(["evaluate", str(checkpoint), "--data-dir", str(glue_dir), "--no-progress"]) == 0
    card = (checkpoint / "README.md").read_text()
    assert "![accuracy/speed trade-off](evaluation/tradeoff.png)" in card and "de3bert serve" in card
    assert "## Calibrated trade-off" in card and "## Metric of every exit (dev)" in card


def test_predict_text(tiny_checkpoint, capsys):
    assert main(["predict", str(tiny_checkpoint), "--text", "the film was good great"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["label"] in ("0", "1") and 1 <= answer["exit_layer"] <= 4
    assert main(["predict", str(tiny_checkpoint), "--text", "x", "--criterion", "patience", "--patience", "2"]) == 0


def test_predict_file_writes_predictions_in_order(tiny_checkpoint, tmp_path):
    source = tmp_path / "in.tsv"
    source.write_text("id\tsentence\n1\tthe film was good\n2\tthe film was awful dull\n3\tnice\n")
    target = tmp_path / "out.jsonl"
    assert main(["predict", str(tiny_checkpoint), "--input", str(source), "--text-column", "sentence",
                 "--output", str(target)]) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["the film was good", "the film was awful dull", "nice"]
    assert all({"label", "probabilities", "exit_layer", "indicator"} <= set(r) for r in rows)


def test_export_then_predict_on_onnx_runtime(tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    output = tmp_path / "onnx"
    assert main(["export", str(tiny_checkpoint), "--output", str(output)]) == 0
    assert f"de3bert serve {output}" in capsys.readouterr().out
    assert main(["predict", str(output), "--text", "the film was good great"]) == 0
    on_onnx = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["predict", str(tiny_checkpoint), "--text", "the film was good great"]) == 0
    on_torch = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert on_onnx["label"] == on_torch["label"] and on_onnx["exit_layer"] == on_torch["exit_layer"]
    assert on_onnx["indicator"] == pytest.approx(on_torch["indicator"], abs=1e-5)
    assert main(["predict", str(output), "--runtime", "torch", "--text", "x"]) == 2
    assert "is an ONNX export, not a PyTorch checkpoint: run it with --runtime onnx" in capsys.readouterr().err
    assert main(["predict", str(tiny_checkpoint), "--runtime", "onnx", "--text", "x"]) == 2
    assert "is a PyTorch checkpoint, not an ONNX export" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--task", "nosuchtask", "--output", "x"], "unknown task"),
    (["evaluate", "/nonexistent/checkpoint"], "does not exist"),
    (["predict", "/nonexistent/checkpoint", "--text", "hi"], "does not exist"),
    (["serve", "/nonexistent/checkpoint"], "does not exist"),
    (["export", "/nonexistent/checkpoint", "--output", "x"], "does not exist"),
    (["bench", "/nonexistent/checkpoint", "--runtime", "onnx"], "does not exist"),
    (["serve", "/nonexistent/checkpoint", "--max-batch-size", "0"], "max_batch_size must be at least 1"),
    (["train", "--task", "sst2"], "give --task and --output (or --resume dir"),
    (["train", "--resume", "/nonexistent/run"], "holds no training state"),
    (["train", "--resume", "/nonexistent/run", "--epochs", "5", "--seed", "1"], "drop --epochs --seed"),
])
def test_errors_are_one_line_not_tracebacks(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err.lower() and "Traceback" not in err


def test_missing_data_says_where_it_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--task", "rte", "--output", str(tmp_path / "x"), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "nyu-mll/glue" in err


def test_every_option_has_help():
    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices.values():
        for option in action._actions:
            if option.dest != "help":
                assert option.help, f"{action.prog} {option.dest} has no help"


def test_help_states_each_default_once_and_never_none():
    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices.values():
        text = " ".join(action.format_help().split())
        assert "(default: None)" not in text, action.prog
        assert "(default: the checkpoint's) (default:" not in text, action.prog
    bench = parser._subparsers._group_actions[0].choices["bench"].format_help()
    assert "(default: 32)" in bench  # a real default is still shown


def test_training_counts_truncated_inputs(tiny_backbone_dir, glue_dir, tmp_path, capsys):
    code = main(["train", "--task", "sst2", "--model", str(tiny_backbone_dir), "--output", str(tmp_path / "ckpt"),
                 "--epochs", "1", "--max-length", "6", "--max-train-samples", "40", "--data-dir", str(glue_dir),
                 "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    # "the film was <2..6 words>" is 5..9 tokens with [CLS]/[SEP]: most, not all, are cut to 6
    assert re.search(r"note: \d+ of 36 train inputs were longer than 6 tokens and were truncated", out)
