"""A run says when it waits on the cluster (pipelines/waits.py): a request of its own job
that Ray does not place, here an actor asking for a resource no node of the shared cluster has,
is told once, and its end is told too. (On a cluster whose CPUs another job held, `ptft run`
printed `tokenize started` and nothing more until that job ended.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import manifest as mf
from pipelines.waits import ClusterWait
from tests.conftest import wait_until

pytestmark = pytest.mark.integration


def test_a_request_the_cluster_does_not_place_is_told_once_and_so_is_its_end(ray_driver: str, tmp_path: Path) -> None:
    import ray

    manifest = mf.Manifest.create(tmp_path, "run-1", "wait", ("tokenize",), {})
    said: list[str] = []
    watch = ClusterWait(manifest, said.append, after_s=0)  # checked here, not by a Watch's thread

    @ray.remote(num_cpus=0, resources={"ptft-test-held-elsewhere": 1})
    class Unplaced:
        pass

    unplaced = Unplaced.remote()
    watch.check()
    assert said == []  # no stage runs: nothing of the run waits
    manifest.stage_started("tokenize", "k", "r")

    def told(count: int) -> bool:
        watch.check()
        return len(said) >= count

    wait_until(lambda: told(1), "the notice", timeout_s=120, poll_s=1)
    assert said[0].startswith(
        "[ptft] tokenize waits for the cluster: it cannot place 1 x {ptft-test-held-elsewhere: 1}"
    )
    assert "CPUs free" in said[0]
    watch.check()
    assert len(said) == 1  # once
    ray.kill(unplaced)
    wait_until(lambda: told(2), "the end of the wait", timeout_s=120, poll_s=1)
    assert said[1].startswith("[ptft] the cluster placed what the run waited for, after ")
