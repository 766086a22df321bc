"""tune: the sweep (Ray Tune) over fine-tuning hyperparameters; its best config goes to finetune."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from components.stage import StageResult
from pipelines.pipeline_config import PipelineConfig
from pipelines.stages.base import Inputs, Stage, fine_tuning_room


class TuneOutputs(BaseModel):
    """The best trial and its sampled values (none when the sweep is turned off)."""

    model_config = ConfigDict(extra="forbid")
    best_config: dict[str, Any] = {}
    best_trial: str | None = None


def _settings(config: PipelineConfig) -> dict:
    # Trials train with finetune's defaults and DeepSpeed settings: they are part of the key.
    return {
        "tune": config.tune.model_dump(mode="json"),
        "defaults": config.finetune.trial_defaults().model_dump(mode="json"),
        "deepspeed": config.finetune.deepspeed.model_dump(mode="json"),
    }


def task_data(inputs: Inputs) -> str:
    """The folder with the task's `labels.json` and `task/<split>/`: the task's `prepare`."""
    return inputs.uri("prepare")


def task_reads(inputs: Inputs, splits: tuple[str, ...]) -> list:
    """The tokenized task splits, whose digest is the key of the stage that made them (it
    fingerprints the sources and the tokenization)."""
    from pipelines.lineage import DatasetRead

    tokenized, key = task_data(inputs), inputs.keys["prepare"]
    return [DatasetRead(f"task/{split}", f"{tokenized}/task/{split}", key, split) for split in splits]


def _reads(config: PipelineConfig, inputs: Inputs, extras: dict) -> list:
    return task_reads(inputs, ("train", "validation"))


def _run(config: PipelineConfig, inputs: Inputs, ctx) -> StageResult:
    if not config.tune.enabled:
        return StageResult(output_uri=str(ctx.output_dir), metrics={"tune/trials": 0})
    from components import tune

    return tune.run(
        config.tune,
        inputs.uri("pretrain"),
        task_data(inputs),
        config.finetune.trial_defaults(),
        config.finetune.deepspeed,
        ctx,
        task=config.data.task.type,
    )


STAGE = Stage(
    name="tune",
    version="8",
    upstream=("tokenize", "pretrain", "prepare"),
    settings=_settings,
    run=_run,
    outputs=TuneOutputs,
    # A reused trial process builds its model, engine and RNG state from the trial's seed or
    # checkpoint, as a new one does: reuse changes the sweep's wall time, not its results.
    not_in_key=("tune.trial_max_failures", "tune.progress_every_s", "tune.reuse_actors"),
    reads=_reads,
    progress="trials",
    # A checkpoint per running trial (PBT keeps every epoch's); trials export no model.
    room=lambda config, inputs: fine_tuning_room(
        inputs, config.tune.concurrent_trials(), models=0, fix="run fewer trials at once (tune.max_concurrent_trials)"
    ),
    claims=lambda config: config.tune.resources(),
    per_task=True,
    when=lambda config: config.has_tasks(),  # a config without tasks pre-trains only
)
