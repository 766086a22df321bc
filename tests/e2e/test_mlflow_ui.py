"""The MLflow UI in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright; no
browser download) opens the demo's experiment and registered model on the session's `mlflow server`
and checks what a person would see there: the pipeline run with its stage runs nested under it, and
the `champion` alias on the registered version. Full-page screenshots go to each test's tmp_path
(printed; `pytest -s` shows the paths)."""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from pipelines.manifest import Manifest
from pipelines.pipeline_config import PipelineConfig, validate
from tests.conftest import system_tool
from tests.e2e.conftest import STAGES

pytestmark = pytest.mark.e2e

# Root in a container needs --no-sandbox; the rest keep Chromium from calling home (updates, sync,
# field trials): on a machine without internet it would retry those forever and eat the 2 cores.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The React UI loads a few MB of JS and the server answers on one worker: slow on 2 busy cores.
# Passed to every expect(): its own default (5 s) ignores the context's default timeout.
TIMEOUT_MS = 90_000
VIEWPORT = {"width": 1600, "height": 1000}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = system_tool("chromium", "chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="module")
def recorded(demo: dict) -> tuple[Manifest, PipelineConfig]:
    """What the demo run recorded about itself: its manifest (MLflow run ids) and resolved config."""
    manifest = Manifest.load(demo["storage"], demo["run_id"])
    return manifest, validate(manifest.config(), check_data=False)


def test_experiment_shows_pipeline_run_with_stage_children(
    demo: dict, recorded: tuple, mlflow_server: str, page: Page, tmp_path: Path
) -> None:
    manifest, config = recorded
    experiment = demo["client"].get_experiment_by_name(config.experiment_name())
    assert experiment.experiment_id == manifest.experiment_id
    stage_runs = {stage: record.mlflow_run_id for stage, record in manifest.stages.items()}
    assert sorted(stage_runs) == sorted(STAGES) and all(stage_runs.values()), stage_runs

    # The link `ptft run` printed: the runs table in the UI's "Model training" view (a bare
    # experiment URL opens the GenAI overview).
    (printed,) = re.findall(r"all runs: (\S+)", demo["stdout"])
    assert printed.startswith(f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs?")
    page.goto(printed)
    expect(page).to_have_url(re.compile(r"/runs\?workflowType=machine_learning"), timeout=TIMEOUT_MS)
    parent_link = _run_link(page, manifest.mlflow_run_id)
    expect(parent_link).to_be_visible(timeout=TIMEOUT_MS)
    expect(parent_link).to_have_text(f"pipeline-{demo['run_id']}", timeout=TIMEOUT_MS)
    # Nested, the stage runs stay hidden until their parent row is expanded (flat, they'd be listed).
    for run_id in stage_runs.values():
        expect(_run_link(page, run_id)).to_be_hidden(timeout=TIMEOUT_MS)
    _screenshot(page, tmp_path / "experiment-collapsed.png")

    parent_row = page.get_by_role("row").filter(has=parent_link)
    parent_row.get_by_role("gridcell").filter(has=parent_link).get_by_role("button").click()
    for stage, run_id in stage_runs.items():
        expect(_run_link(page, run_id)).to_be_visible(timeout=TIMEOUT_MS)
        expect(_run_link(page, run_id)).to_have_text(stage, timeout=TIMEOUT_MS)
    _screenshot(page, tmp_path / "experiment-expanded.png")


def test_registered_model_page_shows_champion_alias(
    demo: dict, recorded: tuple, mlflow_server: str, page: Page, tmp_path: Path
) -> None:
    name = recorded[1].registered_model_name()
    version = demo["client"].get_model_version_by_alias(name, "champion")

    page.goto(f"{mlflow_server}/#/models/{quote(name, safe='')}")
    expect(page.get_by_role("heading", name=name, exact=True)).to_be_visible(timeout=TIMEOUT_MS)
    version_link = page.get_by_role("link", name=f"Version {version.version}", exact=True)
    expect(version_link).to_be_visible(timeout=TIMEOUT_MS)
    champion = page.get_by_role("row").filter(has=version_link).get_by_title("champion", exact=True)
    expect(champion).to_be_visible(timeout=TIMEOUT_MS)
    expect(champion).to_contain_text("champion", timeout=TIMEOUT_MS)
    _screenshot(page, tmp_path / "registered-model.png")


def _run_link(page: Page, run_id: str):
    # By run id, not name: the session's re-runs (test_demo_pipeline) add more runs named like these.
    return page.locator(f'a[href$="/runs/{run_id}"]')


def _screenshot(page: Page, path: Path) -> None:
    page.screenshot(path=path, full_page=True)
    print(f"screenshot: {path}")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk, always first
    # A blank page compresses to a few KB; the rendered UI with text and icons is far bigger.
    size = (width, height, len(data))
    assert width >= VIEWPORT["width"] and height >= VIEWPORT["height"] and len(data) > 30_000, size
