"""`ptft ui` serves the MLflow UI on the config's tracking store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from components.net import free_port
from tests.conftest import REPO, tiny_config_dict

pytestmark = pytest.mark.integration


def test_ui_serves_the_configured_store(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "store")))
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "ptft"), "ui", str(config), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read().decode()[-3000:]
            try:
                response = requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if response.ok:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy starting
                time.sleep(0.5)
        else:
            _stop(process)
            pytest.fail(f"MLflow UI did not come up:\n{process.stdout.read().decode()[-3000:]}")
        experiments = requests.get(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search", params={"max_results": 10}, timeout=10
        )
        assert experiments.ok
        assert (tmp_path / "store" / "mlflow.db").is_file()  # the UI opened the config's sqlite store
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the UI's process group; under make test's load its workers can take longer than
    30 s to drain, and a slow shutdown is not what this test checks, so then SIGKILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
