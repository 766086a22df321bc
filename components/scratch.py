"""Scratch folders on a node's local disk (a checkpoint on its way to storage, the best epoch's
weights, a model handed to a child process) that a killed process does not leave behind.

A process killed with SIGKILL (a Ray worker killed or lost, the OOM killer, a sweep's trials at
Ctrl-C) runs no cleanup, and with a real model each folder left is gigabytes in the temp dir. So
each folder holds an advisory lock (`flock`) while its process lives, and whoever makes the next
one removes the folders whose lock is free: their process is gone. The kernel drops the lock with
the process however it ends, in any PID namespace that shares the disk."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

PREFIX = "ptft-scratch-"
OWNER = ".owner"  # the locked file
# A folder whose lock file is not there yet is being made: left alone until it is this old.
UNLOCKED_GRACE_S = 600


class ScratchFolder:
    """A new folder in the temp dir, removed by `cleanup` (or on leaving a `with` block, or when
    the object is collected, as a `tempfile.TemporaryDirectory`), or by a later ScratchFolder on
    the same disk once this process is gone."""

    def __init__(self, purpose: str):
        remove_orphans()
        root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{purpose}-"))
        owner = os.open(root / f"{OWNER}.new", os.O_CREAT | os.O_WRONLY, 0o600)
        self._cleanup = weakref.finalize(self, _remove, root, owner)
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(root / f"{OWNER}.new", root / OWNER)  # others see it locked, never before
        self.path = root / purpose  # beside the lock, not holding it (a checkpoint is uploaded whole)
        self.path.mkdir()

    def cleanup(self) -> None:
        self._cleanup()

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _remove(folder: Path, owner: int) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.close(owner)  # the lock goes with it


def remove_orphans() -> list[Path]:
    """Remove the scratch folders in the temp dir whose process is gone; returns them."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        if folder.is_dir() and _orphaned(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _orphaned(folder: Path) -> bool:
    try:
        owner = os.open(folder / OWNER, os.O_RDONLY)
    except FileNotFoundError:  # being made, or its process died in between
        with contextlib.suppress(FileNotFoundError):
            return time.time() - folder.stat().st_mtime > UNLOCKED_GRACE_S
        return False
    except OSError:  # another user's, say: not ours to judge
        return False
    try:
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its process is alive
        return False
    finally:
        os.close(owner)  # drops the lock too; the folder goes next
    return True
