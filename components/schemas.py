"""Every stage's config schema in one light module (pydantic only, no torch/Ray imports), so
`ptft validate` answers in a second. Each stage module imports its own config from here; the
pipeline config (pipelines/pipeline_config.py) composes them. Field descriptions are the reference docs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from components.net import bind_address_problem

SEED_MAX = 2**32 - 1  # numpy's and Tune's seeds are 32-bit


def registry_name_problem(name: str) -> str | None:
    """Why MLflow's registry (or a `models:/NAME@ALIAS` reference) cannot take `name`, or None.
    Found when the config is read: MLflow itself refuses it only when finetune registers."""
    if not name.strip():
        return "empty"
    if found := sorted(set(name) & set("/:@")):
        held = " and ".join(repr(char) for char in found)
        return f"holds {held}, which MLflow's registry names and models:/NAME@ALIAS references cannot"
    return None


def route_prefix_problem(prefix: str) -> str | None:
    """Why Ray Serve would refuse this route prefix when deploying (its rules,
    ray.serve._private.utils.validate_route_prefix, checked here before the training), or None."""
    if not prefix.startswith("/"):
        return "does not start with /"
    if prefix != "/" and prefix.endswith("/"):
        return "ends with / (only the root / may)"
    if "{" in prefix or "}" in prefix:
        return "holds a { or }: Serve's prefixes take no wildcards"
    return None


def check_registry_name(name: str | None) -> str | None:
    """A field validator's body: the name, or a `registry_name` error."""
    if name is not None and (problem := registry_name_problem(name)):
        raise PydanticCustomError("registry_name", problem)
    return name


# --- data --------------------------------------------------------------------------------------

FileFormat = Literal["auto", "jsonl", "csv", "tsv", "parquet", "text", "conll"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileSource(_Strict):
    """Local file, glob or remote URI (anything pyarrow's filesystems open, e.g. s3://)."""

    type: Literal["file"] = "file"
    path: str = Field(description="file path, glob or URI; relative paths are taken from the working dir")
    format: FileFormat = Field(
        "auto",
        description="file format; auto reads it from the suffix (.jsonl/.json, .csv, .tsv, .parquet, .txt/.text/.md, "
        ".conll: a word and its tag per line, a blank line between sentences, read as columns tokens and ner_tags); "
        ".gz, .bz2 and .xz files are read compressed",
    )
    text_column: str = Field("text", description="column holding the text")
    label_column: str = Field("label", description="column holding the label (labelled splits only)")
    question_column: str = Field("question", description="column holding the question (question answering only)")


class HubSource(_Strict):
    """A dataset on the Hugging Face Hub, pinned to a revision for reproducibility."""

    type: Literal["hub"] = "hub"
    name: str = Field(description="dataset id, e.g. cornell-movie-review-data/rotten_tomatoes")
    split: str = Field("train", description="split to read")
    revision: str | None = Field(None, description="git revision (commit, tag) to pin")
    config_name: str | None = Field(None, description="dataset configuration name")
    text_column: str = "text"
    label_column: str = "label"
    question_column: str = "question"


class SyntheticSource(_Strict):
    """The built-in toy language (see components/synthetic.py)."""

    type: Literal["synthetic"] = "synthetic"
    split: Literal["corpus", "train", "validation", "test"]
    num_examples: int = Field(1000, gt=0, description="rows to generate")
    seed: int = Field(0, description="generator seed")
    task: Literal["sentiment", "topic", "entities", "answers"] = Field(
        "sentiment",
        description="label reviews by polarity, or by what they talk about (story, music, ...); entities: tag "
        "the reviewer's name (PER) and each adjective's polarity (POS, NEG) word by word (token_classification); "
        "answers: who wrote a review, or what they called the film, as spans (question_answering)",
    )
    text_column: Literal["text"] = "text"
    label_column: Literal["label"] = "label"
    question_column: Literal["question"] = "question"


Source = Annotated[FileSource | HubSource | SyntheticSource, Field(discriminator="type")]


# --- tokenize ----------------------------------------------------------------------------------

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class CorpusConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Source = Field(description="unlabelled text for the tokenizer and for pre-training")
    text_columns: list[str] = Field(
        default_factory=list,
        description="read each of these columns as documents of their own, instead of the source's "
        "text_column: both sides of a translation pair ([en, de]) make one multilingual corpus",
    )

    @model_validator(mode="after")
    def _columns_of_a_table(self) -> CorpusConfig:
        if self.text_columns and isinstance(self.source, SyntheticSource):
            raise ValueError("text_columns needs a file or hub source: the synthetic corpus has one text")
        return self


TaskTypeName = Literal[  # components/tasks/
    "sequence_classification", "token_classification", "question_answering", "translation", "generation"
]


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: TaskTypeName = Field(
        "sequence_classification",
        description="sequence_classification: a text and a label per row; token_classification (entities): "
        "a list of words and a list of IOB2 tags per row (set the sources' text_column and label_column, "
        "e.g. tokens and ner_tags); question_answering (extractive, SQuAD): a question, a context and its "
        "answers per row (SQuAD JSON, or rows with question, context and answers: text_column context, "
        "label_column answers); translation: a source and a target text per row (text_column and label_column, "
        "e.g. en and de), on an encoder-decoder pre-training (pretrain.model.family: bart or t5); generation: "
        "a text per row (text_column; no label), continued causal-LM training of a decoder "
        "(pretrain.model.family: gpt2) served at POST /generate",
    )
    doc_stride: int = Field(
        128,
        gt=0,
        description="question_answering: tokens that consecutive windows of a long context share "
        "(each window is tokenize.seq_len tokens, the question included); token_classification: "
        "sub-words that consecutive windows of a sentence longer than seq_len share (at most half a window)",
    )
    train: Source = Field(description="labelled examples to fine-tune on")
    validation: Source = Field(description="labelled examples for model selection (Tune's metric)")
    test: Source = Field(description="labelled examples for the final, reported accuracy")
    label_names: list[str] | None = Field(
        None,
        description="display names for the label values in sorted order, e.g. [negative, positive] "
        "for 0/1 labels; default the values themselves",
    )

    @model_validator(mode="after")
    def _a_text_is_its_own_label(self) -> TaskConfig:
        """A generation task reads texts only: its sources need no label column."""
        if self.type == "generation":
            for split in (self.train, self.validation, self.test):
                if not isinstance(split, SyntheticSource) and "label_column" not in split.model_fields_set:
                    split.label_column = split.text_column
        return self


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    corpus: CorpusConfig
    task: TaskConfig | None = Field(
        None, description="the one task's labelled data; a config with several tasks names them under `tasks`"
    )


class TokenizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pretrained: str | None = Field(
        None,
        description="load this tokenizer (HF folder or Hub name) instead of training one; "
        "default pretrain.model.init_from when that is set",
    )
    algorithm: Literal["wordpiece", "bpe"] = Field(
        "wordpiece", description="tokenizer to train: wordpiece (BERT-style) or byte-level bpe (GPT-2-style)"
    )
    vocab_size: int = Field(2000, gt=0, description="vocabulary size to train, special tokens included")
    min_frequency: int = Field(2, ge=1, description="rarest word piece the trainer keeps")
    lowercase: bool = Field(True, description="lowercase and strip accents before splitting")
    seq_len: int = Field(64, ge=8, le=4096, description="tokens per packed block and per task example")
    sentinels: int = Field(
        0,
        ge=0,
        le=1000,
        description="sentinel tokens <extra_id_N> that span corruption puts in place of each corrupted span; "
        "0: as many as an encoder-decoder family's (t5, bart) pre-training needs, none for the others",
    )
    batch_size: int = Field(512, gt=0, description="rows per Ray Data batch")


# --- models ------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, dict[str, int]]] = {
    # tiny runs on a laptop CPU in minutes; the others are the usual sizes of each family.
    "bert": {
        "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "max_positions": 128},
        "mini": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024, "max_positions": 512},
        "small": {"hidden_size": 512, "num_layers": 4, "num_heads": 8, "intermediate_size": 2048, "max_positions": 512},
        "base": {
            "hidden_size": 768,
            "num_layers": 12,
            "num_heads": 12,
            "intermediate_size": 3072,
            "max_positions": 512,
        },  # BERT-base, ~110M parameters with a 30k vocabulary
    },
    "gpt2": {
        "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 256, "max_positions": 128},
        "mini": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024, "max_positions": 512},
        "small": {
            "hidden_size": 768,
            "num_layers": 12,
            "num_heads": 12,
            "intermediate_size": 3072,
            "max_positions": 1024,
        },  # GPT-2 small, ~124M parameters with its 50k vocabulary
    },
    "t5": {
        # T5's relative positions have no table: max_positions is the longest block it is given.
        "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "max_positions": 512},
        "mini": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024, "max_positions": 512},
        "small": {"hidden_size": 512, "num_layers": 6, "num_heads": 8, "intermediate_size": 2048, "max_positions": 512},
        "base": {
            "hidden_size": 768,
            "num_layers": 12,
            "num_heads": 12,
            "intermediate_size": 3072,
            "max_positions": 512,
        },
    },  # small and base: T5's (~60M and ~220M parameters with its 32k vocabulary); layers per stack
    "bart": {
        # The original Transformer's layout (post-norm, learned positions): on Multi30k it learns
        # translation in a fraction of t5's steps with AdamW (docs/performance.md). Layers per stack.
        "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 256, "max_positions": 512},
        "mini": {"hidden_size": 256, "num_layers": 3, "num_heads": 4, "intermediate_size": 1024, "max_positions": 512},
        "small": {
            "hidden_size": 512,
            "num_layers": 6,
            "num_heads": 8,
            "intermediate_size": 2048,
            "max_positions": 1024,
        },
        "base": {
            "hidden_size": 768,
            "num_layers": 6,
            "num_heads": 12,
            "intermediate_size": 3072,
            "max_positions": 1024,
        },  # BART-base, ~140M parameters with its 50k vocabulary
    },
}
OBJECTIVES = {"bert": "mlm", "gpt2": "clm", "t5": "span", "bart": "span"}
ENCODER_DECODER_FAMILIES = {family for family, objective in OBJECTIVES.items() if objective == "span"}
# Model types whose checkpoints are pre-trained as encoders (masked-LM), and as encoder-decoders
# with span corruption; the rest are decoders.
MASKED_LM_TYPES = {"bert", "roberta", "distilbert", "electra", "xlm-roberta", "deberta", "deberta-v2", "mpnet"}
SPAN_CORRUPTION_TYPES = {"t5", "mt5", "umt5", "bart"}


def objective_of(model_type: str) -> str:
    """`mlm` for encoder model types, `span` for T5-style encoder-decoders, `clm` for decoders."""
    if model_type in SPAN_CORRUPTION_TYPES:
        return "span"
    return "mlm" if model_type in MASKED_LM_TYPES else "clm"


def span_count(seq_len: int, noise_density: float, mean_span_length: float) -> int:
    """How many spans span corruption masks in a block of seq_len tokens: the sentinels it needs."""
    noise = min(max(1, round(seq_len * noise_density)), seq_len - 1)
    return max(1, min(round(noise / mean_span_length), noise, seq_len - noise))


SIZE_KEYS = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions")


class ModelConfig(BaseModel):
    """A Transformer from a family and size preset (any size may be overridden), or from a checkpoint."""

    model_config = ConfigDict(extra="forbid")
    family: Literal["bert", "gpt2", "t5", "bart"] = Field(
        "bert",
        description="bert: encoder pre-trained with masked-LM; gpt2: decoder pre-trained with causal-LM; "
        "t5 (relative positions, pre-norm) and bart (learned positions, post-norm: the original "
        "Transformer's layout, faster to train for translation): encoder-decoders pre-trained with span corruption",
    )
    preset: Literal["tiny", "mini", "small", "base"] = Field("tiny", description="size preset of the family")
    hidden_size: int | None = Field(None, gt=0, description="overrides the preset's hidden size")
    num_layers: int | None = Field(None, gt=0, description="overrides the preset's transformer layers")
    num_heads: int | None = Field(None, gt=0, description="overrides the preset's attention heads")
    intermediate_size: int | None = Field(None, gt=0, description="overrides the preset's MLP width")
    max_positions: int | None = Field(None, gt=0, description="longest sequence the model accepts")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="hidden and attention dropout in pre-training")
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa", description="attention kernel: sdpa (PyTorch scaled_dot_product_attention) or eager"
    )
    init_from: str | None = Field(
        None,
        description="start from this checkpoint (HF folder, or a Hub name that the local Hugging Face cache "
        "holds or the Hub answers for: checked before the run) instead of random weights: continued "
        "pre-training; family, preset and sizes then come from it",
    )
    init_revision: str | None = Field(None, description="Hub revision (commit, tag) of init_from, for reproducibility")

    def resolved(self) -> dict[str, int]:
        """The preset with this config's overrides applied."""
        sizes = dict(PRESETS[self.family].get(self.preset) or PRESETS[self.family]["tiny"])
        sizes.update({key: value for key in sizes if (value := getattr(self, key)) is not None})
        return sizes

    @property
    def objective(self) -> str:
        return OBJECTIVES[self.family]


# --- training ----------------------------------------------------------------------------------


class DeepSpeedConfig(BaseModel):
    """The DeepSpeed engine every training step goes through. `config_file` loads a DeepSpeed JSON
    (e.g. cluster/deepspeed/zero3-bf16.json): its settings fill the keys not set here, and what
    ptft does not model (bucket sizes, overlap, ...) goes to DeepSpeed as written."""

    model_config = ConfigDict(extra="forbid")
    config_file: str | None = Field(None, description="DeepSpeed JSON to start from; keys set here win")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage: 0 none, 1 optimizer, 2 +grads, 3 +params")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="bf16/fp16 need a GPU")
    gradient_clipping: float = Field(1.0, ge=0.0, description="max grad norm; 0 disables")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    train_batch_size: int | None = Field(
        None, gt=0, description="global batch; when set it must equal micro-batch x accumulation x workers"
    )
    lr_schedule: Literal["linear", "cosine"] = Field("linear", description="decay after the linear warmup")
    activation_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, ~30% more compute"
    )
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="ZeRO-Offload of optimizer state (GPU)")
    offload_param: Literal["none", "cpu"] = Field("none", description="ZeRO-3 parameter offload (GPU)")
    file_settings: dict[str, Any] = Field(
        default_factory=dict, description="filled from config_file: its settings ptft passes through unchanged"
    )

    @model_validator(mode="before")
    @classmethod
    def _load_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("config_file") or "file_settings" in data:
            return data
        return merge_deepspeed_file(data)


# DeepSpeed JSON keys that map onto DeepSpeedConfig fields; the rest is passed through.
_DS_FIELDS = {
    ("zero_optimization", "stage"): "zero_stage",
    ("gradient_clipping",): "gradient_clipping",
    ("gradient_accumulation_steps",): "gradient_accumulation_steps",
    ("train_batch_size",): "train_batch_size",
    ("zero_optimization", "offload_optimizer", "device"): "offload_optimizer",
    ("zero_optimization", "offload_param", "device"): "offload_param",
}


def merge_deepspeed_file(data: dict) -> dict:
    """`data` (a deepspeed block) with the JSON file's values under the keys it does not set.

    Raises:
        ValueError: the file is missing, not JSON, or configures what ptft builds itself.
    """
    path = Path(os.path.expanduser(data["config_file"]))
    try:
        settings = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(
            f"config_file {str(path)!r} cannot be read ({error.strerror}); give a DeepSpeed "
            "JSON path relative to the working dir, e.g. cluster/deepspeed/zero2-bf16.json"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"config_file {str(path)!r} is not valid JSON ({error})") from None
    built = sorted(set(settings) & {"optimizer", "scheduler"})
    if built:
        raise ValueError(
            f"config_file {str(path)!r} sets {built}: ptft builds AdamW and the warmup/decay "
            "schedule from the stage's learning_rate, weight_decay and lr_schedule; remove them"
        )
    merged = dict(data)
    for keys, field_name in _DS_FIELDS.items():
        value = _pop_path(settings, keys)
        if value is not None and value != "auto" and field_name not in data:
            merged[field_name] = value
    for precision in ("bf16", "fp16"):
        if (settings.pop(precision, None) or {}).get("enabled") is True and "precision" not in data:
            merged["precision"] = precision
    merged["file_settings"] = settings
    return merged


def _pop_path(settings: dict, keys: tuple[str, ...]) -> Any:
    node = settings
    for key in keys[:-1]:
        node = node.get(key)
        if not isinstance(node, dict):
            return None
    return node.pop(keys[-1], None)


class WorkersConfig(BaseModel):
    """Ray Train scaling for a training stage."""

    model_config = ConfigDict(extra="forbid")
    num_workers: int = Field(2, ge=1, description="training processes (data-parallel ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker; false trains on CPU with gloo")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs Ray reserves per worker (= torch threads)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers: PACK fills a node first, SPREAD uses many nodes"
    )
    max_failures: int = Field(
        3, ge=-1, description="worker-group restarts from the last checkpoint after a failure; -1 unlimited"
    )

    def resources(self) -> dict[str, float]:
        """What the worker group holds of the cluster."""
        gpus = {"GPU": float(self.num_workers)} if self.use_gpu else {}
        return {"CPU": float(self.num_workers * self.cpus_per_worker), **gpus}


# --- pretrain ----------------------------------------------------------------------------------


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelConfig = Field(default_factory=ModelConfig)
    max_steps: int = Field(200, gt=0, description="optimizer steps (each of gradient_accumulation_steps micro-batches)")
    batch_size_per_worker: int = Field(16, gt=0, description="micro-batch per worker")
    learning_rate: float = Field(5e-4, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay (not on biases/LayerNorm)")
    warmup_steps: int = Field(20, ge=0, description="linear warmup, then linear decay to 0")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="share of tokens masked as targets (masked-LM)")
    noise_density: float = Field(0.15, gt=0, lt=1, description="share of tokens corrupted (span corruption)")
    mean_span_length: float = Field(3.0, ge=1, description="mean length of a corrupted span (span corruption)")
    eval_fraction: float = Field(
        0.05,
        ge=0,
        lt=0.5,
        description="blocks held out for the objective's eval loss (eval/mlm_loss, clm_loss, span_loss)",
    )
    log_every: int = Field(10, gt=0, description="steps between metric logs")
    checkpoint_every: int = Field(100, gt=0, description="steps between checkpoints reported to Ray Train")
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)


# --- finetune ----------------------------------------------------------------------------------


class Hyperparameters(BaseModel):
    """What Tune searches; finetune takes the best values from the tune stage."""

    model_config = ConfigDict(extra="forbid")
    learning_rate: float = Field(5e-4, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay")
    dropout: float = Field(0.1, ge=0, lt=1, description="hidden dropout (and attention dropout unless set)")
    attention_dropout: float | None = Field(None, ge=0, lt=1, description="attention dropout; none: same as dropout")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps spent warming up the LR")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the training loss")
    batch_size_per_worker: int = Field(16, gt=0, description="micro-batch per worker (per trial in tune)")


SEARCHABLE = tuple(Hyperparameters.model_fields)
INTEGER_HYPERPARAMETERS = ("batch_size_per_worker",)
Searchable = Literal[SEARCHABLE]  # type: ignore[valid-type]


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(3, gt=0, description="passes over the train split")
    defaults: Hyperparameters = Field(
        default_factory=Hyperparameters, description="used for any value the tune stage did not search"
    )
    overrides: dict[Searchable, float] = Field(
        default_factory=dict,
        description="hyperparameters that win over the tune stage's best config (the stage logs which won)",
    )
    log_every: int = Field(10, gt=0, description="steps between metric logs")
    early_stopping_patience: int | None = Field(
        None,
        gt=0,
        description="stop after this many epochs without a lower validation loss, and export the best epoch by "
        "tune.metric (equal ones by tune.tie_break, else the lower loss); none runs every epoch and exports the last",
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="smallest drop in validation loss that counts")
    registered_model_name: str | None = Field(
        None, description="MLflow registry name; default <pipeline>-<classifier|tagger|reader|translator|generator>"
    )
    _registrable = field_validator("registered_model_name")(check_registry_name)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)

    def trial_defaults(self) -> Hyperparameters:
        """What a tune trial trains with where it samples nothing: defaults under overrides."""
        return Hyperparameters.model_validate({**self.defaults.model_dump(), **self.overrides})

    @model_validator(mode="after")
    def _overrides_are_valid(self) -> FinetuneConfig:
        # The ranges of finetune.defaults (a whole-number float passes for an integer field).
        for name, value in self.overrides.items():
            try:
                Hyperparameters(**{name: value})
            except ValidationError as error:
                raise ValueError(f"overrides.{name} = {value}: {error.errors()[0]['msg']}") from None
        return self


# --- tune --------------------------------------------------------------------------------------


class Distribution(BaseModel):
    """One search dimension: sampled from `uniform`/`loguniform` over [low, high] or a `choice` of
    values, or every one of a `grid` of values (each grid point is tried `num_samples` times)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["loguniform", "uniform", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[float] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Distribution:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"a {self.type} needs a non-empty `values` list")
            if self.low is not None or self.high is not None:
                raise ValueError(f"a {self.type} takes `values`, not low/high")
        elif self.values is not None:
            raise ValueError(f"{self.type} takes low and high, not `values` (use type: choice or grid)")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.type} needs low < high (got low={self.low}, high={self.high})")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low}); use uniform for ranges from 0")
        return self

    def points(self) -> list[float]:
        """The values this dimension can take at its edges: its bounds, or every listed value."""
        return list(self.values) if self.values is not None else [self.low, self.high]  # type: ignore[list-item]

    def enumerated(self, search: str) -> bool:
        """Whether every value makes its own trials (Tune's grid_search): grid dimensions, and
        every choice under search=grid."""
        return self.type == "grid" or (self.type == "choice" and search == "grid")


def _default_space() -> dict[str, Distribution]:
    return {
        "learning_rate": Distribution(type="loguniform", low=1e-4, high=3e-3),
        "weight_decay": Distribution(type="uniform", low=0.0, high=0.1),
        "dropout": Distribution(type="uniform", low=0.0, high=0.3),
    }


Scheduler = Literal["asha", "sha", "hyperband", "median", "pbt", "fifo"]
SearchAlgorithm = Literal["random", "grid", "optuna"]


# Every metric some task type reports (components/tasks/); the pipeline config checks the task's own.
TuneMetric = Literal[
    "eval/accuracy",
    "eval/loss",
    "eval/f1",
    "eval/precision",
    "eval/recall",
    "eval/exact_match",
    "eval/bleu",
    "eval/chrf",
]


def direction(metric: str | None) -> str:
    """Whether a validation metric is better higher (max) or lower (min)."""
    return "min" if metric == "eval/loss" else "max"


class TuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="false skips the sweep: finetune uses finetune.defaults")
    search: SearchAlgorithm = Field(
        "random",
        description="random: sample each trial (grid dimensions enumerated); grid: every combination of "
        "grid/choice values; optuna: Optuna's TPE, each trial informed by the finished ones",
    )
    scheduler: Scheduler = Field(
        "asha",
        description="asha: successive halving, stops weak trials at rungs as they reach them; sha: synchronous "
        "successive halving, every trial waits at each rung until all are there, then the best continue "
        "(needs max_concurrent_trials = num_samples); hyperband: synchronous brackets; "
        "median: stops a trial below the median of the others; pbt: population based training, "
        "weak trials continue from a strong one's checkpoint with perturbed learning rate and weight decay; "
        "fifo: no early stopping",
    )
    num_samples: int | None = Field(
        None,
        gt=0,
        description="trials to sample; with grid dimensions, repeats of the whole grid. "
        "Default: 1 when the space has grid dimensions (or search=grid), else 4",
    )
    max_epochs: int = Field(3, gt=0, description="epochs of the longest trial (the schedulers' max_t)")
    grace_period: int = Field(1, gt=0, description="epochs every trial gets before asha/sha/median may stop it")
    reduction_factor: int = Field(2, ge=2, description="asha/sha/hyperband keep 1/reduction_factor at each rung")
    median_min_samples: int = Field(2, gt=0, description="median: trials needed before it compares")
    pbt_interval: int = Field(1, gt=0, description="pbt: epochs between exploit/explore steps")
    pbt_quantile: float = Field(0.25, gt=0, le=0.5, description="pbt: share of trials that copy the top ones")
    pbt_synchronous: bool = Field(
        False,
        description="pbt: trials wait for each other at every interval, then the bottom quantile copies the top; "
        "the exploits no longer depend on which trial reports first, at the cost of trials waiting",
    )
    pbt_mutations: list[Literal["learning_rate", "weight_decay"]] = Field(
        default_factory=lambda: ["learning_rate", "weight_decay"],
        description="pbt: hyperparameters it perturbs (each must be in search_space)",
    )
    metric: TuneMetric | None = Field(
        None,
        description="validation metric to optimise; default the task type's headline: eval/accuracy for "
        "sequence_classification, eval/f1 for token_classification (entity F1) and question_answering, "
        "eval/bleu for translation",
    )
    tie_break: TuneMetric | None = Field(
        None,
        description="a second validation metric that orders trials equal on `metric`, e.g. eval/loss when ranking "
        "on accuracy, which ties often on a small validation split (ties keep every tied trial past an ASHA rung); "
        "used by the schedulers, for a trial's best epoch and for the best trial",
    )
    max_concurrent_trials: int = Field(2, gt=0, description="trials at once; at most the CPUs you have")
    time_budget_s: float | None = Field(None, gt=0, description="stop the sweep after this many seconds")
    cpus_per_trial: float = Field(1, gt=0, description="CPUs per trial worker (= its torch threads)")
    gpus_per_trial: float = Field(0, ge=0, description="GPUs per trial worker; above 0 a trial trains on its GPU")
    workers_per_trial: int = Field(
        1, gt=0, description="1: a trial trains in its own process; above 1: a TorchTrainer of this many workers"
    )
    trial_max_failures: int = Field(
        2, ge=-1, description="retries of a failed trial from its last epoch checkpoint; -1 unlimited"
    )
    reuse_actors: bool = Field(
        True,
        description="run later trials (and PBT's restarted ones) in the processes of finished ones, which saves "
        "their start-up and imports; one-worker trials only",
    )
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="seed of the search (samples, optuna); none: the pipeline seed"
    )
    progress_every_s: float = Field(10.0, ge=0, description="seconds between live trial tables printed; 0: none")
    search_space: dict[Searchable, Distribution] = Field(
        default_factory=_default_space, description=f"keys among: {', '.join(SEARCHABLE)}"
    )

    @property
    def mode(self) -> str:
        return direction(self.metric)

    def samples(self) -> int:
        """num_samples, or its default: one pass over a grid, else 4 sampled trials."""
        if self.num_samples is not None:
            return self.num_samples
        gridded = self.search == "grid" or any(dist.type == "grid" for dist in self.search_space.values())
        return 1 if gridded else 4

    def trials(self) -> int:
        """How many trials the sweep runs: samples() times every enumerated grid combination."""
        combinations = 1
        for dist_ in self.search_space.values():
            if dist_.enumerated(self.search):
                combinations *= len(dist_.values or [])
        return self.samples() * combinations

    def concurrent_trials(self) -> int:
        return min(self.max_concurrent_trials, self.trials())

    def resources(self) -> dict[str, float]:
        """What the sweep holds of the cluster with its trials all running."""
        trials = self.concurrent_trials()
        per_worker = {"CPU": self.cpus_per_trial, "GPU": self.gpus_per_trial}
        return {name: trials * self.workers_per_trial * amount for name, amount in per_worker.items() if amount}


# --- serve -------------------------------------------------------------------------------------

# A registered model: models:/NAME@ALIAS or models:/NAME/VERSION.
REGISTRY_URI = r"models:/(?P<name>[^/@]+)(?:/(?P<version>[0-9]+)|@(?P<alias>[A-Za-z0-9_-]+))"


class AutoscalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0, description="fewest replicas (0 lets an idle app scale to none)")
    max_replicas: int = Field(2, ge=1, description="most replicas")
    target_ongoing_requests: float = Field(8, gt=0, description="requests in flight per replica Serve aims for")
    upscale_delay_s: float = Field(30, ge=0, description="how long load must stay high before replicas are added")
    downscale_delay_s: float = Field(600, ge=0, description="how long load must stay low before replicas are removed")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    app_name: str = Field("ptft", description="Ray Serve application name")
    host: str = Field("127.0.0.1", description="HTTP bind address; 0.0.0.0 exposes it beyond this machine")
    port: int = Field(8000, gt=0, lt=65536)

    @field_validator("host")
    @classmethod
    def _bindable(cls, host: str) -> str:
        if problem := bind_address_problem(host):
            raise PydanticCustomError("bind_address", problem)
        return host

    route_prefix: str = Field("/", description="URL prefix of the application")

    @field_validator("app_name")
    @classmethod
    def _named(cls, name: str) -> str:
        if not name.strip():
            raise PydanticCustomError("serve_name", "empty: Ray Serve names every application")
        return name

    @field_validator("route_prefix")
    @classmethod
    def _routable(cls, prefix: str) -> str:
        if problem := route_prefix_problem(prefix):
            raise PydanticCustomError("route_prefix", problem)
        return prefix

    num_replicas: int = Field(1, ge=1, description="model replicas (fixed; see autoscaling)")
    autoscaling: AutoscalingConfig | None = Field(None, description="scale replicas with load instead of num_replicas")
    cpus_per_replica: float = Field(0.5, gt=0, description="CPUs Ray reserves per replica")
    rollout_surge_percent: int = Field(
        100,
        ge=0,
        le=100,
        description="extra replicas while a new version rolls "
        "out: the old ones serve until theirs are ready (0: stop old first, no spare "
        "CPUs needed, requests wait meanwhile)",
    )
    max_batch_size: int = Field(16, gt=0, description="requests scored together by @serve.batch (1: no batching)")
    max_batch_tokens: int = Field(
        8192,
        gt=0,
        description="most padded tokens in one forward pass; a larger batch is scored in several",
    )
    batch_wait_timeout_s: float = Field(0.002, ge=0, description="how long a batch waits to fill")
    stream_interval_s: float = Field(
        0.02,
        ge=0,
        description="a streamed /generate answer sends an event at most this often, with the tokens made "
        "meanwhile (every event costs the HTTP proxy as much as a short request)",
    )
    generation_batch_wait_s: float = Field(
        0.02,
        ge=0,
        description="how long a /generate batch waits to fill (it forms when the running one ends, and "
        "runs until its last row ends)",
    )
    generation_decoder: Literal["process", "thread"] = Field(
        "process",
        description="where a generation replica decodes: a child process of the replica (its GIL not shared with "
        "the replica's event loop and Ray's threads; it uses cpus_per_replica threads) or a thread of the replica",
    )
    # Requests waiting inside a replica (for a batch) are cheap; requests Serve's router holds back
    # for a busy replica are not (throughput fell 4x at 64 clients with 32 here), and the router's
    # queue also counts requests still being assigned (32 refused some at 64 clients). See
    # docs/serving.md.
    max_ongoing_requests: int = Field(
        128, gt=0, description="requests one replica holds at once (batching draws from them)"
    )
    max_queued_requests: int = Field(128, gt=0, description="requests waiting for a free replica; more get a 503")
    request_timeout_s: float = Field(30, gt=0, description="a request not answered by then gets 408")
    max_texts: int = Field(64, gt=0, description="most texts one request may send")
    max_text_bytes: int = Field(8192, gt=0, description="longest text accepted, in UTF-8 bytes")
    max_body_bytes: int = Field(1_048_576, gt=0, description="largest request body accepted")
    max_new_tokens: int = Field(
        256, gt=0, description="most tokens one POST /generate request may ask for (a generation model)"
    )
    sample_texts: list[str | dict[str, str]] = Field(
        default_factory=lambda: ["a superb and moving film .", "the plot was dull and tedious ."],
        description="sent to the deployment once it is up, as a smoke test; for question answering "
        "{question, context} objects (default: the task type's own example)",
    )

    def resources(self) -> dict[str, float]:
        """What the deployment holds of the cluster at most: every replica, new ones rolling out too."""
        replicas = self.autoscaling.max_replicas if self.autoscaling else self.num_replicas
        return {"CPU": replicas * self.cpus_per_replica * (1 + self.rollout_surge_percent / 100)}
