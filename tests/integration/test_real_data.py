"""Real data sets from ../shared/data through the tokenize stage: rt-polarity (JSONL files,
integer labels), CoNLL-2003 (word and tag lists) and SQuAD (nested JSON, questions in windows),
and a slice of SQuAD's windows on to fine-tuning, the registry and a served answer.
Skips where ../shared is absent, and fails in CI."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from components import tokenize
from components.stage import StageContext, read_json
from pipelines.pipeline_config import PipelineConfig, load_config
from tests.conftest import REPO, register_in_sqlite, shared

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
    sentence kept, a long one as several windows of its words, and every word carries its tag
    once, on its first sub-word."""
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
        examples = table.column("example").to_pylist()
        assert sorted(set(examples)) == list(range(sentences)), split
        # 1.2% of validation's words lie past 64 sub-words: their sentences take two windows or more.
        assert sentences < table.num_rows < 1.05 * sentences, (split, table.num_rows)
        assert len(labels) == words, (split, len(labels))
        if split == "train":  # the README counts 6600 persons
            assert labels.count(tags.index("B-PER")) == 6600


@pytest.fixture(scope="module")
def squad_windows(ray_driver: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PipelineConfig]:
    """SQuAD's nested JSON through tokenize and prepare's Ray Data tokenization, with its config."""
    shared("data/squad")
    tmp_path = tmp_path_factory.mktemp("squad")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the config's data paths are relative to the repo root
        config = load_config(REPO / "configs" / "squad_qa.yaml", [f"storage={tmp_path}"])
        ctx = _tokenize_context(tmp_path)
        result = tokenize.run(config.tokenize, config.data, ctx)
    assert result.metrics["corpus/rows"] == 1672  # paragraphs of train.json, each once
    return ctx.output_dir, config


def test_squad_questions_become_windows_on_ray_data(squad_windows: tuple[Path, PipelineConfig]) -> None:
    """Every question gets one window or more, each labelled with its answer's tokens or [CLS]."""
    output, config = squad_windows
    assert read_json(output / "labels.json") == ["start", "end"]
    questions = {"train": 8514, "validation": 1243, "test": 813}  # per the dataset's README
    for split, count in questions.items():
        table = pq.read_table(output / "task" / split, columns=["example", "label", "offsets", "context"])
        examples = table.column("example").to_pylist()
        assert sorted(set(examples)) == list(range(count)), split
        assert len(examples) > count  # long paragraphs take several windows
        labels = table.column("label").to_pylist()
        answered = {example for example, label in zip(examples, labels, strict=True) if label != [0, 0]}
        assert len(answered) >= 0.99 * count, (split, len(answered))  # nearly every answer fits a window
        seq_len = config.tokenize.seq_len
        assert {len(offsets) for offsets in table.column("offsets").to_pylist()} == {2 * seq_len}


def test_a_squad_slice_trains_reaches_the_registry_and_answers_with_a_span(
    squad_windows: tuple[Path, PipelineConfig], tmp_path: Path
) -> None:
    """The first questions of each split's windows fine-tune a fresh tiny BERT of the config's shape
    for two epochs (the fine-tuning loop in-process, one rank), are registered in a real MLflow
    store, and the registered version answers real test questions with spans of their contexts."""
    from mlflow import MlflowClient

    from components import accelerator, finetune, models, training
    from components.schemas import DeepSpeedConfig, Hyperparameters
    from components.scoring import Scorer
    from components.tasks import task_type
    from components.vocab import special_ids

    output, config = squad_windows
    qa = task_type("question_answering")
    sizes = {"train": 400, "validation": 64, "test": 64}  # questions, with all their windows
    for split, questions in sizes.items():
        table = pq.read_table(output / "task" / split)
        first = table.filter(pc.less(table.column("example"), questions))
        (tmp_path / "task" / split).mkdir(parents=True)
        pq.write_table(first, tmp_path / "task" / split / "part-0.parquet")
    environment, threads = dict(os.environ), torch.get_num_threads()
    accelerator.prepare_process(use_gpu=False, num_threads=1)
    training.ensure_process_group()  # kept for the process's life (see tests/unit/test_entities.py)
    try:
        tokenizer = AutoTokenizer.from_pretrained(output / "tokenizer")
        model = models.build_lm(
            config.pretrain.model, vocab_size=len(tokenizer), special_ids=special_ids(tokenizer), seed=0
        )
        model.save_pretrained(tmp_path / "pretrained")
        tokenizer.save_pretrained(tmp_path / "pretrained")
        reports, exported = [], tmp_path / "exported"

        def report(metrics: dict, checkpoint_dir: str) -> None:
            reports.append(metrics)
            if (Path(checkpoint_dir) / "hf").is_dir():
                shutil.copytree(Path(checkpoint_dir) / "hf", exported)

        run = finetune.ClassifierRun(
            pretrained_dir=str(tmp_path / "pretrained"),
            task_dir=str(tmp_path / "task"),
            label_names=["start", "end"],
            epochs=2,
            hyper=Hyperparameters(learning_rate=2e-3, batch_size_per_worker=32, dropout=0.0),
            deepspeed=DeepSpeedConfig(zero_stage=0),
            threads=1,
            log_every=50,
            export=True,
            task_type=qa.name,
        )
        finetune.fit_classifier(run, report=report)
    finally:
        os.environ.clear()
        os.environ.update(environment)
        torch.set_num_threads(threads)
    # Start and end each over the window's positions: a model that learned nothing scores ln(seq_len).
    assert reports[-1]["eval/loss"] < math.log(config.tokenize.seq_len), reports[-1]
    last = reports[-1]
    assert 0 <= last["test/exact_match"] <= last["test/f1"] <= 1 and 0 <= last["eval/f1"] <= 1

    uri, version = register_in_sqlite(exported, tmp_path, "squad-slice-qa", qa, last["test/f1"], "squad-test-64")
    assert MlflowClient(uri).get_model_version("squad-slice-qa", version["version"]).tags["ptft.task_type"] == qa.name
    document = json.loads(shared("data/squad/test.json").read_text())
    paragraph = document["data"][0]["paragraphs"][0]
    asked = [{"question": item["question"], "context": paragraph["context"]} for item in paragraph["qas"][:4]]
    for item, answer in zip(asked, Scorer(version["model_uri"], uri)(asked), strict=True):
        assert answer["answer"] and item["context"][answer["start"] : answer["end"]] == answer["answer"]
        assert 0 < answer["score"] <= 1
