from collections import Counter

import pytest

from de3bert.data import (Columns, DatasetSource, Example, FileSource, GlueSource, as_source, load_run_data,
                          recorded_columns, recorded_source, source_from_dict, with_location)
from de3bert.errors import DataError
from tests.conftest import TICKETS, write_sst2, write_tickets


def test_sources_round_trip_through_json(tmp_path):
    sources = [GlueSource("SST-2", "/data/glue"),
               FileSource(str(tmp_path / "train.jsonl"), str(tmp_path / "dev.jsonl"), columns=Columns("q", "s", "y"),
                          labels=("no", "yes")),
               DatasetSource("org/reviews", "en", validation_split="test", regression=True)]
    for source in sources:
        assert source_from_dict(source.to_dict()) == source
    assert sources[0].task == "sst2" and sources[2].name == "reviews-en"
    assert FileSource(str(tmp_path / "tickets" / "train.csv")).name == "tickets"
    with pytest.raises(DataError, match="unknown kind of data source 'ftp'"):
        source_from_dict({"kind": "ftp"})


def test_file_paths_are_kept_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert FileSource("data/train.csv").train_file == str(tmp_path / "data" / "train.csv")


@pytest.mark.parametrize("kwargs, problem", [
    (dict(labels=("a", "b", "a")), "labels repeat 'a'"),
    (dict(labels=("a",), regression=True), "labels and regression exclude each other"),
    (dict(labels=()), "labels is empty"),
])
def test_bad_label_options(kwargs, problem):
    with pytest.raises(DataError, match=problem):
        FileSource("train.csv", **kwargs)


def test_glue_shorthand_and_locations(tmp_path):
    assert as_source("rte", "/glue") == GlueSource("rte", "/glue")
    with pytest.raises(DataError, match="data_dir and hub_dataset go with a GLUE task name"):
        as_source(FileSource("a.csv"), data_dir="/glue")
    assert with_location(GlueSource("rte", "/old"), "/new", None) == GlueSource("rte", "/new")
    with pytest.raises(DataError, match="--data-dir and --hub-dataset locate GLUE data"):
        with_location(FileSource("a.csv"), "/new", None)


def test_recorded_source_and_columns_of_old_and_new_checkpoints():
    files = FileSource("/d/t.csv", columns=Columns("body", label="team"))
    assert recorded_source({"data": files.to_dict()}, "t") == files
    assert recorded_source({}, "SST-2") == GlueSource("sst2")  # a checkpoint from before sources were recorded
    assert recorded_source({}, "tiny") is None
    assert recorded_columns({"data": files.to_dict()}, "t") == Columns("body", None, "team")
    assert recorded_columns({}, "rte") == Columns("sentence1", "sentence2", "label")
    assert recorded_columns({}, "cola") == Columns()  # CoLA's files have no header
    assert Columns("a", "b", "c").overridden(text_pair="p") == Columns("a", "p", "c")


def test_user_file_holds_out_a_stratified_validation_slice_and_a_calibration_slice(tmp_path):
    source = FileSource(str(write_tickets(tmp_path / "tickets.csv", size=240)))
    data = load_run_data(source, validation_fraction=0.1, calibration_fraction=0.1, seed=3)
    assert data.task.name == "tickets" and data.task.labels == tuple(sorted(TICKETS))
    assert data.task.label_names == data.task.labels and data.task.metric == "accuracy_macro_f1"
    assert len(data.calibration) == 24 and data.dev_split == "validation"
    assert len(data.train) + len(data.dev) == 216
    per_class = Counter(e.label for e in data.train + data.dev)
    assert Counter(e.label for e in data.dev) == {k: round(0.1 * n + 1e-9) for k, n in per_class.items()}
    again = load_run_data(source, validation_fraction=0.1, calibration_fraction=0.1, seed=3)
    assert (again.train, again.dev, again.calibration) == (data.train, data.dev, data.calibration)
    with pytest.raises(DataError, match="has no validation data"):
        load_run_data(source, validation_fraction=0.0)


def test_validation_file_is_the_runs_dev_and_its_labels_must_be_known(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,neg\nfine,pos\n")
    (tmp_path / "valid.csv").write_text("text,label\nnice,pos\nso so,meh\n")
    source = FileSource(str(tmp_path / "train.csv"), str(tmp_path / "valid.csv"))
    with pytest.raises(DataError, match=r"valid.csv: line 3: label 'meh' is not one of neg, pos "
                                        r"\(the labels seen in training\)"):
        load_run_data(source, calibration_fraction=0.0)
    (tmp_path / "valid.csv").write_text("text,label\nnice,pos\n")
    data = load_run_data(source, calibration_fraction=0.0)
    assert data.dev == [Example("nice", None, 1)] and data.dev_split == "dev" and len(data.train) == 3


def test_given_labels_fix_the_order_and_must_all_occur(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    task, examples = FileSource(str(tmp_path / "train.csv"), labels=("pos", "neg")).read_train()
    assert task.labels == ("pos", "neg") and [e.label for e in examples] == [0, 1]
    with pytest.raises(DataError, match=r"train.csv: no example has label 'meh', which the labels given include"):
        FileSource(str(tmp_path / "train.csv"), labels=("pos", "neg", "meh")).read_train()
    with pytest.raises(DataError, match=r"train.csv: line 3: label 'neg' is not one of pos \(the labels given\)"):
        FileSource(str(tmp_path / "train.csv"), labels=("pos",)).read_train()


def test_integer_labels_sort_numerically_and_regression_reads_scores(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(f'{{"text": "t{i}", "label": {i % 12}}}\n' for i in range(24)))
    task, _ = FileSource(str(tmp_path / "train.jsonl")).read_train()
    assert task.labels == tuple(str(i) for i in range(12))
    task, examples = FileSource(str(tmp_path / "train.jsonl"), regression=True).read_train()
    assert task.is_regression and task.main_metric == "pearson" and examples[11].label == 11.0


def test_glue_source_reads_the_glue_layout(tmp_path):
    write_sst2(tmp_path, train_size=20, dev_size=6)
    data = load_run_data(GlueSource("sst2", str(tmp_path)), calibration_fraction=0.25, seed=1)
    assert data.task.label_names == ("negative", "positive") and data.dev_split == "dev"
    assert (len(data.train), len(data.calibration), len(data.dev)) == (15, 5, 6)


def test_datasets_library_reads_a_local_folder_with_its_validation_split(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "reviews"
    folder.mkdir()
    (folder / "train.csv").write_text("review,stars\ngreat,5\nawful,1\nfine,3\nsuperb,5\n")
    (folder / "validation.csv").write_text("review,stars\nlovely,5\n")
    (folder / "test.csv").write_text("review,stars\nbad,1\n")
    source = DatasetSource(str(folder), columns=Columns("review", label="stars"))
    data = load_run_data(source, calibration_fraction=0.0)
    assert data.task.name == "reviews" and data.task.labels == ("1", "3", "5")
    assert data.dev == [Example("lovely", None, 2)] and len(data.train) == 4
    assert source.read("test", data.task) == [Example("bad", None, 0)]
    (folder / "validation.csv").unlink()  # without a validation split, a slice of train is held out
    held_out = load_run_data(source, validation_fraction=0.25, calibration_fraction=0.0)
    assert held_out.dev_split == "validation" and len(held_out.dev) == 1 and len(held_out.train) == 3
    with pytest.raises(DataError, match=r"reviews has no split 'dev'; its splits are train, test"):
        DatasetSource(str(folder), columns=Columns("review", label="stars"),
                      validation_split="dev").read("dev", data.task)
    with pytest.raises(DataError, match=r"reviews split train: row 0 has no column 'text', 'label'; "
                                        r"available: review, stars"):
        DatasetSource(str(folder)).read_train()


def test_datasets_class_labels_read_as_their_names_in_the_datasets_order(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["positive", "negative"])})
    folder = tmp_path / "sentiment"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": ["good", "bad", "nice"], "label": [0, 1, 0]},
                               features=features).to_parquet(folder / "train.parquet")
    datasets.Dataset.from_dict({"text": ["?"], "label": [-1]}, features=features).to_parquet(folder / "test.parquet")
    task, examples = DatasetSource(str(folder)).read_train()
    assert task.labels == ("positive", "negative") and [e.label for e in examples] == [0, 1, 0]
    with pytest.raises(DataError, match=r"sentiment split test: row 0: label -1 is not a class id from 0 to 1 "
                                        r"\(an unlabelled split\?\)"):
        DatasetSource(str(folder)).read("test", task)


def test_a_dataset_that_cannot_be_loaded_is_one_clear_line(tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="could not load .*nothing-here") as err:
        DatasetSource(str(tmp_path / "nothing-here")).read_train()
    assert "\n" not in str(err.value)
