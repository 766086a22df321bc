"""Progress of a pipeline run, for people and for scripts. Read from the run's manifest (stages,
status, timings, cache hits) and, for the running stage, from its MLflow run: training stages log
`train/step` and `progress/total_steps`; a sweep's trials are child runs of the tune run.

* `Reporter`: a thread `ptft run` starts; it prints each stage as it starts and ends, and for a
  training stage its step, rate and ETA, or for a sweep its trials, every `every_s` seconds; on a
  terminal (`console.live`) it draws the running stages as live progress bars instead.
* `snapshot`: the same as a dict, for `ptft status [RUN_ID] [--json]`.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from mlflow.tracking import MlflowClient

from components import console
from components.net import mlflow_unanswered
from components.redaction import CredentialsNeeded, connectable_uri, redact_text, redact_url
from components.stage import StageResult
from components.tracking import PARENT_TAG
from pipelines import manifest as mf
from pipelines import stages
from pipelines.driver_lock import driver_gone, last_seen

log = logging.getLogger(__name__)


def stage_progress(client: MlflowClient, stage: str, run_id: str) -> dict | None:
    """{"step", "total_steps"} of a training stage, {"trials": {status: count}} of a sweep, or None."""
    declared = stages.declaration(stage)
    shown = declared.progress if declared else None
    if shown == "steps":
        metrics = client.get_run(run_id).data.metrics
        if "progress/total_steps" not in metrics:
            return None
        step, total = int(metrics.get("train/step", 0)), int(metrics["progress/total_steps"])
        return {"step": step, "total_steps": total, "loss": metrics.get("train/loss")}
    if shown == "trials":
        trials = client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.`{PARENT_TAG}` = '{run_id}'")
        counts: dict[str, int] = {}
        for trial in trials:
            status = trial.data.tags.get("ptft.trial_status", trial.info.status.lower())
            counts[status] = counts.get(status, 0) + 1
        return {"trials": counts}
    return None


def eta_s(step: int, total: int, rate: float | None) -> float | None:
    return (total - step) / rate if rate and step < total else None


def snapshot(manifest: mf.Manifest, client: MlflowClient | None = None, now: float | None = None) -> dict:
    """The run as a dict: status, elapsed seconds, and per stage its status, seconds, cache hit,
    MLflow run and (while running) progress with an ETA from the stage's average step rate."""
    now = now or time.time()
    stages = []
    for name, record in manifest.stages.items():
        entry = {
            "name": name,
            "status": record.status,
            "cached": record.status == mf.CACHED,
            "seconds": record.seconds,
            "attempts": record.attempts,
            "mlflow_run_id": record.mlflow_run_id,
            "cached_from_mlflow_run_id": record.cached_from_mlflow_run_id,
            "cached_from_pipeline_run": record.cached_from_pipeline_run,
            "error": record.error,
            "upstream": record.upstream,
            # `ptft gc` removed it (or someone did): a run of this config makes it again
            "artifact_removed": record.status in mf.DONE
            and (path := manifest.artifact_path(record)) is not None
            and not path.exists(),
        }
        if record.status == mf.RUNNING and client is not None and record.mlflow_run_id:
            running_s = max(0.0, now - (record.started_at or now))
            entry["seconds"] = running_s
            progress = stage_progress(client, name, record.mlflow_run_id)
            if progress and "total_steps" in progress:
                rate = progress["step"] / running_s if running_s > 0 and progress["step"] else None
                progress["eta_s"] = eta_s(progress["step"], progress["total_steps"], rate)
            entry["progress"] = progress
        stages.append(entry)
    return {
        "run_id": manifest.run_id,
        "pipeline": manifest.pipeline,
        "status": manifest.status,
        "attempts": manifest.attempts,
        "created_at": manifest.created_at,
        "ended_at": manifest.ended_at,
        "elapsed_s": max(0.0, (manifest.ended_at or now) - manifest.created_at),
        "tracking_uri": redact_url(manifest.tracking_uri),
        "experiment_id": manifest.experiment_id,
        "mlflow_run_id": manifest.mlflow_run_id,
        "stages": stages,
    }


def result_text(result: StageResult) -> str:
    """Where a stage's output is, and its numeric metrics on the next line."""
    shown = ", ".join(
        f"{name}={console.number(value)}" for name, value in result.metrics.items() if isinstance(value, (int, float))
    )
    return f"{result.output_uri}\n         {shown}"


def clock(seconds: float | None) -> str:
    """12s, 3m05s, 1h02m."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def describe(progress: dict | None) -> str:
    """One line of a stage's progress: steps, rate and ETA, or trial counts."""
    if not progress:
        return ""
    if "trials" in progress:
        counts = progress["trials"]
        return "trials: " + (", ".join(f"{count} {status}" for status, count in sorted(counts.items())) or "starting")
    step, total = progress["step"], progress["total_steps"]
    line = f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"
    if progress.get("steps_per_s"):
        line += f", {progress['steps_per_s']:.2f} steps/s"
    if progress.get("eta_s") is not None:
        line += f", ETA {clock(progress['eta_s'])}"
    return line


_ENDED = (mf.SUCCEEDED, mf.FAILED, mf.KILLED)


class Reporter:
    """Prints a run's stage transitions at once, and the running stage's progress every `every_s`
    seconds while it changes. The rate comes from the steps seen since the reporter first saw the
    stage train, so start-up time does not skew the ETA.

    With `awaits_results`, the runner hands each finished stage's result to `stage_done`, and the
    line that says the stage succeeded or hit the cache waits for it, so that one line says when,
    where the output is, and its metrics (the manifest says a stage ended a moment before)."""

    def __init__(
        self,
        manifest: mf.Manifest,
        client: MlflowClient,
        every_s: float = 10.0,
        stream: TextIO | None = None,
        *,
        awaits_results: bool = False,
    ):
        self.manifest, self.client, self.every_s = manifest, client, every_s
        self.stream = stream
        self._awaits_results = awaits_results
        self._results: dict[str, StageResult] = {}
        self._lock = threading.Lock()  # the polling thread and the stages' threads print transitions
        self._seen: dict[str, str] = {}
        self._first: dict[str, tuple[float, int]] = {}
        self._newest: dict[str, tuple[float, int]] = {}
        self._last_line: dict[str, str] = {}
        self._last_progress = 0.0
        self._bars: Any = None  # rich Progress, on a terminal
        self._bar_of: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ptft-progress", daemon=True)

    def start(self) -> Reporter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._awaits_results = False  # a stop can leave a stage ended without its result handed over
        self._poll_quietly(progress=False)  # the last transitions

    def stage_started(self, name: str) -> None:
        """A stage starts, from the runner: its line is printed now, before anything the stage
        prints itself (a sweep's first table came before it when it waited for the next poll)."""
        self._poll_quietly(progress=False)

    def stage_done(self, name: str, result: StageResult) -> None:
        """A stage's result, from the runner: its transition is printed now, with it."""
        self._results[name] = result
        self._poll_quietly(progress=False)

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            due = console.is_live() or time.monotonic() - self._last_progress >= self.every_s
            self._poll_quietly(progress=due)
            if due:
                self._last_progress = time.monotonic()

    def _poll_quietly(self, *, progress: bool) -> None:
        """A progress line is never worth failing a stage or a run for (a closed pipe, MLflow away);
        the runner calls in from its stages' threads and at the end of the run."""
        try:
            self.poll(progress=progress)
        except Exception:  # noqa: BLE001
            log.debug("progress: a line could not be printed", exc_info=True)

    def poll(self, *, progress: bool) -> None:
        with self._lock:  # not held while MLflow is asked for progress, so a stage_done never waits on it
            records = list(self.manifest.stages.items())
            for name, record in records:
                if self._seen.get(name) != record.status and not self._awaiting_result(name, record):
                    if record.status in _ENDED and self._seen.get(name, mf.RUNNING) != mf.RUNNING and record.started_at:
                        # Seen waiting, now ended: it started and ended between two polls.
                        self._transition(name, replace(record, status=mf.RUNNING))
                    self._seen[name] = record.status
                    self._transition(name, record)
        for name, record in records:
            if progress and record.status == mf.RUNNING and record.mlflow_run_id:
                self._progress(name, record)

    def _awaiting_result(self, name: str, record: mf.StageRecord) -> bool:
        return self._awaits_results and record.status in mf.DONE and name not in self._results

    def _transition(self, name: str, record: mf.StageRecord) -> None:
        if record.status == mf.RUNNING:
            attempt = f" (attempt {record.attempts})" if record.attempts > 1 else ""
            self._print(f"[ptft] {name:<8} started{attempt}")
        elif record.status == mf.CACHED:
            # The pipeline run, which `ptft status` and `ptft report` take; an output written before
            # its pipeline run was recorded names its MLflow run.
            if record.cached_from_pipeline_run:
                producer = f"run {record.cached_from_pipeline_run}"
            else:
                producer = f"MLflow run {record.cached_from_mlflow_run_id}"
            self._print(
                f"[ptft] {name:<8} cache hit in {clock(record.seconds)} (produced by {producer})"
                f"{self._result_text(name)}"
            )
        elif record.status in _ENDED:
            self._print(f"[ptft] {name:<8} {record.status} in {clock(record.seconds)}{self._result_text(name)}")
        if record.status != mf.RUNNING and name in self._bar_of:
            self._bars.remove_task(self._bar_of.pop(name))

    def _progress(self, name: str, record: mf.StageRecord) -> None:
        progress = stage_progress(self.client, name, record.mlflow_run_id)
        with self._lock:
            if self._seen.get(name) == mf.RUNNING:  # not ended meanwhile: an ended stage's bar stays gone
                self._show_progress(name, record, progress)

    def _show_progress(self, name: str, record: mf.StageRecord, progress: dict | None) -> None:
        if progress and "total_steps" in progress and progress["step"]:
            now, step = time.monotonic(), progress["step"]
            first_at, first_step = self._first.setdefault(name, (now, step))
            if step > self._newest.get(name, (now, 0))[1]:
                self._newest[name] = (now, step)  # when the step moved: the rate does not sag while waiting
            newest_at, newest_step = self._newest[name]
            if newest_step > first_step:
                progress["steps_per_s"] = (newest_step - first_step) / (newest_at - first_at)
                progress["eta_s"] = eta_s(step, progress["total_steps"], progress["steps_per_s"])
        if console.is_live():
            self._draw(name, progress)
            return
        line = describe(progress)
        if line and line != self._last_line.get(name):
            self._last_line[name] = line
            elapsed = time.time() - (record.started_at or time.time())
            self._print(f"[ptft] {name:<8} {line}  (elapsed {clock(elapsed)})")

    def _draw(self, name: str, progress: dict | None) -> None:
        """The stage's live bar: steps with loss and rate, trial counts, or (tokenizing, preparing,
        starting Serve) a pulsing bar with the elapsed time."""
        if self._bars is None:
            self._bars = _progress_bars()
        if name not in self._bar_of:
            self._bar_of[name] = self._bars.add_task(name, total=None, counts="", eta="", extra="")
        bar = self._bar_of[name]
        if progress and "total_steps" in progress:
            step, total = progress["step"], progress["total_steps"]
            extra = [f"loss {progress['loss']:.3f}" if progress.get("loss") is not None else ""]
            extra.append(f"{progress['steps_per_s']:.2f} steps/s" if progress.get("steps_per_s") else "")
            eta = f"ETA {clock(progress['eta_s'])}" if progress.get("eta_s") is not None else ""
            shown = {"counts": f"{step}/{total} steps", "eta": eta, "extra": "  ".join(extra)}
            self._bars.update(bar, completed=step, total=total, **shown)
        elif progress and "trials" in progress:
            self._bars.update(bar, extra=describe(progress))
        console.show("stages", self._bars)

    def _result_text(self, name: str) -> str:
        result = self._results.get(name)
        return f": {result_text(result)}" if result else ""

    def _print(self, line: str) -> None:
        if self.stream is None:
            console.say(line)
        else:
            print(line, file=self.stream, flush=True)


def _progress_bars():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
        TextColumn("{task.fields[extra]}"),
        auto_refresh=False,
    )


def print_status(storage: Path, run_id: str | None, *, as_json: bool) -> int:
    """`ptft status [RUN_ID]`: the run (default: the newest under `storage`) as a table or JSON.
    MLflow is asked only for a running stage's progress; an unreachable server leaves it out."""
    try:
        manifest = mf.Manifest.load(storage, run_id) if run_id else next(iter(mf.list_runs(storage)), None)
    except (FileNotFoundError, mf.UnreadableManifest) as error:
        print(f"ptft: {error}", file=sys.stderr)
        return 2
    if manifest is None:
        print(f"ptft: no pipeline runs under {storage}", file=sys.stderr)
        return 2
    try:
        tracking_uri = connectable_uri(manifest.tracking_uri)
    except CredentialsNeeded as error:
        print(f"ptft: progress from MLflow unavailable: {error}", file=sys.stderr)
        tracking_uri = None
    asks_progress = any(record.status == mf.RUNNING for record in manifest.stages.values())
    if asks_progress and (missing := manifest.tracking_store_missing()):
        print(f"ptft: progress from MLflow unavailable: no MLflow store at {missing}", file=sys.stderr)
        tracking_uri = None
    if asks_progress and tracking_uri and (why := mlflow_unanswered(tracking_uri)) is not None:
        # MLflow's client would retry for four minutes before the table
        where = redact_url(tracking_uri)
        print(f"ptft: progress from MLflow unavailable: the server at {where} does not answer ({why})", file=sys.stderr)
        tracking_uri = None
    client = MlflowClient(tracking_uri) if tracking_uri else None
    # A run whose driver died (SIGKILL, out of memory, a closed terminal, a restarted machine) says
    # `running` for ever: say so, and how to go on, and count its time only while a driver ran it.
    # Asked under the storage given, which may be the run's shared storage mounted elsewhere.
    folder = mf.Manifest.folder(storage, manifest.run_id)
    gone = driver_gone(folder) if manifest.status == mf.RUNNING else None
    until = (last_seen(folder) or time.time()) if gone else None
    try:
        state = snapshot(manifest, client, now=until)
    except Exception as error:  # noqa: BLE001 - the manifest alone still answers
        print(f"ptft: progress from MLflow unavailable ({redact_text(str(error))})", file=sys.stderr)
        state = snapshot(manifest, None, now=until)
    state["driver_gone"], state["driver_last_seen_at"] = gone, until
    if gone:  # nothing runs it: no ETA
        for stage in state["stages"]:
            if stage.get("progress"):
                stage["progress"]["eta_s"] = None
    if as_json:
        print(json.dumps(state, indent=1))
        return 0
    if gone:
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until))
        elapsed = f"{clock(state['elapsed_s'])} until {seen}, its driver's last sign of life"
        print(f"{state['run_id']} ({state['pipeline']}): {state['status']}, {elapsed}")
        print(f"  but {gone}: nothing runs it. Go on with `ptft resume {state['run_id']}`")
    else:
        print(f"{state['run_id']} ({state['pipeline']}): {state['status']}, {clock(state['elapsed_s'])}")
    width = max([9, *(len(stage["name"]) for stage in state["stages"])])
    for stage in state["stages"]:
        line = f"  {stage['name']:<{width}} {stage['status']:<10} {clock(stage['seconds']):>7}"
        extra = describe(stage.get("progress")) or (stage["error"] or "")[:100]
        if stage["artifact_removed"]:
            extra = "its artifact was removed (ptft gc); a run of this config makes it again"
        after = f"  <- {', '.join(stage['upstream'])}" if stage["upstream"] else ""
        print(f"{line}  {extra}".rstrip() + after)
    return 0
