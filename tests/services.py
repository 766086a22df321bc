"""Real services for integration and e2e tests, started once per session and shared:

* `ray_cluster`: a local Ray head started with `ray start --head --block` (its own temp dir,
  `ray_temp_dir`, and ports), stopped at the end of the session.
* `run_prometheus`: a Prometheus server (Debian package `prometheus`) scraping that cluster with
  dashboards/prometheus.yml, pointed at the cluster's service discovery file (the e2e package's
  `prometheus` fixture).
* `postgres`: a throwaway PostgreSQL server (its own data dir under /tmp, 127.0.0.1 on a free port)
  with a `ptft` role owning an `mlflow` database; yields the SQLAlchemy URL of that database. Needs
  the server binaries (Debian package `postgresql`); when the tests run as root it runs as the
  `postgres` system user, since PostgreSQL refuses to run as root.
* `mlflow_server`: an `mlflow server` process on 127.0.0.1 backed by that PostgreSQL database, with
  proxied artifacts in a temp folder.
"""

from __future__ import annotations

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
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from components.training import free_port
from tests.conftest import REPO, system_tool, wait_until

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
def ray_temp_dir() -> Iterator[Path]:
    """The shared cluster's `--temp-dir`: its sessions and logs, and Ray's Prometheus service
    discovery file in its root."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ptft-ray-", dir="/tmp"))
    try:
        yield temp_dir
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(ray_temp_dir: Path) -> Iterator[str]:
    """Address (host:port) of a real local Ray cluster: 4 logical CPUs on this 2-core machine so a
    training stage and a Serve replica fit together."""
    temp_dir = ray_temp_dir
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


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """SQLAlchemy URL (`postgresql+psycopg2://ptft:...@127.0.0.1:PORT/mlflow`) of a database owned by
    the `ptft` role on a real PostgreSQL server started for this session (durability off: fsync and
    synchronous commit are pointless for a throwaway store)."""
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
        initdb = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                                 "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"],
                                cwd=folder, capture_output=True, text=True, timeout=300, **as_postgres)  # fmt: skip
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb exited with {initdb.returncode}:\n{(initdb.stdout + initdb.stderr)[-3000:]}")
        command = [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(folder),
                   "-c", "listen_addresses=127.0.0.1", "-c", "password_encryption=scram-sha-256",
                   "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]  # fmt: skip
        with open(log, "w") as out:
            process = subprocess.Popen(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True, **as_postgres)  # fmt: skip
        # Administration over the unix socket, where the superuser is trusted; clients use TCP and a password.
        psql = [str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(folder), "-p", str(port),
                "-U", "postgres", "-d", "postgres"]  # fmt: skip
        _wait_for(lambda: subprocess.run([*psql, "-c", "SELECT 1"], capture_output=True, timeout=30).returncode == 0,
                  "postgres", process, log)  # fmt: skip
        setup = subprocess.run(psql, input=f"CREATE ROLE ptft LOGIN PASSWORD '{password}';\n"
                                           "CREATE DATABASE mlflow OWNER ptft;\n",
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        if setup.returncode != 0:
            raise RuntimeError(f"creating the ptft role and mlflow database failed:\n{setup.stderr[-3000:]}")
        yield f"postgresql+psycopg2://ptft:{password}@127.0.0.1:{port}/mlflow"
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)  # fast shutdown: roll back open transactions, checkpoint, exit
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _stop(process)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tracking URI of a real `mlflow server` process whose backend store is the `postgres` database."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = folder / "server.log"
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", postgres,
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


PROMETHEUS_CONFIG = REPO / "dashboards" / "prometheus.yml"
SERVICE_DISCOVERY_FILE = "prom_metrics_service_discovery.json"  # Ray writes it in its temp dir's root
SCRAPE_INTERVAL = "2s"


def prometheus_config(config: dict, service_discovery_file: Path) -> dict:
    """dashboards/prometheus.yml as the tests run it: the same jobs, the test cluster's service
    discovery file, a short scrape interval (a demo run lasts minutes, not hours)."""
    config = {**config, "global": {**config.get("global", {}), "scrape_interval": SCRAPE_INTERVAL,
                                   "evaluation_interval": SCRAPE_INTERVAL}}  # fmt: skip
    jobs = []
    for job in config["scrape_configs"]:
        sd_configs = [{**sd, "files": [str(service_discovery_file)]} for sd in job.get("file_sd_configs", [])]
        jobs.append({**job, "file_sd_configs": sd_configs} if sd_configs else job)
    config["scrape_configs"] = jobs
    return config


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
    command = [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
               f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: requests.get(f"{url}/-/ready", timeout=2).ok, "prometheus", process, log)
        _wait_for(lambda: _scraping(url), "prometheus scraping the Ray cluster", process, log, timeout_s=120)
        yield url
    finally:
        _stop(process)
