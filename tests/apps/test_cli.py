import csv
import json
import re
import shutil

import pytest

from de3bert.apps.cli import build_parser, main
from de3bert.errors import De3bertError
from tests.conftest import TICKETS


def test_evaluate_prints_tables_and_writes_files(tiny_checkpoint, glue_dir, capsys, tmp_path):
    assert main(["evaluate", str(tiny_checkpoint), "--data-dir", str(glue_dir), "--output", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "accuracy of every exit" in out and "oracle" in out and "edr" in out and "patience" in out
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert set(report["sweeps"]) == {"edr", "entropy", "confidence", "dr", "patience", "pcee"}
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000
    assert (tmp_path / "sweeps.csv").read_text().startswith("criterion,")


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
    assert answer["label"] in ("negative", "positive") and 1 <= answer["exit_layer"] <= 4
    assert set(answer["probabilities"]) == {"negative", "positive"}
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


def test_predict_file_ends_with_what_the_job_delivered(tiny_checkpoint, tmp_path, capsys):
    source = tmp_path / "in.tsv"
    source.write_text("sentence\n" + "".join(f"the film was {w}\n" for w in TICKETS["praise"] * 3))
    target = tmp_path / "out.csv"
    assert main(["predict", str(tiny_checkpoint), "--input", str(source), "--output", str(target),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    with target.open() as handle:
        layers = [int(row["exit_layer"]) for row in csv.DictReader(handle)]
    summary = json.loads((tmp_path / "out.csv.summary.json").read_text())
    assert summary["inputs"] == 12 and summary["num_layers"] == 4 and summary["output"] == str(target)
    assert summary["exit_layers"] == {str(m): layers.count(m) for m in range(1, 5)}
    assert summary["speedup"] == pytest.approx(4 * 12 / sum(layers))
    assert summary["calibrated"]["target_speedup"] == 2.0  # the default policy ran: its promise is there to compare
    assert f"delivered layer speed-up {summary['speedup']:.2f}x over 12 inputs" in out
    assert "the policy was calibrated to 2x" in out and "out.csv.summary.json" in out
    assert main(["predict", str(tiny_checkpoint), "--input", str(source), "--output", str(target), "--criterion",
                 "full-depth", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out.csv.summary.json").read_text())
    assert summary["speedup"] == 1.0 and summary["exit_layers"]["4"] == 12 and summary["calibrated"] is None


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
    (["train", "--task", "sst2"], "give --output and the data (--task, --train-file or --dataset)"),
    (["train", "--resume", "/nonexistent/run"], "holds no training state"),
    (["train", "--resume", "/nonexistent/run", "--epochs", "5", "--seed", "1"], "drop --epochs --seed"),
    (["evaluate", "/nonexistent/checkpoint", "--device", "tpu"], "unknown device 'tpu'"),
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


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_a_gpu_on_a_machine_without_one_is_one_line(tiny_checkpoint, glue_dir, capsys):
    assert main(["evaluate", str(tiny_checkpoint), "--data-dir", str(glue_dir), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == ("de3bert evaluate: error: device 'cuda' is not available: this machine "
                                               "has no usable CUDA GPU (torch.cuda.is_available() is False); use "
                                               "--device cpu")


def test_own_csv_with_six_labels_trains_evaluates_and_predicts_in_label_names(tickets_checkpoint, tickets_dir,
                                                                               tmp_path, capsys):
    config = json.loads((tickets_checkpoint / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(sorted(TICKETS))}
    training = config["de3bert"]["training"]
    assert training["data"]["kind"] == "files" and training["dev_split"] == "validation"
    assert (training["train_examples"], training["calibration_examples"], training["dev_examples"]) == (96, 12, 12)
    assert set(training["class_counts"]["dev"]) == set(TICKETS) and all(training["class_counts"]["dev"].values())
    card = (tickets_checkpoint / "README.md").read_text()
    assert "6 classes: billing, bug, feature, login, praise, shipping" in card and "## Examples of each class" in card

    output = tmp_path / "evaluation"
    assert main(["evaluate", str(tickets_checkpoint), "--eval-file", str(tickets_dir / "test.csv"), "--output",
                 str(output), "--no-progress"]) == 0
    assert "tickets test.csv (36 examples): accuracy of every exit" in capsys.readouterr().out
    report = json.loads((output / "evaluation.json").read_text())
    assert report["class_counts"] == {name: 6 for name in sorted(TICKETS)}
    assert {"accuracy", "macro_f1"} <= set(report["layer_metrics"][-1])
    assert max(row["accuracy"] for row in report["layer_metrics"]) >= 0.5  # six classes: chance is 1/6
    assert report["oracle"] and set(report["sweeps"]) == {"edr", "entropy", "confidence", "dr", "patience", "pcee"}
    assert report["calibration_split"] == "calibration (held out from train)" and (output / "tradeoff.png").exists()

    assert main(["predict", str(tickets_checkpoint), "--text", "my password account today"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["label"] in TICKETS and set(answer["probabilities"]) == set(TICKETS)
    target = tmp_path / "predictions.csv"
    # the columns default to the training file's
    assert main(["predict", str(tickets_checkpoint), "--input", str(tickets_dir / "test.csv"), "--output",
                 str(target), "--no-progress"]) == 0
    rows = list(csv.DictReader(target.open()))
    assert len(rows) == 36 and {row["label"] for row in rows} <= set(TICKETS)


def test_evaluate_without_a_file_rebuilds_the_held_out_validation_slice(tickets_checkpoint, tmp_path, capsys):
    assert main(["evaluate", str(tickets_checkpoint), "--output", str(tmp_path), "--no-progress"]) == 0
    assert "tickets validation (12 examples)" in capsys.readouterr().out
    report = json.loads((tmp_path / "evaluation.json").read_text())
    stored = json.loads((tickets_checkpoint / "config.json").read_text())["de3bert"]["training"]["layer_metrics"]
    assert report["layer_metrics"] == [pytest.approx(row) for row in stored]  # the slice that picked the best epoch


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("files, options, problem", [
    ({"t.csv": "body,label\nhi,a\n"}, [], r"t.csv: line 2 has no column 'text'; available: body, label"),
    ({"t.csv": "text,label\nhi,a\n  ,b\n"}, [], r"t.csv: line 3: text is empty"),
    ({"t.csv": "text,label\nhi,a\nho,b\n", "v.csv": "text,label\nhu,c\n"}, ["--validation-file", "v.csv"],
     r"v.csv: line 2: label 'c' is not one of a, b \(the labels seen in training\)"),
    ({"t.jsonl": '{"text": "hi", "label": "a"}\n{"text": "ho" "label": "b"}\n'}, [],
     r"t.jsonl: line 2 is not valid JSON \(Expecting ',' delimiter\)"),
    ({"t.csv": "text\tlabel\nhi\ta\n"}, [], r"t.csv: line 1 \(header\) is one column holding tabs.*name it .tsv"),
    ({"t.csv": "text,label\nhi,a\nho,b\n"}, ["--labels", "a,b,c"],
     r"t.csv: no example has label 'c', which the labels given include"),
    ({"t.csv": "text,label\nhi,a\nho,b\n"}, ["--labels", "b"], r"t.csv: line 2: label 'a' is not one of b"),
    ({"t.csv": "text,label\nhi,a\n"}, ["--regression"], r"t.csv: line 2: score 'a' is not a finite number"),
    ({"t.csv": "text,label\nhi,a\n"}, ["--task", "sst2"], r"give one of --task .*, not --task and --train-file"),
    ({"t.csv": "text,label\nhi,a\n"}, ["--data-dir", "/glue"], r"--data-dir does not go with --train-file"),
    ({}, [], r"give one of --task \(a GLUE task\), --train-file .* and --dataset"),
])


def test_malformed_user_data_is_one_line_naming_file_and_line(tmp_path, capsys, files, options, problem):
    paths = {name: write(tmp_path / name, text) for name, text in files.items()}
    train_file = next(iter(paths.values()), None)
    argv = ["train", "--output", str(tmp_path / "out"), *(["--train-file", train_file] if train_file else []),
            *(paths.get(option, option) for option in options)]  # a file's name stands for its path
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(problem, err), err


def test_train_options_name_one_data_source():
    from de3bert.apps.cli.train import data_source
    from de3bert.data import Columns, DatasetSource, FileSource, GlueSource

    def source(*options):
        return data_source(build_parser().parse_args(["train", "--output", "x", *options]))

    assert source("--task", "RTE", "--data-dir", "/glue") == GlueSource("rte", "/glue")
    assert source("--dataset", "org/reviews", "--dataset-config", "en", "--validation-split", "test",
                  "--text-column", "review", "--label-column", "stars", "--labels", "1, 3,5") == DatasetSource(
        "org/reviews", "en", "train", "test", columns=Columns("review", None, "stars"), labels=("1", "3", "5"))
    assert source("--train-file", "/d/q.jsonl", "--text-pair-column", "s", "--regression") == FileSource(
        "/d/q.jsonl", columns=Columns("text", "s", "label"), regression=True)
    with pytest.raises(De3bertError, match="labels 'a', '', 'b' include an empty one"):
        source("--train-file", "t.csv", "--labels", "a,,b")
    with pytest.raises(De3bertError, match="--dataset-config --validation-file do not go with --task"):
        source("--task", "rte", "--validation-file", "v.csv", "--dataset-config", "en")


def test_a_table_without_rows_is_its_header():
    from de3bert.apps.cli.options import table

    assert table([], ["criterion", "speedup"]) == "criterion  speedup"  # every calibration failed (a small regression task)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("command", [["predict", "--text", "x"], ["bench"], ["serve"]])
def test_every_command_that_runs_a_model_refuses_a_missing_gpu_in_one_line(tiny_checkpoint, command, capsys):
    assert main([command[0], str(tiny_checkpoint), *command[1:], "--device", "cuda:1"]) == 2
    assert capsys.readouterr().err.strip().endswith("device 'cuda:1' is not available: this machine has no usable "
                                                    "CUDA GPU (torch.cuda.is_available() is False); use --device cpu")


def test_predict_on_the_cpu_in_bf16(tiny_checkpoint, capsys):
    assert main(["predict", str(tiny_checkpoint), "--text", "the film was good", "--device", "cpu",
                 "--precision", "bf16"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["label"] in ("negative", "positive") and abs(sum(answer["probabilities"].values()) - 1) < 1e-2
