"""One driver per run (pipelines/driver_lock.py), with real processes as owners: a live one keeps
the run, a dead one's lock is taken over, a reused pid is not mistaken for the owner."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipelines import manifest as mf
from pipelines.driver_lock import LOCK_NAME, STALE_S, DriverLock
from pipelines.pipeline_config import ConfigError, resolved_dict, validate
from tests.conftest import REPO, tiny_config_dict

PTFT = str(Path(sys.executable).with_name("ptft"))


def _lock_for(folder: Path, pid: int, *, host: str | None = None, started_at: float | None = None, beat: float = 0):
    folder.mkdir(parents=True, exist_ok=True)
    owner = {
        "host": host or socket.gethostname(),
        "pid": pid,
        "started_at": psutil.Process(pid).create_time() if started_at is None else started_at,
        "heartbeat_at": time.time() - beat,
    }
    (folder / LOCK_NAME).write_text(json.dumps(owner))


@pytest.fixture
def other_driver():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


def test_a_live_driver_keeps_its_run(tmp_path: Path, other_driver: subprocess.Popen) -> None:
    _lock_for(tmp_path, other_driver.pid)
    with pytest.raises(ConfigError, match=f"another driver runs it: pid {other_driver.pid} on"):
        DriverLock.acquire(tmp_path, "r1")


def test_a_dead_drivers_lock_is_taken_over_and_released(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(gone.pid).create_time()
    gone.wait()
    _lock_for(tmp_path, gone.pid, started_at=started)
    lock = DriverLock.acquire(tmp_path, "r1")
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(ConfigError):  # held now: a second acquire in this process is refused too
        DriverLock.acquire(tmp_path, "r1")
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_reused_pid_is_not_the_owner(tmp_path: Path, other_driver: subprocess.Popen) -> None:
    # The pid lives, but it started after the owner did: another process got the dead owner's pid.
    _lock_for(tmp_path, other_driver.pid, started_at=psutil.Process(other_driver.pid).create_time() - 3600)
    DriverLock.acquire(tmp_path, "r1").release()


def test_on_another_host_the_heartbeat_decides(tmp_path: Path) -> None:
    _lock_for(tmp_path, 1, host="elsewhere", started_at=0.0, beat=5)
    with pytest.raises(ConfigError, match="pid 1 on elsewhere"):
        DriverLock.acquire(tmp_path, "r1")
    _lock_for(tmp_path, 1, host="elsewhere", started_at=0.0, beat=STALE_S + 1)
    DriverLock.acquire(tmp_path, "r1").release()


def test_a_second_resume_exits_2_naming_the_driver(tmp_path: Path, other_driver: subprocess.Popen) -> None:
    storage = tmp_path / "store"
    config = validate(tiny_config_dict(storage))
    manifest = mf.Manifest.create(storage, "run-a", "unit", ("tokenize",), resolved_dict(config))
    _lock_for(mf.Manifest.folder(storage, "run-a"), other_driver.pid)
    done = subprocess.run(
        [PTFT, "resume", "run-a", "--storage", str(storage)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"another driver runs it: pid {other_driver.pid}" in done.stderr
    assert "Traceback" not in done.stderr
    after = mf.Manifest.load(storage, "run-a")
    assert after.attempts == manifest.attempts and after.status == manifest.status  # untouched
