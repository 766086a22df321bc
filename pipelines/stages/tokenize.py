"""tokenize: train (or load) the tokenizer and pack the corpus into blocks.

Only the corpus is in its key: a task's labelled splits are tokenized in the task's own `prepare`,
so editing fine-tuning data, or adding a task, never re-tokenizes the corpus nor re-pre-trains."""

from __future__ import annotations

from components import data
from pipelines.pipeline_config import PipelineConfig
from pipelines.stages.base import Inputs, Stage


def _settings(config: PipelineConfig) -> dict:
    return {"tokenize": config.tokenize.model_dump(mode="json"), "corpus": config.data.corpus.model_dump(mode="json")}


def _fingerprints(config: PipelineConfig, inputs: Inputs) -> dict:
    """The corpus itself, not only where it is: an edited file is a new key."""
    return {"corpus": data.fingerprint(config.data.corpus.source)}


def _reads(config: PipelineConfig, inputs: Inputs, extras: dict) -> list:
    from pipelines.lineage import DatasetRead

    return [DatasetRead("corpus", config.data.corpus.source, extras["corpus"], "corpus")]


def _run(config: PipelineConfig, inputs: Inputs, ctx):
    from components import tokenize

    return tokenize.run_corpus(config.tokenize, config.data.corpus, ctx)


STAGE = Stage(
    name="tokenize",
    version="4",
    upstream=(),
    settings=_settings,
    run=_run,
    key_extras=_fingerprints,
    reads=_reads,
)
