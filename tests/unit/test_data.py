"""Data sources: every local format, column mapping, globs, the synthetic language, fingerprints."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components import synthetic
from components.data import (
    FileSource,
    SyntheticSource,
    check_reads,
    check_source,
    fingerprint,
    load_corpus,
    load_source,
)

ROWS = [{"review": "a fine film", "stars": "pos"}, {"review": "a dull film", "stars": "neg"}]


def _write(folder: Path, fmt: str) -> Path:
    path = folder / f"reviews.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text(f"review{sep}stars\n" + "".join(f"{r['review']}{sep}{r['stars']}\n" for r in ROWS))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_labelled_formats_map_columns(tmp_path: Path, fmt: str) -> None:
    source = FileSource(path=str(_write(tmp_path, fmt)), text_column="review", label_column="stars")
    table = load_source(source, labelled=True)
    assert table.column_names == ["text", "label"]
    assert table.to_pylist() == [{"text": "a fine film", "label": "pos"}, {"text": "a dull film", "label": "neg"}]


def test_parquet_strings_and_categories_from_pandas_read_as_texts_and_labels(tmp_path: Path) -> None:
    """large_string texts and dictionary-encoded labels (what pandas writes) read as the other formats do."""
    path = tmp_path / "reviews.parquet"
    texts = pa.array([row["review"] for row in ROWS], type=pa.large_string())
    tags = pa.array([[row["stars"]] for row in ROWS], type=pa.large_list(pa.large_string()))
    pq.write_table(
        pa.table({"review": texts, "stars": pa.array([r["stars"] for r in ROWS]).dictionary_encode(), "tags": tags}),
        path,
    )
    table = load_source(FileSource(path=str(path), text_column="review", label_column="stars"), labelled=True)
    assert table.schema == pa.schema({"text": pa.string(), "label": pa.string()})
    assert table.to_pylist() == [{"text": "a fine film", "label": "pos"}, {"text": "a dull film", "label": "neg"}]
    tagged = load_source(FileSource(path=str(path), text_column="review", label_column="tags"), labelled=True)
    assert tagged.schema.field("label").type == pa.list_(pa.string())


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("array.json", json.dumps(ROWS, indent=2)),  # pandas' to_json(orient="records", indent=...)
        ("one-line.json", json.dumps(ROWS)),
        ("object.json", json.dumps({"version": "1", "data": ROWS})),  # what `datasets`' field="data" reads
        ("semicolons.csv", "review;stars\n" + "".join(f"{r['review']};{r['stars']}\n" for r in ROWS)),
    ],
)
def test_json_documents_and_semicolon_csv_read_as_rows(tmp_path: Path, name: str, content: str) -> None:
    """A JSON array of records was 'line 1 is a JSON array, not an object'; a records list inside an
    object one row with a `data` column; a spreadsheet's semicolon CSV one column, 'review;stars'."""
    path = tmp_path / name
    path.write_text(content)
    source = FileSource(path=str(path), text_column="review", label_column="stars")
    assert check_source(source, labelled=True) == [] and check_reads(source) == []
    assert load_source(source, labelled=True).to_pylist() == [
        {"text": "a fine film", "label": "pos"},
        {"text": "a dull film", "label": "neg"},
    ]


@pytest.mark.parametrize("name", ["reviews.jsonl.gz", "reviews.csv.bz2", "reviews.tsv.xz", "reviews.json.gz"])
def test_compressed_files_read_as_they_are(tmp_path: Path, name: str) -> None:
    """`train.jsonl.gz` was 'not UTF-8 text (byte 1)', with an iconv command as the fix."""
    import bz2
    import gzip
    import lzma

    fmt = name.split(".")[1]
    plain = json.dumps(ROWS).encode() if fmt == "json" else _write(tmp_path, fmt).read_bytes()  # json: one array
    compress = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[name.rsplit(".", 1)[1]]
    path = tmp_path / name
    path.write_bytes(compress(plain))
    source = FileSource(path=str(path), text_column="review", label_column="stars")
    assert check_source(source, labelled=True) == [] and check_reads(source) == []
    assert load_source(source, labelled=True).column("label").to_pylist() == ["pos", "neg"]
    path.write_bytes(compress(plain)[:-12])  # cut short
    ((key, message, fix),) = check_source(source, labelled=True)
    assert key == "path" and f"{path} does not decompress" in message and "uncompressed" in fix


def test_conll_column_files_read_as_word_and_tag_lists(tmp_path: Path) -> None:
    """CoNLL-2003's own layout (word, POS, chunk, tag; -DOCSTART-; CRLF), and the two-column one."""
    path = tmp_path / "train.conll"
    lines = ["-DOCSTART- -X- -X- O", "", "EU NNP B-NP B-ORG", "rejects VBZ B-VP O", "", "Peter\tNNP\tB-NP\tB-PER"]
    path.write_bytes("\r\n".join(lines).encode())  # and no blank line after the last sentence
    source = FileSource(path=str(path), text_column="tokens", label_column="ner_tags")
    assert check_source(source, labelled=True) == [] and check_reads(source) == []
    assert load_source(source, labelled=True).to_pylist() == [
        {"text": ["EU", "rejects"], "label": ["B-ORG", "O"]},
        {"text": ["Peter"], "label": ["B-PER"]},
    ]
    assert load_source(source, labelled=False).column("text").to_pylist() == ["EU rejects", "Peter"]  # a corpus
    path.write_text("EU B-ORG\nrejects\n")
    ((key, message, fix),) = check_reads(source)
    assert "line 2 has one column ('rejects')" in message and "a word and its tag" in message and "blank line" in fix


def test_a_one_line_json_lines_file_is_its_row_though_the_row_holds_a_list_of_objects(tmp_path: Path) -> None:
    """Not a document whose list of records is the rows: SQuAD-style answers are a list of objects."""
    path = tmp_path / "one.jsonl"
    row = {"question": "who?", "context": "anna said so", "answers": [{"text": "anna", "answer_start": 0}]}
    path.write_text(json.dumps(row) + "\n")
    table = load_source(FileSource(path=str(path), text_column="context", label_column="answers"), labelled=True)
    assert table.num_rows == 1 and table.column("question").to_pylist() == ["who?"]


def test_a_json_document_whose_records_disagree_names_the_record(tmp_path: Path) -> None:
    path = tmp_path / "reviews.json"
    path.write_text(json.dumps([*ROWS, {"review": "a third film", "stars": 3}]))
    source = FileSource(path=str(path), text_column="review", label_column="stars")
    ((key, message, fix),) = check_reads(source)
    assert key == "path" and "record 3: 'stars' is a number, in record 1 a string" in message


def test_plain_text_is_one_row_per_nonblank_line(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\nsecond line\n")
    table = load_source(FileSource(path=str(path)), labelled=False)
    assert table.column("text").to_pylist() == ["first line", "second line"]


def test_glob_concatenates_files_in_order(tmp_path: Path) -> None:
    for index in range(3):
        (tmp_path / f"part-{index}.txt").write_text(f"line {index}\n")
    table = load_source(FileSource(path=str(tmp_path / "part-*.txt")), labelled=False)
    assert table.column("text").to_pylist() == ["line 0", "line 1", "line 2"]


def test_check_source_reports_missing_file_and_columns(tmp_path: Path) -> None:
    missing = check_source(FileSource(path=str(tmp_path / "nope.jsonl")), labelled=True)
    assert [key for key, _, _ in missing] == ["path"]
    path = _write(tmp_path, "jsonl")
    wrong = check_source(FileSource(path=str(path)), labelled=True)
    assert [key for key, _, _ in wrong] == ["text_column", "label_column"]
    assert "review" in wrong[0][2]


def test_a_corpus_of_two_columns_reads_each_as_documents_and_names_a_missing_one(tmp_path: Path) -> None:
    """Both sides of a translation pair as one multilingual corpus (Multi30k's en and de)."""
    from components.schemas import CorpusConfig, DataConfig
    from pipelines.pipeline_config import data_problems

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"en": f"a dog {n}", "de": f"ein Hund {n}"}) + "\n" for n in range(3)))
    corpus = CorpusConfig(source=FileSource(path=str(path)), text_columns=["en", "de"])
    assert load_corpus(corpus).column("text").to_pylist() == [
        *(f"a dog {n}" for n in range(3)),
        *(f"ein Hund {n}" for n in range(3)),
    ]
    wrong = CorpusConfig(source=FileSource(path=str(path)), text_columns=["en", "fr"])
    (problem,) = data_problems({"data": DataConfig(corpus=wrong)})
    assert (problem.key, problem.value) == ("data.corpus.text_columns", "fr") and "en, de" in problem.fix
    with pytest.raises(ValueError, match="text_columns needs a file or hub source"):
        CorpusConfig(source=SyntheticSource(split="corpus"), text_columns=["en"])


def test_fingerprint_follows_file_content(tmp_path: Path) -> None:
    path = _write(tmp_path, "jsonl")
    source = FileSource(path=str(path))
    before = fingerprint(source)
    assert fingerprint(source) == before
    path.write_text(path.read_text() + json.dumps({"review": "x", "stars": "pos"}) + "\n")
    assert fingerprint(source) != before


def test_synthetic_is_deterministic_and_balanced() -> None:
    first = synthetic.generate("train", 400, seed=3)
    assert first == synthetic.generate("train", 400, seed=3)
    assert first != synthetic.generate("train", 400, seed=4)
    counts = Counter(row["label"] for row in first)
    assert set(counts) == {"negative", "positive"}
    assert abs(counts["positive"] - counts["negative"]) < 80


def test_synthetic_train_sees_few_adjectives_test_sees_all() -> None:
    def adjectives(split: str) -> set[str]:
        words = {word for row in synthetic.generate(split, 2000) for word in row["text"].split()}
        return words & set(synthetic.POSITIVE + synthetic.NEGATIVE)

    assert len(adjectives("train")) == 2 * synthetic.SEEN_IN_TRAIN
    assert adjectives("test") == set(synthetic.POSITIVE + synthetic.NEGATIVE)
    assert adjectives("corpus") == set(synthetic.POSITIVE + synthetic.NEGATIVE)


def test_synthetic_labels_follow_adjective_polarity() -> None:
    positive = set(synthetic.POSITIVE)
    for row in synthetic.generate("validation", 300):
        has_positive = any(word in positive for word in row["text"].split())
        assert (row["label"] == "positive") == has_positive


def test_synthetic_source_loads_as_table() -> None:
    table = load_source(SyntheticSource(split="test", num_examples=10), labelled=True)
    assert table.num_rows == 10 and table.column_names == ["text", "label"]
