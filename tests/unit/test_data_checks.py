"""Data problems `ptft validate` (and every command that loads a config) finds before any compute:
exit 2, naming the key and the file, with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

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


def _validate(config: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(["validate", str(config)])
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


def test_too_few_rows_for_one_fine_tuning_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    splits = {"train": _rows(24), "validation": _rows(8), "test": _rows(8)}
    code, err = _validate(_config(tmp_path, splits, defaults={"batch_size_per_worker": 16}), capsys)
    assert code == 2
    assert "24 train rows cannot fill one finetune step of 2 worker(s) x 16" in err
    assert "one tune step" not in err  # a trial trains in one process by default: 16 rows suffice
    splits_ok = _config(tmp_path, splits, defaults={"batch_size_per_worker": 12})
    assert _validate(splits_ok, capsys)[0] == 0
