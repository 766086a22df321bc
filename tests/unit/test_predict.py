"""`ptft predict` without Ray: its checks (exit 2 before Ray starts), the actors' batch function, and
the output files. The run on a cluster is in tests/integration/test_serving.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components import data
from components.batch_predict import PREDICTION, BatchScorer
from components.scoring import Scorer
from pipelines import cli, predict
from tests.conftest import REPO, register_in_sqlite, small_disk, tiny_classifier

REVIEWS = ["the film was good .", "a dull , tedious plot .", "superb and moving", "not very great"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_classifier(tmp_path_factory.mktemp("predict") / "model", seed=0)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _predict(model: Path, source: Path, output: Path, *options: str) -> int:
    config = str(REPO / "configs" / "demo.yaml")
    storage = str(output.parent / "storage")
    return cli.main(
        [
            "predict",
            str(model),
            str(source),
            "--output",
            str(output),
            "--config",
            config,
            "--storage",
            storage,
            *options,
        ]
    )


BAD_INPUTS = {  # case: (the input's rows or None for no file, the output's suffix, the key named, why)
    "no such file": (None, ".jsonl", "INPUT", "no such file"),
    "a label the model does not have": (
        [{"text": "good", "label": "positive"}, {"text": "bad", "label": "neg"}],
        ".jsonl",
        "--label-column = 'label'",
        "holds labels the model does not have: 'neg' (its labels: negative, positive)",
    ),
    "a row without its label": (
        [{"text": "good", "label": 1}, {"text": "bad", "label": None}],
        ".jsonl",
        "--label-column = 'label'",
        "1 row(s) have no expected value, the first is row 2",
    ),
    "a column the model reads is missing": (
        [{"id": 1, "review": "good"}],
        ".jsonl",
        "--text-column = 'text'",
        "has no column 'text'; its columns: id, review",
    ),
    "numbers where texts belong": (
        [{"text": 3}, {"text": 4}],
        ".jsonl",
        "--text-column = 'text'",
        "holds int64 values",
    ),
    "a row without a text": (
        [{"text": "good"}, {"text": None}, {"text": "bad"}],
        ".jsonl",
        "--text-column = 'text'",
        "1 row(s) have no text, the first is row 2",
    ),
    "a column the output would add": ([{"text": "good", PREDICTION: "x"}], ".jsonl", "INPUT", "already has a column"),
    "an output format it cannot write": ([{"text": "good"}], ".xlsx", "--output", "not one of"),
    "lists where CSV holds texts": (
        [{"text": "good", "tags": ["a", "b"]}],
        ".csv",
        "--output",
        "write .jsonl or .parquet",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_bad_input_exits_2_naming_it_before_ray_starts(
    case: str, model: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (an xdist worker may hold a Ray connection of an earlier test: ray.is_initialized() says nothing)
    monkeypatch.setattr(predict, "_start_ray", lambda *_: pytest.fail("Ray was started"))
    rows, suffix, key, why = BAD_INPUTS[case]
    source = tmp_path / "in.jsonl"
    if rows is not None:
        _jsonl(source, rows)
    assert _predict(model, source, tmp_path / f"out{suffix}", "--label-column", "label") == 2
    err = capsys.readouterr().err
    assert key in err and why in err, err
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_an_existing_output_is_kept_without_force(model: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "out.jsonl"
    output.write_text("earlier predictions\n")
    assert _predict(model, _jsonl(tmp_path / "in.jsonl", [{"text": "good"}]), output) == 2
    assert "--output" in capsys.readouterr().err
    assert output.read_text() == "earlier predictions\n"


def test_the_actors_batch_function_answers_as_the_served_model(model: Path) -> None:
    """A worker's answers are the Scorer's (what POST /predict answers), in the batch's order, and
    read the named column."""
    batch = pa.table({"id": list(range(len(REVIEWS))), "review": REVIEWS})
    answered = BatchScorer(str(model), None, {"text": "review"})(batch)
    assert [json.loads(answer) for answer in answered[PREDICTION]] == Scorer(str(model), None)(REVIEWS)


def _question_answering_model(folder: Path) -> Path:
    from transformers import AutoConfig, AutoTokenizer, BertForQuestionAnswering

    source = tiny_classifier(folder.parent / f"{folder.name}-source", seed=3)
    BertForQuestionAnswering(AutoConfig.from_pretrained(source)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def test_a_question_answering_model_reads_a_question_and_a_context_column(tmp_path: Path) -> None:
    _question_answering_model(tmp_path / "qa")
    batch = pa.table({"q": ["what film", "what plot"], "passage": ["a good film", "a dull plot"]})
    inputs = {"question": "q", "context": "passage"}
    answered = [json.loads(answer) for answer in BatchScorer(str(tmp_path / "qa"), None, inputs)(batch)[PREDICTION]]
    asked = [{"question": "what film", "context": "a good film"}, {"question": "what plot", "context": "a dull plot"}]
    assert answered == Scorer(str(tmp_path / "qa"), None)(asked)
    assert (
        predict._inputs({"question": "", "context": ""}, _options(question_column="q", context_column="passage"))
        == inputs
    )


@pytest.mark.parametrize("kind", ["sequence_classification", "question_answering"])
def test_a_registered_model_is_checked_whichever_way_mlflow_logged_it(
    kind: str, model: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A classifier is logged in MLflow's transformers flavor; a question-answering model (as a
    translation or generation one) as a pyfunc around its folder, where the config lies elsewhere.
    The checks read either's config and name the column the input lacks, not the model."""
    from components.tasks import task_type

    monkeypatch.setattr(predict, "_start_ray", lambda *_: pytest.fail("Ray was started"))
    folder = model if kind == "sequence_classification" else _question_answering_model(tmp_path / "qa")
    uri, version = register_in_sqlite(folder, tmp_path / "storage", "m", task_type(kind), 0.9, "s")
    assert predict._model_and_task(version["model_uri"], uri)[1].name == kind
    source = _jsonl(tmp_path / "in.jsonl", [{"review": "a good film"}])
    assert _predict(version["model_uri"], source, tmp_path / "out.jsonl") == 2
    err = capsys.readouterr().err
    assert "has no column" in err and "MODEL" not in err, err


def _options(**values):
    import argparse

    return argparse.Namespace(
        **{"text_column": "text", "question_column": "question", "context_column": "context", **values}
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv", ".tsv"])
def test_the_output_is_the_input_with_each_rows_prediction(suffix: str, tmp_path: Path) -> None:
    table = pa.table({"id": [1, 2, 3], "text": ["a", "b, with a comma", "c"]})
    answers = [
        {"label": "positive", "score": 0.75, "truncated": False},
        {"label": "negative", "score": 0.5, "truncated": True},
        {"label": "positive", "score": 1.0, "truncated": False},
    ]
    output = tmp_path / f"out{suffix}"
    predict._write(output, table, [answers[:2], answers[2:]])
    back = data.read_table(str(output))
    assert (
        back.column("id").to_pylist() == [1, 2, 3]
        and back.column("text").to_pylist() == table.column("text").to_pylist()
    )
    written = back.column(PREDICTION).to_pylist()
    assert [json.loads(answer) if isinstance(answer, str) else answer for answer in written] == answers
    assert [path.name for path in tmp_path.iterdir()] == [output.name]


def test_a_failed_write_keeps_the_earlier_output_and_leaves_no_partial_file(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    pq.write_table(pa.table({"earlier": [1]}), output)
    with pytest.raises(ValueError, match="1 answers for 2 rows"):
        predict._write(output, pa.table({"text": ["a", "b"]}), [[{"label": "x"}]])
    assert pq.read_table(output).column_names == ["earlier"]
    assert [path.name for path in tmp_path.iterdir()] == [output.name]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_an_output_on_a_full_disk_names_that_disk_and_the_file(
    suffix: str, model: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write to an open file raises ENOSPC without a file name, which named the working
    directory's disk instead of the output's."""
    import random

    rows = 40_000  # texts of random hex digits, which no compression shrinks below 1 MB
    monkeypatch.setattr(predict, "_start_ray", lambda *_: 1)
    answer = {"label": "positive", "score": 0.5, "truncated": False}
    monkeypatch.setattr(
        predict, "_answers", lambda job, uri, args, workers: ([answer] * 1000 for _ in range(rows // 1000))
    )
    texts = random.Random(0).randbytes(32 * rows).hex()
    source = _jsonl(tmp_path / "in.jsonl", [{"text": texts[i * 64 : (i + 1) * 64]} for i in range(rows)])
    with small_disk(tmp_path / "disk", "1M") as disk:
        output = disk / f"out{suffix}"
        storage = tmp_path / "storage"  # its log elsewhere: only the output fills the disk
        options = ["--config", str(REPO / "configs" / "demo.yaml"), "--storage", str(storage)]
        assert cli.main(["predict", str(model), str(source), "--output", str(output), *options]) == 1
        assert not list(disk.iterdir())  # no partial file left filling it
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"ptft predict: out of disk space on {disk} ("), last
    assert last.endswith(f"writing {output}. Free space there, then run the command again"), last  # no run to resume


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_answers_are_on_disk_before_the_next_batch_is_asked_for(suffix: str, tmp_path: Path) -> None:
    """The driver holds no file's worth of answers: each batch is written as it comes."""
    output = tmp_path / f"out{suffix}"
    partial = tmp_path / f".{output.name}.partial"
    table = pa.table({"text": [f"review {i}" for i in range(6)]})
    sizes = []

    def batches():
        for _ in range(3):
            yield [{"label": "positive", "score": 0.5}] * 2
            sizes.append(partial.stat().st_size)  # asked for the next batch: this one is written

    predict._write(output, table, batches())
    assert sizes[0] > 0 and sizes[0] < sizes[1] < sizes[2] <= output.stat().st_size, sizes


def test_a_parquet_answer_field_that_takes_its_type_only_in_a_later_batch_is_kept(tmp_path: Path) -> None:
    """Parquet's schema comes first: an empty list of entities or a missing answer in early batches
    takes the type that later ones give it, and a field only some answers have is null elsewhere."""
    early = [{"entities": [], "answer": None, "score": 1}] * predict.PARQUET_CHUNK_ROWS
    late = [{"entities": [{"type": "PER", "start": 0, "end": 5, "score": 0.5}], "answer": "Ada", "score": 0.25}]
    table = pa.table({"id": range(len(early) + 2)})
    output = tmp_path / "out.parquet"
    predict._write(output, table, [early, late, [{"score": 0.5, "extra": [1]}]])
    written = pq.read_table(output).column(PREDICTION)
    assert written.type.field("entities").type.value_type.field("type").type == pa.string()
    assert written[0].as_py() == {"entities": [], "answer": None, "score": 1.0, "extra": None}
    assert written[-2].as_py() == {**late[0], "extra": None}
    assert written[-1].as_py() == {"entities": None, "answer": None, "score": 0.5, "extra": [1]}


def test_answers_are_kept_only_when_they_are_to_be_scored(tmp_path: Path) -> None:
    table = pa.table({"text": ["a", "b", "c"]})
    batches = [[{"label": "x"}, {"label": "y"}], [{"label": "z"}]]
    assert predict._write(tmp_path / "kept.jsonl", table, batches, keep=True) == [*batches[0], *batches[1]]
    assert predict._write(tmp_path / "not.jsonl", table, batches) == []
    with pytest.raises(ValueError, match="4 answers for 3 rows"):
        predict._write(tmp_path / "more.jsonl", table, [*batches, [{"label": "w"}]])


def test_a_large_file_goes_to_the_workers_in_blocks_of_many_batches() -> None:
    """A block a batch cost Ray a task and an object per 32 rows: 12,500 for 400,000 rows."""
    from components.batch_predict import BLOCKS_PER_WORKER, MOST_ROWS_A_BLOCK, block_rows

    assert block_rows(400_000, 32, 2) == MOST_ROWS_A_BLOCK
    assert block_rows(5_000, 32, 2) == 320 and -(-5_000 // 320) == 2 * BLOCKS_PER_WORKER  # each worker 8
    assert block_rows(100, 32, 2) == 32  # a batch at least
    assert block_rows(400_000, 4 * MOST_ROWS_A_BLOCK, 2) == 4 * MOST_ROWS_A_BLOCK  # a batch is never cut
    assert all(block_rows(rows, 48, 3) % 48 == 0 for rows in (1, 47, 1_000, 10**6))


def test_answers_are_scored_against_expected_values_as_each_task_type_reads_them() -> None:
    """Classification: an integer is a label id (rt-polarity's 0/1 for a model that names them);
    question answering: SQuAD's answers in either form, or texts; translation: reference texts."""
    from components.tasks import task_type

    labels = ["negative", "positive"]
    answered = [{"label": "positive"}, {"label": "negative"}, {"label": "positive"}, {"label": "positive"}]
    scores = task_type("sequence_classification").score_answers(answered, [1, 0, "negative", "positive"], labels)
    assert scores["accuracy"] == pytest.approx(0.75)
    assert scores["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)  # negative: P 1, R 1/2; positive: P 2/3, R 1

    spans = [{"answer": "the red ball"}, {"answer": "a cat"}, {"answer": None}, {"answer": "Paris"}]
    expected = [
        [{"text": "the red ball", "answer_start": 4}],
        {"text": ["the cat", "cat"], "answer_start": [0, 4]},
        {"text": [], "answer_start": []},  # no answer: right when answered with none
        ["Paris", "paris"],
    ]
    scores = task_type("question_answering").score_answers(spans, expected, [])
    assert scores == {"exact_match": pytest.approx(1.0), "f1": pytest.approx(1.0)}  # SQuAD drops articles
    scores = task_type("question_answering").score_answers([{"answer": "red ball"}], ["the blue ball"], [])
    assert scores == {"exact_match": 0.0, "f1": pytest.approx(0.5)}

    translated = [{"translation": "ein Hund läuft durch das Gras ."}, {"translation": "zwei Männer spielen"}]
    references = ["ein Hund läuft durch das Gras .", "zwei Männer spielen"]
    scores = task_type("translation").score_answers(translated, references, [])
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    worse = task_type("translation").score_answers([{"translation": "ein Hund"}, translated[1]], references, [])
    assert worse["bleu"] < 100 and worse["chrf"] < 100


@pytest.fixture(scope="module")
def tagger(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tagger on the tiny classifier's encoder config: its tags are what they are; the
    words, the counting and the record are what is tested."""
    from transformers import AutoConfig, AutoTokenizer, BertForTokenClassification

    folder = tmp_path_factory.mktemp("tagger")
    config = AutoConfig.from_pretrained(model)
    config.id2label = dict(enumerate(["B-PER", "I-PER", "O"]))
    config.label2id = {name: number for number, name in config.id2label.items()}
    BertForTokenClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model).save_pretrained(folder)
    return folder


CONLL_ROWS = [  # tag ids in the model's label order, as a Hugging Face export of CoNLL holds them
    {"tokens": ["Peter", "Blackburn", "said", "so"], "ner_tags": [0, 1, 2, 2]},
    {"tokens": ["good", "film"], "ner_tags": [2, 2]},
]

TAGGER_INPUTS = {  # case: (the rows, the key named, why)
    "texts, not words": (
        [{"text": "EU rejects it", "label": "B-ORG O O"}],
        "--label-column = 'label'",
        "a tagger is scored word by word: its words must be a list per row, as the tags are",
    ),
    "a tag per word missing": (
        [{"text": ["Peter", "Blackburn", "said"], "label": ["B-PER", "I-PER"]}],
        "--label-column = 'label'",
        "row 1 has 3 words in 'text' but 2 tags",
    ),
    "a tag the model does not have": (
        [{"text": ["EU", "rejects"], "label": ["B-ORG", "O"]}],
        "--label-column = 'label'",
        "holds labels the model does not have: 'B-ORG' (its labels: B-PER, I-PER, O)",
    ),
}


@pytest.mark.parametrize("case", TAGGER_INPUTS)
def test_a_tagger_is_scored_only_on_words_with_a_tag_each(
    case: str, tagger: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, key, why = TAGGER_INPUTS[case]
    monkeypatch.setattr(predict, "_start_ray", lambda *_: pytest.fail("Ray started"))
    assert _predict(tagger, _jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", "--label-column", "label") == 2
    err = capsys.readouterr().err
    assert f"{key}: {why}" in err, err


def test_a_conll_file_is_tagged_word_by_word_and_scored_with_its_tag_confusions(
    tagger: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from components.tasks import task_type

    _answered_in_process(monkeypatch)
    output = tmp_path / "tagged.jsonl"
    source = _jsonl(tmp_path / "conll.jsonl", CONLL_ROWS)
    options = ("--text-column", "tokens", "--label-column", "ner_tags")
    assert _predict(tagger, source, output, *options) == 0
    answers = [json.loads(line)[PREDICTION] for line in output.read_text().splitlines()]
    assert [len(answer["tags"]) for answer in answers] == [4, 2]
    expected = task_type("token_classification").score_answers(
        answers, [row["ner_tags"] for row in CONLL_ROWS], ["B-PER", "I-PER", "O"]
    )
    out = capsys.readouterr().out
    assert f"f1 {expected['f1']:.4f}" in out and f"accuracy {expected['accuracy']:.4f}" in out, out
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'storage' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id], "tags.`ptft.kind` = 'predict'")
    assert run.data.metrics["predict/f1"] == pytest.approx(expected["f1"])
    plots = Path(client.download_artifacts(run.info.run_id, "plots", str(tmp_path)))
    confusion = json.loads((plots / "confusion_matrix.json").read_text())
    truth = ["B-PER", "I-PER", "O", "O", "O", "O"]  # every word's, the ids read as the model's tags
    said = [tag for answer in answers for tag in answer["tags"]]
    assert confusion["rows_true_columns_predicted"] == [
        [sum(t == true and s == tag for t, s in zip(truth, said, strict=True)) for tag in confusion["labels"]]
        for true in confusion["labels"]
    ]


def _answered_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows answered here by the model a worker would load: Ray's part is the cluster test's."""
    monkeypatch.setattr(predict, "_start_ray", lambda config, rows, args: 1)
    monkeypatch.setattr(
        predict,
        "_answers",
        lambda job, uri, args, workers: (
            batch for batch in [Scorer(job.model.model_uri, uri)(job.table.column(job.inputs["text"]).to_pylist())]
        ),
    )


def test_scores_are_recorded_as_an_mlflow_run_with_the_scored_rows(
    model: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model folder's scores go to the config's experiment (the demo's, in the storage's own
    store): the model, the file and its columns, each score, the output file and, a classifier's,
    the confusion matrix."""
    import mlflow

    _answered_in_process(monkeypatch)
    rows = [{"text": text, "label": i % 2} for i, text in enumerate(REVIEWS)]
    output = tmp_path / "scored.jsonl"
    assert _predict(model, _jsonl(tmp_path / "reviews.jsonl", rows), output, "--label-column", "label") == 0
    out = capsys.readouterr().out
    printed = dict(pair.rsplit(" ", 1) for pair in out.split("rows): ")[1].splitlines()[0].split(", "))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'storage' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id], "tags.`ptft.kind` = 'predict'")
    assert f"Recorded as MLflow run {run.info.run_id}: http://127.0.0.1:5000/#/experiments/" in out
    assert run.info.status == "FINISHED" and run.info.run_name == "predict-reviews.jsonl"
    assert run.data.tags["ptft.model_uri"] == str(model) and run.data.tags["ptft.model_version"] == "local"
    params = run.data.params
    assert (params["input"], params["rows"], params["label_column"], params["text_column"]) == (
        str(tmp_path / "reviews.jsonl"),
        str(len(rows)),
        "label",
        "text",
    )
    recorded = {name.removeprefix("predict/"): value for name, value in run.data.metrics.items()}
    assert set(recorded) == {"accuracy", "f1_macro", "rows_per_s"}
    assert {name: f"{recorded[name]:.4f}" for name in printed} == printed
    logged = Path(client.download_artifacts(run.info.run_id, "predictions", str(tmp_path)))
    assert (logged / output.name).read_text() == output.read_text()
    plots = Path(client.download_artifacts(run.info.run_id, "plots", str(tmp_path)))
    assert (plots / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")
    confusion = json.loads((plots / "confusion_matrix.json").read_text())
    answered = [json.loads(line)[PREDICTION]["label"] for line in output.read_text().splitlines()]
    truth = [confusion["labels"][row["label"]] for row in rows]  # 0/1 are label ids
    assert confusion["rows_true_columns_predicted"] == [
        [sum(t == true and a == said for t, a in zip(truth, answered, strict=True)) for said in confusion["labels"]]
        for true in confusion["labels"]
    ]
    matrix = confusion["rows_true_columns_predicted"]
    assert sum(matrix[i][i] for i in range(len(matrix))) / len(rows) == pytest.approx(recorded["accuracy"])


def test_scores_for_a_tracking_server_that_does_not_answer_are_refused_before_ray_starts(
    model: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.net import free_port

    def never(*_):
        raise AssertionError("Ray started")

    monkeypatch.setattr(predict, "_start_ray", never)
    rows = _jsonl(tmp_path / "in.jsonl", [{"text": "good", "label": 1}])
    uri = f"http://127.0.0.1:{free_port()}"
    options = ("--label-column", "label", f"tracking.uri={uri}")
    assert _predict(model, rows, tmp_path / "out.jsonl", *options) == 2
    err = capsys.readouterr().err
    assert f"tracking.uri = '{uri}': the scores are recorded there, and it did not answer" in err, err
    assert "ptft predict: 1 problem:\n" in err  # the command's arguments, not a config file
    assert not (tmp_path / "out.jsonl").exists()


def test_outside_the_project_without_a_config_the_scores_go_to_the_store_in_ptft_runs(
    model: Path, tmp_path: Path, capfd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default --config was configs/demo.yaml, so run outside the project's folder predict
    said `file not found`. Without --config, it reads the defaults: the log and the record go to
    ./ptft-runs, as `ptft run` would put them. MLflow's lines on making that new store's tables go
    to the log with the rest of its output, not to the console between predict's own lines."""
    import mlflow

    _answered_in_process(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)  # MLflow writes to sys.stderr: fd 2, as outside pytest
    rows = _jsonl(tmp_path / "in.jsonl", [{"text": text, "label": i % 2} for i, text in enumerate(REVIEWS)])
    assert cli.main(["predict", str(model), str(rows), "--output", "out.jsonl", "--label-column", "label"]) == 0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'ptft-runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ptft").experiment_id], "tags.`ptft.kind` = 'predict'")
    out, err = capfd.readouterr()
    assert f"Recorded as MLflow run {run.info.run_id}" in out and (tmp_path / "out.jsonl").exists()
    (log,) = (tmp_path / "ptft-runs" / "logs").glob("predict-*.log")
    assert "Creating initial MLflow database tables" in log.read_text()
    assert "Creating initial MLflow database tables" not in out + err, err
