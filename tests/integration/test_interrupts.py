"""Ctrl-C during a Ray Train run in the driver's main thread, as a pipeline's lone stage runs it,
on the shared cluster. (Ctrl-C during a sweep: tests/integration/test_sweeps.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from components.schemas import WorkersConfig
from components.stage import StageContext
from components.training import fit_on_ray
from tests.conftest import wait_until

pytestmark = pytest.mark.integration


def _controllers(address: str, state: str) -> list:
    """This process's Ray Train controllers in `state` (other test processes train on the same cluster)."""
    import ray
    from ray.util.state import list_actors

    mine = [
        ("class_name", "=", "TrainController"),
        ("state", "=", state),
        ("job_id", "=", ray.get_runtime_context().get_job_id()),
    ]
    return list_actors(address=address, filters=mine, limit=1000)


def test_ctrl_c_stops_the_training_run_and_leaves_no_handler_behind(ray_driver: str, tmp_path: Path) -> None:
    """The stage gets a KeyboardInterrupt (it ends KILLED, resumable), not the controller's death (a
    FAILED stage) or an exit; the run's controller is stopped; the SIGINT handler from before is back."""
    assert threading.current_thread() is threading.main_thread()
    started = tmp_path / "started"

    def loop(config: dict) -> None:  # a stage's loop that has begun and would go on for minutes
        Path(config["started"]).touch()
        time.sleep(600)

    def press_ctrl_c() -> None:
        wait_until(started.exists, "the training loop")
        os.kill(os.getpid(), signal.SIGINT)

    ctx = StageContext(
        pipeline_run_id="interrupts",
        stage="pretrain",
        output_dir=tmp_path / "out",
        storage=tmp_path / "storage",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment_id="0",
        mlflow_run_id="none",
    )
    before = signal.getsignal(signal.SIGINT)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        fit_on_ray(loop, {"started": str(started)}, WorkersConfig(num_workers=1), ctx, checkpoints_to_keep=1)
    assert time.monotonic() - began < 300  # not the loop's ten minutes
    assert signal.getsignal(signal.SIGINT) is before
    wait_until(lambda: not _controllers(ray_driver, "ALIVE"), "the run's controller to stop", timeout_s=60)
    assert _controllers(ray_driver, "DEAD")
