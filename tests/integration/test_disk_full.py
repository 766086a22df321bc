"""A full disk, for real: a run's storage on a 1 MB tmpfs, and a training worker writing to
/dev/full (ENOSPC on every write)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from components.net import causes
from components.schemas import WorkersConfig
from components.tracking import out_of_space
from components.training import fit_on_ray
from pipelines import manifest as mf
from tests.conftest import REPO, loop_context, small_disk, tiny_config_dict

pytestmark = pytest.mark.integration

PTFT = str(Path(sys.executable).parent / "ptft")


def test_a_run_on_a_full_disk_says_which_disk_and_how_to_go_on(tmp_path: Path) -> None:
    """Its SQLite store fills first, and the run's end, recorded in the same store, failed again:
    the run ended in a chain of MLflow, SQLAlchemy and SQLite tracebacks."""
    with small_disk(tmp_path / "disk", "1M") as disk:
        storage = disk / "store"
        config = tmp_path / "pipeline.yaml"
        config.write_text(yaml.safe_dump(tiny_config_dict(storage)))
        result = subprocess.run(
            [PTFT, "run", str(config)], capture_output=True, text=True, cwd=REPO, env=os.environ, timeout=300
        )
        assert result.returncode == 1, result.stdout + result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"ptft run: out of disk space on {disk} ("), result.stderr
        assert "Free space there, then run the command again" in last
        assert "Traceback" not in result.stderr, result.stderr
        (run,) = mf.list_runs(storage)  # it had opened: the resume line names it
        assert f"ptft resume {run.run_id}" in result.stderr


def test_a_worker_out_of_disk_space_ends_the_training_run_without_restarts(ray_driver: str, tmp_path: Path) -> None:
    """Ray Train restarted the group `max_failures` times, each attempt training again from the
    last checkpoint to the next one, which failed the same way: minutes of pre-training each."""
    attempts = tmp_path / "attempts"
    attempts.mkdir()

    def loop(config: dict) -> None:
        (Path(config["attempts"]) / str(time.time_ns())).touch()
        with open("/dev/full", "wb") as full:  # a checkpoint on a full disk
            full.write(b"\0" * 65536)

    ctx = loop_context(tmp_path, "disk-full")
    workers = WorkersConfig(num_workers=1, max_failures=3)
    with pytest.raises(Exception) as failed:  # noqa: PT011 - Ray Train's wrapper of the worker's error
        fit_on_ray(loop, {"attempts": str(attempts)}, workers, ctx, checkpoints_to_keep=1)
    assert len(list(attempts.iterdir())) == 1  # no restart
    assert any(out_of_space(each) for each in causes(failed.value)), failed.value
    assert "ran out of disk space, so no restart" in str(failed.value)
