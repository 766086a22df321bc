"""Real outages of the tracking store while training logs: the `mlflow server` process killed and
started again, and (separately) the PostgreSQL server behind it stopped and started, under the
tracker alone and in the middle of a pre-training stage under Ray Train."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from components import tracking
from components.net import free_port
from pipelines import manifest as mf
from pipelines import preflight
from pipelines.pipeline_config import Problem, validate
from pipelines.waits import TrackingWait
from tests.conftest import REPO, tiny_config_dict, wait_until
from tests.integration.pretrain_runs import PretrainRuns
from tests.services import start_mlflow, start_postgres, start_postgres_again, stop_service

pytestmark = pytest.mark.integration


PTFT = str(Path(sys.executable).parent / "ptft")
OUTAGE_S = 60  # under Ray Train
# The tracker alone: long enough for its backoff to reach its 10 s cap and to outlast a flush's
# wait (FLUSH_WAIT_S), so every retry path runs.
TRACKER_OUTAGE_S = 25


@dataclass
class _Store:
    """A tracking server of the test's own and how to take it down and bring it back."""

    uri: str
    down: Callable[[], None]
    up: Callable[[], None]


@contextlib.contextmanager
def _store_that_fails(what: str, tmp_path: Path) -> Iterator[_Store]:
    """`server`: a real `mlflow server` (sqlite store) SIGKILLed, then started again on the same port
    and store. `database`: the server stays up while its own PostgreSQL (not the suite's shared one)
    is stopped and started again on the same data dir; the server answers 500s meanwhile."""
    if what == "server":
        port, store = free_port(), f"sqlite:///{tmp_path / 'mlflow.db'}"
        server = start_mlflow(tmp_path / "server", store, port)
        try:
            yield _Store(
                server["uri"],
                down=lambda: stop_service(server, signal.SIGKILL),
                up=lambda: server.update(start_mlflow(tmp_path / "server", store, port)),
            )
        finally:
            stop_service(server)
        return
    database = start_postgres(tmp_path)
    server = start_mlflow(tmp_path / "server", database["url"])
    try:
        yield _Store(
            server["uri"],
            down=lambda: stop_service(database, signal.SIGINT),  # PostgreSQL's fast shutdown
            up=lambda: database.update(start_postgres_again(database)),
        )
    finally:
        stop_service(server)
        stop_service(database, signal.SIGINT)
        for folder in database["folders"]:
            shutil.rmtree(folder, ignore_errors=True)


def test_a_tracking_server_outage_neither_stops_training_nor_loses_or_repeats_a_step(tmp_path: Path) -> None:
    said: list[str] = []
    with _store_that_fails("server", tmp_path) as store:
        _train_through_an_outage(store.uri, *_watched(store, said))
    assert len(said) == 2, said
    assert said[0].startswith(f"[ptft] the MLflow server at {store.uri} does not answer (GET /health failed: ")
    assert "`ptft resume` goes on from there" in said[0]
    assert said[1].startswith(f"[ptft] the MLflow server at {store.uri} answers again, after ")


def test_a_database_outage_behind_the_tracking_server_neither_stops_training_nor_loses_a_step(tmp_path: Path) -> None:
    said: list[str] = []
    refused: list[Problem] = []
    with _store_that_fails("database", tmp_path) as store:
        config = validate({**tiny_config_dict(tmp_path / "storage"), "tracking": {"uri": store.uri}}, check_data=False)
        down, up = _watched(store, said)

        def down_and_refused() -> None:
            assert preflight.tracking_problems(config) == []
            down()
            refused.extend(preflight.tracking_problems(config))  # what a run starting now is told

        _train_through_an_outage(store.uri, down_and_refused, up)
        assert preflight.tracking_problems(config) == []
    # The server answered GET /health all along: the watch and the run's pre-flight read its store.
    assert len(said) == 2, said
    store_down = (
        f"[ptft] the MLflow server at {store.uri} does not answer (/health answers, its store does not: "
        "GET /api/2.0/mlflow/experiments/get-by-name answered 503 TEMPORARILY_UNAVAILABLE)"
    )
    assert said[0].startswith(store_down), said[0]
    assert said[1].startswith(f"[ptft] the MLflow server at {store.uri} answers again, after ")
    (problem,) = refused
    assert problem.key == "tracking.uri" and "its store does not" in problem.message
    assert "backend store" in problem.fix


def test_an_outage_longer_than_the_budget_loses_nothing_once_the_server_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outage budget bounds the wait at a stage's end, not how long a stage trains through an
    outage: the server comes back after the budget, while the loop still logs, and gets every step.
    Before, the tracker stopped sending once an outage outlasted the budget, and the stage failed at
    its end, days later for a long pre-training. What waits beyond the tracker's memory bound waits
    in files on the node's disk, and goes too."""
    node_tmp = tmp_path / "node-tmp"
    node_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(node_tmp))
    budget_s, memory_entries = 3.0, 2000
    with _store_that_fails("server", tmp_path) as store:
        client = MlflowClient(store.uri)
        run_id = tracking.start_run(client, tracking.ensure_experiment(client, "outage", None), "pretrain")
        tracker = tracking.MlflowTracker(
            store.uri, run_id, flush_every=100, outage_budget_s=budget_s, memory_entries=memory_entries
        )
        tracker.log_metrics({"train/loss": 1.0}, 1)
        tracker.flush()
        store.down()

        def log(step: int) -> None:
            tracker.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1, "train/grad_norm": 2.0}, step)
            if step % 10 == 0:
                time.sleep(0.01)  # a fast loop's pace

        def on_disk() -> int:
            return sum(
                len(path.read_text().splitlines()) for path in node_tmp.glob("ptft-scratch-metrics-*/metrics/*.jsonl")
            )

        step = 1
        while tracker.down_since is None or time.monotonic() - tracker.down_since < 3 * budget_s:
            step += 1
            log(step)
        assert tracker.pending() > 2 * memory_entries
        # Memory keeps at most the bound once the sender has looked (it does at each retry).
        wait_until(lambda: on_disk() >= tracker.pending() - memory_entries, "the entries past the bound on disk")
        store.up()
        last = step + 50
        for later in range(step + 1, last + 1):  # the loop goes on with the server back
            log(later)
        # Sent while the stage still trains, not only by its end's wait.
        wait_until(lambda: tracker.down_since is None and tracker.pending() == 0, "every entry sent", timeout_s=120)
        tracker.close()
        assert tracker.pending() == 0
        for key in ("train/loss", "train/lr", "train/grad_norm"):
            steps = sorted(metric.step for metric in client.get_metric_history(run_id, key))
            assert steps == list(range(2 if key != "train/loss" else 1, last + 1)), key  # each step once
    assert list(node_tmp.iterdir()) == []  # the files went once sent


def _watched(store: _Store, said: list[str]) -> tuple[Callable[[], None], Callable[[], None]]:
    """The store's outage and its end, each with what a run's watch (pipelines/waits.py) says
    around it, checked here, not by the watch's thread."""
    wait = TrackingWait(store.uri, said.append, after_s=0)

    def down() -> None:
        wait.check()
        assert said == []  # the server answers: nothing to say
        store.down()
        wait.check()

    def up() -> None:
        store.up()
        wait.check()

    return down, up


def _train_through_an_outage(uri: str, outage_starts: Callable[[], None], outage_ends: Callable[[], None]) -> None:
    """A training loop's logging (a metric every step, a flush before each checkpoint) runs to its
    end while the store is down; `close` then waits for it. Every step is in MLflow exactly once."""
    client = MlflowClient(uri)
    experiment = tracking.ensure_experiment(client, "outage", None)
    run_id = tracking.start_run(client, experiment, "pretrain")
    tracker = tracking.MlflowTracker(uri, run_id, flush_every=5)
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.flush()
    assert tracker.pending() == 0

    outage_starts()
    started = time.monotonic()
    # What a training loop logs as it starts goes with the metrics: held, not waited for.
    tracker.queue_params({"world_size": 2})
    tracker.queue_tags({"ptft.rank0_pid": "1234"})
    assert tracker.pending() == 2
    for step in range(2, 101):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
        if step % 25 == 0:
            tracker.flush()  # as before a checkpoint: returns while the store is down
    # The loop ran to its end while the store was down (it comes back below): kept, not dropped.
    assert tracker.down_since is not None and tracker.pending() > 0

    time.sleep(max(0.0, TRACKER_OUTAGE_S - (time.monotonic() - started)))
    outage_ends()
    tracker.close()
    assert tracker.pending() == 0 and tracker.down_since is None
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(metric.step for metric in history) == list(range(1, 101))  # each step once
    run = client.get_run(run_id)
    assert run.data.params["world_size"] == "2" and run.data.tags["ptft.rank0_pid"] == "1234"


@pytest.mark.parametrize("what", ["server", "database"])
def test_a_pretraining_stage_under_ray_train_runs_through_an_outage(ray_driver: str, tmp_path: Path, what: str) -> None:
    """The whole stage, as the pipeline runs it: its worker logs every step (with MLflow's own
    HTTP retries, as configured by default there) and flushes before each checkpoint while the
    server or its database is down for 60 s from step 5. One worker: only rank 0 logs, so a
    second would add its start-up and steps and nothing to test (test_faults.py has two)."""
    with _store_that_fails(what, tmp_path) as store:
        runs = PretrainRuns(tmp_path / "storage", store.uri, "outage-stage", workers=1)
        outcome: dict = {}

        def run_the_stage() -> None:
            outcome["ctx"], outcome["result"] = runs.pretrain("outage")

        stage = threading.Thread(target=run_the_stage)
        stage.start()
        run_id = wait_until(lambda: runs.run_id_of("outage"), "the stage's MLflow run")
        wait_until(lambda: len(runs.client.get_metric_history(run_id, "train/step")) >= 5, "five steps in MLflow")
        store.down()
        down_at = time.time()
        time.sleep(OUTAGE_S)
        store.up()
        up_at = time.time()
        stage.join(timeout=900)
        assert not stage.is_alive() and "result" in outcome, "the stage did not finish"
        finished_at = time.time()
        assert outcome["result"].metrics["train/step"] == runs.config.max_steps
        steps = runs.client.get_metric_history(run_id, "train/step")
        assert sorted(metric.step for metric in steps) == list(range(1, runs.config.max_steps + 1))  # each once
        losses = runs.client.get_metric_history(run_id, "train/loss")
        assert sorted(metric.step for metric in losses) == list(range(1, runs.config.max_steps + 1))
        system = runs.client.get_metric_history(run_id, "system/node0/cpu_utilization_percentage")
    # Training went on while the store was down: steps were logged (timestamped) in the outage.
    during = [metric.step for metric in steps if down_at * 1000 < metric.timestamp < up_at * 1000]
    assert during, "no step was taken while the store was down"
    # So did the node's sampling, every step once.
    assert any(down_at * 1000 < metric.timestamp < up_at * 1000 for metric in system), "no sample in the outage"
    assert sorted(metric.step for metric in system) == list(range(len(system)))
    print(
        f"\nstage through a {OUTAGE_S} s {what} outage: steps {min(during)}-{max(during)} taken while it was down; "
        f"the stage ended {finished_at - up_at:.0f} s after it was back"
    )


def test_a_tracking_server_gone_for_good_fails_the_run_in_a_line_with_no_stage_left_running(
    ray_cluster: str, tmp_path: Path
) -> None:
    """The server dies while the driver runs a stage and stays away. Before: after MLflow's retries
    (4 min for each call, twice) a chain of six tracebacks, and the stage stayed `running` in a run
    that had failed. MLflow's client gives up at once here (its own setting), so the test waits on
    ptft, not on MLflow's backoff."""
    storage = tmp_path / "storage"
    config = {**tiny_config_dict(storage), "name": "outage-for-good"}
    config["data"] = {"corpus": config["data"]["corpus"]}  # no task: tokenize and pretrain
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    with _store_that_fails("server", tmp_path) as store:
        command = [PTFT, "run", str(config_path), f"tracking.uri={store.uri}", f"ray.address={ray_cluster}"]
        run = subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for line in run.stdout:
            if "[ptft] tokenize started" in line:  # its MLflow run is open: the server goes now
                store.down()
                break
        _, stderr = run.communicate(timeout=300)
    assert run.returncode == 1, stderr
    assert f"ptft run: the MLflow server at {store.uri} stopped answering" in stderr, stderr
    assert "Traceback" not in stderr
    (manifest,) = mf.list_runs(storage)
    statuses = {name: record.status for name, record in manifest.stages.items()}
    assert mf.FAILED in statuses.values() and not {mf.RUNNING, mf.PENDING} & set(statuses.values()), statuses
    assert manifest.status == mf.FAILED
    assert "ConnectionError" in (mf.Manifest.folder(storage, manifest.run_id) / "ptft.log").read_text()
