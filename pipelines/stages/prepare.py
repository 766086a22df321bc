"""prepare: a task's labelled splits tokenized with the pipeline's tokenizer (`labels.json`,
`task/<split>/`), once per task. Its key holds the task's data and seq_len, not the corpus's:
adding a task or editing its data adds or redoes its own prepare, while the tokenizer, the
corpus blocks and the pre-training stay cached."""

from __future__ import annotations

from components import data
from components.stage import StageContext, StageResult
from pipelines.pipeline_config import PipelineConfig
from pipelines.stages.base import Inputs, Stage

SPLITS = ("train", "validation", "test")


def _settings(config: PipelineConfig) -> dict:
    # The tokenizer's own settings are in the tokenize key; these shape the task's rows.
    return {"task": config.data.task.model_dump(mode="json"), "seq_len": config.tokenize.seq_len}


def _fingerprints(config: PipelineConfig, inputs: Inputs) -> dict:
    return {split: data.fingerprint(getattr(config.data.task, split)) for split in SPLITS}


def _reads(config: PipelineConfig, inputs: Inputs, extras: dict) -> list:
    from pipelines.lineage import DatasetRead

    task = config.data.task
    return [DatasetRead(split, getattr(task, split), extras[split], split) for split in SPLITS]


def _run(config: PipelineConfig, inputs: Inputs, ctx: StageContext) -> StageResult:
    from components import tokenize

    return tokenize.run_task(config.tokenize, config.data.task, f"{inputs.uri('tokenize')}/tokenizer", ctx)


STAGE = Stage(
    name="prepare",
    version="3",  # 3: a long entities sentence is cut into windows; 2: kept its unseen tags
    upstream=("tokenize",),
    settings=_settings,
    run=_run,
    key_extras=_fingerprints,
    reads=_reads,
    claims=lambda config: {"CPU": 1.0},  # Ray Data tokenizes with what is free; one CPU at least
    per_task=True,
    when=lambda config: config.has_tasks(),
)
