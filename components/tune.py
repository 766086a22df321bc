"""Stage 3, tune: a Ray Tune sweep over fine-tuning hyperparameters.

Search: random sampling (grid dimensions enumerated), a full grid, or Optuna's TPE. Schedulers:
ASHA (default), synchronous successive halving, HyperBand, median stopping, PBT (perturbs
learning rate and weight decay and hands a strong trial's checkpoint to a weak one), or none.
Budgets: trials, concurrency, a time limit.

A trial runs the fine-tuning loop (`finetune.fit_classifier`, imported, not copied) in its own
process on a one-rank DeepSpeed group, or, with `workers_per_trial` > 1, as a `TorchTrainer` of
that many workers whose reports reach Tune through `TuneReportCallback`. It reports validation
loss and accuracy and an epoch checkpoint every epoch.

MLflow: the stage run is the parent of one run per trial (found again by its `ptft.trial` tag on
a restore, a retry or a PBT exploit, so never duplicated); params = the trial's first config,
`hyper/*` metrics per epoch (PBT changes them), tags `ptft.trial_status` (running or paused
while it runs, then completed, stopped_early or error, kept in step with Tune), `ptft.best_trial`,
`ptft.pbt_exploits`. The stage run gets trials.csv and plots/sweep.png (metric against each
hyperparameter, the best trial marked).

Output folder:
    best_config.json   the best trial's hyperparameters (finetune reads it)
    trials.json        every trial: hyperparameters, its best epoch's metrics, epochs run, status, MLflow run
    trials.csv, sweep.png
    metrics.json       the best trial's metrics at its best epoch (the last under PBT)
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import ray.train
import ray.tune
from pydantic import BaseModel
from ray.tune.experiment import Trial
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
)
from ray.tune.schedulers.hyperband import _Bracket
from ray.tune.search.basic_variant import BasicVariantGenerator

from components import accelerator, console, finetune, plots, sweep_report, training
from components.ranking import RANK_KEY, Ranking, finite
from components.schemas import (
    INTEGER_HYPERPARAMETERS,
    DeepSpeedConfig,
    Distribution,
    Hyperparameters,
    TuneConfig,
)
from components.stage import StageContext, StageResult, read_json, write_json
from components.tasks import task_type
from components.tracking import MlflowTracker, child_run_tags, open_child_run

log = logging.getLogger(__name__)

# Tune's trainable registry is one dict per process that `Tuner.fit` writes to and iterates
# unguarded: two sweeps starting side by side (task branches) break it ("dictionary changed size
# during iteration"). Sweeps register under this lock and hand Tune the name.
_REGISTRY = threading.Lock()

TRIAL_TAG = "ptft.trial"
CONFIG_TAG = "ptft.trial_config"


# --------------------------------------------------------------------------- the search


def dimension(name: str, dist_: Distribution, search: str):
    """The Ray Tune domain of one search dimension (grid dimensions, and every choice under
    search=grid, are enumerated with `grid_search`)."""
    values = [int(v) for v in dist_.values] if dist_.values and name in INTEGER_HYPERPARAMETERS else dist_.values
    if dist_.enumerated(search):
        return ray.tune.grid_search(values)
    if dist_.type == "choice":
        return ray.tune.choice(values)
    sampler = ray.tune.loguniform if dist_.type == "loguniform" else ray.tune.uniform
    return sampler(dist_.low, dist_.high)


def param_space(cfg: TuneConfig) -> dict:
    return {name: dimension(name, dist_, cfg.search) for name, dist_ in cfg.search_space.items()}


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive a restored sweep. Tune's snapshot does not hold the scheduler, so a
    sweep continued after a kill starts with empty rungs, and a trial restored past a rung (from its
    epoch-2 checkpoint, say) never enters that rung: the next trials there meet no cutoff and run
    their whole budget. A trial's first result past rungs it has no record in also records it in
    the lower ones (its earlier results are gone); the highest is left to ASHA's own decision. A
    trial that had ended before the kill reports nothing more: it enters its rungs when the resumed
    sweep adds it back, with its results per epoch as Tune kept them (else its last)."""

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        self._enter_reached_rungs(trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._fill_skipped_rungs(trial, result)
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._fill_skipped_rungs(trial, result)
        super().on_trial_complete(tune_controller, trial, result)

    def _enter_reached_rungs(self, trial) -> None:
        """A trial added back with results (a resumed sweep) in every rung its epochs reached."""
        metadata = getattr(trial, "run_metadata", None)
        result = metadata.last_result if metadata is not None else {}
        if self._time_attr not in result or self._metric not in result:
            return
        reached = int(result[self._time_attr])
        # Tune keeps a metric's last 10 values: one per epoch when the trial reported each once
        history = list(metadata.metric_n_steps.get(self._metric, {}).get("10", []))
        for milestone, recorded in self._trial_info[trial.trial_id]._rungs:
            if milestone <= reached and trial.trial_id not in recorded:
                value = history[int(milestone) - 1] if len(history) == reached else result[self._metric]
                recorded[trial.trial_id] = self._metric_op * value

    def _fill_skipped_rungs(self, trial, result: dict) -> None:
        bracket = self._trial_info.get(trial.trial_id)
        if bracket is None or self._time_attr not in result or self._metric not in result:
            return
        reached = [
            recorded
            for milestone, recorded in bracket._rungs  # highest milestone first
            if milestone <= result[self._time_attr] and trial.trial_id not in recorded
        ]
        for recorded in reached[1:]:
            recorded[trial.trial_id] = self._metric_op * result[self._metric]


class SynchronousHalving(HyperBandScheduler):
    """Successive halving with synchronous rungs: every trial trains `grace_period` epochs and waits
    there (paused, its CPU handed to the next trial) until all have; then the best
    1/`reduction_factor` (rounded up) continue to the next rung, `reduction_factor` times further,
    and the rest stop; up to `max_t`. Unlike ASHA, a rung's cut is made once, over every trial.

    Ray's HyperBand with one bracket that holds every trial (its own spreads them over brackets
    of different grace periods). A restored sweep starts the bracket again with the trials still
    alive: each is compared at its next result past the rung it waits for."""

    def __init__(self, *, max_t: int, grace_period: int, reduction_factor: int, trials: int):
        super().__init__(time_attr="epoch", max_t=max_t, reduction_factor=reduction_factor)
        self._grace_period = grace_period
        self._trials = trials

    def halvings(self) -> int:
        """The rungs below max_t, where trials are cut."""
        count, rung = 0, self._grace_period
        while rung < self._max_t_attr:
            count, rung = count + 1, rung * self._eta
        return count

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._metric or not self._metric_op:
            raise ValueError("SynchronousHalving needs the sweep's metric and mode")
        if self._state["bracket"] is None:
            bracket = _Bracket(
                time_attr=self._time_attr,
                max_trials=self._trials,
                init_t_attr=self._grace_period,
                max_t_attr=self._max_t_attr,
                eta=self._eta,
                s=self.halvings(),
            )
            self._hyperbands, self._state["bracket"] = [[bracket]], bracket
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            return  # a restored sweep's ended trial: nothing left to compare
        self._state["bracket"].add_trial(trial)
        self._trial_info[trial] = self._state["bracket"], 0

    def on_trial_remove(self, tune_controller, trial) -> None:
        """A trial that ended (its last epoch done, an error, a stop) no longer holds up its rung.
        Ray's HyperBand looks at the bracket again on a removal only until its first cut (it never
        clears `is_being_processed`): a trial ending by itself at the last rung would leave the
        ones paused there waiting for good."""
        if trial not in self._trial_info:
            return  # a restored sweep's ended trial, never added
        bracket, _ = self._trial_info[trial]
        bracket.cleanup_trial(trial)
        waiting = bracket.current_trials()
        if not waiting or not bracket.cur_iter_done():
            return
        if not bracket.finished():
            # Every trial left waits paused at the rung, so the action it returns for a running
            # trial (the one whose result it was given) has no taker here.
            self._process_bracket(tune_controller, bracket)
            return
        for other in waiting:
            if other.status == Trial.PAUSED or other.is_saving:
                tune_controller.stop_trial(other)

    def choose_trial_to_run(self, tune_controller):
        """A trial let past a rung first, then a new one. HyperBand's own choice returns the first
        PENDING trial again and again until it runs, and Tune starts one chosen trial per step:
        the survivors of a rung would go on one at a time while the other CPUs idle."""
        bracket = self._state["bracket"]
        waiting = bracket.current_trials() if bracket is not None else []
        for wanted in (
            lambda t: t.status == Trial.PAUSED and t in bracket.trials_to_unpause,
            lambda t: t.status == Trial.PENDING,
        ):
            chosen = next((trial for trial in waiting if wanted(trial)), None)
            if chosen is not None:
                return chosen
        return None


def build_scheduler(cfg: TuneConfig):
    """The trial scheduler; every one counts time in epochs."""
    if cfg.scheduler == "asha":
        return ResumableASHA(
            time_attr="epoch",
            max_t=cfg.max_epochs,
            grace_period=cfg.grace_period,
            reduction_factor=cfg.reduction_factor,
        )
    if cfg.scheduler == "sha":
        return SynchronousHalving(
            max_t=cfg.max_epochs,
            grace_period=cfg.grace_period,
            reduction_factor=cfg.reduction_factor,
            trials=cfg.trials(),
        )
    if cfg.scheduler == "hyperband":
        return HyperBandScheduler(time_attr="epoch", max_t=cfg.max_epochs, reduction_factor=cfg.reduction_factor)
    if cfg.scheduler == "median":
        return MedianStoppingRule(
            time_attr="epoch", grace_period=cfg.grace_period, min_samples_required=cfg.median_min_samples
        )
    if cfg.scheduler == "pbt":
        mutations = {name: dimension(name, cfg.search_space[name], "random") for name in cfg.pbt_mutations}
        return PopulationBasedTraining(
            time_attr="epoch",
            perturbation_interval=cfg.pbt_interval,
            quantile_fraction=cfg.pbt_quantile,
            hyperparam_mutations=mutations,
            synch=cfg.pbt_synchronous,
        )
    return FIFOScheduler()


def build_searcher(cfg: TuneConfig, seed: int):
    if cfg.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        # Metric and mode come from the TuneConfig.
        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))
    # Random samples, grid dimensions enumerated. It takes the concurrency limit itself (Tune
    # ignores TuneConfig.max_concurrent_trials for a search generator).
    return BasicVariantGenerator(random_state=seed, max_concurrent=cfg.max_concurrent_trials)


# --------------------------------------------------------------------------- the stage


class TrialSetup(BaseModel):
    """What every trial shares, handed to Ray as a dict."""

    base: finetune.ClassifierRun
    ranking: Ranking
    tune_run_id: str
    experiment_id: str
    pipeline_run_id: str
    workers: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    train_storage: str = ""


def run(
    cfg: TuneConfig,
    pretrained_uri: str,
    tokenized_uri: str,
    defaults: Hyperparameters,
    deepspeed: DeepSpeedConfig,
    ctx: StageContext,
    task: str = "sequence_classification",
) -> StageResult:
    """Run (or continue) the sweep; write best_config.json and the trial table under ctx.output_dir.
    `task` is the task type (components/tasks/); without a `metric` the sweep optimises its headline."""
    if cfg.metric is None:  # a pipeline config has set it already; a TuneConfig made in code may not
        cfg = cfg.model_copy(update={"metric": f"eval/{task_type(task).headline}"})
    setup = TrialSetup(
        base=finetune.ClassifierRun(
            pretrained_dir=pretrained_uri,
            task_dir=f"{tokenized_uri}/task",
            label_names=read_json(Path(tokenized_uri) / "labels.json"),
            epochs=cfg.max_epochs,
            hyper=defaults,
            deepspeed=deepspeed,
            threads=max(1, int(cfg.cpus_per_trial)),
            use_gpu=cfg.gpus_per_trial > 0,
            tracking_uri=ctx.tracking_uri,
            seed=ctx.seed,
            stage="tune",
            task_type=task,
        ),
        ranking=Ranking.of(cfg),
        tune_run_id=ctx.mlflow_run_id,
        experiment_id=ctx.experiment_id,
        pipeline_run_id=ctx.pipeline_run_id,
        workers=cfg.workers_per_trial,
        cpus_per_worker=cfg.cpus_per_trial,
        gpus_per_worker=cfg.gpus_per_trial,
        train_storage=str(Path(ctx.ray_storage()) / f"{ctx.ray_run_name()}-trials"),
    )
    trainable = _registered(_trainable(cfg, setup, ctx.cache_key))
    experiment = Path(ctx.ray_storage()) / ctx.ray_run_name()
    if ray.tune.Tuner.can_restore(experiment) and _restorable(experiment):
        # The same pipeline run was interrupted mid-sweep: finished trials stay finished, the rest
        # continue from their last checkpoint.
        log.info("tune: continuing the interrupted sweep at %s", experiment)
        tuner = ray.tune.Tuner.restore(
            str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = _new_tuner(cfg, trainable, ctx)
    # Tune's own SIGINT handler ends the sweep early and returns every trial as ended, the stopped
    # ones too: that part of the sweep would pass for all of it (the stage succeeding, cached, its
    # pick fine-tuned). Without it Ctrl-C is a KeyboardInterrupt: the stage ends KILLED and `ptft
    # resume` continues the sweep from Tune's last snapshot.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    with training.signal_handlers_kept():
        results = tuner.fit()
    return _summarise(results, cfg, ctx)


def unreadable_sweep_state(experiment: Path) -> list[str]:
    """The files of a saved sweep that cannot be read back: each kind's newest (Tune keeps one
    per session). Tune copies its state from the driver to the storage path file by file, so a
    driver killed during a copy leaves a truncated file; Tune's restore then logs the error and
    carries on with a sweep that lost its trials' configs."""
    import ray.cloudpickle as cloudpickle

    broken = []
    for pattern, load in (
        ("experiment_state-*.json", json.load),
        ("basic-variant-state-*.json", cloudpickle.load),
        ("searcher-state-*.pkl", cloudpickle.load),
        ("tuner.pkl", cloudpickle.load),
    ):
        found = sorted(experiment.glob(pattern), key=lambda path: path.stat().st_mtime)
        if not found:
            continue
        try:
            with open(found[-1], "rb") as state:
                load(state)
        except Exception as error:  # noqa: BLE001 - any failure to read it back is the finding
            broken.append(f"{found[-1].name} ({type(error).__name__}: {error or 'empty'})")
    return broken


def _restorable(experiment: Path) -> bool:
    """False, after moving the sweep aside, when its saved state is unreadable or it never started
    (Tune writes tuner.pkl before any trial; restoring only that makes one trial without a config)."""
    if not any(experiment.glob("experiment_state-*.json")):
        aside = experiment.with_name(f"{experiment.name}.unstarted-{int(time.time())}")
        experiment.rename(aside)
        log.info("tune: the interrupted sweep had not started a trial: it starts over (its files: %s)", aside)
        return False
    broken = unreadable_sweep_state(experiment)
    if not broken:
        return True
    aside = experiment.with_name(f"{experiment.name}.unrestorable-{int(time.time())}")
    experiment.rename(aside)
    log.warning(
        "tune: the interrupted sweep cannot be continued, its saved state is incomplete (%s; the "
        "driver was stopped while Tune wrote it): the sweep starts over. Its files are kept at %s",
        "; ".join(broken),
        aside,
    )
    return False


def _trainable(cfg: TuneConfig, setup: TrialSetup, key: str):
    if cfg.workers_per_trial > 1:
        # The trial function only drives a TorchTrainer; its workers ask for their own resources.
        # (Tune refuses an empty request, hence a sliver of a CPU.)
        function, resources = run_distributed_trial, {"cpu": 0.01}
    else:
        function, resources = run_trial, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    trainable = ray.tune.with_resources(ray.tune.with_parameters(function, setup=setup.model_dump()), resources)
    # Tune registers a trainable cluster-wide under its name: two tasks' sweeps running side by side
    # must not share one, or one sweep's trials would train on the other's data.
    trainable.__name__ = f"{function.__name__}-{key[:12]}" if key else function.__name__
    return trainable


def _registered(trainable) -> str:
    """The trainable's name, once registered with Tune (see _REGISTRY)."""
    with _REGISTRY:
        ray.tune.register_trainable(trainable.__name__, trainable)
    return trainable.__name__


def _new_tuner(cfg: TuneConfig, trainable: str, ctx: StageContext) -> ray.tune.Tuner:
    # Every trial checkpoints every epoch (ASHA/PBT decide per epoch, a resume continues from it),
    # with num_to_keep set: Tune then snapshots often by design and would warn at each snapshot.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    seed = ctx.seed if cfg.seed is None else cfg.seed
    params = list(cfg.search_space)
    pbt = cfg.scheduler == "pbt"
    searcher = build_searcher(cfg, seed)
    return ray.tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=ray.tune.TuneConfig(
            metric=Ranking.of(cfg).scheduler_metric,
            mode=cfg.mode,
            num_samples=cfg.samples(),
            max_concurrent_trials=None if isinstance(searcher, BasicVariantGenerator) else cfg.max_concurrent_trials,
            time_budget_s=cfg.time_budget_s,
            scheduler=build_scheduler(cfg),
            search_alg=searcher,
            reuse_actors=cfg.reuse_actors and cfg.workers_per_trial == 1,
        ),
        run_config=ray.tune.RunConfig(
            storage_path=ctx.ray_storage(),
            name=ctx.ray_run_name(),
            verbose=0,
            # The last epoch's result ends a PBT trial before PBT sees it: an exploit there would
            # restart the trial from its donor's final checkpoint with nothing left to train.
            stop={"epoch": cfg.max_epochs} if pbt else None,
            # A PBT exploit restores the checkpoint its donor had when PBT decided; the donor may have
            # written several more by the time the exploiting trial gets a CPU, so PBT keeps them all.
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=None if pbt else 1),
            failure_config=ray.tune.FailureConfig(max_failures=cfg.trial_max_failures),
            callbacks=[
                sweep_report.TrialTable(
                    params, cfg.metric, cfg.mode, cfg.progress_every_s, name=ctx.stage, max_epochs=cfg.max_epochs
                ),
                sweep_report.TrialCounts(ctx.pipeline_run_id),
                TrialStatusTags(ctx.tracking_uri, ctx.experiment_id, ctx.mlflow_run_id, cfg.max_epochs),
            ],
        ),
    )


class TrialStatusTags(ray.tune.Callback):
    """Keeps each trial run's `ptft.trial_status` in step with Tune while the sweep runs: a trial
    that completed, stopped early, failed or waits paused says so at once in `ptft status`, the
    run's progress line and the MLflow UI, not `running` until the sweep ends and
    `_close_trial_runs` tags the outcomes. (A trial's own process tags `running` when it opens
    its run.) Tags are queued, never waited for: an MLflow outage does not hold up Tune's loop."""

    def __init__(self, tracking_uri: str, experiment_id: str, tune_run_id: str, max_epochs: int):
        self.tracking_uri, self.experiment_id, self.tune_run_id = tracking_uri, experiment_id, tune_run_id
        self.max_epochs = max_epochs
        self.__setstate__({})

    # Tune pickles its callbacks with the experiment: the trackers (threads, locks) stay out.
    def __getstate__(self) -> dict:
        keep = ("tracking_uri", "experiment_id", "tune_run_id", "max_epochs")
        return {name: value for name, value in self.__dict__.items() if name in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._seen: dict[str, str] = {}  # trial name -> the status last seen
        self._trackers: dict[str, MlflowTracker] = {}  # trial name -> its run's tracker

    def on_step_end(self, iteration, trials, **info) -> None:
        now = {
            str(trial): sweep_report.trial_status(trial, trial.last_result or {}, self.max_epochs) for trial in trials
        }
        changed = {name: status for name, status in now.items() if status != self._seen.get(name)}
        self._seen.update(changed)
        told = {name: status for name, status in changed.items() if status not in ("pending", "running")}
        if told and (trackers := self._trackers_of(told)):
            for name, tracker in trackers.items():
                tracker.queue_tags({"ptft.trial_status": told[name]})

    def _trackers_of(self, names) -> dict[str, MlflowTracker]:
        """The trackers of these trials' runs, the runs looked up while MLflow answers (a trial
        that failed before it opened its run has none)."""
        from components.net import mlflow_unanswered

        if any(name not in self._trackers for name in names) and not mlflow_unanswered(self.tracking_uri):
            children = child_run_tags(self.tracking_uri, self.experiment_id, self.tune_run_id)
            for run_id, tags in children.items():
                if (name := tags.get(TRIAL_TAG)) and name not in self._trackers:
                    self._trackers[name] = MlflowTracker(self.tracking_uri, run_id)
        return {name: self._trackers[name] for name in names if name in self._trackers}

    def on_experiment_end(self, trials, **info) -> None:
        self.on_step_end(0, trials)
        for tracker in self._trackers.values():  # before _close_trial_runs tags the outcomes
            tracker.flush()


# --------------------------------------------------------------------------- one trial


def plain(hyper: dict) -> dict:
    """Sampled values as plain Python numbers (Tune may hand out numpy scalars)."""
    return {name: value.item() if hasattr(value, "item") else value for name, value in hyper.items()}


def run_trial(hyper: dict, setup: dict) -> None:
    """One trial in this process: the fine-tuning loop with these hyperparameters."""
    hyper = plain(hyper)
    trial = TrialSetup.model_validate(setup)
    checkpoint = ray.tune.get_checkpoint()
    tracker = open_trial_run(trial, _trial_name(), hyper)
    # The one-rank group lives as long as the process: with reuse_actors the next trial in this
    # process uses it again (DeepSpeed keeps a reference to it; a destroyed one breaks it).
    training.ensure_process_group()
    config_recorded = False

    def report(metrics: dict, checkpoint_dir: str) -> None:
        nonlocal config_recorded
        if not config_recorded:
            # Recorded once this attempt has trained an epoch, not when it starts: an attempt PBT
            # starts after the trial's last epoch trains nothing, and its config is not the trial's.
            record_trained_config(tracker, hyper)
            config_recorded = True
        # The values this epoch trained with: PBT changes them between epochs.
        tracker.log_metrics({f"hyper/{name}": value for name, value in hyper.items()}, int(metrics["epoch"]))
        tracker.flush()
        ray.tune.report(trial.ranking.ranked(metrics), checkpoint=ray.tune.Checkpoint.from_directory(checkpoint_dir))

    finetune.fit_classifier(_classifier_run(trial, hyper, tracker.run_id), report=report, checkpoint=checkpoint)
    # A trial the scheduler stops never gets here; `_summarise` ends its run after the sweep.
    tracker.close("FINISHED")


def run_distributed_trial(hyper: dict, setup: dict) -> None:
    """One trial as a TorchTrainer of `workers` ranks; a retried or restored trial's trainer
    continues from its own last checkpoint (same name and storage)."""
    hyper = plain(hyper)
    trial = TrialSetup.model_validate(setup)
    name = _trial_name()
    tracker = open_trial_run(trial, name, hyper)
    record_trained_config(tracker, hyper)  # PBT, the one scheduler that changes it, runs no such trials
    resources = {"CPU": trial.cpus_per_worker, **({"GPU": trial.gpus_per_worker} if trial.base.use_gpu else {})}
    trainer = training.TorchTrainerWithoutDatasets(
        finetune.train_loop_per_worker,
        train_loop_config=_classifier_run(trial, hyper, tracker.run_id).model_dump(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=trial.workers, use_gpu=trial.base.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=trial.train_storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=[_tune_report_callback(trial.ranking)],
            worker_runtime_env={"env_vars": accelerator.deepspeed_env(trial.base.use_gpu)},
        ),
    )
    trainer.fit()
    tracker.close("FINISHED")


def _tune_report_callback(ranking: Ranking):
    from ray.tune.integration.ray_train import TuneReportCallback

    class RankedReport(TuneReportCallback):
        """Rank 0's metrics, as one-worker trials report them (with RANK_KEY under a tie-break)."""

        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, [ranking.ranked(metrics[0]), *metrics[1:]], checkpoint)

    return RankedReport()


def _trial_name() -> str:
    return ray.tune.get_context().get_trial_name()


def _classifier_run(trial: TrialSetup, hyper: dict, run_id: str) -> finetune.ClassifierRun:
    return trial.base.model_copy(
        update={"hyper": trial.base.hyper.model_copy(update=hyper), "mlflow_run_id": run_id, "resumed": True}
    )


def open_trial_run(trial: TrialSetup, name: str, hyper: dict) -> MlflowTracker:
    """The trial's MLflow run: the one an earlier attempt of this trial opened (a restored sweep,
    a retried trial, a PBT exploit), or a new child of the tune stage's run."""
    tracker, new = open_child_run(
        trial.base.tracking_uri,
        trial.experiment_id,
        name,
        parent_run_id=trial.tune_run_id,
        match={TRIAL_TAG: name},
        tags={
            "ptft.stage": "tune-trial",
            CONFIG_TAG: config_json(hyper),
            "ptft.run_id": trial.pipeline_run_id,
            "ptft.attempts": "1",
            "ptft.trial_status": "running",
        },
    )
    if new or not tracker.params():  # an earlier attempt can be killed between opening it and this
        tracker.log_params(hyper)
    if not new:
        tracker.set_tags({"ptft.trial_status": "running"})
    return tracker


def record_trained_config(tracker: MlflowTracker, hyper: dict) -> None:
    """Tag the run with the config its latest epochs trained with. One that differs from the
    config recorded before is a PBT exploit: counted in `ptft.pbt_exploits`."""
    config = config_json(hyper)
    tags = tracker.tags()
    if tags.get(CONFIG_TAG) != config:
        exploits = str(int(tags.get("ptft.pbt_exploits", "0")) + 1)
        tracker.set_tags({"ptft.pbt_exploits": exploits, CONFIG_TAG: config})


def config_json(hyper: dict) -> str:
    return json.dumps(hyper, sort_keys=True)


# --------------------------------------------------------------------------- after the sweep


def _summarise(results: ray.tune.ResultGrid, cfg: TuneConfig, ctx: StageContext) -> StageResult:
    run_ids = _trial_run_ids(ctx)
    rows = [_trial_row(result, cfg, run_ids) for result in results]
    best = sweep_report.best_row(rows, cfg.mode)
    if best is None:
        errors = [row["error"] for row in rows if row["error"]]
        raise RuntimeError(f"no trial reported {cfg.metric}; first error: {errors[0] if errors else 'none'}")
    _close_trial_runs(ctx.tracking_uri, rows, best)
    params = list(cfg.search_space)
    best_config = dict(best["config"])
    unsampled = [name for name in params if best_config.get(name) is None]
    if unsampled:
        raise RuntimeError(
            f"the best trial {best['trial']} has no value for {', '.join(unsampled)}: its sweep state was lost"
        )
    best_metrics = best["metrics"]
    write_json(ctx.output_dir / "best_config.json", best_config)
    write_json(ctx.output_dir / "trials.json", rows)
    write_json(ctx.output_dir / "metrics.json", best_metrics)
    sweep_report.write_csv(rows, params, cfg.metric, ctx.output_dir / "trials.csv")
    log_scale = {name for name, dist_ in cfg.search_space.items() if dist_.type == "loguniform"}
    sweep_report.plot(rows, params, cfg.metric, log_scale, best["trial"], ctx.output_dir / "sweep.png")
    tracker = MlflowTracker(ctx.tracking_uri, ctx.mlflow_run_id)
    tracker.log_artifacts([ctx.output_dir / "trials.csv"])
    plots.log(tracker, [ctx.output_dir / "sweep.png"])
    tracker.set_tags({"ptft.best_trial": best["trial"], "ptft.best_trial_run_id": best["mlflow_run_id"] or ""})
    counts = ", ".join(
        f"{sum(row['status'] == status for row in rows)} {status}" for status in ("completed", "stopped_early", "error")
    )
    epochs = sum(row["epochs"] for row in rows)
    console.show(ctx.stage, None)  # the live table gives way to the final one
    console.say(f"\n== sweep finished ({ctx.stage}): {len(rows)} trials ({counts}), {epochs} trial-epochs")
    console.say(sweep_report.format_table(rows, params, cfg.metric, best=best["trial"]))
    log.info("tune: best %s with %s=%.4f", best_config, cfg.metric, best["metric"])
    metrics = {f"best/{key}": value for key, value in best_metrics.items()}
    metrics.update({f"best/{key}": value for key, value in best_config.items()})
    metrics.update(
        {
            "tune/trials": len(rows),
            "tune/trials_completed": sum(row["status"] == "completed" for row in rows),
            "tune/trials_stopped_early": sum(row["status"] == "stopped_early" for row in rows),
            "tune/trials_errored": sum(row["status"] == "error" for row in rows),
            "tune/trial_epochs": sum(row["epochs"] for row in rows),
        }
    )
    return StageResult(
        output_uri=str(ctx.output_dir),
        metrics=metrics,
        outputs={"best_config": best_config, "best_trial": best["trial"]},
    )


def _trial_run_ids(ctx: StageContext) -> dict[str, str]:
    """Trial name -> its MLflow run, for every child run of the tune stage's run."""
    children = child_run_tags(ctx.tracking_uri, ctx.experiment_id, ctx.mlflow_run_id)
    return {tags[TRIAL_TAG]: run_id for run_id, tags in children.items() if TRIAL_TAG in tags}


def _trial_row(result: ray.tune.Result, cfg: TuneConfig, run_ids: dict[str, str]) -> dict:
    last = result.metrics or {}
    judged = judged_epoch(_history(result), last, cfg)
    # A trial's folder is named "<trial name>_<index>_<params>_<date>".
    folder = Path(result.path).name
    name = next((name for name in run_ids if folder.startswith(f"{name}_")), folder)
    epochs = int(last.get("epoch", 0))
    status = "error" if result.error else sweep_report.ended_status(last, cfg.max_epochs)
    return {
        "trial": name,
        "status": status,
        "epochs": epochs,
        "best_epoch": int(judged.get("epoch", epochs)),
        "metric": judged.get(cfg.metric),
        "rank": Ranking.of(cfg).value(judged),
        # A trial that errored before it started (its process killed) has no config.
        "config": plain({key: (result.config or {}).get(key) for key in cfg.search_space}),
        "metrics": {  # left out: the config/* columns (the config is above), NaN (a key this epoch lacked)
            key: value
            for key, value in judged.items()
            if finite(value) and "/" in key and key != RANK_KEY and not key.startswith("config/")
        },
        "error": str(result.error) if result.error else None,
        "mlflow_run_id": run_ids.get(name),
        "path": result.path,
    }


def _history(result: ray.tune.Result) -> list[dict]:
    """Every epoch's result of a trial, oldest first (empty when Tune kept none), from both of
    Tune's logs. Tune reads result.json alone, but when it restarts a paused or restored trial it
    first copies each log back from storage, and that copy has lost a line of result.json that
    progress.csv kept (a fresh-clone run of tests/integration/test_sweeps.py): an epoch missing
    there could have been the trial's best."""
    frame = result.metrics_dataframe
    logged = [] if frame is None else frame.to_dict("records")
    by_epoch = {}
    for row in [*_progress_rows(result), *logged]:  # where both logs hold an epoch, result.json (Tune's read) wins
        if finite(row.get("epoch")):
            by_epoch[int(row["epoch"])] = row
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _progress_rows(result: ray.tune.Result) -> list[dict]:
    """The rows of a trial's progress.csv; none when it is missing or unreadable (it only fills gaps)."""
    import pandas as pd

    try:
        with result.filesystem.open_input_stream(f"{result.path}/progress.csv") as stream:
            return pd.read_csv(stream, dtype={"trial_id": str}).to_dict("records")
    except (OSError, ValueError) as error:  # pandas' parser and empty-data errors are ValueErrors
        log.debug("tune: no progress.csv rows for %s: %s", result.path, error)
        return []


def judged_epoch(history: list[dict], last: dict, cfg: TuneConfig) -> dict:
    """The result a trial is ranked on: its best epoch, i.e. what its config reached, however long
    the scheduler let it run. Ranked on their last epochs, a trial that ran three epochs and overfit
    in the third lost to trials stopped after their first. Epochs equal on the metric are ordered
    by the tie-break, if any. Under PBT a trial's epochs ran under several configs and only the
    last is its own: the last epoch.

    The history is read back from the trial's result file, the last result from Tune's own state;
    when the file lacks the last epoch (its line lost to a restore), that epoch still competes."""
    scored = [row for row in history if finite(row.get(cfg.metric))]
    if cfg.scheduler == "pbt" or not scored:
        return last
    if finite(last.get(cfg.metric)) and all(row.get("epoch") != last.get("epoch") for row in scored):
        scored.append(last)
    pick = max if cfg.mode == "max" else min
    return pick(scored, key=Ranking.of(cfg).value)  # the earliest of equals


def _close_trial_runs(tracking_uri: str, rows: list[dict], best: dict) -> None:
    """Tag every trial run with its outcome and end the ones still open: stopped by the scheduler
    (their function never returned), failed, or KILLED when a dead driver's sweep was resumed."""
    for row in rows:
        run_id = row["mlflow_run_id"]
        if not run_id:
            continue
        tracker = MlflowTracker(tracking_uri, run_id, owns_run=True)
        tracker.set_tags(
            {
                "ptft.trial_status": row["status"],
                "ptft.trial_epochs": str(row["epochs"]),
                "ptft.best_trial": str(row["trial"] == best["trial"]).lower(),
            }
        )
        if tracker.status() != "FINISHED" or row["status"] == "error":
            tracker.close("FAILED" if row["status"] == "error" else "FINISHED")
