"""`ptft report` on the session's demo run, through the real `ptft` script, against the real MLflow
server: every stage in the page, and the pictures the stages log embedded by name."""

from __future__ import annotations

import base64
import re
import subprocess

import pytest

from pipelines.manifest import Manifest
from tests.conftest import REPO
from tests.e2e.conftest import PTFT, STAGES

pytestmark = pytest.mark.e2e

IMAGE = re.compile(r'<img data-stage="([^"]+)" data-artifact="([^"]+)" alt="[^"]*" src="data:image/png;base64,([^"]+)"')
EXPECTED_PICTURES = {
    ("pretrain", "plots/loss.png"),
    ("finetune", "plots/loss.png"),
    ("finetune", "plots/confusion_matrix.png"),
    ("finetune", "plots/attention.png"),
    ("tune", "plots/sweep.png"),
}


@pytest.fixture(scope="module")
def report(demo: dict) -> dict:
    command = [PTFT, "report", demo["run_id"], "--storage", str(demo["storage"])]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    path = demo["storage"] / "runs" / demo["run_id"] / "report.html"
    return {"result": result, "path": path, "page": path.read_text() if path.is_file() else ""}


def test_report_is_written_where_it_says(report: dict) -> None:
    assert report["path"].is_file()
    assert report["result"].stdout.strip().endswith(str(report["path"]))


def test_report_shows_every_stage(report: dict) -> None:
    page = report["page"]
    for stage in STAGES:
        assert re.search(rf'<tr id="stage-{stage}"><td>{stage}</td><td><span class="status succeeded">', page), stage
    assert "demo-classifier" in page and "champion" in page
    assert re.search(r"<h2>Best trial</h2>\s*<p>Trial <code>[^<]+</code>", page)


def test_report_embeds_the_stage_pictures(report: dict) -> None:
    images = {(stage, path): base64.b64decode(data) for stage, path, data in IMAGE.findall(report["page"])}
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in images.values())
    assert EXPECTED_PICTURES <= set(images), f"missing: {sorted(EXPECTED_PICTURES - set(images))}"


def test_report_is_logged_to_the_pipeline_run(demo: dict, report: dict) -> None:
    parent = Manifest.load(demo["storage"], demo["run_id"]).mlflow_run_id
    assert "report/report.html" in {a.path for a in demo["client"].list_artifacts(parent, "report")}
