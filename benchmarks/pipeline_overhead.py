"""What does the orchestration cost? Runs a pipeline config twice through the real CLI on fresh
storage: cold (every stage computes) and again unchanged (every stage is a cache hit). Prints both
wall times, their ratio, and the orchestration overhead of the cold run: its wall time minus the
stages' own work (the time inside each stage function, from the run's manifest), as a share.

    python benchmarks/pipeline_overhead.py [CONFIG] [overrides...]   # default configs/demo.yaml

The second run starts a local Ray again and, since the first run's local Ray is gone, redeploys
the cached model on Serve: both are in its wall time. Targets: cached <= 30 s, overhead <= 10%.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PTFT = str(Path(sys.executable).parent / "ptft")


def run_pipeline(config: str, overrides: list[str], storage: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    process = subprocess.run(
        [PTFT, "run", config, *overrides, f"storage={storage}"], cwd=REPO, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"ptft run failed ({process.returncode}):\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}")
    manifests = sorted((storage / "runs").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    return seconds, json.loads(manifests[-1].read_text())


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else "configs/demo.yaml"
    overrides = sys.argv[2:]
    with tempfile.TemporaryDirectory(prefix="ptft-overhead-") as folder:
        storage = Path(folder)
        cold_s, cold = run_pipeline(config, overrides, storage)
        cached_s, cached = run_pipeline(config, overrides, storage)
    work = {name: record["work_seconds"] or 0.0 for name, record in cold["stages"].items()}
    overhead = cold_s - sum(work.values())
    statuses = {name: record["status"] for name, record in cached["stages"].items()}
    print(f"config: {config} {' '.join(overrides)}")
    print("cold run, stage work (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in work.items()))
    print(f"cold run wall:   {cold_s:7.1f} s")
    print(f"cached run wall: {cached_s:7.1f} s   stages: {statuses}")
    print(f"cached / cold:   {cached_s / cold_s:7.3f}")
    print(f"orchestration overhead of the cold run: {overhead:.1f} s = {overhead / cold_s:.1%} of its wall time")
    print(
        f"targets: cached <= 30 s ({'met' if cached_s <= 30 else 'missed'}), "
        f"overhead <= 10% ({'met' if overhead / cold_s <= 0.10 else 'missed'})"
    )


if __name__ == "__main__":
    main()
