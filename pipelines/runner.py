"""The runner: starts (or joins) Ray, opens the MLflow run tree, and runs the stages in order,
handing each stage the URIs its upstream stages wrote. It owns everything the stages do not
know about: cache keys, the manifest, resume, and publishing artifacts.

Artifacts live under `<storage>/artifacts/<stage>/<key>/`. A stage writes into a hidden partial
folder; the runner writes `_SUCCESS` (metrics, outputs, producing MLflow run) into it and renames
it into place, so a folder with that name is always complete. A key with `_SUCCESS` is a cache hit.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient

from components import accelerator, data
from components.stage import StageContext, StageResult, read_json, write_json
from components.tracking import (
    MlflowTracker,
    close_orphans,
    ensure_experiment,
    flatten,
    redact_tree,
    reopen_run,
    start_run,
)
from pipelines import lineage, progress
from pipelines import manifest as mf
from pipelines.config import ConfigError, PipelineConfig, resolved_dict

log = logging.getLogger(__name__)

STAGES = mf.STAGE_ORDER
# Bump a stage's version when its code changes what it writes: the key changes with it.
STAGE_VERSIONS = {"tokenize": "2", "pretrain": "5", "tune": "7", "finetune": "6", "serve": "2"}
# Settings that change how a stage runs but not what it writes: left out of its cache key.
NOT_IN_KEY = {
    "pretrain": ("log_every", "checkpoint_every", "workers.max_failures", "workers.placement_strategy"),
    "finetune": ("log_every", "workers.max_failures", "workers.placement_strategy"),
    "tune": ("tune.trial_max_failures", "tune.progress_every_s"),
}
SUCCESS = "_SUCCESS"
# How a stop arrives: Ctrl-C/SIGTERM (ptft's handler) or SystemExit (Ray's SIGTERM handler in a job driver).
_STOPPED = (KeyboardInterrupt, SystemExit)


@dataclass
class PipelineResult:
    run_id: str
    mlflow_run_id: str
    experiment_id: str
    tracking_uri: str
    stages: dict[str, StageResult] = field(default_factory=dict)

    @property
    def endpoint(self) -> str | None:
        result = self.stages.get("serve")
        return result.output_uri if result else None


def run(
    config: PipelineConfig, *, rerun: str | None = None, resume: str | None = None, until: str | None = None,
    on_stage: Callable[[str, StageResult], None] | None = None, progress_every_s: float | None = None,
    worker_logs: bool = True,
) -> PipelineResult:  # fmt: skip
    """Run every stage, reusing cached artifacts; returns their results.

    rerun: force this stage and every stage after it to run again (no cache).
    until: stop after this stage (`ptft sweep` runs until tune); the run's manifest lists only the
        stages up to it, so a resume of that run stops there too.
    resume: continue this pipeline run id: finished stages are reused, an interrupted training
        stage or sweep continues from its checkpoints, its MLflow runs are continued.
    progress_every_s: print stage transitions, and the running stage's progress this often.
    worker_logs: stream the Ray workers' logs to this process (off for `ptft run --quiet`).
    Serve keeps running until `serve.shutdown()` or Ray exits.
    """
    for option, value in (("rerun", rerun), ("until", until)):
        if value is not None and value not in STAGES:
            raise ValueError(f"{option}={value!r}: not a stage; choose one of {', '.join(STAGES)}")
    storage = config.storage_path()
    storage.mkdir(parents=True, exist_ok=True)
    _init_ray(config, worker_logs=worker_logs)
    _preflight(config)
    client = MlflowClient(config.tracking_uri())
    # The embedded store keeps artifacts beside it; a tracking server decides for itself.
    artifact_location = str(storage / "mlartifacts") if config.tracking.uri is None else None
    experiment_id = ensure_experiment(client, config.experiment_name(), artifact_location)
    if resume:
        manifest = _reopen_pipeline_run(client, storage, resume, experiment_id)
    else:
        stages = STAGES[: STAGES.index(until) + 1] if until else STAGES
        manifest = mf.Manifest.create(storage, new_run_id(), config.name, stages, resolved_dict(config))
        manifest.mlflow_run_id = _start_parent_run(client, config, experiment_id, manifest.run_id)
    manifest.tracking_uri, manifest.experiment_id = config.tracking_uri(), experiment_id
    manifest.save()
    result = PipelineResult(manifest.run_id, manifest.mlflow_run_id, experiment_id, config.tracking_uri())
    forced = set(STAGES[STAGES.index(rerun) :]) if rerun else set()
    runner = _StageRunner(config, client, result, storage, manifest, forced)
    reporter = progress.Reporter(manifest, client, every_s=progress_every_s).start() if progress_every_s else None
    status = "FAILED"
    try:
        for stage in [name for name in STAGES if name in manifest.stages]:  # a sweep's run ends at tune
            stage_result = runner.run(stage)
            if on_stage:
                on_stage(stage, stage_result)
        status = "FINISHED"
    except _STOPPED:
        status = "KILLED"
        raise
    finally:
        manifest.finished({"FINISHED": mf.SUCCEEDED, "KILLED": mf.KILLED}.get(status, mf.FAILED))
        if reporter:
            reporter.stop()
        client.set_terminated(manifest.mlflow_run_id, status=status)
    return result


def _preflight(config: PipelineConfig) -> None:
    """On a cluster: storage visible from every node, MLflow reachable, the workers fit; before
    any run is opened or compute starts."""
    if not (config.ray.address or os.environ.get("RAY_ADDRESS")):
        return
    from pipelines import preflight

    problems = preflight.check_cluster(config)
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


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def _init_ray(config: PipelineConfig, *, worker_logs: bool = True) -> None:
    if ray.is_initialized():
        return
    use_gpu = config.pretrain.workers.use_gpu or config.finetune.workers.use_gpu
    # The driver imports DeepSpeed-free code only, but Tune trials and Data tasks inherit this env.
    runtime_env = {"env_vars": accelerator.deepspeed_env(use_gpu)}
    # Inside a Ray Job (`ptft submit`) RAY_ADDRESS names the cluster the job runs on.
    # Without either, start a private local Ray ("local"), never silently join a `ray start` cluster.
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    local = {} if address else {"num_cpus": config.ray.num_cpus, "dashboard_host": config.ray.dashboard_host}
    address = address or "local"
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=worker_logs, configure_logging=False, **local)


def _start_parent_run(client: MlflowClient, config: PipelineConfig, experiment_id: str, run_id: str) -> str:
    resolved = redact_tree(resolved_dict(config))  # no credentials in MLflow, even inside a URI
    config_hash = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]
    parent_id = start_run(client, experiment_id, f"pipeline-{run_id}", tags={
        "ptft.run_id": run_id, "ptft.config_hash": config_hash, "ptft.git_sha": _git_sha(),
        "ptft.pipeline": config.name, "ptft.attempts": "1",
    })  # fmt: skip
    tracker = MlflowTracker(config.tracking_uri(), parent_id)
    tracker.log_params(flatten(resolved))
    client.log_dict(parent_id, resolved, "config/resolved.json")
    return parent_id


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stage_key(stage: str, stage_config: dict, inputs: dict[str, str]) -> str:
    """Content key of a stage's output: its name, code version, the config fields that shape its
    output, and its inputs' keys and data fingerprints."""
    shaping = _without(stage_config, NOT_IN_KEY.get(stage, ()))
    payload = {"stage": stage, "version": STAGE_VERSIONS[stage], "config": shaping, "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    """Runs one stage at a time: its key, the cache, its MLflow child run, the manifest, publishing."""

    def __init__(self, config: PipelineConfig, client: MlflowClient, result: PipelineResult, storage: Path,
                 manifest: mf.Manifest, forced: set[str]):  # fmt: skip
        self.config = config
        self.client = client
        self.result = result
        self.storage = storage
        self.manifest = manifest
        self.forced = forced
        self.keys: dict[str, str] = {}
        self.mlflow_run_ids: dict[str, str] = {}

    def run(self, stage: str) -> StageResult:
        stage_config, inputs, call = self._wiring(stage)
        key = stage_key(stage, stage_config, inputs)
        self.keys[stage] = key
        final_dir = self.storage / "artifacts" / stage / key
        record = self.manifest.stages[stage]
        if record.status in mf.DONE and record.key == key and (final_dir / SUCCESS).is_file():
            stage_result = self._reuse_own(stage, final_dir, record)  # resumed: done in an earlier attempt
        elif stage not in self.forced and (final_dir / SUCCESS).is_file():
            stage_result = self._cache_hit(stage, key, stage_config, final_dir, inputs)
        else:
            stage_result = self._execute(stage, key, stage_config, call, final_dir, inputs)
        if stage == "finetune" and not stage_result.cached:
            lineage.describe_model_version(self.client, stage_result.outputs["registered"], self.mlflow_run_ids,
                                           pipeline_run_id=self.result.run_id, experiment_id=self.result.experiment_id,
                                           tracking_uri=self.config.tracking_uri())  # fmt: skip
        self.result.stages[stage] = stage_result
        return stage_result

    def _record_lineage(self, stage: str, run_id: str, inputs: dict[str, str]) -> None:
        """The stage run's dataset inputs and the upstream runs it consumed."""
        lineage.tag_upstream(self.client, run_id, stage, self.mlflow_run_ids)
        lineage.log_datasets(self.client, run_id, self._reads(stage, inputs))

    def _reads(self, stage: str, inputs: dict[str, str]) -> list[lineage.DatasetRead]:
        """What a stage reads: the configured sources (tokenize), else the tokenized folders, whose
        digest is the tokenize key (it fingerprints the sources and the tokenization)."""
        if stage == "tokenize":
            return [lineage.DatasetRead(split, source, inputs[split], "corpus" if split == "corpus" else split)
                    for split, source in _sources(self.config).items()]  # fmt: skip
        if stage == "serve":
            return []
        tokenized, key = self.result.stages["tokenize"].output_uri, self.keys["tokenize"]
        if stage == "pretrain":
            return [lineage.DatasetRead("pretrain_blocks", f"{tokenized}/pretrain_blocks", key, "training")]
        splits = ("train", "validation") if stage == "tune" else ("train", "validation", "test")
        return [lineage.DatasetRead(f"task/{split}", f"{tokenized}/task/{split}", key, split) for split in splits]

    def _reuse_own(self, stage: str, final_dir: Path, record: mf.StageRecord) -> StageResult:
        self.mlflow_run_ids[stage] = record.mlflow_run_id
        stage_result = _load_result(final_dir)
        stage_result.cached = record.status == mf.CACHED
        log.info("stage %s: done in an earlier attempt of this run", stage)
        return self._after_hit(stage, stage_result, final_dir)

    def _cache_hit(self, stage: str, key: str, stage_config: dict, final_dir: Path, inputs: dict) -> StageResult:
        success = read_json(final_dir / SUCCESS)
        producer = success["mlflow_run_id"]
        run_id = self._child_run(stage, key, cache_hit=True, extra_tags={
            "ptft.cached_from_run_id": producer,
            "ptft.cached_from_pipeline_run": success.get("pipeline_run_id", ""),
        })  # fmt: skip
        self._record_lineage(stage, run_id, inputs)
        self.manifest.stage_started(stage, key, run_id)
        tracker = MlflowTracker(self.config.tracking_uri(), run_id, owns_run=True)
        tracker.log_params(flatten(stage_config))
        stage_result = _load_result(final_dir)
        stage_result.cached = True
        try:
            stage_result = self._after_hit(stage, stage_result, final_dir)
        except BaseException as error:
            self.manifest.stage_ended(stage, mf.FAILED, error=_describe(error))
            tracker.close("KILLED" if isinstance(error, _STOPPED) else "FAILED")
            raise
        tracker.log_metrics(stage_result.metrics, step=0)
        tracker.close("FINISHED")
        self.manifest.stage_ended(stage, mf.CACHED, output_uri=stage_result.output_uri, cached_from=producer)
        log.info("stage %s: cache hit (key %s, produced by MLflow run %s)", stage, key, producer)
        return stage_result

    def _after_hit(self, stage: str, stage_result: StageResult, final_dir: Path) -> StageResult:
        """A reused serve artifact records a deployment: bring it back if it is not running."""
        if stage == "serve":
            _stage_module("serve").ensure_deployed(self.config.serve, stage_result.outputs, self.config.tracking_uri())
        return stage_result

    def _execute(self, stage: str, key: str, stage_config: dict, call, final_dir: Path, inputs: dict) -> StageResult:
        record = self.manifest.stages[stage]
        continuing = record.mlflow_run_id is not None and record.key == key
        if continuing:
            run_id = record.mlflow_run_id  # a restarted attempt continues its own run
            reopen_run(self.client, run_id)
        else:
            run_id = self._child_run(stage, key, cache_hit=False)
            self._record_lineage(stage, run_id, inputs)
        self.mlflow_run_ids[stage] = run_id
        self.manifest.stage_started(stage, key, run_id)
        tracker = MlflowTracker(self.config.tracking_uri(), run_id, owns_run=True, resumed=continuing)
        tracker.log_params(flatten(stage_config))
        partial = final_dir.parent / f".{key}.partial-{self.result.run_id}"
        shutil.rmtree(partial, ignore_errors=True)  # the stage's resumable state lives in Ray's storage
        partial.mkdir(parents=True)
        ctx = StageContext(pipeline_run_id=self.result.run_id, stage=stage, output_dir=partial,
                           storage=self.storage, tracking_uri=self.config.tracking_uri(),
                           experiment_id=self.result.experiment_id, mlflow_run_id=run_id,
                           seed=self.config.seed, attempt=record.attempts)  # fmt: skip
        started = time.perf_counter()
        log.info("stage %s: starting (key %s, attempt %d)", stage, key, record.attempts)
        try:
            stage_result = call(ctx)
        except BaseException as error:
            interrupted = isinstance(error, _STOPPED)
            # The local manifest first: a stopped Ray Job is SIGKILLed 3 s after its SIGTERM, and
            # the MLflow calls may take longer than that.
            self.manifest.stage_ended(stage, mf.KILLED if interrupted else mf.FAILED, error=_describe(error))
            if interrupted:
                self.manifest.finished(mf.KILLED)  # the run goes down with the stage
            tracker.close("KILLED" if interrupted else "FAILED")
            raise
        elapsed = time.perf_counter() - started
        # Training loops log their own metric histories; add only the summaries they did not log.
        logged = set(self.client.get_run(run_id).data.metrics)
        summary = {name: value for name, value in stage_result.metrics.items() if name not in logged}
        tracker.log_metrics({**summary, "stage/seconds": elapsed}, step=0)
        tracker.close("FINISHED")
        stage_result = _publish(partial, final_dir, stage_result, {
            "mlflow_run_id": run_id, "pipeline_run_id": self.result.run_id, "seconds": elapsed,
        })  # fmt: skip
        self.manifest.stages[stage].work_seconds = elapsed
        self.manifest.stage_ended(stage, mf.SUCCEEDED, output_uri=stage_result.output_uri)
        log.info("stage %s: done in %.1fs -> %s", stage, elapsed, stage_result.output_uri)
        return stage_result

    def _child_run(self, stage: str, key: str, *, cache_hit: bool, extra_tags: dict | None = None) -> str:
        run_id = start_run(self.client, self.result.experiment_id, stage, parent_run_id=self.result.mlflow_run_id,
                           tags={"ptft.stage": stage, "ptft.cache_key": key, "ptft.cache_hit": str(cache_hit).lower(),
                                 "ptft.run_id": self.result.run_id, "ptft.attempts": "1",
                                 **(extra_tags or {})})  # fmt: skip
        self.mlflow_run_ids[stage] = run_id
        return run_id

    def _wiring(self, stage: str):
        """(stage config as logged, input keys, the call) for a stage: the whole graph lives here."""
        cfg, done, keys = self.config, self.result.stages, self.keys
        if stage == "tokenize":
            fingerprints = {split: data.fingerprint(source) for split, source in _sources(cfg).items()}
            stage_cfg = {"tokenize": cfg.tokenize.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json")}
            return stage_cfg, fingerprints, lambda ctx: _stage_module("tokenize").run(cfg.tokenize, cfg.data, ctx)
        if stage == "pretrain":
            tokenized = done["tokenize"].output_uri
            return (cfg.pretrain.model_dump(mode="json"), {"tokenize": keys["tokenize"], "seed": str(cfg.seed)},
                    lambda ctx: _stage_module("pretrain").run(cfg.pretrain, tokenized, ctx))  # fmt: skip
        if stage == "tune":
            pretrained, tokenized = done["pretrain"].output_uri, done["tokenize"].output_uri
            # Trials train with finetune's defaults and DeepSpeed settings: they are part of the key.
            stage_cfg = {"tune": cfg.tune.model_dump(mode="json"),
                         "defaults": cfg.finetune.trial_defaults().model_dump(mode="json"),
                         "deepspeed": cfg.finetune.deepspeed.model_dump(mode="json")}  # fmt: skip
            return (stage_cfg, {"pretrain": keys["pretrain"], "tokenize": keys["tokenize"]},
                    lambda ctx: _tune_or_skip(cfg, pretrained, tokenized, ctx))  # fmt: skip
        if stage == "finetune":
            pretrained, tokenized = done["pretrain"].output_uri, done["tokenize"].output_uri
            best = done["tune"].output_uri if cfg.tune.enabled else None
            return (cfg.finetune.model_dump(mode="json"), {"tune": keys["tune"], "pretrain": keys["pretrain"]},
                    lambda ctx: _stage_module("finetune").run(cfg.finetune, pretrained, tokenized, best, ctx,
                                             registered_model_name=cfg.registered_model_name(),
                                             test_split=data.fingerprint(cfg.data.task.test)))  # fmt: skip
        registered = done["finetune"].outputs["registered"]
        return (cfg.serve.model_dump(mode="json"), {"finetune": keys["finetune"]},
                lambda ctx: _stage_module("serve").run(cfg.serve, registered, ctx))  # fmt: skip


def _stage_module(stage: str):
    """A stage's module, imported when the stage first runs: a run of cache hits never pays for
    torch, transformers and DeepSpeed in the driver."""
    return importlib.import_module(f"components.{stage}")


def _tune_or_skip(cfg: PipelineConfig, pretrained: str, tokenized: str, ctx: StageContext) -> StageResult:
    if not cfg.tune.enabled:
        return StageResult(output_uri=str(ctx.output_dir), metrics={"tune/trials": 0})
    tune = _stage_module("tune")
    return tune.run(cfg.tune, pretrained, tokenized, cfg.finetune.trial_defaults(), cfg.finetune.deepspeed, ctx)


def _sources(cfg: PipelineConfig) -> dict:
    task = cfg.data.task
    return {"corpus": cfg.data.corpus.source, "train": task.train, "validation": task.validation, "test": task.test}


def _publish(partial: Path, final_dir: Path, stage_result: StageResult, provenance: dict) -> StageResult:
    """Write `_SUCCESS` into the partial folder, then rename it into place: readers see either no
    folder or a complete one. Returns the result with its URIs pointing into the final folder."""
    output = stage_result.output_uri
    inside = output == str(partial) or output.startswith(f"{partial}/")
    success = {**provenance, "metrics": stage_result.metrics, "outputs": stage_result.outputs,
               "output": os.path.relpath(output, partial) if inside else output, "output_inside": inside}  # fmt: skip
    write_json(partial / SUCCESS, success)
    if final_dir.exists():  # a forced re-run replaces the old artifact, or a crash left debris
        trash = final_dir.parent / f".{final_dir.name}.old-{uuid.uuid4().hex[:6]}"
        final_dir.rename(trash)
        partial.rename(final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        partial.rename(final_dir)
    return _load_result(final_dir)


def _load_result(final_dir: Path) -> StageResult:
    """A stage's result from its published folder (a cache hit needs nothing else)."""
    success = read_json(final_dir / SUCCESS)
    output = success["output"]
    uri = str(final_dir / output) if success["output_inside"] else output
    return StageResult(output_uri=os.path.normpath(uri) if success["output_inside"] else uri,
                       metrics=success["metrics"], outputs=success["outputs"])  # fmt: skip


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 2000 else text[:1997] + "..."
