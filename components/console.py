"""ptft's own console lines, kept apart from every other program's logs.

While `logs_to(path)` is open, the process's stdout and stderr file descriptors point at a log
file: whatever Ray, Ray Data/Train/Tune/Serve, MLflow, transformers and DeepSpeed print (and the
Ray workers' output, which Ray streams to the driver's stdout and stderr) lands there, C-level
writes and child processes included. ptft's own lines go through `say`/`warn` to copies of the
original descriptors, so the console shows only them. Outside `logs_to` (`--verbose`, or commands
that run nothing) `say` is a plain print.

While `live()` is open on a terminal, a rich live display at the bottom of the screen holds the
progress bars and the trial table (`show`), and `say` prints above it. When the output is not a
terminal (CI logs, `ptft submit`, a pipe) there is no live display: progress is plain lines.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

_out: TextIO | None = None
_err: TextIO | None = None
_muted = False
_live: Any = None  # the rich Live display while `live()` is open on a terminal
_panels: dict[str, Any] = {}  # what it shows, by key, in the order first shown
_console_fds: tuple[int, ...] = ()  # while `logs_to` is open: its saved copies of fds 1 and 2 (the console)


def stdout() -> TextIO:
    """Where ptft's own lines go: the console, also while other output goes to the log file."""
    return _out or sys.stdout


def stderr() -> TextIO:
    return _err or sys.stderr


def say(*parts: object, sep: str = " ", end: str = "\n") -> None:
    if _muted:
        return
    live = _live
    if live is not None:  # above the live display
        live.console.print(sep.join(map(str, parts)), end=end, markup=False, highlight=False, soft_wrap=True)
    else:
        print(*parts, sep=sep, end=end, file=stdout(), flush=True)


def number(value: Any) -> str:
    """A value as ptft's lines show it: counts as counts (14041, not 1.404e+04), other numbers to 4
    significant digits, anything else as it is, and a missing value as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e12 else f"{value:.4g}"


def is_terminal() -> bool:
    stream = stdout()
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"


def is_live() -> bool:
    return _live is not None


@contextlib.contextmanager
def live(target: Any = None) -> Iterator[bool]:
    """A live display for progress bars and tables while the block runs, on a terminal (or on the
    rich Console `target`); yields whether there is one. None when muted or not a terminal."""
    global _live
    if _muted or (target is None and not is_terminal()):
        yield False
        return
    from rich.console import Console, Group
    from rich.live import Live

    # Live must not take over sys.stdout/sys.stderr: during a run they are the log file's.
    display = Live(
        Group(),
        console=target or Console(file=stdout()),
        refresh_per_second=4,
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
    )
    with display:
        _live = display
        try:
            yield True
        finally:
            _live = None
            _panels.clear()


def show(key: str, renderable: Any) -> None:
    """Put `renderable` in the live display under `key` (None takes it out); nothing without one."""
    live = _live
    if live is None:
        return
    from rich.console import Group

    if renderable is None:
        _panels.pop(key, None)
    else:
        _panels[key] = renderable
    live.update(Group(*_panels.values()), refresh=True)


def warn(*parts: object) -> None:
    """A line for the console's stderr; never muted (errors and warnings show also with --quiet)."""
    print(*parts, file=stderr(), flush=True)


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """`--quiet`: `say` prints nothing until the block ends."""
    global _muted
    before, _muted = _muted, True
    try:
        yield
    finally:
        _muted = before


@contextlib.contextmanager
def logs_to(path: Path) -> Iterator[Path]:
    """Send stdout and stderr (the file descriptors) to `path` until the block ends; ptft's own
    lines still reach the console. An error leaving the block names the log on the console, and
    its traceback, printed after the block, reaches the console too."""
    global _out, _err, _console_fds
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    console_out, console_err = os.dup(1), os.dup(2)
    _console_fds = (console_out, console_err)
    with open(path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    _out = os.fdopen(os.dup(console_out), "w", buffering=1)
    _err = os.fdopen(os.dup(console_err), "w", buffering=1)
    try:
        yield path
    except BaseException:
        warn(f"ptft: the full log of this run (Ray, MLflow, workers): {path}")
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(console_out, 1)
        os.dup2(console_err, 2)
        for stream in (_out, _err):
            stream.close()
        os.close(console_out)
        os.close(console_err)
        _out = _err = None
        _console_fds = ()


def terminal_gone() -> None:
    """The terminal closed (SIGHUP: a dropped ssh session, a closed window). Every write to it
    fails (EIO), so a stopping run's last lines (how to resume it, why it stopped) ended in an
    error nobody saw. From now on ptft's own lines go where all other output goes: the run's log
    while `logs_to` is open, else nowhere; the live display draws nothing more."""
    global _live
    if _live is not None:
        _live.console.quiet = True  # its refresh thread and its end write nothing
        _live = None  # `say` then prints plainly, to the log
    if _console_fds:  # fd 1 is the log: the console's copies become the log too
        for fd in (*_console_fds, *(stream.fileno() for stream in (_out, _err) if stream is not None)):
            os.dup2(1, fd)
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)


@contextlib.contextmanager
def spinner(what: str) -> Iterator[None]:
    """A spinner with `what` while the block runs, on a terminal; a plain line otherwise."""
    if _muted or not is_terminal() or _live is not None:
        say(what)
        yield
        return
    from rich.console import Console

    with Console(file=stdout()).status(what):
        yield
