"""Stopping what ptft and its tests start (the tests' services, `cluster/local-cluster.sh stop`)
ends the whole session, not only the leader's process group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

from tests import services
from tests.conftest import REPO, wait_until

# A service whose child moves to a process group of its own, as Ray's workers and the HAProxy of a
# Serve actor do; it prints its own pid and the child's.
LEAVES_ITS_GROUP = """
import os, sys, time
child = os.fork()
if child == 0:
    os.setpgrp()
    time.sleep(600)
    sys.exit()
print(os.getpid(), child, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # killed, not yet reaped
    except psutil.NoSuchProcess:
        return True


def test_stopping_a_service_ends_the_processes_that_left_its_group(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    leader = services._spawn([sys.executable, "-c", LEAVES_ITS_GROUP], log)
    _, child = map(int, wait_until(lambda: log.read_text().split(), "the pids", timeout_s=30))
    assert psutil.Process(child).status() != psutil.STATUS_ZOMBIE
    services._stop_group(leader.pid)
    assert _gone(leader.pid)
    wait_until(lambda: _gone(child), "the child killed (SIGKILL is delivered, not awaited)", timeout_s=10)


def test_local_cluster_stop_ends_the_processes_that_left_a_node_s_group(tmp_path: Path) -> None:
    """The script's `stop` on a node it recorded (a pid file), here a stand-in for `ray start`."""
    log, script = tmp_path / "node.log", REPO / "cluster" / "local-cluster.sh"
    # Started as the script starts a node: setsid, in the background of a shell that exits (so init
    # reaps it, and `stop` does not wait for a zombie of this test's).
    log.touch()
    subprocess.run(["bash", "-c", f'setsid {sys.executable} -c "$0" > {log} &', LEAVES_ITS_GROUP], check=True)
    leader, child = map(int, wait_until(lambda: log.read_text().split(), "the pids", timeout_s=30))
    (tmp_path / "head.pid").write_text(str(leader))
    env = {**os.environ, "PTFT_CLUSTER_DIR": str(tmp_path), "PYTHON": sys.executable}
    stopped = subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True, text=True, timeout=90)
    assert stopped.returncode == 0 and f"stopped nodes {leader}" in stopped.stdout, stopped.stdout + stopped.stderr
    assert _gone(leader)
    wait_until(lambda: _gone(child), "the child killed", timeout_s=10)
