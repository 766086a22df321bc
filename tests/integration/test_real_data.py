"""Real data sets from ../shared/data through the tokenize stage: rt-polarity (JSONL files,
integer labels), CoNLL-2003 (word and tag lists) and SQuAD (nested JSON, questions in windows).
Skips where ../shared is absent, and fails in CI."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from components import tokenize
from components.stage import StageContext, read_json
from pipelines.pipeline_config import load_config
from tests.conftest import REPO, shared

pytestmark = pytest.mark.integration


def _tokenize_context(tmp_path: Path) -> StageContext:
    """The tokenize stage's context, run outside a pipeline (no MLflow run)."""
    return StageContext(
        pipeline_run_id="real",
        stage="tokenize",
        output_dir=tmp_path / "tok",
        storage=tmp_path,
        tracking_uri="",
        experiment_id="",
        mlflow_run_id="",
    )


def test_rt_polarity_tokenizes_with_its_config(ray_driver: str, tmp_path: Path, monkeypatch) -> None:
    shared("data/rt-polarity")
    monkeypatch.chdir(REPO)  # the config's data paths are relative to the repo root
    config = load_config(REPO / "configs" / "rt_polarity.yaml", [f"storage={tmp_path}"])
    ctx = _tokenize_context(tmp_path)
    result = tokenize.run(config.tokenize, config.data, ctx)
    assert read_json(ctx.output_dir / "labels.json") == ["negative", "positive"]  # data.task.label_names
    rows = {split: pq.read_table(ctx.output_dir / "task" / split).num_rows for split in ("train", "validation", "test")}
    assert rows == {"train": 8530, "validation": 1066, "test": 1066}
    assert result.metrics["tokenize/vocab_size"] > 5000
    test_labels = pq.read_table(ctx.output_dir / "task" / "test").column("label").to_pylist()
    assert sum(test_labels) == 533  # positives in test.jsonl, per the dataset's README


def test_conll2003_words_get_their_tags_on_ray_data(ray_driver: str, tmp_path: Path, monkeypatch) -> None:
    """CoNLL-2003 through tokenize and prepare's Ray Data tokenization, with its config: every
    sentence kept, and each word that fits in seq_len carries its tag once, on its first sub-word."""
    shared("data/conll2003")
    monkeypatch.chdir(REPO)
    config = load_config(REPO / "configs" / "conll2003_ner.yaml", [f"storage={tmp_path}"])
    ctx = _tokenize_context(tmp_path)
    tokenize.run(config.tokenize, config.data, ctx)
    tags = read_json(ctx.output_dir / "labels.json")
    assert tags == ["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER", "O"]
    # Sentences and words per split, from the dataset's README.
    expected = {"train": (14041, 203621), "validation": (3250, 51362), "test": (3453, 46435)}
    for split, (sentences, words) in expected.items():
        table = pq.read_table(ctx.output_dir / "task" / split)
        labels = [label for row in table.column("label").to_pylist() for label in row if label != -100]
        assert table.num_rows == sentences
        # Words past 64 sub-words are cut (98.8% of validation's words fit: 50,738 of 51,362).
        assert 0.98 * words <= len(labels) <= words, (split, len(labels))
        if split == "train":  # every B-PER that fits is there: the README counts 6600 persons
            assert 0.99 * 6600 <= labels.count(tags.index("B-PER")) <= 6600


def test_squad_questions_become_windows_on_ray_data(ray_driver: str, tmp_path: Path, monkeypatch) -> None:
    """SQuAD's nested JSON through tokenize and prepare's Ray Data tokenization, with its config:
    every question gets one window or more, each labelled with its answer's tokens or [CLS]."""
    shared("data/squad")
    monkeypatch.chdir(REPO)
    config = load_config(REPO / "configs" / "squad_qa.yaml", [f"storage={tmp_path}"])
    ctx = _tokenize_context(tmp_path)
    result = tokenize.run(config.tokenize, config.data, ctx)
    assert read_json(ctx.output_dir / "labels.json") == ["start", "end"]
    assert result.metrics["corpus/rows"] == 1672  # paragraphs of train.json, each once
    questions = {"train": 8514, "validation": 1243, "test": 813}  # per the dataset's README
    for split, count in questions.items():
        table = pq.read_table(ctx.output_dir / "task" / split, columns=["example", "label", "offsets", "context"])
        examples = table.column("example").to_pylist()
        assert sorted(set(examples)) == list(range(count)), split
        assert len(examples) > count  # long paragraphs take several windows
        labels = table.column("label").to_pylist()
        answered = {example for example, label in zip(examples, labels, strict=True) if label != [0, 0]}
        assert len(answered) >= 0.99 * count, (split, len(answered))  # nearly every answer fits a window
        seq_len = config.tokenize.seq_len
        assert {len(offsets) for offsets in table.column("offsets").to_pylist()} == {2 * seq_len}
