"""Stage 3, tune: Ray Tune over learning rate and regularization with ASHA early stopping.

Each trial runs the fine-tuning loop (`finetune.fit_classifier`, imported, not copied) in its
own process on a one-rank DeepSpeed group, reports validation loss and accuracy every epoch,
and is tracked as a grandchild MLflow run under the tune stage's run.

Output folder:
    best_config.json   the best trial's hyperparameters (finetune reads it)
    trials.json        every trial: hyperparameters, last metrics, epochs run, status
    metrics.json       the best trial's metrics
"""

from __future__ import annotations

import logging
from pathlib import Path

import ray.tune
import torch.distributed as dist
from mlflow.tracking import MlflowClient
from pydantic import BaseModel
from ray.tune.schedulers import ASHAScheduler

from components import finetune, training
from components.configs import DeepSpeedConfig, Distribution, Hyperparameters, TuneConfig
from components.stage import StageContext, StageResult, read_json, write_json
from components.tracking import PARENT_TAG, MlflowTracker, find_run, reopen_run, start_run

log = logging.getLogger(__name__)


def to_tune(dist_: Distribution):
    """The Ray Tune sampler for a search dimension."""
    if dist_.type == "choice":
        return ray.tune.choice(dist_.values)
    return (ray.tune.loguniform if dist_.type == "loguniform" else ray.tune.uniform)(dist_.low, dist_.high)


class _TrialSetup(BaseModel):
    """What every trial shares, handed to Ray as a dict."""

    base: finetune.ClassifierRun
    tune_run_id: str
    experiment_id: str
    pipeline_run_id: str


def run(
    cfg: TuneConfig, pretrained_uri: str, tokenized_uri: str, defaults: Hyperparameters,
    deepspeed: DeepSpeedConfig, ctx: StageContext,
) -> StageResult:  # fmt: skip
    """Search hyperparameters; write best_config.json under ctx.output_dir."""
    setup = _TrialSetup(
        base=finetune.ClassifierRun(
            pretrained_dir=pretrained_uri, task_dir=f"{tokenized_uri}/task",
            label_names=read_json(Path(tokenized_uri) / "labels.json"), epochs=cfg.max_epochs,
            hyper=defaults, deepspeed=deepspeed, threads=max(1, int(cfg.cpus_per_trial)),
            use_gpu=cfg.gpus_per_trial > 0,
            tracking_uri=ctx.tracking_uri, seed=ctx.seed,
        ),
        tune_run_id=ctx.mlflow_run_id, experiment_id=ctx.experiment_id, pipeline_run_id=ctx.pipeline_run_id,
    )  # fmt: skip
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, setup=setup.model_dump()),
                                        {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})  # fmt: skip
    experiment = Path(ctx.ray_storage()) / ctx.ray_run_name()
    if ray.tune.Tuner.can_restore(experiment):
        # The same pipeline run was interrupted mid-sweep: finished trials stay finished, the rest
        # continue from their last checkpoint.
        log.info("tune: continuing the interrupted sweep at %s", experiment)
        tuner = ray.tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)  # fmt: skip
    else:
        tuner = _new_tuner(cfg, trainable, ctx)
    results = tuner.fit()
    _close_trial_runs(results, ctx)
    return _write_outputs(results, cfg, ctx)


def _new_tuner(cfg: TuneConfig, trainable, ctx: StageContext) -> ray.tune.Tuner:
    return ray.tune.Tuner(
        trainable,
        param_space={name: to_tune(dist_) for name, dist_ in cfg.search_space.items()},
        tune_config=ray.tune.TuneConfig(
            metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples,
            max_concurrent_trials=cfg.max_concurrent_trials,
            scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.max_epochs, grace_period=cfg.grace_period,
                                    reduction_factor=cfg.reduction_factor),
        ),
        run_config=ray.tune.RunConfig(storage_path=ctx.ray_storage(), name=ctx.ray_run_name(),
                                      checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=1),
                                      failure_config=ray.tune.FailureConfig(max_failures=cfg.trial_max_failures)),
    )  # fmt: skip


def run_trial(hyper: dict, setup: dict) -> None:
    """One Tune trial: the fine-tuning loop with these hyperparameters, tracked as a grandchild run."""
    trial = _TrialSetup.model_validate(setup)
    client = MlflowClient(trial.base.tracking_uri)
    trial_name = ray.tune.get_context().get_trial_name()
    checkpoint = ray.tune.get_checkpoint()
    run_id = _trial_run(client, trial, trial_name)
    tracker = MlflowTracker(trial.base.tracking_uri, run_id, owns_run=True)
    tracker.log_params(hyper)
    run_cfg = trial.base.model_copy(update={"hyper": trial.base.hyper.model_copy(update=hyper),
                                            "mlflow_run_id": run_id, "resumed": True})  # fmt: skip
    created_group = training.ensure_process_group()
    try:
        finetune.fit_classifier(run_cfg, report=_report_to_tune, checkpoint=checkpoint)
        tracker.close("FINISHED")
    finally:
        # A trial ASHA stops may never get here; `_close_trial_runs` ends its run after the sweep.
        if created_group:
            dist.destroy_process_group()


def _report_to_tune(metrics: dict, checkpoint_dir: str) -> None:
    ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(checkpoint_dir))


def _trial_run(client: MlflowClient, trial: _TrialSetup, trial_name: str) -> str:
    """The trial's MLflow run: the one an earlier attempt of this trial opened (a restored sweep,
    a restarted trial), or a new grandchild run under the tune stage's run."""
    tags = {"ptft.trial": trial_name, PARENT_TAG: trial.tune_run_id}
    existing = find_run(client, trial.experiment_id, tags)
    if existing:
        reopen_run(client, existing)
        return existing
    return start_run(client, trial.experiment_id, trial_name, parent_run_id=trial.tune_run_id,
                     tags={"ptft.stage": "tune-trial", "ptft.trial": trial_name,
                           "ptft.run_id": trial.pipeline_run_id, "ptft.attempts": "1"})  # fmt: skip


def _close_trial_runs(results: ray.tune.ResultGrid, ctx: StageContext) -> None:
    """End trial runs the sweep left open: stopped early by ASHA (never returned), failed, or
    marked KILLED when a dead driver's sweep was resumed. None stays RUNNING forever."""
    client = MlflowClient(ctx.tracking_uri)
    errors = {Path(result.path).name: result.error for result in results}
    open_runs = client.search_runs(
        [ctx.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{ctx.mlflow_run_id}' and attributes.status != 'FINISHED'",
    )
    for trial_run in open_runs:
        if trial_run.info.status == "FAILED":
            continue
        failed = any(name.startswith(trial_run.info.run_name) and error for name, error in errors.items())
        client.set_tag(trial_run.info.run_id, "ptft.trial_status", "error" if failed else "stopped_early")
        client.set_terminated(trial_run.info.run_id, status="FAILED" if failed else "FINISHED")


def _write_outputs(results: ray.tune.ResultGrid, cfg: TuneConfig, ctx: StageContext) -> StageResult:
    best = results.get_best_result(metric=cfg.metric, mode=cfg.mode, scope="all")
    trials = [_trial_row(result, cfg) for result in results]
    best_config = {name: best.config[name] for name in cfg.search_space}
    best_metrics = {key: value for key, value in best.metrics.items()
                    if isinstance(value, (int, float)) and "/" in key}  # fmt: skip
    write_json(ctx.output_dir / "best_config.json", best_config)
    write_json(ctx.output_dir / "trials.json", trials)
    write_json(ctx.output_dir / "metrics.json", best_metrics)
    failed = [row for row in trials if row["status"] == "ERROR"]
    if len(failed) == len(trials):
        raise RuntimeError(f"every trial failed; first error: {failed[0]['error']}")
    log.info("tune: best %s with %s=%.4f", best_config, cfg.metric, best.metrics[cfg.metric])
    metrics = {f"best/{key}": value for key, value in best_metrics.items()}
    metrics.update({f"best/{key}": value for key, value in best_config.items()})
    metrics["tune/trials"] = len(trials)
    metrics["tune/trials_stopped_early"] = sum(row["epochs"] < cfg.max_epochs for row in trials)
    return StageResult(output_uri=str(ctx.output_dir), metrics=metrics, outputs={"best_config": best_config})


def _trial_row(result: ray.tune.Result, cfg: TuneConfig) -> dict:
    metrics = result.metrics or {}
    return {
        "config": {name: result.config.get(name) for name in cfg.search_space},
        "epochs": int(metrics.get("epoch", 0)),
        cfg.metric: metrics.get(cfg.metric),
        "status": "ERROR" if result.error else "TERMINATED",
        "error": str(result.error) if result.error else None,
        "path": result.path,
    }
