"""Sweep declarations: search spaces, schedulers and searchers, checked before anything runs; the
Tune objects they become; the finetune hand-off; the sweep's table and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.schemas import Distribution, FinetuneConfig, Hyperparameters, TuneConfig
from components.tune import judged_epoch
from pipelines.pipeline_config import ConfigError, apply_overrides, validate
from tests.conftest import REPO, tiny_config_dict


def _problems(raw: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        validate(raw)
    return {problem.key: str(problem) for problem in info.value.problems}


def _with_tune(tmp_path: Path, tune: dict, finetune: dict | None = None) -> dict:
    raw = tiny_config_dict(tmp_path)
    raw["tune"] = tune
    if finetune is not None:
        raw["finetune"] = finetune
    return raw


@pytest.mark.parametrize(
    "space, key, words",
    [
        ({"learning_rate": {"type": "loguniform", "low": -1e-4, "high": 1e-3}}, "learning_rate", "low > 0"),
        ({"weight_decay": {"type": "uniform", "low": 0.1, "high": 0.01}}, "weight_decay", "low < high"),
        ({"dropout": {"type": "uniform", "low": 0.0, "high": 1.5}}, "dropout", "less than 1"),
        ({"attention_dropout": {"type": "grid", "values": [0.1, 2]}}, "attention_dropout", "less than 1"),
        ({"label_smoothing": {"type": "choice", "values": []}}, "label_smoothing", "non-empty"),
        ({"warmup_ratio": {"type": "uniform", "low": 0.0, "high": 0.2, "values": [0.1]}}, "warmup_ratio", "values"),
        ({"batch_size_per_worker": {"type": "uniform", "low": 8, "high": 32}}, "batch_size_per_worker", "integer"),
        ({"batch_size_per_worker": {"type": "choice", "values": [8, 12.5]}}, "batch_size_per_worker", "integer"),
        ({"batch_size_per_worker": {"type": "grid", "values": [0, 8]}}, "batch_size_per_worker", "greater than 0"),
        ({"momentum": {"type": "uniform", "low": 0.0, "high": 1.0}}, "momentum", "learning_rate"),
    ],
)
def test_bad_search_space_names_the_key(tmp_path: Path, space: dict, key: str, words: str) -> None:
    problems = _problems(_with_tune(tmp_path, {"search_space": space}))
    matching = [text for name, text in problems.items() if key in name]
    assert matching, problems
    assert any(words in text for text in matching), matching


def test_every_hyperparameter_is_searchable(tmp_path: Path) -> None:
    space = {
        "learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
        "weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1},
        "dropout": {"type": "grid", "values": [0.0, 0.1]},
        "attention_dropout": {"type": "choice", "values": [0.0, 0.1]},
        "warmup_ratio": {"type": "uniform", "low": 0.0, "high": 0.2},
        "label_smoothing": {"type": "choice", "values": [0.0, 0.1]},
        "batch_size_per_worker": {"type": "choice", "values": [8, 16]},
    }
    assert set(space) == set(Hyperparameters.model_fields)
    config = validate(_with_tune(tmp_path, {"search_space": space}))
    assert config.tune.search_space["dropout"].type == "grid"


def test_searcher_and_scheduler_rules(tmp_path: Path) -> None:
    sampled = {"learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}
    grid_dim = {"dropout": {"type": "grid", "values": [0.0, 0.1]}}
    grid_search = _with_tune(tmp_path, {"search": "grid", "search_space": sampled})
    assert "tune.search_space.learning_rate" in _problems(grid_search)
    optuna_grid = _with_tune(tmp_path, {"search": "optuna", "search_space": grid_dim})
    assert "tune.search_space.dropout" in _problems(optuna_grid)
    problems = _problems(
        _with_tune(
            tmp_path,
            {
                "scheduler": "pbt",
                "search": "optuna",
                "num_samples": 1,
                "max_epochs": 2,
                "pbt_interval": 2,
                "workers_per_trial": 2,
                "search_space": sampled,
            },
        )
    )
    assert {
        "tune.pbt_mutations",
        "tune.search",
        "tune.num_samples",
        "tune.pbt_interval",
        "tune.workers_per_trial",
    } <= set(problems)
    assert "weight_decay" in problems["tune.pbt_mutations"]  # PBT perturbs it, but nothing defines its range
    assert "unknown" not in str(problems)
    synchronous = {"scheduler": "pbt", "pbt_synchronous": True, "num_samples": 4, "pbt_mutations": ["learning_rate"]}
    synchronous["search_space"] = sampled
    problems = _problems(_with_tune(tmp_path, {**synchronous, "max_concurrent_trials": 2}))
    assert set(problems) == {"tune.max_concurrent_trials"}, problems
    assert "set tune.max_concurrent_trials=4" in problems["tune.max_concurrent_trials"]
    assert validate(_with_tune(tmp_path, {**synchronous, "max_concurrent_trials": 4})).tune.pbt_synchronous
    for scheduler, other in (("sha", "tune.scheduler=asha"), ("hyperband", "tune.scheduler=asha")):
        halving = {"scheduler": scheduler, "num_samples": 6, "max_epochs": 4, "search_space": sampled}
        problems = _problems(_with_tune(tmp_path, halving))  # max_concurrent_trials defaults to 2
        assert set(problems) == {"tune.max_concurrent_trials"}, problems
        assert "set tune.max_concurrent_trials=6" in problems["tune.max_concurrent_trials"]
        assert other in problems["tune.max_concurrent_trials"]
        assert validate(_with_tune(tmp_path, {**halving, "max_concurrent_trials": 6})).tune.scheduler == scheduler
    # A grid's trials are every combination, num_samples times: 2 x 3 x 2 = 12 here.
    grid = {**grid_dim, "weight_decay": {"type": "choice", "values": [0.0, 0.01, 0.1]}}
    gridded = {"scheduler": "sha", "search": "grid", "num_samples": 2, "max_epochs": 4, "search_space": grid}
    problems = _problems(_with_tune(tmp_path, {**gridded, "max_concurrent_trials": 6}))
    assert "set tune.max_concurrent_trials=12" in problems["tune.max_concurrent_trials"]
    assert validate(_with_tune(tmp_path, {**gridded, "max_concurrent_trials": 12})).tune.trials() == 12
    assert (
        validate(_with_tune(tmp_path, {**gridded, "search": "random", "max_concurrent_trials": 4})).tune.trials() == 4
    )
    with pytest.raises(ConfigError) as info:
        validate(_with_tune(tmp_path, {"scheduler": "bohb"}))
    assert info.value.problems[0].key == "tune.scheduler"


def test_finetune_overrides_are_checked(tmp_path: Path) -> None:
    raw = tiny_config_dict(tmp_path)
    apply_overrides(raw, ["finetune.overrides.dropout=1.5"])
    (problem,) = _problems(raw).values()
    assert "overrides.dropout" in problem
    raw = tiny_config_dict(tmp_path)
    apply_overrides(raw, ["finetune.overrides.learning_rate=2e-4"])
    assert validate(raw).finetune.overrides == {"learning_rate": 2e-4}


def test_sweep_with_a_bad_search_space_exits_2_before_any_compute(tmp_path: Path) -> None:
    raw = _with_tune(tmp_path, {"search_space": {"dropout": {"type": "uniform", "low": 0.5, "high": 0.1}}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "sweep", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "tune.search_space.dropout" in done.stderr and "low < high" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing started, no run recorded


# --- what the declarations become ------------------------------------------------------------


def test_dimensions_become_tune_domains() -> None:
    from ray.tune.search.sample import Categorical, Float

    from components import tune

    cfg = TuneConfig(
        search_space={
            "learning_rate": Distribution(type="loguniform", low=1e-5, high=1e-3),
            "dropout": Distribution(type="grid", values=[0.0, 0.1, 0.2]),
            "batch_size_per_worker": Distribution(type="choice", values=[8, 16]),
        }
    )
    space = tune.param_space(cfg)
    assert isinstance(space["learning_rate"], Float) and space["learning_rate"].lower == 1e-5
    assert space["dropout"] == {"grid_search": [0.0, 0.1, 0.2]}
    assert isinstance(space["batch_size_per_worker"], Categorical)
    assert all(isinstance(v, int) for v in space["batch_size_per_worker"].categories)  # not 8.0
    grid = tune.param_space(
        cfg.model_copy(
            update={
                "search": "grid",
                "search_space": {"batch_size_per_worker": Distribution(type="choice", values=[8, 16])},
            }
        )
    )
    assert grid["batch_size_per_worker"] == {"grid_search": [8, 16]}


@pytest.mark.parametrize(
    "name, kind",
    [
        ("asha", "AsyncHyperBandScheduler"),
        ("sha", "HyperBandScheduler"),
        ("hyperband", "HyperBandScheduler"),
        ("median", "MedianStoppingRule"),
        ("pbt", "PopulationBasedTraining"),
        ("fifo", "FIFOScheduler"),
    ],
)
def test_schedulers_count_epochs(name: str, kind: str) -> None:
    from components import tune

    scheduler = tune.build_scheduler(TuneConfig(scheduler=name, max_epochs=4))
    assert type(scheduler).__name__ == kind or type(scheduler).__mro__[1].__name__ == kind
    if name != "fifo":
        assert scheduler._time_attr == "epoch"
    if name == "pbt":
        assert set(scheduler._hyperparam_mutations) == {"learning_rate", "weight_decay"}
        assert not scheduler._synch
        assert tune.build_scheduler(TuneConfig(scheduler=name, max_epochs=4, pbt_synchronous=True))._synch


class _Trial:
    """What SynchronousHalving reads of a Tune trial, and what the controller's actions set."""

    def __init__(self, name: str, status: str = "RUNNING"):
        self.trial_id, self.status, self.is_saving = name, status, False

    def __repr__(self) -> str:
        return self.trial_id


class _Controller:
    """Tune's controller as the scheduler meets it: stopping a waiting trial removes it."""

    def __init__(self, scheduler=None):
        self.scheduler = scheduler

    def stop_trial(self, trial: _Trial) -> None:
        if self.scheduler is not None:
            self.scheduler.on_trial_remove(self, trial)
        trial.status = "TERMINATED"


def _run_halving(scheduler, trials: list[_Trial], loss, run_at_once: int = 2) -> dict[str, int]:
    """Drives the scheduler as Tune does with `run_at_once` CPUs: the trials it may run train one
    epoch at a time (loss(trial, epoch)); returns the epochs each trained."""
    from ray.tune.schedulers import TrialScheduler

    controller, epochs = _Controller(scheduler), {trial.trial_id: 0 for trial in trials}
    scheduler.set_search_properties("eval/loss", "min")
    for trial in trials:
        if trial.status != "TERMINATED":
            trial.status = "PENDING"
        scheduler.on_trial_add(controller, trial)
    while True:
        runnable = [t for t in trials if t.status == "PENDING"][:run_at_once]
        runnable += [t for t in trials if t.status == "PAUSED" and scheduler.choose_trial_to_run(controller) is t][:1]
        if not runnable:
            break
        for trial in runnable:
            trial.status = "RUNNING"
            epochs[trial.trial_id] += 1
            result = {"epoch": epochs[trial.trial_id], "eval/loss": loss(trial.trial_id, epochs[trial.trial_id])}
            action = scheduler.on_trial_result(controller, trial, result)
            if action == TrialScheduler.PAUSE:
                trial.status = "PAUSED"
            elif action == TrialScheduler.STOP:
                trial.status = "TERMINATED"
                scheduler.on_trial_complete(controller, trial, result)
            else:
                trial.status = "PENDING"  # continues: trains its next epoch
        for trial in trials:  # a trial the scheduler unpaused is picked to run again
            if trial.status == "PAUSED" and trial in scheduler._state["bracket"].trials_to_unpause:
                trial.status = "PENDING"
    return epochs


def test_synchronous_halving_cuts_once_every_trial_reached_the_rung() -> None:
    """27 trials, grace 1, reduction 4, 9 epochs: all train epoch 1 (two at a time, the others
    waiting paused); the best 7 (27/4 rounded up) train to epoch 4; the best 2 of those to 9.
    A late starter with the best epoch-1 loss is compared with the rest, as ASHA would not."""
    from components import tune

    config = TuneConfig(scheduler="sha", num_samples=27, max_epochs=9, grace_period=1, reduction_factor=4)
    scheduler = tune.build_scheduler(config)
    assert scheduler.halvings() == 2
    trials = [_Trial(f"t{index:02d}") for index in range(27)]

    # t26 starts last and is best at every epoch; otherwise a lower index is better, but t00 and
    # t01 fall behind after epoch 1: the epoch-4 rung ranks the survivors again.
    def loss(name: str, epoch: int) -> float:
        index = int(name[1:])
        if index == 26:
            return 0.1
        if epoch > 1 and index <= 1:
            return 5.0 + index
        return 1.0 + index / 100

    epochs = _run_halving(scheduler, trials, loss)
    assert sum(epochs.values()) == 27 * 1 + 7 * 3 + 2 * 5
    assert {name for name, ran in epochs.items() if ran == 9} == {"t26", "t02"}
    assert {name for name, ran in epochs.items() if ran == 4} == {"t00", "t01", "t03", "t04", "t05"}
    assert all(ran == 1 for name, ran in epochs.items() if int(name[1:]) in range(6, 26))


def test_a_restored_synchronous_sweep_leaves_out_its_ended_trials() -> None:
    """Tune adds a restored sweep's trials back, the ended ones too: those never report again, and
    a bracket waiting for them would pause the live ones for good."""
    from components import tune

    config = TuneConfig(scheduler="sha", num_samples=4, max_epochs=2, grace_period=1, reduction_factor=2)
    scheduler = tune.build_scheduler(config)
    ended, live = _Trial("a", status="TERMINATED"), [_Trial(name) for name in "bcd"]
    epochs = _run_halving(scheduler, [ended, *live], lambda name, epoch: {"b": 0.5, "c": 0.7, "d": 0.9}[name])
    assert epochs == {"a": 0, "b": 2, "c": 2, "d": 1}  # 4 trials planned: the best 2 go on
    scheduler.on_trial_remove(_Controller(), ended)  # Tune may report it removed: nothing to do


def test_a_trial_ending_by_itself_at_the_last_rung_releases_the_ones_waiting_there() -> None:
    """b's function returns after its last epoch, so Tune reports it complete, not a result: a,
    paused at that rung for b, must end too (the integration sweep hung here before)."""
    from ray.tune.schedulers import TrialScheduler

    from components import tune

    scheduler = tune.build_scheduler(
        TuneConfig(scheduler="sha", num_samples=4, max_epochs=2, grace_period=1, reduction_factor=2)
    )
    scheduler.set_search_properties("eval/loss", "min")
    controller = _Controller(scheduler)
    a, b, c, d = trials = [_Trial(name, status="PENDING") for name in "abcd"]
    for trial in trials:
        scheduler.on_trial_add(controller, trial)
    for trial, loss in ((a, 0.1), (b, 0.2), (c, 0.3)):
        trial.status = "RUNNING"
        assert scheduler.on_trial_result(controller, trial, {"epoch": 1, "eval/loss": loss}) == TrialScheduler.PAUSE
        trial.status = "PAUSED"
    d.status = "RUNNING"
    assert scheduler.on_trial_result(controller, d, {"epoch": 1, "eval/loss": 0.4}) == TrialScheduler.STOP
    assert (c.status, a.status, b.status) == ("TERMINATED", "PAUSED", "PAUSED")  # a and b are let on
    a.status = "RUNNING"
    assert scheduler.on_trial_result(controller, a, {"epoch": 2, "eval/loss": 0.05}) == TrialScheduler.PAUSE
    a.status = b.status = "PAUSED"
    scheduler.on_trial_complete(controller, b, {"epoch": 2, "eval/loss": 0.15, "done": True})
    assert a.status == "TERMINATED"


def test_a_trial_restored_past_a_rung_still_sets_its_cutoff() -> None:
    """A sweep resumed after a kill: trial A continues from its epoch-2 checkpoint and ends at
    epoch 3. Stock ASHA records A at the epoch-3 rung only, so trial B, far worse at epoch 1, meets
    an empty epoch-1 rung and runs its whole budget; ResumableASHA stops it."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from components import tune

    def b_at_epoch_1(scheduler) -> str:
        scheduler.set_search_properties("eval/loss", "min")
        restored, weak = SimpleNamespace(trial_id="A"), SimpleNamespace(trial_id="B")
        for trial in (restored, weak):
            scheduler.on_trial_add(None, trial)
        scheduler.on_trial_result(None, restored, {"epoch": 3, "eval/loss": 0.49})
        scheduler.on_trial_complete(None, restored, {"epoch": 3, "eval/loss": 0.49})
        return scheduler.on_trial_result(None, weak, {"epoch": 1, "eval/loss": 2.7})

    config = TuneConfig(scheduler="asha", max_epochs=3, grace_period=1, reduction_factor=3)
    assert b_at_epoch_1(tune.build_scheduler(config)) == TrialScheduler.STOP
    stock = ASHAScheduler(time_attr="epoch", max_t=3, grace_period=1, reduction_factor=3)
    assert b_at_epoch_1(stock) == TrialScheduler.CONTINUE  # what the sweeps test met after a resume

    # An uninterrupted trial is judged as stock ASHA judges it: each rung records its own epoch.
    scheduler = tune.build_scheduler(config)
    scheduler.set_search_properties("eval/loss", "min")
    trial = SimpleNamespace(trial_id="C")
    scheduler.on_trial_add(None, trial)
    for epoch, loss in ((1, 0.9), (2, 0.7)):
        assert scheduler.on_trial_result(None, trial, {"epoch": epoch, "eval/loss": loss}) == TrialScheduler.CONTINUE
    assert [dict(recorded) for _, recorded in scheduler._brackets[0]._rungs] == [{}, {"C": -0.9}]


def test_a_trial_that_ended_before_the_kill_enters_its_rungs_when_added_back() -> None:
    """A resumed sweep adds back trial A, which had ended (3 epochs) before the kill and reports
    nothing more: its epoch-1 loss still sets the cutoff that stops B, far worse at epoch 1."""
    from collections import deque
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from components import tune

    def b_at_epoch_1(scheduler) -> str:
        scheduler.set_search_properties("eval/loss", "min")
        history = deque([0.71, 0.6, 0.55], maxlen=10)
        metadata = SimpleNamespace(
            last_result={"epoch": 3, "eval/loss": 0.55}, metric_n_steps={"eval/loss": {"10": history}}
        )
        ended, weak = SimpleNamespace(trial_id="A", run_metadata=metadata), SimpleNamespace(trial_id="B")
        for trial in (ended, weak):
            scheduler.on_trial_add(None, trial)
        return scheduler.on_trial_result(None, weak, {"epoch": 1, "eval/loss": 7.0})

    config = TuneConfig(scheduler="asha", max_epochs=3, grace_period=1, reduction_factor=2)
    scheduler = tune.build_scheduler(config)
    assert b_at_epoch_1(scheduler) == TrialScheduler.STOP
    assert {milestone: dict(recorded)["A"] for milestone, recorded in scheduler._brackets[0]._rungs} == {
        2: -0.6,
        1: -0.71,
    }
    stock = ASHAScheduler(time_attr="epoch", max_t=3, grace_period=1, reduction_factor=2)
    assert b_at_epoch_1(stock) == TrialScheduler.CONTINUE


def test_optuna_searcher_is_tpe() -> None:
    from components import tune

    searcher = tune.build_searcher(TuneConfig(search="optuna"), seed=3)
    assert type(searcher).__name__ == "OptunaSearch"
    assert type(searcher._sampler).__name__ == "TPESampler"


# --- hand-off to finetune --------------------------------------------------------------------


def test_finetune_takes_the_best_config_and_its_overrides_win(tmp_path: Path, caplog) -> None:
    from components.finetune import resolve_hyperparameters
    from components.stage import write_json

    write_json(tmp_path / "best_config.json", {"learning_rate": 3e-4, "dropout": 0.05, "batch_size_per_worker": 16})
    cfg = FinetuneConfig(
        defaults=Hyperparameters(weight_decay=0.02), overrides={"dropout": 0.2, "label_smoothing": 0.1}
    )
    with caplog.at_level("INFO"):
        hyper, sources = resolve_hyperparameters(cfg.defaults, str(tmp_path), cfg.overrides)
    assert hyper.learning_rate == 3e-4 and hyper.dropout == 0.2 and hyper.label_smoothing == 0.1
    assert hyper.weight_decay == 0.02 and isinstance(hyper.batch_size_per_worker, int)
    assert sources == {
        "learning_rate": "tune",
        "dropout": "override",
        "label_smoothing": "override",
        "batch_size_per_worker": "tune",
        "weight_decay": "default",
        "attention_dropout": "default",
        "warmup_ratio": "default",
    }
    assert "0.05 -> 0.2" in caplog.text  # the tuned value it overrode
    # Trials train with the overrides too, for every value they do not sample.
    assert cfg.trial_defaults().label_smoothing == 0.1 and cfg.trial_defaults().weight_decay == 0.02


def test_exploited_optimizer_gets_the_new_learning_rate_and_decay() -> None:
    import torch

    from components import training

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(training._param_groups(model, 0.01), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, training.lr_schedule("linear", 0, 10))
    for _ in range(5):
        optimizer.step()
        scheduler.step()

    class Engine:
        lr_scheduler = scheduler

    training.set_optimizer_hyperparameters(Engine(), learning_rate=4e-3, weight_decay=0.05)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-3 * 0.5)  # same point of the schedule
    assert optimizer.param_groups[0]["weight_decay"] == 0.05 and optimizer.param_groups[1]["weight_decay"] == 0.0
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-3 * 0.4)


# --- table and plot --------------------------------------------------------------------------


def _rows() -> list[dict]:
    return [
        {"trial": "t1", "status": "completed", "epochs": 3, "metric": 0.8, "config": {"learning_rate": 1e-3}},
        {"trial": "t2", "status": "stopped_early", "epochs": 1, "metric": 0.6, "config": {"learning_rate": 1e-5}},
        {"trial": "t3", "status": "error", "epochs": 0, "metric": None, "config": {"learning_rate": 1e-4}},
    ]


def test_table_marks_the_best_trial_and_plot_renders(tmp_path: Path) -> None:
    from components import sweep_report

    rows = _rows()
    assert sweep_report.best_row(rows, "max")["trial"] == "t1"
    assert sweep_report.best_row(rows, "min")["trial"] == "t2"
    table = sweep_report.format_table(rows, ["learning_rate"], "eval/accuracy", best="t1").splitlines()
    assert table[0].split()[:4] == ["trial", "status", "epochs", "eval/accuracy"]
    assert table[1].startswith("* t1") and "stopped_early" in table[2] and table[3].split()[3] == "-"
    sweep_report.write_csv(rows, ["learning_rate"], "eval/accuracy", tmp_path / "trials.csv")
    assert (tmp_path / "trials.csv").read_text().splitlines()[2].startswith("t2,stopped_early,1,0.6,1e-05")
    sweep_report.plot(rows, ["learning_rate"], "eval/accuracy", {"learning_rate"}, "t1", tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_grid_runs_once_unless_num_samples_repeats_it() -> None:
    grid = {"dropout": Distribution(type="grid", values=[0.0, 0.1])}
    assert TuneConfig(search_space=grid).samples() == 1
    assert TuneConfig(search_space=grid, num_samples=3).samples() == 3
    assert TuneConfig().samples() == 4  # sampled dimensions only


def test_a_sweep_state_truncated_by_a_kill_is_not_restored(tmp_path: Path) -> None:
    """Tune copies its state to storage file by file: a driver killed during a copy leaves a
    truncated file, and Tune's own restore would carry on with trials that lost their configs."""
    import ray.cloudpickle as cloudpickle

    from components import tune

    experiment = tmp_path / "run-tune"
    experiment.mkdir()
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": []}))
    (experiment / "tuner.pkl").write_bytes(cloudpickle.dumps({"param_space": {}}))
    (experiment / "basic-variant-state-2026-01-01_00-00-00.json").write_bytes(cloudpickle.dumps({"grid": 4}))
    assert tune.unreadable_sweep_state(experiment) == []
    assert tune._restorable(experiment) and experiment.is_dir()

    (experiment / "basic-variant-state-2026-01-01_00-00-00.json").write_bytes(b"")
    (broken,) = tune.unreadable_sweep_state(experiment)
    assert broken.startswith("basic-variant-state-2026-01-01_00-00-00.json (EOFError")
    assert not tune._restorable(experiment)
    assert not experiment.exists()  # moved aside: the sweep starts over in a fresh folder, the old kept
    (kept,) = tmp_path.glob("run-tune.unrestorable-*")
    assert (kept / "tuner.pkl").is_file()


def test_a_sweep_stopped_before_its_first_trial_starts_over(tmp_path: Path) -> None:
    """Tune writes tuner.pkl before any trial: restoring only that runs one trial without a config."""
    import ray.cloudpickle as cloudpickle

    from components import tune

    experiment = tmp_path / "run-tune"
    experiment.mkdir()
    (experiment / "tuner.pkl").write_bytes(cloudpickle.dumps({"param_space": {}}))
    assert not tune._restorable(experiment)
    (kept,) = tmp_path.glob("run-tune.unstarted-*")
    assert (kept / "tuner.pkl").is_file() and not experiment.exists()


def _sweep(**fields) -> TuneConfig:
    return TuneConfig(metric="eval/accuracy", **fields)


HISTORY = [
    {"epoch": 1, "eval/accuracy": 0.70, "eval/loss": 0.60},
    {"epoch": 2, "eval/accuracy": 0.82, "eval/loss": 0.45},
    {"epoch": 3, "eval/accuracy": 0.78, "eval/loss": 0.52},  # overfit
]


def test_a_trial_is_ranked_on_its_best_epoch() -> None:
    judged = judged_epoch(HISTORY, HISTORY[-1], _sweep())
    assert judged["epoch"] == 2 and judged["eval/accuracy"] == 0.82
    by_loss = judged_epoch(HISTORY, HISTORY[-1], TuneConfig(metric="eval/loss"))
    assert by_loss["epoch"] == 2


def test_under_pbt_or_without_a_history_the_last_epoch_counts() -> None:
    assert judged_epoch(HISTORY, HISTORY[-1], _sweep(scheduler="pbt"))["epoch"] == 3
    assert judged_epoch([], HISTORY[-1], _sweep()) is HISTORY[-1]
    unscored = [{"epoch": 1, "eval/accuracy": float("nan")}]
    assert judged_epoch(unscored, HISTORY[-1], _sweep())["epoch"] == 3


def test_a_last_epoch_missing_from_the_history_still_competes() -> None:
    """The history comes from the trial's result file, the last result from Tune's state; a line
    the file lost must not cost the trial its best epoch."""
    best_last = {"epoch": 4, "eval/accuracy": 0.90, "eval/loss": 0.40}
    assert judged_epoch(HISTORY, best_last, _sweep())["epoch"] == 4
    assert judged_epoch(HISTORY, {**best_last, "eval/accuracy": 0.5}, _sweep())["epoch"] == 2
    assert judged_epoch(HISTORY, {"epoch": 4, "eval/accuracy": float("nan")}, _sweep())["epoch"] == 2


def test_an_epoch_lost_from_result_json_is_read_from_progress_csv(tmp_path: Path) -> None:
    """Tune reads a trial's history from result.json alone; a restore has lost a line of it that
    progress.csv kept. The trial is still ranked on its best epoch, the one only the CSV holds."""
    import csv

    import pandas as pd
    from ray.tune import Result

    from components.tune import _trial_row

    trial = tmp_path / "trial_1_lr=0.01"
    trial.mkdir()
    with open(trial / "progress.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, ["epoch", "eval/accuracy", "eval/loss", "config/learning_rate", "trial_id"])
        writer.writeheader()
        writer.writerows({**row, "config/learning_rate": 0.01, "trial_id": "0001"} for row in HISTORY)
    # result.json lost epoch 2, the best; its epoch 1 has a key the others lack (a restored epoch).
    kept = [{**HISTORY[0], "restore/loaded_epoch": 0}, HISTORY[2]]
    result = Result(
        metrics={**HISTORY[2], "config": {"learning_rate": 0.01}},
        checkpoint=None,
        error=None,
        path=str(trial),
        metrics_dataframe=pd.DataFrame(kept),
    )
    cfg = _sweep(search_space={"learning_rate": {"type": "choice", "values": [0.01]}}, max_epochs=3)
    row = _trial_row(result, cfg, {"trial": "run-1"})
    assert (row["best_epoch"], row["metric"], row["epochs"]) == (2, 0.82, 3)
    assert row["metrics"] == {"eval/accuracy": 0.82, "eval/loss": 0.45}
    # Without the CSV the lost epoch cannot compete: the pick falls back to what result.json kept.
    (trial / "progress.csv").unlink()
    fallback = _trial_row(result, cfg, {"trial": "run-1"})
    assert fallback["best_epoch"] == 3
    assert fallback["metrics"] == {"eval/accuracy": 0.78, "eval/loss": 0.52}  # not the NaN Tune's table fills in


def test_every_metric_a_task_type_reports_can_be_written_in_a_config() -> None:
    """A resumed run validates its saved config again, the filled-in tune.metric included: one the
    schema did not list (eval/bleu) made `ptft resume` of a translation run exit 2."""
    from components.tasks import TASK_TYPES

    for kind in TASK_TYPES.values():
        for name in kind.reports:
            assert TuneConfig(metric=f"eval/{name}").metric == f"eval/{name}"


def test_the_trial_table_is_printed_while_no_trial_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long first epoch reports nothing for minutes; the log still gets the table, but not on
    every turn of Tune's loop."""
    import io
    from types import SimpleNamespace

    from components import sweep_report

    clock = [1000.0]
    monkeypatch.setattr(sweep_report.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    table = sweep_report.TrialTable(["learning_rate"], "eval/loss", "min", every_s=10, stream=out)
    table.on_step_end(0, [])
    assert out.getvalue() == ""  # no trial made yet: nothing to show
    trials = [SimpleNamespace(last_result={}, status="RUNNING", config={"learning_rate": 0.003})]
    table.on_step_end(0, trials)
    assert out.getvalue().count("== sweep progress after 0 s: 1 running") == 1
    for seconds in (10, 30, 59):  # results would print every 10 s; silence prints every 60 s
        clock[0] = 1000.0 + seconds
        table.on_step_end(1, trials)
    assert out.getvalue().count("== sweep progress") == 1
    clock[0] = 1061.0
    table.on_step_end(2, trials)
    assert "== sweep progress after 61 s: 1 running" in out.getvalue()
    assert "0.003" in out.getvalue().splitlines()[-1]


def test_the_trial_table_printed_at_a_result_shows_that_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune calls the callbacks' on_trial_result before it stores the result as the trial's
    last_result (ray.tune TuneController._process_trial_result): a table built from last_result
    alone showed every trial at epoch 0 with no metric, a result behind."""
    import io
    from types import SimpleNamespace

    from components import sweep_report

    monkeypatch.setattr(sweep_report.console, "is_live", lambda: False)
    out = io.StringIO()
    table = sweep_report.TrialTable(["learning_rate"], "eval/loss", "min", every_s=10, stream=out)
    trial = SimpleNamespace(last_result={}, status="RUNNING", config={"learning_rate": 0.003})
    table.on_trial_result(1, [trial], trial, {"epoch": 1, "eval/loss": 0.7104})
    (row,) = [line for line in out.getvalue().splitlines() if "0.003" in line]
    assert row.split()[-4:] == ["running", "1", "0.7104", "0.003"], out.getvalue()  # status, epochs, loss, lr


def test_the_live_table_tells_completed_trials_from_stopped_ones_as_the_final_table_does() -> None:
    from types import SimpleNamespace

    from components import sweep_report

    def trial(lr: float, status: str, last: dict) -> SimpleNamespace:
        return SimpleNamespace(last_result=last, status=status, config={"learning_rate": lr})

    trials = [
        trial(0.001, "TERMINATED", {"epoch": 3, "eval/loss": 0.5}),  # every epoch
        trial(0.002, "TERMINATED", {"epoch": 2, "eval/loss": 0.6, "early_stop/epoch": 2}),  # stopped itself
        trial(0.3, "TERMINATED", {"epoch": 1, "eval/loss": 7.0}),  # stopped by the scheduler
        trial(1.0, "ERROR", {"epoch": 1, "eval/loss": 9.0}),
        trial(3.0, "RUNNING", {"epoch": 1, "eval/loss": 8.0}),
    ]
    table = sweep_report.TrialTable(["learning_rate"], "eval/loss", "min", every_s=10, max_epochs=3)
    statuses = [row["status"] for row in table._rows(trials)]
    assert statuses == ["completed", "completed", "stopped_early", "error", "running"]


def test_ties_on_the_metric_are_broken_by_the_tie_break() -> None:
    """Accuracy on a small validation split ties often, and ASHA keeps every trial tied at a rung's
    cutoff; with a tie-break equal accuracies are ordered by it, different ones never reordered."""
    from components import sweep_report
    from components.tune import RANK_KEY, Ranking

    by_accuracy = Ranking(metric="eval/accuracy", mode="max", tie_break="eval/loss")
    lower_loss = by_accuracy.value({"eval/accuracy": 0.66, "eval/loss": 0.9})
    higher_loss = by_accuracy.value({"eval/accuracy": 0.66, "eval/loss": 1.7})
    one_in_a_million_better = by_accuracy.value({"eval/accuracy": 0.66 + 1e-6, "eval/loss": 1e6})
    assert higher_loss < lower_loss < one_in_a_million_better
    by_loss = Ranking(metric="eval/loss", mode="min", tie_break="eval/accuracy")
    assert by_loss.value({"eval/loss": 0.5, "eval/accuracy": 0.9}) < by_loss.value(
        {"eval/loss": 0.5, "eval/accuracy": 0.8}
    )
    assert by_accuracy.value({"eval/accuracy": 0.66}) == 0.66  # no tie-break value: the metric alone
    assert RANK_KEY in by_accuracy.ranked({"eval/accuracy": 0.66, "eval/loss": 0.9})
    assert Ranking(metric="eval/accuracy", mode="max").ranked({"eval/accuracy": 0.66}) == {"eval/accuracy": 0.66}

    tied = [
        {"epoch": 1, "eval/accuracy": 0.82, "eval/loss": 0.60},
        {"epoch": 2, "eval/accuracy": 0.82, "eval/loss": 0.45},
        {"epoch": 3, "eval/accuracy": 0.80, "eval/loss": 0.30},
    ]
    assert judged_epoch(tied, tied[-1], _sweep())["epoch"] == 1  # without: the earliest of equals
    assert judged_epoch(tied, tied[-1], _sweep(tie_break="eval/loss"))["epoch"] == 2
    rows = [
        {"trial": "t1", "metric": 0.82, "rank": by_accuracy.value(tied[0])},
        {"trial": "t2", "metric": 0.82, "rank": by_accuracy.value(tied[1])},
    ]
    assert sweep_report.best_row(rows, "max")["trial"] == "t2"

    # The live table marks the same trial: its rows take the rank each result carries.
    from types import SimpleNamespace

    live = [
        SimpleNamespace(last_result=by_accuracy.ranked(result), status="RUNNING", config={}, trial_id=name)
        for name, result in (("t1", tied[0]), ("t2", tied[1]))
    ]
    table = sweep_report.TrialTable([], "eval/accuracy", "max", every_s=10)
    assert sweep_report.best_row(table._rows(live), "max")["rank"] == by_accuracy.value(tied[1])


def test_a_tie_break_is_another_metric_the_task_reports(tmp_path: Path) -> None:
    assert validate(_with_tune(tmp_path, {"tie_break": "eval/loss"})).tune.tie_break == "eval/loss"
    problems = _problems(_with_tune(tmp_path, {"tie_break": "eval/f1"}))
    assert "reports eval/loss, eval/accuracy, not eval/f1" in problems["tune.tie_break"], problems
    problems = _problems(_with_tune(tmp_path, {"metric": "eval/loss", "tie_break": "eval/loss"}))
    assert set(problems) == {"tune.tie_break"}, problems  # named, without the whole config as its value
    assert problems["tune.tie_break"].startswith("  - tune.tie_break: eval/loss is tune.metric itself")


def test_a_trial_that_errored_before_it_started_is_a_row_not_a_crash(tmp_path: Path) -> None:
    """Ray's memory monitor killed every trial's process at its start: Tune's results have no
    metrics, so no config. The summary crashed on that (AttributeError) instead of failing the sweep
    with the trials' first error, which says why."""
    from ray.tune import Result

    from components import sweep_report, tune

    config = TuneConfig(num_samples=2, max_epochs=2, metric="eval/loss")
    killed = RuntimeError("1 worker(s) were killed due to the node running low on memory")
    folder = tmp_path / "run_trial-1_00000_0_lr=0.001_2026-12-05"
    folder.mkdir()
    row = tune._trial_row(Result(metrics=None, checkpoint=None, error=killed, path=str(folder)), config, {})
    assert row["status"] == "error" and row["epochs"] == 0 and row["error"] == str(killed)
    assert set(row["config"]) == set(config.search_space) and not any(row["config"].values())
    assert sweep_report.best_row([row], config.mode) is None  # so the stage fails with that error


def test_trial_runs_say_how_their_trial_ended_while_the_sweep_runs(tmp_path: Path) -> None:
    """A trial's run said `running` until the whole sweep ended: `ptft run`'s progress line (and
    `ptft status`) counted `4 running` while the sweep's own table said 2 completed, 2 running."""
    import pickle

    from mlflow.tracking import MlflowClient
    from ray.tune.experiment import Trial

    from components.tracking import start_run
    from components.tune import TRIAL_TAG, TrialStatusTags
    from pipelines.progress import stage_progress
    from tests.conftest import sqlite_store, wait_until

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep", artifact_location=str(tmp_path / "artifacts"))
    tune_run = start_run(client, experiment, "tune")
    trials = {name: Trial("__fake", stub=True) for name in ("running", "completed", "stopped", "error", "paused")}
    for trial in trials.values():  # each trial's process opened its run (components.tune.open_trial_run)
        start_run(
            client,
            experiment,
            str(trial),
            parent_run_id=tune_run,
            tags={TRIAL_TAG: str(trial), "ptft.trial_status": "running"},
        )
        trial.set_status(Trial.RUNNING)
        trial.update_last_result({"epoch": 1})
    callback = TrialStatusTags(uri, experiment, tune_run, max_epochs=3)
    callback.on_step_end(1, list(trials.values()))
    assert stage_progress(client, "tune", tune_run) == {"trials": {"running": 5}}

    callback = pickle.loads(pickle.dumps(callback))  # Tune keeps its callbacks in the sweep's snapshot
    trials["completed"].update_last_result({"epoch": 3})
    for name, status in (("completed", Trial.TERMINATED), ("stopped", Trial.TERMINATED), ("error", Trial.ERROR)):
        trials[name].set_status(status)
    trials["paused"].set_status(Trial.PAUSED)
    pending = Trial("__fake", stub=True)  # not started: no run yet
    callback.on_step_end(2, [*trials.values(), pending])
    told = {"completed": 1, "error": 1, "paused": 1, "running": 1, "stopped_early": 1}
    wait_until(lambda: stage_progress(client, "tune", tune_run) == {"trials": told}, "the trials' status tags")


def test_the_sweeps_advice_names_the_config_and_overrides_it_ran_with(tmp_path: Path) -> None:
    """Each stage's cache key holds the overrides: `ptft run CONFIG` alone would sweep again (or
    take an older sweep) instead of fine-tuning with the one just finished."""
    import argparse
    import shlex

    from pipelines.cli import _config_arguments

    config = validate(tiny_config_dict(tmp_path / "store"))
    space = "tune.search_space={learning_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-3}}"
    given = argparse.Namespace(config="configs/demo.yaml", overrides=["tune.num_samples=8", space])
    assert shlex.split(_config_arguments(given, config, "run-1")) == ["configs/demo.yaml", "tune.num_samples=8", space]
    resumed = argparse.Namespace(config=None, overrides=[])  # `ptft sweep --resume`: the run's resolved config
    assert _config_arguments(resumed, config, "run-1") == str(tmp_path / "store" / "runs" / "run-1" / "config.json")
