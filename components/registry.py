"""MLflow Model Registry: log the classifier with the transformers flavor, register a version,
and move the aliases: `candidate` always, `champion` when it beats the current champion on the
same test split. `promote` and `rollback` move `champion` by hand; the registered model's tag
`ptft.champion_history` remembers the order, so a rollback knows where to return."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from transformers import AutoModelForSequenceClassification, AutoTokenizer

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
ACCURACY_TAG = "ptft.test_accuracy"
TEST_SPLIT_TAG = "ptft.test_split"  # fingerprint of the test data the accuracy was measured on
HISTORY_TAG = "ptft.champion_history"  # JSON list of versions, latest champion last
TASK = "text-classification"


def register_classifier(
    model_dir: Path, *, name: str, run_id: str, tracking_uri: str, test_accuracy: float, test_split: str,
    lineage: dict[str, str],
) -> dict:  # fmt: skip
    """Log the HF folder under `run_id`, register it as `name` and set aliases. Returns the version info."""
    mlflow.set_tracking_uri(tracking_uri)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    example = ["a sample text to classify"]
    signature = infer_signature(example, [{"label": model.config.id2label[0], "score": 0.5}])
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name="model", task=TASK,
            signature=signature, input_example=example, registered_model_name=name,
            pip_requirements=_requirements(),
        )  # fmt: skip
    client = MlflowClient(tracking_uri)
    version = str(info.registered_model_version)
    tags = {**lineage, ACCURACY_TAG: f"{test_accuracy:.6f}", TEST_SPLIT_TAG: test_split, "ptft.finetune_run_id": run_id}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    aliases = [CANDIDATE]
    client.set_registered_model_alias(name, CANDIDATE, version)
    if _beats_champion(client, name, test_accuracy, test_split):
        promote(client, name, version)
        aliases.append(CHAMPION)
    log.info("registered %s version %s with aliases %s", name, version, aliases)
    return {"name": name, "version": version, "aliases": aliases, "model_uri": f"models:/{name}/{version}"}


def _requirements() -> list[str]:
    # Pinned explicitly: MLflow's default list adds torchvision, which this model does not use.
    from importlib.metadata import version

    return [f"{package}=={version(package).split('+')[0]}" for package in ("torch", "transformers", "tokenizers")]


def _beats_champion(client: MlflowClient, name: str, test_accuracy: float, test_split: str) -> bool:
    """The gate: strictly better than the champion, measured on the same test data."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return True  # no champion yet
    if champion.tags.get(TEST_SPLIT_TAG) != test_split:
        log.warning("champion %s v%s was tested on other data (%s, now %s): the new version stays %s; "
                    "`ptft promote %s VERSION` makes it champion", name, champion.version,
                    champion.tags.get(TEST_SPLIT_TAG), test_split, CANDIDATE, name)  # fmt: skip
        return False
    champion_accuracy = float(champion.tags.get(ACCURACY_TAG, "-1"))
    if test_accuracy > champion_accuracy:
        return True
    log.info("%s: test accuracy %.4f does not beat champion v%s (%.4f): stays %s", name, test_accuracy,
             champion.version, champion_accuracy, CANDIDATE)  # fmt: skip
    return False


def champion_history(client: MlflowClient, name: str) -> list[str]:
    return json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))


def promote(client: MlflowClient, name: str, version: str) -> str | None:
    """Make `version` the champion. Returns the version it replaced (None if there was none).

    Raises:
        MlflowException: no such registered model or version.
    """
    client.get_model_version(name, version)  # exists, or raises
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
        ValueError: the model never had an earlier champion.
    """
    history = champion_history(client, name)
    if len(history) < 2:
        raise ValueError(f"{name} has no earlier champion to return to (history: {history or 'empty'})")
    current = history.pop()
    client.set_registered_model_alias(name, CHAMPION, history[-1])
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    return current, history[-1]
