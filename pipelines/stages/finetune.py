"""finetune: train the task's model with the sweep's best config, evaluate it on test, register it.

Registration is a side effect in a place the artifact does not own (the registry named by
`name` in the store of `tracking.uri`), so it is checked on every reuse: a cached model is
registered wherever this run's registry lacks it, and never twice (versions carry the key of the
artifact they came from, `ptft.cache_key`)."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from components import data
from components.stage import StageContext, StageResult
from pipelines.pipeline_config import PipelineConfig
from pipelines.stages.base import Inputs, SideEffect, Stage, fine_tuning_room
from pipelines.stages.tune import task_data, task_reads

log = logging.getLogger(__name__)


class RegisteredVersion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    version: str
    aliases: list[str] = []
    model_uri: str
    run_id: str | None = None  # the MLflow run the version was logged in


class FinetuneOutputs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    registered: RegisteredVersion
    weights_sha256: str


def _settings(config: PipelineConfig) -> dict:
    return config.finetune.model_dump(mode="json")


def _reads(config: PipelineConfig, inputs: Inputs, extras: dict) -> list:
    return task_reads(inputs, ("train", "validation", "test"))


def _run(config: PipelineConfig, inputs: Inputs, ctx: StageContext) -> StageResult:
    from components import finetune
    from components.ranking import Ranking

    best = inputs.uri("tune") if config.tune.enabled else None
    return finetune.run(
        config.finetune,
        inputs.uri("pretrain"),
        task_data(inputs),
        best,
        ctx,
        registered_model_name=config.registered_model_name(),
        test_split=data.fingerprint(config.data.task.test),
        task=config.data.task.type,
        ranking=Ranking.of(config.tune),  # the exported epoch is picked as the sweep picked trials' epochs
        task_options={"seq_len": config.tokenize.seq_len, "doc_stride": config.data.task.doc_stride},
    )


def _ensure_registered(config: PipelineConfig, inputs: Inputs, result: StageResult, ctx: StageContext) -> StageResult:
    """The artifact's model in this run's registry: found by its key, else registered now."""
    from components import registry

    name, tracking_uri = config.registered_model_name(), config.tracking_uri()
    found = registry.find_version(tracking_uri, name, {registry.CACHE_KEY_TAG: ctx.cache_key})
    if found is None:
        log.info("finetune: %s at %s has no version of artifact %s; registering it", name, tracking_uri, ctx.cache_key)
        from components import finetune

        test_split = data.fingerprint(config.data.task.test)
        found = finetune.register(
            Path(result.output_uri), result.metrics, ctx, name=name, test_split=test_split, task=config.data.task.type
        )
        return _describe_version(config, inputs, _with(result, found), ctx)
    return _with(result, found)


def _with(result: StageResult, registered: dict) -> StageResult:
    """The result, its outputs naming this registry's version."""
    outputs = FinetuneOutputs(
        registered=RegisteredVersion.model_validate(registered), weights_sha256=result.outputs.weights_sha256
    )
    return StageResult(result.output_uri, result.metrics, outputs, result.cached)


def _describe_version(config: PipelineConfig, inputs: Inputs, result: StageResult, ctx: StageContext) -> StageResult:
    """The version's description and tags link the runs it came from."""
    from components import registry
    from pipelines import lineage

    registered = result.outputs.registered
    description, tags = lineage.model_version_lineage(
        {**inputs.mlflow_runs, "finetune": ctx.mlflow_run_id},
        pipeline_run_id=ctx.pipeline_run_id,
        experiment_id=ctx.experiment_id,
        tracking_uri=ctx.tracking_uri,
    )
    registry.describe_version(ctx.tracking_uri, registered.name, registered.version, description, tags)
    return result


STAGE = Stage(
    name="finetune",
    version="9",  # 9: translations decoded with the model's budget; 8: QA windows kept, every row counted
    upstream=("tokenize", "pretrain", "prepare", "tune"),
    settings=_settings,
    run=_run,
    outputs=FinetuneOutputs,
    not_in_key=("log_every", "workers.max_failures", "workers.placement_strategy"),
    reads=_reads,
    progress="steps",
    room=lambda config, inputs: fine_tuning_room(inputs),
    claims=lambda config: config.finetune.workers.resources(),
    per_task=True,
    when=lambda config: config.has_tasks(),  # a config without tasks pre-trains only
    side_effect=SideEffect("register", ensure=_ensure_registered, after_run=_describe_version),
)
