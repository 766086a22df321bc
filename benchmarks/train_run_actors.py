"""What a Ray Train run costs before its loop does anything: the same one-worker run, whose loop
only reports once, through Ray's own TorchTrainer and through ptft's
(`components.training.TorchTrainerWithoutDatasets`, which leaves out the DatasetManager and the
preemption watcher), alternated on one local Ray. Per run: wall time of `fit()`, the CPU the whole
machine used meanwhile (from /proc/stat, so the actors' processes count), and the actors it started.

    python benchmarks/train_run_actors.py [--rounds 6] [--json benchmarks/results/train_run_actors.json]

On a quiet machine: the CPU is every process's, Ray's own daemons included.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.state import list_actors

from components.training import TorchTrainerWithoutDatasets

WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
ARMS = {"ray": TorchTrainer, "ptft": TorchTrainerWithoutDatasets}


def loop(_: dict) -> None:
    ray.train.report({"done": 1})


def busy_cpu_seconds() -> float:
    """CPU seconds every core spent on anything but idle and I/O wait, since boot."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def actor_ids() -> dict[str, str]:
    return {actor.actor_id: actor.class_name for actor in list_actors(limit=10000)}


def one_run(arm: str, storage: str, name: str) -> dict:
    # Ray's default for its arm; ptft's trainer sets its own default when the variable is unset.
    if arm == "ray":
        os.environ[WATCHER] = "1"
    else:
        os.environ.pop(WATCHER, None)
    before = actor_ids()
    time.sleep(3)  # the previous run's actors wind down
    cpu, started = busy_cpu_seconds(), time.perf_counter()
    ARMS[arm](
        loop, scaling_config=ScalingConfig(num_workers=1), run_config=RunConfig(storage_path=storage, name=name)
    ).fit()
    wall = time.perf_counter() - started
    time.sleep(2)  # what the run started finishes exiting inside the measurement
    cpu = busy_cpu_seconds() - cpu
    started_actors = sorted(cls for actor, cls in actor_ids().items() if actor not in before)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "actors": started_actors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/train_run_actors.json"))
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=True)  # the state API, to list the actors
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="ptft-train-actors-") as storage:
        for round_ in range(args.rounds):
            for arm in list(ARMS) if round_ % 2 == 0 else list(ARMS)[::-1]:
                runs[arm].append(one_run(arm, storage, f"{arm}-{round_}"))
                print(arm, runs[arm][-1], flush=True)
    summary = {
        arm: {
            "wall_s_median": statistics.median(run["wall_s"] for run in results),
            "cpu_s_median": statistics.median(run["cpu_s"] for run in results),
            "actors_started_in_all_runs": dict(collections.Counter(a for run in results for a in run["actors"])),
        }
        for arm, results in runs.items()
    }
    for arm, numbers in summary.items():
        print(
            f"{arm:5s} wall {numbers['wall_s_median']:5.2f} s  CPU {numbers['cpu_s_median']:5.2f} core-s  "
            f"actors over {args.rounds} runs: {numbers['actors_started_in_all_runs']}"
        )
    ratio = summary["ptft"]["cpu_s_median"] / summary["ray"]["cpu_s_median"]
    print(f"ptft / ray, CPU per run (medians): {ratio:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"rounds": args.rounds, "runs": runs, "summary": summary, "cpu_ratio": ratio}, indent=2)
    )
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
