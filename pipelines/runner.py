"""The runner: starts (or joins) Ray, opens the MLflow run tree, and walks the stages declared in
`pipelines/stages/` in order, handing each the results its upstream stages left. It owns what
the stages do not know about: cache keys, the manifest, resume, and publishing artifacts. It
names no stage: what a stage reads, keys on, outputs and does elsewhere is in its declaration.

Artifacts live under `<storage>/artifacts/<stage>/<key>/`. A stage writes into a hidden partial
folder; the runner writes `config.json` (what the key was made of) and `_SUCCESS` (metrics,
outputs, producing MLflow run) into it and renames it into place, so a folder with that name is
always complete. A key with `_SUCCESS` is a cache hit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient

from components import accelerator, console, ingress
from components.net import mlflow_unanswered, mlflow_unreachable
from components.redaction import redact_tree, redact_url
from components.stage import (
    StageContext,
    StageFailure,
    StageResult,
    inventory,
    inventory_changes,
    read_json,
    remove_spent_checkpoints,
    weights_sha256,
    write_json,
)
from components.tracking import (
    MlflowTracker,
    close_orphans,
    ensure_experiment,
    flatten,
    reopen_run,
    start_run,
)
from pipelines import lineage, progress, scheduling, stages, stopping
from pipelines import manifest as mf
from pipelines.driver_lock import DriverLock
from pipelines.pipeline_config import ConfigError, PipelineConfig, listens_beyond_loopback, resolved_dict
from pipelines.stages import Inputs, Room, Stage
from pipelines.versions import versions
from pipelines.waits import ClusterWait, TrackingWait, Watch

log = logging.getLogger(__name__)

STAGES = stages.NAMES
SUCCESS = "_SUCCESS"
# How a stop arrives: Ctrl-C/SIGTERM (ptft's handler) or SystemExit (Ray's SIGTERM handler in a job driver).
_STOPPED = (KeyboardInterrupt, SystemExit)
OOM_RETRIES = 3


@dataclass
class PipelineResult:
    run_id: str
    mlflow_run_id: str
    experiment_id: str
    tracking_uri: str
    stages: dict[str, StageResult] = field(default_factory=dict)


def run(
    config: PipelineConfig,
    *,
    rerun: str | Sequence[str] = (),
    resume: str | None = None,
    until: str | None = None,
    on_stage: Callable[[str, StageResult], None] | None = None,
    progress_every_s: float | None = None,
    run_id: str | None = None,
) -> PipelineResult:
    """Run every stage, reusing cached artifacts; returns their results.

    rerun: force these stages (one name or several) and every stage after them to run again (no cache).
    until: stop after this stage (`ptft sweep` runs until tune); the run's manifest lists only the
        stages up to it, so a resume of that run stops there too.
    resume: continue this pipeline run id: finished stages are reused, an interrupted training
        stage or sweep continues from its checkpoints, its MLflow runs are continued.
    progress_every_s: print stage transitions (an ended stage's with its output and metrics), and the
        running stage's progress this often.
    run_id: the new run's id (default: a fresh one); `ptft run` picks it to open the run's log first.
    Serve keeps running until `serve.shutdown()` or Ray exits.
    """
    nodes = stages.graph(config)
    reruns = (rerun,) if isinstance(rerun, str) else tuple(rerun)
    for option, value in [*(("rerun", name) for name in reruns), ("until", until)]:
        if value is not None and not _named(nodes, value):
            known = ", ".join(dict.fromkeys([*STAGES, *(node.id for node in nodes)]))
            raise ValueError(f"{option}={value!r}: not a stage of this pipeline; choose one of {known}")
    storage = config.storage_path()
    storage.mkdir(parents=True, exist_ok=True)
    run_id = resume or run_id or mf.new_run_id()
    lock = DriverLock.acquire(mf.Manifest.folder(storage, run_id), run_id)  # before anything touches the run
    try:
        return _run_locked(
            config,
            nodes,
            storage,
            run_id,
            reruns=reruns,
            resume=resume,
            until=until,
            on_stage=on_stage,
            progress_every_s=progress_every_s,
        )
    finally:
        lock.release()


def _run_locked(
    config: PipelineConfig,
    nodes: tuple[stages.Node, ...],
    storage: Path,
    run_id: str,
    *,
    reruns: tuple[str, ...],
    resume: str | None,
    until: str | None,
    on_stage: Callable[[str, StageResult], None] | None,
    progress_every_s: float | None,
) -> PipelineResult:
    _preflight_before_ray(config)
    _init_ray(config)
    _preflight(config)
    client = MlflowClient(config.tracking_uri())
    experiment_id = ensure_experiment(client, config.experiment_name(), config.artifact_location())
    if resume:
        manifest = _reopen_pipeline_run(client, storage, resume, experiment_id)
    else:
        names = _until(nodes, until) if until else [node.id for node in nodes]
        upstream = {node.id: node.upstream for node in nodes}
        manifest = mf.Manifest.create(
            storage, run_id, config.name, tuple(names), resolved_dict(config), upstream=upstream
        )
        manifest.mlflow_run_id = _start_parent_run(client, config, experiment_id, manifest.run_id)
    manifest.tracking_uri, manifest.experiment_id = config.tracking_uri(), experiment_id
    manifest.save()
    result = PipelineResult(manifest.run_id, manifest.mlflow_run_id, experiment_id, config.tracking_uri())
    forced = _forced(nodes, reruns)
    runner = _StageRunner(config, nodes, client, result, storage, manifest, forced)
    reporter = None
    if progress_every_s:
        reporter = progress.Reporter(manifest, client, every_s=progress_every_s, awaits_results=True).start()
        on_stage = _also(reporter.stage_done, on_stage)
        runner.on_started = reporter.stage_started
    waiting = Watch([ClusterWait(manifest), TrackingWait(config.tracking_uri())]).start()
    status = "FAILED"
    try:
        with stopping.record_stop_at_once(lambda why: _record_stop(manifest, config.tracking_uri(), why)):
            failures = runner.run_all([node for node in nodes if node.id in manifest.stages], on_stage)
        if failures:  # the other branches ran on; the run fails with the first failure
            raise failures[0]
        status = "FINISHED"
    except _STOPPED as error:
        status = "KILLED"
        # Stages running in threads beside the one stopped are killed too (a SIGTERM's stop is
        # recorded already, by stopping's watcher; a Ctrl-C's is not).
        _record_stop(manifest, config.tracking_uri(), f"stopped ({_describe(error)})")
        raise
    finally:
        stopped = status == "KILLED"  # then _record_stop has ended the run and its MLflow run already
        if not stopped:
            with _unless_failed(status, "the run's manifest"):
                manifest.finished(mf.SUCCEEDED if status == "FINISHED" else mf.FAILED)
        waiting.stop()
        if reporter:
            reporter.stop()
        if not stopped and _tracking_answers(config.tracking_uri(), status):
            with _unless_failed(status, "the pipeline's MLflow run"):
                client.set_terminated(manifest.mlflow_run_id, status=status)
    return result


@contextlib.contextmanager
def _unless_failed(status: str, what: str) -> Iterator[None]:
    """Recording a failed run's end must not replace its failure: the disk that failed a stage is
    still full, the store that failed it still down. `ptft status` tells a run whose driver is gone."""
    try:
        yield
    except Exception as error:
        if status != "FAILED":
            raise
        log.warning("the end of the failed run could not be recorded in %s (%s)", what, error)


def _tracking_answers(tracking_uri: str, status: str) -> bool:
    """Whether to end the pipeline's MLflow run: not when a failed run's server does not answer
    (MLflow's client would retry for four more minutes; `ptft resume` reopens the run anyway)."""
    if status != "FAILED" or (why := mlflow_unanswered(tracking_uri)) is None:
        return True
    log.warning("MLflow at %s does not answer (%s): run left open for `ptft resume`", redact_url(tracking_uri), why)
    return False


def _also(first: Callable[[str, StageResult], None], then: Callable[[str, StageResult], None] | None):
    return first if then is None else lambda stage, result: (first(stage, result), then(stage, result))


def _record_stop(manifest: mf.Manifest, tracking_uri: str, why: str = "stopped (SIGTERM)") -> None:
    """The run, its running stages and their MLflow runs killed: what a SIGKILL after the stop's
    grace period must not undo (called from pipelines.stopping's thread)."""
    stage_runs = manifest.stopped(why)
    if (unheard := mlflow_unanswered(tracking_uri)) is not None:  # MLflow's client would retry for minutes
        log.warning("stopped: MLflow does not answer (%s); `ptft resume` ends the runs left open", unheard)
        return
    client = MlflowClient(tracking_uri)  # this thread's own
    for run_id in [*stage_runs, manifest.mlflow_run_id]:
        client.set_terminated(run_id, status="KILLED")
    log.warning("stopped: run %s and its running stages recorded as killed", manifest.run_id)


def _named(nodes: tuple[stages.Node, ...], name: str) -> list[str]:
    """The nodes a name means: a node id (`finetune.topic`), or a stage's name for all its nodes."""
    return [node.id for node in nodes if name in (node.id, node.stage.name)]


def _forced(nodes: tuple[stages.Node, ...], reruns: tuple[str, ...]) -> set[str]:
    """The nodes `--rerun` runs again: each named one and everything downstream of it."""
    named = {node_id for name in reruns for node_id in _named(nodes, name)}
    return stages.node_descendants(nodes, named)


def _until(nodes: tuple[stages.Node, ...], until: str) -> list[str]:
    """The named nodes and what they need, in graph order (`ptft sweep`: up to the sweeps)."""
    wanted = set(_named(nodes, until))
    for node_id in list(wanted):
        wanted.update(stages.node_ancestors(nodes, node_id))
    return [node.id for node in nodes if node.id in wanted]


def _preflight_before_ray(config: PipelineConfig) -> None:
    """Said before Ray starts: an MLflow server that does not answer (MLflow's own client retried
    it for four minutes, then the run failed with a traceback), and for a local Ray what it needs:
    a place to save its auth token, a writable temp folder with room (`preflight.local_ray_problems`)."""
    from pipelines import preflight

    problems = preflight.tracking_problems(config)
    if not ray.is_initialized() and not config.cluster_address():
        problems += preflight.local_ray_problems()
    if problems:
        raise ConfigError("pre-flight", problems)


def _preflight(config: PipelineConfig) -> None:
    """On a cluster: storage visible from every node, the workers fit (MLflow was asked before Ray
    started: `_preflight_before_ray`); on the local Ray just started, that the workers and replicas
    fit its CPUs. Before any run is opened or compute starts."""
    from pipelines import preflight

    on_cluster = config.cluster_address()
    problems = preflight.check_cluster(config, tracking=False) if on_cluster else preflight.local_problems(config)
    if problems:
        raise ConfigError("pre-flight", problems)


def _reopen_pipeline_run(client: MlflowClient, storage: Path, run_id: str, experiment_id: str) -> mf.Manifest:
    """Continue a pipeline run: runs its dead driver left RUNNING end KILLED; its parent run goes on."""
    manifest = mf.Manifest.load(storage, run_id)
    closed = close_orphans(client, experiment_id, run_id)
    if closed:
        log.info("resume %s: ended %d run(s) a dead driver left RUNNING", run_id, len(closed))
    reopen_run(client, manifest.mlflow_run_id)
    manifest.status, manifest.ended_at = mf.RUNNING, None
    manifest.attempts += 1
    return manifest


def _init_ray(config: PipelineConfig) -> None:
    if not ray.is_initialized():
        ours = signal.getsignal(signal.SIGTERM)
        _start_or_join_ray(config)
        if callable(ours) and threading.current_thread() is threading.main_thread():
            # ray.init replaced the CLI's stop with `sys.exit(15)`: a SIGTERM then ended the command
            # with exit 15 and without its `stopped (SIGTERM)` line.
            signal.signal(signal.SIGTERM, ours)
    stopping.restore_python_sigterm()  # a stop gets its whole grace period, not Ray's 3 s


def _start_or_join_ray(config: PipelineConfig) -> None:
    use_gpu = config.uses_gpu()
    # The driver imports DeepSpeed-free code only, but Tune trials and Data tasks inherit this env.
    runtime_env = {"env_vars": accelerator.deepspeed_env(use_gpu)}
    # Inside a Ray Job (`ptft submit`) RAY_ADDRESS names the cluster the job runs on.
    # Without either, start a private local Ray ("local"), never silently join a `ray start` cluster.
    address = config.cluster_address()
    local = {} if address else {"num_cpus": config.ray.num_cpus, "dashboard_host": config.ray.dashboard_host}
    if not address and listens_beyond_loopback(config.ray.dashboard_host):
        # Reachable from other machines: a new local cluster has token auth unless RAY_AUTH_MODE is
        # `disabled`, which validation refuses here; Ray makes ~/.ray/auth_token if there is none.
        # (Setting the variable here would be too late: Ray reads it when it is imported.)
        # tests/integration/test_local_cluster.py holds Ray to it.
        console.say(
            f"[ptft] the local Ray dashboard listens on {config.ray.dashboard_host} with token auth: "
            "`ray get-auth-token` prints the token its clients need"
        )
    if not address:
        serve_env = ingress.local_cluster_env()
        os.environ.update(serve_env)  # the new cluster's processes inherit it
        if lowered := ingress.maxconn_lowered(serve_env):
            console.say(f"[ptft] {lowered}")
    # Ray retries a task its memory monitor killed without end (Ray Data's tasks: `oom retries left:
    # -1`), up to a minute apart: a tokenize that ran out of memory each time said nothing, forever.
    # The driver owns the Data tasks, so its setting is theirs; three retries ride out a passing peak.
    os.environ.setdefault("RAY_task_oom_retries", str(OOM_RETRIES))
    address = address or "local"
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, configure_logging=False, **local)


def _start_parent_run(client: MlflowClient, config: PipelineConfig, experiment_id: str, run_id: str) -> str:
    resolved = redact_tree(resolved_dict(config))  # no credentials in MLflow, even inside a URI
    config_hash = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]
    parent_id = start_run(
        client,
        experiment_id,
        f"pipeline-{run_id}",
        tags={
            "ptft.run_id": run_id,
            "ptft.config_hash": config_hash,
            "ptft.git_sha": _git_sha(),
            "ptft.versions": versions(),
            "ptft.pipeline": config.name,
            "ptft.attempts": "1",
        },
    )
    tracker = MlflowTracker(config.tracking_uri(), parent_id)
    tracker.log_params(flatten(resolved))
    client.log_dict(parent_id, resolved, "config/resolved.json")
    return parent_id


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stage_key(material: dict) -> str:
    """Content key of a stage's output: a hash of its `key_material`."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


def key_material(stage: Stage, settings: dict, upstream_keys: dict[str, str], extras: dict) -> dict:
    """What the key is a hash of; written beside the artifact as its `config.json`."""
    return {
        "stage": stage.name,
        "version": stage.version,
        "config": _without(settings, stage.not_in_key),
        "inputs": upstream_keys,
        "extras": extras,
    }


def _without(config: dict, dotted: tuple[str, ...]) -> dict:
    config = json.loads(json.dumps(config, default=str))  # a deep copy
    for path in dotted:
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return config


class _StageRunner:
    """Runs the graph's nodes: each node's key, the cache, its MLflow child run, the manifest,
    publishing. A failed node stops its own branch only; branches may run side by side."""

    def __init__(
        self,
        config: PipelineConfig,
        nodes: tuple[stages.Node, ...],
        client: MlflowClient,
        result: PipelineResult,
        storage: Path,
        manifest: mf.Manifest,
        forced: set[str],
    ):
        self.config = config
        self.nodes = nodes
        self.client = client
        self.result = result
        self.storage = storage
        self.manifest = manifest
        self.forced = forced
        self.keys: dict[str, str] = {}
        self.mlflow_run_ids: dict[str, str] = {}
        self.free_resources = _free_resources
        self.on_started: Callable[[str], None] = lambda stage: None  # the console's "started" line

    def run_all(self, nodes: list[stages.Node], on_stage: Callable[[str, StageResult], None] | None) -> list[Exception]:
        """Every node whose upstream succeeded, task branches side by side where the cluster has
        room (`scheduling.run_graph`); returns the failures (a stop is raised at once)."""

        def skipped(node: stages.Node, blocked: set[str]) -> None:
            self.manifest.stage_ended(node.id, mf.SKIPPED, error=f"upstream {', '.join(sorted(blocked))} failed")

        def failed(node: stages.Node, error: Exception) -> None:
            log.error("stage %s failed: %s", node.id, _describe(error))
            if self.manifest.stages[node.id].status in (mf.PENDING, mf.RUNNING):
                # It failed outside its own run, in the bookkeeping around it (MLflow calls): else
                # it stayed `running` in a run that had ended.
                self.manifest.stage_ended(node.id, mf.FAILED, error=_describe(error))

        def done(node: stages.Node, stage_result: StageResult) -> None:
            if on_stage:
                on_stage(node.id, stage_result)

        return scheduling.run_graph(
            nodes,
            self.run,
            {node.id: _slot(node, self.config) for node in nodes},
            self.free_resources,
            max_parallel=self.config.ray.parallel_stages,
            on_done=done,
            on_skipped=skipped,
            on_failed=failed,
        )

    def run(self, node: stages.Node) -> StageResult:
        stage, config = node.stage, node.config(self.config)
        inputs = self._inputs(node)
        settings = stage.settings(config)
        upstream_keys = {_stage_of(upstream): self.keys[upstream] for upstream in node.upstream}
        material = key_material(stage, settings, upstream_keys, stage.key_extras(config, inputs))
        key = stage_key(material)
        self.keys[node.id] = key
        final_dir = self.storage / "artifacts" / stage.name / key
        record = self.manifest.stages[node.id]
        if (final_dir / SUCCESS).is_file() and not _artifact_intact(node, final_dir):
            _set_aside(final_dir)  # then it runs again, as for a key never published
        if record.status in mf.DONE and record.key == key and (final_dir / SUCCESS).is_file():
            stage_result = self._reuse_own(node, config, inputs, key, final_dir, record)  # an earlier attempt
        elif node.id not in self.forced and (final_dir / SUCCESS).is_file():
            stage_result = self._cache_hit(node, config, inputs, key, settings, material, final_dir)
        else:
            stage_result = self._execute(node, config, inputs, key, settings, material, final_dir)
        self.result.stages[node.id] = stage_result
        return stage_result

    def _inputs(self, node: stages.Node) -> Inputs:
        """The results, keys and MLflow runs of every node this one depends on, by stage name (a
        task's branch has one node per stage)."""
        names = {node_id: _stage_of(node_id) for node_id in stages.node_ancestors(self.nodes, node.id)}
        done, runs = self.result.stages, self.mlflow_run_ids
        return Inputs(
            results={stage: done[node_id] for node_id, stage in names.items()},
            keys={stage: self.keys[node_id] for node_id, stage in names.items()},
            mlflow_runs={stage: runs[node_id] for node_id, stage in names.items() if node_id in runs},
        )

    def _context(self, node: stages.Node, key: str, output_dir: Path, mlflow_run_id: str, attempt: int) -> StageContext:
        return StageContext(
            pipeline_run_id=self.result.run_id,
            stage=node.id,
            output_dir=output_dir,
            storage=self.storage,
            tracking_uri=self.config.tracking_uri(),
            experiment_id=self.result.experiment_id,
            mlflow_run_id=mlflow_run_id,
            seed=self.config.seed,
            attempt=attempt,
            cache_key=key,
        )

    def _record_lineage(
        self, node: stages.Node, config: PipelineConfig, run_id: str, inputs: Inputs, extras: dict
    ) -> None:
        """The stage run's dataset inputs and the upstream runs it consumed."""
        upstream = {_stage_of(node_id) for node_id in node.upstream}
        lineage.tag_upstream(self.client, run_id, {s: run for s, run in inputs.mlflow_runs.items() if s in upstream})
        lineage.log_datasets(self.client, run_id, node.stage.reads(config, inputs, extras))

    def _reuse_own(
        self,
        node: stages.Node,
        config: PipelineConfig,
        inputs: Inputs,
        key: str,
        final_dir: Path,
        record: mf.StageRecord,
    ) -> StageResult:
        self.mlflow_run_ids[node.id] = record.mlflow_run_id
        stage_result = _load_result(node.stage, final_dir)
        stage_result.cached = record.status == mf.CACHED
        log.info("stage %s: done in an earlier attempt of this run", node.id)
        ctx = self._context(node, key, final_dir, record.mlflow_run_id, record.attempts)
        return _ensure_side_effect(node.stage, config, inputs, stage_result, ctx)

    def _cache_hit(
        self,
        node: stages.Node,
        config: PipelineConfig,
        inputs: Inputs,
        key: str,
        settings: dict,
        material: dict,
        final_dir: Path,
    ) -> StageResult:
        success = read_json(final_dir / SUCCESS)
        producer = success["mlflow_run_id"]
        run_id = self._child_run(
            node,
            key,
            cache_hit=True,
            extra_tags={
                "ptft.cached_from_run_id": producer,
                "ptft.cached_from_pipeline_run": success.get("pipeline_run_id", ""),
            },
        )
        self._record_lineage(node, config, run_id, inputs, material["extras"])
        self.manifest.stage_started(node.id, key, run_id)
        tracker = MlflowTracker(self.config.tracking_uri(), run_id, owns_run=True)
        tracker.log_params(flatten(settings))
        stage_result = _load_result(node.stage, final_dir)
        stage_result.cached = True
        ctx = self._context(node, key, final_dir, run_id, self.manifest.stages[node.id].attempts)
        try:
            stage_result = _ensure_side_effect(node.stage, config, inputs, stage_result, ctx)
        except BaseException as error:
            self.manifest.stage_ended(node.id, mf.FAILED, error=_describe(error))
            tracker.close("KILLED" if isinstance(error, _STOPPED) else "FAILED")
            raise
        tracker.log_metrics(stage_result.metrics, step=0)
        tracker.close("FINISHED")
        self.manifest.stage_ended(
            node.id,
            mf.CACHED,
            output_uri=stage_result.output_uri,
            cached_from=producer,
            cached_from_pipeline_run=success.get("pipeline_run_id") or None,
        )
        log.info("stage %s: cache hit (key %s, produced by MLflow run %s)", node.id, key, producer)
        return stage_result

    def _execute(
        self,
        node: stages.Node,
        config: PipelineConfig,
        inputs: Inputs,
        key: str,
        settings: dict,
        material: dict,
        final_dir: Path,
    ) -> StageResult:
        stage, record = node.stage, self.manifest.stages[node.id]
        continuing = record.mlflow_run_id is not None and record.key == key
        if record.mlflow_run_id is not None and not continuing:
            console.say(
                f"[ptft] {node.id:<8} starts over: its inputs or settings changed since its last "
                f"attempt (key {record.key} -> {key}), so that attempt's checkpoints do not apply"
            )
        if record.mlflow_run_id is None and node.id not in self.forced:  # a first attempt the cache could not spare
            if changes := _changes_since_last_made(self.storage, node, material, self.result.run_id):
                console.say(f"[ptft] {node.id:<8} not cached: {changes}")
        if continuing:
            run_id = record.mlflow_run_id  # a restarted attempt continues its own run
            reopen_run(self.client, run_id)
        else:
            run_id = self._child_run(node, key, cache_hit=False)
            self._record_lineage(node, config, run_id, inputs, material["extras"])
        self.mlflow_run_ids[node.id] = run_id
        self.manifest.stage_started(node.id, key, run_id)
        self.on_started(node.id)  # before the stage prints anything of its own (a sweep's table)
        tracker = MlflowTracker(self.config.tracking_uri(), run_id, owns_run=True, resumed=continuing)
        tracker.log_params(flatten(settings))
        partial = final_dir.parent / f".{key}.partial-{self.result.run_id}"
        shutil.rmtree(partial, ignore_errors=True)  # the stage's resumable state lives in Ray's storage
        partial.mkdir(parents=True)
        ctx = self._context(node, key, partial, run_id, record.attempts if continuing else 1)
        started = time.perf_counter()
        log.info("stage %s: starting (key %s, attempt %d)", node.id, key, record.attempts)
        try:
            _check_room(node.id, stage.room(config, inputs), self.storage)
            stage_result = stage.run(config, inputs, ctx)
            stage_result.outputs = stage.outputs.model_validate(stage_result.outputs)  # the typed hand-off
            if stage.side_effect and stage.side_effect.after_run:
                stage_result = stage.side_effect.after_run(config, inputs, stage_result, ctx)
        except BaseException as error:
            # A stage in a thread fails as the run is stopped beside it (Ray going down under it):
            # the stop, not a failure of its own.
            interrupted = isinstance(error, _STOPPED) or self.manifest.status == mf.KILLED
            # The local manifest first: a stopped Ray Job is SIGKILLed a grace period after its
            # SIGTERM (jobs.STOP_GRACE_S), and the MLflow calls may take longer than that.
            if self.manifest.stages[node.id].status != mf.KILLED:  # else the stop recorded it, and why
                self.manifest.stage_ended(node.id, mf.KILLED if interrupted else mf.FAILED, error=_describe(error))
            if interrupted:
                self.manifest.finished(mf.KILLED)  # the run goes down with the stage
            if not mlflow_unreachable(error):  # else it would wait out the outage again; `ptft resume` ends the run
                tracker.close("KILLED" if interrupted else "FAILED")
            raise
        elapsed = time.perf_counter() - started
        # Training loops log their own metric histories; add only the summaries they did not log.
        logged = set(self.client.get_run(run_id).data.metrics)
        summary = {name: value for name, value in stage_result.metrics.items() if name not in logged}
        tracker.log_metrics({**summary, "stage/seconds": elapsed}, step=0)
        tracker.close("FINISHED")
        write_json(partial / "config.json", material)  # what the key stands for, beside what it made
        provenance = {"mlflow_run_id": run_id, "pipeline_run_id": self.result.run_id, "seconds": elapsed}
        stage_result = _publish(stage, partial, final_dir, stage_result, provenance, replace=node.id in self.forced)
        if freed := remove_spent_checkpoints(ctx):
            log.info("stage %s: removed its Ray checkpoints (%.1f MB), spent once published", node.id, freed / 1e6)
        self.manifest.stages[node.id].work_seconds = elapsed
        self.manifest.stage_ended(node.id, mf.SUCCEEDED, output_uri=stage_result.output_uri)
        log.info("stage %s: done in %.1fs -> %s", node.id, elapsed, stage_result.output_uri)
        return stage_result

    def _child_run(self, node: stages.Node, key: str, *, cache_hit: bool, extra_tags: dict | None = None) -> str:
        """The node's MLflow run under the pipeline's, named for the node (a task's: `finetune.topic`)."""
        task_tag = {"ptft.task": node.task} if node.task else {}
        run_id = start_run(
            self.client,
            self.result.experiment_id,
            node.id,
            parent_run_id=self.result.mlflow_run_id,
            tags={
                "ptft.stage": node.stage.name,
                **task_tag,
                "ptft.cache_key": key,
                "ptft.cache_hit": str(cache_hit).lower(),
                "ptft.run_id": self.result.run_id,
                "ptft.attempts": "1",
                **(extra_tags or {}),
            },
        )
        self.mlflow_run_ids[node.id] = run_id
        return run_id


def _free_resources() -> dict[str, float]:
    """What the cluster has free now; nothing known without Ray (then nodes run one at a time)."""
    return ray.available_resources() if ray.is_initialized() else {}


def _slot(node: stages.Node, config: PipelineConfig) -> scheduling.Slot:
    """What the node holds of the cluster while it runs, from its stage's declaration."""
    stage = node.stage
    claim = stage.claims(node.config(config)) if stage.claims else None
    return scheduling.Slot(claim, serial=stage.name if stage.serial else None, lasting=stage.lasting)


def _stage_of(node: str) -> str:
    return stages.split_node(node)[0]


def _changes_since_last_made(storage: Path, node: stages.Node, material: dict, run_id: str) -> str | None:
    """What differs from the key material of the node's artifact in the newest other run of this
    storage that published one: why the cache has nothing for it (a field changed, an upstream
    stage made anew, a new version of the stage's code)."""
    for run in mf.list_runs(storage):
        record = run.stages.get(node.id)
        if run.run_id == run_id or record is None or not record.key:
            continue
        earlier = storage / "artifacts" / node.stage.name / record.key / "config.json"
        if not earlier.is_file():
            continue
        now = json.loads(json.dumps(material, default=str))
        changes = key_changes(read_json(earlier), now)
        return f"since run {run.run_id} (key {record.key}): {changes}" if changes else None
    return None


def key_changes(before: dict, after: dict, most: int = 5) -> str:
    """The dotted fields of two key materials that differ (`max_steps 8 -> 9`, the first `most` of
    them), then the upstream stages whose keys differ."""
    old, new = flatten(before), flatten(after)
    missing = object()
    changed = [name for name in sorted(old.keys() | new.keys()) if old.get(name, missing) != new.get(name, missing)]

    def shown(value) -> str:
        text = "(none)" if value is missing else json.dumps(value, default=str)
        return text if len(text) <= 40 else text[:37] + "..."

    upstream = [name.removeprefix("inputs.") for name in changed if name.startswith("inputs.")]
    fields = [name for name in changed if not name.startswith("inputs.")]
    said = [
        f"{name.removeprefix('config.')} {shown(old.get(name, missing))} -> {shown(new.get(name, missing))}"
        for name in fields[:most]
    ]
    if len(fields) > most:
        said.append(f"{len(fields) - most} more fields")
    if upstream:  # its key holds theirs: made anew, they make it new
        said.append(f"new output of {', '.join(upstream)}")
    return "; ".join(said)


def _check_room(node_id: str, room: Room | None, storage: Path) -> None:
    """A stage whose least hold on storage does not fit the free space there fails before it starts."""
    if room is None:
        return
    free = shutil.disk_usage(storage).free
    if free >= room.bytes:
        return
    from rich.filesize import decimal

    raise StageFailure(
        f"stage {node_id} needs at least {decimal(room.bytes)} on the storage's disk, which has {decimal(free)} free "
        f"({storage}): {room.what}. Free space there, or {room.fix}"
    )


def _ensure_side_effect(
    stage: Stage, config: PipelineConfig, inputs: Inputs, stage_result: StageResult, ctx: StageContext
) -> StageResult:
    """A reused artifact's side effect, verified in this run's place and redone if missing."""
    if stage.side_effect is None:
        return stage_result
    return stage.side_effect.ensure(config, inputs, stage_result, ctx)


def _publish(
    stage: Stage, partial: Path, final_dir: Path, stage_result: StageResult, provenance: dict, replace: bool = False
) -> StageResult:
    """Write `_SUCCESS` into the partial folder, then rename it into place: readers see either no
    folder or a complete one. Returns the result with its URIs pointing into the final folder.

    Two runs that share a key may finish the same stage side by side: the first to publish wins and
    the second uses its artifact, never deleting what the other (or a Serve replica) may be reading.
    Only a forced re-run (`replace`) or crash debris (no `_SUCCESS`) replaces a folder."""
    output = stage_result.output_uri
    inside = output == str(partial) or output.startswith(f"{partial}/")
    outputs = stage.outputs.model_validate(stage_result.outputs).model_dump(mode="json")
    success = {
        **provenance,
        "metrics": stage_result.metrics,
        "outputs": outputs,
        "output": os.path.relpath(output, partial) if inside else output,
        "output_inside": inside,
        "files": inventory(Path(output)) if inside else None,  # what a cache hit checks is still there
    }
    write_json(partial / SUCCESS, success)
    trash = final_dir.parent / f".{final_dir.name}.old-{uuid.uuid4().hex[:6]}"
    if final_dir.exists() and (replace or not (final_dir / SUCCESS).is_file()):
        final_dir.rename(trash)
    try:
        partial.rename(final_dir)  # fails when the folder is there and not empty
    except OSError:
        if not (final_dir / SUCCESS).is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)
        console.warn(f"[ptft] another run published {final_dir} first (same key): this run uses that artifact")
    shutil.rmtree(trash, ignore_errors=True)
    return _load_result(stage, final_dir)


def _artifact_intact(node: stages.Node, final_dir: Path) -> bool:
    """Whether a published artifact is still what its stage made: a model's weights matching the
    checksum its stage recorded, and every file it had, of the same size (a small file: the same
    content). Files are not checked in artifacts published before ptft recorded them."""
    success = read_json(final_dir / SUCCESS)
    result = _load_result(node.stage, final_dir, success)
    if recorded := getattr(result.outputs, "weights_sha256", None):
        try:
            found = weights_sha256(Path(result.output_uri))
        except OSError as error:
            found = f"unreadable ({error})"
        if found != recorded:
            console.warn(
                f"[ptft] {node.id:<8} the cached model in {result.output_uri} no longer matches its recorded "
                f"checksum (sha256 {recorded[:12]}..., now {found[:12]}...): it is set aside and the stage runs again"
            )
            return False
    changes = inventory_changes(Path(result.output_uri), success.get("files") or {})
    if changes:
        shown = "; ".join(changes[:3]) + (f"; {len(changes) - 3} more" if len(changes) > 3 else "")
        console.warn(
            f"[ptft] {node.id:<8} the cached artifact in {result.output_uri} changed since it was published "
            f"({shown}): it is set aside and the stage runs again"
        )
        return False
    return True


def _set_aside(final_dir: Path) -> None:
    """Move a damaged artifact out of the cache (kept for a look, never served): another run that
    shares its key may hold it open, so it is renamed, not deleted."""
    final_dir.rename(
        final_dir.with_name(f".{final_dir.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    )


def _load_result(stage: Stage, final_dir: Path, success: dict | None = None) -> StageResult:
    """A stage's result from its published folder (a cache hit needs nothing else); `success`: its
    `_SUCCESS`, when read already."""
    success = success if success is not None else read_json(final_dir / SUCCESS)
    output = success["output"]
    uri = str(final_dir / output) if success["output_inside"] else output
    outputs = stage.outputs.model_validate(success["outputs"])
    return StageResult(
        output_uri=os.path.normpath(uri) if success["output_inside"] else uri,
        metrics=success["metrics"],
        outputs=outputs,
    )


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text if len(text) <= 2000 else text[:1997] + "..."
