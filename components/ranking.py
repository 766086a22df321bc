"""How results compare: a sweep's trials, and the epochs of one fine-tuning run, by the same rule
(the sweep's `tune.metric`, equal values ordered by `tune.tie_break`)."""

from __future__ import annotations

from pydantic import BaseModel

from components.schemas import TuneConfig, direction

# What the schedulers and searchers compare when the sweep has a tie-break (see Ranking).
RANK_KEY = "tune/rank"
# The tie-break's weight: its bounded share stays below 1e-9, far under any step of a metric counted
# on a validation split (1 / rows), so it orders equal values and never reorders different ones.
TIE_WEIGHT = 1e-9


def finite(value) -> bool:
    return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")


class Ranking(BaseModel):
    """How trials and epochs compare: by `metric`, equal values by `tie_break`. Tune's schedulers
    take one number, so with a tie-break each result carries RANK_KEY: the metric plus a nudge
    below TIE_WEIGHT in the direction the tie-break favours."""

    metric: str
    mode: str
    tie_break: str | None = None

    @classmethod
    def of(cls, cfg: TuneConfig) -> Ranking:
        return cls(metric=cfg.metric, mode=cfg.mode, tie_break=cfg.tie_break)

    @property
    def scheduler_metric(self) -> str:
        return RANK_KEY if self.tie_break else self.metric

    def value(self, metrics: dict) -> float | None:
        primary = metrics.get(self.metric)
        tie = metrics.get(self.tie_break) if self.tie_break else None
        if not finite(primary) or not finite(tie):
            return primary
        towards = 1 if direction(self.tie_break) == self.mode else -1
        return primary + towards * TIE_WEIGHT * tie / (1 + abs(tie))

    def ranked(self, metrics: dict) -> dict:
        """The metrics as reported to Tune: with RANK_KEY when there is a tie-break."""
        value = self.value(metrics)
        return {**metrics, RANK_KEY: value} if self.tie_break and finite(value) else metrics

    def better(self, metrics: dict, than: dict | None) -> bool:
        """Whether `metrics` rank strictly above `than` (anything finite beats nothing)."""
        value = self.value(metrics)
        if not finite(value):
            return False
        if than is None or not finite(self.value(than)):
            return True
        return value > self.value(than) if self.mode == "max" else value < self.value(than)
