"""configs/demo_multitask.yaml through the CLI, shrunk: one pre-training, two task branches.

It runs in the demo run's storage with the demo's corpus, tokenizer, pre-training and sweep
settings, and its sentiment task has the demo's data: tokenize, pretrain and the sentiment task's
prepare and tune are the demo's, reused from the cache (a config of one task and one of several
share them), while its models are registered under their own names.

The topic branch's fine-tuning is killed for real (SIGKILL of a Ray Train worker, no retries for
that task): the sentiment branch still fine-tunes and serves, the run ends failed, and `ptft
resume` reruns the topic branch's finetune and serve only. Then both tasks answer on their own
routes of the one Serve instance.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from components.stage import read_json
from components.training import free_port
from tests.conftest import REPO, wait_until
from tests.e2e.conftest import SHRINK as DEMO_SHRINK

pytestmark = pytest.mark.e2e

PTFT = str(Path(sys.executable).parent / "ptft")
TASKS = ("sentiment", "topic")
# The demo's shrunk corpus, pre-training and sweep, then the tasks' data as the demo's task data.
SHRINK = [
    *(item for item in DEMO_SHRINK if item.split(".", 1)[0] in ("data", "pretrain", "tune") and ".task." not in item),
    *(
        f"tasks.{task}.data.{split}.num_examples={rows}"
        for task in TASKS
        for split, rows in (("train", 320), ("validation", 96), ("test", 96))
    ),
    "finetune.epochs=2",
    "tasks.topic.finetune.epochs=3",  # a wider window for the kill
    "tasks.topic.finetune.workers.max_failures=0",  # one killed worker fails the stage
]


def _runs(storage: Path) -> set[Path]:
    return set((storage / "runs").glob("*/manifest.json"))


def _manifest(storage: Path, before: set[Path]) -> dict | None:
    """The manifest of the one run started since `before` (the demo's runs share the storage)."""
    found = _runs(storage) - before
    return read_json(found.pop()) if found else None


def _driver_train_workers(address: str, driver_pid: int) -> list:
    """The live Ray Train workers of the `ptft` driver with this pid (other tests train on the
    same cluster)."""
    from ray.util.state import list_actors, list_jobs

    jobs = [
        job.job_id
        for job in list_jobs(address=address)
        if (job.driver_info and str(job.driver_info.pid) == str(driver_pid))
    ]
    if not jobs:
        return []
    filters = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"), ("job_id", "=", jobs[0])]
    return list_actors(address=address, filters=filters, limit=100)


def _kill_topic_finetuning(storage: Path, before: set[Path], address: str, driver: subprocess.Popen) -> int:
    """SIGKILL one worker of finetune.topic once it has trained a step; returns its pid."""

    def training() -> list:
        assert driver.poll() is None, "the driver ended before finetune.topic ran"
        manifest = _manifest(storage, before)
        record = (manifest or {}).get("stages", {}).get("finetune.topic", {})
        if record.get("status") != "running" or not record.get("mlflow_run_id"):
            return []
        metrics = MlflowClient(manifest["tracking_uri"]).get_run(record["mlflow_run_id"]).data.metrics
        return _driver_train_workers(address, driver.pid) if metrics.get("train/step", 0) >= 1 else []

    victim = wait_until(training, "finetune.topic training", timeout_s=900)[0]
    os.kill(victim.pid, signal.SIGKILL)
    return victim.pid


@pytest.fixture(scope="module")
def multitask(demo: dict, ray_driver: str, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    storage, before = demo["storage"], _runs(demo["storage"])
    logs_dir = tmp_path_factory.mktemp("multitask")
    overrides = [
        *SHRINK,
        f"storage={storage}",
        f"tracking.uri={mlflow_server}",
        f"ray.address={ray_driver}",
        f"serve.port={free_port()}",
        "serve.app_name=multitask",
        "tasks.sentiment.serve.route_prefix=/multitask/sentiment",
        "tasks.topic.serve.route_prefix=/multitask/topic",
    ]
    logs = [logs_dir / "run.log", logs_dir / "resume.log"]
    with open(logs[0], "w") as out:
        first = subprocess.Popen(
            [PTFT, "run", "configs/demo_multitask.yaml", *overrides], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    killed_pid = _kill_topic_finetuning(storage, before, ray_driver, first)
    first_rc = first.wait(timeout=900)
    after_kill = _manifest(storage, before)
    with open(logs[1], "w") as out:
        resumed = subprocess.run(
            [PTFT, "resume", after_kill["run_id"], "--storage", str(storage)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    assert resumed.returncode == 0, logs[1].read_text()[-6000:]
    yield {
        "first_rc": first_rc,
        "after_kill": after_kill,
        "final": _manifest(storage, before),
        "demo": read_json(demo["storage"] / "runs" / demo["run_id"] / "manifest.json"),
        "killed_pid": killed_pid,
        "client": MlflowClient(mlflow_server),
        "logs": [log.read_text() for log in logs],
    }
    from ray import serve

    for task in TASKS:
        serve.delete(f"multitask-{task}")


def test_the_killed_branch_failed_alone(multitask: dict) -> None:
    assert multitask["first_rc"] == 1, multitask["logs"][0][-4000:]
    statuses = {node: record["status"] for node, record in multitask["after_kill"]["stages"].items()}
    assert statuses == {
        "tokenize": "cached",
        "pretrain": "cached",
        "prepare.sentiment": "cached",
        "tune.sentiment": "cached",
        "finetune.sentiment": "succeeded",
        "serve.sentiment": "succeeded",
        **{f"{stage}.topic": "succeeded" for stage in ("prepare", "tune")},
        "finetune.topic": "failed",
        "serve.topic": "skipped",
    }
    assert multitask["after_kill"]["status"] == "failed"


def test_resume_reran_only_the_killed_branch(multitask: dict) -> None:
    final = multitask["final"]
    assert final["status"] == "succeeded" and final["attempts"] == 2
    attempts = {node: record["attempts"] for node, record in final["stages"].items()}
    assert attempts.pop("finetune.topic") == 2
    assert set(attempts.values()) == {1}, attempts  # serve.topic: skipped, then run once
    statuses = {node: record["status"] for node, record in final["stages"].items()}
    cached = ("tokenize", "pretrain", "prepare.sentiment", "tune.sentiment")
    assert {statuses.pop(node) for node in cached} == {"cached"}
    assert set(statuses.values()) == {"succeeded"}, statuses


def test_one_pretraining_and_a_model_per_task(multitask: dict) -> None:
    stages = multitask["final"]["stages"]
    assert [node for node in stages if node.startswith("pretrain")] == ["pretrain"]
    # The demo's pre-trained model and sweep, reused: same keys, same artifacts.
    demo = multitask["demo"]["stages"]
    assert stages["pretrain"]["output_uri"] == demo["pretrain"]["output_uri"]
    assert stages["tune.sentiment"]["output_uri"] == demo["tune"]["output_uri"]
    client = multitask["client"]
    for task in TASKS:
        version = client.get_model_version_by_alias(f"demo-multitask-{task}", "champion")
        assert version.run_id == stages[f"finetune.{task}"]["mlflow_run_id"]


def test_each_task_answers_on_its_own_route(multitask: dict) -> None:
    labels = {"sentiment": {"negative", "positive"}, "topic": {"story", "music", "acting", "craft"}}
    urls = {task: multitask["final"]["stages"][f"serve.{task}"]["output_uri"] for task in TASKS}
    assert urls["sentiment"].endswith("/multitask/sentiment") and urls["topic"].endswith("/multitask/topic")
    for task, url in urls.items():
        answer = requests.post(f"{url}/predict", json={"texts": ["the soundtrack was superb ."]}, timeout=30)
        assert answer.status_code == 200, answer.text
        (prediction,) = answer.json()["predictions"]
        assert prediction["label"] in labels[task]


def test_one_mlflow_tree_with_a_run_per_branch_stage(multitask: dict) -> None:
    client, final = multitask["client"], multitask["final"]
    parent = final["mlflow_run_id"]
    for node, record in final["stages"].items():
        run = client.get_run(record["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent, node
        assert run.info.run_name == node
        if "." in node:
            assert run.data.tags["ptft.task"] == node.split(".", 1)[1]
