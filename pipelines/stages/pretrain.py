"""pretrain: masked- or causal-LM pre-training under Ray Train and DeepSpeed."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from components import model_size
from pipelines.pipeline_config import PipelineConfig
from pipelines.stages.base import Inputs, Room, Stage


class PretrainOutputs(BaseModel):
    """The exported model's smoke test (it loads and gives finite outputs)."""

    model_config = ConfigDict(extra="forbid")
    weights_sha256: str
    parameters: int


def _settings(config: PipelineConfig) -> dict:
    return config.pretrain.model_dump(mode="json")


def _seed(config: PipelineConfig, inputs: Inputs) -> dict:
    return {"seed": config.seed}  # initialisation, masking and data order


def _reads(config: PipelineConfig, inputs: Inputs, extras: dict) -> list:
    from pipelines.lineage import DatasetRead

    blocks = f"{inputs.uri('tokenize')}/pretrain_blocks"
    return [DatasetRead("pretrain_blocks", blocks, inputs.keys["tokenize"], "training")]


def _room(config: PipelineConfig, inputs: Inputs) -> Room | None:
    """One checkpoint and the exported model; the model counted from its sizes and the trained
    vocabulary, or from the weights of `init_from` less a tenth (a head of the checkpoint that the
    language model does not keep, a pooler)."""
    model = config.pretrain.model
    if model.init_from:
        folder = _init_from_folder(model.init_from, model.init_revision)
        saved = model_size.saved_parameters(folder) if folder else None
        parameters = None if saved is None else saved * 9 // 10
    else:
        vocabulary = model_size.vocabulary_size(Path(inputs.uri("tokenize")) / "tokenizer")
        parameters = model_size.parameters(model.family, model.resolved(), vocabulary)
    return None if parameters is None else Room.for_training(parameters)


def _init_from_folder(init_from: str, revision: str | None) -> Path | None:
    """A local `init_from`, or the snapshot of a Hub model in the local Hugging Face cache (nothing
    is downloaded: a model the cache lacks is not counted)."""
    if Path(init_from).is_dir():
        return Path(init_from)
    import huggingface_hub

    for weights in ("model.safetensors", "model.safetensors.index.json"):
        try:
            cached = huggingface_hub.try_to_load_from_cache(init_from, weights, revision=revision)
        except ValueError:  # not a Hub model id (HFValidationError)
            return None
        if isinstance(cached, str):
            return Path(cached).parent
    return None


def _run(config: PipelineConfig, inputs: Inputs, ctx):
    from components import pretrain

    return pretrain.run(config.pretrain, inputs.uri("tokenize"), ctx)


STAGE = Stage(
    name="pretrain",
    version="5",
    upstream=("tokenize",),
    settings=_settings,
    run=_run,
    outputs=PretrainOutputs,
    not_in_key=("log_every", "checkpoint_every", "workers.max_failures", "workers.placement_strategy"),
    key_extras=_seed,
    reads=_reads,
    progress="steps",
    room=_room,
)
