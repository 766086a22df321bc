"""The runner: starts (or joins) Ray, opens the MLflow run tree, and runs the stages in order,
handing each stage the URIs its upstream stages wrote.

Artifacts live under `<storage>/artifacts/<stage>/<key>/` with a `_SUCCESS` marker written last.
The key hashes the stage's config and its inputs (see `stage_key`).
"""

from __future__ import annotations

import hashlib
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

from components import accelerator, data, finetune, pretrain, serve, tokenize, tune
from components.stage import StageContext, StageResult, write_json
from components.tracking import MlflowTracker, ensure_experiment, flatten, start_run
from pipelines.config import PipelineConfig, resolved_dict

log = logging.getLogger(__name__)

STAGES = ("tokenize", "pretrain", "tune", "finetune", "serve")
# Bump a stage's version when its code changes what it writes: the key changes with it.
STAGE_VERSIONS = {"tokenize": "1", "pretrain": "1", "tune": "1", "finetune": "1", "serve": "1"}


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


def run(config: PipelineConfig, *, on_stage: Callable[[str, StageResult], None] | None = None) -> PipelineResult:
    """Run every stage; returns their results. Serve keeps running until `serve.shutdown()` or Ray exits."""
    storage = config.storage_path()
    storage.mkdir(parents=True, exist_ok=True)
    _init_ray(config)
    client = MlflowClient(config.tracking_uri())
    # The embedded store keeps artifacts beside it; a tracking server decides for itself.
    artifact_location = str(storage / "mlartifacts") if config.tracking.uri is None else None
    experiment_id = ensure_experiment(client, config.experiment_name(), artifact_location)
    run_id = new_run_id()
    parent_id = _start_parent_run(client, config, experiment_id, run_id)
    result = PipelineResult(run_id, parent_id, experiment_id, config.tracking_uri())
    runner = _StageRunner(config, client, result, storage)
    status = "FAILED"
    try:
        for stage in STAGES:
            stage_result = runner.run(stage)
            if on_stage:
                on_stage(stage, stage_result)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent_id, status=status)
    return result


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def _init_ray(config: PipelineConfig) -> None:
    if ray.is_initialized():
        return
    use_gpu = config.pretrain.workers.use_gpu or config.finetune.workers.use_gpu
    # The driver imports DeepSpeed-free code only, but Tune trials and Data tasks inherit this env.
    runtime_env = {"env_vars": accelerator.deepspeed_env(use_gpu)}
    # Inside a Ray Job (`ptft submit`) RAY_ADDRESS names the cluster the job runs on.
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    local = {} if address else {"num_cpus": config.ray.num_cpus, "dashboard_host": config.ray.dashboard_host}
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, configure_logging=False, **local)


def _start_parent_run(client: MlflowClient, config: PipelineConfig, experiment_id: str, run_id: str) -> str:
    resolved = resolved_dict(config)
    config_hash = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]
    parent_id = start_run(client, experiment_id, f"pipeline-{run_id}", tags={
        "ptft.run_id": run_id, "ptft.config_hash": config_hash, "ptft.git_sha": _git_sha(),
        "ptft.pipeline": config.name,
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
    """Content key of a stage's output: its name, code version, config and input keys/fingerprints."""
    payload = {"stage": stage, "version": STAGE_VERSIONS[stage], "config": stage_config, "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _StageRunner:
    """Runs one stage at a time: its key, its folder, its MLflow child run, its `_SUCCESS` marker."""

    def __init__(self, config: PipelineConfig, client: MlflowClient, result: PipelineResult, storage: Path):
        self.config = config
        self.client = client
        self.result = result
        self.storage = storage
        self.keys: dict[str, str] = {}
        self.mlflow_run_ids: dict[str, str] = {}

    def run(self, stage: str) -> StageResult:
        stage_config, inputs, call = self._wiring(stage)
        key = stage_key(stage, stage_config, inputs)
        self.keys[stage] = key
        output_dir = self.storage / "artifacts" / stage / key
        if output_dir.exists():
            shutil.rmtree(output_dir)  # a rerun rewrites the folder; caching reuses it (later)
        output_dir.mkdir(parents=True)
        mlflow_run_id = start_run(self.client, self.result.experiment_id, stage,
                                  parent_run_id=self.result.mlflow_run_id,
                                  tags={"ptft.stage": stage, "ptft.cache_key": key, "ptft.cache_hit": "false",
                                        "ptft.run_id": self.result.run_id})  # fmt: skip
        self.mlflow_run_ids[stage] = mlflow_run_id
        tracker = MlflowTracker(self.config.tracking_uri(), mlflow_run_id, owns_run=True)
        tracker.log_params(flatten(stage_config))
        ctx = StageContext(pipeline_run_id=self.result.run_id, stage=stage, output_dir=output_dir,
                           storage=self.storage, tracking_uri=self.config.tracking_uri(),
                           experiment_id=self.result.experiment_id, mlflow_run_id=mlflow_run_id,
                           seed=self.config.seed)  # fmt: skip
        started = time.perf_counter()
        log.info("stage %s: starting (key %s)", stage, key)
        try:
            stage_result = call(ctx)
        except BaseException:
            tracker.close("KILLED" if _interrupted() else "FAILED")
            raise
        elapsed = time.perf_counter() - started
        # Training loops log their own metric histories; add only the summaries they did not log.
        logged = set(self.client.get_run(mlflow_run_id).data.metrics)
        summary = {key: value for key, value in stage_result.metrics.items() if key not in logged}
        tracker.log_metrics({**summary, "stage/seconds": elapsed}, step=0)
        tracker.close("FINISHED")
        write_json(output_dir / "_SUCCESS", {"metrics": stage_result.metrics, "mlflow_run_id": mlflow_run_id,
                                             "pipeline_run_id": self.result.run_id, "seconds": elapsed})  # fmt: skip
        log.info("stage %s: done in %.1fs -> %s", stage, elapsed, stage_result.output_uri)
        self.result.stages[stage] = stage_result
        return stage_result

    def _wiring(self, stage: str):
        """(stage config as logged, input keys, the call) for a stage: the whole graph lives here."""
        cfg, done, keys = self.config, self.result.stages, self.keys
        if stage == "tokenize":
            fingerprints = {split: data.fingerprint(source) for split, source in _sources(cfg).items()}
            stage_cfg = {"tokenize": cfg.tokenize.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json")}
            return stage_cfg, fingerprints, lambda ctx: tokenize.run(cfg.tokenize, cfg.data, ctx)
        if stage == "pretrain":
            tokenized = done["tokenize"].output_uri
            return (cfg.pretrain.model_dump(mode="json"), {"tokenize": keys["tokenize"], "seed": str(cfg.seed)},
                    lambda ctx: pretrain.run(cfg.pretrain, tokenized, ctx))  # fmt: skip
        if stage == "tune":
            pretrained, tokenized = done["pretrain"].output_uri, done["tokenize"].output_uri
            # Trials train with finetune's defaults and DeepSpeed settings: they are part of the key.
            stage_cfg = {"tune": cfg.tune.model_dump(mode="json"),
                         "defaults": cfg.finetune.defaults.model_dump(mode="json"),
                         "deepspeed": cfg.finetune.deepspeed.model_dump(mode="json")}  # fmt: skip
            return (stage_cfg, {"pretrain": keys["pretrain"], "tokenize": keys["tokenize"]},
                    lambda ctx: _tune_or_skip(cfg, pretrained, tokenized, ctx))  # fmt: skip
        if stage == "finetune":
            pretrained, tokenized = done["pretrain"].output_uri, done["tokenize"].output_uri
            best = done["tune"].output_uri if cfg.tune.enabled else None
            return (cfg.finetune.model_dump(mode="json"), {"tune": keys["tune"], "pretrain": keys["pretrain"]},
                    lambda ctx: finetune.run(cfg.finetune, pretrained, tokenized, best, ctx,
                                             registered_model_name=cfg.registered_model_name()))  # fmt: skip
        registered = done["finetune"].outputs["registered"]
        return (cfg.serve.model_dump(mode="json"), {"finetune": keys["finetune"]},
                lambda ctx: serve.run(cfg.serve, {**registered, "run_id": self.mlflow_run_ids["finetune"]}, ctx))


def _tune_or_skip(cfg: PipelineConfig, pretrained: str, tokenized: str, ctx: StageContext) -> StageResult:
    if not cfg.tune.enabled:
        return StageResult(output_uri=str(ctx.output_dir), metrics={"tune/trials": 0})
    return tune.run(cfg.tune, pretrained, tokenized, cfg.finetune.defaults, cfg.finetune.deepspeed, ctx)


def _sources(cfg: PipelineConfig) -> dict:
    task = cfg.data.task
    return {"corpus": cfg.data.corpus.source, "train": task.train, "validation": task.validation, "test": task.test}


def _interrupted() -> bool:
    import sys

    return isinstance(sys.exc_info()[1], KeyboardInterrupt)
