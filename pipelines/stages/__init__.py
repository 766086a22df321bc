"""The pipeline's stages, each declared once in its own module (see `base.Stage`).

Adding a stage: write `components/<stage>.py` (the work) and `pipelines/stages/<stage>.py` (its
declaration), and add it to STAGES. Nothing else names it: the runner, the manifest, the lineage
and the progress lines read the declarations.
"""

from __future__ import annotations

from pipelines.stages import finetune, pretrain, serve, tokenize, tune
from pipelines.stages.base import Inputs, SideEffect, Stage

# In an order where every stage comes after its upstream stages.
STAGES: tuple[Stage, ...] = (tokenize.STAGE, pretrain.STAGE, tune.STAGE, finetune.STAGE, serve.STAGE)
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)

__all__ = ["BY_NAME", "NAMES", "STAGES", "Inputs", "SideEffect", "Stage", "ancestors", "downstream"]


def ancestors(name: str) -> tuple[str, ...]:
    """Every stage whose output reaches this one, directly or not, in pipeline order."""
    found: set[str] = set()
    pending = list(BY_NAME[name].upstream)
    while pending:
        upstream = pending.pop()
        if upstream not in found:
            found.add(upstream)
            pending.extend(BY_NAME[upstream].upstream)
    return tuple(stage for stage in NAMES if stage in found)


def downstream(name: str) -> tuple[str, ...]:
    """The stage and every stage that reads its output, directly or not, in pipeline order."""
    found = {name}
    for stage in STAGES:
        if found.intersection(stage.upstream):
            found.add(stage.name)
    return tuple(stage.name for stage in STAGES if stage.name in found)


def _check_order() -> None:
    seen: set[str] = set()
    for stage in STAGES:
        missing = set(stage.upstream) - seen
        if missing:
            raise RuntimeError(f"stage {stage.name} is listed before its upstream {sorted(missing)}")
        seen.add(stage.name)


_check_order()
