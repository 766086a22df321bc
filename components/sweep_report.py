"""How a sweep reads: the live trial table on the terminal, and the results table and plot the
tune stage logs to its MLflow run. Plain functions over trial rows (dicts), so the tune stage and
`ptft sweep` share them.

A trial row: {"trial": name, "status": "running"|"completed"|"stopped_early"|"error"|...,
"epochs": int, "metric": float | None (at "best_epoch" when the row has one), "rank": the metric with the
sweep's tie-break (optional), "config": {hyperparameter: value}, ...}.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import TextIO

import ray.tune

from components import console, metrics, plots
from components.ranking import RANK_KEY  # a sweep without a tie-break reports none


def ended_status(last_result: dict, max_epochs: int) -> str:
    """A trial Tune terminated without an error: it ran every epoch or stopped itself early
    (`completed`), or the scheduler (or the sweep's time budget) stopped it (`stopped_early`)."""
    completed = int(last_result.get("epoch", 0)) >= max_epochs or last_result.get("early_stop/epoch")
    return "completed" if completed else "stopped_early"


def trial_status(trial, result: dict, max_epochs: int | None) -> str:
    """pending, running, paused, error, or how a terminated trial ended (`ended_status`), from
    Tune's state of the trial and its latest result."""
    status = trial.status.lower()
    return ended_status(result, max_epochs) if status == "terminated" and max_epochs else status


def _epochs(row: dict) -> str:
    """Epochs run, and the epoch the trial is ranked on when it is not the last."""
    best = row.get("best_epoch")
    return f"{row['epochs']} (best {best})" if best not in (None, row["epochs"]) else str(row["epochs"])


def format_table(rows: list[dict], params: list[str], metric: str, *, best: str | None = None) -> str:
    """A fixed-width table: one line per trial, the best one marked with *."""
    header = ["trial", "status", "epochs", metric, *params]
    lines = [
        [
            ("* " if row["trial"] == best else "  ") + row["trial"],
            row["status"],
            _epochs(row),
            console.number(row.get("metric")),
            *(console.number(row["config"].get(name)) for name in params),
        ]
        for row in rows
    ]
    widths = [
        max(len(header[i]), *(len(line[i]) for line in lines)) if lines else len(header[i]) for i in range(len(header))
    ]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True))]
    out += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def best_row(rows: list[dict], mode: str) -> dict | None:
    """The best trial: by its `rank` (the metric with the sweep's tie-break) where rows have one."""
    scored = [row for row in rows if isinstance(row.get("metric"), (int, float)) and math.isfinite(row["metric"])]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda row: row.get("rank", row["metric"]))


# With no result for this many print intervals, the table is printed anyway (nothing else says the
# sweep is alive); with results it prints at most every interval.
QUIET_TABLES = 6


class TrialTable(ray.tune.Callback):
    """Prints the trials' status on the terminal as results arrive, at most every `every_s`
    seconds, and with no result for `QUIET_TABLES` × every_s anyway (the tune stage prints the
    final table itself)."""

    def __init__(
        self,
        params: list[str],
        metric: str,
        mode: str,
        every_s: float,
        stream: TextIO | None = None,
        name: str = "sweep",
        max_epochs: int | None = None,
    ):
        self.params, self.metric, self.mode, self.every_s = params, metric, mode, every_s
        self.max_epochs = max_epochs  # to tell a completed trial from a stopped one, as the final table does
        self.name = name  # the sweep's node (`tune.topic`): sweeps side by side get a table each
        # Tune pickles its callbacks with the experiment: keep no handle to sys.stdout (a test's
        # capture of it does not pickle); look it up when printing.
        self._stream = stream
        self._last = self._shown = 0.0
        self._started = time.monotonic()

    def _rows(self, trials, reported=None) -> list[dict]:
        """`reported`: (trial, result) that Tune is handing to the callbacks, which it does before
        it updates that trial's `last_result`."""
        rows = []
        for trial in trials:
            result = reported[1] if reported and reported[0] is trial else (trial.last_result or {})
            status = trial_status(trial, result, self.max_epochs)
            rows.append(
                {
                    "trial": str(trial),
                    "status": status,
                    "epochs": int(result.get("epoch", 0)),
                    "metric": result.get(self.metric),
                    "rank": result.get(RANK_KEY, result.get(self.metric)),
                    "config": {name: trial.config.get(name) for name in self.params},
                }
            )
        return rows

    def _print(self, trials, title: str, reported=None) -> None:
        rows = self._rows(trials, reported)
        best = best_row(rows, self.mode)
        elapsed = time.monotonic() - self._started
        counts = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
        stream = self._stream or console.stdout()
        print(f"\n== sweep {title} after {elapsed:.0f} s: {summary}", file=stream)
        print(
            format_table(rows, self.params, self.metric, best=best["trial"] if best else None), file=stream, flush=True
        )

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if console.is_live():  # a terminal: the table is redrawn in place, on every result
            self._show(trials, (trial, result))
        elif self.every_s and time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self._print(trials, "progress", (trial, result))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if console.is_live():
            self._show(trials)

    def on_step_end(self, iteration, trials, **info) -> None:
        """Tune's loop turns often: between results (a first epoch can take minutes), the live
        table's clock moves on, and a log gets the table at least every `QUIET_TABLES` × every_s."""
        if not trials:  # the searcher has made none yet
            return
        if console.is_live():
            if time.monotonic() - self._shown >= 1:
                self._show(trials)
        elif self.every_s and time.monotonic() - self._last >= QUIET_TABLES * self.every_s:
            self._last = time.monotonic()
            self._print(trials, "progress")

    def _show(self, trials, reported=None) -> None:
        from rich.text import Text

        rows = self._rows(trials, reported)
        best = best_row(rows, self.mode)
        table = format_table(rows, self.params, self.metric, best=best["trial"] if best else None)
        self._shown = time.monotonic()
        elapsed = self._shown - self._started
        console.show(self.name, Text(f"{self.name}, {elapsed:.0f} s:\n{table}", no_wrap=True, overflow="ellipsis"))


# Tune's trial states, as the live metrics count them.
_TRIAL_STATUS = {
    "PENDING": "pending",
    "PAUSED": "pending",
    "RUNNING": "running",
    "TERMINATED": "finished",
    "ERROR": "errored",
}


class TrialCounts(ray.tune.Callback):
    """Keeps the live metric of how many trials of the sweep are pending, running, finished and
    errored (`ptft_tune_trials`), after every step of Tune's loop, where any trial may change state."""

    def __init__(self, pipeline_run_id: str):
        self.pipeline_run_id = pipeline_run_id

    def on_step_end(self, iteration, trials, **info) -> None:
        counts: dict[str, int] = {}
        for trial in trials:
            status = _TRIAL_STATUS.get(trial.status, "pending")
            counts[status] = counts.get(status, 0) + 1
        metrics.trials(self.pipeline_run_id, counts)

    def on_experiment_end(self, trials, **info) -> None:
        self.on_step_end(0, trials)


def write_csv(rows: list[dict], params: list[str], metric: str, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "status", "epochs", metric, *params, "mlflow_run_id"])
        for row in rows:
            writer.writerow(
                [
                    row["trial"],
                    row["status"],
                    row["epochs"],
                    row.get("metric"),
                    *(row["config"].get(name) for name in params),
                    row.get("mlflow_run_id"),
                ]
            )


def plot(rows: list[dict], params: list[str], metric: str, log_scale: set[str], best: str | None, path: Path) -> None:
    """One panel per hyperparameter: each trial's last metric against its value, the best trial in
    red, trials that stopped early hollow."""
    with plots.pyplot() as plt:
        columns = max(1, len(params))
        figure, axes = plt.subplots(1, columns, figsize=(4 * columns, 3.4), squeeze=False)
        for axis, name in zip(axes[0], params, strict=False):
            for row in rows:
                value, score = row["config"].get(name), row.get("metric")
                if value is None or not isinstance(score, (int, float)):
                    continue
                is_best = row["trial"] == best
                full = row["status"] == "completed"
                axis.scatter(
                    [value],
                    [score],
                    s=60 if is_best else 30,
                    zorder=3 if is_best else 2,
                    facecolors=("tab:red" if is_best else "tab:blue") if full or is_best else "none",
                    edgecolors="tab:red" if is_best else "tab:blue",
                )
                if is_best:
                    axis.annotate(
                        "best", (value, score), xytext=(6, 6), textcoords="offset points", color="tab:red", fontsize=8
                    )
            if name in log_scale:
                axis.set_xscale("log")
            axis.set_xlabel(name)
            axis.set_ylabel(metric)
            axis.grid(alpha=0.3)
        figure.suptitle(f"{metric} per trial (red: best; hollow: stopped early)", fontsize=10)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
