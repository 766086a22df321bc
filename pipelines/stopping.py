"""Record a stopped run the moment SIGTERM (or SIGHUP) arrives, not when the driver has unwound.

`ptft stop` (a Ray Job stop), Kubernetes and most schedulers send SIGTERM, then SIGKILL after a
grace period. The driver ends its stage and MLflow runs KILLED as the stop unwinds its stack, but
the stack may be inside native code that runs no Python signal handler for a while (a tokenizer's
training loop, a blocking Ray call) or inside a library's slow clean-up, and a SIGKILL then leaves
the run RUNNING for ever. So a thread waits on Python's signal wake-up fd, which the C-level
handler writes at once, whatever the main thread is doing, and records the stop right away; the
main thread's own unwinding then repeats the same records.

Ray's core worker puts a C-level handler of its own in front of Python's (absl's failure signal
handler): on SIGTERM it prints a stack trace, calls Python's handler, and arms a 3 s alarm that
aborts the process, so a stopped driver died 3 s into its grace period, whatever it still had to
record. `restore_python_sigterm` puts Python's handler back after `ray.init`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def record_stop_at_once(
    on_stop: Callable[[str], None], signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)
) -> Iterator[None]:
    """Call on_stop(why) from a watcher thread as soon as one of `signums` arrives, while in the
    block (SIGHUP: the terminal of a `ptft run` closed, e.g. a dropped ssh session).

    Works only where Python handles the signal (a handler set with signal.signal, as ptft's CLI and
    ray.init do) and in the main thread; elsewhere the block runs without it."""
    signums = tuple(number for number in signums if callable(signal.getsignal(number)))
    if threading.current_thread() is not threading.main_thread() or not signums:
        yield
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # the C handler must never block
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(read_end, signums, on_stop), name="ptft-stop", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        os.close(write_end)  # the watcher reads end-of-file and returns
        watcher.join(timeout=5)
        os.close(read_end)


# Python runs signal handlers in the main thread alone, between bytecodes. A signal that one of
# Ray's threads takes (they do not block SIGINT or SIGTERM) wakes no main thread asleep in one long
# `time.sleep`: Ctrl-C then waited for the sleep's end. Waits sleep in steps this long instead.
SIGNAL_CHECK_EVERY_S = 0.5


def sleep(seconds: float) -> None:
    """`time.sleep` that a SIGINT or SIGTERM taken by any thread ends within SIGNAL_CHECK_EVERY_S."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, SIGNAL_CHECK_EVERY_S))


def restore_python_sigterm() -> None:
    """Make Python's own C-level SIGTERM handler the process's again (after `ray.init`): registering
    the current Python handler anew re-installs it, in place of Ray's aborting one."""
    handler = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGTERM, handler)


def _watch(read_end: int, signums: tuple[int, ...], on_stop: Callable[[str], None]) -> None:
    while chunk := os.read(read_end, 64):
        if received := [number for number in chunk if number in signums]:
            try:
                on_stop(f"stopped ({signal.Signals(received[0]).name})")
            except Exception:  # noqa: BLE001 - the main thread's unwinding records it again
                log.exception("could not record the stop at once")
            return
