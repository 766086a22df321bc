"""`ptft report RUN_ID`: one self-contained HTML page about a pipeline run.

Gathering and rendering are apart. `gather` reads the run's manifest, the stages' published
`_SUCCESS` files and their MLflow runs into a `RunReport` (plain data); `render` turns that into
HTML with inline CSS and every PNG artifact of every stage run embedded as a data URI, so the one
file can be mailed, attached to a ticket or opened offline. The command writes it beside the
manifest and logs it to the pipeline's MLflow run as `report/report.html`.

A cache hit's pictures and full metric history live in the run that produced the artifact
(`ptft.cached_from_run_id`), so the report reads that run for a cached stage.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.net import mlflow_unanswered
from components.redaction import CredentialsNeeded, connectable_uri, redact_text, redact_url
from components.stage import read_json, write_text_whole
from pipelines.manifest import CACHED, Manifest, StageRecord, UnreadableManifest, list_runs
from pipelines.stages import node_id, split_node

if TYPE_CHECKING:  # MLflow is imported when a report is made: `ptft --help` stays fast
    from mlflow.tracking import MlflowClient

EXIT_USER_ERROR = 2
REPORT_ARTIFACT = "report/report.html"
# Named here rather than imported from pipelines.runner / components.tune: those import Ray.
SUCCESS_FILE = "_SUCCESS"
CACHED_FROM_TAG = "ptft.cached_from_run_id"
BEST_TRIAL_TAG = "ptft.best_trial"
BEST_TRIAL_RUN_TAG = "ptft.best_trial_run_id"
TRIAL_CONFIG_TAG = "ptft.trial_config"
# The metrics a reader looks for first; restore/*, hyper/* and per-step counters stay in MLflow.
KEY_METRIC_PREFIXES = ("train/loss", "eval/", "test/", "throughput/", "tune/", "stage/seconds", "tokenize/", "serve/")
SAMPLES_ARTIFACT = "plots/test_samples.json"  # components/finetune.py writes it


# --------------------------------------------------------------------------- the data


@dataclass
class Picture:
    stage: str
    artifact_path: str
    png: bytes


@dataclass
class StageReport:
    name: str
    record: StageRecord
    # The MLflow run that produced the stage's artifact: the producing run for a cache hit.
    source_run_id: str | None = None
    source_experiment_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pictures: list[Picture] = field(default_factory=list)
    # A model that writes text: its outputs for a few test rows beside what was expected
    samples: list[dict[str, str]] = field(default_factory=list)

    @property
    def cached(self) -> bool:
        return self.record.status == CACHED


@dataclass
class TrialReport:
    name: str
    run_id: str | None = None
    experiment_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ModelReport:
    name: str
    version: str
    aliases: list[str] = field(default_factory=list)
    model_uri: str | None = None
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class TaskReport:
    """A task's sweep and model: the run's only ones (task None) or one branch's."""

    task: str | None
    best_trial: TrialReport | None = None
    model: ModelReport | None = None


@dataclass
class RunReport:
    manifest: Manifest
    stages: list[StageReport]
    tasks: list[TaskReport] = field(default_factory=list)
    mlflow_reachable: bool = False
    warnings: list[str] = field(default_factory=list)
    generated_at: float = field(default_factory=time.time)


# --------------------------------------------------------------------------- gathering


def gather(manifest: Manifest) -> RunReport:
    """Everything the report shows, from the manifest and the published stage folders, then MLflow.
    MLflow problems become warnings in the report: a page from the manifest beats no page."""
    stages = [StageReport(name, record) for name, record in manifest.stages.items()]  # in pipeline order
    report = RunReport(manifest=manifest, stages=stages)
    report.tasks = [
        TaskReport(
            task,
            best_trial=_trial_from_published(_published_outputs(manifest, node_id("tune", task))),
            model=_model_from_published(_published_outputs(manifest, node_id("finetune", task))),
        )
        for task in _tasks(manifest)
    ]
    try:
        tracking_uri = connectable_uri(manifest.tracking_uri)
    except CredentialsNeeded as error:
        report.warnings.append(f"{error}: metrics, pictures and the model are missing")
        return report
    problem = _mlflow_problem(tracking_uri)
    if missing := manifest.tracking_store_missing():
        problem = f"no MLflow store at {missing}: metrics, pictures and the model are missing"
    if problem:
        report.warnings.append(problem)
        return report
    report.mlflow_reachable = True
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for stage in report.stages:
        try:
            _add_stage_runs(client, tracking_uri, stage)
        except (MlflowException, OSError) as error:
            report.warnings.append(f"stage {stage.name}: MLflow run {stage.record.mlflow_run_id}: {_message(error)}")
    for task in report.tasks:
        try:
            task.best_trial = _best_trial(client, _stage(report, node_id("tune", task.task))) or task.best_trial
            task.model = _registered_model(client, _stage(report, node_id("finetune", task.task)), task.model)
        except (MlflowException, OSError) as error:
            report.warnings.append(f"MLflow at {redact_url(tracking_uri)}: {_message(error)}")
    return report


def _tasks(manifest: Manifest) -> list[str | None]:
    """The run's tasks in pipeline order: None alone for a config of one task, [] for no sweep
    or fine-tuning at all."""
    found: dict[str | None, None] = {}
    for node in manifest.stages:
        stage, task = split_node(node)
        if stage in ("tune", "finetune"):
            found.setdefault(task)
    return list(found)


def _published_outputs(manifest: Manifest, node: str) -> dict[str, Any]:
    """The `outputs` a finished node published in `<storage>/artifacts/<stage>/<key>/_SUCCESS`."""
    record = manifest.stages.get(node)
    if record is None or record.key is None:
        return {}
    path = Path(manifest.storage) / "artifacts" / split_node(node)[0] / record.key / SUCCESS_FILE
    return read_json(path).get("outputs", {}) if path.is_file() else {}


def _trial_from_published(outputs: dict[str, Any]) -> TrialReport | None:
    if not outputs.get("best_trial"):
        return None
    return TrialReport(name=outputs["best_trial"], config=outputs.get("best_config", {}))


def _model_from_published(outputs: dict[str, Any]) -> ModelReport | None:
    registered = outputs.get("registered")
    if not registered:
        return None
    return ModelReport(
        name=registered["name"],
        version=str(registered["version"]),
        aliases=list(registered.get("aliases", [])),
        model_uri=registered.get("model_uri"),
        run_id=registered.get("run_id"),
    )


def _mlflow_problem(tracking_uri: str | None) -> str | None:
    """Why MLflow cannot be read, or None. An http(s) server is probed first: MLflow's own client
    retries an unreachable server for minutes."""
    if not tracking_uri:
        return "the manifest names no MLflow tracking URI: metrics, pictures and the model are missing"
    reason = mlflow_unanswered(tracking_uri)
    if reason is None:
        return None
    return (
        f"MLflow at {redact_url(tracking_uri)} is unreachable ({reason}): metrics, pictures and the model are missing"
    )


def _add_stage_runs(client: MlflowClient, tracking_uri: str, stage: StageReport) -> None:
    """Metrics, tags and pictures of a stage: from its own run, and for a cache hit from the run
    that produced the artifact (its own run holds only the artifact's summary metrics)."""
    run_id = stage.record.mlflow_run_id
    if not run_id:
        return  # never started
    own = client.get_run(run_id)
    source_id = own.data.tags.get(CACHED_FROM_TAG) or stage.record.cached_from_mlflow_run_id or run_id
    source = own if source_id == run_id else client.get_run(source_id)
    stage.source_run_id, stage.source_experiment_id = source_id, source.info.experiment_id
    stage.metrics = _key_metrics({**source.data.metrics, **own.data.metrics})
    stage.tags = dict(source.data.tags)
    stage.pictures = [Picture(stage.name, path, png) for path, png in _pictures(client, tracking_uri, source_id)]
    stage.samples = _samples(client, tracking_uri, source_id)


def _samples(client: MlflowClient, tracking_uri: str, run_id: str) -> list[dict[str, str]]:
    """The run's `plots/test_samples.json` (translations, generations), or none."""
    import mlflow.artifacts

    if not any(info.path == SAMPLES_ARTIFACT for info in client.list_artifacts(run_id, "plots")):
        return []
    with tempfile.TemporaryDirectory(prefix="ptft-report-") as folder:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=SAMPLES_ARTIFACT, tracking_uri=tracking_uri, dst_path=folder
        )
        return json.loads(Path(local).read_text())


def _key_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {name: value for name, value in sorted(metrics.items()) if name.startswith(KEY_METRIC_PREFIXES)}


def _pictures(client: MlflowClient, tracking_uri: str, run_id: str) -> list[tuple[str, bytes]]:
    """Every PNG artifact of a run, wherever it sits in the artifact tree: (path, bytes)."""
    import mlflow.artifacts

    pictures = []
    with tempfile.TemporaryDirectory(prefix="ptft-report-") as folder:
        for path in _png_paths(client, run_id):
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, tracking_uri=tracking_uri, dst_path=folder
            )
            pictures.append((path, Path(local).read_bytes()))
    return pictures


def _png_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> list[str]:
    paths = []
    for info in client.list_artifacts(run_id, folder):
        if info.is_dir:
            paths.extend(_png_paths(client, run_id, info.path))
        elif info.path.lower().endswith(".png"):
            paths.append(info.path)
    return sorted(paths)


def _stage(report: RunReport, name: str) -> StageReport | None:
    return next((stage for stage in report.stages if stage.name == name), None)


def _best_trial(client: MlflowClient, tune: StageReport | None) -> TrialReport | None:
    """The sweep's best trial, from the tags the tune stage sets on its run and the trial's own run."""
    if tune is None or not tune.tags.get(BEST_TRIAL_TAG):
        return None
    trial = TrialReport(name=tune.tags[BEST_TRIAL_TAG], run_id=tune.tags.get(BEST_TRIAL_RUN_TAG) or None)
    if trial.run_id:
        run = client.get_run(trial.run_id)
        trial.experiment_id = run.info.experiment_id
        trial.config = _trial_config(run.data.tags.get(TRIAL_CONFIG_TAG), run.data.params)
        trial.metrics = _key_metrics(run.data.metrics)
    return trial


def _trial_config(tagged: str | None, params: dict[str, str]) -> dict[str, Any]:
    try:
        return json.loads(tagged) if tagged else dict(params)
    except json.JSONDecodeError:
        return dict(params)  # a hand-edited tag: the params say the same


def _registered_model(
    client: MlflowClient, finetune: StageReport | None, published: ModelReport | None
) -> ModelReport | None:
    """The version the finetune stage registered, with its aliases as the registry has them now."""
    if finetune is None or finetune.source_run_id is None:
        return published
    versions = client.search_model_versions(f"run_id='{finetune.source_run_id}'")
    if not versions:
        return published
    named = [v for v in versions if published and (v.name, str(v.version)) == (published.name, published.version)]
    found = named[0] if named else max(versions, key=lambda v: int(v.version))
    version = client.get_model_version(found.name, found.version)  # a search result carries no aliases
    return ModelReport(
        name=version.name,
        version=str(version.version),
        aliases=sorted(version.aliases or []),
        model_uri=f"models:/{version.name}/{version.version}",
        run_id=version.run_id,
        tags=dict(version.tags or {}),
    )


def _message(error: Exception) -> str:
    return redact_text(getattr(error, "message", None) or str(error))


# --------------------------------------------------------------------------- rendering

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #1f2328; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: .6em 0; } th, td { border: 1px solid #d0d7de; padding: .3em .6em;
        text-align: left; vertical-align: top; } th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status { font-weight: 600; padding: .1em .5em; border-radius: 1em; font-size: .9em; }
.succeeded { background: #dafbe1; color: #1a7f37; } .cached { background: #ddf4ff; color: #0969da; }
.failed, .killed { background: #ffebe9; color: #cf222e; } .pending, .running { background: #fff8c5; color: #9a6700; }
.hit { font-size: .85em; color: #0969da; } .error { color: #cf222e; white-space: pre-wrap; font-family: monospace; }
.warning { background: #fff8c5; padding: .5em 1em; border-left: 4px solid #d4a72c; }
figure { display: inline-block; margin: .5em; vertical-align: top; } figcaption { font-size: .9em; color: #57606a; }
img { max-width: 100%; border: 1px solid #d0d7de; } code { background: #f6f8fa; padding: 0 .2em; }
.muted { color: #57606a; }
"""


def render(report: RunReport) -> str:
    """The report as one HTML document: inline CSS, pictures as data URIs, nothing fetched."""
    manifest = report.manifest
    title = f"ptft report: {manifest.pipeline} run {manifest.run_id}"
    body = [
        f"<h1>{_e(title)}</h1>",
        _render_warnings(report.warnings),
        _render_summary(report),
        "<h2>Stages</h2>",
        _render_graph(report),
        _render_stage_table(report),
        *[_render_stage_details(report, stage) for stage in report.stages],
        *[_render_task(report, task) for task in report.tasks],
        f'<p class="muted">Generated {_e(_when(report.generated_at))} by <code>ptft report</code>.</p>',
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body>\n</html>\n"
    )


def _render_warnings(warnings: list[str]) -> str:
    return "".join(f'<p class="warning">{_e(warning)}</p>' for warning in warnings)


def _render_summary(report: RunReport) -> str:
    manifest = report.manifest
    wall = f"{manifest.ended_at - manifest.created_at:.1f} s" if manifest.ended_at else "-"
    rows = [
        ("Pipeline", _e(manifest.pipeline)),
        ("Run id", f"<code>{_e(manifest.run_id)}</code>"),
        ("Status", _status_badge(manifest.status)),
        ("Started", _e(_when(manifest.created_at))),
        ("Ended", _e(_when(manifest.ended_at))),
        ("Wall time", _e(wall)),
        ("Attempts", _e(manifest.attempts)),
        ("Storage", f"<code>{_e(manifest.storage)}</code>"),
        (
            "MLflow",
            f"<code>{_e(redact_url(manifest.tracking_uri) or '-')}</code>, "
            f"experiment {_e(manifest.experiment_id or '-')}, "
            f"pipeline run {_run_link(manifest.tracking_uri, manifest.experiment_id, manifest.mlflow_run_id)}",
        ),
    ]
    return "<table>" + "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows) + "</table>"


def _render_graph(report: RunReport) -> str:
    """The run's stages as a graph, coloured by status (runs recorded before the manifest kept
    the edges show none)."""
    stages = report.manifest.stages
    if not any(record.upstream for record in stages.values()):
        return ""
    data = base64.b64encode(graph_picture(stages)).decode("ascii")
    return f'<figure><img class="graph" alt="pipeline graph" src="data:image/png;base64,{data}"></figure>'


STATUS_COLOURS = {
    "succeeded": "#c8e6c9",
    "cached": "#e1bee7",
    "failed": "#ffcdd2",
    "killed": "#ffe0b2",
    "running": "#bbdefb",
    "skipped": "#eeeeee",
    "pending": "#ffffff",
}


def graph_picture(stages: dict[str, StageRecord]) -> bytes:
    """A PNG of the stages (graph nodes) left to right by depth, an arrow from each upstream."""
    import io

    from components import plots

    with plots.pyplot() as plt:
        depth: dict[str, int] = {}
        for name, record in stages.items():  # manifest order: a stage's upstream comes before it
            depth[name] = 1 + max((depth[up] for up in record.upstream if up in depth), default=-1)
        columns: dict[int, list[str]] = {}
        for name, column in depth.items():
            columns.setdefault(column, []).append(name)
        position = {name: (column, -row) for column, names in columns.items() for row, name in enumerate(names)}
        tallest = max(len(names) for names in columns.values())
        figure, axis = plt.subplots(figsize=(1.9 * len(columns) + 0.6, 0.75 * tallest + 0.6))
        for name in stages:
            for upstream in _direct(stages, name):
                if upstream in position:
                    axis.annotate(
                        "",
                        xy=position[name],
                        xytext=position[upstream],
                        arrowprops={"arrowstyle": "->", "color": "#777", "shrinkA": 32, "shrinkB": 32},
                    )
        for name, (x, y) in position.items():
            colour = STATUS_COLOURS.get(stages[name].status, "#ffffff")
            axis.text(
                x,
                y,
                name,
                ha="center",
                va="center",
                fontsize=8,
                bbox={"boxstyle": "round,pad=0.4", "facecolor": colour, "edgecolor": "#555"},
            )
        axis.set_xlim(-0.7, len(columns) - 0.3)
        axis.set_ylim(-tallest + 0.4, 0.6)
        axis.axis("off")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(figure)
        return buffer.getvalue()


def _direct(stages: dict[str, StageRecord], name: str) -> list[str]:
    """A stage's upstream without those it also reads through another (tokenize -> tune when
    tune reads pretrain): the arrows a reader needs."""

    def ancestors(node: str) -> set[str]:
        found, pending = set(), list(stages[node].upstream if node in stages else ())
        while pending:
            upstream = pending.pop()
            if upstream not in found:
                found.add(upstream)
                pending.extend(stages[upstream].upstream if upstream in stages else ())
        return found

    upstream = stages[name].upstream
    return [up for up in upstream if not any(up in ancestors(other) for other in upstream if other != up)]


def _render_stage_table(report: RunReport) -> str:
    header = (
        "<tr><th>Stage</th><th>Status</th><th>Seconds</th><th>Work seconds</th><th>Attempts</th>"
        "<th>Started</th><th>MLflow run</th></tr>"
    )
    rows = "".join(_render_stage_row(report, stage) for stage in report.stages)
    return f'<table class="stages">{header}{rows}</table>'


def _render_stage_row(report: RunReport, stage: StageReport) -> str:
    record, uri = stage.record, report.manifest.tracking_uri
    status = _status_badge(record.status)
    if stage.cached:
        status += ' <span class="hit">cache hit</span>'
    run = _run_link(uri, report.manifest.experiment_id, record.mlflow_run_id)
    if stage.cached and stage.source_run_id:
        producer = _run_link(uri, stage.source_experiment_id, stage.source_run_id)
        run += f'<br><span class="muted">produced by {producer}</span>'
    timings = "".join(
        f'<td class="num">{value}</td>'
        for value in (_seconds(record.seconds), _seconds(record.work_seconds), _e(record.attempts))
    )
    return (
        f'<tr id="stage-{_e(stage.name)}"><td>{_e(stage.name)}</td><td>{status}</td>{timings}'
        f"<td>{_e(_when(record.started_at))}</td><td>{run}</td></tr>"
    )


def _render_stage_details(report: RunReport, stage: StageReport) -> str:
    record = stage.record
    parts = [f"<h2>{_e(stage.name)} {_status_badge(record.status)}</h2>"]
    if stage.cached:
        parts.append(
            f'<p class="hit">cache hit: the artifact, metrics and pictures come from MLflow run '
            f"<code>{_e(stage.source_run_id or record.cached_from_mlflow_run_id or '?')}</code></p>"
        )
    if record.output_uri:
        parts.append(f"<p>Output: <code>{_e(record.output_uri)}</code></p>")
    if record.error:
        parts.append(f'<p class="error">{_e(record.error)}</p>')
    if stage.metrics:
        parts.append(_metrics_table(stage.metrics))
    parts.extend(_render_picture(picture) for picture in stage.pictures)
    if stage.samples:
        parts.append(_samples_table(stage.samples))
    return f'<section class="stage" id="details-{_e(stage.name)}">' + "\n".join(parts) + "</section>"


def _samples_table(samples: list[dict[str, str]]) -> str:
    """Test rows and what the model wrote: source or prompt, the reference, the output."""
    columns = list(samples[0])
    head = "".join(f"<th>{_e(column)}</th>" for column in columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_e(sample.get(c, ''))}</td>" for c in columns) + "</tr>" for sample in samples
    )
    return f'<table class="samples"><caption>test samples</caption><tr>{head}</tr>{rows}</table>'


def _metrics_table(metrics: dict[str, float]) -> str:
    rows = "".join(
        f'<tr><td><code>{_e(name)}</code></td><td class="num">{_e(_number(value))}</td></tr>'
        for name, value in metrics.items()
    )
    return f'<table class="metrics"><tr><th>Metric</th><th>Value</th></tr>{rows}</table>'


def _render_picture(picture: Picture) -> str:
    caption = f"{picture.stage}: {picture.artifact_path}"
    data = base64.b64encode(picture.png).decode("ascii")
    return (
        f'<figure><img data-stage="{_e(picture.stage)}" data-artifact="{_e(picture.artifact_path)}" '
        f'alt="{_e(caption)}" src="data:image/png;base64,{data}"><figcaption>{_e(caption)}</figcaption></figure>'
    )


def _render_task(report: RunReport, task: TaskReport) -> str:
    """The task's best trial and model version, headed by the task's name in a run of several."""
    of_task = f": task {_e(task.task)}" if task.task else ""
    return "\n".join(
        (
            f"<h2>Best trial{of_task}</h2>",
            _render_best_trial(report, task.best_trial),
            f"<h2>Model version{of_task}</h2>",
            _render_model(report, task.model),
        )
    )


def _render_best_trial(report: RunReport, trial: TrialReport | None) -> str:
    if trial is None:
        return '<p class="muted">No sweep in this run (or it did not finish).</p>'
    uri = report.manifest.tracking_uri
    lines = [
        f"<p>Trial <code>{_e(trial.name)}</code>"
        + (f", MLflow run {_run_link(uri, trial.experiment_id, trial.run_id)}" if trial.run_id else "")
        + "</p>"
    ]
    if trial.config:
        rows = "".join(
            f'<tr><td><code>{_e(name)}</code></td><td class="num">{_e(_number(value))}</td></tr>'
            for name, value in sorted(trial.config.items())
        )
        lines.append(f'<table class="trial-config"><tr><th>Hyperparameter</th><th>Value</th></tr>{rows}</table>')
    if trial.metrics:
        lines.append(_metrics_table(trial.metrics))
    return "\n".join(lines)


def _render_model(report: RunReport, model: ModelReport | None) -> str:
    if model is None:
        return '<p class="muted">No model version registered by this run.</p>'
    aliases = ", ".join(model.aliases) or "none"
    rows = [
        ("Name", model.name),
        ("Version", model.version),
        ("Aliases", aliases),
        ("Model URI", model.model_uri or "-"),
        ("From MLflow run", model.run_id or "-"),
    ]
    rows += [(name, value) for name, value in sorted(model.tags.items()) if name.startswith("ptft.test_")]
    table = "".join(f"<tr><th>{_e(name)}</th><td>{_e(value)}</td></tr>" for name, value in rows)
    link = _model_link(report.manifest.tracking_uri, model)
    return f'<table class="model">{table}</table>' + (f'<p><a href="{_e(link)}">Open in MLflow</a></p>' if link else "")


def _status_badge(status: str) -> str:
    return f'<span class="status {_e(status)}">{_e(status)}</span>'


def _run_link(tracking_uri: str | None, experiment_id: str | None, run_id: str | None) -> str:
    """A run id, linked to the MLflow UI when the tracking URI is a server the reader can open."""
    if not run_id:
        return "-"
    tracking_uri = redact_url(tracking_uri)
    if tracking_uri and tracking_uri.startswith(("http://", "https://")) and experiment_id:
        url = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return f'<a href="{_e(url)}"><code>{_e(run_id)}</code></a>'
    return f"<code>{_e(run_id)}</code>"


def _model_link(tracking_uri: str | None, model: ModelReport) -> str | None:
    tracking_uri = redact_url(tracking_uri)
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/models/{model.name}/versions/{model.version}"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def _seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- the command


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `report` on the `ptft` parser."""
    report = commands.add_parser(
        "report",
        help="write a self-contained HTML report of a pipeline run",
        description="One HTML file (no external files) with the stages, their status, timings and cache hits, "
        "key metrics, every PNG the stages logged to MLflow, the best trial and the model version. Also logged "
        f"to the pipeline's MLflow run as {REPORT_ARTIFACT}.",
    )
    report.add_argument("run_id", help="pipeline run id (see `ptft runs`), or `latest`")
    report.add_argument("--storage", default="./ptft-runs", help="the run's storage (default ./ptft-runs)")
    report.add_argument(
        "--output", metavar="FILE", help="where to write it (default <storage>/runs/<run_id>/report.html)"
    )
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small PNG is noise
    storage = Path(args.storage)
    try:
        manifest = _load_manifest(storage, args.run_id)
    except (FileNotFoundError, UnreadableManifest) as error:
        print(f"ptft: {error}; list them with: ptft runs --storage {storage}", file=sys.stderr)
        return EXIT_USER_ERROR
    report = gather(manifest)
    for warning in report.warnings:
        print(f"ptft: warning: {warning}", file=sys.stderr)
    page = render(report)
    output = Path(args.output) if args.output else Manifest.folder(storage, manifest.run_id) / "report.html"
    write_text_whole(output, page)
    if report.mlflow_reachable:
        _log_to_mlflow(manifest, page)
    else:
        print("ptft: warning: the report was not logged to MLflow (unreachable)", file=sys.stderr)
    print(output)
    return 0


def _load_manifest(storage: Path, run_id: str) -> Manifest:
    """The manifest of `run_id`, or of the newest run for `latest`.

    Raises:
        FileNotFoundError: no such run under `storage`.
        UnreadableManifest: its manifest does not read.
    """
    if run_id == "latest":
        runs = list_runs(storage)
        if not runs:
            raise FileNotFoundError(f"no pipeline runs under {storage}")
        return runs[0]
    return Manifest.load(storage, run_id)


def _log_to_mlflow(manifest: Manifest, page: str) -> None:
    """Attach the page to the pipeline's MLflow run (browsable in the UI); best effort."""
    if not manifest.mlflow_run_id:
        return
    if manifest.moved_from or manifest.tracking_store_missing():
        # MLflow would write it under the run's recorded artifact location, or make an empty store.
        where = f"the run moved from {manifest.moved_from}" if manifest.moved_from else "its MLflow store is missing"
        print(f"ptft: the report was not logged to MLflow: {where}", file=sys.stderr)
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(connectable_uri(manifest.tracking_uri)).log_text(manifest.mlflow_run_id, page, REPORT_ARTIFACT)
    except (MlflowException, OSError, CredentialsNeeded) as error:
        print(
            f"ptft: warning: the report was not logged to MLflow run {manifest.mlflow_run_id} at "
            f"{redact_url(manifest.tracking_uri)}: {_message(error)}",
            file=sys.stderr,
        )
