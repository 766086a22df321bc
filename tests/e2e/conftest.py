"""The demo pipeline, run once per session through the real `ptft` CLI on the shared Ray cluster
and MLflow server; every e2e module asserts on what that one run left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components.net import free_port
from pipelines.pipeline_config import load_config
from pipelines.stages import graph
from tests.conftest import REPO
from tests.services import run_prometheus

PTFT = str(Path(sys.executable).parent / "ptft")
# The demo's stages (a config of one task: tokenize, pretrain, tune, finetune, serve), from its graph.
STAGES = tuple(node.id for node in graph(load_config(REPO / "configs" / "demo.yaml", check_data=False)))
# The demo config, shrunk through ordinary overrides (no test switches in the code).
SHRINK = [
    "data.corpus.source.num_examples=2000",
    "data.task.train.num_examples=320",
    "data.task.validation.num_examples=96",
    "data.task.test.num_examples=96",
    "pretrain.max_steps=40",
    "pretrain.warmup_steps=4",
    "pretrain.checkpoint_every=20",
    "pretrain.batch_size_per_worker=16",
    "tune.num_samples=2",
    "tune.max_epochs=2",
    "finetune.epochs=1",
]


# Credentials in the environment (as a team would pass them) must never reach MLflow params or tags.
SECRETS = {"MLFLOW_TRACKING_TOKEN": "e2e-token-5b1d", "AWS_SECRET_ACCESS_KEY": "e2e-aws-secret-77c2"}


@pytest.fixture(scope="package")
def prometheus(ray_cluster: str, ray_temp_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from run_prometheus(ray_temp_dir, tmp_path_factory.mktemp("prometheus"))


# Package scope: the e2e modules share one demo run, and its Serve app ("/" on the shared cluster)
# is deleted once they are done, before the integration tier deploys its own apps.
@pytest.fixture(scope="package")
def demo(
    ray_driver: str, mlflow_server: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    if shutil.which("prometheus") or os.environ.get("PTFT_NO_SKIPS"):
        # Prometheus scrapes the cluster while the demo runs (test_dashboards.py queries what it saw).
        # Asked for here rather than as a parameter: where it is not installed, only that module skips.
        request.getfixturevalue("prometheus")
    storage = tmp_path_factory.mktemp("demo")
    port = free_port()
    command = [
        PTFT,
        "run",
        "configs/demo.yaml",
        *SHRINK,
        f"storage={storage}",
        f"tracking.uri={mlflow_server}",
        f"ray.address={ray_driver}",
        f"serve.port={port}",
        "serve.app_name=e2e",
        "--progress-every",
        "2",
    ]
    result = run_ptft(command)
    # Where the run says it serves: a Serve already running on the shared cluster keeps its own port.
    url = result.stdout.split(" served at ", 1)[1].split()[0]
    yield {
        "storage": storage,
        "url": url,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "command": command,
        "client": MlflowClient(mlflow_server),
        "run_id": run_id_of(result),
    }
    from ray import serve

    serve.delete("e2e")


@pytest.fixture(scope="package")
def two_tasks(
    demo: dict, ray_driver: str, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Future]:
    """The two-task scenario (tests/e2e/two_tasks.py) on the demo's storage, started in the
    background by its first user (the demo's re-runs, which it overlaps: the e2e tier runs in one
    test process, and end to end it was the longest chain of make test)."""
    from tests.e2e import two_tasks as scenario

    executor = ThreadPoolExecutor(1, thread_name_prefix="two-tasks")
    logs = tmp_path_factory.mktemp("multitask")
    future = executor.submit(scenario.run, demo["storage"], SHRINK, ray_driver, mlflow_server, logs)
    try:
        yield future
        future.result(timeout=2400)  # never left running past the package
    finally:
        executor.shutdown(wait=True)
        scenario.stop_serving()


def run_id_of(result: subprocess.CompletedProcess) -> str:
    """The pipeline run id `ptft run` printed (runs of other tests share the demo's storage)."""
    found = re.search(r"^Pipeline run (\S+) finished", getattr(result, "text", result.stdout), re.MULTILINE)
    assert found, result.stdout[-3000:]
    return found.group(1)


def run_ptft(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=1500, env={**os.environ, **SECRETS}
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return result


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def run_ptft_on_a_terminal(command: list[str]) -> subprocess.CompletedProcess:
    """`run_ptft` with stdout and stderr on a pseudo-terminal, as a person at a terminal sees it:
    `stdout` is what was drawn (escape codes left in), `text` the same without them."""
    import pty

    controller, terminal = pty.openpty()
    env = {**os.environ, **SECRETS, "TERM": "xterm-256color", "COLUMNS": "160"}
    process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env=env)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    drawn = b"".join(chunks).decode("utf-8", errors="replace")
    result = subprocess.CompletedProcess(command, process.wait(timeout=60), drawn, "")
    assert result.returncode == 0, ANSI.sub("", drawn)[-5000:]
    result.text = ANSI.sub("", drawn.replace("\x1b[2K", "\n"))  # an erased line: a new one
    return result


def manifest_of(storage: Path, run_id: str) -> dict:
    return json.loads((storage / "runs" / run_id / "manifest.json").read_text())


def demo_manifest(demo: dict) -> dict:
    """The demo run's manifest (later runs share its storage: the reruns, the two-task run)."""
    return manifest_of(demo["storage"], demo["run_id"])
