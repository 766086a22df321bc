"""Say when a run waits on something outside it, which would otherwise look like a hang:

- its cluster: its own tasks, actors or placement groups that Ray cannot place, because other jobs
  or Serve applications hold what they need. On a shared cluster whose CPUs another job held, a run
  printed `[ptft] tokenize started` and then nothing, for as long as that job ran (Ray Data waits for
  CPUs without a word);
- its MLflow server: one that stopped answering left the console silent for the four minutes
  MLflow's client retries a call, at each stage's start or end.

One thread (`Watch`) asks each every `CHECK_EVERY_S`, and each says so once a wait has lasted
`SAY_AFTER_S`, and again when it is over."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

from components import console
from components.net import mlflow_unanswered
from components.redaction import redact_url
from pipelines import manifest as mf
from pipelines.progress import clock

log = logging.getLogger(__name__)

CHECK_EVERY_S = 15.0
# An actor's process takes seconds to start on a busy machine, an MLflow server seconds to restart:
# neither is a wait worth a line.
SAY_AFTER_S = 30.0


class Check(Protocol):
    def check(self) -> None: ...


class Watch:
    """A thread that runs each check every `every_s` while the run runs."""

    def __init__(self, checks: Sequence[Check], every_s: float = CHECK_EVERY_S):
        self.checks, self.every_s = list(checks), every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ptft-waits", daemon=True)

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            for each in self.checks:
                try:
                    each.check()
                except Exception:  # noqa: BLE001 - a notice is never worth failing a run for
                    log.debug("could not check what the run waits on", exc_info=True)


class _Wait:
    """How long a wait has lasted, and whether it was told."""

    def __init__(self, say: Callable[[str], None], after_s: float):
        self.say, self.after_s = say, after_s
        self.waiting_since: float | None = None
        self.told = False

    def waits(self, now: float) -> bool:
        """Note a check that found the wait; True the first time it has lasted `after_s`."""
        self.waiting_since = self.waiting_since or now
        if self.told or now - self.waiting_since < self.after_s:
            return False
        self.told = True
        return True

    def over(self, now: float) -> float | None:
        """Note a check that found no wait; how long the told wait lasted, if one was told."""
        lasted = now - self.waiting_since if self.told else None
        self.waiting_since, self.told = None, False
        return lasted


class ClusterWait(_Wait):
    """What of this job waits to be placed while a stage runs."""

    def __init__(
        self, manifest: mf.Manifest, say: Callable[[str], None] = console.say, *, after_s: float = SAY_AFTER_S
    ):
        super().__init__(say, after_s)
        self.manifest = manifest

    def check(self) -> None:
        running = [name for name, record in self.manifest.stages.items() if record.status == mf.RUNNING]
        shapes = unplaced() if running else []
        now = time.monotonic()
        if not shapes:
            if (lasted := self.over(now)) is not None:
                self.say(f"[ptft] the cluster placed what the run waited for, after {clock(lasted)}")
        elif self.waits(now):
            self.say(
                f"[ptft] {', '.join(running)} waits for the cluster: it cannot place {_shapes(shapes)} now "
                f"({_free_cpus()}); other jobs or Serve applications hold the rest (`ray status`). "
                "The run goes on once they free them"
            )


class TrackingWait(_Wait):
    """Whether the run's MLflow server answers `GET /health` (a sqlite store is never waited on)."""

    def __init__(self, tracking_uri: str, say: Callable[[str], None] = console.say, *, after_s: float = SAY_AFTER_S):
        super().__init__(say, after_s)
        self.tracking_uri = tracking_uri

    def check(self) -> None:
        why = mlflow_unanswered(self.tracking_uri)
        now = time.monotonic()
        where = redact_url(self.tracking_uri)
        if why is None:
            if (lasted := self.over(now)) is not None:
                self.say(f"[ptft] the MLflow server at {where} answers again, after {clock(lasted)}")
        elif self.waits(now):
            self.say(
                f"[ptft] the MLflow server at {where} does not answer ({why}). Training goes on and logs "
                "what it held back once the server is back; a stage's start or end waits for it (MLflow's "
                "client retries for about 4 minutes), then the run fails and `ptft resume` goes on from there"
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
