"""`ptft init DATA_FILE`: detection, splits, seq_len and a config `ptft validate` accepts, on the
real data sets under ../shared/data and on files made here in each supported format."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.data import CONLL_COLUMNS, read_table
from pipelines.cli import main
from pipelines.pipeline_config import load_config
from tests.conftest import shared


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _reviews(count: int) -> list[dict]:
    """Real rt-polarity rows, the first `count` of its train split."""
    with open(shared("data/rt-polarity/train.jsonl")) as handle:
        return [json.loads(next(handle)) for _ in range(count)]


def test_rt_polarity_gets_its_splits_labels_and_seq_len(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    train = shared("data/rt-polarity/train.jsonl")
    assert main(["init", str(train)]) == 0
    out = capsys.readouterr().out
    config = load_config("configs/rt-polarity.yaml", [])  # what `ptft validate` reads
    task = config.data.task
    assert Path(task.train.path) == train and Path(task.validation.path) == train.with_name("validation.jsonl")
    assert Path(task.test.path) == train.with_name("test.jsonl")
    assert (task.train.text_column, task.train.label_column) == ("text", "label")
    assert config.tokenize.seq_len == 64  # the README: 99% of snippets fit in 64 word pieces
    assert "labels in train: 0 (4278), 1 (4252)" in out
    assert "Run it: ptft run configs/rt-polarity.yaml" in out
    text = Path("configs/rt-polarity.yaml").read_text()
    assert text.startswith("# ptft pipeline for") and "# Launch: ptft run configs/rt-polarity.yaml" in text
    validation = {json.loads(line)["text"] for line in open(task.validation.path)}
    assert len(config.serve.sample_texts) == 2 and set(config.serve.sample_texts) <= validation  # its own texts


def test_a_csv_without_splits_gets_a_seeded_stratified_split(in_tmp: Path) -> None:
    rows = _reviews(400)
    rows[0]["text"] = 'a "quoted", comma text'
    with open("reviews.csv", "w") as handle:
        handle.write("id,review,sentiment\n")
        for number, row in enumerate(rows):
            text = row["text"].replace('"', '""')
            handle.write(f'{number},"{text}",{["neg", "pos"][row["label"]]}\n')
    assert main(["init", "reviews.csv", "-o", "mine.yaml"]) == 0
    config = load_config("mine.yaml", [])
    assert (config.data.task.train.text_column, config.data.task.train.label_column) == ("review", "sentiment")
    splits = {name: Path(f"reviews-data/{name}.jsonl") for name in ("train", "validation", "test")}
    assert Path(config.data.task.validation.path).resolve() == splits["validation"].resolve()
    written = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in splits.items()}
    assert sum(map(len, written.values())) == 400
    for name in ("validation", "test"):
        for label in ("neg", "pos"):
            share = sum(row["sentiment"] == label for row in written[name])
            total = sum(["neg", "pos"][row["label"]] == label for row in rows)
            assert share == int(total * 0.1), (name, label)  # each label split 80/10/10 on its own
    first = splits["train"].read_text()
    assert main(["init", "reviews.csv", "-o", "mine.yaml", "--force"]) == 0
    assert splits["train"].read_text() == first  # seeded
    assert main(["init", "reviews.csv", "-o", "mine.yaml", "--force", "--seed", "1"]) == 0
    assert splits["train"].read_text() != first


def test_a_small_file_gets_fine_tuning_steps_its_train_split_can_fill(in_tmp: Path) -> None:
    Path("few.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _reviews(60)))
    assert main(["init", "few.jsonl"]) == 0
    config = load_config("configs/few.yaml", [])  # checks the train rows fill one step of every stage
    train_rows = len(Path(config.data.task.train.path).read_text().splitlines())
    batch = config.finetune.trial_defaults().batch_size_per_worker
    assert train_rows < 64 and batch < 32 and config.finetune.workers.num_workers * batch <= train_rows


def test_rows_without_a_text_or_a_label_are_left_out_of_the_splits_and_named(
    in_tmp: Path, capsys: pytest.CaptureFixture
) -> None:
    """They went into the written splits, and init's own validation then refused the config."""
    rows = _reviews(200)
    rows[7]["text"] = None
    del rows[99]["label"]
    Path("holes.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["init", "holes.jsonl"]) == 0
    assert "Left out of the splits: 2 row(s) without a text or a label (rows 8, 100)" in capsys.readouterr().out
    config = load_config("configs/holes.yaml", [])
    split_paths = (config.data.task.train.path, config.data.task.validation.path, config.data.task.test.path)
    written = [json.loads(line) for path in split_paths for line in Path(path).read_text().splitlines()]
    assert len(written) == 198 and all(None not in (row["text"], row["label"]) for row in written)


@pytest.mark.parametrize("suffix", ["tsv", "parquet", "jsonl"])
def test_each_table_format_gives_a_config_that_validates(in_tmp: Path, suffix: str) -> None:
    rows = [{"body": row["text"], "label": row["label"]} for row in _reviews(200)]
    path = Path(f"reviews.{suffix}")
    if suffix == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == "tsv":
        path.write_text("body\tlabel\n" + "".join(f"{row['body']}\t{row['label']}\n" for row in rows))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["init", str(path)]) == 0
    config = load_config("configs/reviews.yaml", [])
    assert config.data.task.train.text_column == "body" and config.has_tasks()


def test_a_label_column_with_many_classes_is_found_by_its_name(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    """77 intents (banking77's count) gave a pre-training-only config: more than 50 values, and
    `intent` was no label name. A column of row ids is never the label."""
    rows = [{"id": i, "text": row["text"], "intent": f"intent_{i % 77}"} for i, row in enumerate(_reviews(1600))]
    Path("intents.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["init", "intents.jsonl"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "Label column: 'intent'" in out and ", and 57 more (77 in all)" in out
    config = load_config("configs/intents.yaml", [])
    assert (
        config.data.task.train.label_column == "intent"
        and "sentence classification, 77 labels" in Path("configs/intents.yaml").read_text()
    )


def test_a_parquet_file_pandas_wrote_gets_a_classifier_config(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    """pandas writes its strings as large_string and its categories as dictionaries: init found no text
    column in such a file. An integer column with a gap comes out as floats (0.0, 1.0, null)."""
    rows = _reviews(200)
    texts = pa.array([row["text"] for row in rows], type=pa.large_string())
    names = pa.array([["neg", "pos"][row["label"]] for row in rows]).dictionary_encode()
    pq.write_table(pa.table({"review": texts, "sentiment": names}), "categories.parquet")
    assert main(["init", "categories.parquet"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "Text column: 'review'" in out and "Label column: 'sentiment'; labels in train: neg (" in out
    assert load_config("configs/categories.yaml", []).data.task.train.label_column == "sentiment"
    floats = pa.array([None if index == 3 else float(row["label"]) for index, row in enumerate(rows)])
    pq.write_table(pa.table({"review": texts, "stars": floats}), "gaps.parquet")
    assert main(["init", "gaps.parquet"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "Label column: 'stars'" in out and "without a text or a label (rows 4)" in out
    halves = pa.array([row["label"] / 2 + 0.1 for row in rows])  # a measurement, not classes
    pq.write_table(pa.table({"review": texts, "score": halves}), "scores.parquet")
    assert main(["init", "scores.parquet"]) == 0 and "No label column" in capsys.readouterr().out


def test_a_compressed_file_gets_a_config_named_for_its_data(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    import gzip

    Path("reviews.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps(row) + "\n" for row in _reviews(200)).encode())
    )
    assert main(["init", "reviews.jsonl.gz"]) == 0, capsys.readouterr().err
    assert load_config("configs/reviews.yaml", []).data.task.train.label_column == "label"


def test_a_text_file_or_unlabelled_pairs_give_a_pre_training_config(
    in_tmp: Path, capsys: pytest.CaptureFixture
) -> None:
    Path("corpus.txt").write_text("".join(row["text"] + "\n" for row in _reviews(300)))
    assert main(["init", "corpus.txt"]) == 0
    config = load_config("configs/corpus.yaml", [])
    assert not config.has_tasks() and config.data.corpus.source.text_column == "text"
    assert main(["init", str(shared("data/squad/README.md")), "-o", "configs/readme.yaml"]) == 0  # prose: text
    readme = load_config("configs/readme.yaml", [])
    assert not readme.has_tasks() and readme.pretrain.batch_size_per_worker < 32  # steps its ~12 blocks can fill
    assert "a small corpus" in Path("configs/readme.yaml").read_text()
    assert main(["init", str(shared("data/multi30k/train.jsonl"))]) == 0
    multi30k = load_config("configs/multi30k.yaml", [])
    assert not multi30k.has_tasks() and multi30k.data.corpus.source.text_column in ("en", "de")
    assert "--task translation --text-column en --label-column de" in capsys.readouterr().out


def test_multi30k_with_task_translation_gets_an_encoder_decoder_translation_config(
    in_tmp: Path, capsys: pytest.CaptureFixture
) -> None:
    train = shared("data/multi30k/train.jsonl")
    assert main(["init", str(train), "--task", "translation", "-o", "configs/en-de.yaml"]) == 0
    out = capsys.readouterr().out
    config = load_config("configs/en-de.yaml", [])
    task = config.data.task
    assert task.type == "translation" and config.tune.metric == "eval/bleu"
    assert (task.train.text_column, task.train.label_column) == ("en", "de")
    assert Path(task.validation.path) == train.with_name("validation.jsonl")
    assert config.data.corpus.text_columns == ["en", "de"] and config.pretrain.model.family == "bart"
    assert not config.tokenize.lowercase and config.tokenize.sentinels > 0
    assert "translation en -> de" in Path("configs/en-de.yaml").read_text() and "Target column: 'de'" in out
    # The other direction, from a file without splits: a seeded 80/10/10 split of the pairs.
    pairs = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines()[:300]]
    Path("pairs.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in pairs))
    assert main(["init", "pairs.jsonl", "--task", "translation", "--text-column", "de", "--label-column", "en"]) == 0
    reverse = load_config("configs/pairs.yaml", [])
    assert (reverse.data.task.train.text_column, reverse.data.task.train.label_column) == ("de", "en")
    sizes = [
        len(Path(getattr(reverse.data.task, split).path).read_text().splitlines())
        for split in ("train", "validation", "test")
    ]
    assert sizes == [240, 30, 30]


def test_texts_with_task_generation_get_a_gpt2_generation_config(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [{"id": number, "review": row["text"]} for number, row in enumerate(_reviews(300))]
    Path("texts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["init", "texts.jsonl"]) == 0  # detection is unchanged: texts alone are a pre-training plan
    assert not load_config("configs/texts.yaml", []).has_tasks()
    assert "--task generation fine-tunes a gpt2 model" in capsys.readouterr().out
    assert main(["init", "texts.jsonl", "--task", "generation", "-o", "configs/gen.yaml"]) == 0
    out = capsys.readouterr().out
    config = load_config("configs/gen.yaml", [])
    task = config.data.task
    assert task.type == "generation" and config.tune.metric == "eval/accuracy"
    assert config.pretrain.model.family == "gpt2" and config.data.corpus.source.text_column == "review"
    assert config.tokenize.algorithm == "bpe" and not config.tokenize.lowercase
    assert (task.train.text_column, task.train.label_column) == ("review", "review")  # a text is its own label
    text = Path("configs/gen.yaml").read_text()
    assert "label_column" not in text and "text column 'review'; split 80/10/10 (seeded)" in text
    assert "generation (the model continues these texts; served at POST /generate)" in text
    assert "optimises next-token accuracy (eval/accuracy)" in text and "No label column read" in out
    sizes = [len(Path(getattr(task, split).path).read_text().splitlines()) for split in ("train", "validation", "test")]
    assert sizes == [240, 30, 30]  # seeded, not stratified: there are no classes
    assert 16 <= config.tokenize.seq_len <= 512 and f"seq_len {config.tokenize.seq_len}," in out
    assert main(["validate", "configs/gen.yaml"]) == 0


def test_a_csv_with_a_label_column_and_task_generation_reads_only_the_texts(
    in_tmp: Path, capsys: pytest.CaptureFixture
) -> None:
    with open("reviews.csv", "w") as handle:
        handle.write("review,sentiment\n")
        for row in _reviews(200):
            text = row["text"].replace('"', '""')
            handle.write(f'"{text}",{["neg", "pos"][row["label"]]}\n')
    assert main(["init", "reviews.csv", "--task", "generation", "--text-column", "review"]) == 0
    config = load_config("configs/reviews.yaml", [])
    assert config.data.task.type == "generation" and config.pretrain.model.family == "gpt2"
    written = [json.loads(line) for line in Path(config.data.task.train.path).read_text().splitlines()]
    assert set(written[0]) == {"review"}  # the label column is not carried into the splits
    assert main(["validate", "configs/reviews.yaml"]) == 0
    capsys.readouterr()
    argv = ["init", "reviews.csv", "--task", "generation", "--label-column", "sentiment", "-o", "x.yaml"]
    assert main(argv) == 2
    assert "texts only" in (err := capsys.readouterr().err) and "drop --label-column" in err
    assert not Path("x.yaml").exists()


def test_conll2003_gets_an_entities_config(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    train = shared("data/conll2003/train.jsonl")
    assert main(["init", str(train)]) == 0
    out = capsys.readouterr().out
    config = load_config("configs/conll2003.yaml", [])
    task = config.data.task
    assert task.type == "token_classification" and config.tune.metric == "eval/f1"
    assert (task.train.text_column, task.train.label_column) == ("tokens", "ner_tags")
    assert Path(task.validation.path) == train.with_name("validation.jsonl") and not config.tokenize.lowercase
    assert "tags in train: B-LOC (7140), B-MISC (3438), B-ORG (6321), B-PER (6600)" in out  # the README's counts
    written = Path("configs/conll2003.yaml").read_text()
    assert "named entities (LOC, MISC, ORG, PER)" in written and "longer sentences are read in windows" in written
    sentences = {" ".join(json.loads(line)["tokens"]) for line in open(task.validation.path)}
    assert len(config.serve.sample_texts) == 2 and set(config.serve.sample_texts) <= sentences  # words, joined


def test_a_conll_column_file_gets_an_entities_config(in_tmp: Path) -> None:
    rows = [json.loads(line) for line in shared("data/conll2003/validation.jsonl").read_text().splitlines()[:300]]
    sentences = ("\n".join(f"{word} {tag}" for word, tag in zip(r["tokens"], r["ner_tags"], strict=True)) for r in rows)
    Path("ner.conll").write_text("\n\n".join(sentences) + "\n")
    assert main(["init", "ner.conll"]) == 0
    task = load_config("configs/ner.yaml", []).data.task
    assert task.type == "token_classification" and (task.train.text_column, task.train.label_column) == CONLL_COLUMNS


def test_squad_nested_json_gives_a_question_answering_config(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["init", str(shared("data/squad/train.json"))]) == 0
    out = capsys.readouterr().out
    config = load_config("configs/squad.yaml", [])
    task = config.data.task
    assert task.type == "question_answering" and config.tune.metric == "eval/f1"
    assert (task.train.text_column, task.train.label_column, task.train.question_column) == (
        "context",
        "answers",
        "question",
    )
    assert Path(task.test.path) == shared("data/squad/test.json")
    questions = {row["question"]: row["context"] for row in read_table(str(task.validation.path)).to_pylist()}
    samples = config.serve.sample_texts  # questions of the validation split, with their contexts
    assert len(samples) == 2 and all(questions[sample["question"]] == sample["context"] for sample in samples)
    assert samples[0]["context"] != samples[1]["context"]
    assert "Read 8514 rows" in out  # the README's count of train questions
    assert main(["validate", "configs/squad.yaml"]) == 0


def test_question_answering_rows_without_splits_are_split_with_their_questions(
    in_tmp: Path, capsys: pytest.CaptureFixture
) -> None:
    from components import synthetic

    rows = [
        {"question": row["question"], "context": row["text"], "answers": row["label"]}
        for row in synthetic.generate("train", 200, task="answers")
    ]
    Path("qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["init", "qa.jsonl"]) == 0, capsys.readouterr().err
    config = load_config("configs/qa.yaml", [])
    assert config.data.task.type == "question_answering"
    written = [json.loads(line) for line in Path(config.data.task.validation.path).read_text().splitlines()]
    assert written and set(written[0]) == {"question", "context", "answers"}
    # seq_len covers the question and the context of 99% of the rows, not the context alone
    assert config.tokenize.seq_len >= 24 and "seq_len 32" in capsys.readouterr().out


def test_files_it_cannot_use_exit_2_with_the_reason(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    Path("broken.json").write_text('{"question": "who?", ' * 20)
    assert main(["init", "broken.json"]) == 2
    assert "cannot read" in (err := capsys.readouterr().err) and "SQuAD's nested JSON" in err
    assert main(["init", str(shared("data/rt-polarity/train.jsonl")), "--label-column", "stars"]) == 2
    assert "'stars'" in (err := capsys.readouterr().err) and "use one of: text, label" in err
    assert main(["init", "no-such-file.csv"]) == 2
    Path("notes.log").write_text("a line of notes\n" * 20)  # a suffix that names no format: read as JSON lines
    assert main(["init", "notes.log"]) == 2
    assert "'.log' names no format" in capsys.readouterr().err
    Path("empty.csv").write_text("")
    assert main(["init", "empty.csv"]) == 2
    assert "empty.csv is empty. Fix: give it examples" in capsys.readouterr().err  # as `ptft validate` says
    Path("latin1.csv").write_bytes("text,label\nun film très beau,pos\n".encode("latin-1") * 10)
    assert main(["init", "latin1.csv"]) == 2  # was refused only by the check of the config it had written
    assert "latin1.csv is not UTF-8 text (byte 21)" in (err := capsys.readouterr().err) and "iconv" in err
    reviews = str(shared("data/rt-polarity/train.jsonl"))
    for task, needs in (("entities", "needs two columns of lists"), ("answers", "needs the columns question")):
        assert main(["init", reviews, "--task", task]) == 2  # not a sentence classifier's config instead
        assert f"--task = '{task}': {needs}" in (err := capsys.readouterr().err) and "the file has: text, label" in err
    assert not Path("configs").exists()


def test_labels_unseen_in_train_are_named(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    rows = _reviews(60)
    Path("train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:40]))
    Path("validation.jsonl").write_text("".join(json.dumps({**row, "label": 7}) + "\n" for row in rows[40:50]))
    Path("test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[50:]))
    assert main(["init", "train.jsonl", "-o", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "labels the train split lacks: 7" in err and "validation.jsonl" in err
    assert not Path("x.yaml").exists()


def test_labels_spelled_apart_are_refused_and_nothing_is_written(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    """The splits init writes are removed when their config is refused, so the fixed file needs no --force."""
    rows = [{**row, "label": ["neg", "pos"][row["label"]]} for row in _reviews(120)]
    for row in rows[::4]:
        row["label"] += " "  # a trailing space: a class of its own
    Path("reviews.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["init", "reviews.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "ptft init reviews.jsonl (nothing written)" in err and "DATA_FILE = 'reviews.jsonl'" in err
    assert "'neg' / 'neg '" in err and "'pos' / 'pos '" in err
    assert sorted(path.name for path in in_tmp.iterdir()) == ["reviews.jsonl"]
    Path("reviews.jsonl").write_text("".join(json.dumps({**row, "label": row["label"].strip()}) + "\n" for row in rows))
    assert main(["init", "reviews.jsonl"]) == 0, capsys.readouterr().err


def test_an_existing_config_is_kept_without_force(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    Path("configs").mkdir()
    Path("configs/rt-polarity.yaml").write_text("mine")
    assert main(["init", str(shared("data/rt-polarity/train.jsonl"))]) == 2
    assert "--force" in capsys.readouterr().err
    assert Path("configs/rt-polarity.yaml").read_text() == "mine"
