"""Named entities (token classification, components/tasks/entities.py): word-to-sub-word label
alignment with WordPiece and byte-level BPE, entity-level scores with seqeval semantics, the checks
`ptft validate` makes, and the fine-tuning loop learning real CoNLL-2003 entities in-process."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from components import accelerator, finetune, models, training
from components import tokenize as tok
from components.data import load_source
from components.schemas import DeepSpeedConfig, FileSource, Hyperparameters, ModelConfig, TokenizeConfig
from components.tasks import IGNORE, entities, task_type
from components.tasks.entities import word_windows
from components.vocab import special_ids
from pipelines.cli import main
from pipelines.pipeline_config import load_config
from tests.conftest import REPO, register_in_sqlite, shared, tiny_config_dict

ENTITIES = task_type("token_classification")
SENTENCES = [
    {"tokens": ["Peter", "Blackburn", "visited", "Brussels"], "ner_tags": ["B-PER", "I-PER", "O", "B-LOC"]},
    {"tokens": ["EU", "rejects", "German", "lamb"], "ner_tags": ["B-ORG", "O", "B-MISC", "O"]},
]


def _tokenizer(tmp_path: Path, algorithm: str) -> str:
    texts = [" ".join(row["tokens"]) for row in SENTENCES] * 3
    # A vocabulary too small for whole words: names split into several sub-words.
    tokenizer = tok.train_tokenizer(texts, TokenizeConfig(algorithm=algorithm, vocab_size=60, min_frequency=1))
    tokenizer.save_pretrained(tmp_path / algorithm)
    return str(tmp_path / algorithm)


def _rows(rows: list[dict]) -> pa.Table:
    return pa.table({"text": [row["tokens"] for row in rows], "label": [row["ner_tags"] for row in rows]})


@pytest.mark.parametrize("algorithm", ["wordpiece", "bpe"])
def test_each_word_is_labelled_on_its_first_sub_word(tmp_path: Path, algorithm: str) -> None:
    folder = _tokenizer(tmp_path, algorithm)
    values = ENTITIES.label_values(_rows(SENTENCES))
    out = tok.tokenize_examples(
        _rows(SENTENCES), tokenizer_dir=folder, seq_len=48, label_values=values, task="token_classification"
    )
    tokenizer = tok._load_tokenizer(folder)
    for row, sentence in enumerate(SENTENCES):
        labels = out.column("label")[row].as_py()
        encoded = tokenizer(sentence["tokens"], is_split_into_words=True, max_length=48, truncation=True)
        word_ids = encoded.word_ids()
        assert len(word_ids) > len(sentence["tokens"]) + 2, "some word must split into sub-words"
        first = [i for i, word in enumerate(word_ids) if word is not None and word != word_ids[i - 1]]
        assert [values[labels[i]] for i in first] == sentence["ner_tags"]
        assert all(labels[i] == IGNORE for i in range(len(labels)) if i not in first)
        assert len(labels) == 48 and out.column("attention_mask")[row].as_py().count(1) == len(word_ids)


def test_a_sentence_longer_than_seq_len_is_read_in_windows_that_label_each_word_once(tmp_path: Path) -> None:
    """Evaluation scores whole sentences and training learns every word: a sentence past `seq_len`
    becomes windows of its words, each word labelled in one of them, all keeping its `example`."""
    folder = _tokenizer(tmp_path, "wordpiece")
    values = ENTITIES.label_values(_rows(SENTENCES))
    table = _rows(SENTENCES).append_column("example", pa.array([7, 9], type=pa.int64()))
    out = tok.tokenize_examples(table, tokenizer_dir=folder, seq_len=6, label_values=values, task=ENTITIES.name)
    examples = out.column("example").to_pylist()
    assert examples.count(7) > 1 and examples.count(9) > 1 and examples == sorted(examples)
    assert {len(ids) for ids in out.column("input_ids").to_pylist()} == {6}
    for example, sentence in zip((7, 9), SENTENCES, strict=True):
        windows = [out.column("label")[row].as_py() for row, number in enumerate(examples) if number == example]
        labelled = [values[tag] for labels in windows for tag in labels if tag != IGNORE]
        assert labelled == sentence["ner_tags"]


@pytest.mark.parametrize(
    ("lengths", "budget", "shared"),
    [([1] * 10, 4, 2), ([2, 1, 3, 1, 1, 2, 5, 1], 4, 1), ([1, 1, 1], 8, 4), ([], 4, 2), ([3, 1, 1, 4, 1], 4, 2)],
)
def test_word_windows_own_every_word_once_within_the_budget(lengths: list[int], budget: int, shared: int) -> None:
    windows = word_windows(lengths, budget, shared)
    assert [word for *_, own_start, own_end in windows for word in range(own_start, own_end)] == list(
        range(len(lengths))
    )
    for start, end, own_start, own_end in windows:
        assert start <= own_start <= own_end <= end
        assert end - start == 1 or sum(lengths[start:end]) <= budget  # a longer word alone
    for before, after in itertools.pairwise(windows):
        assert before[0] < after[0] <= before[1] < after[1]  # no gap, and each reaches further
        assert sum(lengths[after[0] : before[1]]) <= shared


def test_the_windows_of_a_sentence_are_scored_as_one_sentence(tmp_path: Path) -> None:
    """A person cut by a window's edge is one entity: the windows (rows 0 and 1) are joined by their
    `example` before seqeval reads them, whatever order the ranks gathered them in."""
    names = ["B-PER", "I-PER", "O"]
    (tmp_path / "test").mkdir()
    pq.write_table(pa.table({"example": [0, 0, 1]}), tmp_path / "test" / "part-0.parquet")
    gold = [[1, 1, 2], [2, 0], [0, 2, 0]]  # row 1 then row 2 then row 0: [O, B-PER | I-PER, O], [B-PER]
    guess = [[2, 2], [0], [2, 0]]  # the person stops at the edge; the second is right
    scores = ENTITIES.scores(gold, guess, names, str(tmp_path / "test"))
    assert scores["precision"] == pytest.approx(0.5) and scores["recall"] == pytest.approx(0.5)
    assert scores["accuracy"] == pytest.approx(4 / 5)


def test_a_tag_the_train_split_lacks_is_named(tmp_path: Path) -> None:
    folder = _tokenizer(tmp_path, "wordpiece")
    unseen = [{"tokens": ["Reuters"], "ner_tags": ["B-NEWS"]}]
    with pytest.raises(ValueError, match=r"\['B-NEWS'\] do not occur in the train split"):
        tok.tokenize_examples(
            _rows(unseen), tokenizer_dir=folder, seq_len=16, label_values=["B-PER", "O"], task="token_classification"
        )


def test_rows_must_be_word_lists_with_one_tag_per_word() -> None:
    with pytest.raises(ValueError, match="not lists"):
        ENTITIES.check_rows(pa.table({"text": ["a sentence"], "label": ["O"]}), "train")
    with pytest.raises(ValueError, match="row 1 of the test split has 2 words but 1 tags"):
        ENTITIES.check_rows(pa.table({"text": [["a", "b"]], "label": [["O"]]}), "test")


def test_scores_count_whole_entities_as_seqeval_does() -> None:
    names = ["B-LOC", "B-PER", "I-PER", "O"]
    ids = {name: i for i, name in enumerate(names)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "O"]]
    # Row 1: the person is cut short (no credit), the place is right; row 2: right.
    guess = [["B-PER", "O", "O", "B-LOC"], ["B-PER", "O"]]
    gold_rows = [[row, *(ids[t] for t in tags)] for row, tags in enumerate(gold)]  # a row's number first
    scores = ENTITIES.scores(gold_rows, [[ids[t] for t in row] for row in guess], names)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1/LOC"] == 1.0 and scores["f1/PER"] == pytest.approx(0.5)
    assert scores["accuracy"] == pytest.approx(5 / 6)  # per word: only "Blackburn" is wrong


def test_answered_tags_are_scored_against_a_files_tags_as_evaluation_scores_them() -> None:
    """`ptft predict --label-column` on a CoNLL file: a tag per word, given as names or as tag ids
    in the model's label order (a Hugging Face export's `ner_tags`)."""
    names = ["B-LOC", "B-PER", "I-PER", "O"]
    answers = [{"tags": ["B-PER", "O", "O", "B-LOC"]}, {"tags": ["B-PER", "O"]}]
    by_name = ENTITIES.score_answers(answers, [["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "O"]], names)
    by_id = ENTITIES.score_answers(answers, [[1, 2, 3, 0], [1, 3]], names)
    assert by_name == by_id
    assert by_name["f1"] == pytest.approx(2 / 3) and by_name["f1/PER"] == pytest.approx(0.5)
    assert by_name["accuracy"] == pytest.approx(5 / 6)


def _ner_config(tmp_path: Path, splits: dict[str, list[dict]], **tune) -> Path:
    task = {"type": "token_classification"}
    for split, rows in splits.items():
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        task[split] = {"type": "file", "path": str(path), "text_column": "tokens", "label_column": "ner_tags"}
    config = tiny_config_dict(tmp_path / "store")
    config["data"]["task"] = task
    config["tune"] = {**config.get("tune", {}), **tune}
    path = tmp_path / "ner.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_validate_names_unseen_tags_and_the_sweep_optimises_entity_f1(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    train = SENTENCES * 32
    good = _ner_config(tmp_path, {"train": train, "validation": SENTENCES, "test": SENTENCES})
    assert main(["validate", str(good)]) == 0, capsys.readouterr().err
    assert load_config(good).tune.metric == "eval/f1"
    odd = [{"tokens": ["Reuters", "said"], "ner_tags": ["B-NEWS", "O"]}]
    bad = _ner_config(tmp_path, {"train": train, "validation": odd, "test": [{"tokens": ["x"], "ner_tags": "O"}]})
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "data.task.validation" in err and "labels the train split lacks: B-NEWS" in err
    assert "data.task.test" in err and "not lists" in err and "Traceback" not in err


def test_a_metric_the_task_type_does_not_report_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = {**tiny_config_dict(tmp_path / "store"), "tune": {"metric": "eval/f1"}}
    path = tmp_path / "classify.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", str(path)]) == 2
    assert "a sequence_classification task reports eval/loss, eval/accuracy, not eval/f1" in capsys.readouterr().err


# --- the fine-tuning loop on real CoNLL-2003 sentences ------------------------------------------------

TRAIN_SENTENCES, EVAL_SENTENCES, SEQ_LEN = 2000, 400, 64


@pytest.fixture(scope="module")
def conll(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A randomly initialised tiny BERT, a WordPiece tokenizer trained on the train sentences, and the
    first sentences of each split tokenized as the prepare stage does; one process rank."""
    environment, threads = dict(os.environ), torch.get_num_threads()
    accelerator.prepare_process(use_gpu=False, num_threads=1)
    # Kept for the process's life, as in a Tune trial: DeepSpeed caches groups made from it
    # (deepspeed.utils.groups), and a module after this one in the same worker would get dead ones.
    training.ensure_process_group()
    folder = tmp_path_factory.mktemp("conll")
    sizes = {"train": TRAIN_SENTENCES, "validation": EVAL_SENTENCES, "test": EVAL_SENTENCES}
    splits = {
        split: load_source(
            FileSource(
                path=str(shared(f"data/conll2003/{split}.jsonl")), text_column="tokens", label_column="ner_tags"
            ),
            labelled=True,
        ).slice(0, rows)
        for split, rows in sizes.items()
    }
    texts = [" ".join(words) for words in splits["train"].column("text").to_pylist()]
    tokenizer = tok.train_tokenizer(texts, TokenizeConfig(vocab_size=3000, seq_len=SEQ_LEN, lowercase=False))
    tokenizer.save_pretrained(folder / "pretrained")
    values = ENTITIES.label_values(splits["train"])
    for split, table in splits.items():
        (folder / "task" / split).mkdir(parents=True)
        rows = tok.tokenize_examples(
            table, tokenizer_dir=str(folder / "pretrained"), seq_len=SEQ_LEN, label_values=values, task=ENTITIES.name
        )
        pq.write_table(rows, folder / "task" / split / "part-0.parquet")
    model = models.build_lm(
        ModelConfig(family="bert"), vocab_size=len(tokenizer), special_ids=special_ids(tokenizer), seed=0
    )
    model.save_pretrained(folder / "pretrained")
    (folder / "labels.json").write_text(json.dumps(values))
    yield folder
    os.environ.clear()
    os.environ.update(environment)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted(conll: Path) -> tuple[finetune.ClassifierRun, list[dict], Path]:
    """Three epochs of the fine-tuning loop: its run, each epoch's metrics, the exported folder."""
    reports = []

    def report(metrics: dict, checkpoint_dir: str) -> None:
        reports.append(metrics)
        if (Path(checkpoint_dir) / "hf").is_dir():
            shutil.copytree(Path(checkpoint_dir) / "hf", conll / "exported")

    run = finetune.ClassifierRun(
        pretrained_dir=str(conll / "pretrained"),
        task_dir=str(conll / "task"),
        label_names=json.loads((conll / "labels.json").read_text()),
        epochs=3,
        hyper=Hyperparameters(learning_rate=5e-3, batch_size_per_worker=16, dropout=0.0),
        deepspeed=DeepSpeedConfig(),
        threads=1,
        log_every=50,
        export=True,
        task_type=ENTITIES.name,
    )
    finetune.fit_classifier(run, report=report)
    return run, reports, conll / "exported"


def test_fine_tuning_learns_conll_entities_and_exports_a_token_classifier(fitted, conll: Path) -> None:
    run, reports, exported = fitted
    first, last = reports[0], reports[-1]
    validation = training.load_columns(conll / "task" / "validation", ["label"])["label"]
    words = validation[validation != IGNORE]
    outside = float((words == run.label_names.index("O")).float().mean())
    # Tagging every word O scores that share of words right and an entity F1 of 0.
    assert last["eval/accuracy"] > outside + 0.02, (last, outside)
    assert last["eval/f1"] > 0.25 and last["eval/f1"] > first["eval/f1"]
    assert {f"test/f1/{kind}" for kind in ("LOC", "MISC", "ORG", "PER")} <= set(last)
    assert 0 < last["test/f1"] <= 1 and "test/f1" not in first
    assert models.smoke_test(exported, ENTITIES.auto_model)["parameters"] > 0


def test_the_served_answer_lists_entities_with_their_place_in_the_text(fitted) -> None:
    from components.serve import Scorer

    scorer = Scorer(str(fitted[2]), tracking_uri=None)
    assert scorer.task is ENTITIES
    texts = [
        "Germany beat England 2-1 in London on Saturday , Reuters reported .",
        "Peter Blackburn of the European Commission said on Thursday .",
        "x " * 200 + "Peter Blackburn of the European Commission said on Thursday .",  # past the positions
    ]
    answers = scorer(texts)
    assert [answer["truncated"] for answer in answers] == [False, False, False]  # read in windows
    found = [entity for answer in answers for entity in answer["entities"]]
    assert found, answers
    for text, answer in zip(texts, answers, strict=True):
        for entity in answer["entities"]:
            assert entity["text"] == text[entity["start"] : entity["end"]] and entity["text"].strip() == entity["text"]
            assert entity["type"] in {"LOC", "MISC", "ORG", "PER"} and 0 < entity["score"] <= 1


def test_the_registered_conll_model_tags_as_the_exported_folder_does(fitted, tmp_path: Path) -> None:
    """The real-data model goes through the registry (transformers flavor, token-classification)
    and the registered version, served from MLflow, finds the same entities as its folder."""
    from mlflow import MlflowClient

    from components.serve import Scorer

    uri, version = register_in_sqlite(
        fitted[2], tmp_path, "conll-ner", ENTITIES, fitted[1][-1]["test/f1"], "conll-slice"
    )
    tags = MlflowClient(uri).get_model_version("conll-ner", version["version"]).tags
    assert tags["ptft.task_type"] == ENTITIES.name and float(tags["ptft.test_f1"]) > 0
    assert version["aliases"] == ["candidate", "champion"]  # the first version has no champion to beat
    text = ["Germany beat England 2-1 in London on Saturday , Reuters reported ."]
    assert Scorer(version["model_uri"], uri)(text) == Scorer(str(fitted[2]), tracking_uri=None)(text)


def test_the_attention_map_of_an_entities_model_is_of_a_tagged_token(fitted) -> None:
    from components.serve import Scorer

    scorer = Scorer(str(fitted[2]), tracking_uri=None)
    text = "Peter Blackburn of the European Commission said on Thursday ."
    entities = scorer([text])[0]["entities"]
    (explained,) = scorer.explain([text])
    assert len(explained["attention"]) == 2 and len(explained["attention"][0]) == len(explained["tokens"])
    assert explained["query_token"] in explained["tokens"] and explained["query_token"] != "[CLS]"
    assert entities, "a name the train split holds"  # the map is of its first token, labelled with its tag
    assert explained["label"].endswith(entities[0]["type"]) and explained["label"] != "O"


def test_the_attention_map_of_a_long_text_is_of_its_first_entity_in_the_window_that_tags_it(fitted) -> None:
    """An entity past the model's positions is served (read in a later window) and explained: the
    map is of its first word's first token, in that window, labelled with its served tag."""
    from components.serve import Scorer

    scorer = Scorer(str(fitted[2]), tracking_uri=None)
    text = "he said that the market was quiet . " * 20 + "Peter Blackburn of the European Commission said ."
    cut = scorer.tokenizer(text, truncation=True, max_length=scorer.max_tokens, return_offsets_mapping=True)
    (answer,) = scorer([text])
    assert answer["entities"] and not answer["truncated"]
    first = answer["entities"][0]
    assert first["start"] >= max(end for _, end in cut["offset_mapping"]), "the first entity lies past the first window"
    (explained,) = scorer.explain([text])
    assert explained["label"] in {f"B-{first['type']}", f"I-{first['type']}"}
    assert explained["query_token"] == scorer.tokenizer.tokenize(first["text"].split()[0])[0]
    assert explained["tokens"] != scorer.tokenizer.convert_ids_to_tokens(cut["input_ids"])  # a later window
    assert len(explained["tokens"]) <= scorer.max_tokens and len(explained["attention"][0]) == len(explained["tokens"])


def test_a_conll_files_words_are_tagged_and_scored_as_the_test_split_was(
    fitted, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ptft predict` on CoNLL's own format: each row's words (not a text) tagged one tag per word
    as evaluation tags them, so the file's entity F1 is the finetune stage's test F1 on it. Both
    read a row longer than the model's positions in the same windows, and tag every word of it."""
    from components.scoring import Scorer

    scorer = Scorer(str(fitted[2]), tracking_uri=None)
    rows = [json.loads(line) for line in shared("data/conll2003/test.jsonl").read_text().splitlines()[:EVAL_SENTENCES]]
    words = [row["tokens"] for row in rows]
    answers = scorer(words)
    assert [len(answer["tags"]) for answer in answers] == [len(row) for row in words]
    for row, answer in zip(words, answers, strict=True):
        for entity in answer["entities"]:
            assert entity["text"] == " ".join(row[entity["start"] : entity["end"]])
            assert answer["tags"][entity["start"]] in {f"B-{entity['type']}", f"I-{entity['type']}"}
    assert not any(answer["truncated"] for answer in answers)
    encoded = scorer.tokenizer(words, is_split_into_words=True, truncation=True, max_length=scorer.max_tokens)
    seen = [max(word for word in encoded.word_ids(row) if word is not None) + 1 for row in range(len(words))]
    tails = [answer["tags"][n:] for n, answer in zip(seen, answers, strict=True)]
    assert sum(map(len, tails)) > 100, "the slice has rows past the model's positions"
    assert any(tag != "O" for tail in tails for tag in tail)  # the words past them are read (O when cut off)
    scores = ENTITIES.score_answers(answers, [row["ner_tags"] for row in rows], scorer.labels)
    assert scores["f1"] == pytest.approx(fitted[1][-1]["test/f1"], abs=1e-9)
    # Many windows go through the model in several passes, answering the same (padded otherwise).
    monkeypatch.setattr(entities, "WINDOWS_PER_PASS", 3)
    for again, answer in zip(scorer(words[:40]), answers[:40], strict=True):
        assert again["tags"] == answer["tags"]
        assert [entity["score"] for entity in again["entities"]] == pytest.approx(
            [entity["score"] for entity in answer["entities"]], abs=1e-5
        )


def test_a_replica_has_loaded_what_its_first_answer_needs_before_it_is_ready(fitted) -> None:
    """The replica answers its type's example as it starts: the first request paid seqeval's import
    (with scikit-learn, about a second on a cold process)."""
    code = f"""
import sys
from components.serve import ClassifierApp
app = ClassifierApp({{"name": "m", "version": "1", "model_uri": {str(fitted[2])!r}}}, {{}}, None)
before = set(sys.modules)
app.scorer(["Peter Blackburn of the European Commission said on Thursday ."])
print(sorted(set(sys.modules) - before))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "[]", done.stdout[-2000:]
