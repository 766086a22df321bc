"""Experiment tracking behind a small interface; MLflow is the implementation.

Only rank 0 of a training job tracks (the others get `NullTracker`). Metrics are buffered and
sent with `log_batch`: one HTTP call per step is far slower than one per `flush`. They are sent
by a background thread, so a tracking server that stops answering never stops training: the
metrics wait, and go when it is back (`MlflowTracker`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from mlflow.entities import Metric, Param, RunTag
from mlflow.protos.service_pb2 import LogBatch
from mlflow.store.tracking.rest_store import RestStore
from mlflow.tracking import MlflowClient
from mlflow.utils.proto_json_utils import message_to_json
from mlflow.utils.rest_utils import http_request, verify_rest_response

from components.redaction import redact, redact_text, redact_url
from components.scratch import ScratchFolder

log = logging.getLogger(__name__)

# MLflow prints "View run NAME at: URL" to stdout when a run ends, with the tracking URI's
# credentials in the URL; ptft prints its own links, redacted (components/redaction.py). Every
# process that ends runs imports this module, Ray workers included.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

PARENT_TAG = "mlflow.parentRunId"
_BATCH_LIMIT = 100  # MLflow accepts at most 100 params / 1000 metrics per log_batch
_METRIC_BATCH = 1000
# How long a tracking outage may last before the stage fails for it (at its end, not mid-training).
OUTAGE_BUDGET_S = 15 * 60
# How many metrics (and queued params and tags) wait in memory for the store; the rest of a long
# outage waits in files on the node's disk (~200 bytes an entry in memory: 100,000 are ~20 MB).
MEMORY_ENTRIES = 100_000
# How long an explicit flush (before a checkpoint, after an epoch) waits for the metrics to arrive.
FLUSH_WAIT_S = 10.0
# MLflow's own HTTP retries for a metrics batch. Its default (7, backing off to 64 s and more) kept
# the sender asleep for up to a minute after the server was back; the sender retries by itself,
# every 10 s at most.
_SEND_RETRIES = 1
_SEND_TIMEOUT_S = 30


class Tracker(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def logged_through(self, key: str) -> int: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def queue_params(self, params: Mapping[str, Any]) -> None: ...
    def queue_tags(self, tags: Mapping[str, str]) -> None: ...
    def metric_history(self, key: str) -> list[tuple[int, float]]: ...
    def log_artifacts(self, paths: list[Path], folder: str | None = None) -> None: ...
    def flush(self) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """For ranks other than 0 and for code run without tracking."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def logged_through(self, key: str) -> int:
        return -1

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def queue_params(self, params: Mapping[str, Any]) -> None: ...
    def queue_tags(self, tags: Mapping[str, str]) -> None: ...
    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return []

    def log_artifacts(self, paths: list[Path], folder: str | None = None) -> None: ...
    def flush(self) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class MlflowTracker:
    """Logs to one existing MLflow run; `close` ends it only when `owns_run`.

    A metric is logged at most once per step: a training loop restored from a checkpoint
    recomputes the steps after it, and those were logged already. With `resumed=True` the
    tracker asks MLflow for every metric's last logged step when it is made (asked later, in an
    outage, the training loop would wait out MLflow's HTTP retries).

    Metrics go out from a background thread; a flush waits for them while the server answers.
    While it does not (one HTTP retry of MLflow's own fails) the thread keeps them and tries again
    with backoff, for as long as the stage trains, and flushes stop waiting: training goes on.
    Beyond `memory_entries` they wait in files on the node's disk, not in the worker's memory. A
    batch sent again after a lost answer is logged once: MLflow's SQL store ignores a metric it
    already holds (same key, step, timestamp and value). `close` waits for everything to arrive,
    and fails the stage only if the server has then been away longer than `outage_budget_s`.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        owns_run: bool = False,
        flush_every: int = 50,
        flush_every_s: float = 5.0,
        resumed: bool = False,
        outage_budget_s: float = OUTAGE_BUDGET_S,
        memory_entries: int = MEMORY_ENTRIES,
    ):
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.owns_run = owns_run
        # Whichever comes first: few calls on a fast loop, yet progress (`ptft status`) stays fresh.
        self.flush_every = flush_every
        self.flush_every_s = flush_every_s
        self._flushed_at = time.monotonic()
        self.outage_budget_s = outage_budget_s
        self._pending: list[Metric | Param | RunTag] = []
        self.memory_entries = memory_entries
        self._overflow = _Overflow()  # what waits beyond memory_entries, oldest first
        self._last_step: dict[str, int] = self._logged_steps() if resumed else {}
        self._lock = threading.Lock()
        self._sender: threading.Thread | None = None
        self.down_since: float | None = None  # when the server stopped answering (None: it answers)
        self._batch_started: float | None = None  # when the batch being sent now was first tried
        self._gave_up: Exception | None = None
        self._closing = False  # the loop has ended: an outage past the budget is given up on
        self._retry_now = threading.Event()  # cuts the sender's backoff short (see `close`)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._raise_if_out_of_space()
        now = int(time.time() * 1000)
        fresh = []
        for key, value in metrics.items():
            if step <= self.logged_through(key):
                continue
            self._last_step[key] = step
            fresh.append(Metric(key, float(value), now, step))
        with self._lock:
            self._pending.extend(fresh)
            due = len(self._pending) >= self.flush_every
        if due or time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush()

    def logged_through(self, key: str) -> int:
        """The last step at which `key` was logged to this run (-1 if never)."""
        return self._last_step.get(key, -1)

    def _logged_steps(self) -> dict[str, int]:
        """Each metric of the run and the last step it was logged at; system metrics left out
        (`node_system_metrics` logs them, and finds its own step to go on from)."""
        keys = [key for key in self.client.get_run(self.run_id).data.metrics if not key.startswith(SYSTEM_PREFIX)]
        return {key: last_logged_step(self.client, self.run_id, key) for key in keys}

    def log_params(self, params: Mapping[str, Any]) -> None:
        params = redact(params)
        items = [Param(key, _param_value(value)) for key, value in params.items()]
        for start in range(0, len(items), _BATCH_LIMIT):
            self.client.log_batch(self.run_id, params=items[start : start + _BATCH_LIMIT])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in redact(tags).items()])

    def queue_params(self, params: Mapping[str, Any]) -> None:
        """`log_params` sent with the metrics, by their sender: for a training loop, which a
        tracking outage must not hold up (a synchronous call waits out MLflow's retries, ~4 min).
        A param sent again after a lost answer has the same value, which MLflow accepts."""
        self._queue([Param(key, _param_value(value)) for key, value in redact(params).items()])

    def queue_tags(self, tags: Mapping[str, str]) -> None:
        """`set_tags` sent with the metrics (see `queue_params`)."""
        self._queue([RunTag(key, str(value)) for key, value in redact(tags).items()])

    def _queue(self, entries: list[Param | RunTag]) -> None:
        with self._lock:
            self._pending.extend(entries)
        self.flush(wait_s=0)  # sent now while the server answers; the caller does not wait

    def tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)

    def params(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.params)

    def status(self) -> str:
        """RUNNING, FINISHED, FAILED or KILLED."""
        return self.client.get_run(self.run_id).info.status

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every point of `key` in this run, by step: what arrived, after a flush."""
        self.flush()
        points = sorted(self.client.get_metric_history(self.run_id, key), key=lambda point: point.step)
        return [(point.step, point.value) for point in points]

    def log_artifacts(self, paths: list[Path], folder: str | None = None) -> None:
        """Files into the run's artifact `folder` (its root when None)."""
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), folder)

    def flush(self, wait_s: float = FLUSH_WAIT_S) -> None:
        """Send what is pending and wait for it while the server answers, as a synchronous call
        would (MLflow then holds what the loop logged, up to this step); but never wait more than
        `wait_s` on one batch, nor at all while the server is known to be down."""
        self._raise_if_out_of_space()
        self._flushed_at = time.monotonic()
        deadline = (self._batch_started or time.monotonic()) + wait_s
        while (sender := self._sender_for_pending()) is not None:
            if self.down_since is not None or time.monotonic() >= deadline:
                return
            sender.join(0.05)

    def pending(self) -> int:
        """Metrics (and queued params and tags) not yet in MLflow."""
        with self._lock:
            return len(self._pending) + self._overflow.count

    def _sender_for_pending(self) -> threading.Thread | None:
        """The thread sending the pending metrics, started if none runs; None when nothing is pending."""
        with self._lock:
            if not (self._pending or self._overflow.count) or self._gave_up is not None:
                return None
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_pending, name="mlflow-metrics", daemon=True)
                self._sender.start()
            return self._sender

    def _send_pending(self) -> None:
        retry_s = 1.0
        while True:
            self._keep_memory_bounded()
            self._read_back_overflow()
            with self._lock:
                batch = _next_batch(self._pending)
                if not batch:
                    self._sender = None  # under the lock: a metric added after this starts a new sender
                    return
            self._batch_started = self._batch_started or time.monotonic()
            try:
                _log_batch(self.client, self.run_id, batch)
            except Exception as error:  # noqa: BLE001 - any failure to reach the store: keep them, retry
                if self.down_since is None and not out_of_space(error):  # that one stops the loop instead
                    self.down_since = time.monotonic()
                    log.warning(
                        "MLflow at %s did not take %d metrics (%s); training goes on, they are sent when it is back",
                        redact_url(self.tracking_uri),
                        len(batch),
                        redact_text(str(error)[:200]),
                    )
                outlasted = self._closing and time.monotonic() - self.down_since > self.outage_budget_s
                if out_of_space(error) or outlasted:
                    with self._lock:
                        self._gave_up, self._sender = error, None
                    return
                self._retry_now.wait(retry_s)
                self._retry_now.clear()
                retry_s = min(retry_s * 2, 10.0)
                continue
            with self._lock:
                del self._pending[: len(batch)]
            self._batch_started = None
            if self.down_since is not None:
                log.warning(
                    "MLflow at %s answers again after %.0f s",
                    redact_url(self.tracking_uri),
                    time.monotonic() - self.down_since,
                )
                self.down_since, retry_s = None, 1.0

    def _keep_memory_bounded(self) -> None:
        """Past `memory_entries`, all but the oldest half of them go to a file (by the sender, so
        that the training loop never waits for the disk). A full disk keeps them in memory."""
        with self._lock:
            if len(self._pending) <= self.memory_entries:
                return
            keep = self.memory_entries // 2
            spilled, self._pending = self._pending[keep:], self._pending[:keep]
            self._overflow.count += len(spilled)  # still pending while written
        try:
            self._overflow.write(spilled)
        except OSError as error:
            log.warning("%d metrics waiting for MLflow stay in memory: %s", len(spilled), error)
            with self._lock:
                self._overflow.count -= len(spilled)
                self._pending.extend(spilled)

    def _read_back_overflow(self) -> None:
        """The oldest file of entries into memory once memory has none left to send."""
        with self._lock:
            if self._pending or not self._overflow.files:
                return
        entries = self._overflow.read_oldest()
        with self._lock:
            self._pending[0:0] = entries
            self._overflow.count -= len(entries)

    def close(self, status: str = "FINISHED") -> None:
        """Send everything (waiting out an outage up to `outage_budget_s`), then end the run if owned."""
        self._closing = True
        self._retry_now.set()  # an outage may be over by now: try at once, not after the backoff
        while (sender := self._sender_for_pending()) is not None:
            sender.join()
        self._overflow.cleanup()
        self._raise_if_out_of_space()
        if self._gave_up is not None:
            raise RuntimeError(
                f"MLflow at {redact_url(self.tracking_uri)} did not answer for {self.outage_budget_s:.0f} s; "
                f"{self.pending()} metrics of run {self.run_id} were not logged ({redact_text(str(self._gave_up))})"
            )
        if self.owns_run:
            self.client.set_terminated(self.run_id, status=status)

    def _raise_if_out_of_space(self) -> None:
        """A store out of disk space answers the same until someone frees some: not an outage to
        wait out (15 minutes, then a stage failed at its end, its other ranks held at a barrier
        meanwhile). The training loop stops at its next metric, with what to do."""
        if self._gave_up is not None and out_of_space(self._gave_up):
            raise TrackingStoreFull(
                f"MLflow at {redact_url(self.tracking_uri)} is out of disk space "
                f"({redact_text(str(self._gave_up)[:300])}); {self.pending()} metrics of run {self.run_id} "
                "were not logged. Free space where the tracking store keeps its data (an sqlite store: "
                "beside storage), then `ptft resume` the run"
            )


class _Overflow:
    """Entries waiting for the store beyond a tracker's memory bound: files in a scratch folder on
    the node's disk (gone with the process, like the entries it would have held in memory)."""

    def __init__(self) -> None:
        self.folder: ScratchFolder | None = None
        self.files: deque[Path] = deque()
        self.count = 0  # entries written or being written (the tracker's lock guards it)
        self.written = 0

    def write(self, entries: list[Metric | Param | RunTag]) -> None:
        self.folder = self.folder or ScratchFolder("metrics")
        path = self.folder.path / f"{self.written:06d}.jsonl"
        with open(path, "w") as file:
            file.writelines(json.dumps(_as_row(entry)) + "\n" for entry in entries)
        self.files.append(path)
        self.written += 1

    def read_oldest(self) -> list[Metric | Param | RunTag]:
        path = self.files.popleft()
        entries = [_from_row(json.loads(line)) for line in path.read_text().splitlines()]
        path.unlink()
        return entries

    def cleanup(self) -> None:
        if self.folder is not None:
            self.folder.cleanup()


def _as_row(entry: Metric | Param | RunTag) -> list:
    if isinstance(entry, Metric):
        return ["metric", entry.key, entry.value, entry.timestamp, entry.step]
    return ["param" if isinstance(entry, Param) else "tag", entry.key, entry.value]


def _from_row(row: list) -> Metric | Param | RunTag:
    kind, *fields = row
    return {"metric": Metric, "param": Param, "tag": RunTag}[kind](*fields)


class TrackingStoreFull(RuntimeError):
    """The tracking store refused a write for want of disk space."""


def out_of_space(error: BaseException) -> bool:
    """An error that says a disk is full: ENOSPC locally, or the store's own words for it (SQLite:
    "database or disk is full"; PostgreSQL: "No space left on device"; through a tracking server
    they arrive as text)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error)
    return "database or disk is full" in text or "No space left on device" in text


def _next_batch(pending: list[Metric | Param | RunTag]) -> list[Metric | Param | RunTag]:
    """The oldest pending entries that fit one `log_batch`: 1000 metrics, 100 params, 100 tags."""
    room = {Metric: _METRIC_BATCH, Param: _BATCH_LIMIT, RunTag: _BATCH_LIMIT}
    batch = []
    for entry in pending:
        if room[type(entry)] == 0:
            break
        room[type(entry)] -= 1
        batch.append(entry)
    return batch


def _log_batch(client: MlflowClient, run_id: str, entries: list[Metric | Param | RunTag]) -> None:
    """`client.log_batch` of the entries, over HTTP with `_SEND_RETRIES` retries of MLflow's own.
    MLflow takes no retry count per call, so this makes the REST store's call itself; local stores
    (sqlite, files) have no HTTP to retry and go through the client."""
    metrics = [entry for entry in entries if isinstance(entry, Metric)]
    params = [entry for entry in entries if isinstance(entry, Param)]
    tags = [entry for entry in entries if isinstance(entry, RunTag)]
    store = client._tracking_client.store  # MLflow has no public accessor for a client's store
    if not isinstance(store, RestStore):
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        return
    endpoint, method = RestStore._METHOD_TO_INFO[LogBatch]
    batch = LogBatch(
        run_id=run_id,
        metrics=[metric.to_proto() for metric in metrics],
        params=[param.to_proto() for param in params],
        tags=[tag.to_proto() for tag in tags],
    )
    response = http_request(
        store.get_host_creds(),
        endpoint,
        method,
        max_retries=_SEND_RETRIES,
        backoff_factor=1,
        timeout=_SEND_TIMEOUT_S,
        json=json.loads(message_to_json(batch)),
    )
    verify_rest_response(response, endpoint)


def last_logged_step(client: MlflowClient, run_id: str, key: str) -> int:
    """The last step at which `key` was logged to the run (-1 if never)."""
    return max((metric.step for metric in client.get_metric_history(run_id, key)), default=-1)


def open_tracker(tracking_uri: str | None, run_id: str | None, *, rank: int = 0, resumed: bool = False) -> Tracker:
    """The tracker a worker should use: MLflow on rank 0 when a run is given, else a no-op.
    `resumed`: the run may hold metrics of an earlier attempt (see MlflowTracker)."""
    if rank != 0 or not tracking_uri or not run_id:
        return NullTracker()
    return MlflowTracker(tracking_uri, run_id, resumed=resumed)


def open_child_run(
    tracking_uri: str,
    experiment_id: str,
    name: str,
    *,
    parent_run_id: str,
    match: Mapping[str, str],
    tags: Mapping[str, str],
) -> tuple[MlflowTracker, bool]:
    """A child run of `parent_run_id` as a tracker that owns it: the one carrying the `match` tags
    that an earlier attempt opened (reopened), or a new one with `tags`. Returns it and whether it
    is new."""
    client = MlflowClient(tracking_uri)
    existing = find_run(client, experiment_id, {**match, PARENT_TAG: parent_run_id})
    if existing is not None:
        reopen_run(client, existing)
        return MlflowTracker(tracking_uri, existing, owns_run=True, resumed=True), False
    run_id = start_run(client, experiment_id, name, parent_run_id=parent_run_id, tags={**match, **tags})
    return MlflowTracker(tracking_uri, run_id, owns_run=True), True


def child_run_tags(tracking_uri: str, experiment_id: str, parent_run_id: str) -> dict[str, dict[str, str]]:
    """Run id -> tags of every child run of `parent_run_id`."""
    runs = MlflowClient(tracking_uri).search_runs(
        [experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10_000
    )
    return {run.info.run_id: dict(run.data.tags) for run in runs}


def start_run(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    *,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Create a run (a child when `parent_run_id` is given) and return its id."""
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    return client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


def find_run(client: MlflowClient, experiment_id: str, tags: Mapping[str, str]) -> str | None:
    """The id of the run carrying all these tags (the newest if several), or None."""
    clauses = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = client.search_runs([experiment_id], clauses, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def reopen_run(client: MlflowClient, run_id: str) -> None:
    """Mark a run RUNNING again: a restarted attempt continues its own run instead of a duplicate."""
    client.update_run(run_id, status="RUNNING")
    attempts = int(client.get_run(run_id).data.tags.get("ptft.attempts", "1")) + 1
    client.set_tag(run_id, "ptft.attempts", str(attempts))


def close_orphans(client: MlflowClient, experiment_id: str, pipeline_run_id: str) -> list[str]:
    """End runs of a pipeline run left RUNNING by a driver that died (SIGKILL, lost node): KILLED."""
    stuck = client.search_runs(
        [experiment_id], f"tags.`ptft.run_id` = '{pipeline_run_id}' and attributes.status = 'RUNNING'"
    )
    for run in stuck:
        client.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in stuck]


# The kind MLflow 3 keeps per experiment (its header's kind selector): ptft's are model training.
# Where the UI lands is another matter: it follows the GenAI / Model training switch, which an
# experiment's URL sets with `workflowType` (measured on MLflow 3.17: `#/experiments/ID` opens the
# GenAI overview, traces, all empty for ptft, whatever the kind), so ptft's links carry it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment's id, creating it (with its artifact location) when missing; marked as a
    model-training experiment unless someone chose its kind already."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(
            name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


def ui_links(ui_url: str, experiment_id: str, run_id: str | None = None) -> dict[str, str]:
    """Where the MLflow UI at `ui_url` shows the experiment's runs table (model-training view), and one run."""
    runs = f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return {"runs": f"{runs}?{MODEL_TRAINING_VIEW}", **({"run": f"{runs}/{run_id}"} if run_id else {})}


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


SYSTEM_METRICS_EVERY_S = 2.0  # short stages (the demo's) still get samples
SYSTEM_PREFIX = "system/"


@contextlib.contextmanager
def node_system_metrics(tracking_uri: str | None, run_id: str | None) -> Iterator[None]:
    """In a Ray Train worker: CPU, memory, disk, network (and GPU where NVML is present) of this
    node, logged to `run_id` as `system/node<N>/...` every SYSTEM_METRICS_EVERY_S while the block
    runs. One worker per node samples it (local rank 0); it continues the step count of an earlier
    attempt.

    MLflow's monitor takes the samples, and a tracker of its own sends them: MLflow's monitor
    thread reaches the server with MLflow's HTTP retries (minutes of backoff), so after an outage
    its end held the stage for up to a minute, and a longer outage ended its sampling for good."""
    import ray.train

    context = ray.train.get_context()
    if not tracking_uri or not run_id or context.get_local_rank() != 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    sampler = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)  # its sampling only; never started
    prefix = f"{SYSTEM_PREFIX}node{context.get_node_rank()}/"
    tracker = MlflowTracker(tracking_uri, run_id)
    done = threading.Event()

    def sample() -> None:
        # Asked here, not before training: in a tracking outage the lookup waits out MLflow's
        # retries (minutes), and it held the training loop's start for as long.
        try:
            step = last_logged_step(tracker.client, run_id, prefix + "cpu_utilization_percentage") + 1
        except Exception as error:  # noqa: BLE001 - samples are never worth failing a stage for
            log.warning("system metrics of this node not sampled: their last step unread (%s)", redact_text(str(error)))
            return
        while not done.wait(SYSTEM_METRICS_EVERY_S):
            sampler.collect_metrics()
            metrics = sampler.aggregate_metrics()
            for monitor in sampler.monitors:
                monitor.clear_metrics()
            tracker.log_metrics({prefix + key: value for key, value in metrics.items()}, step)
            step += 1

    sampling = threading.Thread(target=sample, name="system-metrics", daemon=True)
    sampling.start()
    try:
        yield
    except BaseException:
        done.set()
        sampling.join(timeout=5)
        with contextlib.suppress(Exception):  # the stage failed: its samples must not hold it up or hide why
            tracker.flush()
        raise
    done.set()
    # Not for ever: a lookup still waiting out an outage has sampled nothing, and ends without
    # sampling once it returns (`done` is set).
    sampling.join(timeout=5)
    # The stage's own tracker has waited out any outage by now; a flush would not wait for a
    # sender still backing off, and the samples taken in the outage would die with the worker.
    try:
        tracker.close()
    except RuntimeError as error:
        log.warning("system metrics of this node were not all logged: %s", error)
