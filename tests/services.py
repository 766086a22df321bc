"""Real services for integration and e2e tests, started once per test run and shared by all its
pytest processes (`make test` runs several xdist workers):

* `ray_cluster`: a local Ray head started with `ray start --head --block` (its own temp dir,
  `ray_temp_dir`, and ports), stopped at the end of the run. Its Serve ingress is HAProxy, as on
  the clusters ptft starts (components/ingress.py).
* `run_prometheus`: a Prometheus server (Debian package `prometheus`) scraping that cluster with
  dashboards/prometheus.yml, pointed at the cluster's service discovery file (the e2e package's
  `prometheus` fixture).
* `postgres`: a throwaway PostgreSQL server (its own data dir under /tmp, 127.0.0.1 on a free port)
  with a `ptft` role owning an `mlflow` database; yields the SQLAlchemy URL of that database. Needs
  the server binaries (Debian package `postgresql`); when the tests run as root it runs as the
  `postgres` system user, since PostgreSQL refuses to run as root.
* `mlflow_server`: an `mlflow server` process on 127.0.0.1 backed by that PostgreSQL database, with
  proxied artifacts in a temp folder.

Each process connects to the cluster as its own driver (`ray_driver`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import yaml
from filelock import FileLock

from components import ingress
from components.net import free_port
from tests.conftest import REPO, TEST_HOME, system_tool, wait_until

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


# --- services shared by every pytest process of a run --------------------------------------------
# `make test` runs the tests in several pytest-xdist workers; they share one Ray cluster, one
# PostgreSQL and one MLflow server. The first worker to ask starts a service (under a file lock) and
# records it in the run's TEST_HOME; the controller stops every recorded service at the end
# (`stop_shared_services`). A plain `pytest` run is its own controller and works the same way.

SERVICES = TEST_HOME / "services"
_CHILDREN: dict[int, subprocess.Popen] = {}  # services this process started: it must reap them


def shared_service(name: str, start: Callable[[Path], dict]) -> dict:
    """The record `start(folder)` returned the first time a process of this run asked for `name`.

    A record holds what the tests use plus `pids` (process group leaders to stop, with the signal
    under `stop_signal`) and `folders` (to remove once they are stopped)."""
    SERVICES.mkdir(exist_ok=True)
    path = SERVICES / f"{name}.json"
    with FileLock(SERVICES / f"{name}.lock"):
        if not path.exists():
            record = start(SERVICES / name)
            record["started"] = time.time()
            path.write_text(json.dumps(record))
    return json.loads(path.read_text())


def stop_shared_services() -> None:
    """Stop what `shared_service` started, the last started first (MLflow before its PostgreSQL)."""
    records = [json.loads(path.read_text()) for path in SERVICES.glob("*.json")]
    for record in sorted(records, key=lambda record: record["started"], reverse=True):
        for pid in record["pids"]:
            _stop_group(pid, signal.Signals[record.get("stop_signal", "SIGTERM")])
        for folder in record.get("folders", []):
            shutil.rmtree(folder, ignore_errors=True)


def _spawn(command: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """A service process in its own process group (stopped as a group, outliving the worker)."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
    _CHILDREN[process.pid] = process
    return process


def stop_service(record: dict, first: signal.Signals = signal.SIGTERM) -> None:
    """Stop the processes of a service record (`start_mlflow`'s) that a test started for itself."""
    for pid in record["pids"]:
        _stop_group(pid, first)


def _stop_group(pid: int, first: signal.Signals = signal.SIGTERM, timeout_s: float = 60) -> None:
    """Signal a service's process group, then SIGKILL it if its leader is still there after timeout_s;
    then SIGKILL what is left of the session the service started (`_spawn`): processes that moved
    to process groups of their own. Ray's workers do, and the HAProxy a Serve actor starts stays in
    its actor's group: when the cluster is killed under it, it lives on, holding the Serve port
    (a later cluster's HAProxy then failed on 'Address already in use')."""
    try:
        _stop_leader_group(pid, first, timeout_s)
    finally:
        _kill_session(pid)


def _stop_leader_group(pid: int, first: signal.Signals, timeout_s: float) -> None:
    child = _CHILDREN.pop(pid, None)
    try:
        os.killpg(pid, first)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            return
        if child is None and not _exists(pid):  # started by a worker that has exited: init reaps it
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if child is not None:
        child.wait()


def _kill_session(session: int) -> None:
    """SIGKILL every process left in a session (the session's id is its first leader's pid)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getsid(int(entry)) == session:
                os.kill(int(entry), signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(process: subprocess.Popen, first: signal.Signals = signal.SIGTERM) -> None:
    _CHILDREN.setdefault(process.pid, process)
    _stop_group(process.pid, first)


def _start_ray(folder: Path, cpus: int | None = None, env: dict | None = None) -> dict:
    """A local Ray head (`ray start --head --block`) with its own temp dir and ports, `cpus`
    logical CPUs (RAY_CPUS by default) and `env` added to its environment."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ptft-ray-", dir="/tmp"))  # short: Ray's socket paths have a limit
    port, dashboard_port = free_port(), free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"} | (
        env or {}
    )
    # Serve's ingress as on the clusters ptft starts: HAProxy, its files removed with the temp dir.
    env.update(ingress.cluster_env(env, files=str(temp_dir)))
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--num-cpus={RAY_CPUS if cpus is None else cpus}",
        f"--temp-dir={temp_dir}",
        "--object-store-memory=600000000",
        "--include-dashboard=true",
        f"--dashboard-port={dashboard_port}",
        # Not the fixed default (52365): a second head on this machine (the suite's own, a user's)
        # had its job agent fail to bind, and every job submitted to it got `No available agent`.
        f"--dashboard-agent-listen-port={free_port()}",
        "--disable-usage-stats",
    ]
    log = temp_dir / "head.log"
    process = _spawn(command, log, env=env)
    address = f"127.0.0.1:{port}"
    status = [str(BIN / "ray"), "status", f"--address={address}"]
    try:
        _wait_for(
            lambda: subprocess.run(status, capture_output=True, timeout=30).returncode == 0, "ray head", process, log
        )
    except BaseException:
        _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    # Stopped with SIGKILL, its whole session: a throwaway cluster, and Ray's graceful stop of one
    # (SIGTERM to each of its processes in turn, a second's wait each) took 33 s, the last thing of
    # every `make test`.
    return {
        "address": address,
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
        "temp_dir": str(temp_dir),
        "pids": [process.pid],
        "folders": [str(temp_dir)],
        "stop_signal": "SIGKILL",
    }


# Logical CPUs of the shared cluster: more than the 2 cores, since the workers' modules share it
# (each asks for 1-2 CPUs for training and a fraction for Serve replicas, and mostly waits).
RAY_CPUS = 8


@pytest.fixture(scope="session")
def ray_cluster() -> str:
    """Address (host:port) of the run's real local Ray cluster."""
    return shared_service("ray", _start_ray)["address"]


@pytest.fixture(scope="session")
def ray_temp_dir(ray_cluster: str) -> Path:
    """The shared cluster's `--temp-dir`: its sessions and logs, and Ray's Prometheus service
    discovery file in its root."""
    return Path(shared_service("ray", _start_ray)["temp_dir"])


@pytest.fixture(scope="session")
def ray_driver(ray_cluster: str) -> Iterator[str]:
    """This test process connected to the shared cluster as a driver."""
    import ray

    env = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    # Not the job's workers' logs: an xdist worker runs unit tests after this, and a Ray actor's
    # traceback streamed into one of their captured stderrs failed its "no traceback" check.
    ray.init(address=ray_cluster, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        yield ray_cluster
    finally:
        ray.shutdown()


POSTGRES_PROGRAMS = ("initdb", "postgres", "psql")


def _postgres_bindir() -> Path:
    """The folder holding PostgreSQL's server programs: `pg_config --bindir`, else the newest
    /usr/lib/postgresql/<version>/bin (Debian's layout, not on PATH), else wherever PATH has initdb."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30)
            if result.returncode == 0 and result.stdout.strip():
                candidates.append(Path(result.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass

    def version(bindir: Path) -> list[int]:
        return [int(part) for part in re.findall(r"\d+", bindir.parent.name)]

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if all(os.access(bindir / program, os.X_OK) for program in POSTGRES_PROGRAMS):
            return bindir
    raise RuntimeError(
        f"PostgreSQL server programs ({', '.join(POSTGRES_PROGRAMS)}) not found: looked in `pg_config --bindir`, "
        "/usr/lib/postgresql/*/bin and PATH. The MLflow test server needs them; on Debian/Ubuntu install the "
        "`postgresql` package (`apt-get install postgresql`)."
    )


def _postgres_user() -> dict:
    """Popen arguments that run a PostgreSQL program as the `postgres` system user when this process is
    root (PostgreSQL refuses to run as root); nothing otherwise."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError(
            "the tests run as root, PostgreSQL refuses to, and there is no `postgres` system user to run it as: "
            "install the Debian package `postgresql` (it creates the user) or run the tests as a regular user"
        ) from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def start_postgres(_: Path) -> dict:
    """A throwaway PostgreSQL server (durability off: fsync and synchronous commit are pointless
    for it) with a `ptft` role owning an `mlflow` database."""
    bindir = _postgres_bindir()
    as_postgres = _postgres_user()
    # Not under pytest's temp root: that is private to the user running pytest, and the server may
    # run as another user. The folder is the data dir's parent, the unix socket dir and the log's home.
    folder = Path(tempfile.mkdtemp(prefix="ptft-postgres-", dir="/tmp"))
    if as_postgres:
        os.chown(folder, as_postgres["user"], as_postgres["group"])
    data, log, port, password = folder / "data", folder / "server.log", free_port(), secrets.token_hex(16)
    process = None
    try:
        initdb = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=300,
            **as_postgres,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb exited with {initdb.returncode}:\n{(initdb.stdout + initdb.stderr)[-3000:]}")
        command = [
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(folder),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "password_encryption=scram-sha-256",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]
        process = _spawn(command, log, cwd=folder, **as_postgres)
        # Administration over the unix socket, where the superuser is trusted; clients use TCP and a password.
        psql = [
            str(bindir / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(folder),
            "-p",
            str(port),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ]
        _wait_for(
            lambda: subprocess.run([*psql, "-c", "SELECT 1"], capture_output=True, timeout=30).returncode == 0,
            "postgres",
            process,
            log,
        )
        setup = subprocess.run(
            psql,
            input=f"CREATE ROLE ptft LOGIN PASSWORD '{password}';\nCREATE DATABASE mlflow OWNER ptft;\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        if setup.returncode != 0:
            raise RuntimeError(f"creating the ptft role and mlflow database failed:\n{setup.stderr[-3000:]}")
    except BaseException:
        if process is not None:
            _stop(process)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    # SIGINT is PostgreSQL's fast shutdown: roll back open transactions, checkpoint, exit.
    return {
        "url": f"postgresql+psycopg2://ptft:{password}@127.0.0.1:{port}/mlflow",
        "pids": [process.pid],
        "stop_signal": "SIGINT",
        "folders": [str(folder)],
        "restart": {"command": command, "cwd": str(folder), "as": as_postgres},
    }


def start_postgres_again(record: dict) -> dict:
    """The stopped server of a `start_postgres` record, started again on its data dir and port."""
    import sqlalchemy

    restart = record["restart"]
    log = Path(restart["cwd"]) / f"server-{time.time_ns()}.log"
    process = _spawn(restart["command"], log, cwd=restart["cwd"], **restart["as"])
    engine = sqlalchemy.create_engine(record["url"])
    try:
        _wait_for(lambda: engine.connect().close() is None, "postgres", process, log)
    finally:
        engine.dispose()
    return {**record, "pids": [process.pid]}


@pytest.fixture(scope="session")
def postgres() -> str:
    """SQLAlchemy URL (`postgresql+psycopg2://ptft:...@127.0.0.1:PORT/mlflow`) of a database owned by
    the `ptft` role on the run's real PostgreSQL server."""
    return shared_service("postgres", start_postgres)["url"]


def start_mlflow(folder: Path, backend_store_uri: str, port: int | None = None) -> dict:
    """An `mlflow server` process on 127.0.0.1 (on `port`, else a free one) with proxied artifacts
    in `folder`; stop it with `stop_service`."""
    folder.mkdir(parents=True, exist_ok=True)
    port, log = port or free_port(), folder / "server.log"
    command = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # No job runner: MLflow 3's server starts seven huey consumer processes for GenAI jobs the
    # tests never use, each importing MLflow, beside the tests on two cores.
    process = _spawn(command, log, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: requests.get(f"{uri}/health", timeout=2).ok, "mlflow server", process, log)
    except BaseException:
        _stop(process)
        raise
    return {"uri": uri, "pids": [process.pid]}


@pytest.fixture(scope="session")
def mlflow_server(postgres: str) -> str:
    """Tracking URI of the run's real `mlflow server` process, backed by the `postgres` database."""
    return shared_service("mlflow", lambda folder: start_mlflow(folder, postgres))["uri"]


PROMETHEUS_CONFIG = REPO / "dashboards" / "prometheus.yml"
SERVICE_DISCOVERY_FILE = "prom_metrics_service_discovery.json"  # Ray writes it in its temp dir's root


def prometheus_config(config: dict, service_discovery_file: Path) -> dict:
    """dashboards/prometheus.yml as the tests run it: the same jobs and intervals, the test
    cluster's service discovery file. Its 10 s scrape matches Ray's 10 s refresh: scraping every
    2 s saw no new values, and the metrics agent's exporter thread spent 15-20% of a core on it
    for as long as the e2e package ran (its CPU time, measured in a 4-worker `make test`)."""
    jobs = []
    for job in config["scrape_configs"]:
        sd_configs = [{**sd, "files": [str(service_discovery_file)]} for sd in job.get("file_sd_configs", [])]
        jobs.append({**job, "file_sd_configs": sd_configs} if sd_configs else job)
    return {**config, "scrape_configs": jobs}


def _scraping(url: str) -> bool:
    """Prometheus has scraped at least one of the cluster's targets successfully."""
    targets = requests.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    return any(target["health"] == "up" for target in targets)


def run_prometheus(ray_temp_dir: Path, folder: Path) -> Iterator[str]:
    """URL of a real Prometheus server scraping the shared Ray cluster (every node's metrics
    endpoint, found through Ray's service discovery file), stopped when the generator closes.
    The fixture lives in tests/e2e/conftest.py: only the e2e package needs it, and scraping every
    2 s costs the integration tier CPU it should not pay."""
    binary = system_tool("prometheus", "prometheus")
    discovery = ray_temp_dir / SERVICE_DISCOVERY_FILE
    # The head's dashboard writes the file a few seconds after `ray status` first answers.
    wait_until(discovery.is_file, f"Ray's service discovery file {discovery}", timeout_s=120, poll_s=0.5)
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(yaml.safe_load(PROMETHEUS_CONFIG.read_text()), discovery)))
    port, log = free_port(), folder / "prometheus.log"
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: requests.get(f"{url}/-/ready", timeout=2).ok, "prometheus", process, log)
        _wait_for(lambda: _scraping(url), "prometheus scraping the Ray cluster", process, log, timeout_s=120)
        yield url
    finally:
        _stop(process)
