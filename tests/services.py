"""Real services for integration and e2e tests, started once per session and shared:

* `ray_cluster`: a local Ray head started with `ray start --head --block` (its own temp dir and
  ports), stopped at the end of the session.
* `mlflow_server`: an `mlflow server` process on 127.0.0.1 with a sqlite store and proxied artifacts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from components.training import free_port

BIN = Path(sys.executable).parent


def _wait_for(check, what: str, process: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    # Generous: a first start on a fresh machine compiles bytecode and creates the database.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - still starting
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not start in {timeout_s}s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """Address (host:port) of a real local Ray cluster: 4 logical CPUs on this 2-core machine so a
    training stage and a Serve replica fit together."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ptft-ray-", dir="/tmp"))
    port = free_port()
    log = temp_dir / "head.log"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
               f"--temp-dir={temp_dir}", "--object-store-memory=600000000", "--include-dashboard=true",
               f"--dashboard-port={free_port()}", "--disable-usage-stats"]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    status = [str(BIN / "ray"), "status", f"--address={address}"]
    try:
        _wait_for(lambda: subprocess.run(status, capture_output=True, timeout=30).returncode == 0,
                  "ray head", process, log)  # fmt: skip
        yield address
    finally:
        _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_driver(ray_cluster: str) -> Iterator[str]:
    """This test process connected to the shared cluster as a driver."""
    import ray

    env = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    ray.init(address=ray_cluster, runtime_env={"env_vars": env})
    try:
        yield ray_cluster
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tracking URI of a real `mlflow server` process."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = folder / "server.log"
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: requests.get(f"{uri}/health", timeout=2).ok, "mlflow server", process, log)
        yield uri
    finally:
        _stop(process)
