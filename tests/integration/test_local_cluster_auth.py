"""A local cluster that ptft starts listening beyond loopback keeps Ray's token auth: its dashboard
(and with it the job and state APIs) refuses a request without the token. Ray turns token auth on
for a new local cluster unless RAY_AUTH_MODE says otherwise; ptft refuses `disabled` there
(tests/unit/test_cli_validate.py), and this test holds Ray to the rest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

# A process of its own: the driver of this pytest process is already connected to the shared cluster,
# and Ray reads RAY_AUTH_MODE when it is imported.
SCRIPT = """
import os, sys
import ray, requests
from pipelines import runner
from pipelines.pipeline_config import validate
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
ray.shutdown()
"""


def test_a_local_cluster_beyond_loopback_refuses_requests_without_the_token(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "storage")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "token auth" in result.stdout  # ptft says so, and where the token comes from
    assert "/api/version 401 200" in result.stdout and "/api/jobs/ 401 200" in result.stdout, result.stdout
    assert "listening on http://127.0.0.1" not in result.stdout  # bound beyond loopback
