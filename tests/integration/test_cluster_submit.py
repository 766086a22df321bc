"""`ptft submit / logs / status / stop` and the cluster pre-flight against a real two-node Ray
cluster on this machine: a head and a second node, each its own `ray start --block` process with
2 CPUs. The demo's pre-training (shrunk) is submitted as a Ray Job; its workers must land on both
nodes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.job_submission import JobSubmissionClient

from components.net import free_port
from tests.conftest import REPO, wait_until
from tests.e2e.conftest import SHRINK
from tests.services import BIN, _start_ray, _stop, _wait_for, stop_service

pytestmark = pytest.mark.integration

PTFT = str(BIN / "ptft")
SECOND_NODE = "second_node"


def _node_command(*args: str) -> list[str]:
    # Two nodes on one host: each dashboard agent and metrics exporter needs its own port. Fresh ports
    # for every start: a port taken meanwhile by another process fails the node's agent, and with it
    # every start that reuses the port.
    return [
        str(BIN / "ray"),
        "start",
        "--block",
        "--num-cpus=2",
        "--object-store-memory=300000000",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--disable-usage-stats",
        *args,
    ]


def _alive_nodes(address: str) -> int:
    out = subprocess.run(
        [str(BIN / "ray"), "status", f"--address={address}"], capture_output=True, text=True, timeout=30
    ).stdout
    active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
    return len(re.findall(r"^\s*1 node_", active, flags=re.M))


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict]:
    """A head and a second node (marked with the custom resource `second_node`); only these two
    processes are stopped at the end (`ray stop` would end every Ray on the machine)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ptft-2nodes-", dir="/tmp"))
    port, dashboard_port = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
    }
    env.pop("RAY_ADDRESS", None)
    address, dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}"
    head_args = (
        "--head",
        f"--port={port}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}",
    )
    # Its own temp dir: nodes that share one would share runtime_resources/, and one node's runtime-env
    # agent would delete the job's working dir while the other still runs in it.
    second_args = (f"--address={address}", f"--resources={json.dumps({SECOND_NODE: 1})}")
    processes = []
    try:
        processes.append(_start_node("head", lambda attempt: head_args, env, temp_dir, address, want=1))

        def second_node_args(attempt: int) -> tuple[str, ...]:
            return (*second_args, f"--temp-dir={temp_dir / f'second-{attempt}'}")

        processes.append(_start_node("second", second_node_args, env, temp_dir, address, want=2))
        _wait_for(lambda: JobSubmissionClient(dashboard), "ray job API", processes[0], max(temp_dir.glob("head-*.log")))
        yield {"address": address, "dashboard": dashboard, "second": processes[1]}
    finally:
        for process in reversed(processes):
            _stop(process, signal.SIGKILL)  # a throwaway cluster: Ray's graceful stop took half a minute a node
        shutil.rmtree(temp_dir, ignore_errors=True)


# `ray start` gives a starting node 30 s (fixed in Ray) to register with the GCS, and exits when that
# runs out; under make test's load on two cores it sometimes does, so a node gets three starts.
NODE_STARTS = 3


def _start_node(name: str, node_args, env: dict, temp_dir: Path, address: str, want: int):
    """`ray start` with node_args(attempt), retried; a last failure shows the node's own Ray logs."""
    for attempt in range(1, NODE_STARTS + 1):
        log = temp_dir / f"{name}-{attempt}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                _node_command(*node_args(attempt)),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            _wait_for(lambda: _alive_nodes(address) >= want, f"ray {name} node", process, log)
        except RuntimeError as failed:  # it exited while starting
            _stop(process)
            if attempt < NODE_STARTS:
                continue
            raise RuntimeError(f"{failed}\n{_ray_log_tails(temp_dir)}") from None
        return process


def _ray_log_tails(temp_dir: Path, chars: int = 1500) -> str:
    """The end of every raylet and agent log of the cluster: why a node never registered."""
    tails = []
    for pattern in ("raylet.*", "dashboard_agent*", "runtime_env_agent*", "gcs_server.*"):
        for path in sorted(temp_dir.glob(f"**/session_2*/logs/{pattern}")):
            text = path.read_text(errors="replace")[-chars:].strip()
            if text:
                tails.append(f"--- {path.relative_to(temp_dir)}\n{text}")
    return "\n".join(tails)


def _ptft(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.run([PTFT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


# Its own pipeline name: the e2e tier's demo runs meanwhile, on the same MLflow server, and owns the
# `demo` experiment and the `demo-classifier` registered model.
NAME = "cluster-demo"


def _submit(cluster: dict, storage: Path, *overrides: str) -> str:
    result = _ptft(
        "submit",
        "configs/demo.yaml",
        *SHRINK,
        f"name={NAME}",
        f"storage={storage}",
        *overrides,
        "--address",
        cluster["dashboard"],
        "--no-wait",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.search(r"Submitted job (\S+) to", result.stdout)
    assert match, result.stdout
    return match.group(1)


# --- no cluster compute: refused before anything is sent -----------------------------------------


def test_submit_refuses_a_broken_config_before_sending(tmp_path: Path) -> None:
    result = _ptft(
        "submit",
        "configs/demo.yaml",
        "pretrain.max_steps=twenty",
        f"storage={tmp_path}",
        "--address",
        f"http://127.0.0.1:{free_port()}",
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pretrain.max_steps" in result.stderr and "Fix:" in result.stderr
    assert "Traceback" not in result.stderr


def test_submit_refuses_relative_storage(tmp_path: Path) -> None:
    result = _ptft("submit", "configs/demo.yaml", "storage=./ptft-runs", "--address", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "storage" in result.stderr
    assert "use an absolute path on shared storage, e.g. storage=/mnt/shared/ptft-runs" in result.stderr


@pytest.fixture(scope="module")
def small_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A head of its own with no CPUs for tasks (job entrypoints need none) and its upload limit
    (Ray's gRPC message size) lowered to 2 MB: the refusal a real cluster gives at 512 MiB, from 3 MB."""
    head = _start_ray(tmp_path_factory.mktemp("small-head"), cpus=0, env={"RAY_max_grpc_message_size": "2000000"})
    try:
        # The GCS answers first; on a fresh machine the dashboard took seconds more.
        wait_until(lambda: _dashboard_answers(head["dashboard"]), "the small head's dashboard", timeout_s=120)
        yield head
    finally:
        stop_service(head, signal.SIGKILL)
        shutil.rmtree(head["temp_dir"], ignore_errors=True)


def _dashboard_answers(url: str) -> bool:
    try:
        JobSubmissionClient(url)
    except ConnectionError:
        return False
    return True


def _project(folder: Path, *packages: str) -> Path:
    """A working dir with the demo config and copies of ptft's `packages`."""
    (folder / "configs").mkdir(parents=True)
    shutil.copy(REPO / "configs" / "demo.yaml", folder / "configs")
    for package in packages:
        shutil.copytree(REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def _submit_to(head: dict, work: Path, storage: Path, *options: str) -> subprocess.CompletedProcess:
    config = str(work / "configs" / "demo.yaml")
    return _ptft(
        "submit", config, f"storage={storage}", "--address", head["dashboard"], "--working-dir", str(work), *options
    )


def test_a_working_dir_over_the_clusters_upload_limit_is_named_with_its_largest_files(
    small_head: dict, tmp_path: Path
) -> None:
    """Ray's dashboard answered a 500 with its own traceback (`ValueError: Package size (2.86MiB)
    exceeds the maximum size of 1.91MiB`), exit 1."""
    work = _project(tmp_path / "project")
    (work / "corpus.bin").write_bytes(os.urandom(3_000_000))  # random: zipped as large
    (work / "ignored.bin").write_bytes(os.urandom(3_000_000))
    (work / ".rayignore").write_text("ignored.bin\n")
    result = _submit_to(small_head, work, tmp_path / "runs", "--no-preflight", "--no-wait")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--working-dir = '{work}': zipped, it is 2.8" in result.stderr and "over the 1.91MiB" in result.stderr
    assert "the largest files: corpus.bin (3.0 MB), configs/demo.yaml" in result.stderr, result.stderr
    assert ".rayignore" in result.stderr and "Traceback" not in result.stderr


def test_a_job_whose_python_lacks_ptfts_dependencies_is_told_to_pass_python(small_head: dict, tmp_path: Path) -> None:
    """`python` on the head's PATH is often not the one `ray start` runs from: the job failed with
    a ModuleNotFoundError in its log and nothing more. Here an interpreter without site-packages."""
    work = _project(tmp_path / "project", "pipelines", "components")
    result = _submit_to(small_head, work, tmp_path / "runs", "--no-preflight", "--python", f"{sys.executable} -S")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ModuleNotFoundError: No module named" in result.stdout and "FAILED" in result.stdout
    assert "ptft: the job's Python could not import" in result.stderr and "--python" in result.stderr, result.stderr
    job_id = re.search(r"Submitted job (\S+)", result.stdout).group(1)
    status = _ptft("status", job_id, "--address", small_head["dashboard"])
    assert "FAILED" in status.stdout and "what to do: the job's Python could not import" in status.stdout, status.stdout
    # A working dir that is no ptft checkout says so instead.
    result = _submit_to(small_head, _project(tmp_path / "bare"), tmp_path / "runs", "--no-preflight")
    assert "its working dir is not a ptft checkout" in result.stderr, result.stdout + result.stderr


# --- pre-flight from `ptft validate` ----------------------------------------------------------------


def test_validate_on_the_cluster_passes(cluster: dict, mlflow_server: str, tmp_path: Path) -> None:
    result = _ptft(
        "validate",
        "configs/demo.yaml",
        f"storage={tmp_path}",
        f"tracking.uri={mlflow_server}",
        f"ray.address={cluster['address']}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK" in result.stdout
    assert not list((tmp_path / ".ptft-preflight").glob("*")), "the storage probe cleans up after itself"


def test_validate_names_what_does_not_fit_and_an_unreachable_mlflow(cluster: dict, tmp_path: Path) -> None:
    dead_mlflow = f"http://127.0.0.1:{free_port()}"
    result = _ptft(
        "validate",
        "configs/demo.yaml",
        f"storage={tmp_path}",
        f"tracking.uri={dead_mlflow}",
        "pretrain.workers.num_workers=8",
        f"ray.address={cluster['address']}",
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pretrain.workers.num_workers = 8: 8 workers x 1 CPU = 8 CPU, the cluster has 4" in result.stderr
    assert "set pretrain.workers.num_workers <= 4" in result.stderr
    assert "tracking.uri" in result.stderr and "Traceback" not in result.stderr


# --- jobs -----------------------------------------------------------------------------------------


def test_unknown_job_id_exits_2(cluster: dict) -> None:
    result = _ptft("status", "ptft-no-such-job", "--address", cluster["dashboard"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no job 'ptft-no-such-job'" in result.stderr


def test_submitted_demo_trains_on_both_nodes(
    cluster: dict, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    storage = tmp_path_factory.mktemp("cluster-demo")
    # What runs where is the subject here, so the job pre-trains only (no task); the e2e tier runs
    # the whole pipeline.
    job_id = _submit(
        cluster,
        storage,
        f"tracking.uri={mlflow_server}",
        "data.task=null",
        "pretrain.workers.placement_strategy=SPREAD",
    )
    assert job_id.startswith(f"ptft-{NAME}-")

    logs = _ptft("logs", job_id, "--follow", "--address", cluster["dashboard"], timeout=1200)
    assert logs.returncode == 0, logs.stdout[-5000:] + logs.stderr[-3000:]
    assert "Pipeline run" in logs.stdout and f"job {job_id}: SUCCEEDED" in logs.stdout
    status = _ptft("status", job_id, "--address", cluster["dashboard"])
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    assert list((storage / "artifacts" / "pretrain").glob("*/_SUCCESS")), "the job wrote to the given storage"

    groups = _train_worker_nodes(cluster["dashboard"], job_id)
    spanning = [nodes for nodes in groups.values() if len(nodes) >= 2]
    assert spanning, f"no training worker group ran on both nodes: {groups}"
    assert _second_node_id(cluster["dashboard"]) in spanning[0]


def test_stop_a_running_job(cluster: dict, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    storage = tmp_path_factory.mktemp("cluster-stop")
    job_id = _submit(
        cluster, storage, f"tracking.uri={mlflow_server}", f"serve.port={free_port()}", "serve.app_name=stopped"
    )
    deadline = time.monotonic() + 300
    while not _a_stage_is_running(storage):  # stop it mid-stage, with MLflow runs open
        assert time.monotonic() < deadline, "the job never started a stage"
        time.sleep(1)
    stopped = _ptft("stop", job_id, "--address", cluster["dashboard"], "--timeout", "120")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"{job_id}: STOPPED" in stopped.stdout
    assert f"{job_id}: STOPPED" in _ptft("status", job_id, "--address", cluster["dashboard"]).stdout
    # Ray stops a job with SIGTERM: the driver ends its runs KILLED instead of leaving them RUNNING.
    (manifest_path,) = (storage / "runs").glob("*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "killed", manifest
    client = MlflowClient(mlflow_server)
    runs = client.search_runs(
        [client.get_experiment_by_name(NAME).experiment_id], f"tags.`ptft.run_id` = '{manifest['run_id']}'"
    )
    assert runs and all(run.info.status in ("KILLED", "FINISHED") for run in runs), [
        (run.info.run_name, run.info.status) for run in runs
    ]
    assert any(run.info.status == "KILLED" for run in runs)


def _a_stage_is_running(storage: Path) -> bool:
    for path in (storage / "runs").glob("*/manifest.json"):
        try:
            stages = json.loads(path.read_text())["stages"].values()
        except (json.JSONDecodeError, OSError):
            return False
        return any(stage["status"] == "running" for stage in stages)
    return False


def _train_worker_nodes(dashboard: str, job_id: str) -> dict[str, set[str]]:
    """Node ids of the job's Ray Train workers (alive or dead), by worker group (placement group)."""
    from ray.util.state import list_actors

    ray_job_id = JobSubmissionClient(dashboard).get_job_info(job_id).job_id
    # Ray Train V2's worker actor class (ray/train/v2/_internal/execution/worker_group/worker.py).
    filters = [("class_name", "=", "RayTrainWorker"), ("job_id", "=", ray_job_id)]
    workers = list_actors(address=dashboard, filters=filters, detail=True, limit=1000)
    groups: dict[str, set[str]] = {}
    for worker in workers:
        groups.setdefault(worker.placement_group_id, set()).add(worker.node_id)
    return groups


def _second_node_id(dashboard: str) -> str:
    from ray.util.state import list_nodes

    (node,) = [n for n in list_nodes(address=dashboard, detail=True) if SECOND_NODE in n.resources_total]
    return node.node_id


# --- node loss: runs last in this module, since the second node stays down ------------------------


def _job_workers_on(dashboard: str, job_id: str, node_id: str) -> list:
    from ray.util.state import list_actors

    ray_job_id = JobSubmissionClient(dashboard).get_job_info(job_id).job_id
    filters = [("class_name", "=", "RayTrainWorker"), ("job_id", "=", ray_job_id), ("state", "=", "ALIVE")]
    return [actor for actor in list_actors(address=dashboard, filters=filters, detail=True) if actor.node_id == node_id]


def _pretrain_steps(storage: Path, mlflow_server: str) -> float:
    for path in (storage / "runs").glob("*/manifest.json"):
        record = json.loads(path.read_text())["stages"].get("pretrain", {})
        if record.get("status") == "running" and record.get("mlflow_run_id"):
            return MlflowClient(mlflow_server).get_run(record["mlflow_run_id"]).data.metrics.get("train/step", 0)
    return 0


def test_losing_a_node_mid_pretraining_continues_or_fails_clearly_and_resume_completes(
    cluster: dict, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SIGKILL of the second node's raylet while a pre-training worker runs on it. Ray Train restarts
    the worker group from the last checkpoint on what is left, or the job fails naming the lost
    node; either way `ptft resume` ends the run with the pre-trained model published."""
    import psutil

    storage = tmp_path_factory.mktemp("node-loss")
    job_id = _submit(
        cluster,
        storage,
        f"tracking.uri={mlflow_server}",
        "data.task=null",
        "pretrain.workers.placement_strategy=SPREAD",
        # Enough steps after the 40th for the poll below to land the kill while training runs. With
        # 200, on an idle machine, the job ended SUCCEEDED with no restore on record (2026-12-04).
        "pretrain.max_steps=400",
        "pretrain.checkpoint_every=20",
    )
    second = _second_node_id(cluster["dashboard"])
    deadline = time.monotonic() + 600
    while not (_pretrain_steps(storage, mlflow_server) >= 40 and _job_workers_on(cluster["dashboard"], job_id, second)):
        assert time.monotonic() < deadline, "pre-training never trained on the second node"
        time.sleep(1)
    (raylet,) = [p for p in psutil.Process(cluster["second"].pid).children(recursive=True) if p.name() == "raylet"]
    raylet.kill()

    logs = _ptft("logs", job_id, "--follow", "--address", cluster["dashboard"], timeout=900)
    (manifest_path,) = (storage / "runs").glob("*/manifest.json")
    run_id = json.loads(manifest_path.read_text())["run_id"]
    if f"job {job_id}: SUCCEEDED" not in logs.stdout:  # failed: clearly, then a resume on what is left
        said = logs.stdout + logs.stderr
        assert "pretrain" in said and ("node" in said.lower() or "died" in said.lower()), said[-5000:]
        env = {**os.environ, "RAY_ADDRESS": cluster["address"]}
        resumed = subprocess.run(
            [PTFT, "resume", run_id, "--storage", str(storage)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-3000:]
    manifest = json.loads(manifest_path.read_text())
    pretrain = manifest["stages"]["pretrain"]
    assert pretrain["status"] == "succeeded", manifest
    assert list((storage / "artifacts" / "pretrain").glob("*/_SUCCESS"))
    # It trained on after the loss from a checkpoint, not from scratch: a restore is on record.
    metrics = MlflowClient(mlflow_server).get_run(pretrain["mlflow_run_id"]).data.metrics
    assert metrics.get("restore/loaded_step", 0) >= 20, metrics
    how = "failed clearly, resumed" if "resumed" in locals() else "continued on the head"
    print(f"node loss: {how}; restored step {metrics['restore/loaded_step']:.0f} of 400")
