"""The pipeline's stages, each declared once in its own module (see `base.Stage`).

Adding a stage: write `components/<stage>.py` (the work) and `pipelines/stages/<stage>.py` (its
declaration), and add it to STAGES. Nothing else names it: the runner, the manifest, the lineage
and the progress lines read the declarations.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.pipeline_config import PipelineConfig
from pipelines.stages import finetune, prepare, pretrain, serve, tokenize, tune
from pipelines.stages.base import Inputs, Room, SideEffect, Stage

# In an order where every stage comes after its upstream stages.
STAGES: tuple[Stage, ...] = (tokenize.STAGE, pretrain.STAGE, prepare.STAGE, tune.STAGE, finetune.STAGE, serve.STAGE)
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)

__all__ = [
    "BY_NAME",
    "NAMES",
    "STAGES",
    "Inputs",
    "Node",
    "Room",
    "SideEffect",
    "Stage",
    "declaration",
    "node_ancestors",
    "node_descendants",
    "node_id",
    "split_node",
    "graph",
]


@dataclass(frozen=True)
class Node:
    """A stage in one config's graph: once, or once per task (`<stage>.<task>`)."""

    id: str
    stage: Stage
    task: str | None
    upstream: tuple[str, ...]  # node ids

    def config(self, config: PipelineConfig) -> PipelineConfig:
        """The config as this node's stage sees it (a task's stage sees its task's sections)."""
        return config.for_task(self.task) if self.task else config


def graph(config: PipelineConfig) -> tuple[Node, ...]:
    """The config's nodes in a runnable order: a config of several tasks fans out after the
    shared stages, one branch per task."""
    tasks = config.task_names()
    nodes: dict[str, Node] = {}
    for stage in STAGES:
        if not stage.when(config):
            continue
        for task in tasks if (stage.per_task and tasks) else (None,):
            upstream = []
            for name in stage.upstream:
                upstream_id = node_id(name, task if BY_NAME[name].per_task else None)
                if upstream_id in nodes:  # an upstream this config has no node for is left out
                    upstream.append(upstream_id)
            own_id = node_id(stage.name, task)
            nodes[own_id] = Node(own_id, stage, task, tuple(upstream))
    return tuple(nodes.values())


def node_id(stage: str, task: str | None) -> str:
    """`finetune`, or `finetune.topic` for a task's node."""
    return f"{stage}.{task}" if task else stage


def split_node(node: str) -> tuple[str, str | None]:
    """(stage name, task or None) of a node id."""
    stage, _, task = node.partition(".")
    return stage, task or None


def declaration(node: str) -> Stage | None:
    """The stage a node id (`finetune`, `finetune.topic`) runs; None for a name no stage has."""
    return BY_NAME.get(split_node(node)[0])


def node_ancestors(nodes: tuple[Node, ...], node_id: str) -> tuple[str, ...]:
    """Every node whose output reaches this one, in graph order."""
    by_id = {node.id: node for node in nodes}
    found: set[str] = set()
    pending = list(by_id[node_id].upstream)
    while pending:
        upstream = pending.pop()
        if upstream not in found:
            found.add(upstream)
            pending.extend(by_id[upstream].upstream)
    return tuple(node.id for node in nodes if node.id in found)


def node_descendants(nodes: tuple[Node, ...], node_ids: set[str]) -> set[str]:
    """These nodes and every node that reads their output, directly or not."""
    found = set(node_ids)
    for node in nodes:  # graph order: a node's upstream comes before it
        if found.intersection(node.upstream):
            found.add(node.id)
    return found


def _check_order() -> None:
    seen: set[str] = set()
    for stage in STAGES:
        missing = set(stage.upstream) - seen
        if missing:
            raise RuntimeError(f"stage {stage.name} is listed before its upstream {sorted(missing)}")
        seen.add(stage.name)


_check_order()
