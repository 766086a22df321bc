"""What the demo run shows: lineage and pictures in MLflow, system metrics of the training
stages, progress lines and `ptft status --json`, and attention maps over HTTP and from the CLI.
Asserts on the session's one demo run (tests/e2e/conftest.py)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from components import data
from pipelines.pipeline_config import load_config
from tests.conftest import REPO
from tests.e2e.conftest import PTFT, SHRINK, STAGES

pytestmark = pytest.mark.e2e


def _stage_runs(demo: dict) -> dict:
    client: MlflowClient = demo["client"]
    experiment = client.get_experiment_by_name("demo").experiment_id
    runs = client.search_runs([experiment], f"tags.`ptft.run_id` = '{demo['run_id']}'")
    return {run.data.tags["ptft.stage"]: run for run in runs if run.data.tags.get("ptft.stage") in STAGES}


def _artifacts(client: MlflowClient, run_id: str, folder: str) -> set[str]:
    return {item.path for item in client.list_artifacts(run_id, folder)}


def test_datasets_and_upstream_runs_are_in_mlflow(demo: dict) -> None:
    runs = _stage_runs(demo)
    config = load_config("configs/demo.yaml", SHRINK, check_data=False)
    sources = {
        "corpus": config.data.corpus.source,
        "train": config.data.task.train,
        "validation": config.data.task.validation,
        "test": config.data.task.test,
    }
    # The corpus is the tokenize stage's input, the task's labelled splits are prepare's.
    read = {item.dataset.name: item for stage in ("tokenize", "prepare") for item in runs[stage].inputs.dataset_inputs}
    assert {item.dataset.name for item in runs["tokenize"].inputs.dataset_inputs} == {"corpus"}
    assert {name: read[name].dataset.digest for name in sources} == {
        name: data.fingerprint(source) for name, source in sources.items()
    }  # the fingerprint is the digest
    assert {tag.value for tag in read["test"].tags} == {"test"}
    finetune = runs["finetune"]
    read_by_finetune = {item.dataset.name for item in finetune.inputs.dataset_inputs}
    assert read_by_finetune == {"task/train", "task/validation", "task/test"}
    assert {item.dataset.name for item in runs["pretrain"].inputs.dataset_inputs} == {"pretrain_blocks"}
    for upstream in ("tokenize", "pretrain", "prepare", "tune"):
        assert finetune.data.tags[f"ptft.upstream.{upstream}"] == runs[upstream].info.run_id
    assert runs["serve"].data.tags["ptft.upstream.finetune"] == finetune.info.run_id


def test_the_model_version_links_its_runs(demo: dict) -> None:
    runs = _stage_runs(demo)
    version = demo["client"].get_model_version_by_alias("demo-classifier", "champion")
    for stage in ("pretrain", "tune", "finetune"):
        assert runs[stage].info.run_id in version.description, version.description
        assert version.tags[f"ptft.{stage}_run_id"] == runs[stage].info.run_id
    assert demo["run_id"] in version.description


def test_training_stages_log_pictures_and_system_metrics(demo: dict, tmp_path: Path) -> None:
    client, runs = demo["client"], _stage_runs(demo)
    assert {"plots/loss.png", "plots/learning_rate.png"} <= _artifacts(client, runs["pretrain"].info.run_id, "plots")
    finetune = runs["finetune"].info.run_id
    assert {
        "plots/loss.png",
        "plots/learning_rate.png",
        "plots/confusion_matrix.png",
        "plots/attention.png",
        "plots/confusion_matrix.json",
    } <= _artifacts(client, finetune, "plots")
    assert "plots/sweep.png" in _artifacts(client, runs["tune"].info.run_id, "plots")
    matrix = client.download_artifacts(finetune, "plots/confusion_matrix.json", str(tmp_path))
    counts = json.loads(open(matrix).read())["rows_true_columns_predicted"]
    assert sum(map(sum, counts)) == 96  # every test example once (data.task.test.num_examples)
    accuracy = sum(counts[i][i] for i in range(len(counts))) / 96
    assert accuracy == pytest.approx(runs["finetune"].data.metrics["test/accuracy"], abs=1e-6)  # the same model
    for stage in ("pretrain", "finetune"):
        metrics = runs[stage].data.metrics
        assert "system/node0/cpu_utilization_percentage" in metrics, sorted(metrics)
        assert "system/node0/system_memory_usage_megabytes" in metrics


def test_run_prints_stage_progress_with_steps(demo: dict) -> None:
    out = demo["stdout"]
    for stage in STAGES:
        assert f"[ptft] {stage:<8} started" in out and f"[ptft] {stage:<8} succeeded in" in out, stage
    steps = [line for line in out.splitlines() if line.startswith(f"[ptft] {'pretrain':<8} step ")]
    assert steps and all("/40 (" in line for line in steps), steps  # pretrain.max_steps=40


# The line formats of other programs' logs: Ray workers' lines streamed to the driver, Ray's and
# Python logging's, Ray Serve's, MLflow's, Python warnings. None may reach a default run's console.
FOREIGN = re.compile(
    r"\((?:\w+ )?pid=\d+"
    r"|^\(raylet\)"
    r"|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+(?:DEBUG|INFO|WARNING|ERROR)"
    r"|^(?:INFO|WARNING|ERROR) \d{4}-\d\d-\d\d"
    r"|^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?:INFO|WARNING|ERROR) mlflow"
    r"|\w+Warning: "
)


def test_the_console_shows_ptft_lines_and_the_run_log_keeps_the_rest(demo: dict) -> None:
    console = (demo["stdout"] + demo["stderr"]).splitlines()
    assert not [line for line in console if FOREIGN.search(line)], "\n".join(console)
    announced = re.match(r"\[ptft\] run (\S+); logs of Ray, MLflow and the workers: (\S+)$", console[0])
    assert announced and announced[1] == demo["run_id"], console[0]
    log = Path(announced[2])
    assert log == demo["storage"] / "runs" / demo["run_id"] / "ptft.log"
    assert f"Log (Ray, MLflow, workers): {log}" in console
    kept = [line for line in log.read_text().splitlines() if FOREIGN.search(line)]
    for what in ("(RayTrainWorker pid=", "(TrainController pid=", "INFO mlflow.", "INFO components.tokenize"):
        assert any(what in line for line in kept), what
    assert not any(line.startswith("[ptft]") for line in log.read_text().splitlines())


def test_status_json_describes_the_finished_run(demo: dict) -> None:
    done = subprocess.run(
        [PTFT, "status", demo["run_id"], "--storage", str(demo["storage"]), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    assert state["run_id"] == demo["run_id"] and state["status"] == "succeeded"
    assert [stage["name"] for stage in state["stages"]] == list(STAGES)
    assert all(stage["status"] == "succeeded" and stage["seconds"] > 0 for stage in state["stages"])


def test_explain_over_http(demo: dict) -> None:
    response = requests.post(f"{demo['url']}/explain", json={"texts": ["a moving and superb film"]}, timeout=60)
    assert response.status_code == 200, response.text
    (item,) = response.json()["explanations"]
    assert item["tokens"][0] == "[CLS]" and item["label"] in ("positive", "negative")
    assert len(item["attention"]) >= 1 and all(len(head) == len(item["tokens"]) for head in item["attention"])
    bad = requests.post(f"{demo['url']}/explain", json={"texts": ["x"], "layer": 99}, timeout=60)
    assert bad.status_code == 422 and "layer" in bad.json()["detail"]


def test_ptft_explain_reads_the_champion_from_the_registry(demo: dict, tmp_path) -> None:
    picture = tmp_path / "attention.png"
    done = subprocess.run(
        [
            PTFT,
            "explain",
            "models:/demo-classifier@champion",
            "a dull film",
            "--tracking-uri",
            demo["client"].tracking_uri,
            "--output",
            str(picture),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "'a dull film' ->" in done.stdout and "head 0:" in done.stdout
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
