"""Does ASHA find the grid's best config for a fraction of its compute?

The same 27 configs (3 learning rates x 3 weight decays x 3 dropouts, enumerated by
`tune.search: grid`), the same seed and data, swept through `ptft sweep` once per arm:

  grid   every config fine-tuned for the whole epoch budget (`tune.scheduler: fifo`);
  asha   ASHA stops weak configs at its rungs (grace 1 epoch, reduction factor --reduction);
  sha    with `--arms asha,sha` (or `sha`): synchronous successive halving, every config waits at
         each rung until all are there, then the best 1/--reduction (rounded up) go on.

Every arm ranks trials by --metric (default the validation loss: ASHA needs a metric without
ties, and the accuracy on a small validation split ties often), equal values by --tie-break if
given (`tune.tie_break`), and pick the best trial as the tune stage does. Reports each arm's
pick (its validation accuracy and loss, its config), the best validation accuracy any of its
trials reached, its compute in trial-epochs (sum over trials of the epochs each ran) and its wall
time; then each early-stopping arm's accuracy gap to the grid's pick and its compute as a share
of the grid's. Target: gap <= 1 accuracy point at <= 25% of the compute. The tokenize and pretrain
stages run once (the first sweep) and are cache hits for the others.

    python benchmarks/asha_vs_grid.py [--config configs/demo.yaml] [--epochs 9] [--metric eval/accuracy]
        [--tie-break eval/loss] [--arms asha,sha] [--json out.json] [OVERRIDES]

The default is the demo data. Another config runs the same comparison on its data: on rt-polarity
(--config configs/rt_polarity.yaml pretrain.model.preset=tiny) the three arms took 39 minutes here.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PTFT = str(Path(sys.executable).parent / "ptft")

LEARNING_RATES = [3e-4, 1e-3, 3e-3]
WEIGHT_DECAYS = [0.0, 0.01, 0.1]
DROPOUTS = [0.0, 0.1, 0.3]
CONFIGS = len(LEARNING_RATES) * len(WEIGHT_DECAYS) * len(DROPOUTS)


def grid_space() -> str:
    return (
        "tune.search_space={"
        f"learning_rate: {{type: grid, values: {LEARNING_RATES}}}, "
        f"weight_decay: {{type: grid, values: {WEIGHT_DECAYS}}}, "
        f"dropout: {{type: grid, values: {DROPOUTS}}}}}"
    )


def sweep(config: str, storage: Path, overrides: list[str]) -> dict:
    """One `ptft sweep`; returns its wall time and the tune stage's trial table."""
    started = time.perf_counter()
    process = subprocess.run(
        [PTFT, "sweep", config, f"storage={storage}", *overrides], cwd=REPO, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"ptft sweep failed ({process.returncode}):\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}")
    manifest = json.loads(max((storage / "runs").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime).read_text())
    tune = manifest["stages"]["tune"]
    trials = json.loads((Path(tune["output_uri"]) / "trials.json").read_text())
    return {"wall_s": seconds, "tune_work_s": tune["work_seconds"], "trials": trials}


def summarise(name: str, arm: dict, metric: str) -> dict:
    trials = [row for row in arm["trials"] if row["metric"] is not None]
    # The stage's pick: by each trial's rank (the metric with the tie-break) where it has one.
    pick = (max if metric.endswith("accuracy") else min)(trials, key=lambda row: row.get("rank", row["metric"]))
    return {
        "arm": name,
        "trials": len(arm["trials"]),
        "errors": sum(row["status"] == "error" for row in arm["trials"]),
        "trial_epochs": sum(row["epochs"] for row in arm["trials"]),
        "best_accuracy": pick["metrics"]["eval/accuracy"],
        "best_loss": pick["metrics"]["eval/loss"],
        "max_accuracy": max(row["metrics"]["eval/accuracy"] for row in trials),
        "best_config": pick["config"],
        "tune_work_s": arm["tune_work_s"],
        "wall_s": arm["wall_s"],
        "epochs_histogram": {
            str(e): sum(row["epochs"] == e for row in trials) for e in sorted({row["epochs"] for row in trials})
        },
    }


def epochs_of(trial: dict) -> list[dict]:
    """A trial's result for each epoch it ran, oldest first (Tune's result.json in its folder)."""
    lines = (Path(trial["path"]) / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines]


def replay_synchronous(grid: dict, grace: int, reduction: int, budget: int, metric: str, tie_break: str | None) -> dict:
    """Synchronous successive halving replayed on the grid arm's per-epoch results: every config
    reaches a rung, then the best 1/reduction of them, rounded up as the `sha` scheduler rounds
    (by the metric, ties by the tie-break), continue. The trials are deterministic (same seed and
    data: both arms log the same metrics for a config's epochs), so this is what synchronous rungs
    would have run and picked, and what the `sha` arm should run and pick."""
    sign = 1 if metric.endswith("accuracy") else -1
    tie_sign = 1 if (tie_break or "").endswith("accuracy") else -1
    history = {row["trial"]: epochs_of(row) for row in grid["trials"]}

    def rank(trial: str, epoch: int) -> tuple:
        result = history[trial][epoch - 1]
        return sign * result[metric], tie_sign * result[tie_break] if tie_break else 0

    alive, ran, rung = list(history), {}, grace
    while True:
        ran.update({trial: min(rung, budget) for trial in alive})
        if rung >= budget:
            break
        alive = sorted(alive, key=lambda trial: rank(trial, rung), reverse=True)[: math.ceil(len(alive) / reduction)]
        rung = min(rung * reduction, budget)
    pick = max(history, key=lambda trial: max(rank(trial, epoch) for epoch in range(1, ran[trial] + 1)))
    best_epoch = max(range(1, ran[pick] + 1), key=lambda epoch: rank(pick, epoch))
    return {
        "grace": grace,
        "trial_epochs": sum(ran.values()),
        "best_accuracy": history[pick][best_epoch - 1]["eval/accuracy"],
    }


def _seconds(work: float | None) -> str:
    return "cached" if work is None else f"{work:.1f}"  # a cache hit from an earlier run on --storage


def _ratio(work: float | None, baseline: float | None) -> str:
    return "n/a (cached)" if work is None or baseline is None else f"{work / baseline:.3f}"


def _arms(value: str) -> list[str]:
    """A comma-separated list, so that the config overrides after it stay positional."""
    arms = value.split(",")
    if not set(arms) <= {"asha", "sha"}:  # "" splits to [""], refused here too
        raise argparse.ArgumentTypeError(f"{value!r}: give asha, sha or asha,sha")
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--epochs", type=int, default=9, help="the full epoch budget (max_epochs)")
    parser.add_argument("--reduction", type=int, default=3, help="ASHA reduction factor")
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once")
    parser.add_argument("--metric", default="eval/loss", choices=("eval/loss", "eval/accuracy"))
    parser.add_argument("--tie-break", choices=("eval/loss", "eval/accuracy"), help="orders trials equal on --metric")
    parser.add_argument(
        "--arms",
        type=_arms,
        default=["asha"],
        help="schedulers compared with the grid, comma-separated: asha, sha or asha,sha",
    )
    parser.add_argument("--storage", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="config overrides for both arms, e.g. pretrain.max_steps=150")
    args = parser.parse_args()

    common = [
        "tune.search=grid",
        "tune.num_samples=1",
        f"tune.max_epochs={args.epochs}",
        f"tune.metric={args.metric}",
        *([f"tune.tie_break={args.tie_break}"] if args.tie_break else []),
        f"tune.max_concurrent_trials={args.concurrency}",
        "tune.progress_every_s=60",
        grid_space(),
        *args.overrides,
    ]
    with tempfile.TemporaryDirectory(prefix="ptft-asha-") as folder:
        storage = args.storage or Path(folder)
        grid = sweep(args.config, storage, [*common, "tune.scheduler=fifo"])
        halving = ["tune.grace_period=1", f"tune.reduction_factor={args.reduction}"]
        arms = {
            "asha": [*common, "tune.scheduler=asha", *halving],
            # The synchronous scheduler needs every trial admitted at once; the CPUs still run two.
            "sha": [*common, "tune.scheduler=sha", *halving, f"tune.max_concurrent_trials={CONFIGS}"],
        }
        runs = {name: sweep(args.config, storage, arms[name]) for name in args.arms}
    rows = [summarise("grid", grid, args.metric), *(summarise(name, runs[name], args.metric) for name in args.arms)]
    print(
        f"config: {args.config} {' '.join(args.overrides)}; 27 configs; budget {args.epochs} epochs; "
        f"grace 1, reduction {args.reduction}; ranked by {args.metric}, ties by {args.tie_break or 'none'}"
    )
    print(
        f"{'arm':<6}{'trials':>7}{'errors':>7}{'trial-epochs':>14}{'pick val acc':>14}{'pick val loss':>15}"
        f"{'max val acc':>13}{'tune work s':>13}{'wall s':>9}  picked config"
    )
    for row in rows:
        print(
            f"{row['arm']:<6}{row['trials']:>7}{row['errors']:>7}{row['trial_epochs']:>14}"
            f"{row['best_accuracy']:>14.4f}{row['best_loss']:>15.4f}{row['max_accuracy']:>13.4f}"
            f"{_seconds(row['tune_work_s']):>13}{row['wall_s']:>9.1f}  {row['best_config']}"
        )
    for row in rows[1:]:
        row["gap"] = rows[0]["best_accuracy"] - row["best_accuracy"]
        row["compute_share"] = row["trial_epochs"] / rows[0]["trial_epochs"]
        print(f"{row['arm']} epochs per trial: {row['epochs_histogram']}")
        print(
            f"{row['arm']} vs grid: accuracy gap {row['gap'] * 100:+.2f} points "
            f"(target <= 1.00: {'met' if row['gap'] <= 0.01 else 'missed'}); compute {row['compute_share']:.1%} "
            f"of the grid's trial-epochs (target <= 25%: {'met' if row['compute_share'] <= 0.25 else 'missed'}); "
            f"tune wall time ratio {_ratio(row['tune_work_s'], rows[0]['tune_work_s'])}"
        )
    grid_epochs = rows[0]["trial_epochs"]
    replays = [
        replay_synchronous(grid, grace, args.reduction, args.epochs, args.metric, args.tie_break) for grace in (1, 2, 3)
    ]
    for replay in replays:
        replay["gap"] = rows[0]["best_accuracy"] - replay["best_accuracy"]
        print(
            f"synchronous rungs (replayed on the grid's epochs), grace {replay['grace']}, reduction {args.reduction}: "
            f"{replay['trial_epochs']} trial-epochs ({replay['trial_epochs'] / grid_epochs:.1%} of the grid's), "
            f"pick val acc {replay['best_accuracy']:.4f} (gap {replay['gap'] * 100:+.2f} points)"
        )
    if args.json:
        args.json.write_text(json.dumps({"arms": rows, "synchronous_replays": replays}, indent=2) + "\n")


if __name__ == "__main__":
    main()
