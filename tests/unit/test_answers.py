"""Extractive question answering (components/tasks/answers.py): SQuAD's nested JSON read as rows,
windows of long contexts with the answer's tokens in each (WordPiece and byte-level BPE), n-best
spans over all windows of a context, SQuAD exact match and F1, the checks `ptft validate` makes,
the fine-tuning loop learning to answer in-process, the served answer and the registered model."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from components import accelerator, finetune, models, synthetic, training
from components import tokenize as tok
from components.data import load_source
from components.schemas import DeepSpeedConfig, FileSource, Hyperparameters, ModelConfig, TokenizeConfig
from components.tasks import answers, task_type
from components.vocab import special_ids
from pipelines.cli import main
from pipelines.pipeline_config import load_config
from tests.conftest import register_in_sqlite, shared, tiny_config_dict

QA = task_type("question_answering")
SEQ_LEN = 48


def _squad(split: str) -> pa.Table:
    source = FileSource(path=str(shared(f"data/squad/{split}.json")), text_column="context", label_column="answers")
    return load_source(source, labelled=True)


def test_squad_nested_json_reads_one_row_per_question() -> None:
    validation = _squad("validation")
    assert validation.num_rows == 1243  # the README's count
    assert set(validation.column_names) == {"text", "label", "question"}
    first = validation.slice(0, 1).to_pylist()[0]
    assert first["question"] == "What is the Chinese name for the Yuan dynasty?"
    assert first["label"]["text"][0] == "Yuán Cháo" and first["label"]["answer_start"][0] == 39
    QA.check_rows(validation, "validation")


def test_as_a_corpus_each_paragraph_is_read_once() -> None:
    document = json.loads(shared("data/squad/train.json").read_text())
    paragraphs = [p["context"] for article in document["data"] for p in article["paragraphs"]]
    corpus = load_source(FileSource(path=str(shared("data/squad/train.json")), text_column="context"), labelled=False)
    assert corpus.column("text").to_pylist() == paragraphs  # not once per question
    assert corpus.num_rows < _squad("train").num_rows / 3


@pytest.fixture(scope="module")
def squad_paragraphs() -> list[str]:
    corpus = load_source(FileSource(path=str(shared("data/squad/train.json")), text_column="context"), labelled=False)
    return corpus.column("text").to_pylist()


def _inside_a_word(context: str, start: int, end: int) -> bool:
    return (start > 0 and context[start - 1].isalnum() and context[start].isalnum()) or (
        end < len(context) and context[end - 1].isalnum() and context[end].isalnum()
    )


@pytest.mark.parametrize("algorithm", ["wordpiece", "bpe"])
def test_every_squad_answer_comes_back_from_its_token_span_in_a_window(
    squad_paragraphs: list[str], algorithm: str
) -> None:
    """Every reference answer of the validation split (1,982 distinct ones), windows of 192 tokens
    sharing 64: it lies whole in some window, and the characters of its start..end tokens are the
    answer itself, except where the answer starts or ends inside a word (WordPiece) or next to
    punctuation a byte-level BPE token joins to it."""
    config = TokenizeConfig(algorithm=algorithm, vocab_size=8000, seq_len=192)
    tokenizer = tok.train_tokenizer(squad_paragraphs, config)
    table = _squad("validation")
    contexts, references = table.column("text").to_pylist(), table.column("label").to_pylist()
    encoded = answers.windows(tokenizer, table.column("question").to_pylist(), contexts, 192, 64)
    recovered: dict[tuple[int, str, int], bool] = {}
    for window, row in enumerate(encoded["overflow_to_sample_mapping"]):
        offsets = answers.context_offsets(encoded, window)
        for text, start in answers.answers_of(references[row]):
            first, last = answers.answer_positions(offsets, start, start + len(text))
            if (first, last) != (0, 0):
                span = contexts[row][offsets[first][0] : offsets[last][1]].strip()
                recovered[row, text, start] = recovered.get((row, text, start), False) or span == text
    every = {(row, text, start) for row in range(table.num_rows) for text, start in answers.answers_of(references[row])}
    assert set(recovered) == every, "some answer lies whole in no window"
    missed = [key for key, exact in recovered.items() if not exact]
    if algorithm == "wordpiece":
        assert all(_inside_a_word(contexts[row], start, start + len(text)) for row, text, start in missed), missed
    assert len(missed) <= 0.02 * len(every), missed


def test_windows_are_labelled_with_the_answer_or_cls(tmp_path: Path) -> None:
    table = tok.with_row_numbers(_squad("validation").slice(0, 60))
    tokenizer = tok.train_tokenizer(table.column("text").to_pylist(), TokenizeConfig(vocab_size=800, seq_len=SEQ_LEN))
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    out = tok.tokenize_examples(
        table,
        tokenizer_dir=str(tmp_path / "tokenizer"),
        seq_len=SEQ_LEN,
        label_values=["start", "end"],
        task=QA.name,
        doc_stride=16,
    ).to_pylist()
    assert len(out) > 3 * table.num_rows, "contexts longer than a window are cut into several"
    assert {row["example"] for row in out} == set(range(table.num_rows))
    for row in out:
        start, end = row["label"]
        assert len(row["input_ids"]) == SEQ_LEN and len(row["offsets"]) == 2 * SEQ_LEN
        if (start, end) == (0, 0):  # the answer is not whole in this window: [CLS]
            continue
        first, last = row["offsets"][2 * start], row["offsets"][2 * end + 1]
        assert first <= row["context"].index(row["answers"][0], first) and last >= first, row
    answered = {row["example"] for row in out if row["label"] != [0, 0]}
    # An answer longer than the windows' overlap (16 tokens here) can straddle every window.
    assert len(answered) >= 0.9 * table.num_rows


def test_the_best_span_is_taken_over_all_windows_of_a_context() -> None:
    # Two windows of one context: token i covers characters 10*i .. 10*i+5; the first two tokens are the question's.
    offsets = [answers.NOT_CONTEXT] * 4 + [value for i in range(2, 8) for value in (10 * i, 10 * i + 5)]
    weak = ([3, 2], [1.0, 0.5], [3, 4], [1.0, 0.2])
    strong = ([5, 0], [3.0, 9.0], [6, 1], [2.0, 9.0])  # the question's tokens score highest, and are no answer
    assert answers.best_spans([weak, strong], [offsets, offsets]) == (5.0, 50, 65)
    backwards = ([6], [3.0], [5], [3.0])
    assert answers.best_spans([backwards], [offsets]) is None


def _tokenized_task(folder: Path, train_answers: list[list[str]], split: dict) -> str:
    """A tokenized task folder as the prepare stage writes it: train (only its answers are read when
    scoring) and validation."""
    for name, rows in (("train", {"answers": train_answers}), ("validation", split)):
        (folder / name).mkdir(parents=True)
        pq.write_table(pa.table(rows), folder / name / "part-0.parquet")
    return str(folder / "validation")


THE_CAT = "The cat sat on the mat."
TWO_ROWS = {
    "example": [0, 1],
    "offsets": [[0, 3, 4, 7, 8, 11, -1, -1], [12, 14, 15, 18, 19, 23, -1, -1]],
    "context": [THE_CAT, THE_CAT],
}


def test_exact_match_and_f1_follow_the_official_normalisation(tmp_path: Path) -> None:
    split = {**TWO_ROWS, "answers": [["the cat"], ["the mat", "mat"]]}
    folder = _tokenized_task(tmp_path, [["a"]], split)
    # Row 0 picks "The cat" (tokens 0-1), row 1 picks "the" (token 1): one exact, one half right.
    # [CLS]'s score (last) beats both, but a model never taught that a question may have no answer ignores it.
    guesses = [[0, 9.0, 1, 9.0, 99.0], [1, 9.0, 1, 9.0, 99.0]]
    scores = QA.scores([[0], [1]], guesses, ["start", "end"], folder)
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(0.5)  # "the" normalises to nothing: F1 0 against "mat"
    assert QA.model_settings(str(tmp_path)) == {}


def test_unanswerable_questions_are_learned_and_scored_as_squad_2_does(tmp_path: Path) -> None:
    """A train split with questions that have no answer (SQuAD 2.0): the model is told so, answers ""
    where [CLS] outscores every span, and such a question counts as right only when answered so."""
    split = {**TWO_ROWS, "answers": [["the cat"], []]}  # the second has no answer
    folder = _tokenized_task(tmp_path, [["a"], []], split)
    assert QA.model_settings(str(tmp_path)) == {"unanswerable": True}
    both_spans = [[0, 9.0, 1, 9.0, 1.0], [2, 9.0, 2, 9.0, 1.0]]  # spans beat [CLS]: "The cat", "mat."
    assert QA.scores([[0], [1]], both_spans, ["start", "end"], folder)["exact_match"] == pytest.approx(0.5)
    none_wins = [[0, 9.0, 1, 9.0, 1.0], [2, 9.0, 2, 9.0, 30.0]]  # [CLS] beats the second's span: ""
    assert QA.scores([[0], [1]], none_wins, ["start", "end"], folder) == {"exact_match": 1.0, "f1": 1.0}
    always_none = [[0, 9.0, 1, 9.0, 30.0], [2, 9.0, 2, 9.0, 30.0]]
    assert QA.scores([[0], [1]], always_none, ["start", "end"], folder)["exact_match"] == pytest.approx(0.5)
    assert answers.answer_or_none((5.0, 0, 3), 6.0, may_have_none=False) == (5.0, 0, 3)
    assert answers.answer_or_none((5.0, 0, 3), 6.0, may_have_none=True) is None


def _qa_config(tmp_path: Path, splits: dict[str, list[dict]], **serve) -> Path:
    task = {"type": "question_answering"}
    for split, rows in splits.items():
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        task[split] = {"type": "file", "path": str(path), "text_column": "context", "label_column": "answers"}
    config = tiny_config_dict(tmp_path / "store")
    config["data"]["task"] = task
    config["serve"] = {**config.get("serve", {}), **serve}
    path = tmp_path / "qa.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _question(context: str, answer: str, start: int | None = None) -> dict:
    where = context.index(answer) if start is None else start
    return {"question": "what?", "context": context, "answers": {"text": [answer], "answer_start": [where]}}


def test_validate_names_answers_that_are_not_where_they_say(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [_question(f"the plot was dull , said anna {i} .", "anna") for i in range(64)]
    rows[3]["answers"] = {"text": [], "answer_start": []}  # unanswerable (SQuAD 2.0): allowed
    good = _qa_config(tmp_path, {"train": rows, "validation": rows[:4], "test": rows[:4]})
    assert main(["validate", str(good)]) == 0, capsys.readouterr().err
    config = load_config(good)
    assert config.tune.metric == "eval/f1" and config.serve.sample_texts == [QA.example]
    moved = [_question("the plot was dull , said anna .", "anna", start=3)]
    bad = _qa_config(tmp_path, {"train": rows, "validation": moved, "test": rows[:4]})
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "data.task.validation" in err and "the answer 'anna' is not at character 3" in err
    assert "Traceback" not in err
    strings = _qa_config(tmp_path, {"train": rows, "validation": rows[:4], "test": rows[:4]}, sample_texts=["hi"])
    assert main(["validate", str(strings)]) == 2
    assert "serve.sample_texts" in (err := capsys.readouterr().err) and "answers questions" in err


# --- the fine-tuning loop: who wrote a review, and what they called it -------------------------------


def _reviews(count: int, seed: int) -> list[dict]:
    """Questions about the toy language's reviews (synthetic entities rows): the reviewer's name, or
    the adjective that judges the film."""
    rows = []
    for index, row in enumerate(synthetic.generate("train", count, seed=seed, task="entities")):
        context = " ".join(row["text"])
        wanted = ("PER",) if index % 2 else ("POS", "NEG")
        words = [word for word, tag in zip(row["text"], row["label"], strict=True) if tag.endswith(wanted)]
        answer = " ".join(words) if index % 2 else words[0]
        question = "who wrote this review ?" if index % 2 else "what did the reviewer call it ?"
        rows.append({**_question(context, answer), "question": question})
    return rows


def _windows(table: pa.Table, tokenizer_dir: Path, doc_stride: int) -> pa.Table:
    """The rows tokenized as the prepare stage does, in windows of 32 tokens."""
    return tok.tokenize_examples(
        table,
        tokenizer_dir=str(tokenizer_dir),
        seq_len=32,
        label_values=["start", "end"],
        task=QA.name,
        doc_stride=doc_stride,
    )


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A randomly initialised tiny BERT, a WordPiece tokenizer, and the splits tokenized as the
    prepare stage does (windows of 32 tokens); one process rank."""
    environment, threads = dict(os.environ), torch.get_num_threads()
    accelerator.prepare_process(use_gpu=False, num_threads=1)
    training.ensure_process_group()  # kept for the process's life (see test_entities.py)
    folder = tmp_path_factory.mktemp("reviews")
    splits = {"train": _reviews(512, 0), "validation": _reviews(64, 1), "test": _reviews(64, 2)}
    texts = [row["question"] + " " + row["context"] for row in splits["train"]]
    tokenizer = tok.train_tokenizer(texts, TokenizeConfig(vocab_size=300, seq_len=32))
    tokenizer.save_pretrained(folder / "pretrained")
    for split, rows in splits.items():
        table = tok.with_row_numbers(
            pa.table(
                {
                    "text": [row["context"] for row in rows],
                    "label": [row["answers"] for row in rows],
                    "question": [row["question"] for row in rows],
                }
            )
        )
        QA.check_rows(table, split)
        (folder / "task" / split).mkdir(parents=True)
        out = _windows(table, folder / "pretrained", doc_stride=8)
        pq.write_table(out, folder / "task" / split / "part-0.parquet")
    model = models.build_lm(
        ModelConfig(family="bert"), vocab_size=len(tokenizer), special_ids=special_ids(tokenizer), seed=0
    )
    model.save_pretrained(folder / "pretrained")
    yield folder
    os.environ.clear()
    os.environ.update(environment)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted(reviews: Path) -> tuple[list[dict], Path]:
    reports = []

    def report(metrics: dict, checkpoint_dir: str) -> None:
        reports.append(metrics)
        if (Path(checkpoint_dir) / "hf").is_dir():
            shutil.copytree(Path(checkpoint_dir) / "hf", reviews / "exported")

    run = finetune.ClassifierRun(
        pretrained_dir=str(reviews / "pretrained"),
        task_dir=str(reviews / "task"),
        label_names=["start", "end"],
        # 3e-3 over 5 epochs: 26 runs over model and data seeds and PYTHONHASHSEED (the trained
        # vocabulary's ties differ between processes) all reached F1 1.0 by epoch 4. At 5e-3 over 4
        # epochs one seed in 15 ended at 0.91, and a CI run at 0.80.
        epochs=5,
        hyper=Hyperparameters(learning_rate=3e-3, batch_size_per_worker=16, dropout=0.0),
        deepspeed=DeepSpeedConfig(),
        threads=1,
        log_every=50,
        export=True,
        task_type=QA.name,
    )
    finetune.fit_classifier(run, report=report)
    return reports, reviews / "exported"


def test_fine_tuning_learns_to_answer_and_exports_a_question_answering_model(fitted) -> None:
    reports, exported = fitted
    first, last = reports[0], reports[-1]
    assert last["eval/loss"] < first["eval/loss"]
    assert last["eval/f1"] > 0.9 and last["eval/exact_match"] > 0.8, last
    assert 0.8 < last["test/f1"] <= 1 and "test/f1" not in first
    assert models.smoke_test(exported, QA.auto_model)["parameters"] > 0


def test_the_run_summary_says_when_a_question_got_no_answer() -> None:
    from pipelines.stages.serve import Sample

    asked = {"question": "who?", "context": "a film ."}
    assert Sample(text=asked, score=0.42, answer="").answer() == "no answer (0.420)"
    assert Sample(text=asked, score=0.9, answer="a film").answer() == "'a film' (0.900)"


def test_a_served_model_reads_a_context_in_the_windows_it_was_trained_on(reviews: Path) -> None:
    """Serving cut contexts into windows of the model's whole length with a quarter shared, whatever
    the training's windows were (squad_qa.yaml: 192 tokens, 64 shared; served with 48 shared): one
    of the reasons `ptft predict` on the test split scored F1 0.0942 where fine-tuning reported 0.0956."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reviews / "pretrained")
    row = _reviews(1, 3)[0]
    context = " ".join([row["context"]] * 12)  # many windows
    table = tok.with_row_numbers(pa.table({"text": [context], "label": [[]], "question": [row["question"]]}))
    trained = _windows(table, reviews / "pretrained", doc_stride=12)
    config = AutoConfig.from_pretrained(reviews / "pretrained")
    for key, value in QA.model_settings(str(reviews / "task"), seq_len=32, doc_stride=12).items():
        setattr(config, key, value)
    served = answers.windows(tokenizer, [row["question"]], [context], *answers.served_window(config, max_tokens=512))
    unpadded = [
        [t for t, keep in zip(ids, mask, strict=True) if keep]
        for ids, mask in zip(
            trained.column("input_ids").to_pylist(), trained.column("attention_mask").to_pylist(), strict=True
        )
    ]
    assert len(unpadded) > 3 and served["input_ids"] == unpadded


def test_the_served_answers_to_a_split_score_what_evaluation_scored(fitted, reviews: Path, tmp_path: Path) -> None:
    """Long contexts, several windows each: evaluation picks a question's span over its windows by
    start plus end logit; serving picked it by log-probability, each window's softmax its own, so
    some answers differed, and `ptft predict` on a split did not score what evaluation had."""
    from components.scoring import Scorer

    filler = "the music was loud , said noah . "
    rows = [{**row, "context": filler * (index % 4) + row["context"]} for index, row in enumerate(_reviews(48, 5))]
    rows = [_question(row["context"], row["answers"]["text"][0]) | {"question": row["question"]} for row in rows]
    table = tok.with_row_numbers(
        pa.table(
            {
                "text": [r["context"] for r in rows],
                "label": [r["answers"] for r in rows],
                "question": [r["question"] for r in rows],
            }
        )
    )
    windowed = _windows(table, reviews / "pretrained", doc_stride=8)
    for split in ("train", "test"):  # scoring reads the train split's answers (may a question have none)
        (tmp_path / "task" / split).mkdir(parents=True)
        pq.write_table(windowed, tmp_path / "task" / split / "part-0.parquet")
    scorer = Scorer(str(fitted[1]), tracking_uri=None)
    scorer.model.config.window_tokens, scorer.model.config.doc_stride = 32, 8  # as fine-tuning keeps them
    with torch.no_grad():
        logits = answers._start_end_logits(
            scorer.model(
                input_ids=torch.tensor(windowed.column("input_ids").to_pylist()),
                attention_mask=torch.tensor(windowed.column("attention_mask").to_pylist()),
            )
        )
    gold, guessed = zip(*(QA.evaluated(None, logits[row], None, row) for row in range(windowed.num_rows)), strict=True)
    evaluated = QA.scores(list(gold), list(guessed), ["start", "end"], str(tmp_path / "task" / "test"))
    asked = [{"question": r["question"], "context": r["context"]} for r in rows]
    served = QA.score_answers(scorer(asked), [r["answers"] for r in rows], [])
    assert windowed.num_rows > 2 * len(rows) and 0 < evaluated["f1"] < 1, evaluated
    assert served == evaluated


def test_a_model_keeps_unanswerable_questions_and_its_windows_in_its_config(reviews: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    shutil.copytree(reviews / "task", tmp_path / "task")
    (train_file,) = (tmp_path / "task" / "train").glob("*.parquet")
    train = pq.read_table(train_file)
    unanswered = [[] if row == 0 else answers for row, answers in enumerate(train.column("answers").to_pylist())]
    pq.write_table(train.set_column(train.schema.get_field_index("answers"), "answers", [unanswered]), train_file)
    run = finetune.ClassifierRun(
        pretrained_dir=str(reviews / "pretrained"),
        task_dir=str(tmp_path / "task"),
        label_names=["start", "end"],
        epochs=1,
        hyper=Hyperparameters(batch_size_per_worker=16),
        deepspeed=DeepSpeedConfig(),
        task_type=QA.name,
        task_options={"seq_len": 32, "doc_stride": 8},
    )
    engine = finetune._setup_engine(run, AutoTokenizer.from_pretrained(reviews / "pretrained"), 1, log_inherited=False)
    engine.module.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (saved["unanswerable"], saved["window_tokens"], saved["doc_stride"]) == (True, 32, 8)


def test_the_served_answer_is_a_span_of_the_context_over_all_windows(fitted) -> None:
    from components.scoring import Scorer

    scorer = Scorer(str(fitted[1]), tracking_uri=None)
    assert scorer.task is QA
    filler = "the music was loud , said noah . " * 12  # many windows before the answer
    asked = [
        {"question": "who wrote this review ?", "context": "the plot was dull , said jonas evans ."},
        {"question": "what did the reviewer call it ?", "context": filler + "the sequel was clumsy ."},
        {"question": "what did the reviewer call it ? " * 40, "context": "the dialogue was tedious ."},
    ]
    found = scorer(asked)
    for item, answer in zip(asked, found, strict=True):
        assert item["context"][answer["start"] : answer["end"]] == answer["answer"] and 0 < answer["score"] <= 1
    assert "jonas" in found[0]["answer"]
    assert not hasattr(scorer.model.config, "unanswerable")  # its train split had no question without an answer
    scorer.model.config.unanswerable = True  # as if it had: "" where [CLS] outscores the spans, else a span
    for item, answer in zip(asked, scorer(asked), strict=True):
        assert item["context"][answer["start"] : answer["end"]] == answer["answer"] and 0 < answer["score"] <= 1
    tokens = scorer.tokenizer
    windows = answers.windows(tokens, [asked[1]["question"]], [asked[1]["context"]], scorer.max_tokens, 8)
    assert len(windows["input_ids"]) > 3  # read in windows; best_spans picks over them (tested above)
    assert [answer["truncated"] for answer in found] == [False, False, True]
    assert QA.input_problem([asked[0]]) is None and "answers questions" in QA.input_problem(["a plain text"])
    assert "texts.0.question is empty" in QA.input_problem([{"question": " ", "context": "a film ."}])
    assert "texts.0.context is empty" in QA.input_problem([{"question": "who?", "context": ""}])
    (explained,) = scorer.explain([asked[0]])
    # The map of the likeliest answer start: a token of the context, attended over question and context.
    assert explained["label"] == "answer start" and explained["query_token"] in explained["tokens"]
    assert "who" in explained["tokens"] and "jonas" in " ".join(explained["tokens"])
    assert len(explained["attention"][0]) == len(explained["tokens"]) and 0 < explained["score"] <= 1


def test_the_attention_map_of_a_long_context_is_of_the_window_its_answer_comes_from(fitted) -> None:
    """`/explain` and `ptft explain` show the window that serving read the answer from, cut as
    serving cuts it: not the context's first tokens, which may not hold the answer."""
    from components.scoring import Scorer

    scorer = Scorer(str(fitted[1]), tracking_uri=None)
    asked = [  # many windows before the review's own sentence
        {"question": "what did the reviewer call it ?", "context": "said noah . " * 30 + "the sequel was clumsy ."},
        {"question": "what did the reviewer call it ?", "context": ". " * 90 + "the sequel was clumsy ."},
        {"question": "who wrote this review ?", "context": "the plot . " * 30 + "said jonas evans ."},
    ]
    length, stride = answers.served_window(scorer.model.config, scorer.max_tokens)
    later = []
    for item, answer, explained in zip(asked, scorer(asked), scorer.explain(asked), strict=True):
        cut = answers.windows(scorer.tokenizer, [item["question"]], [item["context"]], length, stride)
        spans = [
            [s for s in answers.context_offsets(cut, w) if s[0] != answers.NOT_CONTEXT]
            for w in range(len(cut["input_ids"]))
        ]
        holding = [w for w, span in enumerate(spans) if span[0][0] <= answer["start"] and answer["end"] <= span[-1][1]]
        assert explained["tokens"] in [scorer.tokenizer.convert_ids_to_tokens(cut["input_ids"][w]) for w in holding]
        assert explained["text"] == item and explained["label"] == "answer start"
        later.append(holding[0] > 0)
    assert any(later), "some answer lies past the first window, which the map used to show"


def test_the_registered_model_answers_through_mlflow(fitted, tmp_path: Path) -> None:
    """transformers 5 has no question-answering pipeline: the version is a pyfunc around the folder."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from components.scoring import Scorer

    uri, version = register_in_sqlite(fitted[1], tmp_path, "reviews-qa", QA, 0.9, "synthetic")
    assert MlflowClient(uri).get_model_version("reviews-qa", version["version"]).tags["ptft.test_f1"] == "0.900000"
    question = {"question": "who wrote this review ?", "context": "the plot was dull , said jonas evans ."}
    served = Scorer(version["model_uri"], uri)([question])[0]
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(version["model_uri"]).predict(pd.DataFrame([question]))
    assert loaded[0]["answer"] == served["answer"] and "jonas" in served["answer"]


def test_ptft_explain_takes_questions_with_a_context(fitted, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = [str(fitted[1]), "who wrote this review ?", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    assert main(["explain", *common, "--context", "the plot was dull , said jonas evans .", "--json"]) == 0
    (explained,) = json.loads(capsys.readouterr().out)["explanations"]
    assert explained["label"] == "answer start" and explained["text"]["question"] == "who wrote this review ?"
    assert main(["explain", *common]) == 2  # a question without its context
    assert "--context" in (err := capsys.readouterr().err) and "answers questions" in err
