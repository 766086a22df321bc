"""Out of memory, for real: Ray's memory monitor, its threshold set under what any machine already
uses, kills what a `ptft run` starts on its own local Ray (the suite's shared cluster keeps its
threshold). The run must fail in seconds, with the cause and what to change, not retry forever."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import manifest as mf
from tests.conftest import REPO, tiny_config_dict

pytestmark = pytest.mark.integration

PTFT = str(Path(sys.executable).parent / "ptft")


def test_a_run_out_of_memory_fails_in_seconds_and_says_what_to_change(tmp_path: Path) -> None:
    """Before: Ray retried tokenize's killed task without end, a minute apart, and the run said
    nothing more after `tokenize started` (past the timeout here); a stage that did fail on it
    ended in a 90-line traceback with the cause in one of its lines."""
    storage = tmp_path / "store"
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(storage)))
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_memory_usage_threshold"] = "0.01"  # a local Ray of the run's own: every task it starts is killed
    env["RAY_task_oom_retry_delay_base_ms"] = "0"  # Ray's backoff between them (1, 2, 4 s): not the subject
    result = subprocess.run([PTFT, "run", str(config)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ptft run: out of memory on node" in result.stderr, result.stderr
    assert "past the monitor's 1.0%" in result.stderr and "Fix: smaller batches" in result.stderr
    assert "Traceback" not in result.stderr
    (run,) = mf.list_runs(storage)
    assert run.stages["tokenize"].status == mf.FAILED
    assert f"ptft resume {run.run_id}" in result.stderr
    log = (mf.Manifest.folder(storage, run.run_id) / "ptft.log").read_text()
    assert "killed due to the node running low on memory" in log  # Ray's own report, kept
