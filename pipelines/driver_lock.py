"""One driver per pipeline run: `runs/RUN_ID/driver.lock` names the process driving it.

Two drivers of one run (two `ptft resume`, or `ptft sweep --resume` beside a live sweep) would
end each other's MLflow runs as orphans and write one manifest. So a driver takes the lock before
it touches the run, and keeps a heartbeat in it while it runs. A second driver exits 2 naming
the owner. A lock whose owner is gone is taken over: on this host, the owner's process (pid and
start time, so a reused pid does not count) no longer exists; on another host, its heartbeat is
older than `STALE_S`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from pipelines.pipeline_config import ConfigError, Problem

LOCK_NAME = "driver.lock"
HEARTBEAT_S = 10
STALE_S = 6 * HEARTBEAT_S


@dataclass
class Owner:
    host: str
    pid: int
    started_at: float  # the process's start time: a pid reused by another process is not the owner
    heartbeat_at: float

    @staticmethod
    def this_process() -> Owner:
        now = time.time()
        return Owner(socket.gethostname(), os.getpid(), psutil.Process().create_time(), now)

    def alive(self) -> bool:
        if self.host != socket.gethostname():
            return time.time() - self.heartbeat_at < STALE_S
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started_at) < 1.0
        except psutil.Error:  # no such process (or not ours to see: then not a ptft driver of ours)
            return False

    def describe(self) -> str:
        beat = time.time() - self.heartbeat_at
        return f"pid {self.pid} on {self.host} (heartbeat {beat:.0f} s ago)"


class DriverLock:
    """Held by this process for one run; `release` (or the process's end) gives it up."""

    def __init__(self, path: Path, owner: Owner):
        self.path, self.owner = path, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="ptft-driver-lock", daemon=True)

    @classmethod
    def acquire(cls, run_folder: Path, run_id: str) -> DriverLock:
        """The run's lock, or ConfigError naming the live driver that holds it."""
        path = run_folder / LOCK_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after removing a dead owner's lock
            owner = Owner.this_process()
            written = path.with_suffix(f".{owner.pid}.tmp")
            written.write_text(json.dumps(asdict(owner)))
            try:
                os.link(written, path)  # creates the lock with its content at once, or fails if it exists
            except FileExistsError:
                written.unlink(missing_ok=True)
                holder = _read(path)
                if holder is not None and holder.alive():
                    why = f"another driver runs it: {holder.describe()}"
                    fix = "wait for it to end, or stop it first (ptft stop JOB, or kill the pid)"
                    raise ConfigError(f"run {run_id}", [Problem("RUN_ID", run_id, why, fix)]) from None
                _take_over(path, holder)
                continue
            written.unlink(missing_ok=True)
            lock = cls(path, owner)
            lock._thread.start()
            return lock
        raise ConfigError(f"run {run_id}", [Problem("RUN_ID", run_id, "its lock changed hands meanwhile", "try again")])

    def release(self) -> None:
        self._stop.set()
        holder = _read(self.path)
        if holder is not None and (holder.host, holder.pid) == (self.owner.host, self.owner.pid):
            self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.owner.heartbeat_at = time.time()
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(asdict(self.owner)))
            tmp.replace(self.path)


def driver_gone(run_folder: Path) -> str | None:
    """Why a run recorded as running has no live driver (SIGKILLed, out of memory, its terminal
    closed, the machine restarted), or None while its driver lives. A driver releases its lock only
    once it has recorded how the run ended."""
    holder = _read(run_folder / LOCK_NAME)
    if holder is None:
        return "no driver holds its lock"
    return None if holder.alive() else f"its driver, {holder.describe()}, is gone"


def last_seen(run_folder: Path) -> float | None:
    """When the run's driver last showed it lived: its lock's heartbeat, else the run's last
    manifest write (a driver killed before it took its lock), or None when neither is there."""
    holder = _read(run_folder / LOCK_NAME)
    if holder is not None:
        return holder.heartbeat_at
    try:
        return (run_folder / "manifest.json").stat().st_mtime
    except OSError:
        return None


def _read(path: Path) -> Owner | None:
    try:
        return Owner(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # gone, or half-written by a driver killed while writing: not a live owner


def _take_over(path: Path, dead: Owner | None) -> None:
    import logging

    what = dead.describe() if dead else "an unreadable lock"
    logging.getLogger(__name__).warning("taking over the run's lock from a driver that is gone: %s", what)
    path.unlink(missing_ok=True)
