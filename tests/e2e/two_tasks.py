"""The multi-task scenario of the e2e tier: configs/demo_multitask.yaml through the CLI, shrunk, on
the demo run's storage, with one task's fine-tuning killed and the run resumed. tests/e2e/conftest.py
starts it in the background once the demo has run, so that it overlaps the demo's re-runs;
tests/e2e/test_multitask.py asserts on what it returns."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

from components.net import free_port
from components.stage import read_json
from tests.conftest import REPO, wait_until

PTFT = str(Path(sys.executable).parent / "ptft")
PIPELINE = "demo-multitask"  # the config's name
TASKS = ("sentiment", "topic", "entities", "answers")


def shrink(demo_shrink: list[str]) -> list[str]:
    """The demo's shrunk corpus, pre-training and sweep, then the tasks' data as the demo's task data."""
    return [
        *(
            item
            for item in demo_shrink
            if item.split(".", 1)[0] in ("data", "pretrain", "tune") and ".task." not in item
        ),
        *(
            f"tasks.{task}.data.{split}.num_examples={rows}"
            for task in TASKS
            for split, rows in (("train", 320), ("validation", 96), ("test", 96))
        ),
        "finetune.epochs=2",
        # One trial for the new branches: what the sweep does is the demo's and the sweep tests' subject.
        "tasks.topic.tune.num_samples=1",
        "tasks.entities.tune.num_samples=1",
        "tasks.answers.tune.num_samples=1",
        "tasks.topic.finetune.epochs=3",  # a wider window for the kill
        "tasks.topic.finetune.workers.max_failures=0",  # one killed worker fails the stage
    ]


def _manifest(storage: Path) -> dict | None:
    """The two-task run's manifest (the demo's runs share the storage, and its re-runs go on meanwhile)."""
    for path in (storage / "runs").glob("*/manifest.json"):
        manifest = read_json(path)
        if manifest["pipeline"] == PIPELINE:
            return manifest
    return None


def _live_train_worker(pid: str) -> psutil.Process | None:
    """The Ray Train worker process with this pid, if it is alive, looked up on this host. Not through
    Ray's `list_jobs`, which returns the first 100 jobs by id, without a warning: on a cluster that
    had run 105 drivers it listed 100, not the newest. The shared cluster can have run more by now,
    and then this driver's job is never found and the fine-tuning ends unkilled."""
    with contextlib.suppress(psutil.Error, ValueError):
        process = psutil.Process(int(pid))  # raises for a pid that is gone; a zombie shows no command line
        if "RayTrainWorker" in " ".join(process.cmdline()):
            return process
    return None


def _kill_topic_finetuning(storage: Path, driver: subprocess.Popen) -> int:
    """SIGKILL the rank-0 worker of finetune.topic once it has trained a step; returns its pid.
    Other branches' fine-tuning may train beside it: the worker is the one the stage's MLflow run
    names (`ptft.rank0_pid`, written by that process, on this host)."""

    def training() -> psutil.Process | None:
        assert driver.poll() is None, "the driver ended before finetune.topic ran"
        manifest = _manifest(storage)
        record = (manifest or {}).get("stages", {}).get("finetune.topic", {})
        if record.get("status") != "running" or not record.get("mlflow_run_id"):
            return None
        run = MlflowClient(manifest["tracking_uri"]).get_run(record["mlflow_run_id"])
        pid = run.data.tags.get("ptft.rank0_pid")
        if run.data.metrics.get("train/step", 0) < 1 or pid is None:
            return None
        return _live_train_worker(pid)

    victim = wait_until(training, "finetune.topic training", timeout_s=900)
    victim.send_signal(signal.SIGKILL)
    return victim.pid


def run(storage: Path, demo_shrink: list[str], address: str, mlflow_server: str, logs_dir: Path) -> dict:
    """Run the three-task config (one task's fine-tuning killed), then resume it."""
    overrides = [
        *shrink(demo_shrink),
        f"storage={storage}",
        f"tracking.uri={mlflow_server}",
        f"ray.address={address}",
        # Two nodes side by side at most: the branches overlap, while the demo's re-runs and the
        # other tests on this 2-core machine keep their share.
        "ray.parallel_stages=2",
        f"serve.port={free_port()}",
        "serve.app_name=multitask",
        "tasks.sentiment.serve.route_prefix=/multitask/sentiment",
        "tasks.topic.serve.route_prefix=/multitask/topic",
        "tasks.entities.serve.route_prefix=/multitask/entities",
        "tasks.answers.serve.route_prefix=/multitask/answers",
    ]
    logs = [logs_dir / "run.log", logs_dir / "resume.log"]
    with open(logs[0], "w") as out:
        first = subprocess.Popen(
            [PTFT, "run", "configs/demo_multitask.yaml", *overrides], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        killed_pid = _kill_topic_finetuning(storage, first)
        first_rc = first.wait(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    after_kill = _manifest(storage)
    with open(logs[1], "w") as out:
        resumed = subprocess.run(
            [PTFT, "resume", after_kill["run_id"], "--storage", str(storage)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    assert resumed.returncode == 0, logs[1].read_text()[-6000:]
    return {
        "first_rc": first_rc,
        "after_kill": after_kill,
        "final": _manifest(storage),
        "killed_pid": killed_pid,
        "logs": [log.read_text() for log in logs],
    }


def stop_serving() -> None:
    from ray import serve

    for task in TASKS:
        serve.delete(f"multitask-{task}")
