"""A resume continues only the same work: a pre-training run is SIGKILLed after its first
checkpoint, its corpus file is edited, and `ptft resume` must start pretrain fresh (a new cache
key, a new MLflow run and Ray folder) and say why. Its own module, so that pytest-xdist can run it
beside test_faults.py's chain rather than after it.

The run reaches MLflow through a URI with credentials (the test server ignores them): no file the
run writes, and nothing it prints, may hold them; the resume takes them from MLFLOW_TRACKING_URI."""

from __future__ import annotations

import json
import os
import secrets
import urllib.parse
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from components.redaction import redact_url
from tests.conftest import tiny_config_dict
from tests.integration.test_faults import _Driver, _history, _pretrain_checkpointed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def edited_before_resume(ray_driver: str, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A pre-training-only run on a corpus file, SIGKILLed after pretrain's first checkpoint; the
    corpus is then edited and the run resumed: pretrain is other work now, and must start fresh."""
    from components import synthetic

    storage = tmp_path_factory.mktemp("edited")
    corpus = storage / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": row["text"]}) + "\n" for row in synthetic.generate("corpus", 600, 0)))
    config = {**tiny_config_dict(storage), "name": "faults-edited"}
    config["data"] = {"corpus": {"source": {"type": "file", "path": str(corpus)}}}  # no task: pretrain only
    config["pretrain"] = {
        "max_steps": 40,
        "warmup_steps": 4,
        "checkpoint_every": 10,
        "log_every": 5,
        "workers": {"num_workers": 1},  # resuming is the subject here; test_faults.py restores two ranks
    }
    config_path = storage / "edited.yaml"
    config_path.write_text(yaml.safe_dump(config))
    password = f"s3/cr@t:{secrets.token_hex(4)}"  # a "/", "@" and ":" to parse around
    secret_uri = mlflow_server.replace("://", f"://ptft-user:{urllib.parse.quote(password, safe='')}@", 1)
    # The first run is given the URI as an override; the resume finds only its redacted form on
    # disk, and must take it from the environment.
    driver = _Driver(storage, {**os.environ, "MLFLOW_TRACKING_URI": secret_uri})
    first = driver.start("run", str(config_path), f"tracking.uri={secret_uri}", f"ray.address={ray_driver}")
    driver.kill_when(first, lambda: _pretrain_checkpointed(driver), "a pretrain checkpoint")
    run_id = driver.manifest()["run_id"]
    with open(corpus, "a") as more:  # the data changes between the kill and the resume
        more.writelines(json.dumps({"text": row["text"]}) + "\n" for row in synthetic.generate("corpus", 200, 1))
    second = driver.start("resume", run_id, "--storage", str(storage))
    assert second.wait(timeout=900) == 0, driver.tail()
    return {
        "run_id": run_id,
        "client": MlflowClient(mlflow_server),
        "output": driver.tail(),
        "storage": storage,
        "password": password,
        "secret_uri": secret_uri,
    }


def test_a_resume_after_the_data_changed_starts_the_stage_fresh_and_says_why(edited_before_resume: dict) -> None:
    run_id, client = edited_before_resume["run_id"], edited_before_resume["client"]
    assert "[ptft] pretrain starts over: its inputs or settings changed" in edited_before_resume["output"]
    experiment = client.get_experiment_by_name("faults-edited").experiment_id
    runs = client.search_runs([experiment], f"tags.`ptft.run_id` = '{run_id}' and tags.`ptft.stage` = 'pretrain'")
    by_status = {run.info.status: run for run in runs}
    assert sorted(by_status) == ["FINISHED", "KILLED"]  # the old work's run ended, the new work has its own
    fresh = by_status["FINISHED"]
    assert fresh.data.tags["ptft.cache_key"] != by_status["KILLED"].data.tags["ptft.cache_key"]
    assert "restore/loaded_step" not in fresh.data.metrics  # no checkpoint of the old data was restored
    assert sorted(_history(client, fresh.info.run_id, "train/step")) == list(range(5, 41, 5))
    folders = sorted((edited_before_resume["storage"] / "ray_results").glob(f"{run_id}-pretrain-*"))
    assert len(folders) == 2, folders  # one Ray Train run per cache key


def test_no_file_or_output_of_the_run_holds_its_tracking_credentials(edited_before_resume: dict) -> None:
    storage, password = edited_before_resume["storage"], edited_before_resume["password"]
    forms = {password, urllib.parse.quote(password, safe=""), urllib.parse.quote(password)}
    files = [path for path in storage.rglob("*") if path.is_file()]
    assert any(path.name.startswith("driver-") for path in files)  # the console output of both drivers
    leaks = [str(path) for path in files for form in forms if form.encode() in path.read_bytes()]
    assert not leaks, leaks
    manifest = json.loads(next(storage.glob("runs/*/manifest.json")).read_text())
    assert manifest["tracking_uri"] == redact_url(edited_before_resume["secret_uri"])
    assert "://***@127.0.0.1:" in manifest["tracking_uri"]


def test_the_run_logged_no_credentials_to_mlflow(edited_before_resume: dict, tmp_path: Path) -> None:
    client, run_id = edited_before_resume["client"], edited_before_resume["run_id"]
    password = edited_before_resume["password"]
    experiment = client.get_experiment_by_name("faults-edited").experiment_id
    for run in client.search_runs([experiment], f"tags.`ptft.run_id` = '{run_id}'"):
        logged = json.dumps([run.data.params, run.data.tags])
        assert password not in logged and urllib.parse.quote(password, safe="") not in logged, run.info.run_name
        for path in _artifact_files(client, run.info.run_id):
            if path.endswith((".json", ".html", ".md", ".yaml", ".txt")):
                text = Path(client.download_artifacts(run.info.run_id, path, str(tmp_path))).read_text()
                assert urllib.parse.quote(password, safe="") not in text and password not in text, path


def _artifact_files(client: MlflowClient, run_id: str, folder: str | None = None) -> list[str]:
    found = []
    for artifact in client.list_artifacts(run_id, folder):
        found += _artifact_files(client, run_id, artifact.path) if artifact.is_dir else [artifact.path]
    return found
