"""`ptft gc`: the files of a storage that no run kept will read again, listed, then removed.

A storage keeps every artifact a run made: they are the cache, and a changed config makes new ones
while the old ones stay (with a real model, gigabytes each). It also keeps each run's Ray folder:
logs, and a failed run's checkpoints for `ptft resume`. `ptft gc` keeps the newest runs whole,
every artifact their manifests name (made or reused) and their Ray folders, and lists the rest:
artifacts no kept run names, the Ray folders of the other runs, and what stages left on the way (a
partial folder, a damaged artifact set aside). It removes them only with `--yes`. The runs' records
(`runs/`) and the MLflow store stay: the history is kept, and a later run makes again what it needs.
A live run reads the cache as it goes, so nothing is removed while one's driver lives.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from components.stage import folder_bytes
from pipelines import arguments
from pipelines import manifest as mf
from pipelines.driver_lock import LOCK_NAME, driver_gone
from pipelines.stages import split_node

EXIT_USER_ERROR = 2
DEBRIS = {".partial-": "a stage's partial folder", ".damaged-": "a damaged artifact set aside"}


@dataclass(frozen=True)
class Removal:
    path: Path
    why: str
    size: int


@dataclass(frozen=True)
class Plan:
    kept: list[mf.Manifest]
    dropped: list[mf.Manifest]
    removals: list[Removal]

    @property
    def size(self) -> int:
        return sum(removal.size for removal in self.removals)


class RunLive(RuntimeError):
    """A run's driver lives: it may read any artifact of the cache, so nothing (more) is removed."""

    def __init__(self, runs: list[str], removed: list[Removal] | None = None):
        super().__init__(", ".join(runs))
        self.removed = removed or []


def plan(storage: Path, keep: int) -> Plan:
    """What `ptft gc` removes from `storage` keeping the newest `keep` runs."""
    # Unlike `list_runs`, an unreadable manifest raises: what its run uses is not known, so nothing goes.
    runs = [mf.Manifest.load(storage, path.parent.name) for path in (storage / "runs").glob("*/manifest.json")]
    runs.sort(key=lambda run: run.created_at, reverse=True)  # newest first
    if live := live_runs(storage):
        raise RunLive(live)
    kept, dropped = runs[:keep], runs[keep:]
    used = {(split_node(node)[0], record.key) for run in kept for node, record in run.stages.items() if record.key}
    removals = _artifacts(storage / "artifacts", used) + _ray_folders(storage / "ray_results", dropped)
    return Plan(kept, dropped, removals)


def live_runs(storage: Path) -> list[str]:
    """The runs of `storage` whose driver lives: a driver holds its run's lock until the run has
    ended, so the locks alone tell (no manifest is read)."""
    locks = sorted((storage / "runs").glob(f"*/{LOCK_NAME}"))
    return [lock.parent.name for lock in locks if not driver_gone(lock.parent)]


def remove(storage: Path, removals: list[Removal]) -> tuple[list[Removal], list[tuple[Removal, OSError]]]:
    """Remove each folder, and stop if a run starts meanwhile (it may read what comes next);
    returns those removed, and those that could not be with why."""
    removed, failed = [], []
    for removal in removals:
        if live := live_runs(storage):
            raise RunLive(live, removed)
        try:
            shutil.rmtree(removal.path)
            removed.append(removal)
        except OSError as error:
            failed.append((removal, error))
    return removed, failed


def _artifacts(artifacts: Path, used: set[tuple[str, str]]) -> list[Removal]:
    removals = []
    for stage in _folders(artifacts):
        for folder in _folders(stage):
            if folder.name.startswith("."):
                why = next((said for marker, said in DEBRIS.items() if marker in folder.name), None)
            else:
                why = None if (stage.name, folder.name) in used else "no kept run uses it"
            if why:
                removals.append(Removal(folder, why, folder_bytes(folder)))
    return removals


def _ray_folders(results: Path, dropped: list[mf.Manifest]) -> list[Removal]:
    """A run's Ray Train and Tune folders are named `<run id>-<stage>...` (`StageContext.ray_run_name`)."""
    removals = []
    for folder in _folders(results):
        owner = next((run.run_id for run in dropped if folder.name.startswith(f"{run.run_id}-")), None)
        if owner:
            removals.append(Removal(folder, f"Ray folder of run {owner}, not kept", folder_bytes(folder)))
    return removals


def _folders(parent: Path) -> list[Path]:
    if not parent.is_dir():
        return []
    return sorted(path for path in parent.iterdir() if path.is_dir() and not path.is_symlink())


# --------------------------------------------------------------------------- the command


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `gc` on the `ptft` parser."""
    gc = commands.add_parser(
        "gc",
        help="list, then with --yes remove, what no kept run reads: old artifacts, old runs' checkpoints",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    gc.add_argument("--storage", default="./ptft-runs", help="the storage to clean (default ./ptft-runs)")
    gc.add_argument("--keep", type=arguments.positive_int, default=5, help="the newest runs kept whole (default 5)")
    gc.add_argument("--yes", action="store_true", help="remove what is listed (without it: only list)")
    gc.set_defaults(handler=_gc)


def _gc(args: argparse.Namespace) -> int:
    from rich.filesize import decimal

    storage = Path(args.storage)
    if not (storage / "runs").is_dir() and not (storage / "artifacts").is_dir():
        print(
            f"ptft gc: no pipeline storage at {storage} (no runs/ or artifacts/ there); pass --storage", file=sys.stderr
        )
        return EXIT_USER_ERROR
    try:
        found = plan(storage, args.keep)
    except mf.UnreadableManifest as error:
        print(f"ptft gc: {error}; gc cannot tell what that run uses, so nothing was removed", file=sys.stderr)
        return 1
    except RunLive as live:
        print(
            f"ptft gc: run {live} is running and may read any artifact; nothing removed. Run gc once it ends",
            file=sys.stderr,
        )
        return 1
    kept = ", ".join(run.run_id for run in found.kept) or "none"
    runs = len(found.kept) + len(found.dropped)
    print(f"Keeping the newest {len(found.kept)} of {runs} runs ({kept}) and what they use.")
    for removal in found.removals:
        print(f"  {decimal(removal.size):>9}  {removal.path.relative_to(storage)}  ({removal.why})")
    if not found.removals:
        print("Nothing to remove.")
        return 0
    if not args.yes:
        print(
            f"Would free {decimal(found.size)} in {len(found.removals)} folders: run again with --yes to remove them."
        )
        return 0
    try:
        removed, failed = remove(storage, found.removals)
    except RunLive as live:
        freed = decimal(sum(removal.size for removal in live.removed))
        done = f"{len(live.removed)} of {len(found.removals)} folders removed ({freed})"
        print(f"ptft gc: run {live} started meanwhile and may read the rest; stopped with {done}", file=sys.stderr)
        return 1
    for removal, error in failed:
        print(f"ptft gc: could not remove {removal.path}: {error}", file=sys.stderr)
    print(f"Freed {decimal(sum(removal.size for removal in removed))} in {len(removed)} folders.")
    return 1 if failed else 0
