"""The demo pipeline once, through the real `ptft` CLI, on the shared Ray cluster and MLflow
server; then assertions on the artifacts, the MLflow run tree, the registry and the live
Serve endpoint over HTTP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from components.training import free_port
from pipelines.runner import STAGES
from tests.conftest import REPO

pytestmark = pytest.mark.e2e

PTFT = str(Path(sys.executable).parent / "ptft")
# The demo config, shrunk through ordinary overrides (no test switches in the code).
SHRINK = [
    "data.corpus.source.num_examples=2000", "data.task.train.num_examples=320",
    "data.task.validation.num_examples=96", "data.task.test.num_examples=96",
    "pretrain.max_steps=40", "pretrain.warmup_steps=4", "pretrain.checkpoint_every=20",
    "pretrain.batch_size_per_worker=16",
    "tune.num_samples=2", "tune.max_epochs=2", "finetune.epochs=1",
]


@pytest.fixture(scope="module")
def demo(ray_driver: str, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    storage = tmp_path_factory.mktemp("demo")
    port = free_port()
    command = [PTFT, "run", "configs/demo.yaml", *SHRINK, f"storage={storage}", f"tracking.uri={mlflow_server}",
               f"ray.address={ray_driver}", f"serve.port={port}", "serve.app_name=e2e"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    yield {"storage": storage, "url": f"http://127.0.0.1:{port}", "stdout": result.stdout,
           "client": MlflowClient(mlflow_server)}  # fmt: skip
    from ray import serve

    serve.delete("e2e")


def test_cli_prints_predictions_and_where_to_browse(demo: dict) -> None:
    out = demo["stdout"]
    assert "served at" in out and ("-> positive" in out or "-> negative" in out)
    assert "ptft ui" in out


def test_every_stage_wrote_its_artifacts(demo: dict) -> None:
    artifacts = demo["storage"] / "artifacts"
    for stage in STAGES:
        (folder,) = list((artifacts / stage).iterdir())  # one key folder per stage
        assert (folder / "_SUCCESS").is_file(), stage
    tokenize = next((artifacts / "tokenize").iterdir())
    assert (tokenize / "tokenizer" / "tokenizer.json").is_file()
    assert list((tokenize / "pretrain_blocks").glob("*.parquet"))
    pretrained = next((artifacts / "pretrain").iterdir()) / "model"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in pretrained.iterdir()}
    assert (next((artifacts / "tune").iterdir()) / "best_config.json").is_file()
    classifier = next((artifacts / "finetune").iterdir()) / "model"
    assert (classifier / "model.safetensors").is_file()


def _runs(client: MlflowClient, experiment_id: str, filter_string: str):
    return client.search_runs([experiment_id], filter_string)


def test_mlflow_tree_parent_stages_trials(demo: dict) -> None:
    client = demo["client"]
    experiment = client.get_experiment_by_name("demo")
    parents = [r for r in _runs(client, experiment.experiment_id, "") if "mlflow.parentRunId" not in r.data.tags]
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert parent.data.params["pretrain.max_steps"] == "40"
    assert {"ptft.run_id", "ptft.config_hash", "ptft.git_sha"} <= set(parent.data.tags)
    assert "config" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    children = _runs(client, experiment.experiment_id, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_stage = {run.data.tags["ptft.stage"]: run for run in children}
    assert sorted(by_stage) == sorted(STAGES)
    assert all(run.info.status == "FINISHED" for run in children)

    pretrain = by_stage["pretrain"].data.metrics
    assert {"train/loss", "train/learning_rate", "throughput/tokens_per_s", "eval/mlm_loss"} <= set(pretrain)
    assert {"test/accuracy", "eval/accuracy"} <= set(by_stage["finetune"].data.metrics)

    tune_id = by_stage["tune"].info.run_id
    trials = _runs(client, experiment.experiment_id, f"tags.`mlflow.parentRunId` = '{tune_id}'")
    assert len(trials) == 2
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert {"learning_rate", "weight_decay", "dropout"} <= set(trial.data.params)
        assert "eval/accuracy" in trial.data.metrics and "eval/loss" in trial.data.metrics


def test_registered_version_is_champion_from_finetune_run(demo: dict) -> None:
    client = demo["client"]
    version = client.get_model_version_by_alias("demo-classifier", "champion")
    finetune_run = client.get_run(version.run_id)
    assert finetune_run.data.tags["ptft.stage"] == "finetune"
    assert float(version.tags["ptft.test_accuracy"]) == pytest.approx(finetune_run.data.metrics["test/accuracy"])


def test_serve_answers_http(demo: dict) -> None:
    url = demo["url"]
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    texts = ["the film was superb and moving .", "a dull , tedious script .", "clumsy and flat ."]
    response = requests.post(f"{url}/predict", json={"texts": texts}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["predictions"]) == 3
    assert all(p["label"] in ("negative", "positive") and 0.5 <= p["score"] <= 1.0 for p in body["predictions"])
    assert body["model"]["name"] == "demo-classifier"
    assert requests.get(f"{url}/metadata", timeout=10).json()["version"] == body["model"]["version"]


@pytest.mark.parametrize(
    "payload",
    [{"text": "missing the list"}, {"texts": []}, {"texts": [42]}, {"texts": "not a list"}, {"texts": ["x"] * 1000}],
    ids=["wrong-field", "empty", "not-strings", "not-a-list", "too-many"],
)
def test_malformed_requests_get_422_with_a_message(demo: dict, payload: dict) -> None:
    response = requests.post(f"{demo['url']}/predict", json=payload, timeout=30)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


def test_invalid_json_gets_422(demo: dict) -> None:
    response = requests.post(f"{demo['url']}/predict", data="{not json", timeout=30,
                             headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == 422
