"""A full disk, for real: a run's storage on a 1 MB tmpfs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import manifest as mf
from tests.conftest import REPO, small_disk, tiny_config_dict

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

