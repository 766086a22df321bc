"""MLflow Model Registry: log the classifier with the transformers flavor, register a version,
and move the aliases: `candidate` always, `champion` when it beats the current champion."""

from __future__ import annotations

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
TASK = "text-classification"


def register_classifier(
    model_dir: Path, *, name: str, run_id: str, tracking_uri: str, test_accuracy: float,
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
    for key, value in {**lineage, ACCURACY_TAG: f"{test_accuracy:.6f}", "ptft.finetune_run_id": run_id}.items():
        client.set_model_version_tag(name, version, key, value)
    aliases = [CANDIDATE]
    client.set_registered_model_alias(name, CANDIDATE, version)
    if _beats_champion(client, name, test_accuracy):
        client.set_registered_model_alias(name, CHAMPION, version)
        aliases.append(CHAMPION)
    log.info("registered %s version %s with aliases %s", name, version, aliases)
    return {"name": name, "version": version, "aliases": aliases, "model_uri": f"models:/{name}/{version}"}


def _requirements() -> list[str]:
    # Pinned explicitly: MLflow's default list adds torchvision, which this model does not use.
    from importlib.metadata import version

    return [f"{package}=={version(package).split('+')[0]}" for package in ("torch", "transformers", "tokenizers")]


def _beats_champion(client: MlflowClient, name: str, test_accuracy: float) -> bool:
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return True  # no champion yet
    return test_accuracy >= float(champion.tags.get(ACCURACY_TAG, "-1"))
