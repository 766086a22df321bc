"""`ptft gc` on a storage of real manifests and folders: what the newest runs use stays, the rest
is listed, and removed only with --yes; nothing while a run's driver lives."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import cli
from pipelines import manifest as mf
from pipelines.driver_lock import DriverLock


def _run(storage: Path, run_id: str, created_at: float, stages: dict[str, str], status: str = mf.SUCCEEDED):
    """A run whose stages (node -> cache key) each made or reused their artifact."""
    manifest = mf.Manifest.create(storage, run_id, "unit", tuple(stages), {})
    manifest.created_at = created_at
    for node, key in stages.items():
        manifest.stage_started(node, key, "0" * 32)
        artifact = storage / "artifacts" / node.split(".")[0] / key / "model"
        manifest.stage_ended(node, mf.SUCCEEDED, output_uri=str(artifact))
    manifest.finished(status)
    return manifest


def _folder(path: Path, size: int = 1000) -> Path:
    path.mkdir(parents=True)
    (path / "data.bin").write_bytes(b"\0" * size)
    return path


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    """Three runs: the oldest made tokenize t1 and pretrain p1; the next reused t1 and made p2; the
    newest reused both and made a task's fine-tuning f3. Plus a partial and a damaged folder, a dot
    folder gc does not know, the runs' Ray folders and one of no run's."""
    storage = tmp_path / "storage"
    _run(storage, "20260101-000000-aaaaaa", 1.0, {"tokenize": "t1", "pretrain": "p1"}, mf.FAILED)
    _run(storage, "20260102-000000-bbbbbb", 2.0, {"tokenize": "t1", "pretrain": "p2"})
    _run(storage, "20260103-000000-cccccc", 3.0, {"tokenize": "t1", "pretrain": "p2", "finetune.topic": "f3"})
    artifacts = storage / "artifacts"
    for stage, key in (("tokenize", "t1"), ("pretrain", "p1"), ("pretrain", "p2"), ("finetune", "f3")):
        _folder(artifacts / stage / key / "model")
    _folder(artifacts / "pretrain" / ".p1.partial-20260101-000000-aaaaaa")
    _folder(artifacts / "finetune" / ".f0.damaged-20260102-abcdef")
    _folder(artifacts / "finetune" / ".not-ptfts")
    results = storage / "ray_results"
    _folder(results / "20260101-000000-aaaaaa-pretrain-p1" / "checkpoint_000001", 5000)
    _folder(results / "20260102-000000-bbbbbb-pretrain-p2")
    _folder(results / "someone-elses")
    return storage


def _left(storage: Path) -> set[str]:
    return {
        str(path.relative_to(storage))
        for parent in ("artifacts/*", "ray_results")
        for path in storage.glob(f"{parent}/*")
        if path.is_dir()
    }


def test_gc_lists_what_no_kept_run_uses_and_removes_it_only_when_told(
    storage: Path, capsys: pytest.CaptureFixture
) -> None:
    before = _left(storage)
    assert cli.main(["gc", "--storage", str(storage), "--keep", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Keeping the newest 2 of 3 runs (20260103-000000-cccccc, 20260102-000000-bbbbbb)")
    removed = {
        "artifacts/pretrain/p1",
        "artifacts/pretrain/.p1.partial-20260101-000000-aaaaaa",
        "artifacts/finetune/.f0.damaged-20260102-abcdef",
        "ray_results/20260101-000000-aaaaaa-pretrain-p1",
    }
    for path in removed:
        assert f"  {path}  (" in out, path
    assert "Would free 8.0 kB in 4 folders: run again with --yes" in out
    assert _left(storage) == before  # a dry run

    assert cli.main(["gc", "--storage", str(storage), "--keep", "2", "--yes"]) == 0
    assert "Freed 8.0 kB in 4 folders." in capsys.readouterr().out
    assert _left(storage) == before - removed
    assert (storage / "runs" / "20260101-000000-aaaaaa" / "manifest.json").is_file()  # the history stays

    assert cli.main(["gc", "--storage", str(storage), "--keep", "1", "--yes"]) == 0  # p2 is still the newest's
    assert _left(storage) == before - removed - {"ray_results/20260102-000000-bbbbbb-pretrain-p2"}


def test_status_says_which_artifacts_of_a_run_gc_removed(storage: Path, capsys: pytest.CaptureFixture) -> None:
    """A dropped run's stages still say `succeeded`; status adds that the artifact is gone, and a
    storage moved since is looked at where it is now."""
    import json

    assert cli.main(["gc", "--storage", str(storage), "--keep", "2", "--yes"]) == 0
    moved = storage.rename(storage.parent / "moved")
    capsys.readouterr()
    assert cli.main(["status", "20260101-000000-aaaaaa", "--storage", str(moved), "--json"]) == 0
    stages = {stage["name"]: stage for stage in json.loads(capsys.readouterr().out)["stages"]}
    assert stages["pretrain"]["artifact_removed"] and not stages["tokenize"]["artifact_removed"]
    assert cli.main(["status", "20260101-000000-aaaaaa", "--storage", str(moved)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("pretrain" in line and "its artifact was removed (ptft gc)" in line for line in lines), lines
    assert not any("tokenize" in line and "removed" in line for line in lines), lines


def test_gc_removes_nothing_while_a_run_is_driven(storage: Path, capsys: pytest.CaptureFixture) -> None:
    live = mf.Manifest.create(storage, "20260104-000000-dddddd", "unit", ("tokenize",), {})
    lock = DriverLock.acquire(mf.Manifest.folder(storage, live.run_id), live.run_id)
    before = _left(storage)
    try:
        assert cli.main(["gc", "--storage", str(storage), "--keep", "1", "--yes"]) == 1
    finally:
        lock.release()
    assert "run 20260104-000000-dddddd is running and may read any artifact; nothing removed" in capsys.readouterr().err
    assert _left(storage) == before
    # Its driver gone (recorded running, no lock), the run no longer holds the storage.
    assert cli.main(["gc", "--storage", str(storage), "--keep", "1", "--yes"]) == 0


def test_gc_of_a_folder_that_is_no_storage_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["gc", "--storage", str(tmp_path)]) == 2
    assert "no pipeline storage at" in capsys.readouterr().err


def test_gc_removes_nothing_when_a_runs_manifest_does_not_read(storage: Path, capsys: pytest.CaptureFixture) -> None:
    """What that run uses is not known: it could be any artifact (a manifest of another ptft)."""
    (storage / "runs" / "20260101-000000-aaaaaa" / "manifest.json").write_text("{}")
    before = _left(storage)
    assert cli.main(["gc", "--storage", str(storage), "--keep", "1", "--yes"]) == 1
    assert "gc cannot tell what that run uses, so nothing was removed" in capsys.readouterr().err
    assert _left(storage) == before


def test_gc_stops_when_a_run_starts_while_it_removes(storage: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A run that started after gc looked may read what gc would remove next: gc stops there."""
    from pipelines import storage_gc

    removals = storage_gc.plan(storage, keep=1).removals
    rmtree, locks = storage_gc.shutil.rmtree, []

    def removing(path) -> None:  # a run's driver starts once the first folder went
        rmtree(path)
        if not locks:
            live = mf.Manifest.create(storage, "20260105-000000-eeeeee", "unit", ("tokenize",), {})
            locks.append(DriverLock.acquire(mf.Manifest.folder(storage, live.run_id), live.run_id))

    monkeypatch.setattr(storage_gc.shutil, "rmtree", removing)
    try:
        assert cli.main(["gc", "--storage", str(storage), "--keep", "1", "--yes"]) == 1
    finally:
        locks[0].release()
    said = f"run 20260105-000000-eeeeee started meanwhile and may read the rest; stopped with 1 of {len(removals)}"
    assert said in capsys.readouterr().err
    assert len(removals) > 2 and sum(removal.path.exists() for removal in removals) == len(removals) - 1
