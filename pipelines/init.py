"""`ptft init DATA_FILE`: a commented pipeline config for one's own data, from the data itself.

Reads a CSV, TSV, JSONL, Parquet or text file; finds the text column (the string column with the
longest texts) and a label column (a named one, or one with few distinct values); reports the
labels and lengths; takes validation/test files beside a `train` file, or else writes a seeded,
stratified 80/10/10 split; sizes `tokenize.seq_len` from a tokenizer trained on the text; writes
a config that `ptft validate` accepts. Task types: sentence classification (a label column),
named entities (a column of word lists and one of tag lists, as CoNLL-2003), extractive question
answering (question, context and answers columns, or SQuAD's nested JSON), translation (a source
and a target text column, on a t5 pre-training), generation (a text column only, continued on a
gpt2 pre-training) and pre-training only (no labels).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from components import data
from components.stage import write_text_whole
from components.tasks.answers import answers_of
from pipelines import arguments
from pipelines.pipeline_config import ConfigError, Problem, validate

TASKS = ("auto", "classification", "entities", "answers", "translation", "generation", "pretrain")
QA_COLUMNS = ("question", "context", "answers")  # SQuAD's, as its nested JSON reads (components/data.py)
LABEL_NAMES = ("label", "labels", "class", "category", "sentiment", "target", "y", "intent", "topic")
TAG_NAMES = ("ner_tags", "tags", "labels", "label", "ner")
MAX_CLASSES = 50  # a column not named like a label is taken for one only with as few values
MAX_NAMED_CLASSES = 1000  # one named like a label (77 intents) may hold many
SHOWN_LABELS = 20
SPLIT_NAMES = {"validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
SPLIT_SHARES = {"train": 0.8, "validation": 0.1, "test": 0.1}
PASSES = 20  # over the text in pre-training: masked LM on a small corpus needs many
WINDOWED = {"answers": "longer contexts are read in windows", "entities": "longer sentences are read in windows"}
WORKERS, BATCH = 2, 32  # the config's training workers and blocks per worker and step
TRAIN_SHARE = 0.8  # of the estimated blocks: pre-training holds some out for its eval loss
CASED_TASKS = ("entities", "translation", "generation")  # their tokenizers keep case


@dataclass
class Plan:
    task: str
    text_column: str
    label_column: str | None
    splits: dict[str, Path]  # train/validation/test files (or the one corpus file)
    written_splits: bool
    seq_len: int
    vocab_size: int
    max_steps: int
    batch_size: int  # pre-training blocks per worker and step
    finetune_batch_size: int  # train examples per worker and step
    lengths: dict[str, int]
    labels: dict[str, int]
    incomplete: list[int]  # numbers of the rows left out of the written splits: no text or no label


def add_parser(commands) -> None:
    init = commands.add_parser("init", help="write a commented config for your own data file")
    init.add_argument("data_file", help="CSV, TSV, JSONL, Parquet or text file (one text per line)")
    init.add_argument(
        "--task",
        choices=TASKS,
        default="auto",
        help="default: answers for question, context and answers columns, entities for word and tag lists, "
        "else classification when a label column is found; translation: --text-column is the source, "
        "--label-column the target (default: the file's first two text columns); generation: the text "
        "column only (no label), continued by a gpt2 model served at POST /generate",
    )
    init.add_argument("--text-column", help="the column holding the text (default: detected)")
    init.add_argument("--label-column", help="the column holding the label (default: detected)")
    init.add_argument("-o", "--output", help="config file to write (default: configs/<data name>.yaml)")
    init.add_argument("--name", type=arguments.registry_name, help="pipeline name (default: from the file name)")
    init.add_argument("--seed", type=arguments.seed, default=0, help="seed of the proposed split (default 0)")
    init.add_argument("--force", action="store_true", help="overwrite the config (and split files) if they exist")
    init.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.data_file)
    table = _read(path)
    name = args.name or _name_of(path)
    output = Path(args.output or f"configs/{name}.yaml")
    if output.exists() and not args.force:
        raise ConfigError("ptft init", [Problem("--output", str(output), "exists", "pass --force or another -o")])
    new_folder = not output.parent.exists()
    plan = _plan(path, table, args, output.parent / f"{name}-data")
    text = _config_text(plan, name, path, output)
    try:
        validate(yaml.safe_load(text), str(output))  # what `ptft validate` checks, the data's labels included
    except ConfigError as error:
        problems = error.problems
        if plan.written_splits:  # a refused proposal leaves no files behind, so the next try needs no --force
            _remove_splits(plan.splits, output.parent if new_folder else None)
            written = {name for file in plan.splits.values() for name in (str(file), _relative(file))}
            problems = [_in_data_file(problem, path, written) for problem in problems]
        raise ConfigError(f"ptft init {path} (nothing written)", problems) from None
    write_text_whole(output, text)
    _report(plan, table, output)
    return 0


# --- reading and detecting ------------------------------------------------------------------------


def _read(path: Path) -> pa.Table:
    if not path.is_file():
        raise ConfigError("ptft init", [Problem("DATA_FILE", str(path), "no such file", "pass a data file")])
    if problem := data.unreadable_text(str(path), data.format_of_suffix(data.format_suffix(path)) or "jsonl"):
        raise ConfigError("ptft init", [Problem("DATA_FILE", str(path), *problem)])  # as `ptft validate` says it
    try:
        table = data.read_table(str(path))
    except (OSError, ValueError, UnicodeDecodeError, pa.ArrowInvalid) as error:
        fix = "JSON lines or one array of records, CSV, TSV, Parquet, text, CoNLL, or SQuAD's nested JSON"
        if not data.format_of_suffix(data.format_suffix(path)):
            fix = f"rename it with the suffix of its format ({', '.join(data.SUFFIX_FORMATS)})"
            suffix = data.format_suffix(path) or "(none)"
            error = f"the suffix {suffix!r} names no format, so it was read as JSON lines: {error}"
        raise ConfigError("ptft init", [Problem("DATA_FILE", str(path), f"cannot read: {error}", fix)]) from None
    if table.num_rows < 10:
        problem = Problem("DATA_FILE", str(path), f"{table.num_rows} rows", "give at least 10 examples")
        raise ConfigError("ptft init", [problem])
    return table


def _text_column(table: pa.Table, wanted: str | None) -> str:
    if wanted:
        _require_column(table, wanted, "--text-column")
        return wanted
    strings = [field.name for field in table.schema if pa.types.is_string(field.type)]
    if not strings:
        why = "no column of texts, nor a column of word lists beside one of tag lists"
        raise ConfigError("ptft init", [Problem("--text-column", None, why, "give a file with a text column")])
    return max(strings, key=lambda column: _mean_length(table, column))


def _word_and_tag_columns(table: pa.Table, args: argparse.Namespace) -> tuple[str, str] | None:
    """(words, tags) of an entities file: two columns of string lists, the tags the one with few
    distinct values (or the named ones); None when the file is not one."""
    lists = [field.name for field in table.schema if pa.types.is_list(field.type)]
    if args.task not in ("auto", "entities") or len(lists) < 2:
        return None
    if args.text_column and args.label_column:
        return args.text_column, args.label_column
    distinct = {column: len(pc.unique(pc.list_flatten(table.column(column)))) for column in lists}
    tags = args.label_column or min(lists, key=lambda c: (c.lower() not in TAG_NAMES, distinct[c]))
    words = args.text_column or max((c for c in lists if c != tags), key=lambda c: distinct[c])
    return words, tags


def _require_task_columns(table: pa.Table, task: str, entities: tuple[str, str] | None) -> None:
    """A task asked for by name needs the columns it reads; without them the file would silently
    get another task's config (a sentence classifier for `--task entities`)."""
    if task == "answers" and not set(QA_COLUMNS) <= set(table.column_names):
        needs = f"needs the columns {', '.join(QA_COLUMNS)} (SQuAD's: answers holds text and answer_start)"
    elif task == "entities" and entities is None:
        needs = "needs two columns of lists: the words and one tag per word (CoNLL's)"
    else:
        return
    fix = f"the file has: {', '.join(table.column_names)}; name another --task, or leave it out (auto)"
    raise ConfigError("ptft init", [Problem("--task", task, needs, fix)])


def _label_column(table: pa.Table, text: str, wanted: str | None, task: str) -> str | None:
    if task == "pretrain":
        return None
    if wanted:
        _require_column(table, wanted, "--label-column")
        return wanted
    # A column named like a label may hold many classes (77 intents); another one is taken for the
    # label only with few values, as a column of ids or scores has many.
    named = [
        c
        for c in table.column_names
        if c != text and c.lower() in LABEL_NAMES and _class_values(table, c, limit=MAX_NAMED_CLASSES)
    ]
    others = [column for column in table.column_names if column != text and _few_values(table, column)]
    found = (named or others or [None])[0]
    if found is None and task == "classification":
        problem = Problem("--label-column", None, f"no column with 2-{MAX_CLASSES} distinct values", "name it")
        raise ConfigError("ptft init", [problem])
    return found


def _source_and_target(table: pa.Table, args: argparse.Namespace) -> tuple[str, str]:
    """The named columns, else the file's first two text columns, in order."""
    for column, flag in ((args.text_column, "--text-column"), (args.label_column, "--label-column")):
        if column:
            _require_column(table, column, flag)
    strings = [field.name for field in table.schema if pa.types.is_string(field.type)]
    source = args.text_column or next((c for c in strings if c != args.label_column), None)
    target = args.label_column or next((c for c in strings if c != source), None)
    if source is None or target is None:
        why = "a translation file needs two text columns, a source and a target"
        raise ConfigError(
            "ptft init", [Problem("--label-column", None, why, "name them: --text-column --label-column")]
        )
    return source, target


def _generation_column(table: pa.Table, args: argparse.Namespace) -> str:
    """The text column (named or detected); a generation task reads no label column."""
    if args.label_column:
        why = "a generation task reads texts only: each text is its own label"
        problem = Problem("--label-column", args.label_column, why, "drop --label-column")
        raise ConfigError("ptft init", [problem])
    return _text_column(table, args.text_column)


def _few_values(table: pa.Table, column: str) -> bool:
    return _class_values(table, column, limit=min(MAX_CLASSES, max(2, table.num_rows // 5)))


def _class_values(table: pa.Table, column: str, limit: int) -> bool:
    """Whether a column can hold classes: strings, integers or booleans (or whole floats), 2 to
    `limit` of them, and each class seen twice on average."""
    values = table.column(column)
    if pa.types.is_floating(values.type):  # pandas writes an integer column with a gap as floats: 0.0, 1.0, NaN
        if not pc.all(pc.equal(values, pc.floor(values))).as_py():
            return False
    elif not (pa.types.is_integer(values.type) or pa.types.is_string(values.type) or pa.types.is_boolean(values.type)):
        return False
    return 2 <= len(values.unique()) <= min(limit, table.num_rows // 2)


def _require_column(table: pa.Table, column: str, flag: str) -> None:
    if column not in table.column_names:
        problem = Problem(flag, column, "not a column of the file", f"use one of: {', '.join(table.column_names)}")
        raise ConfigError("ptft init", [problem])


def _mean_length(table: pa.Table, column: str) -> float:
    texts = [text for text in table.column(column).to_pylist()[:2000] if text]
    return sum(map(len, texts)) / max(len(texts), 1)


# --- the plan -------------------------------------------------------------------------------------


def _plan(path: Path, table: pa.Table, args: argparse.Namespace, split_dir: Path) -> Plan:
    entities = _word_and_tag_columns(table, args)
    _require_task_columns(table, args.task, entities)
    if args.task in ("auto", "answers") and set(QA_COLUMNS) <= set(table.column_names):
        text, label, task = "context", "answers", "answers"
    elif args.task == "translation":
        (text, label), task = _source_and_target(table, args), "translation"
    elif args.task == "generation":
        text, label, task = _generation_column(table, args), None, "generation"
    elif entities:
        (text, label), task = entities, "entities"
    else:
        text = _text_column(table, args.text_column)
        label = _label_column(table, text, args.label_column, args.task)
        task = "classification" if label else "pretrain"
    if task != "pretrain":
        stratify = task == "classification"  # by label; the other tasks' labels are not classes
        splits, written, incomplete = _splits(path, table, text, label, split_dir, args.seed, args.force, stratify)
        train = table if splits["train"] == path else data.read_table(str(splits["train"]))  # read once
    else:
        splits, written, incomplete, train = {"corpus": path}, False, [], table
    texts = [_as_text(value) for value in train.column(text).to_pylist() if value]
    if task == "answers":  # a window holds the question too
        pairs = zip(train.column("question").to_pylist(), train.column(text).to_pylist(), strict=True)
        texts = [f"{question} {context}" for question, context in pairs]
    if task == "translation":  # one tokenizer and one block length for both languages
        texts += [str(value) for value in train.column(label).to_pylist() if value]
    vocab_size = _vocab_size(texts)
    token_lengths = _token_lengths(
        texts, vocab_size, lowercase=task not in CASED_TASKS, algorithm="bpe" if task == "generation" else "wordpiece"
    )
    labels = {}
    if label and task not in ("answers", "translation"):
        for value in train.column(label).to_pylist():
            for tag in value if task == "entities" else [value]:
                labels[str(tag)] = labels.get(str(tag), 0) + 1
    blocks = sum(token_lengths) / _seq_len(token_lengths)
    # A step takes WORKERS x batch blocks of the training share: a small corpus gets smaller steps
    # (the block count is an estimate, hence the margin), else its pre-training could not start.
    batch = int(max(1, min(BATCH, blocks * TRAIN_SHARE // WORKERS)))
    return Plan(
        task=task,
        text_column=text,
        label_column=label,
        splits=splits,
        written_splits=written,
        seq_len=_seq_len(token_lengths),
        vocab_size=vocab_size,
        max_steps=int(max(200, min(5000, round(PASSES * blocks / (WORKERS * batch), -1)))),
        batch_size=batch,
        # A small train split gets smaller fine-tuning steps, else no step could be filled.
        finetune_batch_size=int(max(1, min(BATCH, train.num_rows // WORKERS))),
        lengths=_percentiles(token_lengths),
        labels=dict(sorted(labels.items())),
        incomplete=incomplete,
    )


def _splits(path, table, text, label, split_dir, seed, force, stratify) -> tuple[dict[str, Path], bool, list[int]]:
    """Validation and test files beside a train file (train.jsonl, validation.jsonl, ...), or a
    stratified, seeded split written to `split_dir` of the rows with a text and a label (the
    numbers of the others are returned, for the report: validation would refuse them)."""
    if "train" in path.stem:
        found = {"train": path}
        for split, names in SPLIT_NAMES.items():
            for candidate in names:
                sibling = path.with_name(path.name.replace("train", candidate))
                if sibling.is_file():
                    found[split] = sibling
                    break
        if len(found) == 3:
            return found, False, []
    columns = [text, *([label] if label else []), *(["question"] if "question" in table.column_names else [])]
    rows, incomplete = [], []
    for number, row in enumerate(table.select(columns).to_pylist(), 1):
        if row[text] is None or (label and row[label] is None):
            incomplete.append(number)
        else:
            rows.append(row)
    by_label: dict[str, list[dict]] = {}
    for row in rows:  # an entities row has many tags, a question its answers: a seeded shuffle, not stratified
        by_label.setdefault(str(row[label]) if stratify else "", []).append(row)
    chosen: dict[str, list[dict]] = {split: [] for split in SPLIT_SHARES}
    rng = random.Random(seed)
    for group in by_label.values():  # stratified: each label split 80/10/10 on its own
        rng.shuffle(group)
        held = max(1, math.floor(len(group) * SPLIT_SHARES["validation"])) if len(group) >= 3 else 0
        chosen["validation"] += group[:held]
        chosen["test"] += group[held : 2 * held]
        chosen["train"] += group[2 * held :]
    files = {split: split_dir / f"{split}.jsonl" for split in SPLIT_SHARES}
    existing = [str(file) for file in files.values() if file.exists()]
    if existing and not force:
        raise ConfigError("ptft init", [Problem("split", existing[0], "exists", "pass --force to write it again")])
    split_dir.mkdir(parents=True, exist_ok=True)
    for split, file in files.items():
        rng.shuffle(chosen[split])
        file.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in chosen[split]))
    return files, True, incomplete


def _in_data_file(problem: Problem, path: Path, written: set[str]) -> Problem:
    """A problem found in the splits init wrote (and removed), as the config names them, is one of the data file."""
    if not any(name in str(problem.value) for name in written):
        return problem
    return Problem("DATA_FILE", str(path), problem.message, problem.fix)


def _remove_splits(splits: dict[str, Path], new_folder: Path | None) -> None:
    for file in splits.values():
        file.unlink(missing_ok=True)
    for folder in (next(iter(splits.values())).parent, new_folder):  # the folders init made, once empty
        if folder and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _vocab_size(texts: list[str]) -> int:
    words = {word for text in texts for word in text.lower().split()}
    return int(min(16000, max(1000, round(len(words) / 2, -3))))


def _as_text(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _token_lengths(
    texts: list[str], vocab_size: int, lowercase: bool = True, algorithm: str = "wordpiece"
) -> list[int]:
    from components.schemas import TokenizeConfig
    from components.tokenize import train_tokenizer

    config = TokenizeConfig(algorithm=algorithm, vocab_size=vocab_size, seq_len=4096, lowercase=lowercase)
    tokenizer = train_tokenizer(texts, config)
    return [len(ids) for ids in tokenizer(texts[:20000])["input_ids"]]


def _seq_len(lengths: list[int]) -> int:
    """The 99th percentile, rounded up to a multiple of 16, between 16 and 512."""
    p99 = sorted(lengths)[min(len(lengths) - 1, int(0.99 * len(lengths)))]
    return int(min(512, max(16, 16 * math.ceil(p99 / 16))))


def _percentiles(lengths: list[int]) -> dict[str, int]:
    ordered = sorted(lengths)
    at = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
    return {
        "mean": round(sum(ordered) / len(ordered)),
        **{name: ordered[min(len(ordered) - 1, int(share * len(ordered)))] for name, share in at.items()},
        "max": ordered[-1],
    }


def _name_of(path: Path) -> str:
    stem = (path.with_suffix("") if path.suffix.lower() in data.OPENERS else path).stem  # train.jsonl.gz: train
    stem = stem if stem not in ("train", "data") else path.resolve().parent.name
    return "".join(char if char.isalnum() or char in "-_" else "-" for char in stem.lower()) or "pipeline"


# --- the config -----------------------------------------------------------------------------------


def _relative(path: Path) -> str:
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(Path.cwd()))
    except ValueError:
        return str(resolved)


def _config_text(plan: Plan, name: str, source: Path, output: Path) -> str:
    lengths = ", ".join(f"{key} {value}" for key, value in plan.lengths.items())
    text = plan.text_column
    if plan.task == "entities":
        columns = f"words column {text!r}, tags column {plan.label_column!r}"
    elif plan.task == "answers":
        columns = f"question column 'question', context column {text!r}, answers column {plan.label_column!r}"
    elif plan.task == "translation":
        columns = f"source column {text!r}, target column {plan.label_column!r}"
    else:
        columns = f"text column {text!r}" + (f", label column {plan.label_column!r}" if plan.label_column else "")
    if plan.written_splits:
        columns += f"; split 80/10/10 ({_split_kind(plan)}) into {_relative(plan.splits['train'].parent)}/"
    header = [
        f"# ptft pipeline for {source}, written by `ptft init`.",
        "#",
        f"# Task:   {_task_line(plan)}",
        f"# Data:   {columns}",
        f"# Tokens: per text (a tokenizer trained on it): {lengths}; seq_len covers 99%",
        f"# Launch: ptft run {output}",
        f"# Tweak:  ptft run {output} pretrain.max_steps=200"
        + (" tune.num_samples=2" if plan.task != "pretrain" else ""),
        "",
    ]
    corpus_file = plan.splits.get("train", plan.splits.get("corpus"))
    lines = [
        f"name: {name}",
        "storage: ./ptft-runs",
        "seed: 0",
        "",
        "data:",
        "  corpus:",
        "    # Pre-training reads the train split's text only: validation/test text would leak into the model.",
        f"    source: {{type: file, path: {_relative(corpus_file)}, text_column: {text}}}",
    ]
    if plan.task == "translation":
        lines += [
            f"    text_columns: [{text}, {plan.label_column}]   # both languages: one tokenizer, one pre-training"
        ]
    if plan.task != "pretrain":
        lines += ["  task:"]
    if plan.task == "entities":
        lines += ["    type: token_classification   # a list of words and a list of IOB2 tags per row"]
    if plan.task == "translation":
        lines += ["    type: translation   # a source text and its target text per row"]
    if plan.task == "generation":
        lines += ["    type: generation    # a text per row, its own label: the model learns each next token"]
    if plan.task == "answers":
        lines += [
            "    type: question_answering   # a question, a context and the answers' spans in it per row",
            "    doc_stride: 128            # tokens that windows of a context longer than seq_len share",
        ]
    if plan.task != "pretrain":
        label = f", label_column: {plan.label_column}" if plan.label_column else ""
        lines += [
            f"    {split}: {{type: file, path: {_relative(plan.splits[split])}, text_column: {text}{label}}}"
            for split in ("train", "validation", "test")
        ]
    lines += [
        "",
        "tokenize:",
        f"  vocab_size: {plan.vocab_size:<6}  # about half the distinct words of the text",
        f"  seq_len: {plan.seq_len:<9}  # 99% of the texts fit (p99 {plan.lengths['p99']} tokens)"
        + (f"; {WINDOWED[plan.task]}" if plan.task in WINDOWED else ""),
        *(["  lowercase: false    # case tells names apart"] if plan.task == "entities" else []),
        *(["  lowercase: false    # translations are compared cased"] if plan.task == "translation" else []),
        *(
            [
                "  algorithm: bpe      # byte-level, as GPT-2's: any text round-trips, spacing and all",
                "  lowercase: false    # the continuations keep the texts' case",
            ]
            if plan.task == "generation"
            else []
        ),
        "",
        "pretrain:",
        _model_line(plan),
        f"  max_steps: {plan.max_steps:<7}  # about {PASSES} passes over the text",
        f"  batch_size_per_worker: {plan.batch_size}"
        + (
            f"   # a small corpus (about {plan.batch_size * WORKERS} blocks a step fit it)"
            if plan.batch_size < BATCH
            else ""
        ),
        "  learning_rate: 5.0e-4",
        f"  warmup_steps: {max(10, plan.max_steps // 10)}",
        f"  workers: {{num_workers: {WORKERS}, cpus_per_worker: 1}}",
    ]
    if plan.task != "pretrain":
        lines += [
            "",
            "tune:             # optimises " + _headline(plan),
            "  num_samples: 4",
            "  max_epochs: 3",
            "  max_concurrent_trials: 2",
            "  search_space:",
            "    learning_rate: {type: loguniform, low: 5.0e-5, high: 1.0e-3}",
            "    weight_decay: {type: uniform, low: 0.0, high: 0.1}",
            "",
            "finetune:",
            "  epochs: 3",
            "  early_stopping_patience: 1",
            f"  defaults: {{batch_size_per_worker: {plan.finetune_batch_size}}}{_small_train_note(plan)}",
            f"  workers: {{num_workers: {WORKERS}, cpus_per_worker: 1}}",
            "",
            "serve:",
            "  # Asked of the served model at the end of `ptft run` (and in the report): the data's own.",
            "  sample_texts:",
            *(f"    - {sample}" for sample in _sample_inputs(plan)),
        ]
    return "\n".join(header + lines) + "\n"


def _small_train_note(plan: Plan) -> str:
    if plan.finetune_batch_size >= BATCH:
        return ""
    return f"   # a small train split ({plan.finetune_batch_size * WORKERS} examples a step fit it)"


SAMPLE_CHARS = 120  # a sample text that fits on the summary's line


def _sample_inputs(plan: Plan, count: int = 2) -> list[str]:
    """`count` inputs to the served model from the validation split (short ones, so the run's
    summary stays legible), each as a YAML flow value."""
    rows = data.read_table(str(plan.splits["validation"])).to_pylist()
    if plan.task == "answers":  # a question about each of the shortest contexts
        by_context = {row[plan.text_column]: row["question"] for row in reversed(rows)}  # its first question
        shortest = sorted(by_context, key=len)[:count]
        return [_flow({"question": by_context[context], "context": context}) for context in shortest]
    texts = [_as_text(row[plan.text_column]) for row in rows if row[plan.text_column]]
    if plan.task == "generation":  # a prompt: the opening words of a text
        texts = [" ".join(text.split()[:4]) for text in texts]
    short = [text for text in texts if len(text) <= SAMPLE_CHARS] or sorted(texts, key=len)
    return [json.dumps(text, ensure_ascii=False) for text in short[:count]]


def _flow(mapping: dict[str, str]) -> str:
    """A YAML flow mapping of strings (JSON strings are YAML's double-quoted scalars)."""
    return "{" + ", ".join(f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in mapping.items()) + "}"


def _split_kind(plan: Plan) -> str:
    return "stratified, seeded" if plan.task == "classification" else "seeded"


def _model_line(plan: Plan) -> str:
    if plan.task == "translation":
        return "  model: {family: bart, preset: mini} # an encoder-decoder, pre-trained with span corruption"
    if plan.task == "generation":
        return "  model: {family: gpt2, preset: mini} # a decoder, pre-trained as a causal LM on the train texts"
    return "  model: {preset: mini}     # hidden 256, 4 layers; `tiny` for a quick look, `small`/`base` on a GPU"


def _headline(plan: Plan) -> str:
    headlines = {
        "entities": "entity F1 (eval/f1)",
        "answers": "SQuAD token F1 (eval/f1)",
        "translation": "BLEU (eval/bleu)",
        "generation": "next-token accuracy (eval/accuracy)",
    }
    return headlines.get(plan.task, "eval/accuracy")


def _task_line(plan: Plan) -> str:
    if plan.task == "answers":
        return "extractive question answering: tokenize -> pretrain -> tune -> finetune -> serve"
    if plan.task == "translation":
        return (
            f"translation {plan.text_column} -> {plan.label_column}: tokenize -> pretrain -> tune -> finetune -> serve"
        )
    if plan.task == "generation":
        return (
            "generation (the model continues these texts; served at POST /generate): "
            "tokenize -> pretrain -> tune -> finetune -> serve"
        )
    if plan.task == "entities":
        types = sorted({tag.split("-", 1)[1] for tag in plan.labels if "-" in tag})
        return f"named entities ({', '.join(types)}): tokenize -> pretrain -> tune -> finetune -> serve"
    if plan.task == "classification":
        return f"sentence classification, {len(plan.labels)} labels: tokenize -> pretrain -> tune -> finetune -> serve"
    return "pre-training only (no label column): tokenize -> pretrain"


def _report(plan: Plan, table: pa.Table, output: Path) -> None:
    print(f"Read {table.num_rows} rows; columns: {', '.join(table.column_names)}")
    print(f"Text column: {plan.text_column!r}")
    if plan.task == "answers":
        print(f"Question column 'question', answers column {plan.label_column!r}: spans of the context")
        if unanswered := sum(not answers_of(value) for value in table.column(plan.label_column).to_pylist()):
            print(f"  {unanswered} questions have no answer: learned as unanswerable (SQuAD 2.0), answered with ''")
    elif plan.task == "translation":
        print(f"Target column: {plan.label_column!r} (the source is the text column)")
    elif plan.task == "generation":
        print("No label column read: generation, each text is its own label (the model learns its next tokens)")
    elif plan.label_column:
        counts = ", ".join(f"{label} ({count})" for label, count in list(plan.labels.items())[:SHOWN_LABELS])
        if len(plan.labels) > SHOWN_LABELS:
            counts += f", and {len(plan.labels) - SHOWN_LABELS} more ({len(plan.labels)} in all)"
        what = "Tag column" if plan.task == "entities" else "Label column"
        print(f"{what}: {plan.label_column!r}; {'tags' if plan.task == 'entities' else 'labels'} in train: {counts}")
    else:
        print("No label column: a pre-training-only config (pass --label-column to fine-tune a classifier)")
        texts = [field.name for field in table.schema if pa.types.is_string(field.type)]
        if len(texts) >= 2:
            print(f"Two text columns: --task translation --text-column {texts[0]} --label-column {texts[1]} translates")
        print(f"--task generation fine-tunes a gpt2 model to continue the {plan.text_column!r} texts (POST /generate)")
    for split, file in plan.splits.items():
        print(f"  {split:<10} {file}" + (f"  (written: {_split_kind(plan)} split)" if plan.written_splits else ""))
    if plan.incomplete:
        shown = ", ".join(map(str, plan.incomplete[:5])) + (", ..." if len(plan.incomplete) > 5 else "")
        print(f"Left out of the splits: {len(plan.incomplete)} row(s) without a text or a label (rows {shown})")
    print("Tokens per text: " + ", ".join(f"{key} {value}" for key, value in plan.lengths.items()))
    print(f"seq_len {plan.seq_len}, vocab_size {plan.vocab_size}, pretrain.max_steps {plan.max_steps}")
    print(f"Wrote {output}. Check it: ptft validate {output}   Run it: ptft run {output}")
