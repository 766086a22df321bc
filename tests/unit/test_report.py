"""`ptft report` on a small but real pipeline run record: a sqlite MLflow store with a parent run,
stage child runs, metrics, PNG artifacts, a sweep's best trial and a registered model version,
and a manifest written through pipelines/manifest.py. No Ray, no mocks."""

from __future__ import annotations

import base64
import json
import re
import socket
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the non-interactive backend
import pytest  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from components import tracking  # noqa: E402
from pipelines import cli  # noqa: E402
from pipelines import manifest as mf  # noqa: E402
from pipelines.report import REPORT_ARTIFACT  # noqa: E402
from tests.conftest import small_disk, sqlite_store  # noqa: E402

RUN_ID = "20260101-120000-abc123"
MODEL = "unit-classifier"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# stage -> (status, seconds); pretrain is a cache hit of an earlier pipeline run.
STAGES = {
    "tokenize": (mf.SUCCEEDED, 12.5),
    "pretrain": (mf.CACHED, 0.8),
    "tune": (mf.SUCCEEDED, 55.25),
    "finetune": (mf.SUCCEEDED, 49.75),
    "serve": (mf.FAILED, 3.0),
}
IMAGE = re.compile(r'<img data-stage="([^"]+)" data-artifact="([^"]+)" alt="[^"]*" src="data:image/png;base64,([^"]+)"')


@pytest.fixture(autouse=True)
def _quiet_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # `ptft report` sets it only by default


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished pipeline run as the runner leaves it: MLflow runs, published outputs, manifest.
    Shared by the tests of this module: the report only reads it (and re-logs its own copy)."""
    tmp_path = tmp_path_factory.mktemp("report")
    storage = tmp_path / "ptft-runs"
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    experiment = tracking.ensure_experiment(client, "unit", str(tmp_path / "mlartifacts"))
    parent = tracking.start_run(client, experiment, f"pipeline-{RUN_ID}", tags={"ptft.run_id": RUN_ID})
    plot = _plot(tmp_path / "loss.png")
    runs = {stage: _stage_run(client, experiment, parent, stage) for stage in STAGES}

    client.log_metric(runs["tokenize"], "tokenize/vocab_size", 200)
    producer = tracking.start_run(client, experiment, "pretrain", tags={"ptft.stage": "pretrain"})
    client.log_metric(producer, "train/loss", 2.345678, step=40)
    client.log_metric(producer, "train/step", 40)  # not a key metric
    client.log_artifact(producer, str(plot), "plots")
    client.set_tag(runs["pretrain"], "ptft.cached_from_run_id", producer)
    client.log_metric(runs["pretrain"], "eval/mlm_loss", 3.25)

    trial = tracking.start_run(
        client,
        experiment,
        "trial_00001",
        parent_run_id=runs["tune"],
        tags={
            "ptft.trial": "trial_00001",
            "ptft.trial_config": json.dumps({"learning_rate": 0.00123, "dropout": 0.1}),
        },
    )
    client.log_metric(trial, "eval/accuracy", 0.875)
    client.log_artifact(runs["tune"], str(plot.rename(tmp_path / "sweep.png")))
    client.set_tag(runs["tune"], "ptft.best_trial", "trial_00001")
    client.set_tag(runs["tune"], "ptft.best_trial_run_id", trial)
    client.log_metric(runs["tune"], "tune/trials", 2)

    client.log_metric(runs["finetune"], "test/accuracy", 0.9375)
    client.log_artifact(runs["finetune"], str(_plot(tmp_path / "confusion_matrix.png")), "plots")
    samples = [{"source": "A dog <runs>.", "reference": "Ein Hund rennt.", "output": "Ein Hund."}]
    (tmp_path / "test_samples.json").write_text(json.dumps(samples))
    client.log_artifact(runs["finetune"], str(tmp_path / "test_samples.json"), "plots")
    version = _register(client, runs["finetune"])
    for run_id in [*runs.values(), producer, trial]:
        client.set_terminated(run_id)

    manifest = _manifest(storage, uri, experiment, parent, runs, producer)
    _publish(
        storage,
        "finetune",
        manifest,
        {"registered": {"name": MODEL, "version": version, "aliases": ["candidate", "champion"]}},
    )
    return {
        "storage": storage,
        "client": client,
        "parent": parent,
        "producer": producer,
        "trial": trial,
        "version": version,
    }


def _stage_run(client: MlflowClient, experiment: str, parent: str, stage: str) -> str:
    cached = STAGES[stage][0] == mf.CACHED
    return tracking.start_run(
        client,
        experiment,
        stage,
        parent_run_id=parent,
        tags={
            "ptft.stage": stage,
            "ptft.run_id": RUN_ID,
            "ptft.cache_hit": str(cached).lower(),
        },
    )


def _plot(path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(2, 2))
    axes.plot([1, 2, 3], [3, 1, 2])
    figure.savefig(path, dpi=40)
    plt.close(figure)
    return path


def _register(client: MlflowClient, run_id: str) -> str:
    client.create_registered_model(MODEL)
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    version = client.create_model_version(MODEL, source, run_id=run_id).version
    client.set_registered_model_alias(MODEL, "champion", version)
    client.set_model_version_tag(MODEL, version, "ptft.test_accuracy", "0.937500")
    return str(version)


def _manifest(storage: Path, uri: str, experiment: str, parent: str, runs: dict, producer: str) -> mf.Manifest:
    manifest = mf.Manifest.create(storage, RUN_ID, "unit", tuple(STAGES), config={"name": "unit"})
    manifest.tracking_uri, manifest.experiment_id, manifest.mlflow_run_id = uri, experiment, parent
    for stage, (status, seconds) in STAGES.items():
        manifest.stage_started(stage, f"key-{stage}", runs[stage])
        cached_from = producer if status == mf.CACHED else None
        error = "RuntimeError: Serve <replica> died" if status == mf.FAILED else None
        manifest.stage_ended(
            stage, status, output_uri=f"{storage}/artifacts/{stage}/key-{stage}", cached_from=cached_from, error=error
        )
        manifest.stages[stage].seconds = seconds  # fixed numbers to look for in the page
        manifest.stages[stage].work_seconds = seconds if status == mf.SUCCEEDED else None
    manifest.finished(mf.FAILED)
    return manifest


def _publish(storage: Path, stage: str, manifest: mf.Manifest, outputs: dict, folder: str | None = None) -> None:
    """The `_SUCCESS` the runner publishes (pipelines/runner.py `_publish`), outputs only; a task's
    node (`tune.topic`) publishes under its stage's folder."""
    folder = storage / "artifacts" / (folder or stage) / manifest.stages[stage].key
    folder.mkdir(parents=True)
    (folder / "_SUCCESS").write_text(
        json.dumps({"outputs": outputs, "metrics": {}, "output": ".", "output_inside": True})
    )


def _report(storage: Path, *extra: str) -> tuple[int, str]:
    output = storage / "out" / "report.html"
    code = cli.main(["report", RUN_ID, "--storage", str(storage), "--output", str(output), *extra])
    return code, output.read_text() if output.is_file() else ""


def _stage_row(page: str, stage: str) -> str:
    return re.search(rf'<tr id="stage-{stage}">(.*?)</tr>', page).group(1)


def test_report_shows_stages_metrics_pictures_trial_and_model(recorded_run: dict) -> None:
    code, page = _report(recorded_run["storage"])
    assert code == 0
    for stage, (status, seconds) in STAGES.items():
        row = _stage_row(page, stage)
        assert f'class="status {status}"' in row and f"{seconds:.1f}" in row, stage
    assert "cache hit" in _stage_row(page, "pretrain")
    assert recorded_run["producer"] in _stage_row(page, "pretrain")
    assert "cache hit" not in _stage_row(page, "tokenize")
    assert "RuntimeError: Serve &lt;replica&gt; died" in page  # escaped, never raw markup
    for metric, shown in [("train/loss", "2.34568"), ("test/accuracy", "0.9375"), ("tune/trials", "2")]:
        assert re.search(rf"<code>{re.escape(metric)}</code></td><td class=\"num\">{shown}<", page), metric
    assert "train/step" not in page

    images = {(stage, path): base64.b64decode(data) for stage, path, data in IMAGE.findall(page)}
    assert set(images) == {
        ("pretrain", "plots/loss.png"),
        ("tune", "sweep.png"),
        ("finetune", "plots/confusion_matrix.png"),
    }
    assert all(png.startswith(PNG_SIGNATURE) for png in images.values())
    assert "<figcaption>pretrain: plots/loss.png</figcaption>" in page
    samples = re.search(r'<table class="samples">(.*?)</table>', page).group(1)  # test rows and outputs
    assert "<th>source</th><th>reference</th><th>output</th>" in samples
    assert "<td>A dog &lt;runs&gt;.</td><td>Ein Hund rennt.</td><td>Ein Hund.</td>" in samples

    assert "trial_00001" in page and "learning_rate" in page and "0.00123" in page and "0.875" in page
    model = re.search(r'<table class="model">(.*?)</table>', page).group(1)
    assert MODEL in model and f"<td>{recorded_run['version']}</td>" in model and "champion" in model


def test_report_is_self_contained(recorded_run: dict) -> None:
    _, page = _report(recorded_run["storage"])
    assert not re.search(r'<(link|script)\b|src="(?!data:)|url\(', page)


def test_default_output_and_mlflow_copy(recorded_run: dict, capsys: pytest.CaptureFixture) -> None:
    storage = recorded_run["storage"]
    assert cli.main(["report", "latest", "--storage", str(storage)]) == 0
    written = mf.Manifest.folder(storage, RUN_ID) / "report.html"
    assert capsys.readouterr().out.strip() == str(written)
    client = recorded_run["client"]
    logged = client.download_artifacts(recorded_run["parent"], REPORT_ARTIFACT, str(storage))
    assert Path(logged).read_text() == written.read_text()


def test_a_report_on_a_full_disk_names_that_disk_and_keeps_the_earlier_report(
    recorded_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A write to an open file raises ENOSPC without a file name: the line named the working
    directory's disk, and the earlier report was cut short where the disk filled."""
    with small_disk(tmp_path / "disk", "8K") as disk:  # room for the earlier report; the page is 16 kB
        output = disk / "report.html"
        output.write_text("the earlier report")
        code = cli.main(["report", RUN_ID, "--storage", str(recorded_run["storage"]), "--output", str(output)])
        assert code == 1
        assert output.read_text() == "the earlier report"
        assert [path.name for path in disk.iterdir()] == [output.name]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"ptft report: out of disk space on {disk} ("), last
    assert last.endswith(f"writing {output}. Free space there, then run the command again"), last


def test_unknown_run_id_is_a_user_error(recorded_run: dict, capsys: pytest.CaptureFixture) -> None:
    storage = recorded_run["storage"]
    assert cli.main(["report", "no-such-run", "--storage", str(storage)]) == 2
    error = capsys.readouterr().err
    assert "no pipeline run 'no-such-run'" in error and RUN_ID in error and "ptft runs" in error
    assert cli.main(["report", "latest", "--storage", str(storage / "empty")]) == 2


def test_stages_appear_in_pipeline_order(recorded_run: dict) -> None:
    _, page = _report(recorded_run["storage"])
    assert re.findall(r'<tr id="stage-(\w+)">', page) == list(STAGES)


def test_unreachable_mlflow_still_gives_a_report_from_the_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    storage = tmp_path / "ptft-runs"
    manifest = mf.Manifest.create(storage, RUN_ID, "unit", ("tokenize", "pretrain"), config={"name": "unit"})
    manifest.tracking_uri, manifest.mlflow_run_id = f"http://127.0.0.1:{_closed_port()}", "0123abcd"
    manifest.stage_started("tokenize", "key-tokenize", "4567ef")
    manifest.stage_ended("tokenize", mf.SUCCEEDED)
    manifest.finished(mf.FAILED)
    code, page = _report(storage)
    assert code == 0
    assert 'class="status succeeded"' in _stage_row(page, "tokenize")
    assert "unreachable" in page and "unreachable" in capsys.readouterr().err


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_run_of_several_tasks_shows_its_graph(tmp_path: Path) -> None:
    """The manifest keeps each stage's upstream; status and report show the branches."""
    from pipelines.progress import snapshot
    from pipelines.report import graph_picture

    nodes = {
        "tokenize": (),
        "pretrain": ("tokenize",),
        "finetune.sentiment": ("pretrain",),
        "finetune.topic": ("pretrain",),
        "serve.sentiment": ("finetune.sentiment",),
        "serve.topic": ("finetune.topic",),
    }
    storage = tmp_path / "ptft-runs"
    manifest = mf.Manifest.create(storage, RUN_ID, "unit", tuple(nodes), config={"name": "unit"}, upstream=nodes)
    manifest.stage_ended("finetune.topic", mf.FAILED, error="boom")
    manifest.stage_ended("serve.topic", mf.SKIPPED, error="upstream finetune.topic failed")
    reloaded = mf.Manifest.load(storage, RUN_ID)
    assert {name: tuple(record.upstream) for name, record in reloaded.stages.items()} == nodes
    assert [stage["upstream"] for stage in snapshot(reloaded)["stages"]][-1] == ["finetune.topic"]
    picture = graph_picture(reloaded.stages)
    assert picture.startswith(b"\x89PNG") and len(picture) > 2000
    _, page = _report(storage)
    assert '<img class="graph" alt="pipeline graph"' in page
    assert not IMAGE.search(page.split('class="graph"')[0])  # not counted among the stages' pictures


def test_a_run_of_several_tasks_has_a_sweep_and_model_section_per_task(tmp_path: Path) -> None:
    """Each task's best trial and registered version, under the task's name, from what its tune
    and finetune nodes published (MLflow unreachable here: the manifest and artifacts suffice)."""
    storage = tmp_path / "ptft-runs"
    nodes = ("tokenize", "pretrain", "tune.sentiment", "finetune.sentiment", "tune.topic", "finetune.topic")
    manifest = mf.Manifest.create(storage, RUN_ID, "unit", nodes, config={"name": "unit"})
    manifest.tracking_uri = f"http://127.0.0.1:{_closed_port()}"
    for node in nodes:
        manifest.stage_started(node, f"key-{node}", f"run-{node}")
        manifest.stage_ended(node, mf.FAILED if node == "finetune.topic" else mf.SUCCEEDED)
    manifest.finished(mf.FAILED)
    for task, rate in (("sentiment", 0.001), ("topic", 0.0003)):
        outputs = {"best_trial": f"trial_{task}", "best_config": {"learning_rate": rate}}
        _publish(storage, f"tune.{task}", manifest, outputs, folder="tune")
    registered = {"name": "unit-sentiment", "version": "3", "model_uri": "models:/unit-sentiment/3"}
    _publish(storage, "finetune.sentiment", manifest, {"registered": registered}, folder="finetune")
    code, page = _report(storage)
    assert code == 0
    headings = re.findall(r"<h2>((?:Best trial|Model version)[^<]*)</h2>", page)
    assert headings == [
        "Best trial: task sentiment",
        "Model version: task sentiment",
        "Best trial: task topic",
        "Model version: task topic",
    ]
    sentiment, topic = page.split("<h2>Best trial: task topic</h2>")
    assert "trial_sentiment" in sentiment and "0.001" in sentiment and "unit-sentiment" in sentiment
    assert "trial_topic" in topic and "0.0003" in topic and "No model version registered" in topic
