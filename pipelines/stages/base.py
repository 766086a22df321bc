"""A stage as the pipeline sees it, declared once in its own module of `pipelines/stages/`.

The declaration says everything the runner needs and nothing the runner decides: the stage's
name and code version, the stages it reads, the config that shapes its output (its cache key),
its typed outputs, what it does outside its artifact folder (registers a model, deploys an app)
and how that is verified or redone when the artifact is reused, and how its progress is read.
The work itself lives in `components/<stage>.py`, imported only when the stage runs, so that a
run of cache hits never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

from components.model_size import CHECKPOINT_BYTES, MODEL_BYTES, least_written
from components.stage import StageContext, StageResult
from pipelines.pipeline_config import PipelineConfig


class NoOutputs(BaseModel):
    """A stage whose only output is its folder (`StageResult.output_uri`)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Inputs:
    """What the stages that ran before this one in the pipeline run left, by stage name."""

    results: Mapping[str, StageResult] = field(default_factory=dict)
    keys: Mapping[str, str] = field(default_factory=dict)
    mlflow_runs: Mapping[str, str] = field(default_factory=dict)

    def uri(self, stage: str) -> str:
        return self.results[stage].output_uri

    def outputs(self, stage: str) -> BaseModel:
        return self.results[stage].outputs


class Room(NamedTuple):
    """The least a stage holds on storage at once, and what that is (said when it does not fit)."""

    bytes: int
    what: str
    fix: str = "train a smaller model (pretrain.model)"

    @classmethod
    def for_training(
        cls, parameters: int, checkpoints: int = 1, models: int = 1, whose: str = "its", fix: str | None = None
    ) -> Room:
        held = f"{checkpoints} checkpoint{'s' if checkpoints > 1 else ''}"
        what = (
            f"{held} of {whose} {parameters / 1e6:,.2f}M-parameter model ({CHECKPOINT_BYTES} bytes a parameter: "
            f"the weights and Adam's two moments)" + (f" and the exported model ({MODEL_BYTES})" if models else "")
        )
        return cls(least_written(parameters, checkpoints, models), what, *([fix] if fix else []))


def fine_tuning_room(inputs: Inputs, checkpoints: int = 1, models: int = 1, fix: str | None = None) -> Room:
    """A stage training a task model from the pre-trained one: that model's parameters less a tenth,
    since a task model drops the language-model head's own parameters (its output bias, a layer)."""
    parameters = inputs.outputs("pretrain").parameters * 9 // 10
    return Room.for_training(parameters, checkpoints, models, whose="the task's", fix=fix)


# run(config, inputs, ctx): the stage's work, writing under ctx.output_dir.
Run = Callable[[PipelineConfig, Inputs, StageContext], StageResult]
# A hook on a finished stage (fresh or reused); returns the result, possibly with new outputs.
Hook = Callable[[PipelineConfig, Inputs, StageResult, StageContext], StageResult]


def _nothing(config: PipelineConfig, inputs: Inputs) -> dict:
    return {}


def _no_reads(config: PipelineConfig, inputs: Inputs, extras: dict) -> list:
    return []


@dataclass(frozen=True)
class SideEffect:
    """Something a stage does outside its artifact folder. The artifact is shared by every run
    with the same key; the side effect belongs to a place (a registry, a Serve instance), so on a
    cache hit `ensure` checks that place and redoes what is missing there, idempotently."""

    what: str  # "register", "deploy": named in logs and docs
    ensure: Hook  # on reuse: verify, redo where missing; returns the result with this place's outputs
    after_run: Hook | None = None  # after a fresh run, e.g. record lineage on what it made


@dataclass(frozen=True)
class Stage:
    name: str
    version: str  # bump when the stage's code changes what it writes: its key changes with it
    upstream: tuple[str, ...]  # stages whose outputs it reads; their keys are part of its key
    settings: Callable[[PipelineConfig], dict]  # the config it runs with: in its key, logged as params
    run: Run
    outputs: type[BaseModel] = NoOutputs
    # Dotted paths in `settings` that change how the stage runs but not what it writes.
    not_in_key: tuple[str, ...] = ()
    # More that its output depends on: data fingerprints, the seed, what it deploys.
    key_extras: Callable[[PipelineConfig, Inputs], dict] = _nothing
    # The datasets it reads, as lineage.DatasetRead for the MLflow run's "Datasets used"; it gets
    # its `key_extras` too, so data fingerprinted for the key is not read again for the digest.
    reads: Callable[[PipelineConfig, Inputs, dict], list] = _no_reads
    side_effect: SideEffect | None = None
    # How `ptft status` and the live progress lines read it: training steps, sweep trials, or not.
    progress: Literal["steps", "trials"] | None = None
    # Once per task in a config of several tasks (`tasks:`); it then sees `config.for_task(task)`.
    per_task: bool = False
    # The Ray resources a node of it holds while it runs ({"CPU": 2.0}), so that task branches run
    # side by side where the cluster has room; None: the whole cluster (it runs alone).
    claims: Callable[[PipelineConfig], dict[str, float]] | None = None
    # Its nodes run one at a time, beside other stages' (they share one place: a Serve instance).
    serial: bool = False
    # What it claims stays held after its node ends (deployed replicas): its nodes run after every
    # node of the other stages, whose training could otherwise wait for those CPUs without end.
    lasting: bool = False
    # The least it holds on storage at once, checked against the storage's free space before it
    # starts (a disk too small for one checkpoint failed at the first, after hours of training).
    room: Callable[[PipelineConfig, Inputs], Room | None] = lambda config, inputs: None
    # Whether the config's graph has it at all (an upstream that is absent is left out of `upstream`).
    when: Callable[[PipelineConfig], bool] = lambda config: True
