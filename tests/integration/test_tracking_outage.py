"""The metrics tracker through a real tracking server outage: the `mlflow server` process killed
and started again while a training loop logs."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components import tracking

pytestmark = pytest.mark.integration


OUTAGE_S = 60


def test_a_tracking_server_outage_neither_stops_training_nor_loses_or_repeats_a_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `mlflow server` (sqlite store) is SIGKILLed after the first flush and started again on
    the same port and store 60 s later. A training loop's logging (a metric every step, a flush
    before each checkpoint) runs to its end while the server is down; `close` then waits for it.
    Every step is in MLflow exactly once."""
    from components.training import free_port
    from tests.services import start_mlflow, stop_service

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the tracker's retries, not MLflow's, are tested
    port, store = free_port(), f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = start_mlflow(tmp_path / "server", store, port)
    try:
        client = MlflowClient(server["uri"])
        experiment = tracking.ensure_experiment(client, "outage", None)
        run_id = tracking.start_run(client, experiment, "pretrain")
        tracker = tracking.MlflowTracker(server["uri"], run_id, flush_every=5)
        tracker.log_metrics({"train/loss": 1.0}, 1)
        tracker.flush()
        assert tracker.pending() == 0

        stop_service(server, signal.SIGKILL)
        killed_at = time.monotonic()
        for step in range(2, 101):
            tracker.log_metrics({"train/loss": 1.0 / step}, step)
            if step % 25 == 0:
                tracker.flush()  # as before a checkpoint: returns while the server is down
        # The loop ran to its end while the server was down (it comes back below): kept, not dropped.
        assert tracker.down_since is not None and tracker.pending() > 0

        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - killed_at)))
        server = start_mlflow(tmp_path / "server", store, port)
        tracker.close()
        assert tracker.pending() == 0 and tracker.down_since is None
        history = client.get_metric_history(run_id, "train/loss")
        assert sorted(metric.step for metric in history) == list(range(1, 101))  # each step once
    finally:
        stop_service(server)
