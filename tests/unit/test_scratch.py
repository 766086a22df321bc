"""Scratch folders (checkpoints on their way to storage, the best epoch's weights) that a process
killed with SIGKILL leaves in the temp dir are removed by the next one made on that disk, and only
those: a living process's folder stays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from components import scratch
from tests.conftest import REPO

HOLD = "from components.scratch import ScratchFolder; f = ScratchFolder('{}'); print(f.path, flush=True); input()"


def _holding(purpose: str, temp: Path) -> tuple[subprocess.Popen, Path]:
    """A process that made a scratch folder in `temp` and holds it until its stdin closes."""
    env = {**os.environ, "TMPDIR": str(temp)}
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(purpose)],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return process, Path(process.stdout.readline().strip())


@pytest.fixture
def temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_killed_process_folder_goes_with_the_next_one_made_and_a_living_ones_stays(temp: Path) -> None:
    killed, killed_folder = _holding("checkpoint", temp)
    living, living_folder = _holding("best-epoch", temp)
    try:
        (killed_folder / "weights.bin").write_bytes(b"\0" * 1024)
        killed.send_signal(signal.SIGKILL)  # no cleanup runs
        killed.wait(timeout=30)
        assert killed_folder.is_dir()
        with scratch.ScratchFolder("checkpoint") as mine:
            assert mine.is_dir() and mine.name == "checkpoint" and list(mine.iterdir()) == []
            assert not killed_folder.parent.exists()
            assert living_folder.is_dir()
        assert not mine.parent.exists()  # its own, on leaving the block
    finally:
        living.communicate("\n", timeout=30)  # ends normally: its folder goes with it
    assert not living_folder.parent.exists()
    assert list(temp.iterdir()) == []


def test_a_folder_outlives_only_its_process(temp: Path) -> None:
    living, living_folder = _holding("best-epoch", temp)
    try:
        assert scratch.remove_orphans() == []
        living.send_signal(signal.SIGKILL)
        living.wait(timeout=30)
        assert scratch.remove_orphans() == [living_folder.parent]
    finally:
        living.kill()
    assert list(temp.iterdir()) == []


def test_a_folder_being_made_is_left_alone_for_a_while(temp: Path) -> None:
    """Its lock file is not there yet (a process between mkdtemp and its lock)."""
    young = temp / f"{scratch.PREFIX}checkpoint-young"
    young.mkdir()
    old = temp / f"{scratch.PREFIX}checkpoint-old"
    old.mkdir()
    os.utime(old, (0, 0))
    assert scratch.remove_orphans() == [old]
    assert young.is_dir()
