"""The tracker against a real MLflow store (sqlite): no step logged twice across attempts,
runs found again by their tags, orphans closed, credentials never logged; and against an address
where no server answers."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components import redaction, tracking
from components.net import free_port
from tests import conftest
from tests.conftest import sqlite_store, wait_until


@pytest.fixture
def store(tmp_path: Path) -> tuple[MlflowClient, str, str]:
    uri = sqlite_store(tmp_path / "mlflow.db")
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


def test_a_server_that_does_not_answer_is_noticed_at_once_not_after_mlflows_own_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MLflow's default HTTP retries back off for minutes; the tracker's sender makes one of its
    own and then retries by itself, at most 10 s apart, so it finds the server gone at once and
    back soon after it returns (tests/integration/test_tracking_outage.py)."""
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)  # MLflow's default: 7
    tracker = tracking.MlflowTracker(f"http://127.0.0.1:{free_port()}", "0" * 32, flush_every=1)  # nothing listens
    tracker.log_metrics({"train/loss": 1.0}, 1)
    wait_until(lambda: tracker.down_since is not None, "the sender to find the server gone", timeout_s=20)
    assert tracker.pending() == 1  # kept for when it is back


def test_find_reopen_and_close_orphans(store) -> None:
    client, _, experiment = store
    parent = tracking.start_run(client, experiment, "pipeline", tags={"ptft.run_id": "p2"})
    child = tracking.start_run(
        client, experiment, "pretrain", parent_run_id=parent, tags={"ptft.run_id": "p2", "ptft.stage": "pretrain"}
    )
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
    tracker.log_params(
        {
            "tracking.uri": "https://alice:s3cr3t@mlflow.example.com",
            "lr": 0.1,
            "aws_secret_access_key": "AKIAXXXX",
            "mlflow_tracking_token": "tok123",
        }
    )
    tracker.set_tags({"db_password": "hunter2", "ptft.stage": "x"})
    data = client.get_run(run_id).data
    logged = " ".join([*data.params, *data.params.values(), *data.tags, *data.tags.values()])
    for secret in ("s3cr3t", "alice", "AKIAXXXX", "tok123", "hunter2"):
        assert secret not in logged
    assert data.params["tracking.uri"] == "https://***@mlflow.example.com" and data.params["lr"] == "0.1"
    nested = redaction.redact_tree({"tracking": {"uri": "http://u:p@h:5000", "token": "x"}, "name": "demo"})
    assert nested == {"tracking": {"uri": "http://***@h:5000"}, "name": "demo"}


def _trial_setup(store, tmp_path: Path):
    """What a trial of a tune stage (whose run is opened here) gets from the stage."""
    from components import finetune, tune
    from components.schemas import DeepSpeedConfig, Hyperparameters

    client, uri, experiment = store
    parent = tracking.start_run(client, experiment, "tune", tags={"ptft.run_id": "p1"})
    base = finetune.ClassifierRun(
        pretrained_dir=str(tmp_path),
        task_dir=str(tmp_path),
        label_names=["a", "b"],
        epochs=4,
        hyper=Hyperparameters(),
        deepspeed=DeepSpeedConfig(),
        tracking_uri=uri,
    )
    return tune.TrialSetup(
        base=base,
        ranking=tune.Ranking(metric="eval/accuracy", mode="max"),
        tune_run_id=parent,
        experiment_id=experiment,
        pipeline_run_id="p1",
    )


def test_a_trial_run_records_the_config_its_epochs_trained_with(store, tmp_path: Path) -> None:
    from components import tune

    client, _, experiment = store
    setup = _trial_setup(store, tmp_path)
    first, exploited = {"learning_rate": 1e-3}, {"learning_rate": 1.2e-3}
    tracker = tune.open_trial_run(setup, "trial_0", first)
    run_id = tracker.run_id
    tune.record_trained_config(tracker, first)
    # PBT restarts the trial with a new config; an attempt that trains no epoch records nothing.
    again = tune.open_trial_run(setup, "trial_0", exploited)
    assert again.run_id == run_id and client.get_run(run_id).data.tags["ptft.attempts"] == "2"
    tags = client.get_run(run_id).data.tags
    assert json.loads(tags[tune.CONFIG_TAG]) == first and "ptft.pbt_exploits" not in tags
    tune.record_trained_config(again, exploited)
    tune.record_trained_config(again, exploited)  # the same attempt again: no second exploit
    tags = client.get_run(run_id).data.tags
    assert json.loads(tags[tune.CONFIG_TAG]) == exploited and tags["ptft.pbt_exploits"] == "1"
    assert client.get_run(run_id).data.params == {"learning_rate": "0.001"}  # params: the first config


def test_a_trial_run_opened_by_an_attempt_killed_before_its_params_gets_them_when_reopened(
    store, tmp_path: Path
) -> None:
    from components import tune

    client, _, experiment = store
    setup = _trial_setup(store, tmp_path)
    # What a killed attempt leaves: the trial's run, opened with its tags, and no params yet.
    tracking.start_run(
        client,
        experiment,
        "trial_0",
        parent_run_id=setup.tune_run_id,
        tags={tune.TRIAL_TAG: "trial_0", "ptft.stage": "tune-trial", "ptft.run_id": "p1"},
    )
    tracker = tune.open_trial_run(setup, "trial_0", {"learning_rate": 1e-3})
    assert client.get_run(tracker.run_id).data.params == {"learning_rate": "0.001"}


def test_experiments_open_on_their_runs_in_the_mlflow_ui(store) -> None:
    """Marked as MLflow 3's model-training kind, unless a person chose another."""
    client, _, experiment = store
    kind = tracking.EXPERIMENT_KIND_TAG
    assert client.get_experiment(experiment).tags[kind] == tracking.MODEL_TRAINING_KIND
    older = client.create_experiment("made-before-the-tag")
    assert tracking.ensure_experiment(client, "made-before-the-tag", None) == older
    assert client.get_experiment(older).tags[kind] == tracking.MODEL_TRAINING_KIND
    chosen = client.create_experiment("chosen-in-the-ui", tags={kind: "genai_development"})
    tracking.ensure_experiment(client, "chosen-in-the-ui", None)
    assert client.get_experiment(chosen).tags[kind] == "genai_development"  # a person's choice stands


def test_ptft_ui_names_the_runs_and_the_newest_pipeline_run(tmp_path: Path) -> None:
    """The newest run was the storage's newest, whichever pipeline or store it was recorded in, so
    with two pipelines in one storage (the demo and rt_polarity.yaml both use ./ptft-runs) the link
    named the other pipeline's run under this one's experiment: a page of nothing."""
    from pipelines import manifest as mf
    from pipelines.cli import _newest_run_links
    from pipelines.pipeline_config import validate
    from tests.conftest import tiny_config_dict

    config = validate(tiny_config_dict(tmp_path / "store"))
    assert _newest_run_links(config, "http://127.0.0.1:5000") == {}  # nothing ran yet
    assert _newest_run_links(config, "http://127.0.0.1:5000", named=False) == {}
    client = MlflowClient(config.tracking_uri())
    experiment = tracking.ensure_experiment(client, config.experiment_name(), None)
    other = tracking.ensure_experiment(client, "another-pipeline", None)
    recorded = (  # run id, MLflow run, experiment, store: oldest first
        ("20260101-000000-aaaaaa", "old", experiment, config.tracking_uri()),
        ("20260102-000000-bbbbbb", "new", experiment, config.tracking_uri()),
        ("20260103-000000-cccccc", "other", other, config.tracking_uri()),
        ("20260104-000000-dddddd", "elsewhere", experiment, "http://mlflow.example:5000"),
    )
    for run_id, mlflow_run, experiment_id, store in recorded:
        manifest = mf.Manifest.create(config.storage_path(), run_id, config.name, ("tokenize",), {"name": "x"})
        manifest.mlflow_run_id, manifest.experiment_id, manifest.tracking_uri = mlflow_run, experiment_id, store
        manifest.save()
    runs = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs"
    assert _newest_run_links(config, "http://127.0.0.1:5000") == {
        "all runs": f"{runs}?workflowType=machine_learning",  # the runs table, not the GenAI overview
        "newest run 20260102-000000-bbbbbb": f"{runs}/new",
    }
    others = f"http://127.0.0.1:5000/#/experiments/{other}/runs"
    assert _newest_run_links(config, "http://127.0.0.1:5000", named=False) == {  # `ptft ui` without a config
        "all runs": f"{others}?workflowType=machine_learning",
        "newest run 20260103-000000-cccccc": f"{others}/other",
    }


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with conftest.small_disk(tmp_path / "disk", "2M") as folder:
        yield folder


def test_a_store_out_of_disk_space_stops_the_loop_at_once_not_after_the_outage_budget(small_disk: Path) -> None:
    """A real SQLite store on a disk that fills up: an outage would be waited out for 15 minutes
    (and close() held the stage's other ranks at a barrier meanwhile); a full disk is not one."""
    uri = f"sqlite:///{small_disk / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = tracking.start_run(client, tracking.ensure_experiment(client, "t", str(small_disk)), "stage")
    tracker = tracking.MlflowTracker(uri, run_id, flush_every=50)
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.flush()
    with open(small_disk / "filler", "wb") as filler:  # the rest of the disk
        with contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
    with pytest.raises(tracking.TrackingStoreFull, match="out of disk space"):  # long before the loop's end
        for step in range(2, 100_000):  # ~2 minutes: a fraction of OUTAGE_BUDGET_S, which it would wait out
            tracker.log_metrics({"train/loss": 1.0 / step, "train/lr": 1e-3}, step)
            time.sleep(0.001)
    assert tracker.down_since is None  # not taken for an outage
    with pytest.raises(tracking.TrackingStoreFull):
        tracker.close()
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))[0] == 1  # what arrived stays


def test_an_mlflow_server_that_does_not_answer_is_told_apart_from_other_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What ends a run in `the MLflow server stopped answering` (and spares a second wait for it):
    MLflow's client failing to connect, not another server refusing (a model hub)."""
    import requests
    from mlflow.exceptions import MlflowException

    from components.net import mlflow_unreachable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own setting: fail at once
    nowhere = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(MlflowException) as refused:
        MlflowClient(nowhere).get_run("0" * 32)
    assert mlflow_unreachable(refused.value)
    with pytest.raises(requests.exceptions.ConnectionError) as other:
        requests.get(nowhere, timeout=5)
    assert not mlflow_unreachable(other.value)
