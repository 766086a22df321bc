"""pipelines/scheduling.py: branches side by side where the claims fit, alone where they do not,
a failed branch leaving the others running, and a chain on the calling thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from pipelines.scheduling import Slot, fits, nodes_in_threads, run_graph


@dataclass(frozen=True)
class N:
    id: str
    upstream: tuple[str, ...] = ()


# shared -> (a1 -> a2) and (b1 -> b2): one pre-training, two task branches
GRAPH = (N("shared"), N("a1", ("shared",)), N("b1", ("shared",)), N("a2", ("a1",)), N("b2", ("b1",)))


class Recorder:
    def __init__(self, seconds: float = 0.3, fail: tuple[str, ...] = ()):
        self.seconds, self.fail = seconds, fail
        self.spans: dict[str, tuple[float, float]] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.done: list[str] = []
        self.skipped: dict[str, set[str]] = {}
        self.failed: list[str] = []

    def run(self, node: N) -> str:
        started = time.monotonic()
        self.threads[node.id] = threading.current_thread()
        time.sleep(self.seconds)
        self.spans[node.id] = (started, time.monotonic())
        if node.id in self.fail:
            raise RuntimeError(f"{node.id} broke")
        return f"{node.id} result"

    def overlapped(self, first: str, second: str) -> bool:
        (a0, a1), (b0, b1) = self.spans[first], self.spans[second]
        return a0 < b1 and b0 < a1

    def go(self, slots: dict[str, Slot], cpus: float, max_parallel: int = 4) -> list[Exception]:
        return run_graph(
            GRAPH,
            self.run,
            slots,
            lambda: {"CPU": cpus},
            max_parallel=max_parallel,
            on_done=lambda node, result: self.done.append(node.id),
            on_skipped=lambda node, blocked: self.skipped.__setitem__(node.id, blocked),
            on_failed=lambda node, error: self.failed.append(node.id),
        )


def claiming(cpus: float, serial: tuple[str, ...] = ()) -> dict[str, Slot]:
    slots = {node.id: Slot({"CPU": cpus}, serial="group" if node.id in serial else None) for node in GRAPH}
    return {**slots, "shared": Slot(None)}  # the shared stage runs alone


def test_branches_run_side_by_side_when_their_claims_fit():
    recorder = Recorder()
    assert recorder.go(claiming(2), cpus=8) == []
    assert recorder.overlapped("a1", "b1") and recorder.overlapped("a2", "b2")
    assert not recorder.overlapped("shared", "a1")  # a branch starts after its upstream
    assert recorder.spans["a1"][1] <= recorder.spans["a2"][0]
    assert sorted(recorder.done) == sorted(node.id for node in GRAPH)
    # the chain before the fan-out runs on the calling thread; the branches on their own
    assert recorder.threads["shared"] is threading.current_thread()
    assert recorder.threads["a1"] is not threading.current_thread()


def test_branches_run_one_after_the_other_when_the_cluster_has_room_for_one():
    recorder = Recorder(seconds=0.1)
    assert recorder.go(claiming(2), cpus=3) == []  # 2 + 2 > 3
    spans = sorted(recorder.spans.values())
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))


def test_with_room_for_one_a_branch_ends_before_the_next_one_starts():
    """Deepest first: a1's successor a2 before b1. In graph order (a1, b1, a2, b2) every task's
    sweep ran before any task's fine-tuning, so no model was ready until all the sweeps were."""
    recorder = Recorder(seconds=0.05)
    assert recorder.go(claiming(2), cpus=3) == []  # 2 + 2 > 3
    assert [node for _, node in sorted((span[0], node) for node, span in recorder.spans.items())] == [
        "shared",
        "a1",
        "a2",
        "b1",
        "b2",
    ]


def test_claims_count_nodes_already_started_and_max_parallel_caps_them():
    recorder = Recorder(seconds=0.1)
    assert recorder.go(claiming(1), cpus=8, max_parallel=1) == []
    assert not recorder.overlapped("a1", "b1")


def test_a_node_without_a_claim_runs_alone():
    recorder = Recorder(seconds=0.1)
    slots = {**claiming(1), "b1": Slot(None)}
    assert recorder.go(slots, cpus=8) == []
    assert not any(recorder.overlapped("b1", other) for other in ("a1", "a2", "b2"))


def test_nodes_of_a_serial_stage_never_overlap_but_run_beside_others():
    recorder = Recorder(seconds=0.3)
    assert recorder.go(claiming(1, serial=("a2", "b2")), cpus=8) == []
    assert not recorder.overlapped("a2", "b2")
    assert recorder.overlapped("a1", "b1")


def test_nodes_whose_claim_lasts_run_after_every_other_node():
    """A deployment holds its replicas' CPUs after it ends: deployed before another branch's
    training, it left that training waiting for them without end on a small cluster."""
    recorder = Recorder(seconds=0.1)
    slots = {**claiming(1), "a2": Slot({"CPU": 1}, serial="serve", lasting=True)}
    slots["b2"] = Slot({"CPU": 1}, serial="serve", lasting=True)
    slow = {"b1": 0.5}  # b's training ends long after a's: a2 could have started before it
    original = recorder.run

    def run(node: N) -> str:
        time.sleep(slow.get(node.id, 0))
        return original(node)

    recorder.run = run
    assert recorder.go(slots, cpus=8) == []
    assert recorder.spans["a2"][0] >= recorder.spans["b1"][1]
    assert not recorder.overlapped("a2", "b2")  # and, serial, one at a time


def test_a_node_after_a_lasting_one_does_not_hold_it_back():
    """It waits for the lasting node; holding that one back for it would wait for ever."""
    graph = (N("shared"), N("a1", ("shared",)), N("b1", ("shared",)), N("a2", ("a1",)), N("a3", ("a2",)))
    slots = {node.id: Slot({"CPU": 1}) for node in graph} | {"a2": Slot({"CPU": 1}, lasting=True)}
    ended: list[str] = []
    failures = run_graph(
        graph,
        lambda node: time.sleep(0.3 if node.id == "b1" else 0.05),
        slots,
        lambda: {"CPU": 8},
        max_parallel=4,
        on_done=lambda node, result: ended.append(node.id),
        on_skipped=lambda node, blocked: None,
        on_failed=lambda node, error: None,
    )
    assert failures == [] and ended.index("b1") < ended.index("a2") < ended.index("a3")


def test_a_failed_branch_skips_its_own_downstream_only():
    recorder = Recorder(fail=("a1",))
    failures = recorder.go(claiming(1), cpus=8)
    assert [str(error) for error in failures] == ["a1 broke"]
    assert recorder.failed == ["a1"]
    assert recorder.skipped == {"a2": {"a1"}}
    assert "a2" not in recorder.spans
    assert {"shared", "b1", "b2"} <= set(recorder.done)


def _run_until_stopped(run) -> None:
    """GRAPH with room for every branch at once, each node's work `run`."""
    run_graph(
        GRAPH,
        run,
        claiming(1),
        lambda: {"CPU": 8},
        max_parallel=4,
        on_done=lambda node, result: None,
        on_skipped=lambda node, blocked: None,
        on_failed=lambda node, error: None,
    )


def test_a_stop_in_a_branch_is_raised_at_once():
    def run(node: N) -> None:
        if node.id == "a1":
            raise KeyboardInterrupt
        time.sleep(0.05)

    with pytest.raises(KeyboardInterrupt):
        _run_until_stopped(run)


def test_a_stop_names_the_branches_still_running_in_their_threads():
    """The CLI leaves Ray alone while these run (a call into a Ray shut down under them ended the
    process with exit 1): the stop does not wait for them, so they are named until they end."""
    release = threading.Event()

    def run(node: N) -> None:
        if node.id == "a1":
            time.sleep(0.2)
            raise KeyboardInterrupt
        if node.id == "b1":
            release.wait(timeout=30)

    with pytest.raises(KeyboardInterrupt):
        _run_until_stopped(run)
    assert "b1" in nodes_in_threads()  # (a1's thread may not have ended yet)
    release.set()
    deadline = time.monotonic() + 10
    while nodes_in_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert nodes_in_threads() == []


def test_fits_needs_every_claimed_resource():
    assert fits({"CPU": 2, "GPU": 0}, {"CPU": 2})
    assert not fits({"CPU": 1, "GPU": 1}, {"CPU": 8})
    assert not fits({"CPU": 2.5}, {"CPU": 2})
