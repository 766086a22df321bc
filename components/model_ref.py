"""Which model a command or a Serve application means: `models:/NAME@ALIAS`, `models:/NAME/VERSION`
or a Hugging Face model folder, resolved to a `ModelInfo`.

Light on purpose: no torch, no Ray, and MLflow only once the registry has answered, so that
`ptft serve`, `predict` and `explain` name a missing model or a registry that does not answer
before they import what serving needs (components/serve.py, ~2 s more).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, Field

from components.net import mlflow_unanswered
from components.redaction import redact_text, redact_url
from components.schemas import REGISTRY_URI

# MLflow error codes of a registry that answered: the name, version or alias is not there.
REGISTRY_ANSWERS = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}


class RegistryUnavailable(ConnectionError):
    """The model registry did not answer; what is deployed stays as it is."""


class ModelInfo(BaseModel):
    name: str
    version: str
    model_uri: str = Field(description="what replicas load: models:/NAME/VERSION or a folder")
    run_id: str | None = None
    alias: str | None = Field(None, description="the registry alias this app follows (promote/rollback move it)")


def resolve_model(reference: str, tracking_uri: str | None) -> ModelInfo:
    """`models:/NAME@ALIAS` (pinned to the alias's version now), `models:/NAME/VERSION`, or a
    Hugging Face folder.

    Raises:
        ValueError: the reference is malformed, or the registry has no such version or alias.
        RegistryUnavailable: the registry did not answer (server down, network, store errors).
    """
    parts = re.fullmatch(REGISTRY_URI, reference)
    if parts is None:
        folder = Path(reference).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise ValueError(f"{reference!r} is neither models:/NAME@ALIAS, models:/NAME/VERSION nor a model folder")
        return ModelInfo(name=folder.name, version="local", model_uri=str(folder))
    name, version, alias = parts["name"], parts["version"], parts["alias"]
    found = lookup(tracking_uri, name, version=version, alias=alias)
    return ModelInfo(
        name=name,
        version=found["version"],
        model_uri=f"models:/{name}/{found['version']}",
        run_id=found["run_id"],
        alias=alias,
    )


def lookup(tracking_uri: str | None, name: str, *, version: str | None = None, alias: str | None = None) -> dict:
    """`{version, run_id}` of `name`'s version `version`, or of the one `alias` points at now.

    Raises:
        ValueError: the registry answered, and has no such model, version or alias.
        RegistryUnavailable: the registry did not answer (server down, network, store errors).
    """
    reference = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    if reason := mlflow_unanswered(tracking_uri):
        where = redact_url(tracking_uri)
        raise RegistryUnavailable(f"the registry at {where} did not answer for {reference!r}: {reason}")
    from mlflow.exceptions import MlflowException  # ~1 s: only once there is a registry that answers
    from mlflow.tracking import MlflowClient

    from components.registry import require_files

    client = MlflowClient(tracking_uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as error:
        if error.error_code not in REGISTRY_ANSWERS:
            raise RegistryUnavailable(
                f"the registry at {redact_url(tracking_uri)} did not answer for {reference!r}: "
                + redact_text(error.message[:300])
            ) from None
        raise ValueError(
            f"{reference!r} is not in the registry at {redact_url(tracking_uri)} ({redact_text(error.message)}); "
            "the MLflow UI (ptft ui) lists registered models and their aliases"
        ) from None
    require_files(client, name, str(found.version), reference)
    return {"version": str(found.version), "run_id": found.run_id}
