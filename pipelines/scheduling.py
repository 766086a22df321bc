"""Which of a pipeline's nodes run now: task branches side by side when the cluster has room.

A node may start once every node upstream of it has succeeded. It starts beside the nodes already
running when its claim (the Ray resources it holds while it runs, declared by its stage) fits in
what the cluster has free, less the claims of the nodes already started (they may not hold their
resources yet: counting them twice errs towards waiting, never towards oversubscribing). A node
without a claim runs alone. Nodes of a `serial` stage run one at a time (they share one place,
such as the Serve instance). A failed node skips its downstream nodes only; every other branch runs
on. Of the nodes ready at once, the deepest starts first (a branch's next node before another
branch's first), so where the cluster runs one at a time a task's branch is fine-tuned and
registered before the next task's sweep, not after every sweep.

A node that is the only one that can run, with nothing else running, runs on the calling thread,
so that a chain (a config of one task, or the shared stages before the fan-out) runs exactly as
one loop would: signals, Ray's and Tune's handlers and tracebacks behave as on the main thread.
Side by side, nodes run on daemon threads (a stopped driver does not wait for them), and the
calling thread waits for them and reports each result.

A node whose claim outlasts it (Serve's replicas stay deployed) starts only once every node whose
claim does not has ended. A lone node starts even where its claim does not fit, counting on the
nodes that hold what it needs to end; replicas deployed before it never would.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pipelines.stopping import SIGNAL_CHECK_EVERY_S

log = logging.getLogger(__name__)

Resources = Mapping[str, float]
NODE_THREAD = "ptft-node-"  # the name of a node's thread: this, then the node's id


class GraphNode(Protocol):
    id: str
    upstream: tuple[str, ...]


@dataclass(frozen=True)
class Slot:
    """How a node shares the cluster: its claim (None: the whole cluster), its serial group, and
    whether it keeps what it claims after it ends (a deployment's replicas)."""

    claim: Resources | None
    serial: str | None = None  # nodes of one group run one at a time
    lasting: bool = False


def fits(claim: Resources, free: Resources) -> bool:
    return all(amount <= free.get(resource, 0.0) + 1e-9 for resource, amount in claim.items() if amount > 0)


def run_graph(
    nodes: Sequence[GraphNode],
    run: Callable[[GraphNode], Any],
    slots: Mapping[str, Slot],
    free_resources: Callable[[], Resources],
    *,
    max_parallel: int,
    on_done: Callable[[GraphNode, Any], None],
    on_skipped: Callable[[GraphNode, set[str]], None],
    on_failed: Callable[[GraphNode, Exception], None],
) -> list[Exception]:
    """Run every node whose upstream succeeded, side by side where `slots` and `free_resources()`
    allow, at most `max_parallel` at once; returns the failures in the order they happened. A stop
    (KeyboardInterrupt, SystemExit) on any thread is raised here at once."""
    pending = list(nodes)  # in graph order: a node's upstream comes before it
    depth = _depths(nodes)
    succeeded: set[str] = set()
    failed: set[str] = set()
    running: dict[str, GraphNode] = {}
    failures: list[Exception] = []
    finished: queue.Queue = queue.Queue()
    told_waiting: set[str] = set()

    def settle(node: GraphNode, outcome: Any, error: BaseException | None) -> None:
        running.pop(node.id, None)
        if error is None:
            succeeded.add(node.id)
            on_done(node, outcome)
            return
        if not isinstance(error, Exception):
            raise error  # a stop: the run goes down with it
        failed.add(node.id)
        failures.append(error)
        on_failed(node, error)

    def in_thread(node: GraphNode) -> None:
        try:
            finished.put((node, run(node), None))
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
            finished.put((node, None, error))

    while pending or running:
        for node in list(pending):  # skip what a failure upstream cut off
            blocked = failed & set(node.upstream)  # a skipped node joins `failed`: its downstream follows
            if blocked:
                pending.remove(node)
                failed.add(node.id)
                on_skipped(node, blocked)
        held_back = set() if _only_lasting_left(pending, running, slots) else _lasting(pending, slots)
        ready = [node for node in pending if succeeded.issuperset(node.upstream) and node.id not in held_back]
        ready.sort(key=lambda node: -depth[node.id])  # deepest first; a stable sort keeps graph order
        if len(ready) == 1 and not running:  # nothing could run beside it: run it here
            node = ready[0]
            pending.remove(node)
            running[node.id] = node
            try:
                outcome = run(node)
            except BaseException as error:  # noqa: BLE001 - settle() re-raises a stop
                settle(node, None, error)
            else:
                settle(node, outcome, None)
            continue
        for node in _startable(ready, running, slots, free_resources, max_parallel):
            pending.remove(node)
            running[node.id] = node
            log.info("node %s starts beside %s", node.id, ", ".join(sorted(set(running) - {node.id})) or "nothing")
            threading.Thread(target=in_thread, args=(node,), name=f"{NODE_THREAD}{node.id}", daemon=True).start()
        for node in pending:
            if node in ready and node.id not in running and node.id not in told_waiting:
                told_waiting.add(node.id)
                log.info(
                    "node %s waits for room beside %s (it claims %s)", node.id, sorted(running), slots[node.id].claim
                )
        if running:
            node, outcome, error = _next(finished)
            settle(node, outcome, error)
        elif pending and not ready:  # cannot happen in a graph whose upstream comes first
            raise RuntimeError(f"nodes {[node.id for node in pending]} wait on nodes that never run")
    return failures


def nodes_in_threads() -> list[str]:
    """The nodes whose threads still run. After a stop their stages may be inside Ray's calls,
    which end the process (exit 1, without a word) or start a new Ray instance if Ray is shut
    down under them."""
    return [
        thread.name.removeprefix(NODE_THREAD) for thread in threading.enumerate() if thread.name.startswith(NODE_THREAD)
    ]


def _depths(nodes: Sequence[GraphNode]) -> dict[str, int]:
    """Each node's longest path from a node without upstream, in nodes."""
    depth: dict[str, int] = {}
    for node in nodes:  # in graph order: a node's upstream comes first
        depth[node.id] = 1 + max((depth[up] for up in node.upstream if up in depth), default=-1)
    return depth


def _lasting(nodes: Sequence[GraphNode], slots: Mapping[str, Slot]) -> set[str]:
    return {node.id for node in nodes if slots[node.id].lasting}


def _only_lasting_left(
    pending: Sequence[GraphNode], running: Mapping[str, GraphNode], slots: Mapping[str, Slot]
) -> bool:
    """Whether every node still to end either lasts or waits on one that does. What lasts goes last:
    a deployment's replicas would hold CPUs that a later node (another branch's training) waits
    for, without end where nothing else frees them."""
    after_lasting = _lasting(pending, slots)
    for node in pending:  # in graph order: a node's upstream comes first
        if after_lasting & set(node.upstream):
            after_lasting.add(node.id)
    return all(slots[node.id].lasting or node.id in after_lasting for node in [*pending, *running.values()])


def _next(finished: queue.Queue) -> tuple:
    while True:  # a timeout keeps the waiting thread responsive to signals (stopping.sleep says why)
        try:
            return finished.get(timeout=SIGNAL_CHECK_EVERY_S)
        except queue.Empty:
            continue


def _startable(
    ready: list,
    running: Mapping[str, GraphNode],
    slots: Mapping[str, Slot],
    free_resources: Callable[[], Resources],
    max_parallel: int,
) -> list:
    """The ready nodes that may start now, in the order given."""
    started: list = []
    busy_groups = {slots[node_id].serial for node_id in running} - {None}
    if any(slots[node_id].claim is None for node_id in running):
        return started  # a node that runs alone is running
    free = dict(free_resources()) if ready else {}
    for node_id in running:  # started, perhaps not yet holding what it claims
        _subtract(free, slots[node_id].claim or {})
    for node in ready:
        if len(running) + len(started) >= max_parallel:
            break
        slot = slots[node.id]
        if slot.serial is not None and slot.serial in busy_groups:
            continue
        alone = not running and not started
        if slot.claim is None:
            if alone:
                return [node]
            continue
        if alone or fits(slot.claim, free):
            started.append(node)
            _subtract(free, slot.claim)
            if slot.serial is not None:
                busy_groups.add(slot.serial)
    return started


def _subtract(free: dict[str, float], claim: Resources) -> None:
    for resource, amount in claim.items():
        free[resource] = free.get(resource, 0.0) - amount
