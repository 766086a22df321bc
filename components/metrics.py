"""Live metrics for Prometheus and Grafana: the one module that names them.

Recorded with `ray.util.metrics`, so Ray's metrics agent exports them wherever they are recorded:
the `ptft run` driver (stage status and durations, Tune's trial counts), Ray Train workers and Tune
trials (training loss and throughput). Prometheus sees each name with Ray's `ray_` prefix
(`ptft_stage_status` -> `ray_ptft_stage_status`). `dashboards/` is checked against `METRICS` and
`RAY_METRICS` (tests/unit/test_dashboards.py); docs/dashboards.md lists them.

The functions never raise and cost next to nothing: outside Ray (unit tests, a plain script) a
value goes to a process-local recorder nobody exports, and a failed export must never fail a run.

Gauges only: a gauge keeps the last value, which is what a dashboard of a run shows. Ray's metrics
agent forgets a gauge that was not recorded for two report intervals (2 x 10 s by default; measured
on Ray 2.60: a stage status set once vanished from the node's /metrics 20 s later while its process
lived on), so a daemon thread records every series' last value again, often enough to keep it
alive, for as long as the process that set it lives. When the process ends its series end too.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricSpec:
    """One metric as we record it (`name`) and as Prometheus stores it (`exported`)."""

    name: str
    tag_keys: tuple[str, ...]
    description: str

    @property
    def exported(self) -> str:
        return f"ray_{self.name}"  # Ray's metrics agent prefixes every application metric


STAGE_STATUS = MetricSpec(
    "ptft_stage_status",
    ("pipeline", "run_id", "stage"),
    "Stage status: 0 pending, 1 running, 2 succeeded, 3 cached, 4 failed, 5 killed",
)
STAGE_DURATION = MetricSpec(
    "ptft_stage_duration_seconds",
    ("pipeline", "run_id", "stage"),
    "Wall time of the stage's last attempt (a cache hit: the time to reuse it)",
)
TRAIN_LOSS = MetricSpec("ptft_train_loss", ("stage", "mlflow_run_id"), "Training loss at the last logged step")
TRAIN_TOKENS_PER_S = MetricSpec(
    "ptft_train_tokens_per_second",
    ("stage", "mlflow_run_id"),
    "Training throughput over the last logging interval, all ranks",
)
TRAIN_STEP = MetricSpec("ptft_train_step", ("stage", "mlflow_run_id"), "Last logged optimizer step")
TUNE_TRIALS = MetricSpec(
    "ptft_tune_trials", ("run_id", "status"), "Tune trials of the sweep by status: pending, running, finished, errored"
)
METRICS = (STAGE_STATUS, STAGE_DURATION, TRAIN_LOSS, TRAIN_TOKENS_PER_S, TRAIN_STEP, TUNE_TRIALS)

# The dashboard's status panel maps these numbers back to names (checked by a unit test).
STAGE_STATUS_CODES = {"pending": 0, "running": 1, "succeeded": 2, "cached": 3, "failed": 4, "killed": 5, "skipped": 6}
TRIAL_STATUSES = ("pending", "running", "finished", "errored")

# Ray's own metrics the dashboard reads (Ray Serve's HTTP proxy), as Ray 2.60 exports them:
# counters end in `_total`, histograms come as `_bucket`/`_sum`/`_count`. Confirmed by scraping a
# cluster; docs/dashboards.md lists their labels.
RAY_METRICS = (
    "ray_serve_num_http_requests_total",
    "ray_serve_num_http_error_requests_total",
    "ray_serve_http_request_latency_ms_bucket",
)


def stage_status(pipeline: str, run_id: str, stage: str, status: str) -> None:
    """Record a stage's status (a key of `STAGE_STATUS_CODES`; anything else is ignored)."""
    if status in STAGE_STATUS_CODES:
        _set(STAGE_STATUS, STAGE_STATUS_CODES[status], pipeline=pipeline, run_id=run_id, stage=stage)


def stage_finished(pipeline: str, run_id: str, stage: str, seconds: float) -> None:
    """Record how long a stage took."""
    _set(STAGE_DURATION, seconds, pipeline=pipeline, run_id=run_id, stage=stage)


def training_progress(
    stage: str, mlflow_run_id: str | None, *, step: int, loss: float, tokens_per_s: float | None = None
) -> None:
    """Record a training loop's progress (rank 0 only; `mlflow_run_id` is the run it logs to)."""
    tags = {"stage": stage, "mlflow_run_id": mlflow_run_id or ""}
    _set(TRAIN_STEP, step, **tags)
    _set(TRAIN_LOSS, loss, **tags)
    if tokens_per_s is not None:  # the first interval after a (re)start has no steady-state rate yet
        _set(TRAIN_TOKENS_PER_S, tokens_per_s, **tags)


def trials(run_id: str, counts: Mapping[str, int]) -> None:
    """Record how many trials of a sweep are in each of `TRIAL_STATUSES` (missing ones are 0)."""
    for status in TRIAL_STATUSES:
        _set(TUNE_TRIALS, counts.get(status, 0), run_id=run_id, status=status)


@functools.cache
def _gauge(spec: MetricSpec):
    from ray.util.metrics import Gauge  # imported on first use: `ptft validate` must stay fast

    return Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)


_latest: dict[tuple[MetricSpec, tuple[tuple[str, str], ...]], float] = {}
_lock = threading.Lock()
_republisher_pid: int | None = None  # the process whose thread runs (a forked child has none)


def _set(spec: MetricSpec, value: float, **tags: str) -> None:
    try:
        series = (spec, tuple(sorted((key, str(tag)) for key, tag in tags.items())))
        with _lock:
            _latest[series] = float(value)
        _record(series, float(value))
        _start_republisher()
    except Exception:  # noqa: BLE001 - a dashboard must never fail a run
        log.debug("could not record %s", spec.name, exc_info=True)


def _record(series: tuple[MetricSpec, tuple[tuple[str, str], ...]], value: float) -> None:
    spec, tags = series
    _gauge(spec).set(value, tags=dict(tags))


def _start_republisher() -> None:
    global _republisher_pid
    import ray

    if not ray.is_initialized():  # nobody exports outside Ray
        return
    with _lock:
        if _republisher_pid == os.getpid():
            return
        _republisher_pid = os.getpid()
    threading.Thread(
        target=_republish_forever, args=(_republish_interval_s(),), name="ptft-metrics", daemon=True
    ).start()


def _republish_interval_s() -> float:
    """Half Ray's metrics report interval: every series is recorded again before the agent's
    two-interval time-to-live runs out, even when one report is late."""
    try:
        import ray

        return max(1.0, ray._config.metrics_report_interval_ms() / 2000)
    except Exception:  # noqa: BLE001 - a private API; the default interval is 10 s
        return 5.0


def _republish_forever(interval_s: float) -> None:
    while True:
        time.sleep(interval_s)
        with _lock:
            latest = list(_latest.items())
        for series, value in latest:
            try:
                _record(series, value)
            except Exception:  # noqa: BLE001
                log.debug("could not record %s again", series[0].name, exc_info=True)
