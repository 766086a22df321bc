"""MLflow lineage of a pipeline run, written by the runner (stages know nothing of each other):

* the datasets each stage reads, as MLflow dataset inputs (name, source, fingerprint as digest,
  context: training / validation / test / corpus), shown in the run's "Datasets used";
* `ptft.upstream.<stage>` tags: the MLflow run of each upstream stage whose output it consumed;
* the registered model version's description, with links to its pretrain, tune and finetune runs.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from components.redaction import redact_url
from components.schemas import FileSource, HubSource

UPSTREAM_TAG = "ptft.upstream.{stage}"


@dataclass(frozen=True)
class DatasetRead:
    name: str
    source: object  # a FileSource, HubSource or SyntheticSource of the config, or a folder path
    digest: str
    context: str


# MLflow adds a dataset new to an experiment with a check, then an insert: two task branches that
# read the same split (configs/demo_generation.yaml's) logged it from the driver's threads at once,
# and the second branch's stage failed on the store's UNIQUE constraint. One at a time here.
_LOGGING_DATASETS = threading.Lock()
RETRY_AFTER_S = 1.0  # a race with another process's run in the same experiment: once more, the dataset then there


def log_datasets(client: MlflowClient, run_id: str, reads: list[DatasetRead]) -> None:
    inputs = [
        DatasetInput(
            MetaDataset(_source(read.source), name=read.name, digest=read.digest)._to_mlflow_entity(),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, read.context)],
        )
        for read in reads
    ]
    with _LOGGING_DATASETS:
        try:
            client.log_inputs(run_id, datasets=inputs)
        except MlflowException:
            time.sleep(RETRY_AFTER_S)
            client.log_inputs(run_id, datasets=inputs)


def tag_upstream(client: MlflowClient, run_id: str, upstream_runs: dict[str, str]) -> None:
    """`ptft.upstream.<stage>`: the MLflow run of each upstream stage whose output it consumed."""
    for upstream, upstream_run in upstream_runs.items():
        client.set_tag(run_id, UPSTREAM_TAG.format(stage=upstream), upstream_run)


def model_version_lineage(
    stage_runs: dict[str, str], *, pipeline_run_id: str, experiment_id: str, tracking_uri: str
) -> tuple[str, dict[str, str]]:
    """A version's description (Markdown links to the runs it came from) and the same as tags."""
    lines = [f"Fine-tuned by ptft pipeline run `{pipeline_run_id}`."]
    tags = {}
    for stage, run_id in stage_runs.items():  # the stages it came from, in pipeline order
        lines.append(f"- {stage} run: [{run_id}]({run_link(tracking_uri, experiment_id, run_id)})")
        tags[f"ptft.{stage}_run_id"] = run_id
    return "\n".join(lines), tags


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: absolute for a tracking server, else the UI's own route."""
    tracking_uri = redact_url(tracking_uri)  # the lineage is logged to MLflow: no credentials
    route = f"#/experiments/{experiment_id}/runs/{run_id}"
    return f"{tracking_uri.rstrip('/')}/{route}" if tracking_uri.startswith(("http://", "https://")) else route


def _resolved(uri: str):
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():
        # MLflow registers its local-file dataset source twice (for the schemes "" and "file"), so
        # every local path "can be interpreted in multiple ways" between two identical classes.
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
        return resolve_dataset_source(uri)


def _source(source: object):
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    if isinstance(source, HubSource):
        return HuggingFaceDatasetSource(
            path=source.name, config_name=source.config_name, split=source.split, revision=source.revision
        )
    if isinstance(source, FileSource):
        return _resolved(source.path if "://" in source.path else str(Path(source.path).resolve()))
    if isinstance(source, (str, Path)):
        return _resolved(str(source))
    return CodeDatasetSource(tags={"generator": "components.synthetic", **source.model_dump(mode="json")})
