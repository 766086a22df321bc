"""`ptft predict`: a model's answers for every row of a data file, computed on Ray (batch inference).

The file is read as the stages read data (JSON lines, CSV/TSV, Parquet, plain text; compressed or
not), checked before Ray starts, and split over a pool of Ray Data actors that each load the model
once (components/batch_predict.py). The answers come back in the file's order, and the output is
the input with one more column, `prediction`: for each row what `POST /predict` answers for it. The
output appears whole or not at all (written aside, then renamed), and an existing file is replaced
only with --force.

The answers are written as they come, batch by batch: the driver holds the input table, not every
row's answer (those only with --label-column, which scores them), nor the output's bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

from components import console
from components.batch_predict import PREDICTION
from components.redaction import redact_url
from components.stage import errors_naming
from components.tasks.base import expected_names
from pipelines import arguments, preflight
from pipelines.pipeline_config import (
    ConfigError,
    PipelineConfig,
    Problem,
    command_config,
    model_reference_problems,
)

OUTPUT_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")
PARQUET_CHUNK_ROWS = 2**14  # answers held as objects at most this many before they become Arrow structs
PROGRESS_EVERY_S = 10.0  # a progress line this often when the console is no terminal


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `predict` on the `ptft` parser."""
    predict = commands.add_parser(
        "predict",
        help="answer every row of a data file with a model, on Ray (batch inference)",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    predict.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a Hugging Face model folder")
    predict.add_argument("input", help="a data file: .jsonl, .json, .csv, .tsv, .parquet or .txt (a text a line)")
    predict.add_argument("overrides", nargs="*", help="dotted overrides of the config, e.g. ray.address=auto")
    predict.add_argument(
        "--output",
        required=True,
        metavar="FILE",
        help=f"the rows with their predictions: {', '.join(OUTPUT_SUFFIXES)}",
    )
    predict.add_argument("--force", action="store_true", help="replace --output if it exists")
    predict.add_argument("--text-column", default="text", help="the column of texts (default text)")
    predict.add_argument(
        "--question-column", default="question", help="question answering: the column of questions (default question)"
    )
    predict.add_argument(
        "--context-column", default="context", help="question answering: the column of contexts (default context)"
    )
    predict.add_argument(
        "--label-column",
        metavar="COLUMN",
        help="also score the answers against this column's expected values (a label, answers, a reference)",
    )
    predict.add_argument(
        "--batch-size", type=arguments.positive_int, default=32, help="rows a forward pass (default 32)"
    )
    predict.add_argument(
        "--workers",
        type=arguments.positive_int,
        help="model copies answering at once (default: as many as the cluster's CPUs hold)",
    )
    predict.add_argument(
        "--cpus-per-worker",
        type=arguments.positive_int,
        default=1,
        help="CPUs (and torch threads) each worker takes (default 1): fewer, larger workers hold fewer model copies",
    )
    predict.add_argument(
        "--config",
        help="pipeline YAML whose tracking, ray and storage blocks apply (default: their defaults, "
        "storage ./ptft-runs and its MLflow store, as configs/demo.yaml sets)",
    )
    predict.add_argument(
        "--storage",
        metavar="PATH",
        help="the storage whose logs/ folder gets the log; same as the override storage=PATH",
    )
    predict.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="stream the logs of Ray and the workers to the console (default: a log file under storage/logs)",
    )
    predict.set_defaults(handler=_predict)


@dataclass(frozen=True)
class Job:
    """What `ptft predict` answers, checked: the rows, the model and which columns it reads."""

    table: pa.Table
    model: object  # components.model_ref.ModelInfo
    task: object  # components.tasks.TaskType
    inputs: dict[str, str]  # what the model reads -> the column holding it
    labels: list[str]  # the model's label names in id order, when --label-column asks for them


def _predict(args: argparse.Namespace) -> int:
    config = command_config(args.config, args.overrides)
    tracking_uri = config.tracking_uri()
    job = _checked_job(args, config, tracking_uri)
    from pipelines.cli import logged_console

    stamp = time.strftime("%Y%m%d-%H%M%S")
    with logged_console(args, config.storage_path() / "logs" / f"predict-{stamp}.log") as log:
        if log:
            console.say(f"[ptft] predict with {_named(job.model)}; logs of Ray and the workers: {log}")
        started = time.monotonic()
        workers = _start_ray(config, job.table.num_rows, args)
        # closed as soon as a write fails, which ends its progress display (the traceback would hold it open)
        with contextlib.closing(_answers(job, tracking_uri, args, workers)) as batches:
            answers = _write(Path(args.output), job.table, batches, keep=bool(args.label_column))
        took, rows = time.monotonic() - started, job.table.num_rows
        scored = _scored(job, args, answers, rows_per_s=rows / took) if args.label_column else None
        # Recorded inside the log's scope: MLflow's own lines (a new store's tables) go to the log.
        recorded = _record_line(job, args, config, scored) if scored else ""
    console.say(
        f"Wrote {rows:,} predictions of {_named(job.model)} to {args.output} in {took:.0f} s "
        f"({rows / took:.1f} rows/s, {workers} worker{'s' if workers != 1 else ''})"
    )
    if scored:
        shown = ", ".join(f"{name} {value:.4f}" for name, value in scored.scores.items())
        console.say(f"Scores against {args.label_column!r} ({rows:,} rows): {shown}")
        console.say(recorded)
    return 0


def _scored(job: Job, args: argparse.Namespace, answers: list[dict], rows_per_s: float) -> Scored:
    expected = job.table.column(args.label_column).to_pylist()
    scores = job.task.score_answers(answers, expected, job.labels)
    matrix = _confusion_matrix(answers, expected, job.labels, job.task.reads_words) if job.labels else None
    return Scored(scores, matrix, rows_per_s=rows_per_s)


def _checked_job(args: argparse.Namespace, config: PipelineConfig, tracking_uri: str | None) -> Job:
    """The input, the model and the output checked before Ray starts.

    Raises:
        ConfigError: with every problem found, naming the option or file.
    """
    problems = model_reference_problems(args.model, "MODEL", tracking_uri) + _output_problems(args)
    table, input_problems = _read_input(args.input)
    if problems or input_problems:
        raise ConfigError("ptft predict", problems + input_problems)
    model, task, model_config = _model_and_task(args.model, tracking_uri)
    inputs = _inputs(task.example, args)
    labels = _label_names(model_config) if args.label_column and task.has_classes else []
    problems = _column_problems(table, inputs, args, task.reads_words)
    problems += _label_problems(table, task, args.label_column, labels, words=inputs.get("text"))
    problems += _writable_problems(table, Path(args.output)) + _record_problems(args, tracking_uri)
    if not problems and not config.cluster_address():
        problems = preflight.local_ray_problems()
    if problems:
        raise ConfigError("ptft predict", problems)
    return Job(table, model, task, inputs, labels)


def _record_problems(args: argparse.Namespace, tracking_uri: str) -> list[Problem]:
    """Scores are recorded in the tracking store: it answers (a registered model's lookup asked it already)."""
    from components.net import mlflow_unanswered

    if not args.label_column or args.model.startswith("models:/") or not (reason := mlflow_unanswered(tracking_uri)):
        return []
    why = f"the scores are recorded there, and it did not answer: {reason}"
    return [
        Problem(
            "tracking.uri", redact_url(tracking_uri), why, "start the MLflow server, or point at the one that is up"
        )
    ]


def _named(model) -> str:
    return f"the model folder {model.model_uri}" if model.version == "local" else f"{model.name} v{model.version}"


def _output_problems(args: argparse.Namespace) -> list[Problem]:
    problems = arguments.output_file_problems("--output", args.output, "predictions.jsonl", OUTPUT_SUFFIXES)
    if not problems and Path(args.output).exists() and not args.force:
        problems.append(Problem("--output", args.output, "exists", "name another file, or pass --force to replace it"))
    return problems


def _read_input(path: str) -> tuple[pa.Table | None, list[Problem]]:
    """The whole file as a table, or why it cannot be read."""
    from components import data

    if not Path(path).is_file():
        why = "a folder" if Path(path).is_dir() else "no such file"
        return None, [Problem("INPUT", path, why, "name a data file: .jsonl, .json, .csv, .tsv, .parquet or .txt")]
    try:
        table = data.read_table(path)
    except data.UnreadableFile as error:
        return None, [Problem("INPUT", path, str(error), error.fix)]
    if table.num_rows == 0:
        return None, [Problem("INPUT", path, "holds no rows", "name a file with at least one row")]
    return table, []


def _model_and_task(reference: str, tracking_uri: str | None):
    """The model (`ModelInfo`), its task type (whose input example says what a row gives it: a
    text, or a question and its context; and which scores its answers) and its transformers config,
    read as the workers will load it: the task from its head."""
    from mlflow.exceptions import MlflowException

    from components.model_ref import RegistryUnavailable, resolve_model
    from components.tasks import task_of_model

    try:
        model = resolve_model(reference, tracking_uri)
        model_config = _model_config(model, tracking_uri)
        return model, task_of_model(model_config), model_config
    except RegistryUnavailable as error:
        problem = Problem("tracking.uri", redact_url(tracking_uri), str(error), "start the MLflow server, or name one")
        raise ConfigError("ptft predict", [problem]) from None
    except (ValueError, OSError, MlflowException) as error:  # no such version, no config.json, an unknown head
        raise ConfigError("ptft predict", [Problem("MODEL", reference, str(error), "check the name")]) from None


def _model_config(model, tracking_uri: str | None):
    """The model's transformers config alone, not its weights: two small files of a registered
    model, its `MLmodel` (which says where its Hugging Face folder lies: a question-answering,
    translation or generation model is a pyfunc around it) and that folder's `config.json`."""
    from transformers import AutoConfig

    if not model.model_uri.startswith("models:/"):
        return AutoConfig.from_pretrained(model.model_uri)
    import mlflow

    from components.registry import hf_folder_of
    from components.scratch import ScratchFolder

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # small files
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)  # the registry's too; download_artifacts' own is not
    with ScratchFolder("model-config") as folder:

        def download(path: str) -> str:
            uri = f"{model.model_uri}/{path}"
            return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder))

        logged = mlflow.models.Model.load(download("MLmodel"))
        return AutoConfig.from_pretrained(Path(download(f"{hf_folder_of(logged)}/config.json")).parent)


def _inputs(example, args: argparse.Namespace) -> dict[str, str]:
    """What the model reads -> the input's column that holds it."""
    if isinstance(example, dict):
        return {field: getattr(args, f"{field}_column") for field in example}
    return {"text": args.text_column}


def _column_problems(
    table: pa.Table, inputs: dict[str, str], args: argparse.Namespace, reads_words: bool = False
) -> list[Problem]:
    """Each column the model reads is there and holds a text in every row (or, for a model that
    tags words, a list of words)."""
    problems = []
    if PREDICTION in table.column_names:
        why = f"already has a column {PREDICTION!r}, which the output adds"
        problems.append(Problem("INPUT", args.input, why, f"rename or drop the input's {PREDICTION!r} column"))
    for field, column in inputs.items():
        option = f"--{field}-column"
        if column not in table.column_names:
            why = f"{args.input} has no column {column!r}; its columns: {', '.join(table.column_names)}"
            problems.append(Problem(option, column, why, f"name the column of {field}s with {option}"))
            continue
        values = table.column(column)
        if not (_texts(values.type) or (reads_words and _word_lists(values.type))):
            why = f"holds {values.type} values, not texts" + (" or lists of words" if reads_words else "")
            problems.append(Problem(option, column, why, f"name a column of {field}s, or quote its values as texts"))
        elif values.null_count:
            why = f"{values.null_count:,} row(s) have no {field}, the first is row {_first_missing_row(values)}"
            problems.append(Problem(option, column, why, f"give every row a {field}, or leave those rows out"))
    return problems


def _texts(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _word_lists(kind: pa.DataType) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and _texts(kind.value_type)


def _first_missing_row(values: pa.ChunkedArray) -> int:
    """The row number (from 1) of a column's first null."""
    return values.is_null().to_pylist().index(True) + 1


def _label_names(model_config) -> list[str]:
    """The model's label names in id order."""
    return [model_config.id2label[number] for number in range(model_config.num_labels)]


def _label_problems(
    table: pa.Table, task, column: str | None, labels: list[str], words: str | None = None
) -> list[Problem]:
    """The expected values are there for every row, the model's type scores its answers, and an
    expected label is one of the model's (an integer: a label id). A model that tags words is
    scored on lists of words (the column `words`) with a tag each."""
    if column is None:
        return []
    if task.score_answers is None:
        why = f"a {task.name} model's answers are not scored against a column"
        return [Problem("--label-column", column, why, "leave it out; its finetune stage scores the test split")]
    if column not in table.column_names:
        why = f"the input has no column {column!r}; its columns: {', '.join(table.column_names)}"
        return [Problem("--label-column", column, why, "name the column of expected values")]
    if missing := table.column(column).null_count:
        why = f"{missing:,} row(s) have no expected value, the first is row {_first_missing_row(table.column(column))}"
        return [Problem("--label-column", column, why, "give every row one, or leave those rows out")]
    if task.reads_words and (problem := _tag_problem(table, column, words)):
        return [problem]
    expected = table.column(column).to_pylist()
    if task.reads_words:  # a list of tags per row
        expected = [tag for row in expected for tag in row]
    if labels and (unknown := sorted(set(expected_names(expected, labels)) - set(labels))):
        shown = ", ".join(map(repr, unknown[:8])) + (", ..." if len(unknown) > 8 else "")
        why = f"holds labels the model does not have: {shown} (its labels: {', '.join(labels)})"
        return [Problem("--label-column", column, why, "name the column of the labels it was trained on")]
    return []


def _tag_problem(table: pa.Table, column: str, words: str | None) -> Problem | None:
    """Why a tagger's answers cannot be scored against `column`: the words are texts, not lists
    (a tag per word needs the words as the tags count them), or a row's tags and words differ in number."""
    if words not in table.column_names or not _word_lists(table.column(words).type):
        why = "a tagger is scored word by word: its words must be a list per row, as the tags are"
        return Problem(
            "--label-column", column, why, "name the column of word lists with --text-column (CoNLL's tokens)"
        )
    tags = table.column(column)
    if not (pa.types.is_list(tags.type) or pa.types.is_large_list(tags.type)):
        why = f"holds {tags.type} values, not a list of tags per row"
        return Problem("--label-column", column, why, "name the column of tag lists (CoNLL's ner_tags)")
    for row, (row_words, row_tags) in enumerate(zip(table.column(words).to_pylist(), tags.to_pylist(), strict=True)):
        if len(row_words or []) != len(row_tags):
            why = f"row {row + 1} has {len(row_words or [])} words in {words!r} but {len(row_tags)} tags"
            return Problem("--label-column", column, why, "give one tag per word")
    return None


def _writable_problems(table: pa.Table, output: Path) -> list[Problem]:
    """Whether the input's columns can be written in the output's format, tried on its first row."""
    try:
        _write_rows(io.BytesIO(), output.suffix.lower(), table.slice(0, 1), [[{"label": "x"}]])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError) as error:
        why = f"the input's columns do not fit a {output.suffix} file ({error})"
        return [Problem("--output", str(output), why, "write .jsonl or .parquet, which hold any column")]
    return []


def _start_ray(config: PipelineConfig, rows: int, args: argparse.Namespace) -> int:
    """Ray connected (a local one started), and how many actors answer: --workers, else as many as
    the cluster's nodes hold at --cpus-per-worker each, never more than there are batches."""
    from pipelines.runner import _init_ray

    with console.spinner("Starting Ray ..."):
        _init_ray(config)
    nodes = preflight.alive_nodes().values()
    room = sum(int(node.get("CPU", 0) // args.cpus_per_worker) for node in nodes)
    most = max((int(node.get("CPU", 0)) for node in nodes), default=0)
    if room == 0:
        why = f"no node of the cluster has {args.cpus_per_worker} CPUs (the largest has {most})"
        problem = Problem("--cpus-per-worker", args.cpus_per_worker, why, f"use at most {most}")
        raise ConfigError("ptft predict", [problem])
    if args.workers and args.workers > room:
        why = f"the cluster's nodes hold {room} worker(s) of {args.cpus_per_worker} CPU(s)"
        raise ConfigError("ptft predict", [Problem("--workers", args.workers, why, f"ask for at most {room}")])
    batches = -(-rows // args.batch_size)
    return args.workers or min(room, batches)


def _answers(job: Job, tracking_uri: str | None, args: argparse.Namespace, workers: int) -> Iterator[list[dict]]:
    """Every row's answer, batch by batch in the table's order, with the rows done shown as they come."""
    from components.batch_predict import predictions

    done, shown_at = 0, time.monotonic()
    total = job.table.num_rows
    batches = predictions(
        job.table,
        job.model.model_uri,
        tracking_uri,
        job.inputs,
        batch_size=args.batch_size,
        workers=workers,
        cpus_per_worker=args.cpus_per_worker,
    )
    with console.live() as on_terminal:
        bar = _progress_bar(total) if on_terminal else None
        for batch in batches:
            yield batch
            done += len(batch)
            if bar is not None:
                bar.update(bar.task_ids[0], completed=done)
                console.show("predict", bar)
            elif time.monotonic() - shown_at >= PROGRESS_EVERY_S:
                shown_at = time.monotonic()
                console.say(f"[ptft] predict {done:,}/{total:,} rows")


def _progress_bar(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar.add_task("predict", total=total)
    return bar


def _write(output: Path, table: pa.Table, batches: Iterable[list[dict]], keep: bool = False) -> list[dict]:
    """The rows and their answers at `output`, whole: written aside as the batches come, then
    renamed over it. Returns the answers when `keep` asks for them (to score), else []."""
    partial = output.with_name(f".{output.name}.partial")
    try:
        with errors_naming(output), partial.open("wb") as file:
            answers = _write_rows(file, output.suffix.lower(), table, batches, keep)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return answers


def _write_rows(
    file: BinaryIO, suffix: str, table: pa.Table, batches: Iterable[list[dict]], keep: bool = False
) -> list[dict]:
    """The table's rows, each with its answer, written to `file` batch by batch in the format
    `suffix` names: JSON lines with each answer as an object, Parquet with it as a struct, CSV/TSV
    with it as JSON text.

    Raises:
        ValueError: when the batches hold more or fewer answers than the table has rows.
    """
    writer = _WRITERS[suffix](file, table)
    kept, done = [], 0
    for answers in batches:
        if done + len(answers) > table.num_rows:
            raise ValueError(f"{done + len(answers):,} answers for {table.num_rows:,} rows")
        writer.write(table.slice(done, len(answers)), answers)
        file.flush()  # each batch reaches the file as it comes, not at the end
        done += len(answers)
        if keep:
            kept += answers
    if done != table.num_rows:
        raise ValueError(f"{done:,} answers for {table.num_rows:,} rows")
    writer.close()
    return kept


class _JsonLines:
    """JSON lines: each row's columns and its answer as an object."""

    def __init__(self, file: BinaryIO, table: pa.Table):
        self.file = file

    def write(self, rows: pa.Table, answers: list[dict]) -> None:
        lines = (
            json.dumps({**row, PREDICTION: answer}, default=str)
            for row, answer in zip(rows.to_pylist(), answers, strict=True)
        )
        self.file.write("".join(f"{line}\n" for line in lines).encode())

    def close(self) -> None:
        pass


class _Delimited:
    """CSV or TSV: the header once, each answer as JSON text."""

    def __init__(self, file: BinaryIO, table: pa.Table, delimiter: str = ","):
        import pyarrow.csv as pacsv

        options = pacsv.WriteOptions(delimiter=delimiter)
        self.writer = pacsv.CSVWriter(
            file, table.schema.append(pa.field(PREDICTION, pa.string())), write_options=options
        )

    def write(self, rows: pa.Table, answers: list[dict]) -> None:
        column = pa.array([json.dumps(answer) for answer in answers], pa.string())
        self.writer.write_table(rows.append_column(PREDICTION, column))

    def close(self) -> None:
        self.writer.close()


class _Parquet:
    """Parquet, whose schema comes first: one struct type must hold every answer, and a field that
    is null or an empty list in early answers may take its type only later. So the answers are
    kept as Arrow structs (far smaller than the objects), `PARQUET_CHUNK_ROWS` to an array, and the
    file is written at the end, each array cast to the type that holds them all."""

    def __init__(self, file: BinaryIO, table: pa.Table):
        self.file, self.table = file, table
        self.chunks: list[pa.Array] = []
        self.pending: list[dict] = []

    def write(self, rows: pa.Table, answers: list[dict]) -> None:
        self.pending += answers
        if len(self.pending) >= PARQUET_CHUNK_ROWS:
            self._convert()

    def _convert(self) -> None:
        self.chunks.append(pa.array(self.pending))
        self.pending = []

    def close(self) -> None:
        import pyarrow.parquet as pq

        if self.pending:
            self._convert()
        kinds = [pa.schema([pa.field(PREDICTION, chunk.type)]) for chunk in self.chunks]
        kind = pa.unify_schemas(kinds, promote_options="permissive").field(PREDICTION).type
        answers = pa.chunked_array([_cast(chunk, kind) for chunk in self.chunks], kind)
        self.chunks.clear()
        pq.write_table(self.table.append_column(PREDICTION, answers), self.file)


def _cast(answers: pa.Array, kind: pa.DataType) -> pa.Array:
    """A chunk of answers as the struct type that holds them all (the fields it lacks null)."""
    try:
        return answers.cast(kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # a nesting Arrow's cast does not follow
        return pa.array(answers.to_pylist(), kind)


_WRITERS = {
    ".jsonl": _JsonLines,
    ".parquet": _Parquet,
    ".csv": _Delimited,
    ".tsv": functools.partial(_Delimited, delimiter="\t"),
}


RECORDED_ROWS_AT_MOST_MB = 100  # the scored rows go with the run up to this size, for error analysis


def _confusion_matrix(answers: list[dict], expected: list, labels: list[str], per_word: bool) -> list[list[int]]:
    """Counts of a classifier's rows, or (`per_word`) of a tagger's words, true labels as rows and
    answered ones as columns, in label id order (every expected label is one of the model's:
    checked before Ray starts)."""
    if per_word:  # a tagger, scored word by word
        truth = [tag for row in expected for tag in expected_names(list(row), labels)]
        answered = [tag for answer in answers for tag in answer["tags"]]
    else:
        truth, answered = expected_names(expected, labels), [answer["label"] for answer in answers]
    index = {label: number for number, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for guess, true in zip(answered, truth, strict=True):
        matrix[index[true]][index[guess]] += 1
    return matrix


@dataclass(frozen=True)
class Scored:
    """What scoring the answers gave, for the record."""

    scores: dict[str, float]
    # a classifier's rows or a tagger's words: true labels as rows, answered ones as columns
    matrix: list[list[int]] | None
    rows_per_s: float


def _record_line(job: Job, args: argparse.Namespace, config: PipelineConfig, scored: Scored) -> str:
    """Records the scores as an MLflow run; the line saying where, or why not: the predictions and
    the printed scores stand whether or not the tracking store takes them."""
    from mlflow.exceptions import MlflowException

    try:
        experiment_id, run_id = _record(job, args, config, scored)
    except (MlflowException, OSError) as error:
        return f"[ptft] the scores were not recorded in MLflow ({redact_url(config.tracking_uri())}): {error}"
    from components.tracking import ui_links
    from pipelines.cli import ui_url_of

    return (
        f"Recorded as MLflow run {run_id}: {ui_links(ui_url_of(config.tracking_uri()), experiment_id, run_id)['run']}"
    )


def _record(job: Job, args: argparse.Namespace, config: PipelineConfig, scored: Scored) -> tuple[str, str]:
    """(experiment id, run id) of a finished MLflow run holding the scores, what was scored and by
    which model, a classifier's (or a tagger's) confusion matrix, and the scored rows when they are
    small enough. A registered model's run goes to the experiment of the run that logged it, beside
    it; a folder's to the config's."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from components.tracking import ensure_experiment, start_run

    client = MlflowClient(config.tracking_uri())
    if job.model.run_id:  # the run that logged the registered model: ptft's finetune stage, or another's
        experiment_id = client.get_run(job.model.run_id).info.experiment_id
    else:
        experiment_id = ensure_experiment(client, config.experiment_name(), config.artifact_location())
    source = Path(args.input).resolve()
    tags = {"ptft.kind": "predict", "ptft.model": job.model.name, "ptft.model_version": job.model.version}
    tags["ptft.model_uri"] = job.model.model_uri
    if job.model.run_id:
        tags["ptft.model_run_id"] = job.model.run_id
    params = {"input": str(source), "rows": job.table.num_rows, "label_column": args.label_column}
    params |= {f"{field}_column": column for field, column in job.inputs.items()}
    params |= {"batch_size": args.batch_size, "output": str(Path(args.output).resolve())}
    now = int(time.time() * 1000)
    metrics = [Metric(f"predict/{name}", float(value), now, 0) for name, value in scored.scores.items()]
    metrics.append(Metric("predict/rows_per_s", scored.rows_per_s, now, 0))
    output = Path(args.output)
    run_id = start_run(client, experiment_id, f"predict-{source.name}", tags=tags)
    status = "FAILED"
    try:
        client.log_batch(run_id, metrics=metrics, params=[Param(key, str(value)) for key, value in params.items()])
        if output.stat().st_size <= RECORDED_ROWS_AT_MOST_MB * 2**20:
            client.log_artifact(run_id, str(output), "predictions")
        if scored.matrix is not None:
            title = f"{source.name} ({job.table.num_rows:,} rows)"
            _log_confusion_matrix(client, run_id, scored.matrix, job.labels, title)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return experiment_id, run_id


def _log_confusion_matrix(client, run_id: str, matrix: list[list[int]], labels: list[str], title: str) -> None:
    """The matrix as a picture and as JSON under the run's `plots/`, as the finetune stage logs the
    test split's."""
    from components import plots
    from components.scratch import ScratchFolder
    from components.stage import write_json

    with ScratchFolder("predict-plots") as folder:
        plots.confusion_matrix(matrix, labels, folder / "confusion_matrix.png", title=title)
        write_json(folder / "confusion_matrix.json", {"labels": labels, "rows_true_columns_predicted": matrix})
        client.log_artifacts(run_id, str(folder), plots.PLOTS)
