"""The console split of components/console.py, in a child process: ptft's lines on the console,
every other kind of output (Python prints, logging, warnings, C-level writes, child processes)
in the log file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = textwrap.dedent(
    """
    import logging, os, subprocess, sys, warnings
    from pathlib import Path
    from components import console

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with console.logs_to(Path(sys.argv[1])):
        console.say("[ptft] tokenize started")
        print("(RayTrainWorker pid=1) a worker's line")
        logging.getLogger("ray.data").info("Execution plan: ReadParquet->MapBatches")
        warnings.warn("a library warning")
        os.write(2, b"C-level stderr\\n")
        subprocess.run([sys.executable, "-c", "print('from a child process')"], check=True)
        with console.muted():
            console.say("[ptft] muted line")
        console.warn("ptft: a warning of ours")
        if len(sys.argv) > 2:
            raise RuntimeError("the stage failed")
    print("after the block")
    """
)
FOREIGN = ["a worker's line", "Execution plan", "a library warning", "C-level stderr", "from a child process"]


def _run(log: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log), *extra], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_only_ptft_lines_reach_the_console_and_the_log_keeps_the_rest(tmp_path: Path) -> None:
    log = tmp_path / "runs" / "r1" / "ptft.log"
    result = _run(log)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[ptft] tokenize started\nafter the block\n"
    assert result.stderr == "ptft: a warning of ours\n"
    kept = log.read_text()
    assert all(line in kept for line in FOREIGN), kept
    assert "[ptft]" not in kept


def test_an_error_names_the_log_and_its_traceback_reaches_the_console(tmp_path: Path) -> None:
    log = tmp_path / "ptft.log"
    result = _run(log, "fail")
    assert result.returncode == 1
    assert f"ptft: the full log of this run (Ray, MLflow, workers): {log}" in result.stderr
    assert "RuntimeError: the stage failed" in result.stderr and "Traceback" in result.stderr
    assert "after the block" not in result.stdout
    assert "C-level stderr" in log.read_text() and "Traceback" not in log.read_text()


def test_a_run_that_opened_and_failed_says_how_to_continue_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With the storage quoted for the shell; nothing for a run its pre-flight refused (not opened)."""
    from pipelines import cli
    from pipelines import manifest as mf

    storage, run_id = tmp_path / "my runs", "20261205-074105-d96d56"
    folder = mf.Manifest.folder(storage, run_id)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    for command, again in (("run", f"resume {run_id}"), ("sweep", f"sweep --resume {run_id}")):
        with pytest.raises(KeyboardInterrupt), cli._resume_hint(command, storage, run_id):
            raise KeyboardInterrupt
        assert f"did not finish. To continue it as configured: ptft {again} --storage '{storage}'" in (
            capsys.readouterr().err
        )
    with pytest.raises(RuntimeError), cli._resume_hint("run", storage, "20261205-074106-aaaaaa"):
        raise RuntimeError("refused before the run opened")
    assert "did not finish" not in capsys.readouterr().err  # (a Ray driver in this process may log beside it)


HANGUP = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from components import console

    def hung_up(signum, frame):
        console.terminal_gone()
        raise KeyboardInterrupt

    signal.signal(signal.SIGHUP, hung_up)
    try:
        with console.logs_to(Path(sys.argv[1])), console.live():
            console.say("[ptft] pretrain started")
            time.sleep(60)
    except KeyboardInterrupt:
        console.warn("ptft: run r1 did not finish. To continue it: ptft resume r1")
    print("ptft run: stopped (SIGHUP)", file=sys.stderr)
    sys.exit(129)
    """
)


def test_after_the_terminal_closes_the_last_lines_go_to_the_log(tmp_path: Path) -> None:
    """A real terminal (a pty) that goes away during a run: the kernel sends SIGHUP, and every write
    to the terminal fails (EIO). The stop's lines end up in the run's log and the exit code says
    why; before, the first of them raised and the process ended in an unseen traceback, exit 1."""
    import os
    import pty

    log = tmp_path / "ptft.log"
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a session of its own on the pty, as a login shell's command is
        try:
            os.chdir(REPO)
            os.execv(sys.executable, [sys.executable, "-c", HANGUP, str(log)])
        finally:
            os._exit(127)  # never back into pytest in the child
    seen = b""
    while b"pretrain started" not in seen:
        seen += os.read(terminal, 1024)
    os.close(terminal)  # the terminal goes away
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 129, log.read_text()
    lines = log.read_text().splitlines()
    assert lines[-2:] == ["ptft: run r1 did not finish. To continue it: ptft resume r1", "ptft run: stopped (SIGHUP)"]


def test_a_sighup_stops_a_command_unless_nohup_ignores_it() -> None:
    import signal

    from pipelines import cli

    kept = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        cli._stop_on_signals()
        assert signal.getsignal(signal.SIGHUP) is cli._terminal_closed
        assert signal.getsignal(signal.SIGTERM) is cli._raise_keyboard_interrupt
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup ptft run ...` starts it
        cli._stop_on_signals()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        for number, handler in kept.items():
            signal.signal(number, handler)
