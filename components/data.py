"""Data sources: local files (JSONL, CSV, TSV, Parquet, plain text; globs), remote URIs,
HF Hub datasets and the built-in synthetic language. Every source loads to an Arrow table with
the columns `text` and, for labelled data, `label` (for token classification, lists of words and of
tags; unlabelled, a list of words is joined with spaces into one text) and `question` where the
source has its question column (question answering). A JSON file may also be one document: an
array of records, an object holding one, or SQuAD's nested JSON (one row per question). A CSV
whose header has semicolons and no comma is read with semicolons. Text files compressed with
gzip, bzip2 or xz (`train.jsonl.gz`) read as they are.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from components import synthetic
from components.net import hub_dataset_unavailable
from components.schemas import CorpusConfig, FileSource, HubSource, Source, SyntheticSource

# UTF-8's byte-order mark, which Excel's "CSV UTF-8" and Windows editors put at a file's start: Arrow
# took it for part of the first column's name (`column 'text' not in ...: use one of its columns: \ufefftext, label`).
BOM = codecs.BOM_UTF8
SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",  # prose (docs, READMEs): one example per non-blank line, like .txt
    ".conll": "conll",  # WORD [...] TAG per line, sentences apart by a blank line
}
CONLL_COLUMNS = ("tokens", "ner_tags")  # as in Hugging Face's conll2003


def load_source(source: Source, *, labelled: bool) -> pa.Table:
    """Load a source into a table with `text` (and `label` when `labelled`)."""
    if isinstance(source, SyntheticSource):
        table = pa.Table.from_pylist(synthetic.generate(source.split, source.num_examples, source.seed, source.task))
    elif isinstance(source, HubSource):
        table = _load_hub(source)
    else:
        return _load_files(source, labelled)
    return _select_columns(table, source, labelled)


def _load_files(source: FileSource, labelled: bool) -> pa.Table:
    """The files of a (globbed) source, each cut to the columns ptft reads before they are joined:
    shards of one data set may carry columns the others lack."""
    tables = {}
    for path in resolve_paths(source.path):
        table = _read_file(path, _file_format(source, path))
        if missing := [name for _, name in _columns_read(source, labelled) if name not in table.column_names]:
            detail = f"no column {missing[0]!r} (it has {', '.join(table.column_names)})"
            raise UnreadableFile(f"{path}: {detail}", _SAME_COLUMNS)
        tables[path] = _select_columns(table, source, labelled)
    try:
        return pa.concat_tables(tables.values())
    except pa.ArrowInvalid:  # a column's type differs between files (labels 0/1 in one, "neg"/"pos" in another)
        (first, schema), *others = ((path, table.schema) for path, table in tables.items())
        path, other = next((path, other) for path, other in others if other != schema)
        if other.names != schema.names:  # a column only some files have (a question column)
            differ = [f"its columns are {', '.join(other.names)}, in {first} {', '.join(schema.names)}"]
        else:
            types = [(field, schema.field(field.name).type) for field in other if field not in schema]
            differ = [f"{field.name} is {field.type} here, {there} in {first}" for field, there in types]
        raise UnreadableFile(f"{path}: {'; '.join(differ)}", _SAME_COLUMNS) from None


_SAME_COLUMNS = "give every file of the source the text (and label) column, each of one type"


def load_corpus(corpus: CorpusConfig) -> pa.Table:
    """The corpus's `text`: the source's text column, or each of `text_columns` in turn."""
    if not corpus.text_columns:
        return load_source(corpus.source, labelled=False)
    return pa.concat_tables(
        load_source(corpus.source.model_copy(update={"text_column": column}), labelled=False)
        for column in corpus.text_columns
    )


def _load_hub(source: HubSource) -> pa.Table:
    import datasets  # heavy import, only when a hub source is used

    dataset = datasets.load_dataset(source.name, source.config_name, split=source.split, revision=source.revision)
    return plain_types(dataset.with_format("arrow")[:])


def _select_columns(table: pa.Table, source: Source, labelled: bool) -> pa.Table:
    text = table.column(source.text_column)
    if not pa.types.is_list(text.type):
        text = text.cast(pa.string())
    elif not labelled:  # pre-split words (an entities data set) read as a corpus: one text per row
        text = pc.binary_join(text, " ")
    columns = {"text": text}  # a labelled row's words stay a list (token classification)
    question = getattr(source, "question_column", None)
    if not labelled and question in table.column_names:  # a QA file as a corpus: each context once
        return _first_of_each(pa.table(columns).filter(pc.is_valid(text)))
    if labelled:
        columns["label"] = table.column(source.label_column)
        if question in table.column_names:  # question answering
            columns["question"] = table.column(question)
        return pa.table(columns)  # rows without a text or a label stay, for `missing_values` to name
    return pa.table(columns).filter(pc.is_valid(columns["text"]))


def missing_values(table: pa.Table) -> str | None:
    """Why a labelled table's rows cannot all be learned from: some lack a label (which would be
    learned as one more class, `None`) or a text (which would be dropped with its label)."""
    for column, other in (("label", "text"), ("text", "label")):
        if missing := table.column(column).null_count:
            first = table.filter(table.column(column).is_null()).column(other)[0].as_py()
            return f"{missing} row(s) without a {column}, the first with the {other} {shown(first)}"
    return None


def shown(value: object, limit: int = 60) -> str:
    """A row's text (or label) in a message: quoted, and cut when long."""
    value = " ".join(map(str, value)) if isinstance(value, list) else str(value)
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


def _first_of_each(table: pa.Table) -> pa.Table:
    """Rows whose text differs from the row before (SQuAD's questions on one paragraph follow each other)."""
    texts = table.column("text").to_pylist()
    keep = [index for index, text in enumerate(texts) if index == 0 or text != texts[index - 1]]
    return table.take(pa.array(keep, type=pa.int64()))


def resolve_paths(path: str) -> list[str]:
    """Expand `~`, environment variables and globs; URIs are returned as they are."""
    if "://" in path:
        return [path]
    expanded = os.path.expandvars(os.path.expanduser(path))
    matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
    return [os.path.abspath(match) for match in matches]


def _file_format(source: FileSource, path: str) -> str:
    if source.format != "auto":
        return source.format
    return format_of_suffix(format_suffix(path)) or "jsonl"


def read_table(path: str) -> pa.Table:
    """A whole file (local or a URI) as a table, its format from its suffix."""
    return _read_file(path, format_of_suffix(format_suffix(path)) or "jsonl")


# Compressed text files read as they are (`train.jsonl.gz`); pyarrow's `detect` covers these for URIs.
OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def format_suffix(path: str | Path) -> str:
    """The suffix that names a file's format, under a compression's (".jsonl" of "x.jsonl.gz")."""
    name = Path(str(path).split("?")[0])
    return name.with_suffix("").suffix if name.suffix.lower() in OPENERS else name.suffix


def _open(path: str, mode: str = "rb", **options):
    """A local file, decompressed when its suffix names a compression."""
    return OPENERS.get(Path(path).suffix.lower(), open)(path, mode, **options)


def format_of_suffix(suffix: str) -> str | None:
    """The file format a suffix names (".csv" -> "csv"); None for one that names none."""
    return SUFFIX_FORMATS.get(suffix.lower())


class UnreadableFile(ValueError):
    """A data file that does not parse as its format, or does not fit the other files of its
    source. The message says where (the line, for JSON lines), `fix` what to change."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


PARSE_FIXES = {
    "jsonl": "write one JSON object per line, each field with one type on every line (quote numbers meant as text)",
    "csv": "give every row the header's columns; quote a field that holds a comma or a quote",
    "tsv": "give every row the header's columns; quote a field that holds a tab or a quote",
    "parquet": "write it again as Parquet, or set the source's format to the one it has",
    "text": "re-encode it as UTF-8",
    "conll": "one word and its tag per line (the tag last, after a space or a tab), a blank line after each sentence",
}


def _not_parsed(path: str, fmt: str, detail: str) -> UnreadableFile:
    return UnreadableFile(f"{path} does not read as {fmt}: {detail}", PARSE_FIXES[fmt])


def _read_file(path: str, fmt: str) -> pa.Table:
    data = _read_bytes(path)
    try:
        return _parse(data, fmt)
    except _BadRecord as error:
        raise _not_parsed(path, fmt, str(error)) from None
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        raise _unreadable(path, fmt, error, data) from None


def _scan_file(path: str, fmt: str) -> None:
    """Parse a local JSON-lines or CSV/TSV file through in blocks, keeping nothing (a corpus can be
    too large to load twice), a CoNLL file whole; other formats were checked by `check_source`."""
    if fmt == "conll":
        _read_file(path, fmt)
        return
    if fmt not in ("jsonl", "csv", "tsv"):
        return
    with _open(path, "rt", encoding="utf-8-sig") as handle:
        first = handle.readline()
    if fmt == "jsonl" and _opens_document(first):
        _read_file(path, fmt)  # one JSON document: it reads whole
        return
    delimiter = csv_delimiter(fmt, first)
    try:
        with _open(path, "rb") as handle:
            if handle.read(len(BOM)) != BOM:
                handle.seek(0)
            reader = (
                pajson.open_json(handle)
                if fmt == "jsonl"
                else pacsv.open_csv(handle, parse_options=pacsv.ParseOptions(delimiter=delimiter))
            )
            for _ in reader:
                pass
    except pa.ArrowInvalid as error:
        raise _unreadable(path, fmt, error, _read_bytes(path)) from None


def _unreadable(path: str, fmt: str, error: Exception, data: bytes) -> UnreadableFile:
    detail = (_first_bad_json_line(data) if fmt == "jsonl" else None) or _without_block_row(str(error))
    return _not_parsed(path, fmt, detail)


def _parse(data: bytes, fmt: str) -> pa.Table:
    if fmt == "parquet":
        return plain_types(pq.read_table(io.BytesIO(data)))
    if fmt == "jsonl":
        if (rows := json_document_rows(data)) is not None:
            return _table_of_records(rows)
        return pajson.read_json(io.BytesIO(data))
    if fmt in ("csv", "tsv"):
        delimiter = csv_delimiter(fmt, data[:4096].decode("utf-8", errors="replace"))
        return pacsv.read_csv(io.BytesIO(data), parse_options=pacsv.ParseOptions(delimiter=delimiter))
    if fmt == "conll":
        return _conll_table(data.decode("utf-8"))
    lines = [line for line in data.decode("utf-8").splitlines() if line.strip()]
    return pa.table({"text": lines})


def _conll_table(text: str) -> pa.Table:
    """CoNLL's column format: a word per line, its tag in the last column (CoNLL-2003's POS and chunk
    columns between are left out), a blank line after each sentence; `-DOCSTART-` lines skipped."""
    sentences: list[tuple[list[str], list[str]]] = []
    words: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(text.splitlines() + [""], start=1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        if len(fields) < 2:
            raise _BadRecord(f"line {number} has one column ({line.strip()!r}): a word and its tag are two")
        words.append(fields[0])
        tags.append(fields[-1])
    tokens, ner_tags = CONLL_COLUMNS
    return pa.table(
        {tokens: [words for words, _ in sentences], ner_tags: [tags for _, tags in sentences]},
        schema=pa.schema({tokens: pa.list_(pa.string()), ner_tags: pa.list_(pa.string())}),
    )


def csv_delimiter(fmt: str, header: str) -> str:
    """A tab for TSV; for CSV a comma, or a semicolon when the header line has semicolons and no
    comma (what a spreadsheet writes where the comma is the decimal mark)."""
    if fmt == "tsv":
        return "\t"
    line = header.split("\n", 1)[0]
    return ";" if ";" in line and "," not in line else ","


class _BadRecord(ValueError):
    """A record that does not read: a JSON document's whose field changes type, a CoNLL line without a tag."""


def _table_of_records(rows: list[dict]) -> pa.Table:
    columns = dict.fromkeys(name for row in rows for name in row)  # a field some records lack is null there
    try:
        return pa.table({name: [row.get(name) for row in rows] for name in columns})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        first_seen: dict[str, tuple[str, int]] = {}
        for number, row in enumerate(rows, start=1):
            if clash := _type_clash(first_seen, row, number, "record"):
                raise _BadRecord(clash) from None
        raise _BadRecord(str(error)) from None


def plain_types(table: pa.Table) -> pa.Table:
    """Columns as the JSON and CSV readers give them: pandas writes its strings as `large_string`
    and its categories as dictionaries, which would otherwise read as neither text nor labels."""
    schema = pa.schema([field.with_type(_plain_type(field.type)) for field in table.schema], table.schema.metadata)
    return table if schema == table.schema else table.cast(schema)


def _plain_type(kind: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(kind):
        return _plain_type(kind.value_type)
    if pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return pa.string()
    if any(test(kind) for test in (pa.types.is_list, pa.types.is_large_list, pa.types.is_list_view)):
        return pa.list_(_plain_type(kind.value_type))
    if pa.types.is_struct(kind):
        return pa.struct([field.with_type(_plain_type(field.type)) for field in kind])
    return kind


def _without_block_row(message: str) -> str:
    # Arrow counts "row N" within the block it was parsing (~1 MB), not in the file: misleading.
    # A CSV error quotes the row, which may span lines: one line here.
    return re.sub(r"\.? in row \d+$", "", message).replace("\n", "\\n")


def _json_kind(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):  # before int: a bool is an int to Python, not to Arrow
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def _first_bad_json_line(data: bytes) -> str | None:
    """The first line that is not a JSON object, or whose field has another type than on an earlier
    line; None when every line reads (Arrow's message says what else is wrong)."""
    first_seen: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = _json_object(line, number)
        except ValueError as error:
            return str(error)
        if clash := _type_clash(first_seen, record, number, "line"):
            return clash
    return None


def _type_clash(first_seen: dict[str, tuple[str, int]], record: dict, number: int, unit: str) -> str | None:
    """Why a record's field has another JSON type than where it was first seen (kept in `first_seen`)."""
    for field, value in record.items():
        kind = _json_kind(value)
        seen = first_seen.setdefault(field, (kind, number)) if kind else None
        if seen and seen[0] != kind:
            where = "on" if unit == "line" else "in"
            return f"{unit} {number}: {field!r} is {_a(kind)}, {where} {unit} {seen[1]} {_a(seen[0])}"
    return None


def _json_object(line: str, number: int) -> dict:
    """A JSON-lines record; a ValueError that says what is wrong with the line otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"line {number} is not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"line {number} is a JSON {_json_kind(record) or 'null'}, not an object")
    return record


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


RECORD_KEYS = ("data", "rows", "records", "examples", "instances", "items")


def json_document_rows(data: bytes) -> list[dict] | None:
    """The rows of a file that is one JSON document: SQuAD's nested JSON (`squad_rows`), an array of
    records (`[{"text": ..., "label": ...}, ...]`, pandas' `to_json(orient="records")`), or an object
    whose one list of records under RECORD_KEYS holds them (`{"data": [...]}`, what `datasets`'
    `field=` reads). None for anything else: JSON lines fail to parse as one document at their
    second line."""
    if data.lstrip()[:1] not in (b"{", b"["):
        return None
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if (rows := squad_rows(document)) is not None:
        return rows
    if isinstance(document, dict):  # under a key that names rows: a one-line JSON-lines file's row may hold a list
        lists = [value for key, value in document.items() if key in RECORD_KEYS and _records(value)]
        document = lists[0] if len(lists) == 1 else None
    return document if _records(document) else None


def _records(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(row, dict) for row in value)


def squad_rows(document: object) -> list[dict] | None:
    """SQuAD's nested JSON (`{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}`)
    as one row per question, answers columnar as in its Hugging Face copy; None for anything else."""
    articles = document.get("data") if isinstance(document, dict) else None
    if not isinstance(articles, list) or not all(isinstance(a, dict) and "paragraphs" in a for a in articles):
        return None
    return [
        {
            "id": str(qa.get("id", "")),
            "title": article.get("title", ""),
            "context": paragraph["context"],
            "question": qa["question"],
            "answers": {
                "text": [answer["text"] for answer in qa.get("answers", [])],
                "answer_start": [int(answer["answer_start"]) for answer in qa.get("answers", [])],
            },
        }
        for article in articles
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]


def _read_bytes(path: str) -> bytes:
    if "://" in path:
        filesystem, inner = pafs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner, compression="detect") as stream:
            return stream.read().removeprefix(BOM)
    with _open(path) as handle:
        return handle.read().removeprefix(BOM)


def source_columns(source: FileSource) -> list[str]:
    """Column names of the first file of a local source, read cheaply (header or first record)."""
    path = resolve_paths(source.path)[0]
    fmt = _file_format(source, path)
    if fmt == "parquet":
        return list(pq.read_schema(path).names)
    if fmt == "text":
        return ["text"]
    if fmt == "conll":
        return list(CONLL_COLUMNS)
    with _open(path, "rt", encoding="utf-8-sig") as handle:
        first = handle.readline()
    if fmt == "jsonl":
        if _opens_document(first) and (rows := json_document_rows(_read_bytes(path))) is not None:
            return list(dict.fromkeys(name for row in rows for name in row))
        try:
            return list(_json_object(first, 1)) if first.strip() else []
        except ValueError as error:
            raise _not_parsed(path, fmt, str(error)) from None
    return [name.strip().strip('"') for name in first.rstrip("\n").split(csv_delimiter(fmt, first))]


def check_source(source: Source, *, labelled: bool) -> list[tuple[str, str, str]]:
    """Problems with a source found without loading it: `(subkey, message, fix)` tuples.

    Local files are checked for existence and for the text/label columns; a Hub dataset for being in
    the local caches or on the Hub (one call, 5 s at most); remote URIs when they load.
    """
    if isinstance(source, HubSource):
        unavailable = hub_dataset_unavailable(source.name, source.revision)
        return [("name", *unavailable)] if unavailable else []
    if not isinstance(source, FileSource) or "://" in source.path:
        return []
    paths = resolve_paths(source.path)
    missing = [path for path in paths if not os.path.isfile(path)]
    if not paths or missing:
        return [("path", f"no file at {missing[0] if missing else source.path}", _what_exists(source.path))]
    for path in paths:
        if problem := unreadable_text(path, _file_format(source, path)):
            return [("path", *problem)]
    try:
        columns = source_columns(source)
    except UnreadableFile as error:
        return [("path", str(error), error.fix)]
    except (OSError, ValueError) as error:  # Arrow's errors are ValueErrors too
        return [("path", f"cannot read {paths[0]}: {error}", "check the file and its format")]
    return [
        (key, f"column {name!r} not in {paths[0]}", f"use one of its columns: {', '.join(columns)}")
        for key, name in _columns_read(source, labelled)
        if name not in columns
    ]


def unreadable_text(path: str, fmt: str) -> tuple[str, str] | None:
    """(why, fix) for a local data file that is empty or, unless Parquet, not UTF-8 text; else None."""
    if os.path.getsize(path) == 0:
        return f"{path} is empty", "give it examples"
    try:
        where = _not_utf8(path) if fmt != "parquet" else None
    except (OSError, EOFError, lzma.LZMAError) as error:  # gzip's BadGzipFile is an OSError
        return f"{path} does not decompress ({error})", "check the file, or give it uncompressed"
    if where is not None:
        fix = f"re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > fixed{Path(path).suffix}"
        if Path(path).suffix.lower() in OPENERS:
            fix = "decompress it, re-encode it as UTF-8 (iconv -f latin1 -t utf-8) and compress it again"
        return f"{path} is not UTF-8 text (byte {where})", fix
    return None


def _columns_read(source: FileSource, labelled: bool) -> list[tuple[str, str]]:
    """(config key, column name) of the columns every file of the source must have."""
    return [("text_column", source.text_column)] + ([("label_column", source.label_column)] if labelled else [])


def check_reads(source: Source) -> list[tuple[str, str, str]]:
    """Problems found by parsing a local source's files through (`check_source` reads only their
    first line): `(subkey, message, fix)` tuples."""
    if not isinstance(source, FileSource) or "://" in source.path:
        return []
    for path in resolve_paths(source.path):
        try:
            _scan_file(path, _file_format(source, path))
        except UnreadableFile as error:
            return [("path", str(error), error.fix)]
    return []


def _opens_document(first_line: str) -> bool:
    """Whether a JSON file's first line may open one JSON document (pretty-printed, or all on one
    line: an array, SQuAD's object) rather than JSON lines."""
    if not first_line.lstrip().startswith(("{", "[")):
        return False
    try:
        record = json.loads(first_line)
    except json.JSONDecodeError:
        return True  # one JSON document over several lines
    return isinstance(record, list) or (isinstance(record, dict) and "data" in record and "version" in record)


def _not_utf8(path: str, chunk: int = 1 << 20) -> int | None:
    """The offset of the first byte that is not UTF-8 in a text file, or None if all of it is."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with _open(path, "rb") as handle:
        while block := handle.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as error:
                return offset + error.start
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        return offset + error.start
    return None


def _what_exists(path: str) -> str:
    folder = Path(os.path.expandvars(os.path.expanduser(path))).parent
    if folder.is_dir():
        files = sorted(p.name for p in folder.iterdir())[:8]
        return f"point it at an existing file; {folder} holds: {', '.join(files) or 'nothing'}"
    return f"point it at an existing file; the folder {folder} does not exist either"


def fingerprint(source: Source) -> str:
    """A content fingerprint: file hashes, hub name + revision, or the generator's settings."""
    digest = hashlib.sha256(source.model_dump_json().encode())
    if isinstance(source, SyntheticSource):
        digest.update(f"generator-v{synthetic.VERSION}".encode())
    if isinstance(source, FileSource) and "://" not in source.path:
        for path in resolve_paths(source.path):
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]
