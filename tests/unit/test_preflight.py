"""Cluster pre-flight messages and the Ray Job spec `ptft submit` sends, without a cluster.
The same checks against a real two-node cluster: tests/integration/test_cluster_submit.py."""

from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path

import pytest

from components.net import free_port
from pipelines import jobs, preflight
from pipelines.pipeline_config import PipelineConfig, validate
from tests.conftest import REPO, small_disk, tiny_config_dict

TWO_NODES = [{"CPU": 2.0, "memory": 1e9}, {"CPU": 2.0, "second_node": 1.0}]


def _config(tmp_path: Path, **sections: dict) -> PipelineConfig:
    raw = tiny_config_dict(tmp_path / "store")
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return validate(raw, check_data=False)


def _messages(problems: list) -> list[str]:
    return [str(problem) for problem in problems]


def test_the_default_workers_fit_two_nodes(tmp_path: Path) -> None:
    assert preflight.resource_problems(_config(tmp_path), TWO_NODES) == []


def test_too_many_workers_names_the_field_and_what_fits(tmp_path: Path) -> None:
    config = _config(tmp_path, pretrain={"workers": {"num_workers": 8}})
    (message,) = _messages(preflight.resource_problems(config, TWO_NODES))
    assert message == (
        "  - pretrain.workers.num_workers = 8: 8 workers x 1 CPU = 8 CPU, the cluster has 4. "
        "Fix: set pretrain.workers.num_workers <= 4, or add nodes"
    )


def test_a_worker_bigger_than_any_node(tmp_path: Path) -> None:
    config = _config(tmp_path, finetune={"workers": {"num_workers": 1, "cpus_per_worker": 3}})
    (message,) = _messages(preflight.resource_problems(config, TWO_NODES))
    assert "finetune.workers.cpus_per_worker = 3" in message and "largest: 2" in message
    assert "Fix: set finetune.workers.cpus_per_worker <= 2" in message


def test_each_task_is_checked_under_its_own_key(tmp_path: Path) -> None:
    raw = tiny_config_dict(tmp_path / "store")
    task = raw["data"].pop("task")
    task["train"]["num_examples"] = 9 * 16  # rows for one step of the 9 workers: what does not fit is the cluster
    raw["tasks"] = {"a": {"data": task}, "b": {"data": task, "finetune": {"workers": {"num_workers": 9}}}}
    (message,) = _messages(preflight.resource_problems(validate(raw), TWO_NODES))
    assert message.startswith("  - tasks.b.finetune.workers.num_workers = 9: 9 workers x 1 CPU")


def test_gpus_requested_on_a_cpu_cluster(tmp_path: Path) -> None:
    config = _config(tmp_path, pretrain={"workers": {"use_gpu": True}})
    (message,) = _messages(preflight.resource_problems(config, TWO_NODES))
    assert message.startswith("  - pretrain.workers.use_gpu = True: a worker needs 1 GPU")
    assert "use_gpu=false" in message


@pytest.mark.parametrize(
    ("strategy", "workers", "fits"),
    [
        ("STRICT_PACK", 2, True),
        ("STRICT_PACK", 3, False),
        ("STRICT_SPREAD", 2, True),
        ("STRICT_SPREAD", 3, False),
    ],
)
def test_strict_placement_against_the_nodes(tmp_path: Path, strategy: str, workers: int, fits: bool) -> None:
    config = _config(tmp_path, pretrain={"workers": {"num_workers": workers, "placement_strategy": strategy}})
    problems = preflight.resource_problems(config, TWO_NODES)
    assert (problems == []) == fits, _messages(problems)
    if not fits:
        assert problems[0].key == "pretrain.workers.placement_strategy"


def test_tune_concurrency_over_the_cluster(tmp_path: Path) -> None:
    config = _config(tmp_path, tune={"max_concurrent_trials": 5, "cpus_per_trial": 1})
    (message,) = _messages(preflight.resource_problems(config, TWO_NODES))
    assert "tune.max_concurrent_trials = 5" in message and "Fix: set tune.max_concurrent_trials <= 4" in message


def test_serve_replicas_and_their_rollout_surge_must_fit_the_cluster(tmp_path: Path) -> None:
    """`serve.run` (and a rollout) waited without end for a replica that got no CPU."""
    assert preflight.resource_problems(_config(tmp_path, serve={"num_replicas": 4}), TWO_NODES) == []
    config = _config(tmp_path, serve={"num_replicas": 5})
    (message,) = _messages(preflight.resource_problems(config, TWO_NODES))
    assert message == (
        "  - serve.num_replicas = 5: 5 replica(s) of 0.5 CPU (and 5 more while a new version rolls out) need "
        "5 CPUs; the cluster has 4: Serve would wait without end. Fix: lower serve.num_replicas or "
        "serve.cpus_per_replica, set serve.rollout_surge_percent=0, or add nodes"
    )
    # A local Ray the run starts and stops sees first deploys only: no rollout, no surge.
    assert preflight.resource_problems(config, TWO_NODES, rollouts=False) == []
    no_surge = _config(tmp_path, serve={"num_replicas": 8, "rollout_surge_percent": 0})
    assert preflight.resource_problems(no_surge, TWO_NODES) == []
    # Autoscaling starts at min_replicas; more than the cluster holds at max is the autoscaler's to add.
    scaling = _config(tmp_path, serve={"autoscaling": {"min_replicas": 1, "max_replicas": 32}})
    assert preflight.resource_problems(scaling, TWO_NODES) == []
    (big,) = preflight.resource_problems(_config(tmp_path, serve={"cpus_per_replica": 3}), TWO_NODES)
    assert big.key == "serve.cpus_per_replica" and "largest: 2" in big.message
    assert big.fix == "set serve.cpus_per_replica <= 2"


def test_every_task_s_replicas_share_the_cluster_and_one_rolls_out_at_a_time(tmp_path: Path) -> None:
    raw = tiny_config_dict(tmp_path / "store")
    task = raw["data"].pop("task")
    raw["tasks"] = {
        "a": {"data": task, "serve": {"route_prefix": "/a", "app_name": "a", "num_replicas": 2}},
        "b": {"data": task, "serve": {"route_prefix": "/b", "app_name": "b", "num_replicas": 4}},
    }
    (problem,) = preflight.resource_problems(validate(raw, check_data=False), TWO_NODES)
    assert problem.key == "tasks.b.serve.num_replicas"
    assert problem.message.startswith(
        "2 replica(s) of 0.5 CPU for tasks.a.serve and 4 replica(s) of 0.5 CPU (and 4 more while a new version "
        "rolls out) for tasks.b.serve need 5 CPUs; the cluster has 4"
    )
    raw["tasks"]["b"]["serve"]["num_replicas"] = 2
    assert preflight.resource_problems(validate(raw, check_data=False), TWO_NODES) == []


def test_a_trial_that_can_never_be_placed(tmp_path: Path) -> None:
    """Tune leaves such a trial pending: the sweep waited without end."""
    config = _config(tmp_path, tune={"workers_per_trial": 3, "cpus_per_trial": 2, "max_concurrent_trials": 1})
    (problem,) = preflight.resource_problems(config, TWO_NODES)
    assert (problem.key, problem.value) == ("tune.workers_per_trial", 3)
    assert (
        problem.message
        == "one trial's 3 workers x 2 CPUs = 6 CPUs, the cluster has 4: the sweep would wait without end"
    )
    assert problem.fix == "set tune.workers_per_trial <= 2 or lower tune.cpus_per_trial"
    two = _config(tmp_path, tune={"workers_per_trial": 2, "max_concurrent_trials": 3})
    (problem,) = preflight.resource_problems(two, TWO_NODES)
    assert problem.message == "3 trials x 2 workers x 1 CPUs = 6 CPUs, the cluster has 4"
    assert problem.fix == "set tune.max_concurrent_trials <= 2 or lower tune.cpus_per_trial"
    (gpu,) = preflight.resource_problems(_config(tmp_path, tune={"gpus_per_trial": 1}), TWO_NODES)
    assert gpu.key == "tune.gpus_per_trial" and gpu.fix == "set tune.gpus_per_trial=0, or add GPU nodes"


def test_an_unreachable_mlflow_server_names_tracking_uri(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    (problem,) = preflight.tracking_problems(_config(tmp_path, tracking={"uri": uri}))
    assert problem.key == "tracking.uri" and problem.value == uri
    assert preflight.tracking_problems(_config(tmp_path)) == []  # sqlite under storage: the storage probe's job


def test_node_probe_reports_a_folder_it_cannot_see(tmp_path: Path) -> None:
    probe = preflight._node_probe()
    (tmp_path / "probe").write_text("token")
    assert probe(str(tmp_path), "token")[1] is None
    assert "different filesystem" in probe(str(tmp_path), "other")[1]
    assert "cannot read the probe file" in probe(str(tmp_path / "elsewhere"), "token")[1]


def test_submit_refuses_relative_storage_and_configs_outside_the_working_dir(tmp_path: Path) -> None:
    config = validate({**tiny_config_dict(tmp_path), "storage": "./ptft-runs"}, check_data=False)
    problems = jobs.submit_problems(str(tmp_path / "x.yaml"), config, REPO)
    assert [p.key for p in problems] == ["CONFIG", "storage"]
    assert "e.g. storage=/mnt/shared/ptft-runs" in str(problems[1])


def test_job_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "secret")
    config = _config(tmp_path)
    spec = jobs.job_spec(
        config,
        str(REPO / "configs" / "demo.yaml"),
        ["pretrain.max_steps=5", "name=a b"],
        REPO,
        python="/opt/venv/bin/python -u",
    )
    assert shlex.split(spec["entrypoint"]) == [
        "/opt/venv/bin/python",
        "-u",
        "-m",
        "pipelines.cli",
        "run",
        "configs/demo.yaml",
        "pretrain.max_steps=5",
        "name=a b",
    ]
    env = spec["runtime_env"]["env_vars"]
    assert env["DS_ACCELERATOR"] == "cpu" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 30  # `ptft stop` leaves the driver time to end runs KILLED
    assert "MLFLOW_TRACKING_TOKEN" not in env  # secrets live in the cluster's environment, never in the job
    assert spec["runtime_env"]["working_dir"] == str(REPO)
    assert {".venv", ".git", "ptft-runs"} <= set(spec["runtime_env"]["excludes"])
    assert spec["submission_id"].startswith("ptft-unit-")
    assert spec["metadata"]["ptft.pipeline"] == "unit"


# What a local Ray about to start needs (`ptft run`, `ptft serve` and `ptft validate` ask before it
# starts: tests/unit/test_cli_validate.py). Each case below failed the run in a traceback before.


@pytest.fixture
def fresh_ray_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No Ray variables, as on a machine that never ran the suite: token auth by default."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR", "TMPDIR"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_ray_temp_folder_on_a_read_only_disk_is_a_problem(fresh_ray_env: pytest.MonkeyPatch) -> None:
    """Before: `Read-only file system: 'TMP/ray'`. (A disk with room, so that only this refuses it.)"""
    short = Path(tempfile.mkdtemp(prefix="ptft-", dir="/tmp"))  # under the length Ray's sockets allow
    with small_disk(short / "tmp", "100M", read_only=True) as disk:
        fresh_ray_env.setenv("RAY_TMPDIR", str(disk))
        (problem,) = preflight.local_ray_problems()
    shutil.rmtree(short)
    assert (problem.key, problem.value) == ("RAY_TMPDIR", str(disk / "ray"))
    assert problem.message == f"{disk} is not writable: a local Ray keeps its session there"


def test_a_ray_temp_folder_too_long_for_its_sockets_is_a_problem(fresh_ray_env: pytest.MonkeyPatch) -> None:
    """Before: `validate_socket_filename failed: AF_UNIX path length cannot exceed 107 bytes`."""
    fresh_ray_env.setenv("RAY_TMPDIR", "/tmp/" + "d" * 40)  # 40 + 9 + 64: 6 bytes too long
    (problem,) = preflight.local_ray_problems()
    assert problem.message == "6 bytes too long for the Unix sockets a local Ray makes under it"
    fresh_ray_env.setenv("RAY_TMPDIR", "/tmp/" + "d" * 34)  # just fits
    assert preflight.local_ray_problems() == []


def test_a_read_only_home_where_ray_would_save_its_token_is_a_problem(
    fresh_ray_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A new local Ray saves an auth token at ~/.ray/auth_token: under a read-only HOME (a
    container's) the run ended in a traceback, `Read-only file system: '~/.ray'`."""
    with small_disk(tmp_path / "home", "1M", read_only=True) as home:
        fresh_ray_env.setenv("HOME", str(home))
        (problem,) = preflight.local_ray_problems()
        token = tmp_path / "token"
        token.write_text("a" * 64)
        fresh_ray_env.setenv("RAY_AUTH_TOKEN_PATH", str(token))  # the fix it names
        assert preflight.local_ray_problems() == []
    assert (problem.key, problem.value) == ("HOME", str(home))
    assert (
        problem.message == f"a new local Ray saves its auth token at {home}/.ray/auth_token, and {home} is not writable"
    )
    assert "RAY_AUTH_TOKEN_PATH to a file that holds a token" in problem.fix
