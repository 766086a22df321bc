"""A stop is recorded the moment SIGTERM arrives (pipelines/stopping.py), with a real driver-like
process whose main thread is stuck in native code and a real MLflow store: the manifest and the
MLflow runs say KILLED before the SIGKILL that ends the grace period."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines import manifest as mf
from tests.conftest import REPO, answers_ctrl_c, wait_until

# A driver in a stage: its main thread is in native code with the GIL released (as in a tokenizer's
# training loop or a blocking Ray call), so the Python-level SIGTERM handler cannot run.
DRIVER = textwrap.dedent(
    """
    import hashlib, signal, sys
    from pathlib import Path
    from mlflow import MlflowClient
    from pipelines import manifest as mf, stopping
    from pipelines.runner import _record_stop

    storage, uri, signum = Path(sys.argv[1]), sys.argv[2], signal.Signals[sys.argv[3]]
    client = MlflowClient(uri)
    experiment = client.create_experiment("stop", artifact_location=str(storage / "artifacts"))
    manifest = mf.Manifest.create(storage, "run-1", "unit", ("tokenize", "pretrain"), {"name": "unit"})
    manifest.mlflow_run_id = client.create_run(experiment).info.run_id
    manifest.stage_started("tokenize", "k0", client.create_run(experiment).info.run_id)
    signal.signal(signum, lambda *_: sys.exit(signum))  # what ray.init sets for SIGTERM, the CLI for both
    with stopping.record_stop_at_once(lambda why: _record_stop(manifest, uri, why)):
        print("in the stage", flush=True)
        hashlib.pbkdf2_hmac("sha256", b"p", b"s", 2**31 - 1)  # minutes in C, the GIL released
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])  # a stop, a closed terminal
def test_a_stop_is_recorded_while_the_main_thread_is_stuck_in_native_code(tmp_path: Path, signum: int) -> None:
    storage, uri = tmp_path / "storage", f"sqlite:///{tmp_path / 'mlflow.db'}"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(storage), uri, signal.Signals(signum).name],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert driver.stdout.readline().strip() == "in the stage"
        time.sleep(1)  # into the native call
        driver.send_signal(signum)
        manifest_path = mf.Manifest.folder(storage, "run-1") / "manifest.json"
        deadline = time.monotonic() + 60
        while json.loads(manifest_path.read_text())["status"] != mf.KILLED:
            assert time.monotonic() < deadline, manifest_path.read_text()
            assert driver.poll() is None, "the driver ended: its main thread was not stuck after all"
            time.sleep(0.2)
        time.sleep(1)  # the MLflow runs are ended after the manifest
        assert driver.poll() is None  # still inside the native call: the record did not wait for it
    finally:
        driver.kill()  # the SIGKILL at the end of the grace period
        driver.wait()
    manifest = json.loads(manifest_path.read_text())
    assert manifest["stages"]["tokenize"]["status"] == mf.KILLED
    assert manifest["stages"]["tokenize"]["error"] == f"stopped ({signal.Signals(signum).name})"
    assert manifest["stages"]["pretrain"]["status"] == mf.PENDING
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("stop").experiment_id])
    assert sorted(run.info.status for run in runs) == ["KILLED", "KILLED"]


def test_the_signal_handlers_from_before_a_training_run_are_put_back() -> None:
    """Ray Train and Tune install SIGINT and SIGUSR1 handlers in the main thread and leave them
    installed; a Ctrl-C in a later stage must not go to a run that has ended."""
    from components.training import signal_handlers_kept

    def ours(signum, frame) -> None:
        raise KeyboardInterrupt

    def theirs(signum, frame) -> None:
        pass

    kept = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGUSR1)}
    signal.signal(signal.SIGINT, ours)
    try:
        with signal_handlers_kept():
            signal.signal(signal.SIGINT, theirs)  # as Ray Train's fit and Tune's run do
            signal.signal(signal.SIGUSR1, theirs)
        assert signal.getsignal(signal.SIGINT) is ours
        assert signal.getsignal(signal.SIGUSR1) is kept[signal.SIGUSR1]
    finally:
        for number, handler in kept.items():
            signal.signal(number, handler)


# `ptft run --keep-serving` waiting for Ctrl-C after `ray.init`, whose threads (as here) do not block
# SIGINT: the kernel may hand the signal to one of them, and a main thread asleep in one long
# `time.sleep` then slept on for up to an hour.
KEEP_SERVING = textwrap.dedent(
    """
    import threading, time
    from pipelines import cli

    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
    cli._wait_forever()
    print("stopped", flush=True)
    """
)


SYS_TGKILL = {"x86_64": 234, "aarch64": 131}[platform.machine()]


def _tgkill(pid: int, thread_id: int, signum: int) -> None:
    """Send `signum` to one thread of process `pid` (what the kernel may do with a process's signal)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL, pid, thread_id, signum) != 0:
        raise OSError(ctypes.get_errno(), "tgkill")


def _another_thread_taking(pid: int, signum: int) -> int:
    """A thread of `pid` other than its main thread that does not block `signum`."""
    for task in sorted(int(name) for name in os.listdir(f"/proc/{pid}/task")):
        status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        blocked = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
        if task != pid and not blocked & (1 << (signum - 1)):
            return task
    raise AssertionError(f"every thread of {pid} but the main one blocks {signum}")


def test_ctrl_c_taken_by_another_thread_ends_the_wait_for_ctrl_c() -> None:
    command = [sys.executable, "-c", KEEP_SERVING]
    waiting = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True, preexec_fn=answers_ctrl_c)
    try:
        wait_until(lambda: "nanosleep" in Path(f"/proc/{waiting.pid}/wchan").read_text(), "the main thread asleep")
        _tgkill(waiting.pid, _another_thread_taking(waiting.pid, signal.SIGINT), signal.SIGINT)
        out, _ = waiting.communicate(timeout=10)
    finally:
        waiting.kill()
    assert out.split() == ["stopped"]


def test_a_stepped_sleep_lasts_as_long_as_asked() -> None:
    from pipelines.stopping import SIGNAL_CHECK_EVERY_S, sleep

    started = time.monotonic()
    sleep(SIGNAL_CHECK_EVERY_S * 2.5)
    assert time.monotonic() - started >= SIGNAL_CHECK_EVERY_S * 2.5
