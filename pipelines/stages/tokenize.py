"""tokenize: train (or load) the tokenizer, pack the corpus into blocks, tokenize the task splits."""

from __future__ import annotations

from components import data
from pipelines.config import PipelineConfig
from pipelines.stages.base import Inputs, Stage


def _sources(config: PipelineConfig) -> dict:
    """The corpus, and the task's splits in a config of one task (several tasks: `prepare`)."""
    task = config.data.task
    splits = {"train": task.train, "validation": task.validation, "test": task.test} if task else {}
    return {"corpus": config.data.corpus.source, **splits}


def _settings(config: PipelineConfig) -> dict:
    return {"tokenize": config.tokenize.model_dump(mode="json"), "data": config.data.model_dump(mode="json")}


def _fingerprints(config: PipelineConfig, inputs: Inputs) -> dict:
    """The data itself, not only where it is: an edited file is a new key."""
    return {split: data.fingerprint(source) for split, source in _sources(config).items()}


def _reads(config: PipelineConfig, inputs: Inputs, extras: dict) -> list:
    from pipelines.lineage import DatasetRead

    return [
        DatasetRead(split, source, extras[split], "corpus" if split == "corpus" else split)
        for split, source in _sources(config).items()
    ]


def _run(config: PipelineConfig, inputs: Inputs, ctx):
    from components import tokenize

    return tokenize.run(config.tokenize, config.data, ctx)


STAGE = Stage(
    name="tokenize",
    version="2",
    upstream=(),
    settings=_settings,
    run=_run,
    key_extras=_fingerprints,
    reads=_reads,
)
