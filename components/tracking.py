"""Experiment tracking behind a small interface; MLflow is the implementation.

Only rank 0 of a training job tracks (the others get `NullTracker`). Metrics are buffered and
sent with `log_batch`: one HTTP call per step is far slower than one per `flush`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
_BATCH_LIMIT = 100  # MLflow accepts at most 100 params / 1000 metrics per log_batch


class Tracker(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def flush(self) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """For ranks other than 0 and for code run without tracking."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def flush(self) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class MlflowTracker:
    """Logs to one existing MLflow run; `close` ends it only when `owns_run`."""

    def __init__(self, tracking_uri: str, run_id: str, *, owns_run: bool = False, flush_every: int = 50):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.owns_run = owns_run
        self.flush_every = flush_every
        self._pending: list[Metric] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
        if len(self._pending) >= self.flush_every:
            self.flush()

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(key, _param_value(value)) for key, value in params.items()]
        for start in range(0, len(items), _BATCH_LIMIT):
            self.client.log_batch(self.run_id, params=items[start : start + _BATCH_LIMIT])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:1000], self._pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self, status: str = "FINISHED") -> None:
        self.flush()
        if self.owns_run:
            self.client.set_terminated(self.run_id, status=status)


def open_tracker(tracking_uri: str | None, run_id: str | None, *, rank: int = 0) -> Tracker:
    """The tracker a worker should use: MLflow on rank 0 when a run is given, else a no-op."""
    if rank != 0 or not tracking_uri or not run_id:
        return NullTracker()
    return MlflowTracker(tracking_uri, run_id)


def start_run(
    client: MlflowClient, experiment_id: str, name: str, *, parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:  # fmt: skip
    """Create a run (a child when `parent_run_id` is given) and return its id."""
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    return client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment's id, creating it (with its artifact location) when missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`, for logging a nested config as params."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
