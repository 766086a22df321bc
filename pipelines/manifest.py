"""The manifest of a pipeline run: what ran, what was reused, where it went, how it ended.

One JSON file per run at `<storage>/runs/<run_id>/manifest.json`, rewritten atomically after
every change, beside the resolved config the run used (`config.json`). `ptft runs` lists them;
`ptft resume RUN_ID` reads both and continues the run.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from components import metrics
from components.redaction import redact_url, redacted_urls
from components.stage import read_json, write_json
from pipelines import stages
from pipelines.pipeline_config import SQLITE, missing_sqlite_store, sqlite_file

log = logging.getLogger(__name__)

# Stage states. `cached`: reused an artifact another run produced; `succeeded`: produced it here.
PENDING, RUNNING, SUCCEEDED, CACHED, FAILED, KILLED = "pending", "running", "succeeded", "cached", "failed", "killed"
SKIPPED = "skipped"  # an upstream stage of its branch failed: a resume runs it
DONE = (SUCCEEDED, CACHED)
# Transitions come from the main thread and, on a stop, from pipelines.stopping's watcher thread.
_LOCK = threading.RLock()


@dataclass
class StageRecord:
    status: str = PENDING
    key: str | None = None
    output_uri: str | None = None
    mlflow_run_id: str | None = None
    cached_from_mlflow_run_id: str | None = None
    cached_from_pipeline_run: str | None = None  # the pipeline run whose stage made the output
    attempts: int = 0
    started_at: float | None = None
    ended_at: float | None = None
    seconds: float | None = None
    work_seconds: float | None = None
    error: str | None = None
    upstream: list[str] = field(default_factory=list)  # the stages (graph nodes) whose output it reads


@dataclass
class Manifest:
    run_id: str
    pipeline: str
    storage: str
    working_dir: str
    status: str = RUNNING
    attempts: int = 1
    created_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    mlflow_run_id: str | None = None
    stages: dict[str, StageRecord] = field(default_factory=dict)
    # Where the run was recorded, when it is read under another path (the folder moved or was
    # copied, or a shared storage is mounted elsewhere here); never saved.
    moved_from: str | None = None

    # --- files -------------------------------------------------------------------------------

    @staticmethod
    def folder(storage: Path, run_id: str) -> Path:
        return Path(storage) / "runs" / run_id

    @classmethod
    def create(
        cls,
        storage: Path,
        run_id: str,
        pipeline: str,
        stages: tuple[str, ...],
        config: dict,
        upstream: dict[str, tuple[str, ...]] | None = None,
    ) -> Manifest:
        manifest = cls(
            run_id=run_id,
            pipeline=pipeline,
            storage=str(Path(storage).resolve()),
            working_dir=os.getcwd(),
            stages={stage: StageRecord(upstream=list((upstream or {}).get(stage, ()))) for stage in stages},
        )
        write_json(cls.folder(storage, run_id) / "config.json", redacted_urls(config))  # see connectable_uri
        manifest.save()
        return manifest

    @classmethod
    def load(cls, storage: Path, run_id: str) -> Manifest:
        path = cls.folder(storage, run_id) / "manifest.json"
        if not path.is_file():
            known = ", ".join(run.run_id for run in list_runs(storage)[:5]) or "none"
            raise FileNotFoundError(f"no pipeline run {run_id!r} under {storage} (recent runs: {known})")
        try:
            raw = read_json(path)
            # The file's keys are sorted; give the stages back in pipeline order.
            rank = {name: index for index, name in enumerate(stages.NAMES)}
            order = sorted(raw["stages"], key=lambda node: (rank.get(stages.split_node(node)[0], len(rank)), node))
            raw["stages"] = {name: StageRecord(**raw["stages"][name]) for name in order}
            return cls(**raw)._read_under(Path(storage))
        except (ValueError, TypeError, KeyError) as error:  # JSON's errors are ValueErrors
            raise UnreadableManifest(
                f"the manifest of run {run_id!r} ({path}) cannot be read ({type(error).__name__}: {error}); "
                "it was edited, or written by another version of ptft"
            ) from None

    def _read_under(self, storage: Path) -> Manifest:
        """The run as found under `storage`: where it was recorded somewhere else, its config,
        artifacts and a SQLite tracking store inside the storage are read where they are now."""
        recorded, here = Path(self.storage), storage.resolve()
        if recorded == here or (recorded.exists() and os.path.samefile(recorded, here)):
            return self
        self.moved_from, self.storage = self.storage, str(here)
        if (store := sqlite_file(self.tracking_uri)) and store.is_relative_to(recorded):
            self.tracking_uri = f"{SQLITE}{here / store.relative_to(recorded)}"
        return self

    def artifact_path(self, record: StageRecord) -> Path | None:
        """Where a stage's artifact is now (under a moved storage, there); None for one that is no
        local folder (a URL, a registered model)."""
        if not record.output_uri or "://" in record.output_uri or not Path(record.output_uri).is_absolute():
            return None
        path = Path(record.output_uri)
        if self.moved_from and path.is_relative_to(self.moved_from):
            return Path(self.storage) / path.relative_to(self.moved_from)
        return path

    def tracking_store_missing(self) -> str | None:
        """Where the run's SQLite tracking store should be, when it is not there."""
        store = missing_sqlite_store(self.tracking_uri)
        return str(store) if store else None

    def config_path(self) -> Path:
        """The resolved config the run ran with."""
        return self.folder(Path(self.storage), self.run_id) / "config.json"

    def config(self) -> dict[str, Any]:
        return read_json(self.config_path())

    def save(self) -> None:
        with _LOCK:
            # On disk without credentials; this process keeps the URI it connects with.
            state = {**asdict(self), "tracking_uri": redact_url(self.tracking_uri)}
            del state["moved_from"]
            write_json(self.folder(Path(self.storage), self.run_id) / "manifest.json", state)
            # Every transition (started, ended, cached, failed, killed, resumed) is saved here, so
            # the live metrics mirror exactly what the manifest says.
            self._publish_metrics()

    def _publish_metrics(self) -> None:
        for stage, record in self.stages.items():
            metrics.stage_status(self.pipeline, self.run_id, stage, record.status)
            if record.seconds is not None:
                metrics.stage_finished(self.pipeline, self.run_id, stage, record.seconds)

    # --- transitions --------------------------------------------------------------------------

    def stage_started(self, stage: str, key: str, mlflow_run_id: str) -> None:
        with _LOCK:
            record = self.stages[stage]
            record.status, record.key, record.mlflow_run_id, record.error = RUNNING, key, mlflow_run_id, None
            record.attempts += 1
            record.started_at, record.ended_at, record.seconds = time.time(), None, None
            self.save()

    def stage_ended(
        self,
        stage: str,
        status: str,
        *,
        output_uri: str | None = None,
        error: str | None = None,
        cached_from: str | None = None,
        cached_from_pipeline_run: str | None = None,
    ) -> None:
        with _LOCK:
            record = self.stages[stage]
            record.status, record.error = status, error
            record.output_uri = output_uri or record.output_uri
            record.cached_from_mlflow_run_id = cached_from
            record.cached_from_pipeline_run = cached_from_pipeline_run
            record.ended_at = time.time()
            record.seconds = record.ended_at - (record.started_at or record.ended_at)
            self.save()

    def finished(self, status: str) -> None:
        with _LOCK:
            self.status, self.ended_at = status, time.time()
            self.save()

    def stopped(self, why: str) -> list[str]:
        """A stop, recorded at once: the running stages and the run killed. Returns the running
        stages' MLflow run ids, for the caller to end as well."""
        with _LOCK:
            running = [name for name, record in self.stages.items() if record.status == RUNNING]
            for name in running:
                self.stage_ended(name, KILLED, error=why)
            self.finished(KILLED)
            return [self.stages[name].mlflow_run_id for name in running if self.stages[name].mlflow_run_id]


class UnreadableManifest(ValueError):
    """A run's manifest.json that does not read as ptft's."""


def new_run_id() -> str:
    """A run id that sorts by start time: 20261130-012345-a1b2c3."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def looks_like_run_id(text: str) -> bool:
    """Whether `text` has the shape of `new_run_id`'s ids (a Ray job's id has another)."""
    return re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", text) is not None


def list_runs(storage: Path) -> list[Manifest]:
    """Every run under `storage`, newest first."""
    runs = []
    for path in (Path(storage) / "runs").glob("*/manifest.json"):
        try:
            runs.append(Manifest.load(storage, path.parent.name))
        except UnreadableManifest as error:
            log.warning("%s: not listed", error)
    return sorted(runs, key=lambda run: run.created_at, reverse=True)
