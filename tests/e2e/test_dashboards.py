"""The Grafana dashboard against a real Prometheus that scraped the shared Ray cluster (through Ray's
service discovery file) while the demo pipeline ran on it: every panel's query returns data, and
the stage status and training series say what the demo did."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import requests

from components import metrics
from tests import grafana
from tests.e2e.conftest import STAGES, demo_manifest

pytestmark = pytest.mark.e2e

EXPORTED_WHILE_RUNNING_S = 30  # a stage this long was exported (every 10 s) and scraped while running
WAIT_S = 180  # Ray exports every 10 s, Prometheus scrapes every 10 s: data arrives within ~30 s
GOOD = {"texts": ["the film was superb and moving .", "a dull , tedious script ."]}
BAD = {"texts": []}  # a 422: the errors panel needs an error


def query_range(prometheus: str, expr: str, start: float, end: float) -> dict:
    response = requests.get(
        f"{prometheus}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": "5s"}, timeout=30
    )
    assert response.ok, f"{expr}: HTTP {response.status_code} {response.text[:500]}"
    return response.json()["data"]


def finite_series(data: dict) -> list[dict]:
    """The series that hold at least one real number (histogram_quantile over no traffic gives NaN)."""
    return [series for series in data["result"] if any(math.isfinite(float(value)) for _, value in series["values"])]


def send_traffic(url: str) -> None:
    """Requests through Serve's proxy, a few at a time: a rate needs the counters to grow between scrapes."""
    for _ in range(3):
        assert requests.post(f"{url}/predict", json=GOOD, timeout=30).ok
    assert requests.post(f"{url}/predict", json=BAD, timeout=30).status_code == 422


def panels_without_data(prometheus: str, dashboard: dict, start: float) -> dict[str, str]:
    missing = {}
    for query in grafana.queries(dashboard):
        data = query_range(prometheus, grafana.concrete(query.expr, dashboard), start, time.time())
        if not finite_series(data):
            missing[str(query)] = f"{len(data['result'])} series, none with a number: {str(data['result'])[:300]}"
    return missing


@pytest.fixture(scope="module")
def window(demo: dict) -> float:
    """Start of the demo's time window: when its pipeline run began (a minute of slack for clocks)."""
    return demo_manifest(demo)["created_at"] - 60


def test_every_panel_query_returns_data(demo: dict, prometheus: str, window: float) -> None:
    dashboard = grafana.load()
    deadline = time.monotonic() + WAIT_S
    while True:
        send_traffic(demo["url"])
        missing = panels_without_data(prometheus, dashboard, window)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, f"after {WAIT_S}s, panels whose query returned no data:\n" + "\n".join(
        f"  {query}\n    -> {why}" for query, why in missing.items()
    )


def test_stage_status_shows_every_stage_of_the_demo_run(demo: dict, prometheus: str, window: float) -> None:
    """Every stage was seen succeeded, and running when it ran long enough to be exported while
    running (Ray exports every 10 s: a 5-second `prepare` may show only its end), and its duration
    recorded, under the demo's run id."""
    run_id, now = demo["run_id"], time.time()
    status = query_range(prometheus, f'{metrics.STAGE_STATUS.exported}{{run_id="{run_id}"}}', window, now)
    seen: dict[str, set[float]] = {}
    for series in status["result"]:
        seen.setdefault(series["metric"]["stage"], set()).update(float(value) for _, value in series["values"])
    codes = metrics.STAGE_STATUS_CODES
    assert set(seen) == set(STAGES), seen
    seconds = {stage: record["seconds"] for stage, record in demo_manifest(demo)["stages"].items()}
    for stage, values in seen.items():
        expected = (
            {codes["running"], codes["succeeded"]}
            if seconds[stage] >= EXPORTED_WHILE_RUNNING_S
            else {codes["succeeded"]}
        )
        assert expected <= values, f"{stage} ({seconds[stage]:.0f} s): status values {sorted(values)}"
    durations = query_range(prometheus, f'{metrics.STAGE_DURATION.exported}{{run_id="{run_id}"}}', window, now)
    assert {series["metric"]["stage"] for series in durations["result"]} == set(seen)


def test_training_series_come_from_every_training_stage(demo: dict, prometheus: str, window: float) -> None:
    """Loss and throughput from the pretrain workers, the finetune workers and the Tune trials; the
    pretrain series is labelled with the stage's MLflow run."""
    now = time.time()
    for spec in (metrics.TRAIN_LOSS, metrics.TRAIN_TOKENS_PER_S):
        result = query_range(prometheus, spec.exported, window, now)["result"]
        stages = {series["metric"]["stage"] for series in result}
        assert stages == {"pretrain", "tune", "finetune"}, f"{spec.exported}: stages {stages}"
    manifest = demo_manifest(demo)
    pretrain_run = manifest["stages"]["pretrain"]["mlflow_run_id"]
    result = query_range(prometheus, f'{metrics.TRAIN_LOSS.exported}{{stage="pretrain"}}', window, now)["result"]
    # Other test processes train on the same cluster meanwhile: the demo's pretrain run is one of the series.
    assert pretrain_run in {series["metric"]["mlflow_run_id"] for series in result}
    trials = query_range(
        prometheus, f'max by (status) ({metrics.TUNE_TRIALS.exported}{{run_id="{demo["run_id"]}"}})', window, now
    )["result"]
    finished = max((float(v) for s in trials if s["metric"]["status"] == "finished" for _, v in s["values"]), default=0)
    ran = json.loads((Path(manifest["stages"]["tune"]["output_uri"]) / "trials.json").read_text())
    assert finished == len(ran), f"the sweep ran {len(ran)} trials; the finished count peaked at {finished}"
