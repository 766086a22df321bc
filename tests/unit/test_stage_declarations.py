"""The stage declarations (pipelines/stages/): the graph they form, that the pipeline layer names
no stage, and the registration side effect: keyed by registry and store, idempotent."""

from __future__ import annotations

import ast
import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components import registry
from components.stage import StageContext, StageResult
from pipelines import stages
from pipelines.pipeline_config import validate
from pipelines.stages.finetune import FinetuneOutputs, RegisteredVersion
from tests.conftest import REPO, sqlite_store, tiny_classifier, tiny_config_dict


def test_every_stage_comes_after_what_it_reads() -> None:
    seen: set[str] = set()
    for stage in stages.STAGES:
        assert set(stage.upstream) <= seen, stage.name
        seen.add(stage.name)
    nodes = stages.graph(validate(tiny_config_dict(Path("/tmp/unused"))))
    assert stages.node_ancestors(nodes, "finetune") == ("tokenize", "pretrain", "prepare", "tune")
    assert stages.node_descendants(nodes, {"pretrain"}) == {"pretrain", "tune", "finetune", "serve"}
    assert stages.node_descendants(nodes, {"prepare"}) == {"prepare", "tune", "finetune", "serve"}
    assert stages.node_descendants(nodes, {"serve"}) == {"serve"}


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
    uri = sqlite_store(folder / "mlflow.db")
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


# --- tasks: one pre-training, a branch per task ------------------------------------------------


def _multitask(storage: Path, tasks: tuple[str, ...] = ("sentiment", "topic")) -> dict:
    raw = tiny_config_dict(storage)
    sentiment = raw["data"].pop("task")
    topic = {split: {**source, "task": "topic"} for split, source in sentiment.items()}
    data = {"sentiment": sentiment, "topic": topic}
    raw["finetune"] = {"epochs": 3}
    raw["tasks"] = {name: {"data": data[name]} for name in tasks}
    if "topic" in tasks:
        raw["tasks"]["topic"]["finetune"] = {"epochs": 5}
    return raw


def test_a_config_of_one_task_keeps_the_chain(tmp_path: Path) -> None:
    nodes = stages.graph(validate(tiny_config_dict(tmp_path)))
    assert [node.id for node in nodes] == ["tokenize", "pretrain", "prepare", "tune", "finetune", "serve"]
    assert {node.id: node.upstream for node in nodes}["tune"] == ("tokenize", "pretrain", "prepare")


def test_tasks_fan_out_after_pretrain(tmp_path: Path) -> None:
    nodes = {node.id: node for node in stages.graph(validate(_multitask(tmp_path)))}
    assert list(nodes) == [
        "tokenize",
        "pretrain",
        "prepare.sentiment",
        "prepare.topic",
        "tune.sentiment",
        "tune.topic",
        "finetune.sentiment",
        "finetune.topic",
        "serve.sentiment",
        "serve.topic",
    ]
    assert nodes["tune.topic"].upstream == ("tokenize", "pretrain", "prepare.topic")
    assert nodes["finetune.topic"].upstream == ("tokenize", "pretrain", "prepare.topic", "tune.topic")
    assert nodes["serve.topic"].upstream == ("finetune.topic",)


def test_each_rerun_forces_its_nodes_and_what_reads_them(tmp_path: Path) -> None:
    from pipelines.runner import _forced

    nodes = stages.graph(validate(_multitask(tmp_path)))
    forced = _forced(nodes, ("finetune.topic", "serve.sentiment"))
    assert forced == {"finetune.topic", "serve.topic", "serve.sentiment"}
    assert _forced(nodes, ("tune",)) == {
        f"{stage}.{task}" for stage in ("tune", "finetune", "serve") for task in ("sentiment", "topic")
    }


def test_a_task_sees_its_own_sections_over_the_shared_ones(tmp_path: Path) -> None:
    config = validate(_multitask(tmp_path))
    topic = {node.id: node for node in stages.graph(config)}["finetune.topic"].config(config)
    assert topic.data.task.train.task == "topic" and topic.finetune.epochs == 5
    assert config.for_task("sentiment").finetune.epochs == 3  # the shared value
    assert topic.registered_model_name() == "unit-topic"
    assert (topic.serve.app_name, topic.serve.route_prefix) == ("ptft-topic", "/topic")


def test_adding_a_task_keeps_the_pretraining_key(tmp_path: Path) -> None:
    """One task more is one branch more: tokenizer, corpus blocks and pre-training stay cached."""
    one, two = validate(_multitask(tmp_path, ("sentiment",))), validate(_multitask(tmp_path))
    for name in ("tokenize", "pretrain"):
        stage = stages.BY_NAME[name]
        assert stage.settings(one) == stage.settings(two), name
    tokenize = stages.BY_NAME["tokenize"]
    assert tokenize.key_extras(one, stages.Inputs()) == tokenize.key_extras(two, stages.Inputs())


def test_the_task_data_is_in_prepare_s_key_only(tmp_path: Path) -> None:
    """Edited fine-tuning data re-runs the task's prepare, never the corpus tokenization or the
    pre-training; a config of one task shares those with a config of several on the same corpus."""
    raw = tiny_config_dict(tmp_path)
    one, edited = validate(raw), validate({**raw, "data": {**raw["data"], "task": _fewer_rows(raw["data"]["task"])}})
    several = validate(_multitask(tmp_path))
    tokenize, prepare = stages.BY_NAME["tokenize"], stages.BY_NAME["prepare"]
    for config in (edited, several):
        for name in ("tokenize", "pretrain"):
            assert stages.BY_NAME[name].settings(config) == stages.BY_NAME[name].settings(one), name
        assert tokenize.key_extras(config, stages.Inputs()) == tokenize.key_extras(one, stages.Inputs())
    assert prepare.settings(edited) != prepare.settings(one)
    assert [node.id for node in stages.graph(one)][:3] == ["tokenize", "pretrain", "prepare"]


def _fewer_rows(task: dict) -> dict:
    train = {**task["train"], "num_examples": task["train"].get("num_examples", 100) // 2}
    return {**task, "train": train}


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"tasks": {"Topic!": {}}}, "tasks.Topic!"),
        ({"tasks": {"topic": {"data": "x"}}}, "tasks.topic.data"),
        ({"tasks": {"topic": {"finetune": {"epochs": 0}}}}, "tasks.topic.finetune.epochs"),
    ],
)
def test_bad_tasks_are_named(tmp_path: Path, change: dict, key: str) -> None:
    from pipelines.pipeline_config import ConfigError

    raw = _multitask(tmp_path)
    for name, spec in change["tasks"].items():
        raw["tasks"][name] = {**raw["tasks"].get(name, {"data": raw["tasks"]["sentiment"]["data"]}), **spec}
    with pytest.raises(ConfigError) as error:
        validate(raw)
    assert key in str(error.value)


def test_one_task_or_several_not_both(tmp_path: Path) -> None:
    from pipelines.pipeline_config import ConfigError

    raw = _multitask(tmp_path)
    raw["data"]["task"] = raw["tasks"]["sentiment"]["data"]
    with pytest.raises(ConfigError, match="both data.task and tasks"):
        validate(raw)


def test_a_failed_branch_stops_only_itself_and_a_resume_runs_only_it(tmp_path: Path) -> None:
    """The runner on a graph of its own (no stage it knows): shared -> train.<task> -> publish.<task>,
    with real MLflow (sqlite), manifest and artifact folders."""
    from pipelines import manifest as mf
    from pipelines import runner

    uri = sqlite_store(tmp_path / "mlflow.db")
    config = validate({**_multitask(tmp_path / "storage"), "tracking": {"uri": uri}})
    broken, calls = {"train.topic"}, []

    def work(config, inputs: stages.Inputs, ctx: StageContext) -> StageResult:
        calls.append(ctx.stage)
        if ctx.stage in broken:
            raise RuntimeError(f"{ctx.stage} broke")
        (ctx.output_dir / "made").write_text(f"{ctx.stage} from {sorted(inputs.results)}")
        return StageResult(str(ctx.output_dir))

    shared = stages.Stage("shared", "1", (), lambda config: {}, work)
    train = stages.Stage("train", "1", ("shared",), lambda config: {"epochs": config.finetune.epochs}, work)
    publish = stages.Stage("publish", "1", ("train",), lambda config: {}, work)
    nodes = (stages.Node("shared", shared, None, ()),) + tuple(
        node
        for task in ("sentiment", "topic")
        for node in (
            stages.Node(f"train.{task}", train, task, ("shared",)),
            stages.Node(f"publish.{task}", publish, task, (f"train.{task}",)),
        )
    )
    client = MlflowClient(uri)
    experiment = client.create_experiment("branches", artifact_location=str(tmp_path / "artifacts"))
    storage = config.storage_path()
    manifest = mf.Manifest.create(storage, "run-1", "unit", tuple(node.id for node in nodes), {})

    def attempt() -> list[Exception]:
        parent = client.create_run(experiment).info.run_id
        result = runner.PipelineResult("run-1", parent, experiment, uri)
        return runner._StageRunner(config, nodes, client, result, storage, manifest, set()).run_all(list(nodes), None)

    failures = attempt()
    assert [str(error) for error in failures] == ["train.topic broke"]
    statuses = {node_id: record.status for node_id, record in manifest.stages.items()}
    assert statuses == {
        "shared": mf.SUCCEEDED,
        "train.sentiment": mf.SUCCEEDED,
        "train.topic": mf.FAILED,
        "publish.sentiment": mf.SUCCEEDED,
        "publish.topic": mf.SKIPPED,
    }
    assert "upstream train.topic failed" in manifest.stages["publish.topic"].error
    # Each task's stage keyed on its own config: the two trains are two artifacts.
    assert manifest.stages["train.sentiment"].key != manifest.stages["train.topic"].key

    broken.clear()
    calls.clear()
    assert attempt() == []  # the resume: only what failed or never ran
    assert calls == ["train.topic", "publish.topic"]
    assert {record.status for record in manifest.stages.values()} == {mf.SUCCEEDED}
    made = Path(manifest.stages["publish.topic"].output_uri) / "made"
    assert made.read_text() == "publish.topic from ['shared', 'train']"


def test_branches_whose_claims_fit_run_side_by_side_through_the_runner(tmp_path: Path) -> None:
    """Two tasks' training nodes that claim a CPU each, on a cluster with two free: they overlap,
    and the manifest and the MLflow runs of both are whole."""
    import threading

    from pipelines import manifest as mf
    from pipelines import runner

    uri = sqlite_store(tmp_path / "mlflow.db")
    config = validate({**_multitask(tmp_path / "storage"), "tracking": {"uri": uri}})
    both_running = threading.Barrier(2, timeout=30)  # each waits for the other: only side by side passes

    def work(config, inputs: stages.Inputs, ctx: StageContext) -> StageResult:
        if ctx.stage.startswith("train."):
            both_running.wait()
        return StageResult(str(ctx.output_dir), metrics={"done": 1.0})

    shared = stages.Stage("shared", "1", (), lambda config: {}, work)
    train = stages.Stage("train", "1", ("shared",), lambda config: {"epochs": config.finetune.epochs}, work)
    train = dataclasses.replace(train, claims=lambda config: {"CPU": 1.0})
    nodes = (stages.Node("shared", shared, None, ()),) + tuple(
        stages.Node(f"train.{task}", train, task, ("shared",)) for task in ("sentiment", "topic")
    )
    client = MlflowClient(uri)
    experiment = client.create_experiment("side-by-side", artifact_location=str(tmp_path / "artifacts"))
    manifest = mf.Manifest.create(config.storage_path(), "run-1", "unit", tuple(node.id for node in nodes), {})
    parent = client.create_run(experiment).info.run_id
    result = runner.PipelineResult("run-1", parent, experiment, uri)
    stage_runner = runner._StageRunner(config, nodes, client, result, config.storage_path(), manifest, set())
    stage_runner.free_resources = lambda: {"CPU": 2.0}
    assert stage_runner.run_all(list(nodes), None) == []
    records = manifest.stages
    assert {record.status for record in records.values()} == {mf.SUCCEEDED}
    sentiment, topic = records["train.sentiment"], records["train.topic"]
    assert sentiment.started_at < topic.ended_at and topic.started_at < sentiment.ended_at
    for record in records.values():
        run = client.get_run(record.mlflow_run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["done"] == 1.0

    # With room for one, the second waits for the first (the barrier would time out otherwise).
    one_at_a_time = threading.Barrier(1)
    both_running = one_at_a_time
    manifest = mf.Manifest.create(config.storage_path(), "run-2", "unit", tuple(node.id for node in nodes), {})
    stage_runner = runner._StageRunner(
        config, nodes, client, result, config.storage_path(), manifest, {"train.sentiment", "train.topic"}
    )
    stage_runner.free_resources = lambda: {"CPU": 1.0}
    assert stage_runner.run_all(list(nodes), None) == []
    sentiment, topic = manifest.stages["train.sentiment"], manifest.stages["train.topic"]
    assert sentiment.ended_at <= topic.started_at or topic.ended_at <= sentiment.started_at


def test_a_cached_model_whose_weights_changed_is_set_aside_and_made_again(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A published model is reused only while its weights match the checksum its stage recorded:
    corrupted on disk, the runner says so, moves it aside (never deletes it) and runs the stage."""
    from pydantic import BaseModel

    from components.stage import weights_sha256
    from pipelines import manifest as mf

    class Model(BaseModel):
        weights_sha256: str

    calls = []

    def train(config, inputs: stages.Inputs, ctx: StageContext) -> StageResult:
        calls.append(ctx.stage)
        folder = ctx.output_dir / "model"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        return StageResult(str(folder), outputs={"weights_sha256": weights_sha256(folder)})

    attempt, storage = _runs_of_one_stage(
        tmp_path, stages.Stage("train", "1", (), lambda config: {}, train, outputs=Model)
    )
    first = attempt("run-1")
    assert attempt("run-2").status == mf.CACHED and calls == ["train"]
    weights = Path(first.output_uri) / "model.safetensors"
    weights.write_bytes(b"\xff" + weights.read_bytes()[1:])  # one byte changed on disk
    capsys.readouterr()
    third = attempt("run-3")
    assert third.status == mf.SUCCEEDED and calls == ["train", "train"]
    assert "no longer matches its recorded checksum" in capsys.readouterr().err
    assert weights_sha256(Path(third.output_uri)) == weights_sha256(Path(first.output_uri).parent / "model")
    (damaged,) = (storage / "artifacts" / "train").glob(f".{first.key}.damaged-*")
    assert (damaged / "model" / "model.safetensors").read_bytes()[0] == 255  # kept for a look, not deleted


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda folder: (folder / "tokenizer" / "vocab.txt").unlink(), "tokenizer/vocab.txt is missing"),
        (lambda folder: shutil.rmtree(folder / "blocks"), "blocks/part-0.bin is missing"),
        (lambda folder: os.truncate(folder / "blocks" / "part-0.bin", 100), "blocks/part-0.bin is 100 bytes, not"),
        (lambda folder: (folder / "labels.json").write_text('["neg", "pox"]'), "labels.json has other content"),
        (lambda folder: (folder / "notes.txt").write_text("mine"), None),  # added beside it: not the stage's
    ],
    ids=["file-deleted", "folder-deleted", "truncated", "same-size-edit", "file-added"],
)
def test_a_cached_artifact_missing_or_changed_files_is_set_aside_and_made_again(
    tmp_path: Path, capsys: pytest.CaptureFixture, damage, said: str | None
) -> None:
    """A tokenizer folder deleted or a data block truncated in a cached artifact made it a cache hit
    all the same, and the stage that read it next failed, misleadingly (`Repo id must be in the
    form ...`, `0 training blocks ...: add corpus text`). Now a cache hit checks the files its stage
    published; a changed artifact is set aside and made again."""
    from pipelines import manifest as mf

    calls = []

    def tokenize(config, inputs: stages.Inputs, ctx: StageContext) -> StageResult:
        calls.append(ctx.stage)
        (ctx.output_dir / "tokenizer").mkdir()
        (ctx.output_dir / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\nfilm\n")
        (ctx.output_dir / "blocks").mkdir()
        (ctx.output_dir / "blocks" / "part-0.bin").write_bytes(bytes(range(256)) * 1024)  # past the hashed size
        (ctx.output_dir / "labels.json").write_text('["neg", "pos"]')
        return StageResult(str(ctx.output_dir))

    attempt, storage = _runs_of_one_stage(tmp_path, stages.Stage("tok", "1", (), lambda config: {}, tokenize))
    first = attempt("run-1")
    assert attempt("run-2").status == mf.CACHED and calls == ["tok"]
    damage(Path(first.output_uri))
    capsys.readouterr()
    third = attempt("run-3")
    err = capsys.readouterr().err
    if said is None:
        assert third.status == mf.CACHED and calls == ["tok"] and "changed since" not in err
        return
    assert third.status == mf.SUCCEEDED and calls == ["tok", "tok"]
    assert f"the cached artifact in {first.output_uri} changed since it was published ({said}" in err, err
    assert (Path(third.output_uri) / "tokenizer" / "vocab.txt").is_file()  # made again, whole
    assert (Path(third.output_uri) / "blocks" / "part-0.bin").stat().st_size == 256 * 1024
    assert len(list((storage / "artifacts" / "tok").glob(f".{first.key}.damaged-*"))) == 1  # kept for a look


def _runs_of_one_stage(tmp_path: Path, stage: stages.Stage) -> tuple[Callable[[str], object], Path]:
    """Pipeline runs of `stage` alone through the real runner, on one storage and SQLite store:
    a function that runs it under a new run id and returns the stage's record, and the storage."""
    from pipelines import manifest as mf
    from pipelines import runner

    uri = sqlite_store(tmp_path / "mlflow.db")
    config = validate({**_multitask(tmp_path / "storage"), "tracking": {"uri": uri}})
    nodes = (stages.Node(stage.name, stage, None, ()),)
    client = MlflowClient(uri)
    experiment = client.create_experiment("one-stage", artifact_location=str(tmp_path / "artifacts"))
    storage = config.storage_path()

    def attempt(run_id: str) -> mf.StageRecord:
        manifest = mf.Manifest.create(storage, run_id, "unit", (stage.name,), {})
        result = runner.PipelineResult(run_id, client.create_run(experiment).info.run_id, experiment, uri)
        stage_runner = runner._StageRunner(config, nodes, client, result, storage, manifest, set())
        assert stage_runner.run_all(list(nodes), None) == []
        return manifest.stages[stage.name]

    return attempt, storage


def test_a_published_stage_loses_its_checkpoints_and_only_its_own(tmp_path: Path) -> None:
    """Its Ray runs of every attempt and key go checkpoint-less, their result logs kept; a task's
    stage named like another's prefix, another pipeline run and a failed stage keep theirs."""
    from components.stage import remove_spent_checkpoints

    results = tmp_path / "ray_results"

    def ray_run(name: str, *checkpoints: str) -> Path:
        for checkpoint in checkpoints:
            (results / name / checkpoint).mkdir(parents=True)
            (results / name / checkpoint / "model_states.pt").write_bytes(b"\0" * 1000)
        (results / name).mkdir(parents=True, exist_ok=True)
        (results / name / "result.json").write_text("{}")
        (results / name / "checkpoint_manager_snapshot.json").write_text("{}")
        return results / name

    ctx = StageContext("r1", "tune.my", tmp_path / "out", tmp_path, "", "", "", cache_key="0123456789abcdef")
    published = [
        ray_run("r1-tune.my-0123456789ab", "trial_1/checkpoint_000001", "trial_2/checkpoint_000002"),
        ray_run("r1-tune.my-0123456789ab-trials", "trial_1/checkpoint_2026-12-06_10-00-00.1"),
        ray_run("r1-tune.my-fedcba987654", "trial_1/checkpoint_000001"),  # an earlier attempt, another key
        ray_run("r1-tune.my-0123456789ab.unstarted-1764000000"),
    ]
    kept = [
        ray_run("r1-tune.my-task-0123456789ab", "trial_1/checkpoint_000001"),
        ray_run("r2-tune.my-0123456789ab", "trial_1/checkpoint_000001"),
        ray_run("r1-finetune.my-0123456789ab", "checkpoint_2026-12-06_10-00-00.1"),
    ]
    assert ctx.ray_run_folders() == sorted(published)
    assert remove_spent_checkpoints(ctx) == 4000
    for folder in published:
        assert not list(folder.rglob("checkpoint_*")) and (folder / "result.json").is_file(), folder
    for folder in kept:
        assert len(list(folder.rglob("checkpoint_*"))) == 2, folder  # the checkpoint and Ray Train's list of them
    assert remove_spent_checkpoints(ctx) == 0


@pytest.mark.parametrize(("preset", "fits"), [("mini", False), ("tiny", True)])
def test_pretraining_without_room_on_the_storage_fails_before_it_starts(
    tmp_path: Path, preset: str, fits: bool
) -> None:
    """The real pretrain declaration through the real runner, on a real 8 MB disk: a 3.4M-parameter
    model (mini) needs one checkpoint and the exported model at once, 47 MB at the least, so the
    stage fails in a line naming both sizes before it starts (before, at its first checkpoint, after
    the steps before it), its upstream kept; a 93k-parameter one (tiny) gets past the check."""
    import dataclasses

    from transformers import BertTokenizerFast

    from components import model_size
    from components.stage import StageFailure
    from pipelines import manifest as mf
    from pipelines import runner
    from pipelines.stages import pretrain
    from tests import conftest

    def tokenize(config, inputs: stages.Inputs, ctx: StageContext) -> StageResult:
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *conftest.WORDS]
        BertTokenizerFast(vocab={word: index for index, word in enumerate(words)}).save_pretrained(
            ctx.output_dir / "tokenizer"
        )
        return StageResult(str(ctx.output_dir))

    started = []

    def train(config, inputs: stages.Inputs, ctx: StageContext) -> StageResult:
        started.append(ctx.stage)
        raise RuntimeError("would start Ray Train here")

    with conftest.small_disk(tmp_path / "disk", "8M") as disk:
        uri = sqlite_store(tmp_path / "mlflow.db")
        raw = {**tiny_config_dict(disk / "storage"), "tracking": {"uri": uri}}
        raw["pretrain"] = {"model": {"preset": preset}}
        config = validate(raw)
        nodes = (
            stages.Node("tokenize", stages.Stage("tokenize", "1", (), lambda config: {}, tokenize), None, ()),
            stages.Node("pretrain", dataclasses.replace(pretrain.STAGE, run=train), None, ("tokenize",)),
        )
        client = MlflowClient(uri)
        manifest = mf.Manifest.create(config.storage_path(), "run-1", "unit", ("tokenize", "pretrain"), {})
        result = runner.PipelineResult("run-1", client.create_run("0").info.run_id, "0", uri)
        stage_runner = runner._StageRunner(config, nodes, client, result, config.storage_path(), manifest, set())
        (error,) = stage_runner.run_all(list(nodes), None)
        free = shutil.disk_usage(disk).free
    assert manifest.stages["tokenize"].status == mf.SUCCEEDED and manifest.stages["pretrain"].status == mf.FAILED
    if fits:
        assert started == ["pretrain"] and "would start Ray Train" in str(error)
        return
    assert started == [] and isinstance(error, StageFailure)
    parameters = model_size.parameters("bert", config.pretrain.model.resolved(), 5 + len(conftest.WORDS))
    assert parameters > 3_300_000  # the count is checked against built models in tests/unit/test_models.py
    needs = f"needs at least {parameters * 14 / 1e6:.1f} MB on the storage's disk, which has {free / 1e6:.1f} MB free"
    assert str(error).startswith(f"stage pretrain {needs} ({config.storage_path()}): 1 checkpoint of its 3.36M"), error
    assert str(error).endswith("Free space there, or train a smaller model (pretrain.model)")


def test_a_stage_the_cache_cannot_spare_says_what_changed_since_it_was_last_made(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Runs of one storage through the real runner: the second, with another `epochs` and layers,
    says what changed against the artifact of the run before; an unchanged third is a cache hit
    and says nothing of the kind; the first had nothing to compare with."""
    from pipelines import manifest as mf

    settings = {"epochs": 3, "model": {"layers": 2, "heads": 2}}

    def train(config, inputs: stages.Inputs, ctx: StageContext) -> StageResult:
        return StageResult(str(ctx.output_dir))

    attempt, _ = _runs_of_one_stage(tmp_path, stages.Stage("train", "1", (), lambda config: settings, train))
    first = attempt("run-1")
    assert "not cached" not in capsys.readouterr().out
    settings.update(epochs=4, model={"layers": 4, "heads": 2})
    assert attempt("run-2").status == mf.SUCCEEDED
    said = f"[ptft] train    not cached: since run run-1 (key {first.key}): epochs 3 -> 4; model.layers 2 -> 4\n"
    assert said in capsys.readouterr().out
    assert attempt("run-3").status == mf.CACHED
    assert "not cached" not in capsys.readouterr().out


def test_key_changes_name_fields_then_upstream_stages() -> None:
    from pipelines.runner import key_changes

    before = {"version": "1", "config": {"lr": 0.1, "a": 1, "b": 2}, "inputs": {"pretrain": "k1", "tokenize": "t1"}}
    after = {"version": "2", "config": {"lr": 0.2, "c": "x" * 50}, "inputs": {"pretrain": "k2", "tokenize": "t1"}}
    assert key_changes(before, after, most=3) == (
        'a 1 -> (none); b 2 -> (none); c (none) -> "' + "x" * 36 + "...; 2 more fields; new output of pretrain"
    )


def test_pretraining_from_a_hub_model_in_the_local_cache_counts_its_weights(tmp_path: Path) -> None:
    """`init_from` a Hub id: its snapshot in the local Hugging Face cache (the layout the Hub's
    client writes) is counted from its safetensors header, nothing downloaded; an id the cache
    lacks gets no room check."""
    from huggingface_hub import constants

    from components import model_size
    from pipelines.stages import pretrain

    repo = Path(constants.HF_HUB_CACHE) / "models--ptft-test--tiny-cached"  # the tests' own HOME
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    try:
        snapshot = tiny_classifier(repo / "snapshots" / ("0" * 40), seed=0)
        raw = tiny_config_dict(tmp_path / "storage")
        raw["pretrain"] = {"model": {"init_from": "ptft-test/tiny-cached"}}
        config = validate(raw)
        room = pretrain.STAGE.room(config, stages.Inputs())
        parameters = model_size.saved_parameters(snapshot) * 9 // 10
    finally:
        shutil.rmtree(repo)
    assert room is not None and room.bytes == model_size.least_written(parameters) > 0
    config.pretrain.model.init_from = "ptft-test/not-cached"  # the Hub has it (validation asked), not the cache
    assert pretrain.STAGE.room(config, stages.Inputs()) is None
