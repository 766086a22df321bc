"""The stage declarations (pipelines/stages/): the graph they form, that the pipeline layer names
no stage, and the registration side effect: keyed by registry and store, idempotent."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components import registry
from components.stage import StageContext, StageResult
from pipelines import stages
from pipelines.config import validate
from pipelines.stages.finetune import FinetuneOutputs, RegisteredVersion
from tests.conftest import REPO, tiny_classifier, tiny_config_dict


def test_every_stage_comes_after_what_it_reads() -> None:
    seen: set[str] = set()
    for stage in stages.STAGES:
        assert set(stage.upstream) <= seen, stage.name
        seen.add(stage.name)
    assert stages.ancestors("finetune") == ("tokenize", "pretrain", "tune")
    assert stages.downstream("pretrain") == ("pretrain", "tune", "finetune", "serve")
    assert stages.downstream("serve") == ("serve",)


@pytest.mark.parametrize("module", ["runner.py", "manifest.py", "lineage.py", "progress.py"])
def test_the_pipeline_layer_names_no_stage(module: str) -> None:
    """What a stage is lives in its declaration; these modules work from the declarations."""
    tree = ast.parse((REPO / "pipelines" / module).read_text())
    named = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in stages.NAMES}
    assert not named, f"pipelines/{module} names stages {sorted(named)}"


def test_what_serve_deploys_is_in_its_key(tmp_path: Path) -> None:
    """A renamed registered model, or another tracking store, is another deployment."""
    config = validate(tiny_config_dict(tmp_path))
    registered = RegisteredVersion(name="unit-classifier", version="1", model_uri="models:/unit-classifier/1")
    inputs = _finetuned(registered)
    serve = stages.BY_NAME["serve"]
    moved = _finetuned(registered.model_copy(update={"name": "other-classifier"}))
    elsewhere = validate({**tiny_config_dict(tmp_path), "tracking": {"uri": "http://mlflow:5000"}})
    base = serve.key_extras(config, inputs)
    assert serve.key_extras(config, moved) != base
    assert serve.key_extras(elsewhere, inputs) != base


def _finetuned(registered: RegisteredVersion) -> stages.Inputs:
    outputs = FinetuneOutputs(registered=registered, weights_sha256="x")
    return stages.Inputs(results={"finetune": StageResult("/m", outputs=outputs)})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("unit", artifact_location=str(folder / "artifacts"))
    return {
        "uri": uri,
        "client": client,
        "experiment": experiment,
        "model": tiny_classifier(folder / "model", 1),
        "folder": folder,
    }


def _register(store: dict, run_id: str, name: str) -> dict:
    return registry.register_classifier(
        store["model"],
        name=name,
        run_id=run_id,
        tracking_uri=store["uri"],
        test_accuracy=0.75,
        test_split="s",
        lineage={},
    )


def test_registering_again_from_the_same_run_makes_no_second_version(store: dict) -> None:
    """A finetune re-entered after a kill during registration continues the same MLflow run."""
    run_id = store["client"].create_run(store["experiment"]).info.run_id
    first = _register(store, run_id, "again")
    second = _register(store, run_id, "again")
    assert first["version"] == second["version"] == "1"
    assert second["aliases"] == ["candidate", "champion"]
    assert len(store["client"].search_model_versions("name = 'again'")) == 1


def test_a_cached_finetune_is_registered_once_in_a_new_registry(store: dict, tmp_path: Path) -> None:
    config = validate({**tiny_config_dict(tmp_path), "name": "renamed", "tracking": {"uri": store["uri"]}})
    cached = StageResult(
        str(store["model"]),
        {"test/accuracy": 0.5},
        FinetuneOutputs(
            registered=RegisteredVersion(name="unit-classifier", version="3", model_uri="models:/unit-classifier/3"),
            weights_sha256="abc",
        ),
        cached=True,
    )
    ensure = stages.BY_NAME["finetune"].side_effect.ensure
    made = []
    for attempt in (1, 2):  # two cache hits of the same artifact, in two pipeline runs
        run_id = store["client"].create_run(store["experiment"]).info.run_id
        ctx = StageContext(
            pipeline_run_id=f"p{attempt}",
            stage="finetune",
            output_dir=store["model"].parent,
            storage=tmp_path,
            tracking_uri=store["uri"],
            experiment_id=store["experiment"],
            mlflow_run_id=run_id,
            cache_key="artifact-key",
        )
        made.append(ensure(config, stages.Inputs(mlflow_runs={"pretrain": "r0"}), cached, ctx).outputs.registered)
    assert made[0].name == "renamed-classifier" and made[0] == made[1]  # found again, not registered twice
    versions = store["client"].search_model_versions("name = 'renamed-classifier'")
    assert [version.tags[registry.CACHE_KEY_TAG] for version in versions] == ["artifact-key"]
    assert "pretrain run" in versions[0].description  # its lineage, as a fresh registration has
