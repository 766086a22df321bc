"""The demo pipeline once, through the real `ptft` CLI, on the shared Ray cluster and MLflow
server; then assertions on the artifacts, the MLflow run tree, the registry and the live
Serve endpoint over HTTP."""

from __future__ import annotations

import json
import re
from concurrent.futures import Future
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow.tracking import MlflowClient

from pipelines import stages
from pipelines.runner import stage_key
from pipelines.versions import versions
from tests.e2e.conftest import (
    SECRETS,
    STAGES,
    demo_manifest,
    manifest_of,
    run_id_of,
    run_ptft,
    run_ptft_on_a_terminal,
)

pytestmark = pytest.mark.e2e


def test_cli_prints_predictions_and_where_to_browse(demo: dict, mlflow_server: str) -> None:
    out = demo["stdout"]
    assert "served at" in out and ("-> positive" in out or "-> negative" in out)
    experiment = demo["client"].get_experiment_by_name("demo").experiment_id
    parent = demo_manifest(demo)["mlflow_run_id"]
    runs = f"{mlflow_server}/#/experiments/{experiment}/runs"  # the tracking server's UI
    assert f"all runs: {runs}?workflowType=machine_learning\n" in out and f"this run: {runs}/{parent}\n" in out
    assert f"Report: ptft report {demo['run_id']} --storage {demo['storage']}" in out


def test_every_stage_wrote_its_artifacts(demo: dict) -> None:
    artifacts, keys = demo["storage"] / "artifacts", {n: r["key"] for n, r in demo_manifest(demo)["stages"].items()}
    for stage in STAGES:
        folder = artifacts / stage / keys[stage]  # the key folder of the demo run's stage
        assert (folder / "_SUCCESS").is_file(), stage
        made_of = json.loads((folder / "config.json").read_text())  # self-describing: what its key stands for
        declared = stages.BY_NAME[stage]
        assert (made_of["stage"], made_of["version"]) == (stage, declared.version)
        assert stage_key(made_of) == folder.name
    tokenize = artifacts / "tokenize" / keys["tokenize"]
    assert (tokenize / "tokenizer" / "tokenizer.json").is_file()
    assert list((tokenize / "pretrain_blocks").glob("*.parquet"))
    pretrained = artifacts / "pretrain" / keys["pretrain"] / "model"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in pretrained.iterdir()}
    assert (artifacts / "tune" / keys["tune"] / "best_config.json").is_file()
    classifier = artifacts / "finetune" / keys["finetune"] / "model"
    assert (classifier / "model.safetensors").is_file()


def test_published_stages_leave_their_result_logs_and_no_checkpoint_in_ray_storage(demo: dict) -> None:
    """Pretrain, the sweep's trials and finetune each checkpointed in Ray storage as they trained;
    once each stage's artifact is published, its checkpoints only take disk (the demo's other runs
    and the two-task scenario share this storage: only this run's folders are looked at)."""
    runs = sorted((demo["storage"] / "ray_results").glob(f"{demo['run_id']}-*"))
    trained = {"pretrain", "tune", "finetune"}
    assert {folder.name.split("-")[3] for folder in runs} == trained, [folder.name for folder in runs]
    assert list((demo["storage"] / "ray_results").glob(f"{demo['run_id']}-tune-*/*/result.json"))  # logs stay
    assert [str(path) for folder in runs for path in folder.rglob("checkpoint_*")] == []
    log = (demo["storage"] / "runs" / demo["run_id"] / "ptft.log").read_text()
    for stage in trained:
        assert re.search(rf"stage {stage}: removed its Ray checkpoints \(\d+\.\d MB\)", log), stage


def _runs(client: MlflowClient, experiment_id: str, filter_string: str):
    return client.search_runs([experiment_id], filter_string)


def test_mlflow_tree_parent_stages_trials(demo: dict) -> None:
    client = demo["client"]
    experiment = client.get_experiment_by_name("demo")
    (parent,) = _runs(
        client, experiment.experiment_id, f"tags.`ptft.run_id` = '{demo['run_id']}' and tags.`ptft.pipeline` = 'demo'"
    )
    assert parent.info.status == "FINISHED"
    assert parent.data.params["pretrain.max_steps"] == "40"
    assert {"ptft.run_id", "ptft.config_hash", "ptft.git_sha"} <= set(parent.data.tags)
    assert parent.data.tags["ptft.versions"] == versions()  # what it ran on, as `ptft --version` says
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


def test_serve_listens_on_loopback_only(demo: dict) -> None:
    """Only the sockets of the process that accepts the demo's requests count: other processes
    (Ray workers listen on the node's address) may hold the same port number elsewhere."""
    from http.client import HTTPConnection

    import psutil

    port = int(demo["url"].rsplit(":", 1)[1])
    client = HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        client.request("GET", "/healthz")
        assert client.getresponse().read()  # answered, so accepted: the connection is kept alive, ours to find
        ours = client.sock.getsockname()[1]
        connections = psutil.net_connections("tcp")
        (ingress,) = {c.pid for c in connections if c.laddr.port == port and c.raddr and c.raddr.port == ours}
    finally:
        client.close()
    listening = [c.laddr.ip for c in connections if c.pid == ingress and c.status == "LISTEN" and c.laddr.port == port]
    assert listening and set(listening) == {"127.0.0.1"}, (psutil.Process(ingress).name(), listening)


@pytest.mark.parametrize(
    "payload",
    [{"text": "missing the list"}, {"texts": []}, {"texts": [42]}, {"texts": "not a list"}, {"texts": ["x"] * 1000}],
    ids=["wrong-field", "empty", "not-strings", "not-a-list", "too-many"],
)
def test_malformed_requests_get_422_with_a_message(demo: dict, payload: dict) -> None:
    response = requests.post(f"{demo['url']}/predict", json=payload, timeout=30)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


def test_invalid_json_gets_400(demo: dict) -> None:
    response = requests.post(
        f"{demo['url']}/predict", data="{not json", timeout=30, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "not JSON" in response.json()["detail"]


def test_no_secret_reaches_mlflow(demo: dict, tmp_path: Path) -> None:
    client = demo["client"]
    experiment = client.get_experiment_by_name("demo")
    for run in _runs(client, experiment.experiment_id, ""):
        logged = " ".join([*run.data.params.values(), *run.data.tags.values()])
        assert not any(secret in logged for secret in SECRETS.values()), run.info.run_name
    parent = client.search_runs(
        [experiment.experiment_id], f"tags.`ptft.run_id` = '{demo['run_id']}' and tags.`ptft.pipeline` = 'demo'"
    )[0]
    resolved = Path(
        mlflow.artifacts.download_artifacts(
            run_id=parent.info.run_id,
            artifact_path="config/resolved.json",
            dst_path=str(tmp_path),
            tracking_uri=client.tracking_uri,
        )
    ).read_text()
    assert not any(secret in resolved for secret in SECRETS.values())


# --- caching: the same command again, then one fine-tuning field changed ------------------------


@pytest.fixture(scope="module")
def reruns(demo: dict, two_tasks: Future) -> dict:
    # two_tasks: the two-task scenario runs on the same storage meanwhile (started here, in the background).
    cached = run_ptft(demo["command"])
    changed = run_ptft([*demo["command"], "finetune.epochs=2", "--quiet"])
    forced = run_ptft_on_a_terminal([*demo["command"], "finetune.epochs=2", "--rerun", "finetune"])
    return {
        "cached": manifest_of(demo["storage"], run_id_of(cached)),
        "cached_stdout": cached.stdout,
        "changed": manifest_of(demo["storage"], run_id_of(changed)),
        "changed_stdout": changed.stdout,
        "forced": manifest_of(demo["storage"], run_id_of(forced)),
        "forced_terminal": forced,
    }


def test_quiet_prints_only_the_summary(reruns: dict) -> None:
    out = reruns["changed_stdout"]
    assert "[ptft]" not in out and "== sweep" not in out, out[:3000]  # no stage lines, no progress
    assert f"Pipeline run {reruns['changed']['run_id']} finished" in out and "served at" in out


def test_unchanged_rerun_is_all_cache_hits(demo: dict, reruns: dict) -> None:
    manifest = reruns["cached"]
    assert manifest["run_id"] != demo["run_id"]
    assert {name: record["status"] for name, record in manifest["stages"].items()} == dict.fromkeys(STAGES, "cached")
    out = reruns["cached_stdout"]
    producer = re.escape(demo["run_id"])  # the pipeline run that made every output, as `ptft status` names it
    for stage in STAGES:  # one line a stage: the hit, its producer, then the output and metrics
        assert out.count(f"[ptft] {stage:<8} cache hit in") == 1, out[-3000:]
        assert re.search(rf"\[ptft\] {stage} +cache hit in \S+ \(produced by run {producer}\): \S", out), out[-3000:]
    client = demo["client"]
    experiment = client.get_experiment_by_name("demo")
    first = {
        run.data.tags["ptft.stage"]: run.info.run_id
        for run in _runs(client, experiment.experiment_id, f"tags.`ptft.run_id` = '{demo['run_id']}'")
        if run.data.tags.get("ptft.stage") in STAGES
    }
    hits = _runs(client, experiment.experiment_id, f"tags.`ptft.run_id` = '{manifest['run_id']}'")
    stage_runs = {run.data.tags["ptft.stage"]: run for run in hits if "ptft.stage" in run.data.tags}
    assert sorted(stage_runs) == sorted(STAGES)
    for stage, run in stage_runs.items():
        assert run.data.tags["ptft.cache_hit"] == "true" and run.info.status == "FINISHED"
        assert run.data.tags["ptft.cached_from_run_id"] == first[stage]  # points at the producer
    key = manifest["stages"]["finetune"]["key"]
    versions = client.search_model_versions(f"name = 'demo-classifier' and tags.`ptft.cache_key` = '{key}'")
    assert [version.run_id for version in versions] == [first["finetune"]]  # verified, not registered again


def test_changing_a_finetuning_field_reruns_only_finetune_and_serve(reruns: dict) -> None:
    statuses = {name: record["status"] for name, record in reruns["changed"]["stages"].items()}
    assert statuses == {
        "tokenize": "cached",
        "pretrain": "cached",
        "prepare": "cached",
        "tune": "cached",
        "finetune": "succeeded",
        "serve": "succeeded",
    }


def test_rerun_forces_a_stage_and_what_follows(reruns: dict) -> None:
    statuses = {name: record["status"] for name, record in reruns["forced"]["stages"].items()}
    assert statuses == {
        "tokenize": "cached",
        "pretrain": "cached",
        "prepare": "cached",
        "tune": "cached",
        "finetune": "succeeded",
        "serve": "succeeded",
    }
    # The same key as the run before: its artifact was replaced, not duplicated.
    assert reruns["forced"]["stages"]["finetune"]["key"] == reruns["changed"]["stages"]["finetune"]["key"]
    folder = Path(reruns["forced"]["stages"]["finetune"]["output_uri"]).parent
    assert json.loads((folder / "_SUCCESS").read_text())["pipeline_run_id"] == reruns["forced"]["run_id"]
    # No partial or old folder of this key left (the two-task run may have its own partials meanwhile).
    assert not list(folder.parent.glob(f".{folder.name}.*"))


def test_a_terminal_gets_live_bars_and_the_same_lines(reruns: dict) -> None:
    """The forced re-run ran on a pseudo-terminal: the running stages were drawn as live bars
    (rich), ptft's lines were printed above them, and no other program's output reached it."""
    terminal = reruns["forced_terminal"]
    assert "\x1b[" in terminal.stdout  # drawn, not just printed
    text = terminal.text
    assert "[ptft] finetune started" in text and "[ptft] finetune succeeded in" in text
    assert re.search(r"finetune\s+[━╺╸]+\s+\d+/\d+ steps", text), text[-3000:]  # a bar with its steps
    assert not re.search(r"\[ptft\] finetune +step ", text)  # the plain progress lines are for logs
    assert "pid=" not in text
