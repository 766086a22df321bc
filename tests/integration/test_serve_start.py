"""Serve starts on a Ray of its own although its controller replaces the ingress `serve.start`
waits on (components/serve.py `start`), and the application then answers over HTTP; and under a
low open-file limit. A port taken since the run's pre-flight is named with what holds it."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile

import pytest

from components import ingress
from components.net import free_port
from tests.conftest import REPO

pytestmark = pytest.mark.integration

# A local Ray with Serve's ingress as the runner sets it up, an application, and a wait for its answer.
_SERVE_HELLO = """
import glob, os, sys, time
import ray, requests
from ray import serve
from components import ingress, serve as ptft_serve
from components.schemas import ServeConfig

os.environ.update(ingress.local_cluster_env())  # as the runner does for the cluster it starts
print(f"MAXCONN {os.environ.get(ingress.MAXCONN)}", flush=True)
files = os.path.dirname(os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"])
print(f"FILES {files}", flush=True)
ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[2])
cfg = ServeConfig(port=int(sys.argv[1]))
ptft_serve.start(cfg)

@serve.deployment
def hello(request):
    return "hello"

serve.run(hello.bind(), name="hello", route_prefix="/hello")
deadline = time.monotonic() + 420
while time.monotonic() < deadline:
    try:
        if requests.get(f"http://127.0.0.1:{cfg.port}/hello", timeout=2).text == "hello":
            print("ANSWERED")
            print(f"SOCKETS {len(glob.glob(os.path.join(files, '*', 'admin.sock')))}")
            break
    except requests.RequestException:
        pass
    time.sleep(0.5)
serve.shutdown()
"""


def _on_a_ray_of_its_own(
    script: str, port: int, timeout_s: float, files: int | None = None, **env: str
) -> subprocess.CompletedProcess:
    """`script` run with its Serve port and a temp dir for the local Ray it starts (argv 1 and 2),
    under an open-file limit of `files` if given."""
    environ = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    environ.update(ingress.cluster_env(environ), **env)
    temp_dir = tempfile.mkdtemp(prefix="ptft-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
    try:
        return subprocess.run(
            [sys.executable, "-c", script, str(port), temp_dir],
            cwd=REPO,
            env=environ,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))) if files else None,
        )
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_serve_starts_although_the_controller_replaces_a_slow_ingress() -> None:
    """A controller that replaces an ingress not ready within 3 x 0.5 s: the first `serve.start`
    failed with the replaced actor's death, as it once did in CI on the shared cluster. Ray replaces
    ingresses until one is ready within (replacements + 1) x 0.5 s per check: 35 s to an answer on
    an idle 2-core machine, 163 s during a whole suite run; hence the 7-minute wait."""
    # An ingress takes longer than 3 x 0.5 s to start: the first one is replaced.
    done = _on_a_ray_of_its_own(_SERVE_HELLO, free_port(), 540, **{ingress.READY: "0.5"})
    assert "marking it unhealthy" in done.stdout + done.stderr, done.stderr[-3000:]  # the case happened
    assert done.returncode == 0 and "ANSWERED" in done.stdout, done.stderr[-3000:]
    _haproxy_files_were_the_cluster_s_own(done)


def test_serve_answers_under_an_open_file_limit_lower_than_haproxy_asks_for() -> None:
    """HAProxy raises its open-file limit to what Ray's `maxconn` 4096 needs (10,276) and exited
    at start under `ulimit -n 256`: the serve stage failed after the whole training."""
    done = _on_a_ray_of_its_own(_SERVE_HELLO, free_port(), 300, files=256)
    assert "MAXCONN 62" in done.stdout, done.stdout + done.stderr[-3000:]
    assert done.returncode == 0 and "ANSWERED" in done.stdout, done.stderr[-3000:]
    assert "Cannot raise FD limit" not in done.stderr
    _haproxy_files_were_the_cluster_s_own(done)


def _haproxy_files_were_the_cluster_s_own(done: subprocess.CompletedProcess) -> None:
    """HAProxy's files were in the folder the cluster was given, not Ray's shared /tmp/haproxy-serve
    (one folder left behind per cluster), and the folder went when the process exited."""
    files = re.search(r"^FILES (\S+)$", done.stdout, re.MULTILINE)[1]
    assert files.startswith("/tmp/ptft-hap-"), files
    assert "SOCKETS 1" in done.stdout, done.stdout  # HAProxy's admin socket, under the node's id
    assert not os.path.exists(files)


# Serve's port taken after the run's pre-flight found it free: two runs on one machine, the other
# reached its serve stage first. HAProxy's bind fails inside Serve's ingress actor.
_PORT_TAKEN = """
import os, socket, sys
import ray
from components import ingress, serve as ptft_serve
from components.schemas import ServeConfig
from components.stage import StageFailure

os.environ.update(ingress.local_cluster_env())
ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[2])
taken = socket.socket()
taken.bind(("127.0.0.1", int(sys.argv[1])))
taken.listen()
print(f"PID {os.getpid()}", flush=True)
try:
    ptft_serve.start(ServeConfig(port=int(sys.argv[1])))
    print("NOT REFUSED")
except StageFailure as error:
    print(f"REFUSED: {error}")
"""


def test_a_serve_port_taken_since_the_pre_flight_is_named_with_what_holds_it() -> None:
    """Before: HAProxy's `cannot bind socket (Address already in use)` in a 70-line traceback at
    the end of a run that had trained everything."""
    port = free_port()
    done = _on_a_ray_of_its_own(_PORT_TAKEN, port, 300)
    assert done.returncode == 0, done.stderr[-3000:]
    pid = re.search(r"^PID (\d+)$", done.stdout, re.MULTILINE)[1]
    refused = f"REFUSED: Serve cannot listen on 127.0.0.1:{port}: 127.0.0.1:{port} is in use by pid {pid} (python"
    assert refused in done.stdout, done.stdout + done.stderr[-3000:]
    assert "Fix: stop what listens there and continue with the `ptft resume` above" in done.stdout
