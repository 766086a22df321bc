"""Say when a run waits on its cluster: its own tasks, actors or placement groups that Ray cannot
place, because other jobs or Serve applications hold what they need. On a shared cluster whose
CPUs another job held, a run printed `[ptft] tokenize started` and then nothing, for as long as
that job ran (Ray Data waits for CPUs without a word)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from components import console
from pipelines import manifest as mf
from pipelines.progress import clock

log = logging.getLogger(__name__)

CHECK_EVERY_S = 15.0
SAY_AFTER_S = 30.0  # an actor's process takes seconds to start on a busy machine: not a wait on others


class ClusterWait:
    """A thread that asks Ray every `every_s` what of this job waits to be placed while a stage
    runs, and says so once that has lasted `after_s`, and again when it is placed."""

    def __init__(
        self,
        manifest: mf.Manifest,
        say: Callable[[str], None] = console.say,
        *,
        every_s: float = CHECK_EVERY_S,
        after_s: float = SAY_AFTER_S,
    ):
        self.manifest, self.say, self.every_s, self.after_s = manifest, say, every_s, after_s
        self.waiting_since: float | None = None
        self.told = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ptft-cluster-wait", daemon=True)

    def start(self) -> ClusterWait:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a notice is never worth failing a run for
                log.debug("could not ask Ray what waits", exc_info=True)

    def check(self) -> None:
        running = [name for name, record in self.manifest.stages.items() if record.status == mf.RUNNING]
        shapes = unplaced() if running else []
        now = time.monotonic()
        if not shapes:
            if self.told:
                self.say(f"[ptft] the cluster placed what the run waited for, after {clock(now - self.waiting_since)}")
            self.waiting_since, self.told = None, False
            return
        self.waiting_since = self.waiting_since or now
        if not self.told and now - self.waiting_since >= self.after_s:
            self.told = True
            self.say(
                f"[ptft] {', '.join(running)} waits for the cluster: it cannot place {_shapes(shapes)} now "
                f"({_free_cpus()}); other jobs or Serve applications hold the rest (`ray status`). "
                "The run goes on once they free them"
            )


def unplaced() -> list[dict[str, float]]:
    """The resources of this job's requests that Ray has not placed: tasks (an actor's creation
    among them) waiting for a node, pending placement groups' bundles. One GCS call first says
    whether anything on the cluster waits at all; only then is the state API asked."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    context = ray.get_runtime_context()
    demands = get_cluster_status(context.gcs_address).resource_demands
    if not (demands.ray_task_actor_demand or demands.placement_group_demand):
        return []
    from ray.util.state import list_placement_groups, list_tasks

    job = context.get_job_id()
    asked = {"detail": True, "raise_on_missing_output": False, "limit": 1000}
    shapes = []
    if demands.ray_task_actor_demand:  # an actor waiting for a node is its creation task, waiting
        tasks = list_tasks(filters=[("job_id", "=", job), ("state", "=", "PENDING_NODE_ASSIGNMENT")], **asked)
        shapes += [task.required_resources for task in tasks]
    if demands.placement_group_demand:
        groups = list_placement_groups(filters=[("creator_job_id", "=", job), ("state", "=", "PENDING")], **asked)
        shapes += [bundle["unit_resources"] for group in groups for bundle in group.bundles or []]
    # An actor placed in a pending group's bundle asks for the bundle's resources: the group says it.
    return [shape for shape in shapes if shape and not any("_group_" in name for name in shape)]


def _shapes(shapes: list[dict[str, float]]) -> str:
    counted = Counter(tuple(sorted(shape.items())) for shape in shapes)
    return ", ".join(
        f"{count} x {{{', '.join(f'{name}: {amount:g}' for name, amount in shape)}}}"
        for shape, count in counted.items()
    )


def _free_cpus() -> str:
    import ray

    return f"{ray.available_resources().get('CPU', 0):g} of {ray.cluster_resources().get('CPU', 0):g} CPUs free"
