"""Data problems `ptft validate` (and every command that loads a config) finds before any compute:
exit 2, naming the key and the file, with the fix."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest
import yaml

from components.data import load_source
from components.schemas import FileSource
from components.tasks import task_type
from pipelines.cli import main
from tests.conftest import tiny_config_dict


def _rows(count: int, labels: tuple = ("neg", "pos")) -> list[dict]:
    picked = [labels[i % len(labels)] for i in range(count)]
    return [{"text": f"review {i} was {label}", "label": label} for i, label in enumerate(picked)]


def _config(tmp_path: Path, splits: dict[str, list[dict] | bytes], **finetune) -> Path:
    task = {}
    for split, rows in splits.items():
        path = tmp_path / f"{split}.jsonl"
        path.write_bytes(rows if isinstance(rows, bytes) else "".join(json.dumps(r) + "\n" for r in rows).encode())
        task[split] = {"type": "file", "path": str(path)}
    config = {**tiny_config_dict(tmp_path / "store"), "finetune": finetune}
    config["data"]["task"] = task
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _validate(config: Path, capsys: pytest.CaptureFixture, *overrides: str) -> tuple[int, str]:
    code = main(["validate", str(config), *overrides])
    return code, capsys.readouterr().err


def test_good_splits_pass(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _config(tmp_path, {"train": _rows(64), "validation": _rows(8), "test": _rows(8)})
    assert _validate(config, capsys)[0] == 0


def test_a_file_that_is_not_utf8_is_named_with_the_byte(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    latin1 = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in _rows(64)).replace("review", "révue")
    config = _config(tmp_path, {"train": latin1.encode("latin-1"), "validation": _rows(8), "test": _rows(8)})
    code, err = _validate(config, capsys)
    assert code == 2
    assert "data.task.train.path" in err and "train.jsonl is not UTF-8 text (byte 11)" in err and "iconv" in err


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_a_file_that_starts_with_a_byte_order_mark_reads_as_without(
    tmp_path: Path, capsys: pytest.CaptureFixture, suffix: str
) -> None:
    """Excel's "CSV UTF-8" starts with one: validation said `column 'text' not in ...: use one of its
    columns: \ufefftext, label` (the mark invisible), and a JSON-lines file's first line was not JSON."""
    rows = _rows(64)
    if suffix == "csv":
        text = "text,label\n" + "".join(f"{row['text']},{row['label']}\n" for row in rows)
    else:
        text = "".join(json.dumps(row) + "\n" for row in rows)
    marked = tmp_path / f"marked.{suffix}"
    marked.write_bytes(codecs.BOM_UTF8 + text.encode())
    config = _config(tmp_path, {"train": rows, "validation": _rows(8), "test": _rows(8)})
    code, err = _validate(config, capsys, f"data.task.train.path={marked}")
    assert code == 0 and "problem" not in err, err  # (a Ray driver in this test process may log beside it)
    table = load_source(FileSource(type="file", path=str(marked)), labelled=True)
    assert table.column_names == ["text", "label"] and table.column("text")[0].as_py() == rows[0]["text"]


def test_an_empty_split_one_class_and_unseen_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    splits = {"train": _rows(64, ("pos",)), "validation": _rows(8, ("pos", "neutral")), "test": b""}
    code, err = _validate(_config(tmp_path, splits), capsys)
    assert code == 2
    assert "data.task.test.path" in err and "test.jsonl is empty" in err
    splits["test"] = _rows(8)
    code, err = _validate(_config(tmp_path, splits), capsys)
    assert code == 2
    assert "data.task.train" in err and "one class only (pos)" in err
    assert "data.task.validation" in err and "labels the train split lacks: neutral" in err
    assert "data.task.test" in err and "labels the train split lacks: neg" in err


def test_labels_spelled_apart_by_case_or_spaces_are_not_classes_of_their_own(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """'pos', 'Pos' and 'pos ' trained as three classes, each with a share of the positive rows."""
    train = _rows(64, ("neg", "pos", "Pos", "pos "))
    code, err = _validate(_config(tmp_path, {"train": train, "validation": _rows(8), "test": _rows(8)}), capsys)
    assert code == 2
    assert "data.task = " in err and "train.jsonl" in err
    assert "differ only in case or surrounding spaces, each read as a class: 'Pos' / 'pos' / 'pos '" in err
    assert "'neg'" not in err and "spell each label one way" in err
    validation = _rows(8, ("neg", "NEG"))  # apart across splits: the test split's 'NEG' is train's 'neg'
    code, err = _validate(_config(tmp_path, {"train": _rows(64), "validation": validation, "test": _rows(8)}), capsys)
    assert code == 2 and "'NEG' / 'neg'" in err


def _entities_config(tmp_path: Path, tags: list[list], **task) -> Path:
    rows = [{"tokens": ["w"] * len(row), "ner_tags": row} for row in tags]
    config = _config(tmp_path, {split: rows for split in ("train", "validation", "test")})
    raw = yaml.safe_load(config.read_text())
    for split in ("train", "validation", "test"):
        raw["data"]["task"][split].update(text_column="tokens", label_column="ner_tags")
    raw["data"]["task"].update(type="token_classification", **task)
    config.write_text(yaml.safe_dump(raw))
    return config


def test_entity_tags_must_be_iob2_or_be_named_so_in_id_order(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Tag ids (a Hugging Face export's ner_tags) trained and were scored as tags '0', '1', ...: seqeval
    found no entity in them. 12 ids were named in string order ('10' before '2'): the wrong names."""
    ids = [[i % 12, (i + 1) % 12] for i in range(64)]
    code, err = _validate(_entities_config(tmp_path, ids), capsys)
    assert code == 2 and "data.task.train" in err and "tags '0', '1', '2', '3', '4' are not IOB2" in err
    names = ["O"] + [f"{prefix}-T{i}" for i in range(1, 6) for prefix in "BI"] + ["B-X"]
    assert _validate(_entities_config(tmp_path, ids, label_names=names), capsys)[0] == 0
    assert task_type("token_classification").label_values(
        load_source(
            FileSource(path=str(tmp_path / "train.jsonl"), text_column="tokens", label_column="ner_tags"), labelled=True
        )
    ) == [str(i) for i in range(12)]  # in id order, as label_names are
    code, err = _validate(_entities_config(tmp_path, ids, label_names=names[:3]), capsys)
    assert code == 2 and "data.task.label_names" in err and "3 names for the train split's 12 labels" in err
    io_scheme = [["PER", "O"], ["O", "LOC"]] * 32  # no B-/I- prefixes
    code, err = _validate(_entities_config(tmp_path, io_scheme), capsys)
    assert code == 2 and "tags 'LOC', 'PER' are not IOB2" in err


def test_rows_without_a_label_or_a_text_are_named_not_learned_or_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A null label read as the class 'None' (train) or as a label train lacks (test); a row with a
    label and no text was left out without a word."""
    train, validation, test = _rows(64), _rows(8), _rows(8)
    train[5]["label"] = None
    del test[3]["label"]
    validation[2]["text"] = None
    del validation[6]["text"]
    code, err = _validate(_config(tmp_path, {"train": train, "validation": validation, "test": test}), capsys)
    assert code == 2
    assert "data.task.train" in err and "1 row(s) without a label, the first with the text 'review 5 was pos'" in err
    assert "data.task.test" in err and "the text 'review 3 was pos'" in err and "None" not in err
    assert "data.task.validation" in err and "2 row(s) without a text, the first with the label 'neg'" in err


def test_labels_that_are_lists_or_objects_are_not_one_class_each(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A list of tags (or an answers object) was learned as one class per distinct value."""
    train = [{**row, "label": [row["label"]]} for row in _rows(64)]
    code, err = _validate(_config(tmp_path, {"train": train, "validation": _rows(8), "test": _rows(8)}), capsys)
    assert code == 2
    assert "data.task.train" in err and "the train split's label column holds list<item: string>" in err
    assert "a sentence classification task reads one label per row" in err


def test_too_few_rows_for_one_fine_tuning_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    splits = {"train": _rows(24), "validation": _rows(8), "test": _rows(8)}
    code, err = _validate(_config(tmp_path, splits, defaults={"batch_size_per_worker": 16}), capsys)
    assert code == 2
    assert "24 train rows cannot fill one finetune step of 2 worker(s) x 16" in err
    assert "one tune step" not in err  # a trial trains in one process by default: 16 rows suffice
    splits_ok = _config(tmp_path, splits, defaults={"batch_size_per_worker": 12})
    assert _validate(splits_ok, capsys)[0] == 0


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.mark.parametrize(
    ("broken", "where"),
    [
        (b'{"text": "review 64 was neg", "label": "neg"\n', "line 65 is not JSON (Expecting ',' delimiter"),
        (b'["review 64 was neg", "neg"]\n', "line 65 is a JSON array, not an object"),
        (b'{"text": 64, "label": "neg"}\n', "line 65: 'text' is a number, on line 1 a string"),
    ],
    ids=["not-json", "not-an-object", "another-type"],
)
def test_a_broken_line_in_a_split_is_named_by_its_number(
    tmp_path: Path, capsys: pytest.CaptureFixture, broken: bytes, where: str
) -> None:
    train = _jsonl(_rows(64)) + broken
    code, err = _validate(_config(tmp_path, {"train": train, "validation": _rows(8), "test": _rows(8)}), capsys)
    assert code == 2 and "Traceback" not in err
    assert "data.task.train.path" in err and f"train.jsonl does not read as jsonl: {where}" in err, err
    assert "one JSON object per line" in err


def test_a_csv_row_with_a_stray_quote_is_quoted_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _config(tmp_path, {"train": _rows(64), "validation": _rows(8), "test": _rows(8)})
    rows = "".join(f"review {i},{'pos' if i % 2 else 'neg'}\n" for i in range(64))
    (tmp_path / "train.csv").write_text(f'text,label\n{rows}"review 64,neg\nreview 65,pos\n')
    code, err = _validate(config, capsys, f"data.task.train.path={tmp_path / 'train.csv'}")
    assert code == 2
    assert 'train.csv does not read as csv: CSV parse error: Expected 2 columns, got 1: "review 64,neg\\n' in err, err
    assert "quote a field that holds a comma" in err


def test_a_corpus_broken_past_its_first_line_fails_before_tokenizing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Only the corpus's first line is read for its columns; the whole file is parsed through. Past
    # Arrow's first block (1 MB), whose error counts rows from the block's start, not the file's.
    documents = _jsonl([{"text": f"document {i} of the corpus"} for i in range(40000)])
    assert len(documents) > 1 << 20
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(documents + b'{"text": 40000}\n')
    config = _config(tmp_path, {"train": _rows(64), "validation": _rows(8), "test": _rows(8)})
    code, err = _validate(config, capsys, f"data.corpus.source={{type: file, path: {corpus}}}")
    assert code == 2
    assert "data.corpus.source.path" in err and "line 40001: 'text' is a number, on line 1 a string" in err, err
    corpus.write_bytes(documents)
    assert _validate(config, capsys, f"data.corpus.source={{type: file, path: {corpus}}}")[0] == 0


def test_shards_of_a_glob_may_add_columns_but_not_change_a_column_s_type(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = _config(tmp_path, {"train": _rows(64), "validation": _rows(8), "test": _rows(8)})
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train-0.jsonl").write_bytes(_jsonl(_rows(32)))
    (shards / "train-1.jsonl").write_bytes(_jsonl([{**row, "source": "web"} for row in _rows(32)]))
    glob = f"data.task.train.path={shards}/train-*.jsonl"
    assert _validate(config, capsys, glob)[0] == 0  # the extra column is not read
    (shards / "train-2.jsonl").write_bytes(_jsonl([{"text": "a", "label": 1}, {"text": "b", "label": 0}]))
    code, err = _validate(config, capsys, glob)
    assert code == 2 and "Traceback" not in err
    assert f"{shards}/train-2.jsonl: label is int64 here, string in {shards}/train-0.jsonl" in err, err
    (shards / "train-2.jsonl").write_bytes(_jsonl([{"review": "a", "label": "pos"}]))
    code, err = _validate(config, capsys, glob)
    assert code == 2 and "train-2.jsonl: no column 'text' (it has review, label)" in err, err
