"""Sweeps through `ptft sweep`, on the shared Ray cluster and MLflow server.

1. ASHA over a 4-point learning-rate grid, one trial at a time, best first: the driver is SIGKILLed
   once a trial checkpoint is saved, `ptft sweep --resume` finishes it. Weak trials stop at the
   first rung; one MLflow run per trial under the tune run; nothing logged twice.
2. PBT (synchronous) on the same cached tokenize/pretrain: weak trials continue from a strong one's
   checkpoint with perturbed learning rate and weight decay, in their own MLflow run. Trial
   processes are reused (the default), so a restarted trial runs in a finished one's process.
3. Optuna TPE with median stopping, each trial a two-worker TorchTrainer; stopped with Ctrl-C
   after its first trial and resumed.
4. Synchronous successive halving over the same grid: every trial trains to the rung and waits
   there, paused; then the better half continues from the checkpoint it paused at.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from components.stage import read_json
from tests.conftest import REPO, answers_ctrl_c, tiny_config_dict, wait_until

pytestmark = pytest.mark.integration

PTFT = str(Path(sys.executable).with_name("ptft"))
# Best first: on this data 3e-3 ends epoch 1 at eval loss ~0.71, the three diverging rates at
# ~7, ~10 and ~40, so each later trial meets a better one at ASHA's first rung, whether the kill
# lands before or after the best trial ended (components.tune.ResumableASHA gives the resumed
# sweep the rung results of trials that ended before it).
GRID = [3e-3, 0.3, 1.0, 3.0]


def _config(storage: Path) -> dict:
    config = tiny_config_dict(storage)
    config["name"] = "sweeps"
    config["data"]["task"]["train"]["num_examples"] = 128
    config["pretrain"] = {
        "max_steps": 12,
        "warmup_steps": 2,
        "batch_size_per_worker": 8,
        "log_every": 4,
        "workers": {"num_workers": 1},  # the sweeps only need a pre-trained encoder
    }
    config["tune"] = {
        "search": "grid",
        "num_samples": 1,
        "scheduler": "asha",
        "metric": "eval/loss",
        "max_epochs": 3,
        "grace_period": 1,
        "reduction_factor": 2,
        "max_concurrent_trials": 1,
        "progress_every_s": 0.5,
        "search_space": {"learning_rate": {"type": "grid", "values": GRID}},
    }
    config["finetune"] = {"epochs": 1, "defaults": {"batch_size_per_worker": 8}}
    return config


class Sweeps:
    """`ptft sweep` child processes on one storage, their logs, and the MLflow client."""

    def __init__(self, storage: Path, tracking_uri: str, ray_address: str):
        self.storage = storage
        self.config = storage / "sweeps.yaml"
        self.config.write_text(yaml.safe_dump(_config(storage)))
        self.overrides = [f"tracking.uri={tracking_uri}", f"ray.address={ray_address}"]
        self.client = MlflowClient(tracking_uri)
        # Tune snapshots the sweep every TUNE_GLOBAL_CHECKPOINT_S (at least 10 s by default).
        self.env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
        self.logs: list[Path] = []

    def start(self, *args: str) -> subprocess.Popen:
        log = self.storage / f"sweep-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "w") as out:
            return subprocess.Popen(
                [PTFT, "sweep", *args],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=answers_ctrl_c,  # the Optuna sweep is stopped with a Ctrl-C
            )

    def run(self, *overrides: str) -> str:
        """A whole sweep; returns the pipeline run id."""
        before = self.run_ids()
        process = self.start(str(self.config), *self.overrides, *overrides)
        assert process.wait(timeout=900) == 0, self.tail()
        (run_id,) = self.run_ids() - before
        return run_id

    def run_ids(self) -> set[str]:
        return {path.parent.name for path in (self.storage / "runs").glob("*/manifest.json")}

    def manifest(self, run_id: str) -> dict:
        return read_json(self.storage / "runs" / run_id / "manifest.json")

    def tail(self) -> str:
        return self.logs[-1].read_text()[-6000:]

    def tune_output(self, run_id: str) -> Path:
        return Path(self.manifest(run_id)["stages"]["tune"]["output_uri"])

    def runs(self, run_id: str, stage: str) -> list:
        experiment = self.client.get_experiment_by_name("sweeps")
        query = f"tags.`ptft.run_id` = '{run_id}' and tags.`ptft.stage` = '{stage}'"
        return self.client.search_runs([experiment.experiment_id], query)

    def history(self, run_id: str, key: str) -> dict[int, float]:
        metrics = self.client.get_metric_history(run_id, key)
        steps = [metric.step for metric in metrics]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {sorted(steps)}"
        return {metric.step: metric.value for metric in metrics}


def _trial_checkpoint_saved(tune_dir: Path) -> bool:
    """A trial checkpoint exists, Tune's experiment state was saved after it, and every state file
    reads back. (A kill while Tune copies a state file to storage truncates it; the resume then
    starts the sweep over, which is tested in tests/unit/test_sweep_config.py, not here.)"""
    from components.tune import unreadable_sweep_state

    checkpoints = list(tune_dir.glob("*/checkpoint_*"))
    states = list(tune_dir.glob("experiment_state-*.json"))
    if not checkpoints or not states:
        return False
    saved = max(s.stat().st_mtime for s in states) > min(c.stat().st_mtime for c in checkpoints) + 0.5
    return saved and not unreadable_sweep_state(tune_dir)


@pytest.fixture(scope="module")
def sweeps(ray_driver: str, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Sweeps:
    return Sweeps(tmp_path_factory.mktemp("sweeps"), mlflow_server, ray_driver)


@pytest.fixture(scope="module")
def asha(sweeps: Sweeps) -> dict:
    first = sweeps.start(str(sweeps.config), *sweeps.overrides)

    def checkpointed() -> bool:
        if first.poll() is not None:
            raise AssertionError(f"the sweep exited ({first.returncode}) before the kill:\n{sweeps.tail()}")
        ids = sweeps.run_ids()
        if not ids:
            return False
        runs = (sweeps.storage / "ray_results").glob(f"{next(iter(ids))}-tune-*")  # <run>-tune-<cache key>
        found = [path for path in runs if not path.name.endswith("-trials")]
        return bool(found) and _trial_checkpoint_saved(found[0])

    wait_until(checkpointed, "a saved trial checkpoint")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    (run_id,) = sweeps.run_ids()
    killed_at = sweeps.manifest(run_id)["stages"]["tune"]["status"]
    second = sweeps.start("--resume", "--storage", str(sweeps.storage))
    assert second.wait(timeout=900) == 0, sweeps.tail()
    return {
        "run_id": run_id,
        "killed_at": killed_at,
        "output": sweeps.logs[-1].read_text(),
        "trials": read_json(sweeps.tune_output(run_id) / "trials.json"),
    }


def test_asha_stops_weak_trials_at_the_first_rung(asha: dict) -> None:
    epochs = {row["config"]["learning_rate"]: row["epochs"] for row in asha["trials"]}
    assert set(epochs) == set(GRID)
    assert epochs[GRID[0]] == 3  # the best trial runs the whole budget
    stopped = [lr for lr, count in epochs.items() if count < 3]
    assert len(stopped) >= 2, epochs  # the diverging rates lose to a better trial at epoch 1
    assert {row["status"] for row in asha["trials"] if row["epochs"] < 3} == {"stopped_early"}


def test_the_killed_sweep_resumed_to_the_end(sweeps: Sweeps, asha: dict) -> None:
    assert asha["killed_at"] == "running"
    manifest = sweeps.manifest(asha["run_id"])
    assert sorted(manifest["stages"]) == ["prepare", "pretrain", "tokenize", "tune"]  # a sweep ends at tune
    assert manifest["status"] == "succeeded" and manifest["stages"]["tune"]["attempts"] == 2
    assert "Resuming sweep" in asha["output"] and "Best config: learning_rate=0.003" in asha["output"]
    assert re.search(r"Best trial: \S+ with eval/loss = \d\.\d{1,4}\n", asha["output"])  # 4 digits, as the table
    assert "== sweep finished" in asha["output"]  # the live table's last print
    assert "MLflow: experiment 'sweeps'" in asha["output"]


def test_one_mlflow_run_per_trial_under_the_tune_run(sweeps: Sweeps, asha: dict) -> None:
    (tune_run,) = sweeps.runs(asha["run_id"], "tune")
    trials = sweeps.runs(asha["run_id"], "tune-trial")
    names = [trial.data.tags["ptft.trial"] for trial in trials]
    assert len(names) == len(set(names)) == len(GRID), names
    by_lr = {}
    for trial in trials:
        assert trial.data.tags["mlflow.parentRunId"] == tune_run.info.run_id
        assert trial.info.status == "FINISHED"
        lr = float(trial.data.params["learning_rate"])
        by_lr[lr] = trial
        epochs = sweeps.history(trial.info.run_id, "eval/loss")  # no epoch twice
        assert sorted(epochs) == list(range(1, len(epochs) + 1))
        assert trial.data.tags["ptft.trial_epochs"] == str(len(epochs))
        loaded = sweeps.history(trial.info.run_id, "restore/loaded_epoch")
        first = sweeps.history(trial.info.run_id, "restore/first_epoch")
        assert {step: value - 1 for step, value in first.items()} == loaded  # continued right after it
        assert sweeps.history(trial.info.run_id, "hyper/learning_rate")[1] == pytest.approx(lr)
    assert by_lr[GRID[0]].data.tags["ptft.best_trial"] == "true"
    assert by_lr[GRID[0]].data.tags["ptft.trial_status"] == "completed"
    assert sum(trial.data.tags["ptft.best_trial"] == "true" for trial in trials) == 1
    assert by_lr[GRID[-1]].data.tags["ptft.trial_status"] == "stopped_early"
    assert tune_run.data.tags["ptft.best_trial_run_id"] == by_lr[GRID[0]].info.run_id
    run_id = tune_run.info.run_id
    artifacts = {item.path for folder in (None, "plots") for item in sweeps.client.list_artifacts(run_id, folder)}
    assert {"trials.csv", "plots/sweep.png"} <= artifacts
    assert tune_run.data.metrics["tune/trials_stopped_early"] >= 2


@pytest.fixture(scope="module")
def pbt(sweeps: Sweeps, asha: dict) -> str:
    return sweeps.run(
        "tune.search=random",
        "tune.scheduler=pbt",
        "tune.num_samples=4",
        "tune.max_epochs=4",
        "tune.pbt_interval=1",
        "tune.pbt_quantile=0.25",
        # Asynchronous PBT exploits only when a weak trial reports while a better one still runs,
        # which depends on timing; synchronous PBT exploits the bottom quantile at every interval.
        "tune.pbt_synchronous=true",
        "tune.max_concurrent_trials=4",  # the whole population alive; trials beyond the CPUs take turns
        "tune.search_space={learning_rate: {type: loguniform, low: 1.0e-7, high: 3.0e-3}, "
        "weight_decay: {type: uniform, low: 0.0, high: 0.1}}",
    )


def test_pbt_exploits_in_the_same_trial_run(sweeps: Sweeps, pbt: str) -> None:
    manifest = sweeps.manifest(pbt)
    assert manifest["stages"]["tokenize"]["status"] == "cached" and manifest["stages"]["pretrain"]["status"] == "cached"
    trials = sweeps.runs(pbt, "tune-trial")
    assert len({trial.data.tags["ptft.trial"] for trial in trials}) == len(trials) == 4
    final = {row["trial"]: row["config"] for row in read_json(sweeps.tune_output(pbt) / "trials.json")}
    exploited = [trial for trial in trials if int(trial.data.tags.get("ptft.pbt_exploits", "0")) > 0]
    assert exploited, [trial.data.tags for trial in trials]
    for trial in exploited:
        first = {name: float(value) for name, value in trial.data.params.items()}
        last = json.loads(trial.data.tags["ptft.trial_config"])
        assert last == final[trial.data.tags["ptft.trial"]]  # the run follows the trial's config
        assert last["learning_rate"] != first["learning_rate"]  # PBT perturbed it
        epochs = sorted(sweeps.history(trial.info.run_id, "eval/loss"))  # history(): no epoch logged twice
        # An exploit continues from the donor's checkpoint, which can be epochs ahead of the trial's
        # own last one (a fresh-clone run logged epochs 1, 2, 4): later epochs, never one again.
        assert epochs[0] == 1 and epochs[-1] <= 4, epochs
        assert sweeps.history(trial.info.run_id, "hyper/learning_rate")
    assert all(trial.info.status == "FINISHED" for trial in trials)


OPTUNA = (
    "tune.search=optuna",
    "tune.scheduler=median",
    "tune.num_samples=2",
    "tune.max_epochs=2",
    "tune.workers_per_trial=2",
    "tune.max_concurrent_trials=1",
    "tune.median_min_samples=1",
    "tune.tie_break=eval/accuracy",  # Optuna and the median rule compare the ranked value
    "tune.search_space={learning_rate: {type: loguniform, low: 1.0e-4, high: 3.0e-3}, "
    "dropout: {type: choice, values: [0.0, 0.1]}}",
)


@pytest.fixture(scope="module")
def optuna_distributed(sweeps: Sweeps, asha: dict) -> dict:
    """The Optuna sweep, stopped with Ctrl-C (SIGINT) once its first trial ended, then resumed.
    (Tune's own SIGINT handler would end the sweep there and return both trials as ended.)"""
    before = sweeps.run_ids()
    first = sweeps.start(str(sweeps.config), *sweeps.overrides, *OPTUNA)

    def a_trial_ended() -> bool:
        if first.poll() is not None:
            raise AssertionError(f"the sweep exited ({first.returncode}) before the Ctrl-C:\n{sweeps.tail()}")
        ids = sweeps.run_ids() - before
        return bool(ids) and any(run.info.status == "FINISHED" for run in sweeps.runs(next(iter(ids)), "tune-trial"))

    # Two epochs on two workers took over 300 s on a CI machine under the whole suite's load.
    wait_until(a_trial_ended, "a finished trial", timeout_s=900)
    first.send_signal(signal.SIGINT)
    stopped = {"exit": first.wait(timeout=300), "output": sweeps.tail()}
    (run_id,) = sweeps.run_ids() - before
    stopped["status"] = sweeps.manifest(run_id)["stages"]["tune"]["status"]
    second = sweeps.start("--resume", run_id, "--storage", str(sweeps.storage))
    assert second.wait(timeout=900) == 0, sweeps.tail()
    return {"run_id": run_id, "stopped": stopped}


def test_a_sweep_stopped_with_ctrl_c_is_killed_not_summarised(sweeps: Sweeps, optuna_distributed: dict) -> None:
    stopped = optuna_distributed["stopped"]
    assert stopped["exit"] == 128 + signal.SIGINT, stopped["output"]
    assert stopped["status"] == "killed"
    assert "ptft sweep: stopped (SIGINT)" in stopped["output"]
    assert f"ptft sweep --resume {optuna_distributed['run_id']}" in stopped["output"]
    assert "Traceback" not in stopped["output"] and "Best config" not in stopped["output"]
    manifest = sweeps.manifest(optuna_distributed["run_id"])
    assert manifest["status"] == "succeeded" and manifest["stages"]["tune"]["attempts"] == 2


def test_optuna_trials_run_as_two_worker_trainers(sweeps: Sweeps, optuna_distributed: dict) -> None:
    run_id = optuna_distributed["run_id"]
    trials = read_json(sweeps.tune_output(run_id) / "trials.json")
    assert len(trials) == 2 and all(row["status"] in ("completed", "stopped_early") for row in trials), trials
    assert all(row["metric"] is not None for row in trials)
    # Tune compared the ranked value, which came through the trainers' report: the loss nudged by the accuracy.
    for row in trials:
        results = [json.loads(line) for line in (Path(row["path"]) / "result.json").read_text().splitlines()]
        assert results and all(0 < abs(result["tune/rank"] - result["eval/loss"]) < 1e-9 for result in results)
    # Each trial was a Ray Train run of its own. Its workers' checkpoints went once the sweep was
    # published, with the trials' own (tests/e2e/test_demo_pipeline.py has a whole pipeline's).
    (trials_dir,) = (sweeps.storage / "ray_results").glob(f"{run_id}-tune-*-trials")
    train_runs = list(trials_dir.iterdir())
    assert len(train_runs) == 2
    assert not list(trials_dir.parent.glob(f"{run_id}-tune-*/**/checkpoint_*"))
    log = (sweeps.storage / "runs" / run_id / "ptft.log").read_text()
    freed = re.search(r"stage tune: removed its Ray checkpoints \((\d+\.\d) MB\)", log)
    assert freed and float(freed.group(1)) > 0, log[-3000:]
    for trial in sweeps.runs(run_id, "tune-trial"):
        assert sweeps.history(trial.info.run_id, "eval/accuracy")  # rank 0 logged into the trial's run


def _epoch_results(trial_dir: Path) -> list[dict]:
    """A trial's results by epoch from both of Tune's logs. When Tune restarts a paused trial it
    copies each log back from storage first (ray.tune.logger's _restore_from_remote), and on a
    loaded machine that copy has lost a result.json line (a fresh-clone run: epoch 1 gone from
    result.json, kept in progress.csv)."""
    by_epoch = {}
    with open(trial_dir / "progress.csv", newline="") as rows:
        for row in csv.DictReader(rows):
            fields = ("epoch", "eval/loss", "timestamp", "time_this_iter_s")
            by_epoch[int(float(row["epoch"]))] = {name: float(row[name]) for name in fields}
    for line in (trial_dir / "result.json").read_text().splitlines():
        result = json.loads(line)
        by_epoch[int(result["epoch"])] = result
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


@pytest.fixture(scope="module")
def sha(sweeps: Sweeps, asha: dict) -> str:
    return sweeps.run(
        "tune.scheduler=sha",
        "tune.max_epochs=2",
        "tune.reduction_factor=2",
        "tune.max_concurrent_trials=4",  # every trial admitted; the CPUs train two, the others wait paused
    )


def test_synchronous_halving_cuts_once_every_trial_reached_the_rung(sweeps: Sweeps, sha: str) -> None:
    trials = read_json(sweeps.tune_output(sha) / "trials.json")
    assert len(trials) == len(GRID)
    results = {row["trial"]: _epoch_results(Path(row["path"])) for row in trials}
    first_epoch = {trial: next(r for r in rows if r["epoch"] == 1) for trial, rows in results.items()}
    better_half = sorted(first_epoch, key=lambda trial: first_epoch[trial]["eval/loss"])[: len(GRID) // 2]
    epochs = {row["trial"]: row["epochs"] for row in trials}
    assert {trial for trial, ran in epochs.items() if ran == 2} == set(better_half), epochs
    assert sorted(epochs.values()) == [1, 1, 2, 2]
    statuses = {row["trial"]: row["status"] for row in trials}
    assert {statuses[trial] for trial in better_half} == {"completed"}
    assert {status for trial, status in statuses.items() if trial not in better_half} == {"stopped_early"}
    # Synchronous: no trial trained its second epoch before every trial had finished its first.
    last_first = max(result["timestamp"] for result in first_epoch.values())
    seconds = [r["timestamp"] - r["time_this_iter_s"] for t in better_half for r in results[t] if r["epoch"] == 2]
    assert min(seconds) >= last_first - 1, (seconds, last_first)
    # A survivor that waited at the rung continued from the checkpoint it paused at, in its own
    # MLflow run, no epoch twice (the one whose result completed the rung may go straight on).
    restored = []
    for trial in sweeps.runs(sha, "tune-trial"):
        if trial.data.tags["ptft.trial"] in better_half:
            assert sorted(sweeps.history(trial.info.run_id, "eval/loss")) == [1, 2]
            restored.append(sweeps.history(trial.info.run_id, "restore/loaded_epoch"))
    assert {1: 1} in restored and all(loaded in ({}, {1: 1}) for loaded in restored), restored
