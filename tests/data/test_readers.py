import sys
import types
from pathlib import Path

import pytest

from de3bert.data import (Example, get_task, load_split, read_glue_split, read_hub_split, read_table, resolve_glue_dir,
                          split_off, subsample)
from de3bert.errors import DataError

STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
               "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")


def write(root: Path, folder: str, name: str, text: str, bom: bool = False) -> Path:
    path = root / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def mnli_row(i: int, premise: str, hypothesis: str, gold: str) -> str:
    return "\t".join([str(i), "1", f"{i}e", "fiction", "(x)", "(y)", "(ROOT x)", "(ROOT y)", premise, hypothesis,
                      gold, gold, gold, gold, gold, gold])


def test_cola_without_header_or_final_newline(tmp_path):
    write(tmp_path, "CoLA", "dev.tsv", "gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tThe more she rode.")
    assert read_glue_split(get_task("cola"), "dev", tmp_path) == [
        Example("The sailors rode the breeze.", None, 1), Example("The more she rode.", None, 0)]


def test_sst2(tmp_path):
    write(tmp_path, "SST-2", "train.tsv", "sentence\tlabel\nit 's charming . \t1\nbleak \t0\n")
    assert read_glue_split(get_task("sst2"), "train", tmp_path) == [
        Example("it 's charming . ", None, 1), Example("bleak ", None, 0)]


def test_mrpc_with_bom(tmp_path):
    write(tmp_path, "MRPC", "dev.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
          "1\t1355540\t1355592\tHe said \"yes\".\tHe agreed.\n0\t2029631\t2029565\tA dog.\tA cat.\n", bom=True)
    assert read_glue_split(get_task("mrpc"), "dev", tmp_path) == [
        Example('He said "yes".', "He agreed.", 1), Example("A dog.", "A cat.", 0)]


def test_stsb_scores(tmp_path):
    write(tmp_path, "STS-B", "dev.tsv", f"{STSB_HEADER}\n"
          "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man dances.\tA man is dancing.\t5.000\n"
          "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA child rides.\tA dog sleeps.\t0.250\n")
    assert read_glue_split(get_task("stsb"), "dev", tmp_path) == [
        Example("A man dances.", "A man is dancing.", 5.0), Example("A child rides.", "A dog sleeps.", 0.25)]


def test_qqp(tmp_path):
    write(tmp_path, "QQP", "dev.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
          "201359\t303345\t303346\tWhy are people rude?\tWhy are some people rude?\t1\n")
    assert read_glue_split(get_task("qqp"), "dev", tmp_path) == [
        Example("Why are people rude?", "Why are some people rude?", 1)]


def test_mnli_matched_and_mismatched(tmp_path):
    write(tmp_path, "MNLI", "dev_matched.tsv", f"{MNLI_HEADER}\n"
          f"{mnli_row(0, 'A cat sat.', 'An animal sat.', 'entailment')}\n"
          f"{mnli_row(1, 'A cat sat.', 'A dog sat.', 'contradiction')}\n")
    write(tmp_path, "MNLI", "dev_mismatched.tsv",
          f"{MNLI_HEADER}\n{mnli_row(0, 'It rains.', 'It is wet.', 'neutral')}\n")
    mnli = get_task("mnli")
    matched = [Example("A cat sat.", "An animal sat.", 1), Example("A cat sat.", "A dog sat.", 0)]
    assert read_glue_split(mnli, "dev_matched", tmp_path) == matched
    assert read_glue_split(mnli, "dev", tmp_path) == matched
    assert read_glue_split(mnli, "dev_mismatched", tmp_path) == [Example("It rains.", "It is wet.", 2)]


def test_qnli_reads_stray_quote_literally(tmp_path):
    write(tmp_path, "QNLI", "dev.tsv", "index\tquestion\tsentence\tlabel\n"
          "694\tWhat is it?\t\" It is a quote\tentailment\n695\tWho?\tNobody.\tnot_entailment\n")
    assert read_glue_split(get_task("qnli"), "dev", tmp_path) == [
        Example("What is it?", '" It is a quote', 0), Example("Who?", "Nobody.", 1)]


@pytest.mark.parametrize("folder, name, label, index", [("RTE", "rte", "not_entailment", 1), ("WNLI", "wnli", "0", 0)])
def test_rte_and_wnli(tmp_path, folder, name, label, index):
    write(tmp_path, folder, "train.tsv", f"index\tsentence1\tsentence2\tlabel\n0\tA fell.\tA stands.\t{label}\n")
    assert read_glue_split(get_task(name), "train", tmp_path) == [Example("A fell.", "A stands.", index)]


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


@pytest.mark.parametrize("content, problem", [
    (RTE_HEADER + "0\tA.\tB.\tentailment\n1\tA.\tnot_entailment\n",
     "dev.tsv of task rte: line 3 has 3 columns, expected 4"),
    (RTE_HEADER + "0\tA.\tB.\tmaybe\n", "line 2: label 'maybe' is not one of entailment, not_entailment"),
    (RTE_HEADER + "0\t  \tB.\tentailment\n", "line 2: sentence1 is empty"),
    ("", "file is empty, expected a header row"),
    (RTE_HEADER, "has a header but no rows"),
    ("index\tsentence1\tlabel\n0\tA.\tentailment\n",
     "line 1 (header) lacks column sentence2; it has index, sentence1, label"),
])
def test_glue_errors_name_file_line_and_problem(tmp_path, content, problem):
    path = write(tmp_path, "RTE", "dev.tsv", content)
    with pytest.raises(DataError) as err:
        read_glue_split(get_task("rte"), "dev", tmp_path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "SST-2" / "dev.tsv"
    path.parent.mkdir()
    path.write_bytes(b"sentence\tlabel\ngood\t1\ncaf\xe9\t1\n")
    with pytest.raises(DataError, match=r"dev.tsv of task sst2: line 3 is not valid UTF-8"):
        read_glue_split(get_task("sst2"), "dev", tmp_path)


def test_missing_file_and_unknown_split(tmp_path):
    with pytest.raises(DataError, match=r"CoLA/dev.tsv of task cola: file not found"):
        read_glue_split(get_task("cola"), "dev", tmp_path)
    with pytest.raises(DataError, match="task cola has no split 'test'; its splits are train, dev"):
        read_glue_split(get_task("cola"), "test", tmp_path)


def test_cola_empty_file(tmp_path):
    write(tmp_path, "CoLA", "dev.tsv", "")
    with pytest.raises(DataError, match="dev.tsv of task cola: file is empty"):
        read_glue_split(get_task("cola"), "dev", tmp_path)


def test_cola_empty_sentence_names_the_column(tmp_path):
    write(tmp_path, "CoLA", "dev.tsv", "gj04\t1\t\tFine.\ngj04\t1\t\t\n")
    with pytest.raises(DataError, match="line 2: column 4 is empty"):
        read_glue_split(get_task("cola"), "dev", tmp_path)


@pytest.mark.parametrize("score", ["nan", "inf", "high", "5.5", "-0.1", ""])
def test_stsb_bad_scores(tmp_path, score):
    write(tmp_path, "STS-B", "dev.tsv", f"{STSB_HEADER}\n0\tg\tf\ty\t0\tnone\tnone\tA.\tB.\t{score}\n")
    with pytest.raises(DataError, match=f"line 2: score '{score}' is not a number from 0 to 5"):
        read_glue_split(get_task("stsb"), "dev", tmp_path)


def test_resolve_glue_dir_order(tmp_path, monkeypatch):
    given, env, work, shared = (tmp_path / "given", tmp_path / "env", tmp_path / "work",
                                tmp_path / "shared" / "data" / "glue")
    for folder in (given / "RTE", env / "RTE", env / "SST-2", work, shared / "CoLA", shared / "RTE"):
        folder.mkdir(parents=True)
    monkeypatch.setenv("GLUE_DIR", str(env))
    monkeypatch.chdir(work)
    assert resolve_glue_dir(given, get_task("rte")) == given
    with pytest.raises(DataError, match="--data-dir"):  # an explicit folder is never silently replaced
        resolve_glue_dir(str(given), get_task("sst2"))
    assert resolve_glue_dir(None, get_task("rte")) == env
    assert resolve_glue_dir(None, get_task("cola")).resolve() == shared.resolve()


def test_resolve_glue_dir_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        resolve_glue_dir(tmp_path / "mine", get_task("mnli"))
    message = str(err.value)
    assert f"{tmp_path / 'mine' / 'MNLI'} (--data-dir)" in message and "download" in message
    with pytest.raises(DataError) as err:
        resolve_glue_dir(None, get_task("mnli"))
    message = str(err.value)
    assert "../shared/data/glue" in message and "$GLUE_DIR is not set" in message and "--data-dir" in message
    assert "--hub-dataset nyu-mll/glue" in message


def test_load_split_reads_from_data_dir(tmp_path):
    write(tmp_path, "SST-2", "dev.tsv", "sentence\tlabel\ngood\t1\n")
    task, examples = load_split("SST-2", "dev", tmp_path)
    assert task.name == "sst2" and examples == [Example("good", None, 1)]


def test_read_table_csv_tsv_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text('text,other,label\n"Hello, world",x,pos\nbye,y,neg\n', encoding="utf-8")
    (tmp_path / "a.tsv").write_text("text\tlabel\nHello, world\tpos\nbye\tneg\n", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "Hello, world", "label": "pos"}\n\n{"text": "bye", "label": "neg"}\n')
    for name in ("a.csv", "a.tsv", "a.jsonl"):
        examples, labels = read_table(tmp_path / name, "text")
        assert labels == ("neg", "pos")
        assert examples == [Example("Hello, world", None, 1), Example("bye", None, 0)]


def test_read_table_pairs_given_labels_regression_and_prediction(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"q": "a?", "s": "b.", "y": 1}\n{"q": "c?", "s": "d.", "y": 0}\n')
    assert read_table(path, "q", "s", "y", labels=("1", "0")) == (
        [Example("a?", "b.", 0), Example("c?", "d.", 1)], ("1", "0"))
    assert read_table(path, "q", "s", "y", labels=())[0][0].label == 1.0
    assert read_table(path, "q", label_column=None) == ([Example("a?", None, -1), Example("c?", None, -1)], ())


@pytest.mark.parametrize("name, content, kwargs, problem", [
    ("t.csv", "text,label\nhi,1\n", {"text_column": "sentence"},
     "line 2 has no column 'sentence'; available: text, label"),
    ("t.csv", "text,label\nhi,1\nho,2\n", {"text_column": "text", "labels": ("1",)},
     "line 3: label '2' is not one of 1"),
    ("t.tsv", "text\tlabel\nhi\t1\n \t0\n", {"text_column": "text"}, "line 3: text is empty"),
    ("t.tsv", "text\tlabel\nhi\t1\tx\n", {"text_column": "text"}, "line 2 has 3 columns, expected 2"),
    ("t.jsonl", '{"text": "hi", "label": 1}\n{"text": "hi", label: 1}\n', {"text_column": "text"},
     "line 2 is not valid JSON"),
    ("t.jsonl", '[1, 2]\n', {"text_column": "text"}, "line 1 is not a JSON object"),
    ("t.jsonl", '{"text": 3, "label": 1}\n', {"text_column": "text"}, "line 1: text is int, expected text"),
    ("t.jsonl", '{"text": "a", "label": "x"}\n', {"text_column": "text", "labels": ()},
     "line 1: score 'x' is not a finite number"),
    ("t.jsonl", '{"text": "a", "label": NaN}\n', {"text_column": "text", "labels": ()},
     "line 1: score 'NaN' is not a finite number"),
    ("t.csv", "text,label\na,1.5\nb,-inf\n", {"text_column": "text", "labels": ()},
     "line 3: score '-inf' is not a finite number"),
    ("t.csv", "text,label\nhi,\n", {"text_column": "text"}, "line 2: label column 'label' is empty"),
    ("t.csv", "text,label\n", {"text_column": "text"}, "has no rows"),
    ("t.csv", "", {"text_column": "text"}, "file is empty, expected a header row"),
    ("t.jsonl", "\n", {"text_column": "text"}, "has no rows"),
    ("t.txt", "x", {"text_column": "text"}, "unsupported file type '.txt'"),
    ("t.csv", 'text,label\ngood film,pos\n"unterminated,neg\nbad,neg\nfine,pos\n', {"text_column": "text"},
     "line 3 opens a quote that never closes, so the rest of the file (lines 3 to 5) would be read as one field"),
    ("t.csv", 'text,label\ngood film,pos\n"unterminated,neg', {"text_column": "text"},
     "line 3 opens a quote that never closes"),
    ("t.tsv", 'text\tlabel\n"good\tpos\n', {"text_column": "text"}, "line 2 opens a quote that never closes"),
    ("t.csv", 'text,label\ngood,pos\n"two\nlines",neg,extra\n', {"text_column": "text"},
     "line 4 has 3 columns, expected 2 (lines 3 to 4 read as one row: a quoted field holds line breaks)"),
])
def test_read_table_errors(tmp_path, name, content, kwargs, problem):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_table(path, **kwargs)
    assert str(path) in str(err.value) and problem in str(err.value)


@pytest.mark.parametrize("name, content, line", [
    ("t.csv", b"text,label\ngood,1\ncaf\xe9,1\n", 3),
    ("t.tsv", b"text\tlabel\ncaf\xe9\t1\n", 2),
    ("t.jsonl", b'{"text": "good", "label": 1}\n{"text": "caf\xe9", "label": 1}\n', 2),
])
def test_read_table_non_utf8_names_the_line(tmp_path, name, content, line):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{name}: line {line} is not valid UTF-8 .*save the file as UTF-8"):
        read_table(path, "text")


def test_quoted_fields_across_lines_and_doubled_quotes_still_read(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('text,label\n"two\nlines",neg\n"a ""quoted"" word",pos\nsay "hi" there,neg\n')
    examples, _ = read_table(path, "text", labels=("neg", "pos"))
    assert [e.text_a for e in examples] == ["two\nlines", 'a "quoted" word', 'say "hi" there']


def test_read_table_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.csv: file not found"):
        read_table(tmp_path / "nope.csv", "text")


class FakeDataset:
    """The part of a `datasets.Dataset` the hub reader uses."""

    def __init__(self, rows, label_names):
        self.rows = rows
        self.column_names = list(rows[0])
        self.features = {"label": types.SimpleNamespace(names=label_names)}

    def __iter__(self):
        return iter(self.rows)


def fake_hub(monkeypatch, rows, label_names=None):
    calls = []

    def load_dataset(dataset_id, config, split):
        calls.append((dataset_id, config, split))
        return FakeDataset(rows, label_names)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_mnli_maps_labels_by_name(monkeypatch):
    calls = fake_hub(monkeypatch, [{"premise": "p", "hypothesis": "h", "label": i} for i in range(3)],
                     ["entailment", "neutral", "contradiction"])
    examples = read_hub_split("nyu-mll/glue", get_task("mnli"), "dev")
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert [e.label for e in examples] == [1, 2, 0] and examples[0] == Example("p", "h", 1)
    read_hub_split("nyu-mll/glue", get_task("mnli"), "dev_mismatched")
    assert calls[-1][2] == "validation_mismatched"


def test_hub_binary_and_regression(monkeypatch):
    calls = fake_hub(monkeypatch, [{"sentence": "good", "label": 1, "idx": 0}], ["negative", "positive"])
    assert load_split("sst-2", "dev", hub_dataset="nyu-mll/glue")[1] == [Example("good", None, 1)]
    assert calls == [("nyu-mll/glue", "sst2", "validation")]
    fake_hub(monkeypatch, [{"sentence1": "a", "sentence2": "b", "label": 3.8}])
    assert read_hub_split("nyu-mll/glue", get_task("stsb"), "train") == [Example("a", "b", 3.8)]


def test_hub_errors(monkeypatch):
    fake_hub(monkeypatch, [{"text": "a", "label": 0}], ["entailment", "not_entailment"])
    with pytest.raises(DataError, match=r"nyu-mll/glue \(rte, split validation\) has no column sentence1, sentence2"):
        read_hub_split("nyu-mll/glue", get_task("rte"), "dev")
    fake_hub(monkeypatch, [{"sentence1": "a", "sentence2": "b", "label": -1}], ["entailment", "not_entailment"])
    with pytest.raises(DataError, match="row 0: label -1 is not a class id from 0 to 1"):
        read_hub_split("nyu-mll/glue", get_task("rte"), "dev")


def test_hub_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        read_hub_split("nyu-mll/glue", get_task("rte"), "dev")


def test_subsample_is_fixed_by_seed():
    examples = [Example(str(i), None, 0) for i in range(100)]
    picked = subsample(examples, 10, seed=3)
    assert picked == subsample(examples, 10, seed=3) != subsample(examples, 10, seed=4)
    assert len(picked) == 10 and picked == sorted(picked, key=lambda e: int(e.text_a))
    assert subsample(examples, 100, seed=3) == examples == subsample(examples, 500, seed=3)


def test_split_off_is_fixed_and_disjoint():
    examples = [Example(str(i), None, 0) for i in range(50)]
    held, rest = split_off(examples, 0.1, seed=0)
    assert (held, rest) == split_off(examples, 0.1, seed=0)
    assert len(held) == 5 and len(rest) == 45 and sorted(held + rest, key=lambda e: int(e.text_a)) == examples
    assert split_off(examples, 0.0, seed=0) == ([], examples)
    with pytest.raises(DataError, match=r"\[0, 1\)"):
        split_off(examples, 1.0, seed=0)


GLUE = Path("/work/shared/data/glue")


@pytest.mark.skipif(not GLUE.is_dir(), reason="shared GLUE data not present")
@pytest.mark.parametrize("task, rows", [("sst2", 872), ("rte", 277), ("cola", 1043), ("qnli", 5463), ("stsb", 1500)])
def test_real_glue_dev_files(task, rows):
    spec, examples = load_split(task, "dev", GLUE)
    assert len(examples) == rows
    if spec.is_regression:
        assert min(e.label for e in examples) == 0.0 and max(e.label for e in examples) == 5.0
    else:
        assert {e.label for e in examples} == set(range(spec.num_labels))


@pytest.mark.parametrize("name, content, problem", [
    ("t.csv", "text\tlabel\nhi\t1\n", "line 1 (header) is one column holding tabs: the file looks separated by tabs, "
                                      "but a .csv file is read as separated by commas; name it .tsv"),
    ("t.tsv", "text,label\nhi,1\n", "holding commas: the file looks separated by commas, but a .tsv file is read as "
                                    "separated by tabs; name it .csv"),
    ("t.csv", "text;label\nhi;1\n", "holding semicolons: the file looks separated by semicolons, but a .csv file is "
                                    "read as separated by commas; save it separated by commas (.csv) or tabs (.tsv)"),
])
def test_read_table_names_a_wrong_delimiter(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_table(path, "text")
    assert str(err.value).startswith(f"{path}: line 1 (header) is one column") and str(err.value).endswith(problem)


def test_read_table_takes_labels_as_values_or_names(tmp_path):
    path = tmp_path / "eval.csv"
    path.write_text("sentence,label\ngood,positive\nbad,0\n")
    names = ("negative", "positive")
    assert read_table(path, "sentence", labels=("0", "1"), label_names=names)[0] == [
        Example("good", None, 1), Example("bad", None, 0)]
    path.write_text("sentence,label\ngood,positive\nso so,meh\n")
    with pytest.raises(DataError, match=r"eval.csv: line 3: label 'meh' is not one of 0, 1 nor their names negative, "
                                        r"positive \(the model's labels\)"):
        read_table(path, "sentence", labels=("0", "1"), label_names=names, labels_from="the model's labels")


def test_stratified_split_holds_out_the_fraction_of_every_class():
    examples = [Example(f"t{i}", None, 0 if i < 10 else 1) for i in range(40)]
    held, rest = split_off(examples, 0.1, seed=0, stratified=True)
    assert sorted(e.label for e in held) == [0, 1, 1, 1] and len(rest) == 36
    assert split_off(examples, 0.1, seed=0, stratified=True) == (held, rest)
    small = [Example(f"t{i}", None, i % 3) for i in range(6)]  # every class too small for 10 %: one in all
    assert len(split_off(small, 0.1, seed=0, stratified=True)[0]) == 1
    with pytest.raises(DataError, match="cannot hold out 0.5 of 3 examples"):
        split_off(small[:3], 0.5, seed=0, stratified=True)  # one example per class: none can go
