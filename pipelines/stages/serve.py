"""serve: deploy the registered model's champion on Ray Serve and answer the sample texts.

Deploying is a side effect on a Serve instance the artifact does not own: on every reuse the
recorded deployment is checked and brought back if it is not live (a local Ray is gone once
`ptft run` ends)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from components.stage import StageContext, StageResult
from pipelines.pipeline_config import PipelineConfig
from pipelines.stages.base import Inputs, SideEffect, Stage


class ServedModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    version: str
    model_uri: str
    run_id: str | None = None
    alias: str | None = None


class Sample(BaseModel):
    """A sample text and what the served model answered: a label and its score, entities, a
    translation, or (for a question with its context) the answer's span."""

    model_config = ConfigDict(extra="allow")  # the prediction's other fields (truncated, a span's answer)
    text: str | dict[str, str]
    label: str | None = None
    score: float | None = None
    entities: list[dict] | None = None

    def asked(self) -> str:
        """The text, or the question."""
        return self.text["question"] if isinstance(self.text, dict) else self.text

    def answer(self) -> str:
        if isinstance(self.text, dict):
            answer = (self.model_extra or {}).get("answer", "")
            return f"{answer!r} ({self.score:.3f})" if answer else f"no answer ({self.score:.3f})"
        if self.entities is not None:
            return ", ".join(f"{entity['type']} {entity['text']!r}" for entity in self.entities) or "no entities"
        written = {key: value for key, value in (self.model_extra or {}).items() if key in ("translation", "generated")}
        if written:
            return repr(next(iter(written.values())))
        return f"{self.label} ({self.score:.3f})"


class Endpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    app_name: str
    model: ServedModel
    samples: list[Sample] = []


def _settings(config: PipelineConfig) -> dict:
    return config.serve.model_dump(mode="json")


def _deployed_model(config: PipelineConfig, inputs: Inputs) -> dict:
    """What it deploys: a version of a registered model, in the store of tracking.uri."""
    return {"registered_model": inputs.outputs("finetune").registered.name, "tracking_uri": config.tracking_uri()}


def _run(config: PipelineConfig, inputs: Inputs, ctx: StageContext) -> StageResult:
    from components import serve

    return serve.run(config.serve, inputs.outputs("finetune").registered.model_dump(), ctx)


def _ensure_deployed(config: PipelineConfig, inputs: Inputs, result: StageResult, ctx: StageContext) -> StageResult:
    from components import serve

    serve.ensure_deployed(config.serve, result.outputs.model_dump(), config.tracking_uri())
    return result


STAGE = Stage(
    name="serve",
    version="2",
    upstream=("finetune",),
    settings=_settings,
    run=_run,
    outputs=Endpoint,
    key_extras=_deployed_model,
    side_effect=SideEffect("deploy", ensure=_ensure_deployed),
    claims=lambda config: config.serve.resources(),
    serial=True,  # one Serve instance: its apps are deployed one at a time
    lasting=True,  # the replicas stay up after the node ends
    per_task=True,
    when=lambda config: config.has_tasks(),  # a config without tasks pre-trains only
)
