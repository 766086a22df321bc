"""Cache keys, atomic publishing, the manifest and the data position of a restored loop: the
pieces of resume and caching that need no cluster."""

from __future__ import annotations

import copy as copy_module
import dataclasses
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from components import training
from components.pretrain import _batches
from components.stage import StageResult, read_json
from pipelines import cli, runner, stages
from pipelines import manifest as mf

PRETRAIN = {
    "max_steps": 100,
    "learning_rate": 1e-3,
    "log_every": 10,
    "checkpoint_every": 50,
    "workers": {"num_workers": 2, "max_failures": 3, "placement_strategy": "PACK"},
}


def _key(config: dict, inputs: dict | None = None, stage: stages.Stage = stages.BY_NAME["pretrain"]) -> str:
    return runner.stage_key(runner.key_material(stage, config, inputs or {"tokenize": "abc"}, {"seed": 0}))


def test_key_ignores_settings_that_do_not_change_the_output() -> None:
    base = _key(PRETRAIN)
    for path, value in [
        ("log_every", 1),
        ("checkpoint_every", 7),
        ("workers.max_failures", 0),
        ("workers.placement_strategy", "SPREAD"),
    ]:
        changed = _set(PRETRAIN, path, value)
        assert _key(changed) == base, path


def test_a_sweep_key_ignores_how_its_trials_are_run_but_not_what_they_train() -> None:
    sweep = {"tune": {"reuse_actors": True, "progress_every_s": 10, "max_epochs": 3}}
    base = _key(sweep, {"prepare": "p"}, stages.BY_NAME["tune"])
    for path, value in [("tune.reuse_actors", False), ("tune.progress_every_s", 1)]:
        assert _key(_set(sweep, path, value), {"prepare": "p"}, stages.BY_NAME["tune"]) == base, path
    assert _key(_set(sweep, "tune.max_epochs", 4), {"prepare": "p"}, stages.BY_NAME["tune"]) != base


def test_key_changes_with_config_inputs_extras_and_code_version() -> None:
    base = _key(PRETRAIN)
    assert _key(_set(PRETRAIN, "learning_rate", 2e-3)) != base
    assert _key(_set(PRETRAIN, "workers.num_workers", 4)) != base  # another global batch size
    assert _key(PRETRAIN, {"tokenize": "abd"}) != base
    seeded = runner.key_material(stages.BY_NAME["pretrain"], PRETRAIN, {"tokenize": "abc"}, {"seed": 1})
    assert runner.stage_key(seeded) != base
    newer = dataclasses.replace(stages.BY_NAME["pretrain"], version="999")
    assert _key(PRETRAIN, stage=newer) != base


def _set(config: dict, dotted: str, value) -> dict:
    copy = copy_module.deepcopy(config)
    node = copy
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return copy


def test_publish_renames_a_complete_folder_into_place(tmp_path: Path) -> None:
    partial, final = tmp_path / ".k.partial-run1", tmp_path / "k"
    (partial / "model").mkdir(parents=True)
    (partial / "model" / "weights").write_text("w")
    tune = stages.BY_NAME["tune"]
    outputs = tune.outputs(best_config={"learning_rate": 0.01}, best_trial="t1")
    result = runner._publish(
        tune, partial, final, StageResult(str(partial / "model"), {"loss": 1.5}, outputs), {"mlflow_run_id": "r1"}
    )
    assert not partial.exists()
    assert (final / "_SUCCESS").is_file() and (final / "model" / "weights").read_text() == "w"
    assert result.output_uri == str(final / "model")
    assert read_json(final / "_SUCCESS")["mlflow_run_id"] == "r1"
    reloaded = runner._load_result(tune, final)
    assert (reloaded.output_uri, reloaded.metrics, reloaded.outputs) == (str(final / "model"), {"loss": 1.5}, outputs)


def test_publish_replaces_an_older_artifact_and_keeps_urls(tmp_path: Path) -> None:
    final = tmp_path / "k"
    final.mkdir()
    (final / "stale").write_text("old")
    partial = tmp_path / ".k.partial-run2"
    partial.mkdir()
    result = runner._publish(
        stages.BY_NAME["tokenize"], partial, final, StageResult("http://127.0.0.1:8000"), {"mlflow_run_id": "r2"}
    )
    assert not (final / "stale").exists() and (final / "_SUCCESS").is_file()
    assert result.output_uri == "http://127.0.0.1:8000"
    assert [p.name for p in tmp_path.iterdir()] == ["k"]  # no partial or old folder left behind


def test_manifest_round_trip_and_listing(tmp_path: Path) -> None:
    manifest = mf.Manifest.create(tmp_path, "20260101-000000-aaaaaa", "demo", ("tokenize", "pretrain"), {"name": "x"})
    manifest.stage_started("tokenize", "key1", "mlflow1")
    manifest.stage_ended("tokenize", mf.SUCCEEDED, output_uri="/out")
    manifest.stage_started("pretrain", "key2", "mlflow2")
    manifest.stage_ended("pretrain", mf.KILLED, error="KeyboardInterrupt: signal 15")
    manifest.finished(mf.KILLED)
    loaded = mf.Manifest.load(tmp_path, manifest.run_id)
    assert loaded.status == mf.KILLED and loaded.config() == {"name": "x"}
    assert loaded.stages["tokenize"].status == mf.SUCCEEDED and loaded.stages["tokenize"].attempts == 1
    assert loaded.stages["pretrain"].error.startswith("KeyboardInterrupt")
    assert [run.run_id for run in mf.list_runs(tmp_path)] == [manifest.run_id]
    with pytest.raises(FileNotFoundError, match="recent runs: 20260101-000000-aaaaaa"):
        mf.Manifest.load(tmp_path, "nope")


def test_restored_loop_sees_the_batches_an_uninterrupted_one_would() -> None:
    data = torch.arange(50).unsqueeze(1)
    shard = training.Shard(rank=1, world_size=2, batch_size=4)  # 6 batches per epoch: crosses epochs
    whole = [rows.tolist() for rows in _batches(data, shard, 20, seed=3)]
    for start in (0, 5, 6, 13, 19, 20):
        assert [rows.tolist() for rows in _batches(data, shard, 20, seed=3, start=start)] == whole[start:]


def test_rng_states_come_back(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    random.gauss(0, 1)  # leaves a cached second value in the state
    training.save_rng(tmp_path, 0, {"g": generator})
    expected = (torch.rand(3), torch.rand(3, generator=generator), np.random.rand(3).tolist(), random.gauss(0, 1))
    torch.manual_seed(99)
    generator.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    training.restore_rng(tmp_path, 0, {"g": generator})
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, generator=generator), expected[1])
    assert np.random.rand(3).tolist() == expected[2] and random.gauss(0, 1) == expected[3]


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["PTFT_TEST_MARKER"]),))


def test_a_checkpoint_file_that_would_run_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "ran"
    monkeypatch.setenv("PTFT_TEST_MARKER", str(marker))
    torch.save({"torch": torch.get_rng_state(), "payload": _RunsCode()}, tmp_path / "rng_rank0.pt")
    with pytest.raises(pickle.UnpicklingError):
        training.restore_rng(tmp_path, 0, {})
    assert not marker.exists()


def test_cli_stage_names_match_the_runner() -> None:
    assert cli.STAGE_NAMES == runner.STAGES


def test_runs_lists_manifests_and_resume_names_unknown_runs(tmp_path: Path) -> None:
    manifest = mf.Manifest.create(tmp_path, "20260101-000000-bbbbbb", "demo", runner.STAGES, {"name": "demo"})
    manifest.stage_started("tokenize", "k", "m")
    manifest.stage_ended("tokenize", mf.SUCCEEDED)
    ptft = [sys.executable, "-m", "pipelines.cli"]
    listed = subprocess.run([*ptft, "runs", "--storage", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "20260101-000000-bbbbbb" in listed.stdout
    assert "tokenize:succeeded" in listed.stdout and "pretrain:pending" in listed.stdout
    missing = subprocess.run(
        [*ptft, "resume", "nope", "--storage", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "no pipeline run 'nope'" in missing.stderr


@pytest.mark.parametrize("damage", ["{x", "[]", None])
def test_resume_names_a_run_config_that_does_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, damage: str | None
) -> None:
    """Edited, truncated or deleted: exit 2 naming the file, not a JSONDecodeError's traceback."""
    monkeypatch.chdir(tmp_path)  # the resume changes to the run's working dir
    run_id = "20260101-000000-cccccc"
    mf.Manifest.create(tmp_path, run_id, "demo", runner.STAGES, {"name": "demo"}).save()
    config = mf.Manifest.folder(tmp_path, run_id) / "config.json"
    if damage is None:
        config.unlink()
    else:
        config.write_text(damage)
    assert cli.main(["resume", run_id, "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"config.json = '{config}': the config run {run_id} ran with cannot be read" in err, err
    assert "Fix: restore the file, or run the pipeline again" in err and "Traceback" not in err


def test_resuming_a_finished_run_says_so_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished run has nothing to resume: no Ray started to deploy its model again and shut it
    down (~20 s), the manifest untouched. `--keep-serving` still resumes it to serve."""
    monkeypatch.setattr(cli, "_execute", lambda *_, **__: pytest.fail("the run was resumed"))
    run_id = "20260101-000000-eeeeee"
    manifest = mf.Manifest.create(tmp_path, run_id, "demo", runner.STAGES, {"name": "demo"})
    manifest.finished(mf.SUCCEEDED)
    before = (mf.Manifest.folder(tmp_path, run_id) / "manifest.json").read_text()
    assert cli.main(["resume", run_id, "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"Pipeline run {run_id} finished; nothing to resume" in out, out
    assert f"ptft resume {run_id} --storage {tmp_path} --keep-serving" in out
    assert (mf.Manifest.folder(tmp_path, run_id) / "manifest.json").read_text() == before


def test_a_run_whose_storage_moved_is_read_where_it_is_and_not_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Moved (or copied) elsewhere: `ptft status` and `report` read the run where it is, its SQLite
    store included, and write nothing at the old place (MLflow made an empty store there, and the
    report said every stage's run was not found); a resume is refused, naming both places."""
    monkeypatch.chdir(tmp_path)
    run_id, recorded, moved = "20260101-000000-dddddd", tmp_path / "store", tmp_path / "moved"
    manifest = mf.Manifest.create(recorded, run_id, "demo", runner.STAGES, {"name": "demo"})
    manifest.tracking_uri = f"sqlite:///{recorded / 'mlflow.db'}"
    manifest.stage_started("tokenize", "k", "m")  # running: status asks MLflow for its progress
    recorded.rename(moved)

    found = mf.Manifest.load(moved, run_id)
    assert found.storage == str(moved) and found.moved_from == str(recorded)
    assert found.tracking_uri == f"sqlite:///{moved / 'mlflow.db'}"
    assert found.config() == {"name": "demo"}
    assert found.tracking_store_missing() == str(moved / "mlflow.db")  # never made: nothing logged
    assert cli.main(["status", run_id, "--storage", str(moved)]) == 0
    assert f"no MLflow store at {moved / 'mlflow.db'}" in capsys.readouterr().err
    assert cli.main(["report", run_id, "--storage", str(moved)]) == 0
    assert f"no MLflow store at {moved / 'mlflow.db'}: metrics, pictures" in capsys.readouterr().err
    assert cli.main(["resume", run_id, "--storage", str(moved)]) == 2
    err = capsys.readouterr().err
    assert f"run {run_id} was recorded under {recorded}, and a run does not resume from another place" in err
    assert f"move (or link) the folder back to {recorded}" in err
    assert not recorded.exists()  # nothing made at the old place
    found.save()
    assert "moved_from" not in read_json(moved / "runs" / run_id / "manifest.json")


def test_publish_keeps_the_artifact_another_run_with_the_same_key_published_first(tmp_path: Path) -> None:
    """Two runs that share a key finish side by side: the second neither deletes nor replaces the
    first's artifact (its downstream stages, or a Serve replica, may be reading it) and uses it."""
    tune = stages.BY_NAME["tune"]
    first, second, final = tmp_path / ".k.partial-run1", tmp_path / ".k.partial-run2", tmp_path / "k"
    for partial, trial in ((first, "t1"), (second, "t2")):
        partial.mkdir()
        (partial / "weights").write_text(trial)
    outputs = {run: tune.outputs(best_config={"learning_rate": 0.01}, best_trial=run) for run in ("t1", "t2")}
    runner._publish(tune, first, final, StageResult(str(first), {}, outputs["t1"]), {"mlflow_run_id": "r1"})
    result = runner._publish(tune, second, final, StageResult(str(second), {}, outputs["t2"]), {"mlflow_run_id": "r2"})
    assert (final / "weights").read_text() == "t1"
    assert result.outputs.best_trial == "t1" and result.output_uri == str(final)
    assert read_json(final / "_SUCCESS")["mlflow_run_id"] == "r1"
    assert [p.name for p in tmp_path.iterdir()] == ["k"]  # the second run's partial is gone
    # A forced re-run replaces it.
    second.mkdir()
    (second / "weights").write_text("t2")
    forced = StageResult(str(second), {}, outputs["t2"])
    result = runner._publish(tune, second, final, forced, {"mlflow_run_id": "r2"}, replace=True)
    assert (final / "weights").read_text() == "t2" and result.outputs.best_trial == "t2"
