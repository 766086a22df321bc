"""What does Ray Tune cost a sweep? K fixed-length trials (same work each: --epochs epochs of the
demo's fine-tuning, no early stopping) through the tune stage, against the same fine-tuning run
back to back in this process without Ray:

    ideal    = K x (mean bare run time) / concurrency
    overhead = sweep wall time / ideal - 1          (target <= 15%)

The sweep's wall time is the whole `components.tune.run` call: trial processes and their imports,
scheduling, epoch checkpoints, MLflow runs per trial (a real sqlite store), the table and plot at
the end. Runs with `tune.reuse_actors` off and on (reuse keeps finished trials' processes, and
their imports, for the next trials).

    ptft run configs/demo.yaml storage=/tmp/demo        # or any finished run of the demo
    python benchmarks/tune_overhead.py --storage /tmp/demo [--trials 6] [--epochs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from pretraining_gain import latest  # noqa: E402

from components import finetune, training, tune  # noqa: E402
from components.schemas import DeepSpeedConfig, Distribution, Hyperparameters, TuneConfig  # noqa: E402
from components.stage import StageContext, read_json  # noqa: E402
from components.tracking import ensure_experiment, start_run  # noqa: E402

BATCH = 8


def inputs(storage: Path) -> tuple[Path, Path]:
    tokenized = latest(storage / "artifacts" / "prepare")  # the task splits and labels
    pretrained = latest(storage / "artifacts" / "pretrain") / "model"
    return pretrained, tokenized


def bare_runs(pretrained: Path, tokenized: Path, epochs: int, count: int) -> list[float]:
    """The trial's work without Tune: fit_classifier in this process, one thread, timed."""
    created = training.ensure_process_group()
    times = []
    for index in range(count):
        run = finetune.ClassifierRun(
            pretrained_dir=str(pretrained),
            task_dir=str(tokenized / "task"),
            label_names=read_json(tokenized / "labels.json"),
            epochs=epochs,
            hyper=Hyperparameters(learning_rate=1e-3 * (1 + index), batch_size_per_worker=BATCH),
            deepspeed=DeepSpeedConfig(zero_stage=1),
            threads=1,
        )
        started = time.perf_counter()
        with tempfile.TemporaryDirectory():
            finetune.fit_classifier(run, report=lambda metrics, checkpoint_dir: None)
        times.append(time.perf_counter() - started)
        print(f"bare run {index + 1}/{count}: {times[-1]:.1f} s", flush=True)
    if created:
        dist.destroy_process_group()
    return times


def sweep(
    pretrained: Path,
    tokenized: Path,
    epochs: int,
    trials: int,
    concurrency: int,
    reuse: bool,
    work: Path,
    tracking_uri: str,
) -> dict:
    cfg = TuneConfig(
        search="grid",
        scheduler="fifo",
        max_epochs=epochs,
        max_concurrent_trials=concurrency,
        cpus_per_trial=1,
        reuse_actors=reuse,
        progress_every_s=0,
        trial_max_failures=0,
        search_space={"learning_rate": Distribution(type="grid", values=[1e-3 * (1 + i) for i in range(trials)])},
    )
    client = MlflowClient(tracking_uri)
    experiment = ensure_experiment(client, "tune-overhead", None)
    name = f"reuse-{reuse}"
    run_id = start_run(client, experiment, name)
    output = work / name
    output.mkdir(parents=True)
    ctx = StageContext(
        pipeline_run_id=f"overhead-{name}",
        stage="tune",
        output_dir=output,
        storage=work,
        tracking_uri=tracking_uri,
        experiment_id=experiment,
        mlflow_run_id=run_id,
        seed=0,
    )
    started, started_at = time.perf_counter(), time.time()
    result = tune.run(
        cfg,
        str(pretrained),
        str(tokenized),
        Hyperparameters(batch_size_per_worker=BATCH),
        DeepSpeedConfig(zero_stage=1),
        ctx,
    )
    seconds = time.perf_counter() - started
    assert result.metrics["tune/trials_completed"] == trials, result.metrics
    return {"wall_s": seconds, **where_the_time_went(client, experiment, run_id, started_at, seconds)}


def where_the_time_went(client: MlflowClient, experiment: str, run_id: str, started_at: float, wall: float) -> dict:
    """The sweep's time line from its trials' MLflow runs, which each trial opens once its process
    has imported everything and closes when its last epoch is reported: the time before the first
    trial's run opened (Tune's start, the first trial processes and their imports), the trials'
    own spans, and the time after the last one closed (Tune's end, the table, the plot)."""
    runs = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    spans = sorted((run.info.start_time / 1000 - started_at, run.info.end_time / 1000 - started_at) for run in runs)
    return {
        "before_first_trial_s": spans[0][0],
        "trial_spans_s": [end - start for start, end in spans],
        "after_last_trial_s": wall - max(end for _, end in spans),
        # A later trial waits for a slot: from the last run that closed before it opened, to its opening.
        "gaps_between_trials_s": [
            start - max(end for _, end in spans if end <= start)
            for start, _ in spans
            if any(end <= start for _, end in spans)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", type=Path, required=True, help="storage of a finished demo run")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--bare-runs", type=int, default=2, help="bare runs timed for the mean")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    pretrained, tokenized = inputs(args.storage)
    # A fresh local Ray of exactly `concurrency` CPUs, never a cluster left running on this machine.
    ray.init(address="local", num_cpus=args.concurrency, include_dashboard=False, log_to_driver=False)
    bare = bare_runs(pretrained, tokenized, args.epochs, args.bare_runs)
    ideal = args.trials * statistics.mean(bare) / args.concurrency
    rows = []
    with tempfile.TemporaryDirectory(prefix="ptft-tune-overhead-") as folder:
        work = Path(folder)
        tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
        for reuse in (False, True):
            timeline = sweep(
                pretrained, tokenized, args.epochs, args.trials, args.concurrency, reuse, work, tracking_uri
            )
            rows.append({"reuse_actors": reuse, **timeline, "overhead": timeline["wall_s"] / ideal - 1})
            print(f"sweep reuse_actors={reuse}: {timeline['wall_s']:.1f} s", flush=True)
    print(
        f"\n{args.trials} trials x {args.epochs} epochs (demo fine-tuning, batch {BATCH}, 1 thread each), "
        f"concurrency {args.concurrency}"
    )
    print(
        f"bare run (no Ray): mean {statistics.mean(bare):.1f} s of {len(bare)}; "
        f"ideal sweep wall = {args.trials} x mean / {args.concurrency} = {ideal:.1f} s"
    )
    for row in rows:
        verdict = "met" if row["overhead"] <= 0.15 else "missed"
        print(
            f"sweep, reuse_actors={str(row['reuse_actors']).lower():<5}: wall {row['wall_s']:.1f} s, "
            f"overhead {row['overhead']:+.1%} (target <= 15%: {verdict})"
        )
        spans, gaps = row["trial_spans_s"], row["gaps_between_trials_s"] or [0.0]
        print(
            f"  before the first trial's run opened {row['before_first_trial_s']:.1f} s; trial runs "
            f"{statistics.mean(spans):.1f} s mean ({min(spans):.1f}-{max(spans):.1f}, bare runs "
            f"{statistics.mean(bare):.1f}); gap from a closed run to the next opened {statistics.mean(gaps):.1f} s "
            f"mean; after the last closed {row['after_last_trial_s']:.1f} s"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"bare_s": bare, "ideal_s": ideal, "sweeps": rows, "trials": args.trials, "epochs": args.epochs},
                indent=2,
            )
            + "\n"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
