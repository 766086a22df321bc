"""The tracker against a real MLflow store (sqlite): no step logged twice across attempts,
runs found again by their tags, orphans closed, credentials never logged."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components import tracking


@pytest.fixture
def store(tmp_path: Path) -> tuple[MlflowClient, str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = tracking.ensure_experiment(client, "t", str(tmp_path / "artifacts"))
    return client, uri, experiment


def test_a_restarted_attempt_does_not_log_a_step_twice(store) -> None:
    client, uri, experiment = store
    run_id = tracking.start_run(client, experiment, "stage", tags={"ptft.run_id": "p1"})
    first = tracking.MlflowTracker(uri, run_id)
    for step in range(1, 8):
        first.log_metrics({"train/loss": 10.0 - step}, step)
    first.flush()
    # The second attempt restored step 4 and recomputes 5..7 before going on to 10.
    second = tracking.MlflowTracker(uri, run_id, resumed=True)
    assert second.logged_through("train/loss") == 7
    for step in range(5, 11):
        second.log_metrics({"train/loss": 100.0 + step}, step)
    second.close()
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    assert {m.step: m.value for m in history}[6] == 4.0  # the first attempt's value stands


def test_find_reopen_and_close_orphans(store) -> None:
    client, _, experiment = store
    parent = tracking.start_run(client, experiment, "pipeline", tags={"ptft.run_id": "p2"})
    child = tracking.start_run(client, experiment, "pretrain", parent_run_id=parent,
                               tags={"ptft.run_id": "p2", "ptft.stage": "pretrain"})  # fmt: skip
    other = tracking.start_run(client, experiment, "pipeline", tags={"ptft.run_id": "p3"})
    assert tracking.find_run(client, experiment, {"ptft.run_id": "p2", "ptft.stage": "pretrain"}) == child
    assert tracking.find_run(client, experiment, {"ptft.run_id": "p2", "ptft.stage": "tune"}) is None
    assert sorted(tracking.close_orphans(client, experiment, "p2")) == sorted([parent, child])
    assert client.get_run(child).info.status == "KILLED"
    assert client.get_run(other).info.status == "RUNNING"  # another pipeline run's: not touched
    tracking.reopen_run(client, child)
    run = client.get_run(child)
    assert run.info.status == "RUNNING" and run.data.tags["ptft.attempts"] == "2"


def test_credentials_are_never_logged(store) -> None:
    client, uri, experiment = store
    run_id = tracking.start_run(client, experiment, "r")
    tracker = tracking.MlflowTracker(uri, run_id)
    tracker.log_params({"tracking.uri": "https://alice:s3cr3t@mlflow.example.com", "lr": 0.1,
                        "aws_secret_access_key": "AKIAXXXX", "mlflow_tracking_token": "tok123"})  # fmt: skip
    tracker.set_tags({"db_password": "hunter2", "ptft.stage": "x"})
    data = client.get_run(run_id).data
    logged = " ".join([*data.params, *data.params.values(), *data.tags, *data.tags.values()])
    for secret in ("s3cr3t", "alice", "AKIAXXXX", "tok123", "hunter2"):
        assert secret not in logged
    assert data.params["tracking.uri"] == "https://***@mlflow.example.com" and data.params["lr"] == "0.1"
    nested = tracking.redact_tree({"tracking": {"uri": "http://u:p@h:5000", "token": "x"}, "name": "demo"})
    assert nested == {"tracking": {"uri": "http://***@h:5000"}, "name": "demo"}
