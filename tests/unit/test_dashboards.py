"""dashboards/: the Grafana dashboard is well-formed, reads only metrics we define (components/metrics.py)
or Ray exports, and the Prometheus config finds Ray's targets through its service discovery file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components import metrics
from tests import grafana
from tests.conftest import REPO, system_tool
from tests.services import PROMETHEUS_CONFIG, SERVICE_DISCOVERY_FILE, prometheus_config

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return grafana.load()


def test_dashboard_has_the_shape_grafana_imports(dashboard: dict) -> None:
    for key in ("title", "uid", "panels", "templating", "schemaVersion", "time"):
        assert key in dashboard, f"dashboard JSON lacks {key!r}"
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    rows = [panel for panel in dashboard["panels"] if panel["type"] == "row"]
    ids = [panel["id"] for panel in [*rows, *grafana.panels(dashboard)]]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    for panel in grafana.panels(dashboard):
        assert panel["datasource"] == DATASOURCE, f"panel {panel['title']!r} does not use the ${{datasource}} variable"
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"panel {panel['title']!r} repeats a refId"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip()


def test_every_query_reads_a_defined_metric(dashboard: dict) -> None:
    known = {spec.exported for spec in metrics.METRICS} | set(metrics.RAY_METRICS)
    used = set()
    for query in grafana.queries(dashboard):
        names = grafana.metric_names(query.expr)
        assert names, f"{query} reads no metric"
        assert names <= known, (
            f"{query} reads {sorted(names - known)}: define it in components/metrics.py "
            "(ours) or add it to metrics.RAY_METRICS (Ray's, once seen on a real cluster)"
        )
        used |= names
    # What the dashboard is for: stages, training, trials and Serve traffic.
    ours = (
        metrics.STAGE_STATUS,
        metrics.STAGE_DURATION,
        metrics.TRAIN_LOSS,
        metrics.TRAIN_TOKENS_PER_S,
        metrics.TUNE_TRIALS,
    )
    wanted = {spec.exported for spec in ours} | set(metrics.RAY_METRICS)
    assert wanted <= used, f"no panel reads {sorted(wanted - used)}"


def test_metric_names_reads_names_not_functions_or_labels() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (application, le) "
        '(rate(ray_serve_http_request_latency_ms_bucket{application=~"$application"}[$__rate_interval])))'
    )
    assert grafana.metric_names(expr) == {"ray_serve_http_request_latency_ms_bucket"}
    assert grafana.metric_names("max by (stage) (ray_ptft_train_loss) / on (stage) ray_x") == {
        "ray_ptft_train_loss",
        "ray_x",
    }


def test_stage_status_panel_maps_every_code_we_record(dashboard: dict) -> None:
    status = metrics.STAGE_STATUS.exported
    panel = next(panel for panel in grafana.panels(dashboard) if status in panel["targets"][0]["expr"])
    mapped = {}
    for mapping in panel["fieldConfig"]["defaults"]["mappings"]:
        mapped |= {option["text"]: int(value) for value, option in mapping["options"].items()}
    assert mapped == metrics.STAGE_STATUS_CODES


def test_queries_are_valid_promql(dashboard: dict, tmp_path: Path) -> None:
    """promtool parses every query (as a recording rule) with the variables Grafana fills in."""
    promtool = system_tool("promtool", "prometheus")
    rules = [
        {"record": f"ptft:panel{index}", "expr": grafana.concrete(query.expr, dashboard)}
        for index, query in enumerate(grafana.queries(dashboard))
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_concrete_fills_grafana_variables(dashboard: dict) -> None:
    expr = 'rate(x{application=~"$application", pipeline=~"${pipeline}"}[$__rate_interval])'
    assert grafana.concrete(expr, dashboard) == f'rate(x{{application=~".*", pipeline=~".*"}}[{grafana.RATE_INTERVAL}])'


def test_prometheus_config_discovers_targets_from_rays_file() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    files = [path for job in config["scrape_configs"] for sd in job.get("file_sd_configs", []) for path in sd["files"]]
    assert files == [f"/tmp/ray/{SERVICE_DISCOVERY_FILE}"], "one job, reading Ray's default service discovery file"
    tested = prometheus_config(config, Path("/tmp/ptft-ray-x") / SERVICE_DISCOVERY_FILE)
    names = [job["job_name"] for job in config["scrape_configs"]]
    assert [job["job_name"] for job in tested["scrape_configs"]] == names
    assert tested["scrape_configs"][0]["file_sd_configs"][0]["files"] == [f"/tmp/ptft-ray-x/{SERVICE_DISCOVERY_FILE}"]


def test_prometheus_config_is_valid(tmp_path: Path) -> None:
    promtool = system_tool("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_metric_names_are_ours_and_valid() -> None:
    for spec in metrics.METRICS:
        assert re.fullmatch(r"ptft_[a-z0-9_]+", spec.name), spec.name
        assert spec.exported == f"ray_{spec.name}"
    assert len({spec.name for spec in metrics.METRICS}) == len(metrics.METRICS)


def test_recording_outside_ray_is_harmless() -> None:
    """Stage code runs in unit tests without Ray: recording must neither raise nor start a thread.
    In a fresh interpreter, since make test's process holds a Ray connection by the time it gets here."""
    script = """
import threading
import ray
from components import metrics
assert not ray.is_initialized()
metrics.stage_status("unit", "run-1", "tokenize", "running")
metrics.stage_status("unit", "run-1", "tokenize", "no-such-status")  # ignored, not an error
metrics.stage_finished("unit", "run-1", "tokenize", 1.5)
metrics.training_progress("pretrain", None, step=10, loss=float("nan"), tokens_per_s=None)
metrics.trials("run-1", {"running": 2, "finished": 1})
assert not any(thread.name == "ptft-metrics" for thread in threading.enumerate()), threading.enumerate()
print("recorded")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "recorded" in result.stdout, result.stdout + result.stderr
