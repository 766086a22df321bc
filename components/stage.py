"""The stage contract: what a stage receives besides its own config, and what it returns.

A stage is `run(config, <input URIs>, ctx) -> StageResult`. It writes everything it produces
under `ctx.output_dir` and knows nothing of other stages, the manifest or the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class StageFailure(RuntimeError):
    """A stage's failure whose cause and fix ptft knows: the command says it in a line and leaves
    the traceback in the run's log."""


@dataclass(frozen=True)
class StageContext:
    """Where a stage writes and how it is tracked."""

    pipeline_run_id: str
    stage: str
    output_dir: Path
    storage: Path
    tracking_uri: str
    experiment_id: str
    mlflow_run_id: str
    seed: int = 0
    attempt: int = 1
    cache_key: str = ""  # the key the output is published under: tags what the stage makes elsewhere

    @property
    def resumed(self) -> bool:
        """An earlier attempt of this stage ran in the same pipeline run (`ptft resume`): its MLflow
        run may hold metrics already, and its Ray Train/Tune run may hold checkpoints."""
        return self.attempt > 1

    def ray_storage(self) -> str:
        """Ray Train/Tune `storage_path`: results and checkpoints of this pipeline's trainers."""
        return str((self.storage / "ray_results").resolve())

    def ray_run_name(self) -> str:
        """Ray Train/Tune run `name`: the pipeline run, the stage and its cache key. Stable on a
        resume of the same work; new when the work changed (data edited, ptft upgraded), so an
        old attempt's checkpoints are never restored into it."""
        key = f"-{self.cache_key[:12]}" if self.cache_key else ""
        return f"{self.pipeline_run_id}-{self.stage}{key}"

    def ray_run_folders(self) -> list[Path]:
        """This stage's Ray Train/Tune runs in this pipeline run, of every attempt and key: the run,
        a sweep's multi-worker trials (`-trials`), and a sweep moved aside (`.unstarted-<time>`)."""
        root = Path(self.ray_storage())
        stage = re.escape(f"{self.pipeline_run_id}-{self.stage}")
        mine = re.compile(rf"{stage}(-[0-9a-f]{{12}})?(-trials)?(\.[a-z]+-[0-9]+)?")
        return sorted(folder for folder in root.iterdir() if mine.fullmatch(folder.name)) if root.is_dir() else []


def remove_spent_checkpoints(ctx: StageContext) -> int:
    """Remove the Ray Train and Tune checkpoints of a stage whose artifact is published; returns the
    bytes freed. They only serve a restart of the stage, and nothing restarts a published stage
    (a damaged artifact is made again from scratch: Ray Train's checkpoint list goes too). With a
    real model each is the weights and the optimizer's state (three times the model in Adam), and
    a PBT sweep keeps every epoch of every trial. The runs' result logs stay."""
    freed = 0
    for folder in ctx.ray_run_folders():
        for spent in list(folder.rglob("checkpoint_*")):
            if spent.is_dir() and not spent.is_symlink():
                freed += folder_bytes(spent)
                shutil.rmtree(spent, ignore_errors=True)
            elif spent.name == "checkpoint_manager_snapshot.json":
                spent.unlink(missing_ok=True)
    return freed


def folder_bytes(folder: Path) -> int:
    """The size of the files under `folder` (links not followed; a file gone meanwhile counts 0)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


@dataclass
class StageResult:
    """A stage's output URI, its final metrics, and any small extra outputs (e.g. a model URI)."""

    output_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    cached: bool = False


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (`write_text_whole`). These are small files written at a stage's transitions."""
    write_text_whole(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def write_text_whole(path: Path, text: str) -> None:
    """Write a text file atomically: a reader never sees a half-written file, and a machine that
    loses power just after sees the old file or the new one, never an empty one (the data reaches
    the disk before the rename does). A write that fails (a full disk) leaves the old file and no
    other, and its error names `path`: a write to an open file names none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with errors_naming(path), open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)


@contextlib.contextmanager
def errors_naming(path: Path) -> Iterator[None]:
    """An OSError inside names `path` where it names no file: a write to an open file names none,
    and a full disk would then be reported as the working directory's."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error


def _fsync_folder(folder: Path) -> None:
    """The rename itself made durable; a file system that cannot sync a folder is left as it is."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 over the folder's weight files (safetensors, in name order): the model's identity.
    Here, with no torch import, so that the runner can check a cached model cheaply."""
    digest = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors")) or sorted(Path(model_dir).glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files in {model_dir}")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# Small files (configs, labels, a sweep's best config) are also compared by content; larger ones
# (data blocks, weights: a model's are checked by `weights_sha256`) by size, so that checking a
# cache hit costs a `stat` per file.
HASHED_UP_TO_BYTES = 64 * 1024


def inventory(path: Path) -> dict[str, dict]:
    """Every file of an artifact (a folder, or one file): its size, and a small file's SHA-256."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(file for file in path.rglob("*") if file.is_file())
    listed = {}
    for file in files:
        size = file.stat().st_size
        digest = hashlib.sha256(file.read_bytes()).hexdigest() if size <= HASHED_UP_TO_BYTES else None
        listed[file.name if file == path else file.relative_to(path).as_posix()] = {"size": size, "sha256": digest}
    return listed


def inventory_changes(path: Path, recorded: dict[str, dict]) -> list[str]:
    """How an artifact's files differ from the `inventory` taken when it was published: missing,
    another size, other content. Files added since are not its own and are left alone."""
    path, changes = Path(path), []
    for name, was in recorded.items():
        file = path if path.is_file() and name == path.name else path / name
        try:
            size = file.stat().st_size
        except OSError:
            changes.append(f"{name} is missing")
            continue
        if size != was["size"]:
            changes.append(f"{name} is {size} bytes, not {was['size']}")
        elif was.get("sha256") and hashlib.sha256(file.read_bytes()).hexdigest() != was["sha256"]:
            changes.append(f"{name} has other content")
    return changes
