"""MLflow Model Registry: log the fine-tuned model with the transformers flavor (a pyfunc around
its folder where transformers has no pipeline for its task), register a version,
and move the aliases: `candidate` always, `champion` when it beats the current champion on the
same test split. `promote` and `rollback` move `champion` by hand; the registered model's tag
`ptft.champion_history` remembers the order, so a rollback knows where to return."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from components.redaction import redact_url
from components.tasks import TaskType, task_type

log = logging.getLogger(__name__)


class _NoHubCardWarnings(logging.Filter):
    """A ptft model is a local folder trained on the user's data, not a Hugging Face Hub repo:
    MLflow's lookups of its Hub model card and licence always fail, and say so as warnings."""

    QUIET = ("The model card could not be retrieved from the hub", "Unable to find license information")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.QUIET)


logging.getLogger("mlflow.transformers").addFilter(_NoHubCardWarnings())

CANDIDATE, CHAMPION = "candidate", "champion"
ACCURACY_TAG = "ptft.test_accuracy"  # a classifier's score; other task types' are ptft.test_<headline>
TASK_TYPE_TAG = "ptft.task_type"
TEST_SPLIT_TAG = "ptft.test_split"  # fingerprint of the test data the accuracy was measured on
CACHE_KEY_TAG = "ptft.cache_key"  # the finetune artifact a version was registered from
HISTORY_TAG = "ptft.champion_history"  # JSON list of versions, latest champion last


def register_classifier(
    model_dir: Path,
    *,
    name: str,
    run_id: str,
    tracking_uri: str,
    test_accuracy: float,
    test_split: str,
    lineage: dict[str, str],
    task: TaskType | None = None,
) -> dict:
    """Log the HF folder under `run_id`, register it as `name` and set aliases. Returns the version info.

    `test_accuracy` is the task type's headline test score (accuracy; entity F1 for entities), kept
    in the tag `ptft.test_<headline>` that the champion gate compares."""
    task = task or task_type("sequence_classification")
    score_tag = f"ptft.test_{task.headline}"
    client = MlflowClient(tracking_uri)
    # Idempotent: a stage re-entered after a kill during registration continues the same MLflow
    # run, and finds the version that run registered already.
    existing = _versions(client, name, f"run_id = '{run_id}'")
    version = str(existing[0].version) if existing else _log_and_register(model_dir, name, run_id, tracking_uri, task)
    tags = {**lineage, score_tag: f"{test_accuracy:.6f}", TEST_SPLIT_TAG: test_split, "ptft.finetune_run_id": run_id}
    tags[TASK_TYPE_TAG] = task.name
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    aliases = [CANDIDATE]
    client.set_registered_model_alias(name, CANDIDATE, version)
    if _current_champion(client, name) == [version]:
        aliases.append(CHAMPION)  # registered and promoted before the kill that re-entered this stage
    elif _beats_champion(client, name, test_accuracy, test_split, score_tag):
        promote(client, name, version)
        aliases.append(CHAMPION)
    log.info("registered %s version %s with aliases %s", name, version, aliases)
    return {"name": name, "version": version, "aliases": aliases, "model_uri": f"models:/{name}/{version}"}


def _log_and_register(model_dir: Path, name: str, run_id: str, tracking_uri: str, task: TaskType) -> str:
    from transformers import AutoTokenizer

    mlflow.set_tracking_uri(tracking_uri)
    model = task.model_class().from_pretrained(model_dir, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    example = [task.example]
    signature = infer_signature(example, task.output_example(model))
    if task.mlflow_task is None:  # transformers has no pipeline for it: a pyfunc around the folder
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=TaskModel(),
                artifacts={"hf": str(model_dir)},
                signature=signature,
                registered_model_name=name,
                pip_requirements=_requirements(),
            )
        return str(info.registered_model_version)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task=task.mlflow_task,
            signature=signature,
            input_example=example,
            registered_model_name=name,
            pip_requirements=_requirements(),
        )
    return str(info.registered_model_version)


def hf_folder_of(logged: mlflow.models.Model) -> str:
    """Where a logged model's Hugging Face folder lies within its artifacts: the transformers
    flavor's `model/`, or the `hf` artifact of a `TaskModel` pyfunc (`artifacts/model/`)."""
    if "transformers" in logged.flavors:
        return logged.flavors["transformers"].get("model_binary", "model")
    return logged.flavors["python_function"]["artifacts"]["hf"]["path"]


class TaskModel(mlflow.pyfunc.PythonModel):
    """A fine-tuned model of a task that transformers has no pipeline for (question answering, since
    transformers 5): its Hugging Face folder as the artifact `hf`, answering as `ptft serve` does
    (its task type's `predict`). Loading it needs ptft importable."""

    def load_context(self, context) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from components.tasks import task_of_model

        folder = context.artifacts["hf"]
        self.task = task_of_model(AutoConfig.from_pretrained(folder))
        self.model = self.task.model_class().from_pretrained(folder, use_safetensors=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    # Typed as what MLflow hands over for our column signature: no schema inferred from the hint
    # (the logged signature stays the one), and no "add type hints" warning in every process.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[dict]:
        items = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        return self.task.predict(self.model, self.tokenizer, items, self.tokenizer.model_max_length)


def find_version(tracking_uri: str, name: str, tags: dict[str, str]) -> dict | None:
    """The newest version of `name` carrying all these tags, in the registry of `tracking_uri`, as
    `register_classifier` returns it; None when the registry has no such version (or no such model)."""
    client = MlflowClient(tracking_uri)
    conditions = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    found = _versions(client, name, conditions)
    if not found:
        return None
    version = client.get_model_version(name, found[0].version)  # a search leaves the aliases out
    return {
        "name": name,
        "version": str(version.version),
        "aliases": sorted(version.aliases),
        "model_uri": f"models:/{name}/{version.version}",
        "run_id": version.run_id,
    }


def require_files(client: MlflowClient, name: str, version: str, reference: str | None = None) -> None:
    """Raises ValueError when the registry holds `version` but the artifact store no longer holds
    its files: served, promoted or rolled back to, it could only fail later, on the cluster."""
    if (missing := _files_missing(client, name, version)) is not None:
        raise ValueError(
            f"{reference or f'models:/{name}/{version}'!r} (v{version}) is in the registry at "
            f"{redact_url(client.tracking_uri)}, but its files are not: {missing} holds no MLmodel. Restore the "
            "artifact store, or register the model again (`ptft run CONFIG --rerun finetune`)"
        )


def _files_missing(client: MlflowClient, name: str, version: str) -> str | None:
    """Where a registered version's files should be, when they are not there: an artifact store
    cleaned by hand left the registry pointing at nothing, and Serve's replicas then failed three
    times over (`No such artifact: 'MLmodel'`) before the deploy did, in a traceback."""
    uri = client.get_model_version_download_uri(name, version)
    try:
        # The client's store, not MLflow's default: that resolved a server's `runs:/` URI against
        # a ./mlflow.db it made in the working directory, and found nothing to check.
        listed = mlflow.artifacts.list_artifacts(artifact_uri=uri, tracking_uri=client.tracking_uri)
    except Exception as error:  # noqa: BLE001 - a store that cannot be listed (credentials, network): the load tells
        log.info("the files of %s v%s at %s could not be listed: %s", name, version, redact_url(uri), error)
        return None
    return None if any(Path(each.path).name == "MLmodel" for each in listed) else redact_url(uri)


def describe_version(tracking_uri: str, name: str, version: str, description: str, tags: dict[str, str]) -> None:
    """Set a version's description and tags (the lineage of the runs it came from)."""
    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=description)


def _versions(client: MlflowClient, name: str, condition: str) -> list:
    """Versions of `name` matching `condition`, newest first."""
    escaped = name.replace("'", "\\'")
    found = client.search_model_versions(f"name = '{escaped}' and {condition}")  # [] for an unknown name
    return sorted(found, key=lambda version: int(version.version), reverse=True)


def _requirements() -> list[str]:
    # Pinned explicitly: MLflow's default list adds torchvision, which this model does not use.
    from importlib.metadata import version

    return [f"{package}=={version(package).split('+')[0]}" for package in ("torch", "transformers", "tokenizers")]


def _beats_champion(
    client: MlflowClient, name: str, test_accuracy: float, test_split: str, score_tag: str = ACCURACY_TAG
) -> bool:
    """The gate: strictly better than the champion, measured on the same test data."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return True  # no champion yet
    if champion.tags.get(TEST_SPLIT_TAG) != test_split:
        log.warning(
            "champion %s v%s was tested on other data (%s, now %s): the new version stays %s; "
            "`ptft promote %s VERSION` makes it champion",
            name,
            champion.version,
            champion.tags.get(TEST_SPLIT_TAG),
            test_split,
            CANDIDATE,
            name,
        )
        return False
    champion_accuracy = float(champion.tags.get(score_tag, "-1"))
    if test_accuracy > champion_accuracy:
        return True
    log.info(
        "%s: %s %.4f does not beat champion v%s (%.4f): stays %s",
        name,
        score_tag.removeprefix("ptft."),
        test_accuracy,
        champion.version,
        champion_accuracy,
        CANDIDATE,
    )
    return False


def champion_history(client: MlflowClient, name: str) -> list[str]:
    return json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))


def promote(client: MlflowClient, name: str, version: str) -> str | None:
    """Make `version` the champion. Returns the version it replaced (None if there was none).

    Raises:
        MlflowException: no such registered model or version.
        ValueError: the version's files are gone from the artifact store.
    """
    client.get_model_version(name, version)  # exists, or raises
    require_files(client, name, version)
    history = champion_history(client, name) or _current_champion(client, name)
    previous = history[-1] if history else None
    if previous != version:
        history.append(version)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    return previous


def _current_champion(client: MlflowClient, name: str) -> list[str]:
    """[the champion's version], for a model whose alias was set before the history was kept."""
    try:
        return [str(client.get_model_version_by_alias(name, CHAMPION).version)]
    except MlflowException:
        return []


def rollback(client: MlflowClient, name: str) -> tuple[str, str]:
    """Give `champion` back to the version that held it before. Returns (from, to).

    Raises:
        ValueError: the model never had an earlier champion, or that version's files are gone.
    """
    history = champion_history(client, name)
    if len(history) < 2:
        raise ValueError(f"{name} has no earlier champion to return to (history: {history or 'empty'})")
    require_files(client, name, history[-2])
    current = history.pop()
    client.set_registered_model_alias(name, CHAMPION, history[-1])
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    return current, history[-1]
