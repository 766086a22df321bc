"""The local cluster that ptft starts. Listening beyond loopback, it keeps Ray's token auth: its
dashboard (and with it the job and state APIs) refuses a request without the token. Ray turns token
auth on for a new local cluster unless RAY_AUTH_MODE says otherwise; ptft refuses `disabled` there
(tests/unit/test_cli_validate.py), and this test holds Ray to the rest. And a run checks what it
asks for against that cluster's CPUs, as it does on a cluster of its own (a run asking for more
workers than the local CPUs waited at step 0 without end)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

# A process of its own: the driver of this pytest process is already connected to the shared cluster,
# and Ray reads RAY_AUTH_MODE when it is imported.
SCRIPT = """
import os, socket, sys
import ray, requests
from pipelines import runner
from pipelines.pipeline_config import ConfigError, validate
from tests.conftest import tiny_config_dict

raw = {**tiny_config_dict(sys.argv[1]), "ray": {"num_cpus": 1, "dashboard_host": "0.0.0.0"}}
runner._init_ray(validate(raw, check_data=False))
url = "http://" + ray._private.worker._global_node.webui_url
token = open(os.environ["RAY_AUTH_TOKEN_PATH"]).read().strip()
for path in ("/api/version", "/api/jobs/"):
    without = requests.get(url + path, timeout=30)
    with_token = requests.get(url + path, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    print(path, without.status_code, with_token.status_code)
print("listening on", url)
held = socket.create_server(("127.0.0.1", 0))  # what else listens on serve.port
port = held.getsockname()[1]
wide = validate({**raw, "pretrain": {"workers": {"num_workers": 2}}, "serve": {"port": port}}, check_data=False)
try:
    runner._preflight(wide)
except ConfigError as error:
    print("PREFLIGHT", *error.problems, sep="\\n")
from components.serve import ModelInfo
from pipelines import cli
served = validate({**raw, "serve": {"num_replicas": 3}}, check_data=False)
try:
    cli._serve_until_stopped(served, ModelInfo(name="m", version="1", model_uri="/nowhere"), None)
except ConfigError as error:
    print("SERVE", *error.problems, sep="\\n")
ray.shutdown()
"""


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What the script printed about the local cluster it had ptft start (1 CPU)."""
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    storage = tmp_path_factory.mktemp("local-cluster") / "storage"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(storage)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_a_local_cluster_beyond_loopback_refuses_requests_without_the_token(local_cluster: str) -> None:
    assert "token auth" in local_cluster  # ptft says so, and where the token comes from
    assert "/api/version 401 200" in local_cluster and "/api/jobs/ 401 200" in local_cluster, local_cluster
    assert "listening on http://127.0.0.1" not in local_cluster  # bound beyond loopback


def test_a_run_on_the_local_cluster_checks_its_workers_against_the_cpus(local_cluster: str) -> None:
    assert "PREFLIGHT\n  - pretrain.workers.num_workers = 2: 2 workers x 1 CPU = 2 CPU, the cluster has 1" in (
        local_cluster
    ), local_cluster


def test_a_run_on_the_local_cluster_checks_that_serve_port_is_free(local_cluster: str) -> None:
    """Serve's ingress failed to bind it, and the serve stage with it, after the training."""
    in_use = r"\n  - serve.port = (\d+): 127.0.0.1:\1 is in use( by pid \d+ \([^)]*\))?\. Fix: stop what listens there"
    assert re.search(in_use, local_cluster), local_cluster


def test_ptft_serve_checks_its_replicas_against_the_cpus_before_it_deploys(local_cluster: str) -> None:
    """A local serve of a folder never rolls over: the replicas alone must fit (3 x 0.5 CPU > 1)."""
    assert "SERVE\n  - serve.num_replicas = 3: 3 replica(s) of 0.5 CPU need 1.5 CPUs; the cluster has 1" in (
        local_cluster
    ), local_cluster
